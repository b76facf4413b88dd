"""MailboxWatcher (server/mailbox_watch.py) on real files, real processes and a real Redis.

A writer process (``Writer``: a Python child reading one command a line) changes a Maildir
the way MX delivery, another IMAP worker or POP3 does, and answers with the monotonic
clock (system-wide on Linux) taken just before its change; the subscriber in this process
measures from there to its wake-up.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailfort.server import mailbox_watch
from mailfort.server.mailbox_watch import MailboxWatcher, Subscription
from mailfort.store.imap_mailbox import MailStore
from mailfort.store.maildir import ensure_maildir

SRC = str(Path(__file__).resolve().parents[2] / "src")
# The targets (issue 28): a change reaches a subscriber in < 100 ms median, < 1 s worst.
# One sample is held to the worst case (the machine running the tests is shared and busy),
# the median of many to the median's.
WAKE = 1.0
MEDIAN = 0.1

_WRITER = r"""
import os, sys, time
from pathlib import Path
from mailfort.store.imap_mailbox import MailStore
root = Path(sys.argv[1])
n = 0
for line in sys.stdin:
    cmd, *args = line.split()
    t = time.monotonic()
    if cmd == "deliver":              # the Maildir rule: written in tmp/, renamed into new/
        for _ in range(int(args[0]) if args else 1):
            n += 1
            name = f"{time.time_ns()}.P{os.getpid()}Q{n}.writer"
            tmp = root / "tmp" / name
            tmp.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
            os.rename(tmp, root / "new" / name)
    elif cmd == "rename":             # a flag change by another tool: a rename in cur/
        os.rename(root / "cur" / args[0], root / "cur" / args[1])
    elif cmd == "keyword":            # an IMAP STORE of a keyword: only the UID log changes
        MailStore(root.parent if args[1] != "INBOX" else root).mailbox(args[1]).store(
            [int(args[0])], add=["$Label1"])
    sys.stdout.write(f"{t}\n")
    sys.stdout.flush()
