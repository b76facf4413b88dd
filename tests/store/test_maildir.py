"""The group-commit Maildir store: durable, batched, nothing partial on failure."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailfort.store import intents, maildir
from mailfort.store.maildir import Committer, StorageError, maildir_for
from tests.store.faults import AtFlush
from tests.store.fsyncs import fsynced

__all__ = ["fsynced"]


@pytest.fixture(params=[("syncfs", False), ("syncfs", True), ("fsync", False)],
                ids=["syncfs", "syncfs-shared", "fsync-each"])
def committer(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Committer]:
    flush, shared = request.param
    c = Committer(tmp_path, use_syncfs=flush == "syncfs", shared_flush=shared)
    yield c
    c.stop()


async def store(c: Committer, body: bytes, users: list[str]) -> None:
    spool = c.new_spool()
    spool.write(body)
    await c.commit(spool, [maildir_for(c.data_dir / "mail", u) for u in users])


async def spool_emptied(c: Committer) -> None:
    """Wait (5 s at most) for the spool to empty: after one flush the 250s go out, and the
    spool files and their link record stay until the flush of the links, which the
    committer makes when no batch came for ``LINKS_FLUSH_DELAY``. Spent records, emptied
    and kept for reuse (``intents.spend``), do not count."""
    for _ in range(500):
        if not holding(c.spool_dir):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"spool not emptied: {sorted(p.name for p in c.spool_dir.iterdir())}")


def holding(spool_dir: Path) -> list[str]:
    """Names of the spool's files with content (one removed while listed is not)."""
    out = []
    with os.scandir(spool_dir) as it:
        for entry in it:
            try:
                if entry.stat(follow_symlinks=False).st_size:
                    out.append(entry.name)
            except FileNotFoundError:
                continue
    return out


async def test_concurrent_messages_share_flushes(committer: Committer) -> None:
    bodies = [b"Subject: %d\r\n\r\n" % i + b"x" * (i * 100) + b"\r\n" for i in range(60)]
    await asyncio.gather(*(store(committer, b, ["a@d.test"]) for b in bodies))
    new = maildir_for(committer.data_dir / "mail", "a@d.test") / "new"
    files = sorted(new.iterdir())
    assert sorted(f.read_bytes() for f in files) == sorted(bodies)
    for f in files:  # Maildir++ sizes in the name match the content
        size = f.stat().st_size
        assert f.name.endswith(f",S={size},W={size}")
    assert committer.messages == 60
    assert committer.batches < 60  # group commit: several messages per flush
    await spool_emptied(committer)


async def test_large_message_goes_through_a_spool_file(committer: Committer) -> None:
    body = b"y" * 998 + b"\r\n"
    spool = committer.new_spool()
    for _ in range(200):
        spool.write(body)
    assert spool.path.exists()  # past the in-memory threshold it streams to disk
    await committer.commit(spool, [maildir_for(committer.data_dir / "mail", "a@d.test")])
    (f,) = (maildir_for(committer.data_dir / "mail", "a@d.test") / "new").iterdir()
    assert f.stat().st_size == len(body) * 200


@pytest.mark.parametrize("tail", [300, 2])  # the new content longer, then shorter
async def test_replaced_spool_is_rewritten_in_its_own_file(committer: Committer,
                                                          tail: int) -> None:
    """Sender authentication rewrites a received message (fields on top) with
    ``Spool.replace``: in the same spool file, no second one; the committed message and
    the CRC-32 its link record is checked by (store/intents.py) are the new content's,
    when it is longer than the old and when it is shorter."""
    line = b"y" * 998 + b"\r\n"
    spool = committer.new_spool()
    for _ in range(100):
        spool.write(line)
    assert not spool.in_memory
    before = set(committer.spool_dir.iterdir())
    new = [b"Authentication-Results: here; x\r\n", memoryview(line * tail)]
    spool.replace(new)
    assert set(committer.spool_dir.iterdir()) == before  # no file made, none removed
    want = b"".join(new)
    assert spool.size == len(want)
    spool.finish()
    assert spool.crc == zlib.crc32(want) and spool.path.read_bytes() == want
    small = committer.new_spool()
    small.write(b"Subject: s\r\n\r\nhi\r\n")
    small.replace([b"X-A: 1\r\n", b"Subject: s\r\n\r\nhi\r\n"])
    assert small.in_memory and small.size == 26
    root = maildir_for(committer.data_dir / "mail", "a@d.test")
    await committer.commit(spool, [root])
    await committer.commit(small, [root])
    got = sorted(f.read_bytes() for f in (root / "new").iterdir())
    assert got == sorted([want, b"X-A: 1\r\nSubject: s\r\n\r\nhi\r\n"])
    await spool_emptied(committer)


