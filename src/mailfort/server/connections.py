"""Connection accounting for a whole node: limits in all and per client, over every listener.

One ``ConnectionLimiter`` serves every listener of a node (MX, submission, POP3…), so
``max_connections`` and ``max_connections_per_ip`` are the node's real caps, not per-port
ones. A client is counted under ``client_key`` (its IPv4 address or IPv6 /64), the same
identity that the brute-force protection counts failures under. Beside the concurrency
caps, an optional rate (new connections per client per minute) stops a client that opens
and closes connections in a loop, which a concurrency cap never sees.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from enum import Enum

from mailfort.policy.counters import CounterStore, MemoryCounters, client_key

RATE_WINDOW = 60.0  # seconds: the rate limit counts connections per minute


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
    ) -> None:
        """``rate_per_minute`` 0: no rate limit. Every attempt counts toward the rate,
        refused ones included, so hammering does not earn fresh slots."""
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.rate_per_minute = rate_per_minute
        self.counters: CounterStore = counters if counters is not None else MemoryCounters()
        self.total = 0
        self.per_client: Counter[str] = Counter()  # client_key -> open connections

    def admit(self, ip: str) -> Admission:
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
        key = client_key(ip)
        self.total -= 1
        self.per_client[key] -= 1
        if self.per_client[key] <= 0:
            del self.per_client[key]


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False
