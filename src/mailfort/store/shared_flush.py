"""One ``syncfs`` for every committer of a node: group commit across worker processes.

Each worker process has its own committer thread (store/maildir.py). A ``syncfs`` flushes the
whole file system, so when two workers each flush their own batch, each pays for the other's
writes and each batch is half as large: with two workers a node made twice the flushes of one
worker for the same mail (issue 12 measured a fifth of all samples in ``syncfs``). This makes
the committers share their flushes instead: a committer whose writes are done waits for the
flush in progress, and skips its own when a flush that *started after its writes* has
completed meanwhile, since that flush covered them.

The rule needs to know when each flush started relative to a committer's writes. Two
counters say it: ``started`` (flushes begun) and ``completed`` (the number of the last one
that returned). A committer, once its writes are done, takes the ticket ``started + 1``: any
flush numbered that or higher begins after this moment. Then it takes the flush lock (one
flush at a time); holding it, if ``completed`` has reached its ticket, its data is on disk;
otherwise it starts flush number ``started + 1`` itself.

The counters live in a small file that every committer maps shared, so reading and writing
them costs no system call: only the flush lock's holder writes them, each is one aligned
8-byte word (read and written whole), and the ticket is read after the committer's writes
returned from the kernel. A flush thus costs two ``flock`` calls beside the ``syncfs``;
reading and writing the counters through the file under a second lock cost thirteen system
calls, each a release of the interpreter lock that the event loop thread then waited for.

The lock is an ``flock``, which belongs to the open file (two committers of one process
exclude each other too) and which the kernel releases when a process dies, so a worker
killed in the middle of a flush never stalls the others; the flush it did not finish simply
does not count as completed.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from collections.abc import Callable
from pathlib import Path

COUNT_FILE = "flush.count"
LOCK_FILE = "flush.lock"
_STARTED, _COMPLETED = 0, 1  # the counters' places, in 8-byte words


class SharedFlush:
    """Flushes the file system for this process's committer, shared with the node's others."""

    def __init__(self, data_dir: Path, syncfs: Callable[[int], None]) -> None:
        """``syncfs(fd)``: flush the file system of ``fd``; raises OSError on failure."""
        self._syncfs = syncfs
        self._lock = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                             0o600)
        fd = os.open(data_dir / COUNT_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < 16:  # new (or from a version that wrote less)
                os.ftruncate(fd, 16)  # the counters start at 0; never shrinks a longer one
            self._map = mmap.mmap(fd, 16)  # MAP_SHARED: every committer sees the same words
        finally:
            os.close(fd)  # the mapping keeps the file
        self._counters = memoryview(self._map).cast("Q")
        self.flushes = 0  # flushes this committer made itself
        self.shared = 0  # flushes it skipped because another one covered its writes

    def flush(self, fd: int) -> None:
        """Return once everything this process wrote before the call is on stable storage."""
        counters = self._counters
        ticket = counters[_STARTED] + 1
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            if counters[_COMPLETED] >= ticket:
                self.shared += 1
                return
            mine = counters[_STARTED] + 1
            counters[_STARTED] = mine
            self._syncfs(fd)  # an error leaves ``completed`` behind: the next one flushes
            counters[_COMPLETED] = mine
            self.flushes += 1
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    def close(self) -> None:
        self._counters.release()
        self._map.close()
        os.close(self._lock)
