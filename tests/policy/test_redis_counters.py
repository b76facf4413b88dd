"""RedisCounters against a real redis-server: MemoryCounters' semantics, atomicity, and
what happens while Redis is away (fail fast, say so once, recover by itself)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from mailfort.policy.counters import CountersUnavailable, FallbackCounters, MemoryCounters
from mailfort.policy.redis_counters import RETRY_EVERY, RedisCounters, connect


@pytest.fixture
async def counters(redis_server: Any) -> Any:
    c = RedisCounters(connect(redis_server.url, None), prefix="t:")
    yield c
    await c.aclose()


async def test_fixed_window_semantics(counters: RedisCounters) -> None:
    assert await counters.get("k") == 0
    assert [await counters.incr("k", 0.6) for _ in range(3)] == [1, 2, 3]
    assert await counters.get("k") == 3
    await asyncio.sleep(0.3)
    assert await counters.incr("k", 0.6) == 4  # later increments do not extend the window
    await asyncio.sleep(0.4)
    assert await counters.get("k") == 0
    assert await counters.incr("k", 60) == 1
    await counters.reset("k")
    assert await counters.get("k") == 0
    assert await counters.client.get("t:k") is None  # really gone, under the prefix


async def test_concurrent_increments_from_two_nodes_are_counted_once_each(
        redis_server: Any) -> None:
    a = RedisCounters(connect(redis_server.url, None), prefix="t:")
    b = RedisCounters(connect(redis_server.url, None), prefix="t:")
    try:
        results = await asyncio.gather(*(c.incr("shared", 60) for _ in range(100)
                                         for c in (a, b)))
        assert sorted(results) == list(range(1, 201))
        assert 0 < await a.client.pttl("t:shared") <= 60_000  # one window, set atomically
    finally:
        await a.aclose()
        await b.aclose()


async def test_entries_list_live_keys_with_time_left(counters: RedisCounters) -> None:
    await counters.incr("auth-block:ip:192.0.2.1", 60)
    await counters.incr("auth-block:ip:192.0.2.[x]", 30)  # glob characters are literal
    await counters.incr("auth-fail:ip:192.0.2.1", 60)
    got = sorted(await counters.entries("auth-block:ip:"), key=lambda e: e.key)
    assert [(e.key, e.count) for e in got] == [("auth-block:ip:192.0.2.1", 1),
                                               ("auth-block:ip:192.0.2.[x]", 1)]
    assert 59 < got[0].ttl <= 60 and 29 < got[1].ttl <= 30
    assert [e.key for e in await counters.entries("auth-block:ip:192.0.2.[")] == [got[1].key]


async def test_redis_down_fails_fast_logs_once_and_recovers(
        redis_server: Any, counters: RedisCounters, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "mailfort.counters")
    await counters.incr("k", 60)
    redis_server.stop()
    with pytest.raises(CountersUnavailable):
        await counters.incr("k", 60)
    assert not counters.available
    start = time.monotonic()
    for _ in range(50):  # no network wait per call while it is known to be down
        with pytest.raises(CountersUnavailable):
            await counters.get("k")
    assert time.monotonic() - start < 0.5
    assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1
    # A throttle keeps counting on this node meanwhile.
    throttle = FallbackCounters(counters, MemoryCounters())
    assert [await throttle.incr("rate", 60) for _ in range(2)] == [1, 2]
    assert await throttle.get("rate") == 2
    redis_server.start()  # same port, empty (no persistence)
    await asyncio.sleep(RETRY_EVERY + 0.1)
    assert await counters.incr("k", 60) == 1
    assert counters.available
    assert any("reachable again" in r.getMessage() for r in caplog.records)


async def test_a_password_comes_from_the_config_never_the_url(tmp_path: Any) -> None:
    from mailfort import config as config_mod

    with pytest.raises(config_mod.ConfigError, match="no password in the URL"):
        config_mod.from_dict({"counters": {"backend": "redis",
                                           "url": "redis://:secret@127.0.0.1:6379/0"}})
    pw = tmp_path / "redis.pw"
    pw.write_text("s3cret\n")
    cfg = config_mod.from_dict({"counters": {"backend": "redis", "url": "redis://127.0.0.1/0",
                                             "password_file": str(pw)}})
    assert cfg.counters.password() == "s3cret"
    assert "s3cret" not in repr(config_mod.effective(cfg))


async def test_a_password_from_the_environment_reaches_redis(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailfort import config as config_mod
    from mailfort.server.app import make_counters
    from tests.redisserver import RedisServer

    server = RedisServer(password="pw-4b1e9c").start()
    try:
        monkeypatch.setenv("MF_TEST_REDIS_PW", "pw-4b1e9c")
        cfg = config_mod.from_dict({"counters": {
            "backend": "redis", "url": server.url, "password_env": "MF_TEST_REDIS_PW"}})
        shared, throttles, _locks = make_counters(cfg, MemoryCounters())
        assert await shared.incr("k", 60) == 1
        assert await throttles.get("k") == 1
        await shared.aclose()  # type: ignore[attr-defined]
        monkeypatch.setenv("MF_TEST_REDIS_PW", "wrong")
        wrong, _, _ = make_counters(cfg, MemoryCounters())
        with pytest.raises(CountersUnavailable):
            await wrong.get("k")
        await wrong.aclose()  # type: ignore[attr-defined]
    finally:
        server.cleanup()


async def test_reserve_is_atomic_across_nodes(redis_server: Any) -> None:
    """Two nodes reserving at once: exactly the limit is taken, in one window; a release
    gives one back and never takes the count below zero."""
    a = RedisCounters(connect(redis_server.url, None), prefix="t:")
    b = RedisCounters(connect(redis_server.url, None), prefix="t:")
    try:
        taken = await asyncio.gather(*(c.reserve("sent", 30, 60) for _ in range(50)
                                       for c in (a, b)))
        assert taken.count(True) == 30 and await a.get("sent") == 30
        assert 0 < await a.client.pttl("t:sent") <= 60_000
        await b.release("sent")
        assert await a.get("sent") == 29
        assert await a.reserve("sent", 30, 60) and not await b.reserve("sent", 30, 60)
        await a.release("sent", 3)
        assert await a.get("sent") == 27
        await a.release("sent", 100)  # never below zero, the window kept
        assert await a.get("sent") == 0 and await a.client.pttl("t:sent") > 0
        await a.release("absent")
        assert await a.client.get("t:absent") is None
        assert not await a.reserve("zero", 0, 60)
    finally:
        await a.aclose()
        await b.aclose()
