"""The Authenticator over a real SQLite directory with real (cheap) argon2."""

from __future__ import annotations

import asyncio
import contextlib
import poplib
import smtplib
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from mailfort.config import AuthConfig, Config
from mailfort.directory.sqlite import SQLiteDirectory
from mailfort.passwords import hash_password
from mailfort.policy.authn import (
    MAX_DELAY_FACTOR,
    MAX_PARALLEL,
    Authenticator,
    AuthOutcome,
    AuthStatus,
)
from mailfort.policy.counters import MemoryCounters
from mailfort.server.app import Node
from tests.conftest import seed_directory

CHEAP = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
CFG = AuthConfig(delay_after_failures=2, block_after_failures=5, block_seconds=60.0,
                 failure_delay=0.5)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.directory = SQLiteDirectory(tmp_path / "directory.sqlite3")
        self.directory.add_domain("example.test")
        self.directory.add_user("alice@example.test", hash_password("alice-pw", hasher=CHEAP))
        self.clock = Clock()
        self.counters = MemoryCounters(clock=self.clock)
        self.sleeps: list[float] = []
        self.auth = Authenticator(self.directory, self.counters, CFG, hasher=CHEAP,
                                  sleep=self._sleep)

    async def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


async def test_success_gives_canonical_user(rig: Rig) -> None:
    out = await rig.auth.verify("Alice@Example.TEST", "alice-pw", "192.0.2.1")
    assert out == AuthOutcome(AuthStatus.OK, "alice@example.test")
    assert out.ok and out.status == "ok"
    assert rig.sleeps == []


async def test_unknown_user_and_wrong_password_look_the_same(rig: Rig, tmp_path: Path) -> None:
    wrong = [await rig.auth.verify("alice@example.test", "nope", "192.0.2.1") for _ in range(4)]
    other = Rig(tmp_path / "b")
    unknown = [await other.auth.verify("ghost@example.test", "nope", "192.0.2.1")
               for _ in range(4)]
    assert wrong == unknown == [AuthOutcome(AuthStatus.FAILED)] * 4
    assert all(o.user is None and not o.ok for o in wrong)
    # after the client's failures 3 and 4; before the account's 4th attempt
    assert rig.sleeps == other.sleeps == [0.5, 0.5, 1.0]


async def test_unknown_user_runs_argon2_against_dummy(rig: Rig) -> None:
    seen: list[str] = []
    original = rig.auth._check

    def spy(h: str, pw: str) -> bool:
        seen.append(h)
        return original(h, pw)

    rig.auth._check = spy  # type: ignore[method-assign]
    await rig.auth.verify("ghost@example.test", "x", "192.0.2.1")
    await rig.auth.verify("bad local part@example.test", "x", "192.0.2.1")
    assert seen == [rig.auth._dummy, rig.auth._dummy]
    assert seen[0].startswith("$argon2id$v=19$m=1024,t=1,p=1$")


async def test_argon2_runs_off_the_event_loop(rig: Rig) -> None:
    threads: list[str] = []
    original = rig.auth._check

    def spy(h: str, pw: str) -> bool:
        threads.append(threading.current_thread().name)
        return original(h, pw)

    rig.auth._check = spy  # type: ignore[method-assign]
    await rig.auth.verify("alice@example.test", "alice-pw", "192.0.2.1")
    assert threads and threads[0].startswith("argon2")


async def test_client_blocked_after_failures_then_expiry(rig: Rig) -> None:
    for _ in range(CFG.block_after_failures):
        assert (await rig.auth.verify("alice@example.test", "x", "192.0.2.1")).status == "failed"
    # Blocked: even the right password, from the same client...
    out = await rig.auth.verify("alice@example.test", "alice-pw", "192.0.2.1")
    assert out == AuthOutcome(AuthStatus.BLOCKED)
    # ...for any account.
    assert (await rig.auth.verify("bob@example.test", "x", "192.0.2.1")).status == "blocked"
    rig.clock.now += CFG.block_seconds + 1
    out = await rig.auth.verify("alice@example.test", "alice-pw", "192.0.2.1")
    assert out.status == "ok"


