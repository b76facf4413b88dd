"""Durable Maildir delivery with group commit.

A message is spooled as it streams in (small ones stay in memory, large ones go to a file
in ``<data_dir>/spool``), then handed to the ``Committer``. The committer thread takes every
message waiting at that moment as one batch and makes the whole batch durable together:

1. write out what is still buffered, and a record of the links to come (store/intents.py),
   then one ``syncfs``: the message data, its inode and the record are on stable storage;
2. hard-link each message into ``new/`` of every recipient's Maildir (the Maildir rule:
   the name appears in ``new/`` only once the file is complete), and give each waiting
   session its 250;
3. the next ``syncfs`` (the next batch's step 1, or one made when no batch came within
   ``LINKS_FLUSH_DELAY``) makes the names durable; then the spool files and the record
   go. Should a crash come first, recovery links again from the record what it undid.

Where the record cannot stand for the links, the names are flushed before the 250: in
``fsync`` mode (an ``fdatasync`` per file where syncfs is not available, then an ``fsync``
of each ``new/`` directory touched), for a batch that also hands a message to the outbound
queue, and for a Maildir on another file system than the spool.

A Maildir root on another file system than the spool (``[server] mail_dir`` on storage
that several nodes share) cannot take a hard link: there the message is copied into the
Maildir's ``tmp/``, fdatasynced and renamed into ``new/`` (the classic Maildir delivery,
no lock needed across nodes), and that ``new/`` is fsynced on its own, since a syncfs of
the spool's file system does not reach it.

So many messages share one flush on the way to their 250 instead of paying three each,
and no 250 is ever sent before the flush that covers its message and its record. A crash
before step 1 completes leaves at most spool files and a record that does not check out,
which recovery removes; the client was never told 250 and will retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import socket
import stat
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mailfort import metrics, procid
from mailfort.store import intents
from mailfort.store.durable import fsync_dir, make_dirs
from mailfort.store.shared_flush import SharedFlush
from mailfort.store.syncfs import SYNCFS as _SYNCFS
from mailfort.store.syncfs import syncfs

# How long acknowledged links may wait for the next batch, whose first flush covers them
# too, before the committer flushes them on its own: a little longer than a message takes
# in a single session (about 2 ms), so that one sender alone costs one flush per message.
# Their records keep them safe meanwhile (store/intents.py).
LINKS_FLUSH_DELAY = 0.005
# Spent link records kept for reuse (intents.spend); a few batches' worth: each batch
# takes one, and they come back one flush later.
_SPARE_INTENTS = 16
_SPOOL_MEMORY = 64 * 1024  # bytes a message may hold in memory before it goes to a file
_counter = itertools.count()
log = logging.getLogger("mailfort.store")
_HOST = socket.gethostname().replace("/", "_").replace(":", "_") or "localhost"


class StorageError(Exception):
    """The message could not be made durable; nothing was acknowledged.

    ``errno`` is the cause's (ENOSPC, EROFS, EIO...), so that the reply can say whether
    the disk is full (452 4.3.1) or something else failed (451 4.3.0).
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


# Fault injection (tests): called with the step about to run ("write", "sync" or "link");
# raising OSError there is what a failing disk does at that step.
FaultHook = Callable[[str], None]


def maildir_for(mail_root: Path, user: str) -> Path:
    """The Maildir of a canonical user address: ``<mail_root>/<domain>/<local>``, where
    ``mail_root`` is ``Config.mail_path`` (``server.mail_dir``, else ``<data_dir>/mail``)."""
    local, _, domain = user.rpartition("@")
    if not local or not domain or "/" in user or local.startswith(".") or domain.startswith("."):
        raise ValueError(f"not a canonical user address: {user!r}")
    return mail_root / domain.lower() / local.lower()


def ensure_maildir(path: Path) -> None:
    """Create what is missing of the Maildir, durably (each new name's parent fsynced), so
    that the flush of new/ before a 250 is not undone by losing new/ itself in a crash."""
    for sub in ("tmp", "new", "cur"):
        make_dirs(path / sub)


def unique_name() -> str:
    """A Maildir unique name: time, microseconds, pid and a counter, then the host."""
    now = time.time()
    return f"{int(now)}.M{int(now * 1e6) % 1_000_000}P{procid.pid()}Q{next(_counter)}.{_HOST}"


def keyed_name(key: str) -> str:
    """A unique name chosen by the caller (``<seconds>.<id>``) for a message that must be
    stored once per key, with the host added as for every name."""
    if "/" in key or ":" in key or "," in key or not key[:1].isdigit():
        raise ValueError(f"not a Maildir key: {key!r}")
    return f"{key}.{_HOST}"


