"""One ``syncfs`` for every committer of a node: group commit across worker processes.

Each worker process has its own committer thread (store/maildir.py). A ``syncfs`` flushes the
whole file system, so when two workers each flush their own batch, each pays for the other's
writes and each batch is half as large: with two workers a node made twice the flushes of one
worker for the same mail (issue 12 measured a fifth of all samples in ``syncfs``). This makes
the committers share their flushes instead: a committer whose writes are done waits for the
flush in progress, and skips its own when a flush that *started after its writes* has
completed meanwhile, since that flush covered them.

The rule needs to know when each flush started relative to a committer's writes. Two
counters in a small file say it: ``started`` (flushes begun) and ``completed`` (the number of
the last one that returned). A committer, once its writes are done, takes the ticket
``started + 1``: any flush numbered that or higher begins after this moment. Then it takes the
flush lock (one flush at a time); holding it, if ``completed`` has reached its ticket, its data
is on disk; otherwise it starts flush number ``started + 1`` itself.

Both files are locked with ``flock``, which belongs to the open file (two committers of one
process exclude each other too) and which the kernel releases when a process dies, so a worker
killed in the middle of a flush never stalls the others; the flush it did not finish simply
does not count as completed.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_COUNTERS = struct.Struct("<QQ")  # started, completed
COUNT_FILE = "flush.count"
LOCK_FILE = "flush.lock"


class SharedFlush:
    """Flushes the file system for this process's committer, shared with the node's others."""

    def __init__(self, data_dir: Path, syncfs: Callable[[int], None]) -> None:
        """``syncfs(fd)``: flush the file system of ``fd``; raises OSError on failure."""
        self._syncfs = syncfs
        self._count = os.open(data_dir / COUNT_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                              0o600)
        self._lock = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                             0o600)
        self.flushes = 0  # flushes this committer made itself
        self.shared = 0  # flushes it skipped because another one covered its writes

    def flush(self, fd: int) -> None:
        """Return once everything this process wrote before the call is on stable storage."""
        with self._counters() as (started, _):
            ticket = started + 1
        with _flocked(self._lock):
            with self._counters() as (started, completed):
                if completed >= ticket:
                    self.shared += 1
                    return
                mine = started + 1
                self._store(mine, completed)
            self._syncfs(fd)  # an error leaves ``completed`` behind: the next one flushes
            with self._counters() as (started, _):
                self._store(started, mine)
            self.flushes += 1

    def close(self) -> None:
        os.close(self._count)
        os.close(self._lock)

    @contextmanager
    def _counters(self) -> Iterator[tuple[int, int]]:
        with _flocked(self._count):
            raw = os.pread(self._count, _COUNTERS.size, 0)
            yield _COUNTERS.unpack(raw) if len(raw) == _COUNTERS.size else (0, 0)

    def _store(self, started: int, completed: int) -> None:
        """Only inside ``_counters``. No fsync: the counters matter only while processes run
        (after a crash every count restarts, and a committer with nothing acknowledged yet
        loses nothing by flushing once more)."""
        os.pwrite(self._count, _COUNTERS.pack(started, completed), 0)


@contextmanager
def _flocked(fd: int) -> Iterator[None]:
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
