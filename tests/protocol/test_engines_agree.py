"""The SMTP and POP3 engines behave the same at the limits they share: error count, line
length and endings, SASL PLAIN. Each test runs against both engines."""

from __future__ import annotations

import base64

import pytest

from mailfort.protocol import pop3, smtp
from mailfort.protocol.errors import ErrorCounter, Slowdown
from mailfort.protocol.replies import Reply
from mailfort.protocol.sasl import MAX_SASL_LINE

ALICE = "alice@example.test"


class Session:
    """One engine behind a common face: send bytes, get reply lines and credentials seen."""

    def __init__(self, kind: str, max_errors: int = 10,
                 slowdown: Slowdown | None = None) -> None:
        self.kind = kind
        self.credentials: list[tuple[str, str]] = []
        self.engine: smtp.SMTPEngine | pop3.POP3Engine
        if kind == "smtp":
            self.limit = 512
            self.engine = smtp.SMTPEngine(
                smtp.EngineSettings(hostname="mx.test", max_errors=max_errors,
                                    error_slowdown=slowdown, auth_mechanisms=("PLAIN",)),
                tls_active=True)
            self.engine.greet()
            self.send(b"EHLO c.test\r\n")
        else:
            self.limit = pop3.MAX_LINE
            self.engine = pop3.POP3Engine(pop3.EngineSettings(max_errors=max_errors,
                                                              error_slowdown=slowdown),
                                          tls_active=True)
            self.engine.greet()
        self.engine.take_output()

    def send(self, data: bytes) -> list[bytes]:
        e = self.engine
        e.receive(data)
        while (ev := e.next_event()) is not None:
            if isinstance(ev, smtp.AuthCredentials):
                assert isinstance(e, smtp.SMTPEngine)
                self.credentials.append((ev.username, ev.password))
                e.decide(Reply(535, "5.7.8", "Authentication credentials invalid"))
            elif isinstance(ev, pop3.CheckCredentials):
                assert isinstance(e, pop3.POP3Engine)
                self.credentials.append((ev.username, ev.password))
                e.credentials_refused()
        return e.take_output().split(b"\r\n")[:-1]

    @staticmethod
    def negative(line: bytes) -> bool:
        return line.startswith(b"-ERR") or line[:1] in (b"4", b"5")

    @property
    def closed(self) -> bool:
        return self.engine.closed

    @property
    def sasl_prompt(self) -> bytes:
        return b"334 " if self.kind == "smtp" else b"+ "


KINDS = pytest.mark.parametrize("kind", ["smtp", "pop3"])


def test_error_counter_tolerates_the_limit_and_closes_past_it() -> None:
    c = ErrorCounter(2)
    assert [c.record(), c.record(), c.record()] == [False, False, True]


def test_error_counter_holds_replies_longer_past_the_soft_limit() -> None:
    c = ErrorCounter(6, Slowdown(after=2, step=0.5, cap=1.2))
    holds = []
    for _ in range(7):
        closing = c.record()
        holds.append((closing, c.take_hold()))
    assert holds == [(False, 0.0), (False, 0.0), (False, 0.5), (False, 1.0), (False, 1.2),
                     (False, 1.2), (True, 0.0)]


@KINDS
def test_both_engines_ask_the_same_hold_and_never_for_the_closing_reply(kind: str) -> None:
    s = Session(kind, max_errors=3, slowdown=Slowdown(after=1, step=0.25, cap=10.0))
    holds = []
    for _ in range(3):
        assert s.negative(s.send(b"BOGUS\r\n")[0])
        holds.append(s.engine.take_hold())
    assert holds == [0.0, 0.25, 0.5]
    s.send(b"NOOP\r\n" if kind == "smtp" else b"CAPA\r\n")  # positive: no hold
    assert s.engine.take_hold() == 0.0
    out = s.send(b"BOGUS\r\n")
    assert b"Too many errors" in out[-1] and s.closed
    assert s.engine.take_hold() == 0.0


@KINDS
@pytest.mark.parametrize("max_errors", [1, 3])
def test_max_errors_are_forgiven_and_the_next_one_closes(kind: str, max_errors: int) -> None:
    s = Session(kind, max_errors=max_errors)
    for _ in range(max_errors):
        out = s.send(b"BOGUS\r\n")
        assert len(out) == 1 and s.negative(out[0])
        assert not s.closed
    out = s.send(b"BOGUS\r\nBOGUS\r\n")
    assert len(out) == 2  # the error that goes past the limit is answered, then the close
    assert s.negative(out[0]) and b"Too many errors" in out[1]
    assert s.closed


