"""Password authentication shared by SMTP AUTH and POP3, with brute-force protection.

What an attacker must not learn or get:
- whether an account exists: an unknown user is verified against a dummy hash with the
  same argon2 parameters, gets the same delay and the same outcome (failed/blocked);
- unlimited guesses: at most MAX_PARALLEL checks per IP and per account run at once;
  failures are counted per client IP (IPv6 per /64, which one host
  usually holds) and per account; after ``delay_after_failures`` each failure is answered
  after a growing delay, after ``block_after_failures`` the IP or account is blocked for
  ``block_seconds`` (even a correct password is then refused);
- a stalled server: argon2 runs on a small dedicated thread pool, never on the event loop,
  and the pool size bounds the memory that concurrent hashing can take.

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
from mailfort.directory.base import Directory
from mailfort.passwords import dummy_hash, hash_password, needs_rehash, verify_password
from mailfort.policy.counters import Counters

log = logging.getLogger("mailfort.authn")

MAX_DELAY_FACTOR = 30  # the growing delay stops at 30 x failure_delay
MAX_PARALLEL = 4  # password checks in flight per client IP and per account


class AuthStatus(StrEnum):
    OK = "ok"
    FAILED = "failed"
    BLOCKED = "blocked"


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


def ip_key(client_ip: str) -> str:
    """The counter identity of a client: the address, or its /64 for IPv6."""
    try:
        ip = ipaddress.ip_address(client_ip.strip("[]"))
    except ValueError:
        return client_ip
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Authenticator:
    """``await verify(username, password, client_ip)`` -> ``AuthOutcome``."""

    def __init__(
        self,
        directory: Directory,
        counters: Counters,
        auth_cfg: AuthConfig,
        *,
        hasher: PasswordHasher | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_workers: int | None = None,
    ) -> None:
        """``hasher``: argon2 parameters (tests pass cheap ones); ``sleep``: how the
        failure delay is awaited (tests record it instead of waiting)."""
        self.directory = directory
        self.counters = counters
        self.cfg = auth_cfg
        self.hasher = hasher
        self._dummy = dummy_hash(hasher)
        self._sleep = sleep
        # argon2-cffi's default costs 64 MiB per hash: bound the concurrency.
        workers = max_workers or max(1, min(4, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="argon2")
        self._gates: dict[str, list[Any]] = {}  # key -> [Semaphore, users of it]

    def _keys(self, username: str, client_ip: str) -> tuple[str, str, str, str]:
        account = username.strip().lower()
        ip = ip_key(client_ip)
        return (f"auth-fail:ip:{ip}", f"auth-fail:user:{account}",
                f"auth-block:ip:{ip}", f"auth-block:user:{account}")

    def is_blocked(self, username: str, client_ip: str) -> bool:
        _, _, block_ip, block_user = self._keys(username, client_ip)
        return self.counters.get(block_ip) > 0 or self.counters.get(block_user) > 0

    def delay_for(self, failures: int) -> float:
        """The pause before answering the ``failures``-th consecutive failure."""
        over = failures - self.cfg.delay_after_failures
        if over <= 0:
            return 0.0
        return self.cfg.failure_delay * min(over, MAX_DELAY_FACTOR)

    async def verify(self, username: str, password: str, client_ip: str) -> AuthOutcome:
        fail_ip, fail_user, block_ip, block_user = self._keys(username, client_ip)
        # At most MAX_PARALLEL checks per IP and per account are in flight: parallel
        # guesses cannot outrun the failure count by more than that, and a busy legitimate
        # client (many sessions logging in at once) is not mistaken for a guesser.
        async with self._gate(fail_ip), self._gate(fail_user):
            if self.counters.get(block_ip) > 0 or self.counters.get(block_user) > 0:
                return BLOCKED
            before = max(self.counters.get(fail_ip), self.counters.get(fail_user))
            if before >= self.cfg.block_after_failures:
                self._block(fail_ip, block_ip, fail_user, block_user)
                return BLOCKED
            stored = self.directory.password_hash(username.strip())
            loop = asyncio.get_running_loop()
            matched = await loop.run_in_executor(
                self._pool, self._check, stored or self._dummy, password
            )
            if matched and stored is not None:
                self.counters.reset(fail_ip)
                self.counters.reset(fail_user)
                user = self._canonical(username)
                if needs_rehash(stored, hasher=self.hasher):
                    self._pool.submit(self._rehash, user, stored, password)
                return AuthOutcome(AuthStatus.OK, user)
            window = self.cfg.block_seconds
            failures = max(
                self.counters.incr(fail_ip, window), self.counters.incr(fail_user, window)
            )
            if failures >= self.cfg.block_after_failures:
                self._block(fail_ip, block_ip, fail_user, block_user)
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

    def _block(self, fail_ip: str, block_ip: str, fail_user: str, block_user: str) -> None:
        """Block whichever identity crossed the line; its failure count starts over."""
        for fail_key, block_key in ((fail_ip, block_ip), (fail_user, block_user)):
            if self.counters.get(fail_key) >= self.cfg.block_after_failures:
                if self.counters.get(block_key) == 0:
                    self.counters.incr(block_key, self.cfg.block_seconds)
                self.counters.reset(fail_key)

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

    def _canonical(self, username: str) -> str:
        canonical = getattr(self.directory, "canonical_user", None)
        found = canonical(username.strip()) if callable(canonical) else None
        return found if isinstance(found, str) else username.strip().lower()

    def close(self) -> None:
        """Stop the hashing threads (idle threads are also reaped at interpreter exit)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
