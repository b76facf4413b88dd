"""SQLiteCounters: the MemoryCounters semantics, shared by every process that opens the file.

The worker processes of one node share brute-force counts and send rates through it; a
forked process here stands for another worker.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailfort.policy.counters import CounterStore, Entry
from mailfort.policy.shared_counters import SQLiteCounters


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_fixed_window_expiry_and_reset(tmp_path: Path) -> None:
    clock = Clock()
    c: CounterStore = SQLiteCounters(tmp_path / "s.sqlite3", clock=clock)
    assert c.get("k") == 0
    assert [c.incr("k", 10) for _ in range(3)] == [1, 2, 3]
    clock.now += 9.9
    assert c.incr("k", 10) == 4  # later increments do not extend the window
    clock.now += 0.1
    assert c.get("k") == 0
    assert c.incr("k", 10) == 1
    c.reset("k")
    assert c.get("k") == 0
    with pytest.raises(ValueError):
        c.incr("k", 0)


def test_processes_share_one_count(tmp_path: Path) -> None:
    """Two processes incrementing the same key: one count, no lost updates."""
    path = tmp_path / "s.sqlite3"
    SQLiteCounters(path).close()  # the table exists before the fork
    pid = os.fork()
    if pid == 0:  # the other worker
        code = 1
        try:
            other = SQLiteCounters(path)
            for _ in range(200):
                other.incr("guesses", 60)
            code = 0
        finally:
            os._exit(code)
    mine = SQLiteCounters(path)
    for _ in range(200):
        mine.incr("guesses", 60)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert mine.get("guesses") == 400


def test_bounded_key_count(tmp_path: Path) -> None:
    clock = Clock()
    c = SQLiteCounters(tmp_path / "s.sqlite3", clock=clock, max_keys=50)
    for i in range(500):
        c.incr(f"k{i}", 60)
        clock.now += 0.01
    assert len(c) <= 55
    assert c.get("k499") == 1  # the newest keys are kept


def test_entries_lists_live_keys_under_a_prefix(tmp_path: Path) -> None:
    """What `mailfort block list` reads: live keys of one kind, with the time they have left,
    written by any process."""
    clock = Clock()
    c = SQLiteCounters(tmp_path / "s.sqlite3", clock=clock)
    other = SQLiteCounters(tmp_path / "s.sqlite3", clock=clock)  # another worker
    c.incr("block:127.0.0.5", 900)
    other.incr("block:127.0.0.6", 60)
    other.incr("block:127.0.0.6", 60)
    c.incr("fail:127.0.0.5", 900)
    clock.now += 30
    assert sorted(c.entries("block:"), key=lambda e: e.key) == [Entry("block:127.0.0.5", 1, 870.0),
                                           Entry("block:127.0.0.6", 2, 30.0)]
    clock.now += 30  # the second has expired
    assert c.entries("block:") == [Entry("block:127.0.0.5", 1, 840.0)]
    assert c.entries("block:%") == []  # the prefix is text, not a pattern


def test_processes_reserving_at_once_take_exactly_the_limit(tmp_path: Path) -> None:
    """Two workers reserving the last places of one key: together never past the limit."""
    path = tmp_path / "s.sqlite3"
    SQLiteCounters(path).close()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read)
            other = SQLiteCounters(path)
            taken = sum(other.reserve("sent", 150, 60) for _ in range(200))
            os.write(write, str(taken).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    mine = SQLiteCounters(path)
    taken = sum(mine.reserve("sent", 150, 60) for _ in range(200))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with os.fdopen(read) as f:
        assert taken + int(f.read()) == 150
    assert mine.get("sent") == 150
