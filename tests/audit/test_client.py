"""The raw client's bounds against a server whose greeting never ends (``220-x`` lines)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from mailfort.audit.client import BudgetSpent, NoReply, RawClient
from tests.audit.weak_server import WeakServer


def test_a_trickling_reply_ends_at_the_timeout(
    weak_factory: Callable[..., WeakServer],
) -> None:
    """One line every 0.2 s never lets a per-line deadline expire; one per reply does."""
    server = weak_factory(trickle=0.2)
    started = time.monotonic()
    with RawClient("127.0.0.1", server.ports["smtp"], 1.0) as c, \
            pytest.raises(NoReply, match="timeout"):
        c.reply()
    assert time.monotonic() - started < 1.6


def test_a_reply_of_endless_lines_is_cut_by_lines(
    weak_factory: Callable[..., WeakServer],
) -> None:
    server = weak_factory(trickle=0.0005)
    started = time.monotonic()
    with RawClient("127.0.0.1", server.ports["smtp"], 10.0) as c, \
            pytest.raises(NoReply, match="lines"):
        c.reply()
    assert time.monotonic() - started < 2


def test_the_budget_bounds_a_read_inside_a_check(
    weak_factory: Callable[..., WeakServer],
) -> None:
    """The read deadline is min(timeout, budget left), and the budget says it ran out."""
    server = weak_factory(trickle=0.2)
    started = time.monotonic()
    with RawClient("127.0.0.1", server.ports["smtp"], 10.0,
                   deadline=started + 0.6) as c, pytest.raises(BudgetSpent):
        c.reply()
    assert time.monotonic() - started < 1.2
    with pytest.raises(BudgetSpent):  # nothing left: no new connection either
        RawClient("127.0.0.1", server.ports["smtp"], 10.0, deadline=started)


def test_imap_tagged_replies_are_counted_up_to_the_logout_marker(
    weak_factory: Callable[..., WeakServer],
) -> None:
    """Untagged lines (CAPABILITY data, BYE) are not replies; each tagged one is."""
    server = weak_factory()
    with RawClient("127.0.0.1", server.ports["imap"], 2.0) as c:
        c.read_line()
        status, untagged = c.imap("C", "CAPABILITY")
        assert status == "OK" and untagged[0].startswith("* CAPABILITY IMAP4rev1")
        c.send(b"a NOOP\r\nb NOOP\r\n")
        assert [r.split()[0] for r in c.replies_before_quit(imap=True)] == ["a", "b"]
