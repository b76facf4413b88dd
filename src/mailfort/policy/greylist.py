"""Greylisting (RFC 6647): a first attempt from an unknown source is deferred, a retry passes.

A real MTA queues and retries a ``451``; much bulk software does not. The source is the
triplet (client network, sender, recipient), the network being the client's IPv4 /24 or
IPv6 /64 so that a sender's pool of outbound hosts counts as one (RFC 6647 §4.2). A triplet
passes once ``delay`` seconds have gone since its first attempt and the retry came within
``retry_window``; a passed triplet then passes at once for ``pass_lifetime`` after its last
use. A client network with ``auto_allow_after`` passed triplets is trusted as a whole for
``pass_lifetime`` (§6: spare well-behaved senders the delay on each new correspondent).

The state is an SQLite file in the data directory, so a restart forgets nothing (a sender
retrying after it must not be deferred all over again). Its writes are not fsynced: losing
the last seconds in a crash only means one more deferral.
"""

from __future__ import annotations

import ipaddress
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

from mailfort.protocol.replies import Reply

EXPIRE_EVERY = 1000  # checks between two sweeps of stale triplets
GREYLISTED = Reply(451, "4.7.1", "Greylisted, please try again later")


class Outcome(Enum):
    DEFER = "defer"  # unknown or too early: 451 4.7.1
    PASS = "pass"  # a retry after the delay, or a known triplet
    ALLOWED = "allowed"  # the client network is auto-allowed


@dataclass(frozen=True)
class GreylistSettings:
    delay: float = 300.0
    retry_window: float = 2 * 86400.0
    pass_lifetime: float = 36 * 86400.0
    auto_allow_after: int = 5  # 0: never auto-allow a network


def client_network(ip: str) -> str:
    """The client's /24 (IPv4) or /64 (IPv6); an IPv4-mapped address is IPv4."""
    try:
        addr = ipaddress.ip_address(ip.strip("[]").split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        else:
            return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(ipaddress.IPv4Network((addr, 24), strict=False))


class GreylistStore(Protocol):
    """What the MX needs of a greylist; ``Greylist`` (SQLite) is the embedded one, and
    several nodes can later share one behind this interface."""

    def check(self, client_ip: str, sender: str, recipient: str) -> Outcome: ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS triplets (
    network TEXT NOT NULL, sender TEXT NOT NULL, recipient TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, passed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (network, sender, recipient)
);
CREATE TABLE IF NOT EXISTS networks (
    network TEXT PRIMARY KEY, passes INTEGER NOT NULL, last_seen REAL NOT NULL
);
"""


class Greylist:
    """The triplet store and its decision; thread-safe (the server calls it off the loop)."""

    def __init__(
        self,
        path: Path,
        settings: GreylistSettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Wall-clock time: the state outlives the process.
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._checks = 0

    def check(self, client_ip: str, sender: str, recipient: str) -> Outcome:
        """Record this attempt and decide it; now and then, forget stale triplets (a
        sender that never retries must not grow the file for ever)."""
        self._checks += 1
        if self._checks % EXPIRE_EVERY == 1:
            self.expire()
        return self._check(client_ip, sender, recipient)

    def _check(self, client_ip: str, sender: str, recipient: str) -> Outcome:
        s = self.settings
        net = client_network(client_ip)
        key = (net, sender.lower(), recipient.lower())
        now = self.clock()
        with self._lock, self._db:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT passes, last_seen FROM networks WHERE network=?",
                             (net,)).fetchone()
            if (s.auto_allow_after > 0 and row is not None and row[0] >= s.auto_allow_after
                    and now - row[1] <= s.pass_lifetime):
                db.execute("UPDATE networks SET last_seen=? WHERE network=?", (now, net))
                return Outcome.ALLOWED
            row = db.execute(
                "SELECT first_seen, last_seen, passed FROM triplets"
                " WHERE network=? AND sender=? AND recipient=?", key).fetchone()
            if row is not None:
                first, last, passed = row
                if passed and now - last <= s.pass_lifetime:
                    db.execute("UPDATE triplets SET last_seen=? WHERE network=? AND sender=?"
                               " AND recipient=?", (now, *key))
                    return Outcome.PASS
                if not passed and s.delay <= now - first <= s.retry_window:
                    db.execute("UPDATE triplets SET last_seen=?, passed=1 WHERE network=?"
                               " AND sender=? AND recipient=?", (now, *key))
                    db.execute(
                        "INSERT INTO networks (network, passes, last_seen) VALUES (?, 1, ?)"
                        " ON CONFLICT(network) DO UPDATE SET passes=passes+1, last_seen=?",
                        (net, now, now))
                    return Outcome.PASS
                if not passed and now - first < s.delay:
                    # Too early: the clock keeps running from the first attempt.
                    db.execute("UPDATE triplets SET last_seen=? WHERE network=? AND sender=?"
                               " AND recipient=?", (now, *key))
                    return Outcome.DEFER
            # Unknown, expired, or retried too late: start over.
            db.execute(
                "INSERT OR REPLACE INTO triplets"
                " (network, sender, recipient, first_seen, last_seen, passed)"
                " VALUES (?, ?, ?, ?, ?, 0)", (*key, now, now))
            return Outcome.DEFER

    def expire(self) -> int:
        """Forget what no longer matters; returns how many triplets went."""
        s = self.settings
        now = self.clock()
        with self._lock, self._db:
            cur = self._db.execute(
                "DELETE FROM triplets WHERE (passed=0 AND ? - first_seen > ?)"
                " OR (passed=1 AND ? - last_seen > ?)",
                (now, s.retry_window, now, s.pass_lifetime))
            self._db.execute("DELETE FROM networks WHERE ? - last_seen > ?",
                             (now, s.pass_lifetime))
            return cur.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
