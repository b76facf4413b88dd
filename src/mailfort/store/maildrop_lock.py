"""The POP3 maildrop lock across nodes (RFC 1939 §8: one session per maildrop at a time).

On one node, ``POP3Mailbox`` locks the Maildir itself (an in-process set plus ``flock``),
and that stays: it is all one node needs (``NodeLocks`` adds nothing to it). Several nodes
reading one Maildir tree on a shared filesystem cannot rely on a lock file there, so with
shared counters in Redis they also take ``RedisLocks``' lease on the maildrop (the user's
canonical address) before the Maildir is opened:

* ``SET key token NX PX ttl``: one holder at a time; the token is random per session, so
  only its holder renews or releases it (compare-and-set scripts);
* renewed every ttl/3 while the session lives; a node that dies stops renewing and the
  lease ends by expiry (``TTL``), so a crashed node never keeps a maildrop locked;
* at the end of a session the value becomes ``closing:<token>`` until the Maildir is
  closed (deletions applied, new/ -> cur/), then it is deleted: a login on another node
  meanwhile waits for that (up to ``CLOSE_WAIT``) instead of being told the maildrop is in
  use, as a login on the same node waits for the local close;
* a lease that is lost (expired while Redis was unreachable, or taken over) is reported
  through ``lost``: the session then ends without applying its deletions.

Redis unreachable at login: ``LocksUnavailable`` (the session answers ``-ERR [SYS/TEMP]``):
without the lock, two nodes could hand out two numberings of one maildrop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any, Protocol

log = logging.getLogger("mailfort.pop3")

TTL = 30.0  # seconds a lease lives without renewal (how long a dead node's lock lasts)
CLOSE_WAIT = 10.0  # seconds a login waits for another node's session to finish closing
_POLL = 0.05

_RENEW = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] or v == 'closing:' .. ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_CLOSING = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], 'closing:' .. ARGV[1], 'KEEPTTL') and 1 or 0
end
return 0
"""
_RELEASE = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] or v == 'closing:' .. ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LocksUnavailable(Exception):
    """The lock service cannot be reached: whether the maildrop is free is unknown."""


class Lease(Protocol):
    lost: asyncio.Event  # set if the lease was lost while held

    async def closing(self) -> None:
        """The session ends: a login elsewhere waits for ``release`` instead of IN-USE."""

    async def release(self) -> None:
        """The Maildir is closed: the maildrop is free."""


class MaildropLocks(Protocol):
    async def acquire(self, maildrop: str) -> Lease | None:
        """A lease, or None when another session (on any node) holds the maildrop."""

    async def aclose(self) -> None: ...


class _NoLease:
    def __init__(self) -> None:
        self.lost = asyncio.Event()

    async def closing(self) -> None:
        return None

    async def release(self) -> None:
        return None


class NodeLocks:
    """One node: the Maildir's own lock (``POP3Mailbox``) is the whole lock."""

    async def acquire(self, maildrop: str) -> Lease | None:
        return _NoLease()

    async def aclose(self) -> None:
        return None


class RedisLease:
    def __init__(self, locks: RedisLocks, key: str, token: str) -> None:
        self.locks, self.key, self.token = locks, key, token
        self.lost = asyncio.Event()
        self._renewed = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._renew(), name="pop3-lease")

    async def _renew(self) -> None:
        locks = self.locks
        while True:
            await asyncio.sleep(locks.ttl / 3)
            try:
                ok = await locks.renew_script(keys=[self.key],
                                              args=[self.token, int(locks.ttl * 1000)])
            except Exception as exc:  # unreachable: the lease may still be ours; retry
                if time.monotonic() - self._renewed < locks.ttl:
                    log.warning("pop3 lease of %s not renewed (%s), retrying",
                                self.key, type(exc).__name__)
                    continue
                ok = 0
            if not ok:
                log.error("pop3 lease of %s lost: the session ends without its deletions",
                          self.key)
                self.lost.set()
                return
            self._renewed = time.monotonic()

    async def closing(self) -> None:
        with contextlib.suppress(Exception):  # best effort: only makes another login wait
            await self.locks.closing_script(keys=[self.key], args=[self.token])

    async def release(self) -> None:
        self._task.cancel()
        try:
            await self.locks.release_script(keys=[self.key], args=[self.token])
        except Exception as exc:  # it ends by expiry
            log.warning("pop3 lease of %s not released (%s): it expires within %.0fs",
                        self.key, type(exc).__name__, self.locks.ttl)


class RedisLocks:
    """Leases in Redis (``SET NX PX`` + token scripts), on redis-py's asyncio client."""

    def __init__(self, client: Any, *, prefix: str = "mailfort:", ttl: float = TTL,
                 close_wait: float = CLOSE_WAIT) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl = ttl
        self.close_wait = close_wait
        self.renew_script = client.register_script(_RENEW)
        self.closing_script = client.register_script(_CLOSING)
        self.release_script = client.register_script(_RELEASE)

    async def acquire(self, maildrop: str) -> Lease | None:
        key = f"{self.prefix}pop3-lock:{maildrop.lower()}"
        token = secrets.token_hex(16)
        deadline = time.monotonic() + self.close_wait
        try:
            while True:
                if await self.client.set(key, token, nx=True, px=int(self.ttl * 1000)):
                    return RedisLease(self, key, token)
                holder = await self.client.get(key)
                if holder is None:
                    continue  # released between the two calls
                if not str(holder).startswith("closing:") or time.monotonic() >= deadline:
                    return None
                await asyncio.sleep(_POLL)
        except Exception as exc:
            import redis.exceptions as rexc

            if isinstance(exc, rexc.ConnectionError | rexc.TimeoutError | OSError):
                raise LocksUnavailable(type(exc).__name__) from exc
            raise

    async def aclose(self) -> None:
        return None  # the client belongs to whoever made it