async def test_ip_blocked_across_many_usernames(rig: Rig) -> None:
    for i in range(CFG.block_after_failures):
        await rig.auth.verify(f"user{i}@example.test", "x", "203.0.113.9")
    assert (await rig.auth.verify("alice@example.test", "alice-pw", "203.0.113.9")).status \
        == "blocked"
    assert (await rig.auth.verify("alice@example.test", "alice-pw", "192.0.2.1")).status == "ok"


async def test_ipv6_client_is_counted_by_its_64(rig: Rig) -> None:
    for i in range(CFG.block_after_failures):
        await rig.auth.verify("alice@example.test", "x", f"2001:db8:1:2::{i + 1:x}")
    assert (await rig.auth.verify("alice@example.test", "alice-pw", "2001:db8:1:2:ffff::1")) \
        .status == "blocked"
    assert (await rig.auth.verify("alice@example.test", "alice-pw", "2001:db8:1:3::1")).ok


async def test_failures_from_many_clients_never_lock_the_account(rig: Rig) -> None:
    """A guesser with many addresses must not be able to keep the owner out."""
    for i in range(4 * CFG.block_after_failures):
        out = await rig.auth.verify("alice@example.test", "x", f"198.51.100.{i + 1}")
        assert out.status == "failed"
    rig.sleeps.clear()
    out = await rig.auth.verify("alice@example.test", "alice-pw", "192.0.2.50")
    assert out == AuthOutcome(AuthStatus.OK, "alice@example.test")
    # It was slowed down (before the check, so the delay does not tell the outcome).
    assert rig.sleeps == [rig.auth.delay_for(4 * CFG.block_after_failures)]


async def test_account_delay_grows_is_capped_and_spares_the_owners_clients(rig: Rig) -> None:
    assert (await rig.auth.verify("alice@example.test", "alice-pw", "192.0.2.1")).ok
    before_each: list[float] = []
    for i in range(CFG.delay_after_failures + MAX_DELAY_FACTOR + 5):
        rig.sleeps.clear()
        await rig.auth.verify("alice@example.test", "x", f"198.51.100.{i + 1}")
        before_each.append(rig.sleeps[0] if rig.sleeps else 0.0)
    growing = [0.0] * (CFG.delay_after_failures + 1) + [
        CFG.failure_delay * min(n, MAX_DELAY_FACTOR)
        for n in range(1, MAX_DELAY_FACTOR + 5)]
    assert before_each == growing
    # The client the owner logged in from recently is not slowed, nor refused...
    rig.sleeps.clear()
    assert (await rig.auth.verify("alice@example.test", "alice-pw", "192.0.2.1")).ok
    assert rig.sleeps == []
    # ...a new one is slowed (capped) but let in, and its success does not reset the
    # account's count: the next new client is slowed as much.
    for ip in ("203.0.113.1", "203.0.113.2"):
        rig.sleeps.clear()
        assert (await rig.auth.verify("alice@example.test", "alice-pw", ip)).ok
        assert rig.sleeps == [CFG.failure_delay * MAX_DELAY_FACTOR]
    # The account's count ends with its window.
    rig.clock.now += CFG.block_seconds + 1
    rig.sleeps.clear()
    assert (await rig.auth.verify("alice@example.test", "alice-pw", "203.0.113.3")).ok
    assert rig.sleeps == []


async def test_unknown_account_is_slowed_like_a_real_one(rig: Rig, tmp_path: Path) -> None:
    other = Rig(tmp_path / "b")
    for i in range(CFG.block_after_failures + 3):
        ip = f"192.0.2.{i + 10}"
        real = await rig.auth.verify("alice@example.test", "x", ip)
        ghost = await other.auth.verify("ghost@example.test", "x", ip)
        assert real == ghost == AuthOutcome(AuthStatus.FAILED)
    assert rig.sleeps == other.sleeps and rig.sleeps


