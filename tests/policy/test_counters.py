"""MemoryCounters with a fake clock: windows, expiry, reset and the key bound; the atomic
reserve-and-release of every store on this machine."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from mailfort.policy.counters import (
    CounterStore,
    CountersUnavailable,
    FallbackCounters,
    MemoryCounters,
    as_async,
    client_key,
)
from mailfort.policy.shared_counters import SQLiteCounters


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_incr_within_window_then_expiry() -> None:
    clock = Clock()
    c = MemoryCounters(clock=clock)
    assert c.get("k") == 0
    assert [c.incr("k", 10) for _ in range(3)] == [1, 2, 3]
    assert c.get("k") == 3
    clock.now += 9.9
    assert c.incr("k", 10) == 4  # fixed window: later increments do not extend it
    assert c.ttl("k") == pytest.approx(0.1)
    clock.now += 0.1
    assert c.get("k") == 0
    assert c.incr("k", 10) == 1


def test_reset_and_independent_keys() -> None:
    c = MemoryCounters(clock=Clock())
    c.incr("a", 60)
    c.incr("a", 60)
    c.incr("b", 60)
    c.reset("a")
    c.reset("never-set")
    assert (c.get("a"), c.get("b")) == (0, 1)


def test_bounded_key_count_sweeps_expired_first() -> None:
    clock = Clock()
    c = MemoryCounters(clock=clock, max_keys=100)
    for i in range(100):
        c.incr(f"old{i}", 1)
    c.incr("keep", 1000)  # table full: the expired ones are not yet expired -> oldest go
    assert len(c) <= 100
    assert c.get("keep") == 1
    clock.now += 5
    for i in range(200):
        c.incr(f"new{i}", 1000)
    assert len(c) <= 100
    assert c.get("new199") == 1


def test_thread_safe_increments() -> None:
    c = MemoryCounters(clock=Clock())

    def work() -> None:
        for _ in range(1000):
            c.incr("shared", 60)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.get("shared") == 8000


def test_satisfies_protocol_and_rejects_bad_window() -> None:
    c: CounterStore = MemoryCounters()
    with pytest.raises(ValueError):
        c.incr("k", 0)
    assert c.incr("k", 1) == 1


def test_client_key_is_the_ipv4_address_or_the_ipv6_64() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::2") \
        == "2001:db8:1:2::/64"
    assert client_key("[2001:db8:1:2::1]") == "2001:db8:1:2::/64"
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("::1") == "::/64"
    assert client_key("::ffff:192.0.2.1") == client_key("192.0.2.1") == "192.0.2.1"
    assert client_key("not-an-ip") == "not-an-ip"


def test_entries_lists_live_keys_under_a_prefix_with_their_time_left() -> None:
    clock = Clock()
    c = MemoryCounters(clock=clock)
    c.incr("auth-block:ip:192.0.2.1", 60)
    c.incr("auth-block:ip:192.0.2.2", 10)
    c.incr("auth-fail:ip:192.0.2.1", 60)
    clock.now += 5
    got = sorted(c.entries("auth-block:ip:"), key=lambda e: e.key)
    assert [(e.key, e.count) for e in got] == [("auth-block:ip:192.0.2.1", 1),
                                               ("auth-block:ip:192.0.2.2", 1)]
    assert [e.ttl for e in got] == [pytest.approx(55), pytest.approx(5)]
    clock.now += 5  # the second one has expired
    assert [e.key for e in c.entries("auth-block:")] == ["auth-block:ip:192.0.2.1"]


@pytest.mark.parametrize("make", [
    lambda tmp, clock: MemoryCounters(clock=clock),
    lambda tmp, clock: SQLiteCounters(tmp / "s.sqlite3", clock=clock),
], ids=["memory", "sqlite"])
def test_reserve_takes_one_only_under_the_limit_and_release_gives_it_back(
        tmp_path: Path, make: Callable[[Path, Clock], CounterStore]) -> None:
    """The check and the count in one step, so that no two callers both take the last one
    (issue 24: parallel sessions each read 'under the limit' and all sent)."""
    clock = Clock()
    c = make(tmp_path, clock)
    assert [c.reserve("k", 3, 10) for _ in range(5)] == [True, True, True, False, False]
    assert c.get("k") == 3
    c.release("k")
    assert c.get("k") == 2
    assert c.reserve("k", 3, 10) and not c.reserve("k", 3, 10)
    clock.now += 10  # the window ends: a new one, and a release now takes nothing from it
    c.release("k")
    assert c.get("k") == 0
    assert c.reserve("k", 3, 10) and c.get("k") == 1
    assert c.reserve("k", 3, 10) and c.reserve("k", 3, 10)
    c.release("k", 2)
    assert c.get("k") == 1
    c.release("k", 5)  # never below zero
    assert c.get("k") == 0
    c.release("gone")
    assert c.get("gone") == 0
    assert not c.reserve("zero", 0, 10) and c.get("zero") == 0
    with pytest.raises(ValueError):
        c.reserve("k", 3, 0)


@pytest.mark.parametrize("make", [
    lambda tmp: MemoryCounters(), lambda tmp: SQLiteCounters(tmp / "s.sqlite3"),
], ids=["memory", "sqlite"])
def test_reserve_from_many_threads_never_passes_the_limit(
        tmp_path: Path, make: Callable[[Path], CounterStore]) -> None:
    c = make(tmp_path)
    barrier = threading.Barrier(8)
    taken: list[bool] = []

    def work() -> None:
        barrier.wait(timeout=10)
        taken.extend([c.reserve("shared", 30, 60) for _ in range(20)])

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert taken.count(True) == 30 and c.get("shared") == 30


async def test_local_and_fallback_counters_reserve_and_release() -> None:
    store = MemoryCounters()
    local = as_async(store)
    assert await local.reserve("k", 1, 60) and not await local.reserve("k", 1, 60)
    await local.release("k")
    assert store.get("k") == 0

    class Down:
        async def reserve(self, key: str, limit: int, window: float) -> bool:
            raise CountersUnavailable("down")

        async def release(self, key: str, amount: int = 1) -> None:
            raise CountersUnavailable("down")

    fallback = FallbackCounters(Down(), store)  # type: ignore[arg-type]
    assert await fallback.reserve("k", 1, 60) and not await fallback.reserve("k", 1, 60)
    await fallback.release("k")
    assert store.get("k") == 0
