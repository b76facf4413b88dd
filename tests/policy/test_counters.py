"""MemoryCounters with a fake clock: windows, expiry, reset and the key bound."""

from __future__ import annotations

import threading

import pytest

from mailfort.policy.counters import CounterStore, MemoryCounters, client_key


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