async def test_success_resets_counters(rig: Rig) -> None:
    for _ in range(CFG.block_after_failures - 1):
        await rig.auth.verify("alice@example.test", "x", "192.0.2.1")
    assert (await rig.auth.verify("alice@example.test", "alice-pw", "192.0.2.1")).ok
    rig.sleeps.clear()
    # Counting starts over: no delay for the next failures, and no block.
    for _ in range(CFG.delay_after_failures):
        assert (await rig.auth.verify("alice@example.test", "x", "192.0.2.1")).status == "failed"
    assert rig.sleeps == []
    assert (await rig.auth.verify("alice@example.test", "alice-pw", "192.0.2.1")).ok


async def test_delay_grows_and_is_capped(rig: Rig) -> None:
    assert [rig.auth.delay_for(n) for n in range(1, 6)] == [0.0, 0.0, 0.5, 1.0, 1.5]
    assert rig.auth.delay_for(10_000) == 0.5 * 30


async def test_real_sleep_is_awaited_not_blocking(tmp_path: Path) -> None:
    d = SQLiteDirectory(tmp_path / "d.sqlite3")
    cfg = AuthConfig(delay_after_failures=0, block_after_failures=100, failure_delay=0.2)
    auth = Authenticator(d, MemoryCounters(), cfg, hasher=CHEAP)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    out = await auth.verify("x@example.test", "y", "127.0.0.1")
    elapsed = loop.time() - t0
    task.cancel()
    assert out.status == "failed"
    assert elapsed >= 0.2
    assert ticks >= 5  # the loop kept running during the delay
    auth.close()


async def test_parallel_guesses_cannot_outrun_the_block(rig: Rig) -> None:
    hashed: list[str] = []
    original = rig.auth._check

    def spy(h: str, pw: str) -> bool:
        hashed.append(pw)
        return original(h, pw)

    rig.auth._check = spy  # type: ignore[method-assign]
    outs = await asyncio.gather(*(
        rig.auth.verify("alice@example.test", f"guess{i}", "192.0.2.1") for i in range(20)
    ))
    # at most MAX_PARALLEL - 1 checks beyond the limit were already in flight
    assert CFG.block_after_failures <= len(hashed) < CFG.block_after_failures + MAX_PARALLEL
    assert sum(o.status == "blocked" for o in outs) == 20 - len(hashed)
    assert all(o.status in ("failed", "blocked") for o in outs)
    assert (await rig.auth.verify("alice@example.test", "alice-pw", "192.0.2.1")).status \
        == "blocked"


async def test_parallel_good_logins_are_not_blocked(rig: Rig) -> None:
    outs = await asyncio.gather(*(
        rig.auth.verify("alice@example.test", "alice-pw", "192.0.2.1") for _ in range(30)
    ))
    assert all(o.status == "ok" for o in outs)


async def test_old_hash_is_upgraded_at_login_unless_changed_meanwhile(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    older = PasswordHasher(time_cost=2, memory_cost=1024, parallelism=1)
    old_hash = hash_password("alice-pw", hasher=older)
    rig.directory.set_password("alice@example.test", old_hash)
    assert (await rig.auth.verify("alice@example.test", "alice-pw", "192.0.2.1")).ok
    rig.auth._pool.shutdown(wait=True)  # the upgrade runs after the answer
    new_hash = rig.directory.password_hash("alice@example.test")
    assert new_hash != old_hash and new_hash is not None
    assert new_hash.startswith("$argon2id$v=19$m=1024,t=1,p=1$")  # the hasher's parameters
    assert (await Authenticator(rig.directory, rig.counters, CFG, hasher=CHEAP)
            .verify("alice@example.test", "alice-pw", "192.0.2.1")).ok
    # A password changed by the admin in between is never overwritten by the old one.
    assert not rig.directory.upgrade_password_hash(
        "alice@example.test", old_hash, hash_password("alice-pw", hasher=CHEAP))
    assert rig.directory.password_hash("alice@example.test") == new_hash


async def test_current_hash_is_left_alone(rig: Rig) -> None:
    before = rig.directory.password_hash("alice@example.test")
    assert (await rig.auth.verify("alice@example.test", "alice-pw", "192.0.2.1")).ok
    rig.auth._pool.shutdown(wait=True)
    assert rig.directory.password_hash("alice@example.test") == before


# ------------------------------------------------------------------ through a node, over sockets
#
# Each client connects from its own loopback address (127.0.0.2, 127.0.0.3, ...: all of
# 127/8 is loopback), so the node sees as many clients as a distributed guesser has.

NODE_AUTH = {"delay_after_failures": 3, "block_after_failures": 5, "failure_delay": 0.02}


class POP3SFrom(poplib.POP3_SSL):
    """poplib's POP3S client, connecting from a chosen source address."""

    def __init__(self, source: str, port: int, ctx: ssl.SSLContext) -> None:
        self._source = source
        super().__init__("127.0.0.1", port, context=ctx, timeout=10)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self._source, 0))
        return self.context.wrap_socket(sock, server_hostname=self.host)


