"""The POP3 maildrop lease across nodes, against a real redis-server: one holder, only the
holder frees it, a dead node's lease expires, a closing session makes the next login wait,
and a lost lease is reported."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mailfort.policy.redis_counters import connect
from mailfort.store.maildrop_lock import LocksUnavailable, RedisLease, RedisLocks

DROP = "alice@example.test"


@pytest.fixture
async def nodes(redis_server: Any) -> AsyncIterator[tuple[RedisLocks, RedisLocks]]:
    """Two nodes' locks: separate clients on the same Redis."""
    a, b = connect(redis_server.url, None), connect(redis_server.url, None)
    yield (RedisLocks(a, ttl=0.6, close_wait=2.0), RedisLocks(b, ttl=0.6, close_wait=2.0))
    await a.aclose()
    await b.aclose()


async def test_one_holder_at_a_time_and_renewed_while_held(nodes: Any) -> None:
    a, b = nodes
    lease = await a.acquire(DROP)
    assert lease is not None
    assert await b.acquire("Alice@Example.TEST") is None  # the same maildrop
    assert await b.acquire("bob@example.test") is not None  # another one is free
    await asyncio.sleep(1.0)  # longer than the TTL: renewal keeps it
    assert await b.acquire(DROP) is None and not lease.lost.is_set()
    await lease.release()
    assert await b.acquire(DROP) is not None


async def test_a_dead_node_lease_ends_by_expiry(nodes: Any) -> None:
    a, b = nodes
    lease = await a.acquire(DROP)
    assert isinstance(lease, RedisLease)
    lease._task.cancel()  # the node is gone: no renewal, no release
    assert await b.acquire(DROP) is None
    await asyncio.sleep(0.7)
    assert await b.acquire(DROP) is not None


async def test_only_the_holder_releases(nodes: Any) -> None:
    a, b = nodes
    lease = await a.acquire(DROP)
    assert isinstance(lease, RedisLease)
    lease._task.cancel()
    await asyncio.sleep(0.7)  # expired...
    other = await b.acquire(DROP)  # ...and taken by b
    assert other is not None
    await lease.release()  # a's late release must not free b's session
    assert await a.acquire(DROP) is None
    await other.release()


async def test_a_login_waits_for_a_closing_session_elsewhere(nodes: Any) -> None:
    a, b = nodes
    lease = await a.acquire(DROP)
    assert lease is not None
    await lease.closing()

    async def close_later() -> None:
        await asyncio.sleep(0.3)
        await lease.release()

    closer = asyncio.create_task(close_later())
    loop = asyncio.get_running_loop()
    start = loop.time()
    got = await b.acquire(DROP)
    assert got is not None and loop.time() - start >= 0.25
    await closer


async def test_a_lost_lease_is_reported(nodes: Any) -> None:
    a, _ = nodes
    lease = await a.acquire(DROP)
    assert lease is not None
    await a.client.delete(f"mailfort:pop3-lock:{DROP}")  # e.g. expired during an outage
    await asyncio.wait_for(lease.lost.wait(), 2.0)


async def test_redis_down_at_login_is_unavailable_not_free(nodes: Any,
                                                           redis_server: Any) -> None:
    a, _ = nodes
    redis_server.stop()
    with pytest.raises(LocksUnavailable):
        await a.acquire(DROP)