def in_maildir(maildir: Path, name: str) -> bool:
    """Whether a message with this unique name is in new/ or cur/ (with any size or flag
    suffix: ``name,S=…`` in new/, ``name,S=…:2,S`` once read)."""
    for sub in ("new", "cur"):
        try:
            with os.scandir(maildir / sub) as it:
                for entry in it:
                    n = entry.name
                    if n == name or (n.startswith(name) and n[len(name)] in ",:"):
                        return True
        except FileNotFoundError:
            continue
    return False


class Spool:
    """One message being received: in memory while small, in a spool file once large."""

    __slots__ = ("_buf", "_dir", "_fd", "crc", "failed", "fault", "name", "size")

    def __init__(self, spool_dir: Path, fault: FaultHook | None = None,
                 name: str | None = None) -> None:
        self.name = name or unique_name()
        self._dir = spool_dir
        self._buf = bytearray()
        self._fd: int | None = None
        self.size = 0
        self.crc = 0  # CRC-32 of what is in the file (store/intents.py checks it)
        self.failed: OSError | None = None
        self.fault = fault

    @property
    def in_memory(self) -> bool:
        """Whether everything written is still in memory (no spool file yet)."""
        return self._fd is None

    @property
    def path(self) -> Path:
        """The spool file's path (made when asked: most spools are only ever touched by
        the committer thread, and a Path costs the event loop a few microseconds)."""
        return self._dir / self.name

    def write(self, data: bytes) -> None:
        if self.failed is not None:
            return
        self.size += len(data)
        self._buf += data
        if len(self._buf) >= _SPOOL_MEMORY:
            try:
                self._flush()
            except OSError as exc:  # disk full etc.: answered with 451 at the end of data
                self.failed = exc
                self._buf.clear()

    def _flush(self) -> None:
        if self.fault is not None:
            self.fault("write")
        if self._fd is None:
            # read and write: the checks after the end of data read it back (chunks)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        # Each view is released even when a write fails (disk full): a view left alive
        # by the exception would make the later ``clear`` of the buffer raise BufferError.
        done = 0
        with memoryview(self._buf) as view:
            self.crc = zlib.crc32(view, self.crc)
            while done < len(view):
                with view[done:] as rest:
                    done += os.write(self._fd, rest)
        self._buf.clear()

    def finish(self) -> None:
        """Write out the rest (from the committer thread); the file then holds it all."""
        if self.failed is not None:
            raise StorageError(str(self.failed), self.failed.errno)
        self._flush()

    def fileno(self) -> int:
        assert self._fd is not None
        return self._fd

    def chunks(self, start: int = 0, size: int = 1 << 20) -> Iterator[bytes]:
        """What was written so far from offset ``start`` (while nothing is written), for
        checks that read the message after its end of data (DKIM) or copy it."""
        on_disk = self.size - len(self._buf)
        pos = start
        while pos < on_disk:  # from the spool's own descriptor: no second open
            assert self._fd is not None
            data = os.pread(self._fd, min(size, on_disk - pos), pos)
            if not data:
                break
            pos += len(data)
            yield data
        yield bytes(self._buf[max(0, start - on_disk):])

    def replace(self, pieces: Iterable[bytes | memoryview]) -> None:
        """Make ``pieces`` the spool's whole content, in the same file when it has one.

        For a message rewritten after its end of data (fields added on top, a forged one
        dropped), before the committer has it: a copy into a new spool file cost a second
        file's creation and blocks, and the unlink of the first, which freed its blocks
        (most of the cost of sender authentication on a 100 KB message: bench/RESULTS.md).
        Nothing refers to an uncommitted spool file, so it may be overwritten in place."""
        if self.failed is not None:
            return
        if self._fd is None:
            self._buf = bytearray().join(pieces)
            self.size = len(self._buf)
            if self.size >= _SPOOL_MEMORY:
                self._spill()
            return
        on_disk = self.size - len(self._buf)
        self._buf.clear()
        self.size = self.crc = 0
        try:
            if self.fault is not None:
                self.fault("write")
            os.lseek(self._fd, 0, os.SEEK_SET)
            for piece in pieces:
                with memoryview(piece) as view:
                    self.crc = zlib.crc32(view, self.crc)
                    done = 0
                    while done < len(view):
                        with view[done:] as rest:
                            done += os.write(self._fd, rest)
                self.size += len(piece)
            if self.size < on_disk:  # the new content is the shorter (forgeries dropped)
                os.ftruncate(self._fd, self.size)
        except OSError as exc:  # answered with 451 at the end of data, as a failed write
            self.failed = exc

    def _spill(self) -> None:
        try:
            self._flush()
        except OSError as exc:
            self.failed = exc
            self._buf.clear()

    def discard(self) -> None:
        self._buf.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.path.unlink(missing_ok=True)


