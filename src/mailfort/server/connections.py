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
import sqlite3
import threading
from collections import Counter
from enum import Enum
from pathlib import Path

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


# Per client and worker slot (looked up by client at each admission), and per slot (the
# node's total is the sum of a few rows, not of one row per client).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS connections (client TEXT NOT NULL, slot INTEGER NOT NULL,
    n INTEGER NOT NULL, PRIMARY KEY (client, slot)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS slot_totals (slot INTEGER PRIMARY KEY, n INTEGER NOT NULL);
"""


def _clear(conn: sqlite3.Connection, slot: int) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DELETE FROM connections WHERE slot = ?", (slot,))
        conn.execute("DELETE FROM slot_totals WHERE slot = ?", (slot,))
    finally:
        conn.execute("COMMIT")


class SharedConnectionLimiter:
    """``ConnectionLimiter`` for a node of several worker processes: one count for all.

    Each worker keeps its own rows (``slot``, client) in a table of the node's shared
    SQLite file, so the caps are checked against the sum over every worker in one short
    write transaction. A worker that dies cannot release its connections: its slot's rows
    are cleared when the supervisor reaps it and again when its replacement starts
    (``reset_slot``), so a crash never leaves phantom connections counted.
    """

    def __init__(self, path: Path, slot: int, max_total: int, max_per_ip: int, *,
                 rate_per_minute: int = 0, counters: CounterStore | None = None) -> None:
        """``rate_per_minute``, ``counters``: as for ``ConnectionLimiter``; pass the
        node's shared counters so that the rate holds over every worker."""
        from mailfort.policy.shared_counters import open_shared_db

        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.rate_per_minute = rate_per_minute
        self.counters: CounterStore = counters if counters is not None else MemoryCounters()
        self.slot = slot
        self._lock = threading.Lock()
        self._conn = open_shared_db(path)
        self._conn.executescript(_SCHEMA)

    def reset_slot(self) -> None:
        """Forget what this slot counted (its previous worker died or stopped)."""
        with self._lock:
            _clear(self._conn, self.slot)

    @property
    def total(self) -> int:
        with self._lock:
            (n,) = self._conn.execute("SELECT coalesce(sum(n), 0) FROM slot_totals").fetchone()
        return int(n)

    def admit(self, ip: str) -> Admission:
        key = client_key(ip)
        if self.rate_per_minute > 0:
            rate = self.counters.incr(f"connrate:{key}", RATE_WINDOW)
            if rate > self.rate_per_minute:
                return Admission.RATE_FROM_IP
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                (total,) = c.execute("SELECT coalesce(sum(n), 0) FROM slot_totals").fetchone()
                if total >= self.max_total:
                    return Admission.TOO_MANY
                (mine,) = c.execute("SELECT coalesce(sum(n), 0) FROM connections "
                                    "WHERE client = ?", (key,)).fetchone()
                if mine >= self.max_per_ip:
                    return Admission.TOO_MANY_FROM_IP
                c.execute("INSERT INTO connections(client, slot, n) VALUES (?, ?, 1) "
                          "ON CONFLICT(client, slot) DO UPDATE SET n = n + 1",
                          (key, self.slot))
                c.execute("INSERT INTO slot_totals(slot, n) VALUES (?, 1) "
                          "ON CONFLICT(slot) DO UPDATE SET n = n + 1", (self.slot,))
                return Admission.OK
            finally:
                c.execute("COMMIT")

    def release(self, ip: str) -> None:
        """Undo one ``admit(ip)`` that returned OK."""
        key = client_key(ip)
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                c.execute("UPDATE connections SET n = n - 1 WHERE client = ? AND slot = ?",
                          (key, self.slot))
                c.execute("DELETE FROM connections WHERE client = ? AND slot = ? AND n <= 0",
                          (key, self.slot))
                c.execute("UPDATE slot_totals SET n = n - 1 WHERE slot = ?", (self.slot,))
            finally:
                c.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def clear_slot(path: Path, slot: int) -> None:
    """The supervisor's cleanup after reaping the worker of ``slot``."""
    from mailfort.policy.shared_counters import open_shared_db

    conn = open_shared_db(path)
    try:
        conn.executescript(_SCHEMA)
        _clear(conn, slot)
    finally:
        conn.close()
