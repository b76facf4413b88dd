"""Greylisting (RFC 6647) decisions with an injected clock, on each store: the embedded
SQLite file and the shared PostgreSQL tables (a real server, tests/pgserver.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailfort.policy.greylist import Greylist, GreylistSettings, Outcome, client_network


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


SETTINGS = GreylistSettings(delay=300, retry_window=3600, pass_lifetime=86400,
                            auto_allow_after=3)


Make = Callable[..., Any]  # (clock, settings=SETTINGS) -> a GreylistStore


@pytest.fixture(params=["sqlite", "postgresql"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Make]:
    if request.param == "sqlite":
        yield lambda clock, settings=SETTINGS: Greylist(tmp_path / "greylist.sqlite3",
                                                        settings, clock=clock)
        return
    from mailfort.directory.postgresql import PostgreSQLDirectory
    from mailfort.policy.greylist_pg import PostgreSQLGreylist
    from tests.pgserver import PASSWORD

    server = request.getfixturevalue("postgres_server")
    directory = PostgreSQLDirectory(server.url(server.create_database()), password=PASSWORD,
                                    check_schema=False)
    directory.migrate()
    yield lambda clock, settings=SETTINGS: PostgreSQLGreylist(directory.pool, settings,
                                                              clock=clock)
    directory.close()


def senders(g: Any) -> list[str]:
    """The senders of the stored triplets, from whichever store ``g`` is."""
    if isinstance(g, Greylist):
        return [r[0] for r in g._db.execute("SELECT sender FROM triplets")]
    with g._pool.connection() as conn:
        return [r[0] for r in conn.execute("SELECT sender FROM greylist_triplets")]


def test_client_network_is_a_slash_24_or_64() -> None:
    assert client_network("192.0.2.77") == "192.0.2.0/24"
    assert client_network("::ffff:192.0.2.77") == "192.0.2.0/24"
    assert client_network("2001:db8:1:2:3::4") == "2001:db8:1:2::/64"


def test_deferred_until_the_delay_then_passes(make: Make) -> None:
    clock = Clock()
    g = make(clock)
    args = ("192.0.2.1", "a@remote.test", "alice@example.test")
    assert g.check(*args) is Outcome.DEFER
    clock.now += 299
    assert g.check(*args) is Outcome.DEFER  # too early: still counted from the first try
    clock.now += 2
    assert g.check("192.0.2.200", "A@Remote.test", "alice@example.test") is Outcome.PASS
    clock.now += 80000
    assert g.check(*args) is Outcome.PASS  # known now
    # another sender, recipient or network is another triplet
    assert g.check("192.0.2.1", "b@remote.test", "alice@example.test") is Outcome.DEFER
    assert g.check("192.0.2.1", "a@remote.test", "bob@example.test") is Outcome.DEFER
    assert g.check("198.51.100.1", "a@remote.test", "alice@example.test") is Outcome.DEFER


def test_a_retry_after_the_window_starts_over(make: Make) -> None:
    clock = Clock()
    g = make(clock)
    args = ("192.0.2.1", "", "alice@example.test")  # the null sender too
    assert g.check(*args) is Outcome.DEFER
    clock.now += 3601
    assert g.check(*args) is Outcome.DEFER
    clock.now += 300
    assert g.check(*args) is Outcome.PASS


def test_a_passed_triplet_expires_after_its_lifetime(make: Make) -> None:
    clock = Clock()
    g = make(clock)
    args = ("192.0.2.1", "a@remote.test", "alice@example.test")
    g.check(*args)
    clock.now += 300
    assert g.check(*args) is Outcome.PASS
    clock.now += 86401
    assert g.check(*args) is Outcome.DEFER


def test_network_auto_allowed_after_successful_retries(make: Make) -> None:
    clock = Clock()
    g = make(clock)
    rcpts = [f"u{i}@example.test" for i in range(4)]
    for r in rcpts[:3]:
        assert g.check("192.0.2.1", "a@remote.test", r) is Outcome.DEFER
    clock.now += 300
    for r in rcpts[:2]:
        assert g.check("192.0.2.1", "a@remote.test", r) is Outcome.PASS
    assert g.check("192.0.2.9", "new@remote.test", "x@example.test") is Outcome.DEFER
    assert g.check("192.0.2.1", "a@remote.test", rcpts[2]) is Outcome.PASS  # the 3rd
    assert g.check("192.0.2.9", "other@remote.test", "y@example.test") is Outcome.ALLOWED
    assert g.check("198.51.100.1", "other@remote.test", "y@example.test") is Outcome.DEFER


def test_auto_allow_can_be_switched_off(make: Make) -> None:
    clock = Clock()
    g = make(clock, GreylistSettings(delay=10, retry_window=100,
                                                pass_lifetime=1000, auto_allow_after=0))
    for i in range(5):
        g.check("192.0.2.1", "a@remote.test", f"u{i}@example.test")
    clock.now += 10
    for i in range(5):
        assert g.check("192.0.2.1", "a@remote.test", f"u{i}@example.test") is Outcome.PASS
    assert g.check("192.0.2.1", "a@remote.test", "new@example.test") is Outcome.DEFER


def test_state_survives_reopening(make: Make) -> None:
    clock = Clock()
    g = make(clock)
    args = ("192.0.2.1", "a@remote.test", "alice@example.test")
    assert g.check(*args) is Outcome.DEFER
    g.close()
    clock.now += 300
    again = make(clock)
    assert again.check(*args) is Outcome.PASS
    again.close()


def test_expire_forgets_stale_triplets(make: Make) -> None:
    clock = Clock()
    g = make(clock)
    g.check("192.0.2.1", "a@remote.test", "alice@example.test")
    g.check("192.0.2.2", "b@remote.test", "alice@example.test")
    clock.now += 300
    g.check("192.0.2.2", "b@remote.test", "alice@example.test")  # passes
    clock.now += 3601
    assert g.expire() == 1  # the one never retried; the passed one lives on
    clock.now += 86400
    assert g.expire() == 1


def test_stale_triplets_are_swept_while_checking(make: Make) -> None:
    clock = Clock()
    g = make(clock)
    g.check("192.0.2.1", "a@remote.test", "alice@example.test")
    g._checks = 1000  # the next check is the 1001st: a sweep comes first
    clock.now += 3601
    g.check("192.0.2.2", "b@remote.test", "alice@example.test")
    assert senders(g) == ["b@remote.test"]  # only the new one; the stale one went