def test_replace_on_a_full_disk_is_a_storage_error(tmp_path: Path) -> None:
    """A rewrite that fails (ENOSPC) leaves the spool failed, as a failed write does: the
    end of data answers 452, never stores a message cut short."""
    def full(at: str) -> None:
        if at == "write" and armed:
            raise OSError(errno.ENOSPC, "No space left on device")

    armed = False
    spool = maildir.Spool(tmp_path, fault=full)
    spool.write(b"x" * 70_000)
    armed = True
    spool.replace([b"X-A: 1\r\n", b"x" * 70_000])
    assert spool.failed is not None and spool.failed.errno == errno.ENOSPC
    with pytest.raises(StorageError) as info:
        spool.finish()
    assert info.value.errno == errno.ENOSPC
    spool.discard()
    assert list(tmp_path.iterdir()) == []


async def test_one_file_per_recipient_and_no_partial_delivery(committer: Committer) -> None:
    await store(committer, b"Subject: x\r\n\r\nhi\r\n", ["a@d.test", "b@d.test"])
    for u in ("a@d.test", "b@d.test"):
        assert len(list((maildir_for(committer.data_dir / "mail", u) / "new").iterdir())) == 1
    broken = maildir_for(committer.data_dir / "mail", "c@d.test")
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_text("not a maildir")
    with pytest.raises(StorageError):
        await store(committer, b"Subject: y\r\n\r\nhi\r\n", ["a@d.test", "c@d.test"])
    # a@d.test did not keep a copy of the refused message
    assert len(list((maildir_for(committer.data_dir / "mail", "a@d.test") / "new").iterdir())) == 1
    await spool_emptied(committer)


async def test_flagged_targets_go_to_cur_and_folders_get_no_link_record(
        committer: Committer) -> None:
    """Sieve's targets: INBOX with flags in cur/ (``:2,FS``), a folder in its new/; the
    link record (whose replay takes ``domain/local/new/NAME`` only) is not written for
    them: the batch flushes twice instead."""
    root = maildir_for(committer.data_dir / "mail", "a@d.test")
    spool = committer.new_spool()
    spool.write(b"Subject: f\r\n\r\nhi\r\n")
    written: list[object] = []
    real = intents.write
    intents.write = lambda *a: written.append(a) or real(*a)  # type: ignore[assignment]
    try:
        await committer.commit(spool, [root, root / ".Work"], letters={root: "FS"})
    finally:
        intents.write = real  # type: ignore[assignment]
    (flagged,) = (root / "cur").iterdir()
    assert flagged.name.endswith(":2,FS") and list((root / "new").iterdir()) == []
    assert len(list((root / ".Work" / "new").iterdir())) == 1
    assert written == []
    await spool_emptied(committer)


def test_recover_removes_unacknowledged_spool_files(tmp_path: Path) -> None:
    c = Committer(tmp_path)
    try:
        (c.spool_dir / "leftover").write_bytes(b"half a message")
        assert c.recover() == 1
        assert list(c.spool_dir.iterdir()) == []
    finally:
        c.stop()


