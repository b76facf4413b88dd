"""Counters shared by several nodes in Redis (or Valkey), on redis-py's asyncio client.

The semantics are ``MemoryCounters``' (fixed windows): ``incr`` is INCR, and PEXPIRE when
the key has no expiry yet, in one Lua script, so the two are atomic (a node dying between
them cannot leave a key that never expires, and two nodes racing on a new key give it one
window). ``reserve`` (the count compared with the limit, then INCR) and ``release`` (DECR of
a live count above zero) are Lua scripts too: Redis runs a script whole, so any number of
nodes reserving at once take at most the limit. Every key is under ``prefix`` so one Redis
can serve other things too.

When Redis cannot be reached, each operation raises ``CountersUnavailable`` at once rather
than waiting on the network: after a failure, Redis is tried again at most every
``RETRY_EVERY`` seconds (redis-py reconnects by itself on that next try). The change of
state is logged once each way, never per call. What a caller does without the shared counts
is its own decision (see policy/authn.py and ``FallbackCounters``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mailfort.policy.counters import CountersUnavailable, Entry

log = logging.getLogger("mailfort.counters")

RETRY_EVERY = 1.0  # seconds between tries while Redis is unreachable
TIMEOUT = 1.0  # seconds for a connection or a reply before Redis counts as unreachable
SCAN_BATCH = 500

_INCR = """
local n = redis.call('INCR', KEYS[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""

# KEYS[1]: the key; ARGV[1]: the window in ms; ARGV[2]: the limit. 1: taken, 0: at the limit.
_RESERVE = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n >= tonumber(ARGV[2]) then return 0 end
redis.call('INCR', KEYS[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 1
"""

# ARGV[1]: how many to give back, never below zero. An expired key is absent: nothing is
# given back to a window that has ended.
_RELEASE = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
local k = math.min(n, tonumber(ARGV[1]))
if k > 0 then redis.call('DECRBY', KEYS[1], k) end
return 0
"""


def connect(url: str, password: str | None) -> Any:
    """A redis-py asyncio client: short timeouts, no retries of its own (we fail fast)."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return aioredis.Redis.from_url(
        url, password=password or None, socket_timeout=TIMEOUT,
        socket_connect_timeout=TIMEOUT, retry=Retry(NoBackoff(), 0),
        decode_responses=True)


class RedisCounters:
    """``Counters`` in Redis; ``aclose`` when done."""

    def __init__(self, client: Any, *, prefix: str = "mailfort:",
                 clock: Any = time.monotonic) -> None:
        self.client = client
        self.prefix = prefix
        self._clock = clock
        self._down_since: float | None = None
        self._next_try = 0.0
        self._incr = client.register_script(_INCR)
        self._reserve = client.register_script(_RESERVE)
        self._release = client.register_script(_RELEASE)

    @property
    def available(self) -> bool:
        return self._down_since is None

    async def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import redis.exceptions as rexc

        now = self._clock()
        if self._down_since is not None and now < self._next_try:
            raise CountersUnavailable("redis unreachable")
        try:
            result = await fn(*args, **kwargs)
        except (rexc.ConnectionError, rexc.TimeoutError, OSError) as exc:
            if self._down_since is None:
                self._down_since = now
                log.warning("redis counters unreachable (%s: %s): logins are refused with "
                            "a temporary error, throttles count on this node alone until "
                            "it is back", what, type(exc).__name__)
            self._next_try = now + RETRY_EVERY
            raise CountersUnavailable(f"redis unreachable: {type(exc).__name__}") from exc
        if self._down_since is not None:
            log.warning("redis counters reachable again after %.0fs",
                        now - self._down_since)
            self._down_since = None
        return result

    async def incr(self, key: str, window: float) -> int:
        if window <= 0:
            raise ValueError("window must be positive")
        ms = max(1, int(window * 1000))
        return int(await self._call("incr", self._incr, keys=[self.prefix + key], args=[ms]))

    async def reserve(self, key: str, limit: int, window: float) -> bool:
        if window <= 0:
            raise ValueError("window must be positive")
        if limit <= 0:
            return False
        ms = max(1, int(window * 1000))
        return bool(await self._call("reserve", self._reserve, keys=[self.prefix + key],
                                     args=[ms, limit]))

    async def release(self, key: str, amount: int = 1) -> None:
        if amount > 0:
            await self._call("release", self._release, keys=[self.prefix + key],
                             args=[amount])

    async def get(self, key: str) -> int:
        value = await self._call("get", self.client.get, self.prefix + key)
        return int(value) if value is not None else 0

    async def reset(self, key: str) -> None:
        await self._call("reset", self.client.delete, self.prefix + key)

    async def entries(self, prefix: str) -> list[Entry]:
        return list(await self._call("entries", self._entries, prefix))

    async def _entries(self, prefix: str) -> list[Entry]:
        full = self.prefix + prefix
        pattern = _glob_escape(full) + "*"
        out: list[Entry] = []
        keys = [k async for k in self.client.scan_iter(match=pattern, count=SCAN_BATCH)]
        for i in range(0, len(keys), SCAN_BATCH):
            batch = keys[i:i + SCAN_BATCH]
            async with self.client.pipeline(transaction=False) as pipe:
                for k in batch:
                    pipe.get(k)
                    pipe.pttl(k)
                values = await pipe.execute()
            for k, count, pttl in zip(batch, values[::2], values[1::2], strict=True):
                if count is not None and pttl is not None and pttl > 0:
                    out.append(Entry(k[len(self.prefix):], int(count), pttl / 1000))
        return out

    async def aclose(self) -> None:
        await self.client.aclose()


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