def pop3_login(port: int, ctx: ssl.SSLContext, source: str, password: str) -> bytes:
    """USER/PASS over POP3S from ``source``: the server's reply to PASS."""
    with contextlib.closing(POP3SFrom(source, port, ctx)) as c:
        c.user("alice@example.test")
        try:
            return c.pass_(password)
        except poplib.error_proto as err:
            return err.args[0]


def smtp_login(port: int, ctx: ssl.SSLContext, source: str, password: str) -> int:
    """AUTH PLAIN over SMTPS (465) from ``source``: the reply code."""
    with smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=10,
                          source_address=(source, 0)) as s:
        s.ehlo("mua.test")
        s.esmtp_features["auth"] = "PLAIN"  # one attempt per login, not PLAIN then LOGIN
        try:
            return s.login("alice@example.test", password)[0]
        except smtplib.SMTPResponseException as err:
            return err.smtp_code


@pytest.fixture
async def guarded_node(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext
) -> AsyncIterator[Node]:
    cfg = config_factory(auth=NODE_AUTH)
    seed_directory(cfg)
    async with Node(cfg, ssl_context=server_ssl_context) as node:
        yield node


@pytest.mark.parametrize("protocol", ["pop3", "smtp"])
async def test_guessers_on_many_addresses_cannot_lock_the_account_out(
    guarded_node: Node, client_ssl_context: ssl.SSLContext, protocol: str
) -> None:
    """Twice the block threshold of wrong passwords for one account, each from another
    address, then the right one from an address that has not failed: it gets in."""
    if protocol == "pop3":
        port, login = guarded_node.port("pop3s"), pop3_login
        wrong_reply: object = b"-ERR [AUTH] Authentication failed"
    else:
        port, login, wrong_reply = guarded_node.port("submissions"), smtp_login, 535
    guesses = 2 * NODE_AUTH["block_after_failures"]
    for i in range(guesses):
        reply = await asyncio.to_thread(login, port, client_ssl_context, f"127.0.0.{i + 2}",
                                        "guess")
        assert reply == wrong_reply
    reply = await asyncio.to_thread(login, port, client_ssl_context, "127.0.0.200", "alice-pw")
    assert reply == 235 if protocol == "smtp" else reply.startswith(b"+OK")


@pytest.mark.parametrize("protocol", ["pop3", "smtp"])
async def test_a_guesser_on_one_address_is_still_blocked(
    guarded_node: Node, client_ssl_context: ssl.SSLContext, protocol: str
) -> None:
    if protocol == "pop3":
        port, login = guarded_node.port("pop3s"), pop3_login
        blocked: object = b"-ERR [AUTH] Authentication failed"  # the reply of a failure
    else:
        port, login, blocked = guarded_node.port("submissions"), smtp_login, 421
    for _ in range(NODE_AUTH["block_after_failures"]):
        await asyncio.to_thread(login, port, client_ssl_context, "127.0.0.9", "guess")
    # Even the right password is refused from the guesser's address...
    assert await asyncio.to_thread(login, port, client_ssl_context, "127.0.0.9",
                                   "alice-pw") == blocked
    # ...and only from there.
    reply = await asyncio.to_thread(login, port, client_ssl_context, "127.0.0.10", "alice-pw")
    assert reply == 235 if protocol == "smtp" else reply.startswith(b"+OK")


