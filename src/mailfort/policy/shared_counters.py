"""Counters that every worker process of one node shares: SQLite in WAL mode.

With ``[server] workers`` above 1 each worker has its own event loop and memory, so the
in-process ``MemoryCounters`` would give a password guesser (or a sender over its hourly
quota) N times the allowance by landing on N workers. ``SQLiteCounters`` keeps the same
fixed-window semantics in one file in the data directory: each operation is one short
statement (an UPSERT with RETURNING for ``incr``; for ``reserve`` the same UPSERT whose
update is conditional on the limit, so the check and the count are one write under SQLite's
lock, whichever process asks), so a worker holds the write lock for microseconds. The counts
need not survive a crash of the machine (a lost brute-force count after a power cut is
harmless), so the file is not fsynced (``synchronous = OFF``).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mailfort.policy.counters import Entry

SWEEP_EVERY = 1000  # incr calls between sweeps of expired keys


def open_shared_db(path: Path) -> sqlite3.Connection:
    """A connection for one process (shared by its threads under the caller's lock)."""
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    return conn


class SQLiteCounters:
    """Fixed-window counters in ``path``, shared by every process that opens it.

    The clock is ``time.monotonic`` by default: on Linux it is one clock for the whole
    machine, so every worker reads the same expiry. Keys are bounded as in
    ``MemoryCounters`` (``max_keys``): expired keys are swept, then the soonest to expire.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 1_000_000) -> None:
        if max_keys <= 0:
            raise ValueError("max_keys must be positive")
        self._clock = clock
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._conn = open_shared_db(path)
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS counters "
            "(key TEXT PRIMARY KEY, count INTEGER NOT NULL, expires REAL NOT NULL)"
            " WITHOUT ROWID")
        self._since_sweep = 0
        self._sweep_every = min(SWEEP_EVERY, max(1, max_keys // 10))

    def incr(self, key: str, window: float) -> int:
        if window <= 0:
            raise ValueError("window must be positive")
        now = self._clock()
        with self._lock:
            self._maybe_sweep(now)
            row = self._conn.execute(
                "INSERT INTO counters(key, count, expires) VALUES (?1, 1, ?2 + ?3) "
                "ON CONFLICT(key) DO UPDATE SET "
                "count = CASE WHEN expires <= ?2 THEN 1 ELSE count + 1 END, "
                "expires = CASE WHEN expires <= ?2 THEN ?2 + ?3 ELSE expires END "
                "RETURNING count", (key, now, window)).fetchone()
        return int(row[0])

    def reserve(self, key: str, limit: int, window: float) -> bool:
        if window <= 0:
            raise ValueError("window must be positive")
        if limit <= 0:
            return False
        now = self._clock()
        with self._lock:
            self._maybe_sweep(now)
            # A live row at the limit is left alone: DO UPDATE ... WHERE is false, and
            # RETURNING gives no row. One statement: no other process runs between.
            row = self._conn.execute(
                "INSERT INTO counters(key, count, expires) VALUES (?1, 1, ?2 + ?3) "
                "ON CONFLICT(key) DO UPDATE SET "
                "count = CASE WHEN expires <= ?2 THEN 1 ELSE count + 1 END, "
                "expires = CASE WHEN expires <= ?2 THEN ?2 + ?3 ELSE expires END "
                "WHERE expires <= ?2 OR count < ?4 "
                "RETURNING count", (key, now, window, limit)).fetchone()
        return row is not None

    def release(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self._conn.execute(
                "UPDATE counters SET count = max(0, count - ?3) "
                "WHERE key = ?1 AND expires > ?2 AND count > 0", (key, self._clock(), amount))

    def get(self, key: str) -> int:
        with self._lock:
            row = self._conn.execute(
                "SELECT count FROM counters WHERE key = ? AND expires > ?",
                (key, self._clock())).fetchone()
        return 0 if row is None else int(row[0])

    def ttl(self, key: str) -> float:
        """Seconds until the key expires, 0.0 when absent or expired."""
        now = self._clock()
        with self._lock:
            row = self._conn.execute(
                "SELECT expires FROM counters WHERE key = ?", (key,)).fetchone()
        return 0.0 if row is None else max(0.0, float(row[0]) - now)

    def reset(self, key: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM counters WHERE key = ?", (key,))

    def entries(self, prefix: str) -> list[Entry]:
        """The live keys that start with ``prefix`` (``mailfort block list``)."""
        now = self._clock()
        with self._lock:
            rows = self._conn.execute(
                "SELECT key, count, expires FROM counters "
                "WHERE substr(key, 1, length(?1)) = ?1 AND expires > ?2", (prefix, now))
            return [Entry(str(k), int(c), float(exp) - now) for k, c, exp in rows]

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM counters").fetchone()[0])

    def _maybe_sweep(self, now: float) -> None:
        """Called with the lock held before a write that may add a key."""
        self._since_sweep += 1
        if self._since_sweep >= self._sweep_every:
            self._since_sweep = 0
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Called with the lock held: drop expired keys, then a tenth if still too many."""
        self._conn.execute("DELETE FROM counters WHERE expires <= ?", (now,))
        (n,) = self._conn.execute("SELECT count(*) FROM counters").fetchone()
        if n >= self._max_keys:
            self._conn.execute(
                "DELETE FROM counters WHERE key IN (SELECT key FROM counters "
                "ORDER BY expires LIMIT ?)", (max(n - self._max_keys + 1,
                                                  self._max_keys // 10),))

    def close(self) -> None:
        with self._lock:
            self._conn.close()