@KINDS
def test_line_limit_counts_the_crlf_and_the_session_goes_on(kind: str) -> None:
    s = Session(kind)
    exact = b"NOOP " + b"x" * (s.limit - 7) + b"\r\n"
    assert len(exact) == s.limit
    out = s.send(exact)
    assert b"too long" not in out[0].lower()
    out = s.send(b"NOOP " + b"x" * (s.limit - 6) + b"\r\nQUIT\r\n")
    assert b"too long" in out[0].lower() and s.negative(out[0])
    assert len(out) == 2 and s.closed  # QUIT after the long line was read as a command


@KINDS
@pytest.mark.parametrize("line", [b"QUIT\n", b"QU\rIT\r\n", b"QUIT\0\r\n", b"QUIT\r\r\n"])
def test_bare_line_endings_and_nul_are_refused_not_executed(kind: str, line: bytes) -> None:
    s = Session(kind)
    out = s.send(line)
    assert len(out) == 1 and s.negative(out[0])
    assert not s.closed  # QUIT was not executed


@KINDS
def test_non_ascii_initial_response_gets_a_reply(kind: str) -> None:
    s = Session(kind)
    out = s.send("AUTH PLAIN \u00e9\r\n".encode())
    assert len(out) == 1 and s.negative(out[0])
    assert not s.closed and s.engine.internal_error is None


@KINDS
@pytest.mark.parametrize(
    ("authzid", "authcid", "seen"),
    [
        ("", ALICE, True),
        (ALICE, ALICE, True),
        ("Alice@EXAMPLE.test.", ALICE, True),  # the same account, as the directory sees it
        ("bob@example.test", ALICE, False),  # proxy authorization is refused
        ("", "", False),
    ],
)
def test_plain_authzid_rule_is_the_same(kind: str, authzid: str, authcid: str,
                                        seen: bool) -> None:
    s = Session(kind)
    token = base64.b64encode(f"{authzid}\0{authcid}\0pw".encode())
    for data in (b"AUTH PLAIN " + token + b"\r\n", b"AUTH PLAIN\r\n" + token + b"\r\n"):
        s.credentials.clear()
        out = s.send(data)
        assert s.credentials == ([(authcid, "pw")] if seen else [])
        assert s.negative(out[-1])  # refused by the test's server, or by the engine


@KINDS
def test_a_bad_sasl_line_ends_the_exchange(kind: str) -> None:
    s = Session(kind)
    assert s.send(b"AUTH PLAIN\r\n")[0].startswith(s.sasl_prompt)
    out = s.send(b"AGFsaWNlAHB3\nQUIT\r\n")  # bare LF inside the SASL response
    assert len(out) == 2 and s.negative(out[0])
    assert s.closed  # the next line was a command again


@KINDS
def test_sasl_response_limit_is_the_same(kind: str) -> None:
    s = Session(kind)
    s.send(b"AUTH PLAIN\r\n")
    out = s.send(b"A" * (MAX_SASL_LINE - 2) + b"\r\n")  # long, but a line: bad base64
    assert len(out) == 1 and b"too long" not in out[0].lower()
    s.send(b"AUTH PLAIN\r\n")
    out = s.send(b"A" * (MAX_SASL_LINE - 1) + b"\r\n")
    assert len(out) == 1 and b"too long" in out[0].lower()


@KINDS
def test_a_bug_inside_an_engine_becomes_a_reply_and_a_close(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last line of defence: an exception in a command handler does not escape
    ``next_event`` (the server would log a traceback per client line); the client gets a
    temporary failure and the exception is kept for the server."""
    def broken(engine: object, arg: str) -> None:
        raise ValueError("bug")

    if kind == "smtp":
        monkeypatch.setitem(smtp._HANDLERS, "NOOP", broken)
    else:
        monkeypatch.setitem(pop3._AUTH_CMDS, "NOOP", broken)
    s = Session(kind)
    out = s.send(b"NOOP\r\nQUIT\r\n")
    assert len(out) == 1 and out[0].startswith((b"421 4.3.0", b"-ERR [SYS/TEMP]"))
    assert s.closed
    assert isinstance(s.engine.internal_error, ValueError)
