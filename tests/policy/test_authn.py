"""The Authenticator over a real SQLite directory with real (cheap) argon2."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from mailfort.config import AuthConfig
from mailfort.directory.sqlite import SQLiteDirectory
from mailfort.passwords import hash_password
from mailfort.policy.authn import MAX_PARALLEL, Authenticator, AuthOutcome, AuthStatus, ip_key
from mailfort.policy.counters import MemoryCounters

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
    assert rig.sleeps == other.sleeps == [0.5, 1.0]  # failures 3 and 4


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


async def test_block_after_failures_then_expiry(rig: Rig) -> None:
    for _ in range(CFG.block_after_failures):
        assert (await rig.auth.verify("alice@example.test", "x", "192.0.2.1")).status == "failed"
    # Blocked: even the right password, from the same IP.
    out = await rig.auth.verify("alice@example.test", "alice-pw", "192.0.2.1")
    assert out == AuthOutcome(AuthStatus.BLOCKED)
    # The account is blocked from another IP too (distributed guessing).
    out = await rig.auth.verify("alice@example.test", "alice-pw", "198.51.100.7")
    assert out.status == "blocked"
    rig.clock.now += CFG.block_seconds + 1
    out = await rig.auth.verify("alice@example.test", "alice-pw", "198.51.100.7")
    assert out.status == "ok"


async def test_ip_blocked_across_many_usernames(rig: Rig) -> None:
    for i in range(CFG.block_after_failures):
        await rig.auth.verify(f"user{i}@example.test", "x", "203.0.113.9")
    assert (await rig.auth.verify("alice@example.test", "alice-pw", "203.0.113.9")).status \
        == "blocked"
    assert (await rig.auth.verify("alice@example.test", "alice-pw", "192.0.2.1")).status == "ok"


async def test_unknown_account_blocks_like_a_real_one(rig: Rig) -> None:
    for i in range(CFG.block_after_failures):
        await rig.auth.verify("ghost@example.test", "x", f"192.0.2.{i + 10}")
    out = await rig.auth.verify("ghost@example.test", "x", "192.0.2.99")
    assert out == AuthOutcome(AuthStatus.BLOCKED)


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


def test_ip_key_groups_ipv6_by_64() -> None:
    assert ip_key("2001:db8:1:2:aaaa::1") == ip_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert ip_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert ip_key("192.0.2.1") == "192.0.2.1"
    assert ip_key("not-an-ip") == "not-an-ip"


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
