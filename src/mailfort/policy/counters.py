"""Expiring counters for rate limits and brute-force protection, and the client identity
they count under.

Policy code awaits the small ``Counters`` interface, so that several nodes can share the
counts in Redis (policy/redis_counters.py: INCR + EXPIRE has exactly these semantics)
without a network round trip ever blocking the event loop. A store of this machine (the
embedded ``MemoryCounters``, or any other ``CounterStore``) answers at once and is used
through ``LocalCounters``; ``as_async`` takes either kind. A remote store that cannot be
reached raises ``CountersUnavailable``: each caller decides what that means for it (the
authenticator refuses logins for the time being, throttles fall back to this node's own
counts: see ``FallbackCounters``). A limit that parallel sessions share is taken with
``reserve`` (the check and the count in one atomic step) and given back with ``release``:
reading the count and adding to it later lets N sessions that read at once all pass.
``client_key`` is the one rule by which a client
address is counted, by the connection limits and by the brute-force protection alike.
"""

from __future__ import annotations

import inspect
import ipaddress
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


def client_key(client_ip: str) -> str:
    """The identity of a client in every per-client count: its IPv4 address, or its IPv6
    /64 (one host or one home network usually holds a whole /64, so counting single IPv6
    addresses would give it billions of fresh identities). An IPv4-mapped IPv6 address is
    its IPv4 address; anything that is not an address counts as itself."""
    try:
        ip = ipaddress.ip_address(client_ip.strip("[]").split("%", 1)[0])
    except ValueError:
        return client_ip
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class CountersUnavailable(Exception):
    """The shared store cannot be reached (for now): nothing was counted or read."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One live key: its count and the seconds left in its window."""

    key: str
    count: int
    ttl: float


class CounterStore(Protocol):
    """A store on this machine: every call answers at once (no network)."""

    def incr(self, key: str, window: float) -> int:
        """Add one and return the new count. A key that is absent or expired starts at 1
        with a fixed window of ``window`` seconds; later increments do not extend it."""

    def get(self, key: str) -> int:
        """The current count, 0 when absent or expired."""

    def reserve(self, key: str, limit: int, window: float) -> bool:
        """Add one if the count is below ``limit`` (window as for ``incr``), in one atomic
        step: whether it was added. Any number of callers at once take at most ``limit``."""

    def release(self, key: str, amount: int = 1) -> None:
        """Take back ``amount`` reservations: subtract them from a live count, never below
        zero (nothing once the window has ended: the new window owes the old one nothing)."""

    def reset(self, key: str) -> None:
        """Forget the key."""

    def entries(self, prefix: str) -> list[Entry]:
        """The live keys that start with ``prefix``."""


class Counters(Protocol):
    """What policy awaits: ``CounterStore``'s operations, maybe over the network."""

    async def incr(self, key: str, window: float) -> int: ...

    async def get(self, key: str) -> int: ...

    async def reserve(self, key: str, limit: int, window: float) -> bool: ...

    async def release(self, key: str, amount: int = 1) -> None: ...

    async def reset(self, key: str) -> None: ...

    async def entries(self, prefix: str) -> list[Entry]: ...


class LocalCounters:
    """The ``Counters`` face of a ``CounterStore``: the same calls, awaited."""

    def __init__(self, store: CounterStore) -> None:
        self.store = store

    async def incr(self, key: str, window: float) -> int:
        return self.store.incr(key, window)

    async def get(self, key: str) -> int:
        return self.store.get(key)

    async def reserve(self, key: str, limit: int, window: float) -> bool:
        return self.store.reserve(key, limit, window)

    async def release(self, key: str, amount: int = 1) -> None:
        self.store.release(key, amount)

    async def reset(self, key: str) -> None:
        self.store.reset(key)

    async def entries(self, prefix: str) -> list[Entry]:
        return self.store.entries(prefix)


def as_async(counters: Counters | CounterStore) -> Counters:
    """``counters`` itself when its operations are awaited, else its ``LocalCounters``."""
    if inspect.iscoroutinefunction(getattr(counters, "incr", None)):
        return counters  # type: ignore[return-value]
    return LocalCounters(counters)  # type: ignore[arg-type]