@dataclass
class _Job:
    spool: Spool
    maildirs: list[Path]
    future: asyncio.Future[None]
    loop: asyncio.AbstractEventLoop
    # e.g. hand the file to the outbound queue; returns how to take that back
    extra: Callable[[Path], Callable[[], None]] | None = None
    # Maildir -> its ":2," flag letters (Sieve imap4flags): such a copy goes to cur/
    letters: dict[Path, str] = field(default_factory=dict)
    links: list[Path] = field(default_factory=list)
    undo_extra: Callable[[], None] | None = None
    error: BaseException | None = None


class Committer:
    """Makes spooled messages durable in batches on one background thread."""

    def __init__(self, data_dir: Path, *, use_syncfs: bool = True,
                 mail_root: Path | None = None, shared_flush: bool = False) -> None:
        """``mail_root``: the Maildir root (``Config.mail_path``) when it is not under
        ``data_dir``; the fsync of parent directories stops there. ``shared_flush``: other
        processes' committers write to this file system too (worker processes): share
        the syncfs with them (store/shared_flush.py; about 20 us a flush, for nothing in
        a process of its own)."""
        self.data_dir = data_dir
        self.mail_root = mail_root
        # What the link records name their targets relative to (store/intents.py).
        self.record_root = mail_root if mail_root is not None else data_dir / "mail"
        self.spool_dir = data_dir / "spool"
        make_dirs(self.spool_dir)
        self._use_syncfs = use_syncfs and _SYNCFS is not None
        # The node's worker processes share their flushes (store/shared_flush.py).
        self._shared_flush = (SharedFlush(data_dir, self._syncfs)
                              if self._use_syncfs and shared_flush else None)
        self._jobs: list[_Job] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._known_maildirs: set[Path] = set()
        # Acknowledged after one flush, their links not yet flushed (store/intents.py)
        self._linked: list[_Job] = []
        self._intents: list[Path] = []
        # Their links flushed too, by the batch being committed: removed after its 250s
        self._covered: list[_Job] = []
        self._covered_intents: list[Path] = []
        # Spent records, emptied, for later batches' records (intents.spend: no inode freed)
        self._spare_intents: list[Path] = []
        # The one spent record not emptied, which the next batch writes over in place; a
        # flush with no batch behind it empties it too (``_flush_links``)
        self._hot_intent: Path | None = None
        self._synced_dirs: set[Path] = set()  # fsync mode: directories known durable
        self.batches = 0
        self.messages = 0
        self.fault: FaultHook | None = None  # tests only: see FaultHook
        # Told the Maildirs each batch delivered into, from the committer thread, as the
        # sessions get their 250s: the node wakes IMAP sessions with it (the store does not
        # know the server; server/mailbox_watch.py). Must not block.
        self.delivered: Callable[[list[Path]], None] | None = None
        self._thread = threading.Thread(target=self._run, name="mailfort-committer", daemon=True)
        self._thread.start()

    @property
    def flush_mode(self) -> str:
        """"syncfs" or "fsync" (per file): what each batch actually uses."""
        return "syncfs" if self._use_syncfs else "fsync"

    def recover(self) -> int:
        """``recover_spool`` of this committer's spool directory."""
        return recover_spool(self.spool_dir, mail_root=self.record_root)

    def new_spool(self, name: str | None = None) -> Spool:
        """A spool for one message; ``name`` (see ``keyed_name``) instead of a fresh one.

        A spool file of that name is what an attempt for the same key left unfinished (a
        worker killed meanwhile; the key, not a pid, names it, so the supervisor's clean-up
        does not find it): never acknowledged, it is removed. Should that attempt still be
        running (a primary handing over), its link fails or lands first under the same
        Maildir name, and this one's then fails: one copy either way."""
        if name is not None:
            (self.spool_dir / name).unlink(missing_ok=True)
        return Spool(self.spool_dir, self.fault, name)

    async def commit(
        self,
        spool: Spool,
        maildirs: list[Path],
        extra: Callable[[Path], Callable[[], None]] | None = None,
        letters: dict[Path, str] | None = None,
    ) -> None:
        """Return once the message is durable in every Maildir; StorageError otherwise.
        ``letters``: the Maildir flag letters (sorted, e.g. "FS") of some of them: the
        message is stored there in ``cur/`` as ``NAME:2,FS``, already flagged (as Dovecot
        stores a message delivered with flags), elsewhere in ``new/``."""
        loop = asyncio.get_running_loop()
        job = _Job(spool, list(dict.fromkeys(maildirs)), loop.create_future(), loop, extra,
                   {md: fl for md, fl in (letters or {}).items() if fl})
        with self._cv:
            if self._stopping:
                raise StorageError("committer is stopped")
            self._jobs.append(job)
            self._cv.notify()
        await job.future

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            if self._hot_intent is not None:
                self._spare_intents.append(self._hot_intent)
                self._hot_intent = None
            for path in self._spare_intents:
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            self._spare_intents.clear()
        if self._shared_flush is not None and not self._thread.is_alive():
            self._shared_flush.close()
            self._shared_flush = None

    # ---------------------------------------------------------------- the thread

    def _run(self) -> None:
        flush_at = 0.0  # when to flush the links of ``_linked`` if no batch comes first
        while True:
            with self._cv:
                while not self._jobs and not self._stopping:
                    waiting = self._linked or self._hot_intent is not None
                    if waiting and time.monotonic() >= flush_at:
                        break  # idle: flush the links now (empty the spent record)
                    self._cv.wait(max(0.0, flush_at - time.monotonic()) if waiting
                                  else None)
                batch, self._jobs = self._jobs, []
                stopping = self._stopping
            if not batch:
                if self._linked and not self._flush_links():
                    if stopping:  # recovery replays their records at the next start
                        return
                    flush_at = time.monotonic() + 1.0  # a failing disk: not in a loop
                elif not self._linked and self._hot_intent is not None:
                    self._discard_covered(keep_hot=False)
                elif stopping and not self._linked:
                    return
                continue
            try:
                self._commit_batch(batch)
            except Exception as exc:  # must fail this batch, not stop every later one
                log.exception("commit of a batch failed")
                for job in batch:
                    job.error = job.error or exc
                    _take_back(job)
            # One wake-up per event loop for the whole batch, not one per message. The
            # sessions first: what follows (the IMAP wake-ups, the removal of what this
            # batch's flush made redundant) is not what their 250 waits for, and a lone
            # sender's next message waits for its 250.
            loops: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
            for job in batch:
                loops.setdefault(job.loop, []).append(job)
            for loop, jobs in loops.items():
                loop.call_soon_threadsafe(_settle_all, jobs)
            self._report(batch)
            self._discard_covered()
            flush_at = time.monotonic() + LINKS_FLUSH_DELAY

    def _report(self, batch: list[_Job]) -> None:
        """``delivered`` with the Maildirs of the batch's messages that made it."""
        hook = self.delivered
        if hook is None:
            return
        dirs = list(dict.fromkeys(md for job in batch if job.error is None
                                  for md in job.maildirs))
        if dirs:
            try:
                hook(dirs)
            except Exception:  # a watcher's trouble must not fail deliveries
                log.exception("the delivery hook failed")

    def _commit_batch(self, batch: list[_Job]) -> None:
        self.batches += 1
        self.messages += len(batch)
        live = []
        for job in batch:
            try:
                job.spool.finish()
                live.append(job)
            except (OSError, StorageError) as exc:
                job.error = exc
        dirs: set[Path] = set()
        foreign: set[Path] = set()  # new/ directories on another file system (copies)

        def each_file() -> None:
            for job in live:
                os.fdatasync(job.spool.fileno())

        def each_dir() -> None:
            for d in dirs:
                fsync_dir(d)

        intent = self._write_intent(live)
        # 1. the data of every message (its intent, and the links of the batch before,
        # whose spool files and records then go once this batch's sessions are told)
        if self._flush(live, each_file) and self._linked:
            self._covered.extend(self._linked)
            self._covered_intents.extend(self._intents)
            self._linked, self._intents = [], []
        for job in live:
            if job.error is None:
                self._link(job, dirs, foreign)
        done = [j for j in live if j.error is None]
        if intent is not None and done and not foreign:
            # 2. deferred: the intent stands for the links until a flush covers them
            self._linked.extend(done)
            self._intents.append(intent)
            for job in batch:
                if job.error is not None:
                    _take_back(job)
            return
        self._flush(done, each_dir)  # 2. the names in new/
        self._sync_foreign([j for j in done if j.error is None], foreign)
        if intent is not None:
            intent.unlink(missing_ok=True)
        for job in batch:
            if job.error is not None:
                _take_back(job)
            job.spool.discard()

    def _write_intent(self, live: list[_Job]) -> Path | None:
        """The batch's link record (store/intents.py), when its 250s may follow the first
        flush: syncfs mode (the flush covers the record too), nothing for the outbound
        queue (whose files have no record), something to store. None: two flushes."""
        if not self._use_syncfs or not live or any(j.extra is not None or j.letters
                                                   for j in live):
            return None
        try:  # each target by user, relative to the Maildir root (never a path)
            entries = [intents.Entry(j.spool.name, j.spool.size, j.spool.crc,
                                     tuple(_target(md, j.spool).relative_to(
                                         self.record_root).as_posix() for md in j.maildirs))
                       for j in live]
        except ValueError:  # a Maildir outside the root (tests): the two flushes
            return None
        if any(len(t.split("/")) != 4 for e in entries for t in e.targets):
            return None  # a folder (.Junk, Sieve's fileinto): replay takes INBOX names only
        if self._hot_intent is not None or self._spare_intents:
            path = self._hot_intent or self._spare_intents.pop()
            self._hot_intent = None
            try:
                intents.write(path, entries, reuse=True)
                return path
            except OSError:  # gone (an administrator's clean-up?): a new one
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
        path = self.spool_dir / (unique_name() + intents.SUFFIX)
        try:
            intents.write(path, entries)
        except OSError as exc:  # the batch takes the two flushes instead
            log.warning("could not write a link record, flushing twice: %s", exc)
            path.unlink(missing_ok=True)
            return None
        return path

    def _flush_links(self) -> bool:
        """Flush the links of the batches whose 250s went out after one flush; then their
        spool files and intents may go. False (all kept) if the flush failed."""
        try:
            self._sync(self._linked[0].spool.fileno())
        except OSError as exc:
            log.error("flush of acknowledged messages' Maildir links failed (their link "
                      "records stay for the next flush, or for recovery): %s", exc)
            return False
        self._covered.extend(self._linked)
        self._covered_intents.extend(self._intents)
        self._linked, self._intents = [], []
        self._discard_covered(keep_hot=False)
        return True

    def _discard_covered(self, keep_hot: bool = True) -> None:
        """The links of ``_covered`` are durable: the records first, then the spool files
        (a spool file left without its record is removed at recovery, as it should be).
        ``keep_hot``: a batch is flowing, and the last of these records is left as it is
        for the next batch to write over (``intents.write``); the others are emptied.
        Without it (no batch came), every spent record is emptied, that one included."""
        covered = self._covered_intents
        if not keep_hot and self._hot_intent is not None:
            covered.insert(0, self._hot_intent)
            self._hot_intent = None
        elif keep_hot and covered and self._hot_intent is None:
            self._hot_intent = covered.pop()
        for path in covered:
            try:
                if len(self._spare_intents) >= _SPARE_INTENTS:
                    path.unlink(missing_ok=True)
                else:
                    intents.spend(path)
                    self._spare_intents.append(path)
            except OSError:
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
        for job in self._covered:
            with contextlib.suppress(OSError):
                job.spool.discard()
        self._covered_intents.clear()
        self._covered.clear()

    def _flush(self, jobs: list[_Job], one_by_one: Callable[[], None]) -> bool:
        """One syncfs for the whole batch, or ``one_by_one`` where there is none; a failure
        fails every message of the batch (none of them gets its 250). True if it flushed."""
        if not jobs:
            return False
        try:
            if self._use_syncfs:
                self._sync(jobs[0].spool.fileno())
            else:
                if self.fault is not None:
                    self.fault("sync")
                with metrics.FLUSH_SECONDS.time():
                    one_by_one()
        except OSError as exc:
            for job in jobs:
                job.error = exc
            return False
        return True

    def _sync(self, fd: int) -> None:
        """syncfs of the file system of ``fd``, shared with the node's other committers."""
        if self.fault is not None:
            self.fault("sync")
        with metrics.FLUSH_SECONDS.time():
            if self._shared_flush is not None:
                self._shared_flush.flush(fd)
            else:
                self._syncfs(fd)

    def _sync_foreign(self, jobs: list[_Job], foreign: set[Path]) -> None:
        """syncfs mode: fsync each ``new/`` that the spool file system's flush did not
        cover (fsync mode did them all in step 2); a failure fails the batch's messages,
        as a failed flush does."""
        if not foreign or not jobs or not self._use_syncfs:
            return
        try:
            for d in foreign:
                fsync_dir(d)
        except OSError as exc:
            for job in jobs:
                job.error = exc

    def _link(self, job: _Job, dirs: set[Path], foreign: set[Path]) -> None:
        try:
            if job.extra is not None:
                job.undo_extra = job.extra(job.spool.path)
            for md in job.maildirs:
                if md not in self._known_maildirs:
                    ensure_maildir(md)
                    if not self._use_syncfs:
                        self._sync_chain(md)
                    self._known_maildirs.add(md)
                target = _target(md, job.spool, job.letters.get(md, ""))
                if self.fault is not None:
                    self.fault("link")
                try:
                    os.link(job.spool.path, target)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    job.links.append(target)  # taken back too if the copy fails midway
                    _copy_in(job.spool, md / "tmp" / target.name, target)
                    foreign.add(target.parent)
                else:
                    job.links.append(target)
                dirs.add(target.parent)
        except OSError as exc:
            job.error = exc

    def _sync_chain(self, maildir: Path) -> None:
        """First use of a Maildir in this process, fsync mode: fsync it and each directory
        above it up to the data directory, once. ``ensure_maildir`` syncs what it creates;
        this also covers directories that someone else created without syncing (a POP3
        login, an admin tool, a process that crashed), whose names the flush of new/ alone
        would not keep. (syncfs mode flushes the whole file system, names included.)"""
        d = maildir
        while True:
            if d not in self._synced_dirs:
                fsync_dir(d)
                self._synced_dirs.add(d)
            if d in (self.data_dir, self.mail_root) or d.parent == d:
                return
            d = d.parent

    _syncfs = staticmethod(syncfs)


