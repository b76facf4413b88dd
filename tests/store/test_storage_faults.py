"""A failing disk: nothing is acknowledged that could not be stored, what is stored is still
served, and the server recovers by itself once the fault is gone.

The data directory lives on a small tmpfs that the test mounts (root only: skipped
otherwise), so "full" and "read-only" are the kernel's own ENOSPC and EROFS, seen by a real
``Node`` through real SMTP and POP3 clients. EIO, which no healthy file system produces on
demand, comes from the committer's fault hook (``Committer.fault``) at each step.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import poplib
import smtplib
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mailfort.server.app import Node
from mailfort.store.maildir import maildir_for
from tests.conftest import make_config, seed_directory

ALICE = "alice@example.test"


def _mount(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["mount", *args], capture_output=True, check=False)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of the test's own."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = _mount(["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)])
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-R", "-l", str(mnt)], capture_output=True, check=False)


@pytest.fixture
async def fs_node(small_fs: Path, server_ssl_context: ssl.SSLContext) -> AsyncIterator[Node]:
    cfg = make_config(small_fs / "data", server={"allow_plaintext_auth_on_loopback": True},
                      store={"flush": "fsync"})
    seed_directory(cfg)
    async with Node(cfg, ssl_context=server_ssl_context) as n:
        yield n


def fill(root: Path) -> Path:
    """Take every free block of the file system; returns the file to delete to free them."""
    filler = root / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
        with contextlib.suppress(OSError):
            while True:  # the last partial chunk's worth
                f.write(b"\0" * 4096)
    assert os.statvfs(root).f_bavail == 0
    return filler


def mx_send(node: Node, body: bytes, rcpts: tuple[str, ...] = (ALICE,)) -> tuple[int, bytes]:
    """(code, text) of the reply to the end of DATA (or to the first refusal)."""
    with smtplib.SMTP("127.0.0.1", node.port("mx"), timeout=10) as s:
        try:
            s.sendmail("sender@remote.test", list(rcpts), body)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error
        return 250, b""


def submit_remote(node: Node, body: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", node.port("submission"), timeout=10) as s:
        s.login(ALICE, "alice-pw")
        try:
            s.sendmail(ALICE, ["someone@remote.test"],
                       body.replace(b"From: sender@remote.test", f"From: {ALICE}".encode()))
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error
        return 250, b""


def message(tag: str, size: int = 0) -> bytes:
    head = f"From: sender@remote.test\r\nSubject: {tag}\r\n\r\n{tag}\r\n".encode()
    return head + (b"x" * 78 + b"\r\n") * (size // 80)


def stored(node: Node, user: str = ALICE) -> list[bytes]:
    """The Subject of every message in the user's Maildir (new/ and cur/)."""
    md = maildir_for(node.cfg.mail_path, user)
    out = []
    for sub in ("new", "cur"):
        if (md / sub).is_dir():
            for f in (md / sub).iterdir():
                out.append(f.read_bytes().split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0])
    return sorted(out)


def leftovers(node: Node) -> list[str]:
    """Files that a refused message must not leave behind: spool, queue, Maildir tmp/."""
    data = node.cfg.data_path
    dirs = [data / "spool", data / "queue" / "tmp", data / "queue" / "msg",
            data / "queue" / "env", maildir_for(data / "mail", ALICE) / "tmp"]
    return [str(p) for d in dirs if d.is_dir() for p in d.iterdir()]


def pop3_read_all(node: Node) -> list[bytes]:
    """Log in over POP3, RETR every message, QUIT; the Subjects, in order."""
    c = poplib.POP3("127.0.0.1", node.port("pop3"), timeout=10)
    try:
        c.user(ALICE)
        c.pass_("alice-pw")
        count, _ = c.stat()
        subjects = []
        for i in range(1, count + 1):
            lines = c.retr(i)[1]
            subjects += [ln[9:] for ln in lines if ln.startswith(b"Subject: ")]
        c.quit()
        return sorted(subjects)
    finally:
        c.close()


async def test_full_disk_refuses_with_452_serves_pop3_and_recovers(
    fs_node: Node, small_fs: Path
) -> None:
    node = fs_node
    assert await asyncio.to_thread(mx_send, node, message("before")) == (250, b"")
    filler = fill(small_fs)

    # Small (held in memory until the commit) and large (written while it streams).
    for tag, size in (("small", 0), ("large", 300_000)):
        code, text = await asyncio.to_thread(mx_send, node, message(tag, size))
        assert (code, text[:5]) == (452, b"4.3.1"), (tag, code, text)
    code, text = await asyncio.to_thread(submit_remote, node, message("queued"))
    assert (code, text[:5]) == (452, b"4.3.1")
    assert stored(node) == [b"before"]
    assert node.queue.list() == []
    assert leftovers(node) == []

    # What is stored is still served, even with no byte free.
    assert await asyncio.to_thread(pop3_read_all, node) == [b"before"]

    filler.unlink()  # space returns: no restart, no operator action
    assert await asyncio.to_thread(mx_send, node, message("after")) == (250, b"")
    assert await asyncio.to_thread(submit_remote, node, message("queued-after")) == (250, b"")
    assert stored(node) == [b"after", b"before"]
    assert len(node.queue.list()) == 1


async def test_read_only_data_directory_refuses_with_451_and_recovers(
    fs_node: Node, small_fs: Path
) -> None:
    node = fs_node
    data = node.cfg.data_path
    assert await asyncio.to_thread(mx_send, node, message("before")) == (250, b"")
    # A read-only bind mount over the data directory: the kernel answers EROFS to every
    # write under it, whatever the user (root ignores permission bits, not this).
    assert _mount(["--bind", str(data), str(data)]).returncode == 0
    try:
        assert _mount(["-o", "remount,bind,ro", str(data)]).returncode == 0
        for tag, size in (("small", 0), ("large", 300_000)):
            code, text = await asyncio.to_thread(mx_send, node, message(tag, size))
            assert (code, text[:5]) == (451, b"4.3.0"), (tag, code, text)
        code, text = await asyncio.to_thread(submit_remote, node, message("queued"))
        assert (code, text[:5]) == (451, b"4.3.0")
        assert await asyncio.to_thread(pop3_read_all, node) == [b"before"]
    finally:
        subprocess.run(["umount", str(data)], capture_output=True, check=True)
    assert stored(node) == [b"before"]
    assert node.queue.list() == [] and leftovers(node) == []
    assert await asyncio.to_thread(mx_send, node, message("after")) == (250, b"")
    assert stored(node) == [b"after", b"before"]


@pytest.mark.parametrize("step", ["write", "sync", "link"])
async def test_eio_at_each_step_refuses_with_451_stores_nothing_and_recovers(
    node: Node, step: str
) -> None:
    """EIO at any step of the commit: no 250, no copy left in any Maildir (the message has
    two local recipients: a failure at the second link takes back the first)."""
    links = 0

    def fault(at: str) -> None:
        nonlocal links
        if at == "link":
            links += 1
        if at == step and (step != "link" or links % 2 == 0):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    node.committer.fault = fault
    both = (ALICE, "bob@example.test")
    for tag, size in (("small", 0), ("large", 300_000)):
        code, text = await asyncio.to_thread(mx_send, node, message(tag, size), both)
        assert (code, text[:5]) == (451, b"4.3.0"), (tag, code, text)
    assert stored(node) == [] and stored(node, "bob@example.test") == []
    assert leftovers(node) == []

    node.committer.fault = None
    assert await asyncio.to_thread(mx_send, node, message("after"), both) == (250, b"")
    assert stored(node) == [b"after"] == stored(node, "bob@example.test")
