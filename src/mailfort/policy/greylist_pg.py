"""Greylisting state in the shared PostgreSQL database, for several nodes behind one MX.

A sender's retry may reach another node than its first attempt did: with one triplet
store per node it would be deferred again there. The rules are those of ``greylist.py``
(same settings, same outcomes); only the store differs. Each check is one transaction
that locks the triplet's row (``FOR UPDATE``), so two nodes deciding the same triplet at
once see each other's writes; a first attempt seen by two nodes at once is one insert
(``ON CONFLICT``). The tables come with the directory's schema (``mailfort db migrate``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mailfort.policy.greylist import EXPIRE_EVERY, GreylistSettings, Outcome, client_network

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool


class PostgreSQLGreylist:
    """``GreylistStore`` over PostgreSQL; thread-safe (the server calls it off the loop)."""

    def __init__(self, pool: ConnectionPool[Any], settings: GreylistSettings, *,
                 clock: Callable[[], float] = time.time) -> None:
        """``pool``: the PostgreSQL directory's (it is not closed here)."""
        self._pool = pool
        self.settings = settings
        self.clock = clock
        self._checks = 0

    def check(self, client_ip: str, sender: str, recipient: str) -> Outcome:
        self._checks += 1
        if self._checks % EXPIRE_EVERY == 1:
            self.expire()
        return self._check(client_ip, sender, recipient)

    def _check(self, client_ip: str, sender: str, recipient: str) -> Outcome:
        s = self.settings
        net = client_network(client_ip)
        key = (net, sender.lower(), recipient.lower())
        now = self.clock()
        with self._pool.connection() as conn, conn.transaction():
            row = conn.execute("SELECT passes, last_seen FROM greylist_networks "
                               "WHERE network = %s FOR UPDATE", (net,)).fetchone()
            if (s.auto_allow_after > 0 and row is not None and row[0] >= s.auto_allow_after
                    and now - row[1] <= s.pass_lifetime):
                conn.execute("UPDATE greylist_networks SET last_seen = %s WHERE network = %s",
                             (now, net))
                return Outcome.ALLOWED
            row = conn.execute(
                "SELECT first_seen, last_seen, passed FROM greylist_triplets"
                " WHERE network = %s AND sender = %s AND recipient = %s FOR UPDATE",
                key).fetchone()
            where = " WHERE network = %s AND sender = %s AND recipient = %s"
            if row is not None:
                first, last, passed = row
                if passed and now - last <= s.pass_lifetime:
                    conn.execute("UPDATE greylist_triplets SET last_seen = %s" + where,
                                 (now, *key))
                    return Outcome.PASS
                if not passed and s.delay <= now - first <= s.retry_window:
                    conn.execute("UPDATE greylist_triplets SET last_seen = %s, passed = true"
                                 + where, (now, *key))
                    conn.execute(
                        "INSERT INTO greylist_networks (network, passes, last_seen)"
                        " VALUES (%s, 1, %s) ON CONFLICT (network) DO UPDATE"
                        " SET passes = greylist_networks.passes + 1, last_seen = %s",
                        (net, now, now))
                    return Outcome.PASS
                if not passed and now - first < s.delay:
                    conn.execute("UPDATE greylist_triplets SET last_seen = %s" + where,
                                 (now, *key))
                    return Outcome.DEFER
            # Unknown, expired, or retried too late: start over.
            if row is not None:
                conn.execute("UPDATE greylist_triplets SET first_seen = %s, last_seen = %s,"
                             " passed = false" + where, (now, now, *key))
            else:  # another node's first attempt at the same instant: the same deferral
                conn.execute(
                    "INSERT INTO greylist_triplets"
                    " (network, sender, recipient, first_seen, last_seen, passed)"
                    " VALUES (%s, %s, %s, %s, %s, false) ON CONFLICT DO NOTHING",
                    (*key, now, now))
            return Outcome.DEFER

    def expire(self) -> int:
        """Forget what no longer matters; returns how many triplets went."""
        s = self.settings
        now = self.clock()
        with self._pool.connection() as conn, conn.transaction():
            cur = conn.execute(
                "DELETE FROM greylist_triplets WHERE (NOT passed AND %s - first_seen > %s)"
                " OR (passed AND %s - last_seen > %s)",
                (now, s.retry_window, now, s.pass_lifetime))
            conn.execute("DELETE FROM greylist_networks WHERE %s - last_seen > %s",
                         (now, s.pass_lifetime))
            return cur.rowcount

    def close(self) -> None:
        """Nothing of its own to close: the pool is the directory's."""