"""


class Writer:
    """Another process changing the Maildir ``root`` on command."""

    def __init__(self, root: Path) -> None:
        env = {**os.environ, "PYTHONPATH": SRC}
        self.proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(root)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def answer(self) -> float:
        assert self.proc.stdout is not None
        return float(self.proc.stdout.readline())

    async def do(self, line: str) -> float:
        """Send a command; the child's clock before its change (read in a thread, so the
        loop meanwhile handles the inotify events)."""
        self.send(line)
        return await asyncio.to_thread(self.answer)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    md = tmp_path / "mail" / "example.test" / "alice"
    ensure_maildir(md)
    return md


@pytest.fixture
def writer(maildir: Path) -> Iterator[Writer]:
    w = Writer(maildir)
    w.send("deliver 0")  # started and answering: its start-up is not measured
    w.answer()
    yield w
    w.close()


@pytest.fixture
async def watcher(tmp_path: Path) -> AsyncIterator[MailboxWatcher]:
    w = MailboxWatcher(tmp_path / "mail", poll="never")
    await w.start()
    assert w.inotify_error is None
    yield w
    await w.close()


async def woken_after(sub: Subscription, since: float, timeout: float = 2.0) -> float:
    """Seconds from ``since`` (the writer's clock) to the wake-up."""
    await asyncio.wait_for(sub.wait(), timeout)
    return time.monotonic() - since


async def not_woken(sub: Subscription, within: float = 0.3) -> bool:
    try:
        await asyncio.wait_for(sub.wait(), within)
    except TimeoutError:
        return True
    return False


def kernel_watches(fd: int) -> int:
    """inotify watches the kernel holds on ``fd`` (/proc/self/fdinfo)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return sum(1 for line in f if line.startswith("inotify wd:"))


# ------------------------------------------------------------------ other processes

async def test_delivery_into_new_by_another_process(
        watcher: MailboxWatcher, maildir: Path, writer: Writer) -> None:
    sub = watcher.subscribe(maildir)
    since = await writer.do("deliver")
    assert await woken_after(sub, since) < WAKE
    assert await not_woken(sub)  # one change, one wake-up


async def test_median_wake_up_from_another_process(
        watcher: MailboxWatcher, maildir: Path, writer: Writer) -> None:
    sub = watcher.subscribe(maildir)
    delays = []
    for _ in range(21):
        since = await writer.do("deliver")
        delays.append(await woken_after(sub, since))
    delays.sort()
    assert delays[10] < MEDIAN, delays
    assert delays[-1] < WAKE, delays


async def test_flag_rename_in_cur_by_another_process(
        watcher: MailboxWatcher, maildir: Path, writer: Writer) -> None:
    (maildir / "cur" / "1.M1P1Q1.host:2,").write_bytes(b"x\r\n")
    sub = watcher.subscribe(maildir)
    since = await writer.do("rename 1.M1P1Q1.host:2, 1.M1P1Q1.host:2,S")
    assert await woken_after(sub, since) < WAKE


async def test_keyword_store_appends_the_uid_log_only(
        watcher: MailboxWatcher, maildir: Path, writer: Writer) -> None:
    """A keyword renames no file: only the UID log tells, and it is watched."""
    (maildir / "cur" / "1.M1P1Q1.host:2,S").write_bytes(b"x\r\n")
    box = MailStore(maildir).mailbox("INBOX")
    box.scan()
    cur, new = os.stat(maildir / "cur").st_mtime_ns, os.stat(maildir / "new").st_mtime_ns
    sub = watcher.subscribe(maildir)
    since = await writer.do("keyword 1 INBOX")
    assert await woken_after(sub, since) < WAKE
    assert (os.stat(maildir / "cur").st_mtime_ns, os.stat(maildir / "new").st_mtime_ns) == (
        cur, new)  # indeed nothing but the log changed
    assert "$Label1" in box.messages()[0].flags


async def test_folder_is_watched_apart_from_inbox(
        watcher: MailboxWatcher, maildir: Path, writer: Writer) -> None:
    store = MailStore(maildir)
    store.create("Work")
    inbox, work = watcher.subscribe(maildir), watcher.subscribe(maildir / ".Work")
    since = await writer.do("deliver")  # into INBOX
    assert await woken_after(inbox, since) < WAKE
    assert await not_woken(work, 0.2)  # .Work is a directory of the root, not its new/


async def test_burst_of_changes_is_one_wake_up(
        watcher: MailboxWatcher, maildir: Path, writer: Writer) -> None:
    sub = watcher.subscribe(maildir)
    await writer.do("deliver 200")
    await asyncio.sleep(0.1)  # every event read meanwhile
    await asyncio.wait_for(sub.wait(), 0.01)  # at once: it may have changed
    assert await not_woken(sub)  # and only once for all 200


# ------------------------------------------------------------------ this process

async def test_changed_in_process_wakes_without_inotify(tmp_path: Path, maildir: Path) -> None:
    w = MailboxWatcher(tmp_path / "mail", poll="never", inotify=False)
    await w.start()
    try:
        sub = w.subscribe(maildir)
        t = time.monotonic()
        w.changed(maildir)
        assert await woken_after(sub, t) < MEDIAN
        # from another thread, as the committer's hook calls it
        t = time.monotonic()
        threading.Thread(target=w.changed_many, args=([maildir / "."],)).start()
        assert await woken_after(sub, t) < WAKE
        assert await not_woken(sub, 0.1)
        w.changed(maildir / ".Other")  # another mailbox: not this one
        assert await not_woken(sub, 0.1)
    finally:
        await w.close()


async def test_a_change_nobody_watches_does_not_wake_the_loop(tmp_path: Path,
                                                              maildir: Path) -> None:
    """The committer's hook, for a mailbox no session here watches (no Redis): nothing
    is scheduled on the loop (a lone sender's every message woke it once more)."""
    w = MailboxWatcher(tmp_path / "mail", poll="never", inotify=False)
    await w.start()
    loop = asyncio.get_running_loop()
    scheduled: list[Any] = []
    real = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any, **kw: Any) -> Any:
        scheduled.append(callback)
        return real(callback, *args, **kw)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        def from_thread() -> None:
            t = threading.Thread(target=w.changed_many, args=([maildir],))
            t.start()
            t.join()

        from_thread()
        assert scheduled == []
        sub = w.subscribe(maildir)  # now watched: the same call wakes it
        t0 = time.monotonic()
        from_thread()
        assert len(scheduled) == 1
        assert await woken_after(sub, t0) < WAKE
    finally:
        del loop.call_soon_threadsafe
        await w.close()


async def test_two_subscribers_and_closing_one(
        watcher: MailboxWatcher, maildir: Path, writer: Writer) -> None:
    a, b = watcher.subscribe(maildir), watcher.subscribe(maildir)
    assert watcher.subscribed == 1
    assert watcher._ino is not None
    assert kernel_watches(watcher._ino.fd) == 3  # root, new/, cur/: once for both
    since = await writer.do("deliver")
    assert await woken_after(a, since) < WAKE
    assert await woken_after(b, since) < WAKE
    a.close()
    await asyncio.wait_for(a.wait(), 0.01)  # a closed subscription never blocks
    since = await writer.do("deliver")
    assert await woken_after(b, since) < WAKE
    assert kernel_watches(watcher._ino.fd) == 3
    b.close()
    assert watcher.subscribed == 0
    assert kernel_watches(watcher._ino.fd) == 0  # removed with the last subscription


async def test_waiting_task_is_cancellable_and_close_releases_it(
        watcher: MailboxWatcher, maildir: Path) -> None:
    sub = watcher.subscribe(maildir)
    task = asyncio.create_task(sub.wait())
    await asyncio.sleep(0.01)
    task.cancel()  # IDLE ended by DONE
    with pytest.raises(asyncio.CancelledError):
        await task
    task = asyncio.create_task(sub.wait())
    await asyncio.sleep(0.01)
    sub.close()  # the session ends while a task waits: it returns
    await asyncio.wait_for(task, 1)


async def test_deleted_mailbox_wakes_and_a_new_one_is_watched_again(
        tmp_path: Path, maildir: Path, writer: Writer) -> None:
    w = MailboxWatcher(tmp_path / "mail", poll_interval=0.05)
    await w.start()
    try:
        store = MailStore(maildir)
        store.create("Work")
        folder = maildir / ".Work"
        sub = w.subscribe(folder)
        store.delete("Work")
        await asyncio.wait_for(sub.wait(), 1)
        await asyncio.sleep(0.2)  # polled meanwhile: the path is gone
        while not await not_woken(sub, 0.1):
            pass
        store.create("Work")  # the same name again: watched again from the poll
        await asyncio.wait_for(sub.wait(), 1)
        for _ in range(20):  # watches back on the new directory
            if w._boxes[str(folder)].wds:
                break
            await asyncio.sleep(0.05)
        assert w._boxes[str(folder)].wds
        (folder / "new" / "1.M1P1Q1.host").write_bytes(b"x\r\n")
        await asyncio.wait_for(sub.wait(), 1)
    finally:
        await w.close()


async def test_overflow_wakes_everyone(tmp_path: Path, maildir: Path) -> None:
    """More events than the kernel queues (fs.inotify.max_queued_events): IN_Q_OVERFLOW,
    after which no subscription can know what it missed."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 400_000:
        pytest.skip(f"max_queued_events is {limit}: too many files to overflow it quickly")
    w = MailboxWatcher(tmp_path / "mail", poll="never")
    await w.start()
    other = tmp_path / "mail" / "example.test" / "bob"
    ensure_maildir(other)
    try:
        busy, quiet = w.subscribe(maildir), w.subscribe(other)
        assert w._ino is not None
        w._loop.remove_reader(w._ino.fd)  # type: ignore[union-attr]  # the loop is busy
        a, b = maildir / "cur" / "1.x:2,", maildir / "cur" / "1.x:2,S"
        a.write_bytes(b"x")
        for _ in range(limit // 4 + 10):  # two events a rename (its own cookie: not merged)
            os.rename(a, b)
            os.rename(b, a)
        w._loop.add_reader(w._ino.fd, w._on_inotify)  # type: ignore[union-attr]
        await asyncio.wait_for(quiet.wait(), 2)  # nothing happened to bob's, but who knows
        await asyncio.wait_for(busy.wait(), 2)
    finally:
        await w.close()


# ------------------------------------------------------------------ the poll

async def test_poll_when_inotify_is_not_there(tmp_path: Path, maildir: Path,
                                              writer: Writer) -> None:
    w = MailboxWatcher(tmp_path / "mail", poll_interval=0.05, inotify=False)
    await w.start()
    try:
        sub = w.subscribe(maildir)
        await asyncio.wait_for(sub.wait(), 1)  # the first look: no baseline yet
        assert await not_woken(sub, 0.2)  # nothing changes, nothing wakes
        since = await writer.do("deliver")
        assert await woken_after(sub, since) < WAKE
        (maildir / "cur" / "1.M1P1Q1.host:2,").write_bytes(b"x\r\n")
        await asyncio.wait_for(sub.wait(), 1)
        since = await writer.do("rename 1.M1P1Q1.host:2, 1.M1P1Q1.host:2,S")
        assert await woken_after(sub, since) < WAKE
        sub.close()
        assert w.subscribed == 0
    finally:
        await w.close()


async def test_never_poll_and_inotify_off_only_changed_wakes(tmp_path: Path, maildir: Path,
                                                             writer: Writer) -> None:
    w = MailboxWatcher(tmp_path / "mail", poll="never", poll_interval=0.05, inotify=False)
    await w.start()
    try:
        sub = w.subscribe(maildir)
        await writer.do("deliver")
        assert await not_woken(sub, 0.3)
    finally:
        await w.close()


def test_network_file_systems_are_recognised() -> None:
    assert mailbox_watch.is_network_fs("nfs4")
    assert mailbox_watch.is_network_fs("fuse.sshfs")
    assert not mailbox_watch.is_network_fs("ext4")
    assert mailbox_watch.mount_fstype(Path("/proc/self")) == "proc"


# ------------------------------------------------------------------ two nodes, one Redis

async def test_redis_carries_changes_between_nodes(
        tmp_path: Path, maildir: Path, redis_server: Any) -> None:
    """Two watchers stand for two nodes sharing mail_dir over a file system without
    inotify across machines (inotify and the poll off): only Redis can tell. Node B mounts
    the shared directory elsewhere (a symlink): messages name mailboxes relative to it."""
    shared = tmp_path / "mail"
    elsewhere = tmp_path / "node-b-mount"
    elsewhere.symlink_to(shared)
    cfg = (redis_server.url, None, "test:")
    a = MailboxWatcher(shared, poll="never", inotify=False, redis=cfg)
    b = MailboxWatcher(elsewhere, poll="never", inotify=False, redis=cfg)
    await a.start()
    await b.start()
    try:
        for w in (a, b):
            for _ in range(100):
                if w._redis_up:
                    break
                await asyncio.sleep(0.02)
            assert w._redis_up
        sub_a = a.subscribe(maildir)
        await asyncio.sleep(0.05)
        while not await not_woken(sub_a, 0.05):  # the wake-up of the connection
            pass
        sub_b = b.subscribe(elsewhere / "example.test" / "alice")
        t = time.monotonic()
        b.changed(elsewhere / "example.test" / "alice")
        assert await woken_after(sub_a, t) < WAKE
        await asyncio.wait_for(sub_b.wait(), 0.01)  # B's own session: in process
        assert await not_woken(sub_b, 0.2)  # and not again from its own message
        # many changes in one turn of B's loop: one message, one wake-up
        for i in range(50):
            b.changed(elsewhere / "example.test" / "alice")
            b.changed(elsewhere / "example.test" / f"user{i}")
        await asyncio.wait_for(sub_a.wait(), 1)
        assert await not_woken(sub_a, 0.2)
        # Redis restarted: A reconnects and wakes everyone (it may have missed messages)
        redis_server.stop()
        for _ in range(100):
            if not a._redis_up:
                break
            await asyncio.sleep(0.05)
        assert not a._redis_up
        redis_server.start()
        await asyncio.wait_for(sub_a.wait(), 5)
        for _ in range(100):
            if a._redis_up and b._redis_up:
                break
            await asyncio.sleep(0.05)
        t = time.monotonic()
        b.changed(elsewhere / "example.test" / "alice")
        assert await woken_after(sub_a, t) < WAKE
    finally:
        await a.close()
        await b.close()


# ------------------------------------------------------------------ through a node

async def test_node_wakes_on_mx_delivery_and_pop3_update(
        tmp_path: Path, server_ssl_context: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node whose kernel has no inotify and that never polls: only the committer's hook
    (a message to the MX, and to an alias of two users) and POP3's report (DELE at QUIT)
    can wake the IMAP subscribers."""
    import poplib
    import smtplib

    from mailfort.server.app import Node
    from tests.conftest import make_config, seed_directory

    def no_inotify(self: Any) -> None:
        raise OSError(38, "Function not implemented", "inotify_init1")

    monkeypatch.setattr(mailbox_watch.Inotify, "__init__", no_inotify)
    cfg = make_config(tmp_path / "data", store={"watch_poll": "never"},
                      server={"allow_plaintext_auth_on_loopback": True})
    seed_directory(cfg)
    reports: list[list[Path]] = []
    node = Node(cfg, ssl_context=server_ssl_context)
    hook = node.committer.delivered
    assert hook is not None

    def spy(dirs: list[Path]) -> None:
        reports.append(dirs)
        hook(dirs)

    node.committer.delivered = spy
    async with node:
        assert node.watcher.inotify_error is not None
        alice = cfg.mail_path / "example.test" / "alice"
        bob = cfg.mail_path / "example.test" / "bob"
        ensure_maildir(alice)
        ensure_maildir(bob)
        sub_a, sub_b = node.watcher.subscribe(alice), node.watcher.subscribe(bob)

        def send(rcpt: str) -> float:
            with smtplib.SMTP("127.0.0.1", node.port("mx"), timeout=10) as s:
                s.sendmail("someone@remote.test", [rcpt],
                           f"From: someone@remote.test\r\nTo: {rcpt}\r\n\r\nhi\r\n")
            return time.monotonic()

        done = await asyncio.to_thread(send, "alice@example.test")
        assert await woken_after(sub_a, done) < WAKE  # woken before the 250 came back
        assert await not_woken(sub_b, 0.1)
        assert reports == [[alice]]
        await asyncio.to_thread(send, "team@example.test")
        await asyncio.wait_for(sub_a.wait(), 1)
        await asyncio.wait_for(sub_b.wait(), 1)
        assert sorted(reports[1]) == [alice, bob]

        def pop3_delete() -> None:
            c = poplib.POP3("127.0.0.1", node.port("pop3"), timeout=10)
            c.user("alice@example.test")
            c.pass_("alice-pw")
            c.dele(1)
            c.quit()

        await asyncio.to_thread(pop3_delete)
        await asyncio.wait_for(sub_a.wait(), 1)
        assert await not_woken(sub_b, 0.1)
        sub_a.close()
        sub_b.close()


async def test_silent_redis_is_taken_for_dead_and_rejoined(
        tmp_path: Path, maildir: Path, redis_server: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis that stops answering without closing the connection (a partition; here
    SIGSTOP) is noticed by the PING of a quiet connection, and rejoined once it answers."""
    import signal

    monkeypatch.setattr(mailbox_watch, "REDIS_PING_AFTER", 0.2)
    monkeypatch.setattr(mailbox_watch, "REDIS_DEAD_AFTER", 0.5)
    a = MailboxWatcher(tmp_path / "mail", poll="never", inotify=False,
                       redis=(redis_server.url, None, "test:"))
    await a.start()
    try:
        sub = a.subscribe(maildir)
        for _ in range(100):
            if a._redis_up:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(1.5)  # quiet, but PINGs are answered: still up
        assert a._redis_up
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            for _ in range(60):
                if not a._redis_up:
                    break
                await asyncio.sleep(0.05)
            assert not a._redis_up
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        while not await not_woken(sub, 0.05):
            pass
        await asyncio.wait_for(sub.wait(), 5)  # rejoined: everyone rescans
        assert a._redis_up
    finally:
        await a.close()