def recover_spool(spool_dir: Path, pid: int | None = None, *, mail_root: Path) -> int:
    """After a crash, before anything writes to ``spool_dir`` (``pid``: only what the dead
    worker process ``pid`` left, named ``...P<pid>Q...`` by ``unique_name``): link again
    what the link records promised and a power loss may have undone (store/intents.py,
    below ``mail_root`` only), then remove the spool files, none of which is still needed
    (directories, such as ``kept/``, stay); returns how many. Run as the service user,
    never as root (server/supervisor.py): the spool is that user's to change."""
    pattern = "*" if pid is None else f"*P{pid}Q*"
    intents.replay(spool_dir, mail_root, pattern)
    n = 0
    for p in spool_dir.glob(pattern):
        try:
            if stat.S_ISDIR(os.lstat(p).st_mode):
                continue
            p.unlink()
        except FileNotFoundError:
            continue
        n += 1
    return n


def _target(maildir: Path, spool: Spool, letters: str = "") -> Path:
    """The message's name in new/: ",S=" file size and ",W=" wire (CRLF) size, as Maildir++
    readers expect, so a POP3 LIST needs no read of the file. Stored messages are CRLF
    already, so the two are equal. With flag ``letters``: in cur/, ``:2,<letters>``."""
    name = f"{spool.name},S={spool.size},W={spool.size}"
    if letters:
        return maildir / "cur" / f"{name}:2,{letters}"
    return maildir / "new" / name