@pytest.mark.parametrize("bad", ["nobody", "@d.test", "a@", "../x@d.test", "a@../d", ".a@d"])
def test_maildir_for_refuses_odd_addresses(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        maildir_for(tmp_path, bad)


async def test_refused_message_is_taken_back_from_the_queue_too(committer: Committer) -> None:
    handed: list[Path] = []
    taken_back: list[Path] = []

    def to_queue(path: Path) -> Callable[[], None]:
        handed.append(path)
        return lambda: taken_back.append(path)

    broken = maildir_for(committer.data_dir / "mail", "c@d.test")
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_text("not a maildir")
    spool = committer.new_spool()
    spool.write(b"Subject: x\r\n\r\nfor a local and a remote recipient\r\n")
    with pytest.raises(StorageError):
        await committer.commit(spool, [broken], to_queue)
    assert handed and taken_back == handed  # the 451 leaves no queued copy behind


async def test_a_new_maildir_is_durable_before_its_first_message_is_acknowledged(
        tmp_path: Path, fsynced: list[Path]) -> None:
    """In fsync mode, fsync of new/ alone does not keep new/ itself: the name of every
    directory created for a first message (mail/, the domain, the user, tmp/ new/ cur/)
    lives in its parent, which must be fsynced too before the 250."""
    data = tmp_path / "data"
    c = Committer(data, use_syncfs=False)
    try:
        await store(c, b"Subject: first\r\n\r\nhi\r\n", ["a@d.test"])
    finally:
        c.stop()
    md = maildir_for(data / "mail", "a@d.test")
    assert len(list((md / "new").iterdir())) == 1
    parents = {data, data / "mail", data / "mail" / "d.test", md}
    assert parents <= set(fsynced), parents - set(fsynced)
    assert md / "new" in fsynced  # the message's own name, as before


async def test_a_maildir_made_by_someone_else_is_synced_on_first_use(
        tmp_path: Path, fsynced: list[Path]) -> None:
    """A Maildir whose directories exist already (a POP3 login made them with a plain
    mkdir, or a crashed process did) is fsynced up to the data directory at its first
    delivery in fsync mode, once per process."""
    data = tmp_path / "data"
    md = maildir_for(data / "mail", "b@d.test")
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir(parents=True)
    c = Committer(data, use_syncfs=False)
    try:
        await store(c, b"Subject: 1\r\n\r\nx\r\n", ["b@d.test"])
        assert {md, md.parent, data / "mail", data} <= set(fsynced)
        fsynced.clear()
        await store(c, b"Subject: 2\r\n\r\nx\r\n", ["b@d.test"])
        assert md not in fsynced and data not in fsynced  # once, not per message
        assert md / "new" in fsynced
    finally:
        c.stop()


def test_unique_names_carry_the_pid_of_a_forked_worker() -> None:
    """The pid in a Maildir name is read once per process, and again in a forked child
    (worker processes): two workers never make the same name."""
    parent = maildir.unique_name()
    assert f"P{os.getpid()}Q" in parent
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover  (the child)
        os.write(w, maildir.unique_name().encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        name = f.read().decode()
    os.waitpid(child, 0)
    assert f"P{child}Q" in name and f"P{os.getpid()}Q" not in name


@pytest.fixture
def other_fs_root() -> Iterator[Path]:
    """A Maildir root on another file system than tmp_path (tmpfs), as a shared mail_dir
    is; skipped where there is no such second file system."""
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == Path(tempfile.gettempdir()).stat().st_dev:
        pytest.skip("no second file system (/dev/shm) to put the Maildir root on")
    root = Path(tempfile.mkdtemp(prefix="mailfort-maildir-", dir=shm))
    os.chmod(root, 0o700)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("use_syncfs", [True, False], ids=["syncfs", "fsync-each"])
async def test_mail_root_on_another_file_system_gets_durable_copies(
        tmp_path: Path, other_fs_root: Path, fsynced: list[Path], use_syncfs: bool) -> None:
    """A hard link cannot cross file systems: the message is copied into tmp/, synced and
    renamed into new/, whose fsync the spool file system's syncfs would not cover."""
    c = Committer(tmp_path / "data", use_syncfs=use_syncfs, mail_root=other_fs_root)
    big = b"Subject: big\r\n\r\n" + b"y" * 200_000 + b"\r\n"  # in a spool file
    try:
        for body in (b"Subject: small\r\n\r\nhi\r\n", big):
            spool = c.new_spool()
            spool.write(body)
            await c.commit(spool, [maildir_for(other_fs_root, u)
                                   for u in ("a@d.test", "b@d.test")])
    finally:
        c.stop()
    for user in ("a@d.test", "b@d.test"):
        md = maildir_for(other_fs_root, user)
        got = sorted(f.read_bytes() for f in (md / "new").iterdir())
        assert got == sorted([b"Subject: small\r\n\r\nhi\r\n", big])
        assert list((md / "tmp").iterdir()) == []
        assert md / "new" in fsynced
    assert other_fs_root.parent not in fsynced  # the walk up stops at the mail root
    assert list((tmp_path / "data" / "spool").iterdir()) == []


async def test_the_250_waits_for_one_flush_and_the_links_for_the_next(
        committer: Committer) -> None:
    """syncfs mode: once the data and the link record are flushed, the message is linked
    and acknowledged while the flush of the links is still running (held here inside it);
    the spool empties when that flush returns. fsync mode keeps no record: its
    acknowledgement waits for the second flush."""
    release = threading.Event()
    fault = AtFlush(2, release=release)
    committer.fault = fault
    md = maildir_for(committer.data_dir / "mail", "a@d.test")
    commit = asyncio.ensure_future(store(committer, b"Subject: one\r\n\r\nflush\r\n",
                                         ["a@d.test"]))
    try:
        if committer.flush_mode == "fsync":
            done, _ = await asyncio.wait([commit], timeout=0.5)
            assert not done  # held in the second flush: no 250 yet
            release.set()
            await asyncio.wait_for(commit, 10)
            assert list(committer.spool_dir.iterdir()) == []
            return
        await asyncio.wait_for(commit, 10)
        assert fault.calls <= 2 and not release.is_set()  # the second flush has not returned
        assert len(list((md / "new").iterdir())) == 1
        names = sorted(p.name for p in committer.spool_dir.iterdir())
        # the spool file and the record (unique names do not sort by time: M{usec} is not
        # zero-padded, so the order of the two is not asserted)
        assert len(names) == 2 and sum(n.endswith(intents.SUFFIX) for n in names) == 1
        release.set()
        await spool_emptied(committer)
        assert fault.calls == 2
    finally:
        release.set()
        committer.fault = None


async def test_a_failed_flush_of_the_links_keeps_their_record_for_the_next(
        tmp_path: Path) -> None:
    """The 250 is given; the links' flush fails: the record stays (recovery would replay
    it) until a later flush succeeds, here the next message's."""
    c = Committer(tmp_path)
    fault = AtFlush(2, error=OSError(errno.EIO, "injected"))
    c.fault = fault
    try:
        await store(c, b"Subject: 1\r\n\r\nfirst\r\n", ["a@d.test"])
        for _ in range(100):
            if fault.calls >= 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        kept = [p.name for p in c.spool_dir.iterdir()]
        assert any(n.endswith(intents.SUFFIX) for n in kept) and len(kept) == 2
        await store(c, b"Subject: 2\r\n\r\nsecond\r\n", ["a@d.test"])
        await spool_emptied(c)
        assert len(list((maildir_for(tmp_path / "mail", "a@d.test") / "new").iterdir())) == 2
    finally:
        c.stop()



async def test_a_flowing_batch_writes_its_record_over_the_last_spent_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One sender, message after message: each batch's flush makes the links of the one
    before durable, whose record is then spent. The next batch writes its own record over
    that one in place (no truncation to nothing between: ext4 frees the block and its
    close starts a flush of its own); once no batch comes, every spent record is emptied
    (a spent record left full would link its messages again at a replay after a power
    loss, should they have been deleted meanwhile)."""
    monkeypatch.setattr(maildir, "LINKS_FLUSH_DELAY", 0.3)  # the batches below come first
    c = Committer(tmp_path)
    written: list[tuple[str, bool]] = []
    spools: list[str] = []  # the message each record names
    emptied: list[str] = []
    real_write, real_spend = intents.write, intents.spend

    def write(path: Path, entries: list[intents.Entry], *, reuse: bool = False) -> None:
        written.append((path.name, reuse))
        spools.append(entries[0].spool)
        real_write(path, entries, reuse=reuse)

    def spend(path: Path) -> None:
        emptied.append(path.name)
        real_spend(path)

    monkeypatch.setattr(intents, "write", write)
    monkeypatch.setattr(intents, "spend", spend)
    try:
        for i in range(4):
            await store(c, f"Subject: {i}\r\n\r\nhi\r\n".encode(), ["a@d.test"])
        (r1, new1), (r2, new2), (r3, reused3), (r4, reused4) = written
        assert (new1, new2) == (False, False) and r1 != r2
        assert (r3, reused3) == (r1, True) and (r4, reused4) == (r2, True)
        assert emptied == []  # nothing truncated while the batches flow
        records = {p.name: p for p in c.spool_dir.glob("*" + intents.SUFFIX)}
        assert set(records) == {r1, r2}
        for name, message in ((r1, spools[2]), (r2, spools[3])):  # whole, and the new one
            decoded = intents.decode(records[name].read_bytes())
            assert decoded is not None and [e.spool for e in decoded[1]] == [message]
        await spool_emptied(c)  # idle: the links flushed, the spent records emptied
        assert sorted(emptied) == sorted([r1, r2])
        assert all(p.stat().st_size == 0 for p in records.values())
    finally:
        c.stop()
    assert list(c.spool_dir.glob("*" + intents.SUFFIX)) == []
