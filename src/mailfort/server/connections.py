"""Connection accounting for a whole node: limits in all and per client, over every listener.

One ``ConnectionLimiter`` serves every listener of a node (MX, submission, POP3…), so
``max_connections`` and ``max_connections_per_ip`` are the node's real caps, not per-port
ones. A client is counted under ``client_key`` (its IPv4 address or IPv6 /64), the same
identity that the brute-force protection counts failures under. Beside the concurrency
caps, an optional rate (new connections per client per minute) stops a client that opens
and closes connections in a loop, which a concurrency cap never sees.

Clients in ``limits.connection_limit_exceptions`` (by default loopback and
``relay.trusted_networks``: our own hosts, as Postfix exempts ``$mynetworks``) are not held
to the per-client cap or rate; they count toward ``max_connections`` like any other.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import mmap
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from enum import Enum
from pathlib import Path

from mailfort.policy.counters import CounterStore, MemoryCounters, client_key

RATE_WINDOW = 60.0  # seconds: the rate limit counts connections per minute
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
# Open and waiting connections of a node from which its workers share them out evenly
# (``SharedConnectionLimiter.share_left``); below, the first worker takes them all.
BALANCE_AT = 4
_MAX_REMEMBERED = 4096  # addresses whose exemption is remembered (then forgotten at once)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def limit_exceptions(entries: Iterable[str], trusted_networks: Iterable[str]) -> tuple[
        Network, ...]:
    """The networks of ``limits.connection_limit_exceptions`` (validated by config):
    "loopback" and "trusted_networks" stand for those networks."""
    out: list[Network] = []
    for entry in entries:
        if entry == "loopback":
            out.extend(LOOPBACK)
        elif entry == "trusted_networks":
            out.extend(ipaddress.ip_network(n, strict=False) for n in trusted_networks)
        else:
            out.append(ipaddress.ip_network(entry, strict=False))
    return tuple(out)


class Exemptions:
    """Whether a client address is in the exceptions, remembered per address (asked at
    every connection and at its end; the answer for an address never changes, so the
    release always undoes exactly what the admission counted)."""

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(networks)
        self._known: dict[str, bool] = {}

    def __call__(self, ip: str) -> bool:
        if not self.networks:
            return False
        known = self._known.get(ip)
        if known is None:
            try:
                addr = ipaddress.ip_address(ip.strip("[]").split("%", 1)[0])
            except ValueError:
                known = False
            else:
                if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                    addr = addr.ipv4_mapped
                known = any(addr.version == n.version and addr in n for n in self.networks)
            if len(self._known) >= _MAX_REMEMBERED:
                self._known.clear()
            self._known[ip] = known
        return known


class Admission(Enum):
    OK = "ok"
    TOO_MANY = "too many connections"
    TOO_MANY_FROM_IP = "too many connections from this address"
    RATE_FROM_IP = "connection rate limit exceeded for this address"


class ConnectionLimiter:
    """Counts admitted connections; refusals are answered at greeting, then closed."""

    def __init__(
        self,
        max_total: int,
        max_per_ip: int,
        *,
        rate_per_minute: int = 0,
        counters: CounterStore | None = None,
        exempt: Iterable[Network] = (),
    ) -> None:
        """``rate_per_minute`` 0: no rate limit. Every attempt counts toward the rate,
        refused ones included, so hammering does not earn fresh slots. ``exempt``: the
        networks not held to the per-client cap and rate (``limit_exceptions``)."""
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.rate_per_minute = rate_per_minute
        self.counters: CounterStore = counters if counters is not None else MemoryCounters()
        self.exempt = Exemptions(exempt)
        self.total = 0
        self.per_client: Counter[str] = Counter()  # client_key -> open connections

    def admit(self, ip: str) -> Admission:
        if self.exempt(ip):
            if self.total >= self.max_total:
                return Admission.TOO_MANY
            self.total += 1
            return Admission.OK
        key = client_key(ip)
        if self.rate_per_minute > 0:
            rate = self.counters.incr(f"connrate:{key}", RATE_WINDOW)
            if rate > self.rate_per_minute:
                return Admission.RATE_FROM_IP
        if self.total >= self.max_total:
            return Admission.TOO_MANY
        if self.per_client[key] >= self.max_per_ip:
            return Admission.TOO_MANY_FROM_IP
        self.total += 1
        self.per_client[key] += 1
        return Admission.OK

    def release(self, ip: str) -> None:
        """Undo one ``admit(ip)`` that returned OK."""
        self.total -= 1
        if self.exempt(ip):
            return
        key = client_key(ip)
        self.per_client[key] -= 1
        if self.per_client[key] <= 0:
            del self.per_client[key]


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


class ConnectionTable:
    """Open connections of a node's worker processes, in memory they all share.

    The supervisor makes one before it forks (an anonymous shared mapping, inherited by every
    worker and every replacement). Each worker slot owns a row: its number of open
    connections, then a count per bucket of clients. A client's bucket is a keyed hash of its
    ``client_key`` (key drawn at each start), so the per-client cap is checked against the
    sum of one bucket over all rows: a few memory reads per connection where a database
    would cost two write transactions (issue 12 measured a tenth of a worker's time in them).

    The price of buckets: two clients in one bucket share its cap. With 65,536 buckets and at
    most ``max_connections`` open, a client is refused early only when it happens to share
    a bucket with one that is at its cap; nobody can aim for that without the key.
    """

    BUCKETS = 1 << 16
    _ITEM = 4  # bytes per count (unsigned 32-bit)

    def __init__(self, slots: int, lock_path: Path) -> None:
        """``lock_path``: a file that serialises admissions (each user opens it itself:
        ``flock`` belongs to an open file, and the kernel drops it when a worker dies)."""
        self.slots = slots
        self.lock_path = lock_path
        self._row = 1 + self.BUCKETS  # items: the slot's total, then its buckets
        self._mem = mmap.mmap(-1, slots * self._row * self._ITEM)  # MAP_SHARED
        self.counts = memoryview(self._mem).cast("I")
        self._key = os.urandom(16)

    def bucket(self, key: str) -> int:
        digest = hashlib.blake2b(key.encode(), digest_size=4, key=self._key).digest()
        return int.from_bytes(digest, "little") % self.BUCKETS

    def total_at(self) -> list[int]:
        """Offsets of every slot's total."""
        return [s * self._row for s in range(self.slots)]

    def bucket_at(self, bucket: int) -> list[int]:
        """Offsets of ``bucket`` in every slot's row."""
        return [s * self._row + 1 + bucket for s in range(self.slots)]

    def clear(self, slot: int) -> None:
        """Forget what ``slot`` counted (its worker died or stopped)."""
        with flocked(self.lock_path):
            start = slot * self._row * self._ITEM
            self._mem[start:start + self._row * self._ITEM] = bytes(self._row * self._ITEM)


class SharedConnectionLimiter:
    """``ConnectionLimiter`` for one worker of a node: the caps count every worker's
    connections (``ConnectionTable``). Admissions take the table's lock, so the caps are
    exact across workers; a worker writes only its own row, so a crash never leaves phantom
    connections counted once the supervisor has cleared that row (``clear``, at reaping,
    and ``reset_slot`` when the replacement starts)."""

    def __init__(self, table: ConnectionTable, slot: int, max_total: int, max_per_ip: int,
                 *, rate_per_minute: int = 0, counters: CounterStore | None = None,
                 exempt: Iterable[Network] = ()) -> None:
        """``rate_per_minute``, ``counters``, ``exempt``: as for ``ConnectionLimiter``;
        pass the node's shared counters so that the rate holds over every worker."""
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.rate_per_minute = rate_per_minute
        self.counters: CounterStore = counters if counters is not None else MemoryCounters()
        self.exempt = Exemptions(exempt)
        self.slot = slot
        # Called after a release (on the loop): the acceptors' deferrals end (acceptor.py)
        self.released: Callable[[], None] | None = None
        self._table = table
        self._counts = table.counts
        self._totals = table.total_at()
        self._my_total = self._totals[slot]
        self._lock = os.open(table.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def reset_slot(self) -> None:
        """Forget what this slot counted (its previous worker died or stopped)."""
        self._table.clear(self.slot)

    @property
    def total(self) -> int:
        """The node's open connections (read without the lock: for stress mode, which
        only compares it with a threshold, a count one admission old is as good)."""
        counts = self._counts
        return sum(counts[i] for i in self._totals)

    def share_left(self, waiting: int, workers: int) -> int:
        """How many of the ``waiting`` connections this worker should accept now: all of
        them while the node is quiet (one client alone stays on one worker with warm
        caches, server/acceptor.py), else what brings it up to an even share of the
        node's connections, those waiting included, over its ``workers``, with a
        quarter's slack (0: leave them to the others).

        Why the slack: short sessions (a connection per message) come and go faster than
        the counts settle, so an exact share has every worker see itself one over it now
        and then, and wait for the others for nothing: 10 such senders ran at half their
        rate (0.49x Postfix against 1.25x) until a worker had to be clearly over its share
        to leave connections to the others (bench/RESULTS.md, 2026-12-08)."""
        counts = self._counts
        total = sum(counts[i] for i in self._totals)
        if total + waiting < BALANCE_AT:
            return max(waiting, 1)
        share = -(-(total + waiting) // max(1, workers))
        return share + max(1, share // 4) - counts[self._my_total]

    def admit(self, ip: str) -> Admission:
        at: list[int] | None = None  # the client's bucket in every row; None: exempt
        if not self.exempt(ip):
            key = client_key(ip)
            if self.rate_per_minute > 0:
                rate = self.counters.incr(f"connrate:{key}", RATE_WINDOW)
                if rate > self.rate_per_minute:
                    return Admission.RATE_FROM_IP
            at = self._table.bucket_at(self._table.bucket(key))
        counts = self._counts
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            if sum(counts[i] for i in self._totals) >= self.max_total:
                return Admission.TOO_MANY
            if at is not None:
                if sum(counts[i] for i in at) >= self.max_per_ip:
                    return Admission.TOO_MANY_FROM_IP
                counts[at[self.slot]] += 1
            counts[self._my_total] += 1
            return Admission.OK
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    def release(self, ip: str) -> None:
        """Undo one ``admit(ip)`` that returned OK. Only this worker writes its row, and a
        reader sees each count whole, so no lock: an admission that reads the count just
        before this store is one that would have raced with the release anyway."""
        counts = self._counts
        if not self.exempt(ip):
            mine = self._table.bucket_at(self._table.bucket(client_key(ip)))[self.slot]
            if counts[mine] > 0:  # 0 only after a reset_slot while it was open
                counts[mine] -= 1
        if counts[self._my_total] > 0:
            counts[self._my_total] -= 1
        if self.released is not None:
            self.released()

    def close(self) -> None:
        os.close(self._lock)


@contextlib.contextmanager
def flocked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (made if missing) for the block: the tables shared
    between worker processes change under it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