async def test_shared_counters_down_refuses_logins_for_now_then_recovers(
        rig: Rig, redis_server: Any) -> None:
    """Redis down: even the right password gets UNAVAILABLE (a temporary refusal), never
    a check against counts that other nodes cannot see; back up, logins work again."""
    from mailfort.policy import redis_counters
    from mailfort.policy.redis_counters import RedisCounters, connect

    server = redis_server
    shared = RedisCounters(connect(server.url, None))
    auth = Authenticator(rig.directory, shared, CFG, hasher=CHEAP, sleep=rig._sleep)
    try:
        for _ in range(3):
            assert (await auth.verify("alice@example.test", "nope", "192.0.2.7")).status \
                == AuthStatus.FAILED
        server.stop()
        for password in ("alice-pw", "nope"):
            out = await auth.verify("alice@example.test", password, "192.0.2.7")
            assert out.status == AuthStatus.UNAVAILABLE and not out.ok
        server.start()
        await asyncio.sleep(redis_counters.RETRY_EVERY + 0.1)
        assert (await auth.verify("alice@example.test", "alice-pw", "192.0.2.7")).ok
        blocks = await auth.blocks()
        assert blocks == []  # the restarted Redis is empty: nothing listed
    finally:
        auth.close()
        await shared.aclose()


async def test_blocks_lists_blocked_clients_and_slowed_accounts(rig: Rig) -> None:
    for _ in range(CFG.block_after_failures):
        await rig.auth.verify("alice@example.test", "nope", "192.0.2.9")
    blocks = await rig.auth.blocks()
    kinds = {(b.kind, b.key) for b in blocks}
    assert kinds == {("client", "192.0.2.9"), ("account", "alice@example.test")}
    account = next(b for b in blocks if b.kind == "account")
    assert account.failures == CFG.block_after_failures
    assert all(0 < b.remaining <= CFG.block_seconds for b in blocks)
    assert "block removed" in await rig.auth.unblock("192.0.2.9")
    assert {b.kind for b in await rig.auth.blocks()} == {"account"}


class _CountedWrites(MemoryCounters):
    """MemoryCounters that note each write (reset, incr) by key."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def reset(self, key: str) -> None:
        self.writes.append(f"reset {key}")
        super().reset(key)

    def incr(self, key: str, window: float) -> int:
        self.writes.append(f"incr {key}")
        return super().incr(key, window)


async def test_a_login_without_failures_to_undo_writes_no_reset_of_them(
        tmp_path: Path) -> None:
    """Each good login reset the client's failure count, zero or not: a write (SQLite
    with several workers, a round trip with Redis) for nothing. Only a count to undo is
    reset; one that is there still is."""
    directory = SQLiteDirectory(tmp_path / "directory.sqlite3")
    directory.add_domain("example.test")
    directory.add_user("alice@example.test", hash_password("alice-pw", hasher=CHEAP))
    counters = _CountedWrites()
    auth = Authenticator(directory, counters, CFG, hasher=CHEAP)
    assert (await auth.verify("alice@example.test", "alice-pw", "192.0.2.1")).ok
    assert not any(w.startswith("reset auth-fail:") for w in counters.writes), counters.writes
    assert not (await auth.verify("alice@example.test", "wrong", "192.0.2.1")).ok
    counters.writes.clear()
    assert (await auth.verify("alice@example.test", "alice-pw", "192.0.2.1")).ok
    assert "reset auth-fail:ip:192.0.2.1" in counters.writes
    assert counters.get("auth-fail:ip:192.0.2.1") == 0
    auth.close()
