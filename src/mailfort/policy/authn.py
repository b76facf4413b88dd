"""Password authentication shared by SMTP AUTH and POP3, with brute-force protection.

What an attacker must not learn or get:
- whether an account exists: an unknown user is verified against a dummy hash with the
  same argon2 parameters, gets the same delays and the same outcome (failed/blocked);
- unlimited guesses from one client: failures are counted per client (``client_key``:
  the IPv4 address, or the IPv6 /64 that one host usually holds); after
  ``delay_after_failures`` each failure is answered after a growing delay, after
  ``block_after_failures`` the client is blocked for ``block_seconds`` (even a correct
  password from it is then refused);
- fast guessing against one account from many clients: failures are also counted per
  account, and once past ``delay_after_failures`` every attempt on that account pays a
  growing delay (capped at MAX_DELAY_FACTOR x ``failure_delay``) before its password is
  checked, whatever the outcome, so that hanging up early teaches nothing. A client from
  which the account logged in within TRUSTED_CLIENT_SECONDS skips that delay;
- a way to lock the owner out: the account itself is never blocked, since anyone who
  knows an address could otherwise keep its owner out (the price: a guesser with many
  addresses is slowed per attempt, not stopped; each of its addresses is still blocked
  after ``block_after_failures``);
- parallel guesses outrunning the counts: at most MAX_PARALLEL checks per client and per
  account (for clients that have to pay the account delay) run at once;
- a stalled server: argon2 runs on a small dedicated thread pool, never on the event loop,
  and the pool size bounds the memory that concurrent hashing can take.

When the shared counters (Redis) cannot be reached, logins are refused with a temporary
error (``UNAVAILABLE``: SMTP 454 4.7.0, POP3 ``-ERR [SYS/TEMP]``) until they are back. Why
not count on this node alone meanwhile: an attacker who can make Redis unreachable (or
merely waits for an outage) would get a fresh allowance of guesses on every node, and
blocks already made on other nodes would be forgotten; a refused login costs a real user
a retry (every client retries a 4xx/[SYS/TEMP]), and the MX, which takes no password, is
not affected.

A hash made with older parameters is replaced after a successful login (the only moment
the password is at hand), in the background and only if the password is still the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from argon2 import PasswordHasher

from mailfort.config import AuthConfig
from mailfort.directory.base import Directory, lookup
from mailfort.passwords import dummy_hash, hash_password, needs_rehash, verify_password
from mailfort.policy import decisionlog
from mailfort.policy.counters import (
    Counters,
    CounterStore,
    CountersUnavailable,
    as_async,
    client_key,
)

log = logging.getLogger("mailfort.authn")

MAX_DELAY_FACTOR = 30  # the growing delay stops at 30 x failure_delay
MAX_PARALLEL = 4  # password checks in flight per client and per account
# A successful login exempts that client (client_key) from the account-level delay of that
# account for this long: the owner's own devices stay fast while the account is attacked.
TRUSTED_CLIENT_SECONDS = 30 * 24 * 3600.0


class AuthStatus(StrEnum):
    OK = "ok"
    FAILED = "failed"
    BLOCKED = "blocked"
    UNAVAILABLE = "unavailable"  # the shared counters cannot be reached: try again later


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    """``status`` compares equal to "ok" / "failed" / "blocked"; ``user`` only when ok."""

    status: AuthStatus
    user: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is AuthStatus.OK


FAILED = AuthOutcome(AuthStatus.FAILED)
BLOCKED = AuthOutcome(AuthStatus.BLOCKED)
UNAVAILABLE = AuthOutcome(AuthStatus.UNAVAILABLE)


@dataclass(frozen=True, slots=True)
class Block:
    """What ``mailfort block list`` shows: a blocked client, or an account being slowed
    down by its recent failures (accounts are never blocked, see above)."""

    kind: str  # "client" or "account"
    key: str  # client_key, or canonical account
    remaining: float  # seconds until it ends
    failures: int = 0  # accounts: failures in the window


@dataclass(frozen=True, slots=True)
class _Keys:
    """The counter keys of one attempt."""

    account: str  # canonical address, or the name as given (lowercased) when unknown
    client_fail: str
    client_block: str
    account_fail: str
    trusted: str  # this client logged in to this account recently

    @classmethod
    def of(cls, account: str, client: str) -> _Keys:
        return cls(account, f"auth-fail:ip:{client}", f"auth-block:ip:{client}",
                   f"auth-fail:user:{account}", f"auth-ok:{account}:{client}")


class Authenticator:
    """``await verify(username, password, client_ip)`` -> ``AuthOutcome``."""

    def __init__(
        self,
        directory: Directory,
        counters: Counters | CounterStore,
        auth_cfg: AuthConfig,
        *,
        hasher: PasswordHasher | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_workers: int | None = None,
    ) -> None:
        """``hasher``: argon2 parameters (tests pass cheap ones); ``sleep``: how the
        client and account delays are awaited (tests record them instead of waiting)."""
        self.directory = directory
        self.counters = as_async(counters)
        self.cfg = auth_cfg
        self.hasher = hasher
        self._dummy = dummy_hash(hasher)
        self._sleep = sleep
        # argon2-cffi's default costs 64 MiB per hash: bound the concurrency.
        workers = max_workers or max(1, min(4, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="argon2")
        self._gates: dict[str, list[Any]] = {}  # key -> [Semaphore, users of it]

    def delay_for(self, failures: int) -> float:
        """The pause that the ``failures``-th failure (of a client, or of an account) earns:
        none up to ``delay_after_failures``, then growing, capped."""
        over = failures - self.cfg.delay_after_failures
        if over <= 0:
            return 0.0
        return self.cfg.failure_delay * min(over, MAX_DELAY_FACTOR)

    async def verify(self, username: str, password: str, client_ip: str) -> AuthOutcome:
        """Check a password; every refusal is logged for fail2ban (SMTP and POP3 alike)."""
        outcome = await self._verify(username, password, client_ip)
        if outcome.status is AuthStatus.OK:
            decisionlog.auth_ok(client_ip, outcome.user or username)
        elif outcome.status is AuthStatus.FAILED:
            decisionlog.auth_failed(client_ip, username)
        elif outcome.status is AuthStatus.BLOCKED:
            decisionlog.auth_blocked(client_ip, username)
        else:
            decisionlog.auth_unavailable(client_ip, username)
        return outcome

    async def _verify(self, username: str, password: str, client_ip: str) -> AuthOutcome:
        try:
            return await self._verify_counted(username, password, client_ip)
        except CountersUnavailable:
            return UNAVAILABLE

    async def _verify_counted(self, username: str, password: str,
                              client_ip: str) -> AuthOutcome:
        k = _Keys.of(await lookup(self.directory, self._canonical, username),
                     client_key(client_ip))
        if await self.counters.get(k.client_block) > 0:
            return BLOCKED
        # The owner's recent clients are not slowed down by an attack on the account.
        trusted = await self.counters.get(k.trusted) > 0
        async with self._gate(k.client_fail):
            if not trusted:
                # Before the check and whatever its outcome; inside the client's gate, so
                # that each client pays for its own attempts, MAX_PARALLEL at a time.
                delay = self.delay_for(await self.counters.get(k.account_fail))
                if delay > 0:
                    await self._sleep(delay)
            async with contextlib.nullcontext() if trusted else self._gate(k.account_fail):
                if await self.counters.get(k.client_block) > 0:
                    return BLOCKED
                client_failures = await self.counters.get(k.client_fail)
                if client_failures >= self.cfg.block_after_failures:
                    await self._block(k)
                    return BLOCKED
                stored = await lookup(self.directory, self.directory.password_hash,
                                      username.strip())
                loop = asyncio.get_running_loop()
                matched = await loop.run_in_executor(
                    self._pool, self._check, stored or self._dummy, password
                )
                if matched and stored is not None:
                    # The account's failure count is left to expire: the owner's success
                    # must not reset an attacker's slow-down.
                    if client_failures:  # a write per login only when there is one to undo
                        await self.counters.reset(k.client_fail)
                    await self.counters.reset(k.trusted)  # a fresh window from now
                    await self.counters.incr(k.trusted, TRUSTED_CLIENT_SECONDS)
                    if needs_rehash(stored, hasher=self.hasher):
                        self._pool.submit(self._rehash, k.account, stored, password)
                    return AuthOutcome(AuthStatus.OK, k.account)
                window = self.cfg.block_seconds
                await self.counters.incr(k.account_fail, window)
                failures = await self.counters.incr(k.client_fail, window)
                if failures >= self.cfg.block_after_failures:
                    await self._block(k)
        delay = self.delay_for(failures)
        if delay > 0:
            await self._sleep(delay)
        return FAILED

    @contextlib.asynccontextmanager
    async def _gate(self, key: str) -> AsyncIterator[None]:
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = [asyncio.Semaphore(MAX_PARALLEL), 0]
        gate[1] += 1
        try:
            async with gate[0]:
                yield
        finally:
            gate[1] -= 1
            if gate[1] == 0:
                del self._gates[key]

    async def _block(self, k: _Keys) -> None:
        """Block the client; its failure count starts over for when the block ends."""
        if await self.counters.get(k.client_block) == 0:
            await self.counters.incr(k.client_block, self.cfg.block_seconds)
        await self.counters.reset(k.client_fail)

    def _check(self, password_hash: str, password: str) -> bool:
        return verify_password(password_hash, password, hasher=self.hasher)

    def _rehash(self, user: str, old_hash: str, password: str) -> None:
        upgrade = getattr(self.directory, "upgrade_password_hash", None)
        if not callable(upgrade):
            return
        try:
            if upgrade(user, old_hash, hash_password(password, hasher=self.hasher)):
                log.info("password hash of %s upgraded to the current parameters", user)
        except Exception:  # best effort: the old hash still works
            log.exception("could not upgrade the password hash of %s", user)

    async def unblock(self, target: str) -> str:
        """Forget the failures (and block) of a client address or of an account: what
        ``mailfort block remove IP|USER`` asks of the running server. Says what it did."""
        try:
            ipaddress.ip_address(target.strip("[]"))
        except ValueError:
            account = self._canonical(target)
            k = _Keys.of(account, "")
            was = await self.counters.get(k.account_fail)
            await self.counters.reset(k.account_fail)
            return f"account {account}: {was} recent failure(s) forgotten"
        client = client_key(target)
        k = _Keys.of("", client)
        blocked = await self.counters.get(k.client_block) > 0
        await self.counters.reset(k.client_block)
        await self.counters.reset(k.client_fail)
        return f"client {client}: {'block removed' if blocked else 'was not blocked'}"

    async def blocks(self) -> list[Block]:
        """The blocked clients and the slowed-down accounts, soonest to end first."""
        out = [Block("client", e.key.removeprefix("auth-block:ip:"), e.ttl)
               for e in await self.counters.entries("auth-block:ip:")]
        out += [Block("account", e.key.removeprefix("auth-fail:user:"), e.ttl, e.count)
                for e in await self.counters.entries("auth-fail:user:")
                if e.count > self.cfg.delay_after_failures]
        return sorted(out, key=lambda b: b.remaining)

    def _canonical(self, username: str) -> str:
        canonical = getattr(self.directory, "canonical_user", None)
        found = canonical(username.strip()) if callable(canonical) else None
        return found if isinstance(found, str) else username.strip().lower()

    def close(self) -> None:
        """Stop the hashing threads (idle threads are also reaped at interpreter exit)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
