"""Every engine parses no further pipelined command once ``OUTPUT_PAUSE`` octets of the
answers it gives itself wait, and goes on once the server took them: one read of
self-answered commands (CAPABILITY, VRFY, CAPA...) cannot make a session build more than
that before the server writes and sees whether the client reads (server/session.py
``pump``; tests/server/*::test_pipelined_commands_from_a_client_that_does_not_read_*)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from mailfort.protocol import imap, managesieve, pop3, smtp
from mailfort.protocol.errors import Slowdown
from mailfort.server.session import PUMP_FLUSH_AT

SLOW = Slowdown(after=1, step=0.5, cap=2.0)


def _smtp() -> Any:
    return smtp.SMTPEngine(smtp.EngineSettings(hostname="mx.test", error_slowdown=SLOW))


def _pop3() -> Any:
    return pop3.POP3Engine(pop3.EngineSettings(error_slowdown=SLOW))


def _imap() -> Any:
    return imap.IMAPEngine(imap.EngineSettings(error_slowdown=SLOW))


def _managesieve() -> Any:
    return managesieve.ManageSieveEngine(managesieve.EngineSettings(error_slowdown=SLOW))


ENGINES = pytest.mark.parametrize("make, command, bad, pause", [
    (_smtp, b"VRFY\r\n", b"XYZZY\r\n", smtp.OUTPUT_PAUSE),
    (_pop3, b"CAPA\r\n", b"XYZZY\r\n", pop3.OUTPUT_PAUSE),
    (_imap, b"a CAPABILITY\r\n", b"b XYZZY\r\n", imap.OUTPUT_PAUSE),
    (_managesieve, b"CAPABILITY\r\n", b"XYZZY\r\n", managesieve.OUTPUT_PAUSE),
], ids=["smtp", "pop3", "imap", "managesieve"])


def _batches(e: Any) -> list[tuple[bytes, float]]:
    """What a server's pump would send, batch by batch, with each batch's hold."""
    out = []
    while True:
        assert e.next_event() is None
        assert e.output_size == sum(len(b) for b in e._out)
        batch = e.take_output()
        assert e.output_size == 0
        if not batch:
            return out
        out.append((batch, e.take_hold()))


@ENGINES
def test_self_answered_commands_pause_at_the_output_limit_and_go_on(
        make: Callable[[], Any], command: bytes, bad: bytes, pause: int) -> None:
    e = make()
    e.greet()
    e.take_output()
    e.receive(command)
    ((answer, _),) = _batches(e)
    n = 3 * pause // len(answer) + 10
    e.receive(command * n + bad * 2)
    batches = _batches(e)
    assert b"".join(b for b, _ in batches).startswith(answer * n)
    assert len(batches) >= 4  # three pauses, then the rest
    assert all(pause <= len(b) < pause + len(answer) for b, _ in batches[:3])
    # The second refusal is past the soft limit (after=1): still held, pause or not.
    assert [h for _, h in batches[:-1]] == [0.0] * (len(batches) - 1)
    assert batches[-1][1] > 0
    assert not e.closed


@ENGINES
def test_a_paused_engine_fills_a_pass_of_the_session(
        make: Callable[[], Any], command: bytes, bad: bytes, pause: int) -> None:
    """The session goes on at once only after a pass of ``PUMP_FLUSH_AT`` octets; an
    engine pausing below that would wait for the client's next read, maybe for ever."""
    assert pause >= PUMP_FLUSH_AT
