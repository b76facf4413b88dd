"""The flush shared by the committers of a node's worker processes (store/shared_flush.py).

The flush function is the real ``syncfs`` of the test's file system, wrapped only to note the
order of calls (or to hold one inside the flush while others arrive), so these tests check the
one property that matters: a committer skips its flush only when a flush that began after its
writes has completed.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from mailfort.store.maildir import Committer
from mailfort.store.shared_flush import SharedFlush

_real_syncfs = Committer._syncfs


class Recorder:
    """A real syncfs that notes each call; ``hold`` keeps the next call inside until set."""

    def __init__(self) -> None:
        self.calls = 0
        self.hold: threading.Event | None = None
        self.inside = threading.Event()

    def __call__(self, fd: int) -> None:
        self.calls += 1
        hold, self.hold = self.hold, None
        if hold is not None:
            self.inside.set()
            assert hold.wait(10)
        _real_syncfs(fd)


def _fd(tmp_path: Path) -> int:
    return os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)


def test_a_flush_that_ended_before_the_writes_is_never_taken_for_one_that_covers_them(
        tmp_path: Path) -> None:
    rec = Recorder()
    a, b = SharedFlush(tmp_path, rec), SharedFlush(tmp_path, rec)
    fd = _fd(tmp_path)
    try:
        for _ in range(3):
            a.flush(fd)
            b.flush(fd)  # b's writes came after a's flush: it must flush again
        assert rec.calls == 6
        assert a.shared == b.shared == 0
    finally:
        os.close(fd)
        a.close()
        b.close()


def test_committers_that_arrive_during_a_flush_share_the_next_one(tmp_path: Path) -> None:
    """A is inside its flush when B, C and D finish their writes. A's flush may have begun
    before their writes, so it cannot count for them; one more flush, made by whichever of
    them gets the lock first, covers the other two."""
    rec = Recorder()
    gate = rec.hold = threading.Event()
    flushes = [SharedFlush(tmp_path, rec) for _ in range(4)]
    fd = _fd(tmp_path)
    try:
        first = threading.Thread(target=flushes[0].flush, args=(fd,))
        first.start()
        assert rec.inside.wait(10)
        late = [threading.Thread(target=f.flush, args=(fd,)) for f in flushes[1:]]
        for t in late:
            t.start()
        time.sleep(1.0)  # all three have taken their ticket and wait for the lock
        gate.set()
        for t in [first, *late]:
            t.join(10)
            assert not t.is_alive()
        assert rec.calls == 2
        assert sorted(f.shared for f in flushes[1:]) == [0, 1, 1]
    finally:
        os.close(fd)
        for f in flushes:
            f.close()


def test_a_worker_killed_inside_its_flush_does_not_stall_the_others(tmp_path: Path) -> None:
    """The killed process held the flush lock; the kernel releases it, and the flush it never
    finished does not count: the survivor flushes for itself."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker that dies in the middle of its flush
        os.close(ready_r)

        def stuck(fd: int) -> None:
            os.write(ready_w, b"x")
            time.sleep(60)

        try:
            SharedFlush(tmp_path, stuck).flush(os.open(tmp_path, os.O_RDONLY))
        finally:
            os._exit(1)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"x"  # the child is inside its flush, lock held
        rec = Recorder()
        survivor = SharedFlush(tmp_path, rec)
        fd = _fd(tmp_path)
        done = threading.Event()
        t = threading.Thread(target=lambda: (survivor.flush(fd), done.set()))
        t.start()
        assert not done.wait(0.3)  # waits for the flush in progress
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert done.wait(10)
        assert rec.calls == 1 and survivor.shared == 0
        os.close(fd)
        survivor.close()
    finally:
        os.close(ready_r)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