def _copy_in(spool: Spool, tmp: Path, target: Path) -> None:
    """Deliver a copy: write ``tmp`` (in the Maildir's tmp/), fdatasync it, rename it to
    ``target`` in new/. A crash leaves at most a file in tmp/, which readers ignore."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk in spool.chunks():
            while chunk:
                chunk = chunk[os.write(fd, chunk):]
        os.fdatasync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.rename(tmp, target)


def _take_back(job: _Job) -> None:
    """Refused with 4xx: remove every copy, so the client's retry is the only one (no
    duplicate in a Maildir or in the outbound queue)."""
    for link in job.links:
        with contextlib.suppress(OSError):
            link.unlink(missing_ok=True)
    job.links.clear()
    if job.undo_extra is not None:
        with contextlib.suppress(Exception):
            job.undo_extra()
        job.undo_extra = None
    with contextlib.suppress(Exception):
        job.spool.discard()


def _settle_all(jobs: list[_Job]) -> None:
    for job in jobs:
        _settle(job)


def _settle(job: _Job) -> None:
    if job.future.done():
        return
    if job.error is not None:
        err = job.error
        code = err.errno if isinstance(err, OSError | StorageError) else None
        job.future.set_exception(StorageError(str(err), code))
    else:
        job.future.set_result(None)