class FallbackCounters:
    """A shared store with this node's own counts as the fallback, for throttles.

    Used where counting locally while the shared store is down is safer than refusing
    service (a submission rate, say): each node then still enforces its own limit, so
    the total is at most (number of nodes) x the limit until the store is back. Counts
    taken meanwhile stay local; the shared ones resume where they were.
    """

    def __init__(self, shared: Counters, local: CounterStore | None = None) -> None:
        self.shared = shared
        self.local: CounterStore = local if local is not None else MemoryCounters()

    async def incr(self, key: str, window: float) -> int:
        try:
            return await self.shared.incr(key, window)
        except CountersUnavailable:
            return self.local.incr(key, window)

    async def get(self, key: str) -> int:
        try:
            return await self.shared.get(key)
        except CountersUnavailable:
            return self.local.get(key)

    async def reserve(self, key: str, limit: int, window: float) -> bool:
        try:
            return await self.shared.reserve(key, limit, window)
        except CountersUnavailable:
            return self.local.reserve(key, limit, window)

    async def release(self, key: str, amount: int = 1) -> None:
        """Given back where it can be: a place taken locally during an outage and given
        back once the store is back frees one shared place (an outage allows more anyway)."""
        try:
            await self.shared.release(key, amount)
        except CountersUnavailable:
            self.local.release(key, amount)

    async def reset(self, key: str) -> None:
        self.local.reset(key)
        await self.shared.reset(key)

    async def entries(self, prefix: str) -> list[Entry]:
        return await self.shared.entries(prefix)


class MemoryCounters:
    """Fixed-window counters in a dict; thread-safe; the clock is injectable for tests.

    The number of keys is bounded (``max_keys``): an attacker cycling through addresses or
    user names must not be able to grow memory without limit. Expired keys are swept first;
    if that is not enough, the keys closest to expiry are dropped.
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 1_000_000
    ) -> None:
        if max_keys <= 0:
            raise ValueError("max_keys must be positive")
        self._clock = clock
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._data: dict[str, tuple[int, float]] = {}  # key -> (count, expires_at)

    def incr(self, key: str, window: float) -> int:
        if window <= 0:
            raise ValueError("window must be positive")
        now = self._clock()
        with self._lock:
            return self._incr_locked(key, window, now)

    def _incr_locked(self, key: str, window: float, now: float) -> int:
        entry = self._data.get(key)
        if entry is None or entry[1] <= now:
            if entry is None and len(self._data) >= self._max_keys:
                self._make_room(now)
            self._data[key] = (1, now + window)
            return 1
        count = entry[0] + 1
        self._data[key] = (count, entry[1])
        return count

    def reserve(self, key: str, limit: int, window: float) -> bool:
        if window <= 0:
            raise ValueError("window must be positive")
        if limit <= 0:
            return False
        now = self._clock()
        with self._lock:  # the check and the count under one hold of the lock
            entry = self._data.get(key)
            if entry is not None and entry[1] > now and entry[0] >= limit:
                return False
            self._incr_locked(key, window, now)
            return True

    def release(self, key: str, amount: int = 1) -> None:
        now = self._clock()
        with self._lock:
            entry = self._data.get(key)
            if entry is not None and entry[1] > now and amount > 0:
                self._data[key] = (max(0, entry[0] - amount), entry[1])

    def get(self, key: str) -> int:
        now = self._clock()
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return 0
            if entry[1] <= now:
                del self._data[key]
                return 0
            return entry[0]

    def ttl(self, key: str) -> float:
        """Seconds until the key expires, 0.0 when absent or expired."""
        now = self._clock()
        with self._lock:
            entry = self._data.get(key)
            return max(0.0, entry[1] - now) if entry is not None else 0.0

    def reset(self, key: str) -> None:
        with self._lock:
            self._data.pop(key, None)

    def entries(self, prefix: str) -> list[Entry]:
        now = self._clock()
        with self._lock:
            return [Entry(k, c, exp - now) for k, (c, exp) in self._data.items()
                    if k.startswith(prefix) and exp > now]

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def _make_room(self, now: float) -> None:
        """Called with the lock held when the table is full."""
        self._data = {k: v for k, v in self._data.items() if v[1] > now}
        excess = len(self._data) - self._max_keys + 1
        if excess > 0:
            # Drop a tenth at once so the sort is not paid on every new key.
            excess = max(excess, self._max_keys // 10)
            for k, _ in sorted(self._data.items(), key=lambda kv: kv[1][1])[:excess]:
                del self._data[k]
