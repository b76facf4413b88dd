"""The IMAP engine alone (sans-I/O): states, capabilities, TLS rules, login, IDLE, limits,
and fuzzing. The mailbox side is answered here by hand, as the driver would."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailfort.protocol.errors import Slowdown
from mailfort.protocol.imap import (
    AUTH_FAILED,
    CheckCredentials,
    EngineSettings,
    Event,
    Execute,
    Idle,
    IdleEnded,
    IMAPEngine,
    StartTLS,
    State,
)
from mailfort.protocol.sasl import MAX_SASL_LINE
from tests.fuzzing import examples

STARTTLS_PORT = EngineSettings(tls_available=True)  # 143 with a certificate
PLAIN = base64.b64encode(b"\0alice@example.test\0alice-pw")


def run(e: IMAPEngine, data: bytes) -> tuple[list[Event], bytes]:
    e.receive(data)
    events = []
    while (ev := e.next_event()) is not None:
        events.append(ev)
    return events, e.take_output()


def logged_in(settings: EngineSettings = STARTTLS_PORT) -> IMAPEngine:
    e = IMAPEngine(settings, tls_active=True)
    e.greet()
    events, _ = run(e, b"a LOGIN alice@example.test alice-pw\r\n")
    assert events == [CheckCredentials("alice@example.test", "alice-pw", "LOGIN")]
    e.credentials_accepted("alice@example.test")
    e.take_output()
    return e


def caps(out: bytes) -> list[str]:
    line = next(ln for ln in out.split(b"\r\n") if ln.startswith(b"* CAPABILITY "))
    return line.decode().split()[2:]


# ------------------------------------------------------------------ greeting, capabilities


def test_greeting_names_no_software_and_carries_capabilities() -> None:
    e = IMAPEngine(STARTTLS_PORT)
    e.greet()
    out = e.take_output()
    assert out.startswith(b"* OK [CAPABILITY IMAP4rev1 IMAP4rev2 STARTTLS LOGINDISABLED")
    assert out.endswith(b"] IMAP ready\r\n")
    assert b"mailfort" not in out.lower() and b"python" not in out.lower()


def test_capabilities_before_tls_after_tls_and_after_login() -> None:
    e = IMAPEngine(STARTTLS_PORT)
    _, out = run(e, b"a CAPABILITY\r\n")
    before = caps(out)
    assert before == ["IMAP4rev1", "IMAP4rev2", "STARTTLS", "LOGINDISABLED", "LITERAL+",
                      "SASL-IR", "ID", "ENABLE", "IDLE"]
    assert not any(c.startswith("AUTH=") for c in before)
    assert out.endswith(b"a OK CAPABILITY completed\r\n")
    events, out = run(e, b"b STARTTLS\r\n")
    assert events == [StartTLS()] and out == b"b OK Begin TLS negotiation now\r\n"
    e.tls_started()
    _, out = run(e, b"c CAPABILITY\r\n")
    after = caps(out)
    assert "AUTH=PLAIN" in after and "STARTTLS" not in after and "LOGINDISABLED" not in after
    events, _ = run(e, b"d LOGIN alice@example.test alice-pw\r\n")
    e.credentials_accepted("alice@example.test")
    out = e.take_output()
    assert out.startswith(b"d OK [CAPABILITY IMAP4rev1 IMAP4rev2 ENABLE IDLE UIDPLUS MOVE")
    _, out = run(e, b"e CAPABILITY\r\n")
    session = caps(out)
    assert "APPENDLIMIT=52428800" in session and "AUTH=PLAIN" not in session
    assert {"IDLE", "UIDPLUS", "MOVE", "SPECIAL-USE", "CONDSTORE", "QRESYNC", "QUOTA",
            "ESEARCH", "LIST-STATUS", "STATUS=SIZE", "NAMESPACE", "ENABLE"} <= set(session)


def test_appendlimit_from_the_settings() -> None:
    e = logged_in(EngineSettings(tls_available=True, append_limit=1000))
    _, out = run(e, b"x CAPABILITY\r\n")
    assert "APPENDLIMIT=1000" in caps(out)
    # and the reader holds APPEND to it: refused before a byte of the literal is sent
    events, out = run(e, b"y APPEND INBOX {1001}\r\n")
    assert events == [] and out == b"y NO [TOOBIG] literal too large\r\n"


def test_implicit_tls_offers_auth_and_no_starttls() -> None:
    e = IMAPEngine(EngineSettings(tls_available=False), tls_active=True)
    _, out = run(e, b"a CAPABILITY\r\nb STARTTLS\r\n")
    assert "AUTH=PLAIN" in caps(out) and "STARTTLS" not in caps(out)
    assert out.endswith(b"b BAD TLS already active\r\n")


# ------------------------------------------------------------------ no credentials in the clear


def test_login_and_authenticate_refused_before_tls() -> None:
    e = IMAPEngine(STARTTLS_PORT)
    events, out = run(e, b"a LOGIN alice@example.test alice-pw\r\nb AUTHENTICATE PLAIN "
                      + PLAIN + b"\r\nc AUTHENTICATE PLAIN\r\n")
    assert events == []  # the password never reaches the authenticator
    assert out == (b"a NO [PRIVACYREQUIRED] Use STARTTLS before logging in\r\n"
                   b"b NO [PRIVACYREQUIRED] Use STARTTLS before logging in\r\n"
                   b"c NO [PRIVACYREQUIRED] Use STARTTLS before logging in\r\n")


def test_a_password_literal_is_refused_before_the_continuation_without_tls() -> None:
    """A client that ignores LOGINDISABLED and sends its password as a literal gets no
    ``+``: the password is never sent in the clear. After STARTTLS, and where the loopback
    exception allows plaintext, the literal is taken."""
    e = IMAPEngine(STARTTLS_PORT)
    events, out = run(e, b"a LOGIN {18}\r\n")
    assert events == [] and b"+" not in out
    assert out == b"a NO [PRIVACYREQUIRED] Use STARTTLS before logging in\r\n"
    events, out = run(e, b"b LOGIN alice@example.test {8+}\r\nalice-pw\r\n")
    assert events == [] and out.startswith(b"b NO [PRIVACYREQUIRED]")
    events, out = run(e, b"c NOOP\r\n")  # the {8+} octets were skipped, not read as a command
    assert out == b"c OK NOOP completed\r\n"
    events, _ = run(e, b"d STARTTLS\r\n")
    assert events == [StartTLS()]
    e.tls_started()
    events, out = run(e, b"e LOGIN {18}\r\n")
    assert out.startswith(b"+") and events == []
    events, _ = run(e, b"alice@example.test alice-pw\r\n")
    assert events == [CheckCredentials("alice@example.test", "alice-pw", "LOGIN")]
    loop = IMAPEngine(EngineSettings(tls_available=True, allow_plaintext=True))
    _, out = run(loop, b"a LOGIN {18}\r\n")
    assert out.startswith(b"+")


def test_loopback_exception_allows_plaintext_login() -> None:
    e = IMAPEngine(EngineSettings(tls_available=True, allow_plaintext=True))
    _, out = run(e, b"a CAPABILITY\r\n")
    assert "AUTH=PLAIN" in caps(out) and "LOGINDISABLED" not in caps(out)
    events, _ = run(e, b"b LOGIN alice@example.test alice-pw\r\n")
    assert events == [CheckCredentials("alice@example.test", "alice-pw", "LOGIN")]


def test_starttls_discards_pipelined_plaintext() -> None:
    e = IMAPEngine(STARTTLS_PORT)
    events, out = run(e, b"a STARTTLS\r\nb LOGIN alice@example.test alice-pw\r\n"
                      b"c CAPABILITY\r\n")
    assert events == [StartTLS()] and out == b"a OK Begin TLS negotiation now\r\n"
    e.tls_started()
    events, out = run(e, b"")
    assert events == [] and out == b""  # nothing of the injected commands ran
    events, _ = run(e, b"d AUTHENTICATE PLAIN " + PLAIN + b"\r\n")
    assert events == [CheckCredentials("alice@example.test", "alice-pw", "PLAIN")]


def test_starttls_without_a_certificate_and_after_login() -> None:
    e = IMAPEngine(EngineSettings(tls_available=False))
    _, out = run(e, b"a STARTTLS\r\n")
    assert out == b"a BAD STARTTLS not available\r\n"
    e = logged_in()
    _, out = run(e, b"b STARTTLS\r\nc LOGIN a b\r\n")
    assert out == (b"b BAD STARTTLS not allowed now: already logged in\r\n"
                   b"c BAD LOGIN not allowed now: already logged in\r\n")


# ------------------------------------------------------------------ login


def test_uniform_failure_and_the_third_ends_the_session() -> None:
    e = IMAPEngine(STARTTLS_PORT, tls_active=True)
    for i in range(3):
        events, _ = run(e, f"t{i} LOGIN someone pw{i}\r\n".encode())
        assert isinstance(events[0], CheckCredentials)
        e.credentials_refused()
        out = e.take_output()
        assert out.startswith(f"t{i} NO {AUTH_FAILED}\r\n".encode())
    assert out.endswith(b"* BYE Too many authentication failures, closing connection\r\n")
    assert e.closed


def test_authenticate_plain_with_continuation_and_cancel() -> None:
    e = IMAPEngine(STARTTLS_PORT, tls_active=True)
    events, out = run(e, b"a AUTHENTICATE PLAIN\r\n")
    assert events == [] and out == b"+ \r\n"
    events, out = run(e, b"*\r\n")
    assert out == b"a BAD Authentication cancelled\r\n"
    events, out = run(e, b"b AUTHENTICATE PLAIN\r\n" + PLAIN + b"\r\n")
    assert events == [CheckCredentials("alice@example.test", "alice-pw", "PLAIN")]
    e.credentials_accepted("alice@example.test")
    assert e.take_output().startswith(b"b OK [CAPABILITY ")
    assert e.state is State.AUTHENTICATED and e.user == "alice@example.test"


def test_authenticate_errors() -> None:
    e = IMAPEngine(STARTTLS_PORT, tls_active=True)
    other = base64.b64encode(b"bob@example.test\0alice@example.test\0pw")
    _, out = run(e, b"a AUTHENTICATE LOGIN\r\nb AUTHENTICATE PLAIN !!!\r\n"
                 b"c AUTHENTICATE PLAIN " + other + b"\r\nd AUTHENTICATE PLAIN\r\n@@\r\n")
    assert out == (b"a NO Unsupported authentication mechanism\r\n"
                   b"b BAD bad initial response\r\n"
                   b"c NO [AUTHORIZATIONFAILED] Proxy authorization not supported\r\n"
                   b"+ \r\nd BAD Invalid base64 in SASL response\r\n")


@pytest.mark.parametrize(
    ("authzid", "authcid", "seen"),
    [
        ("", "alice@example.test", True),
        ("Alice@EXAMPLE.test.", "alice@example.test", True),  # the same account
        ("bob@example.test", "alice@example.test", False),  # no proxy authorization
        ("", "", False),
    ],
)
def test_plain_authzid_rule_is_the_smtp_and_pop3_one(authzid: str, authcid: str,
                                                      seen: bool) -> None:
    token = base64.b64encode(f"{authzid}\0{authcid}\0pw".encode())
    for data in (b"a AUTHENTICATE PLAIN " + token + b"\r\n",
                 b"a AUTHENTICATE PLAIN\r\n" + token + b"\r\n"):
        e = IMAPEngine(STARTTLS_PORT, tls_active=True)
        events, out = run(e, data)
        assert events == ([CheckCredentials(authcid, "pw", "PLAIN")] if seen else [])
        assert seen or out.split(b"\r\n")[-2].startswith((b"a NO", b"a BAD"))


def test_sasl_response_line_limit_is_the_shared_one() -> None:
    e = IMAPEngine(STARTTLS_PORT, tls_active=True)
    run(e, b"a AUTHENTICATE PLAIN\r\n")
    _, out = run(e, b"A" * (MAX_SASL_LINE - 2) + b"\r\n")
    assert out == b"a BAD Invalid base64 in SASL response\r\n"
    run(e, b"b AUTHENTICATE PLAIN\r\n")
    _, out = run(e, b"A" * (MAX_SASL_LINE - 1) + b"\r\n")
    assert out == b"b BAD SASL response line refused\r\n" and not e.closed


def test_unverifiable_is_not_a_failed_login() -> None:
    e = IMAPEngine(STARTTLS_PORT, tls_active=True)
    for i in range(5):
        run(e, f"t{i} LOGIN alice pw\r\n".encode())
        e.credentials_unverifiable("[LIMIT] Too many sessions")
        assert e.take_output() == f"t{i} NO [LIMIT] Too many sessions\r\n".encode()
    assert not e.closed and e.state is State.NOT_AUTHENTICATED


def test_commands_need_login_and_a_selected_mailbox() -> None:
    e = IMAPEngine(STARTTLS_PORT, tls_active=True)
    events, out = run(e, b"a SELECT INBOX\r\nb IDLE\r\nc NOOP\r\nd ENABLE QRESYNC\r\n")
    assert events == []
    assert out == (b"a BAD SELECT not allowed now: log in first\r\n"
                   b"b BAD IDLE not allowed now: log in first\r\n"
                   b"c OK NOOP completed\r\n"
                   b"d BAD ENABLE not allowed now: log in first\r\n")
    e = logged_in()
    events, out = run(e, b"e FETCH 1 FLAGS\r\nf UID STORE 1 +FLAGS (\\Seen)\r\n"
                      b"g CHECK\r\n")
    assert events == [] and out == (b"e BAD FETCH not allowed now: no mailbox selected\r\n"
                                    b"f BAD STORE not allowed now: no mailbox selected\r\n"
                                    b"g BAD CHECK not allowed now: no mailbox selected\r\n")


def test_execute_writes_untagged_then_tagged_and_follows_selected() -> None:
    e = logged_in()
    events, out = run(e, b"s SELECT INBOX\r\nn NOOP\r\n")
    assert len(events) == 1 and isinstance(events[0], Execute) and out == b""
    assert events[0].command.name == "SELECT" and e.waiting
    e.write_untagged(b"* 3 EXISTS\r\n")
    e.executed("OK", "READ-WRITE", "SELECT completed", True)
    assert e.state is State.SELECTED
    events, out = run(e, b"")  # the pipelined NOOP now
    assert out == b"* 3 EXISTS\r\ns OK [READ-WRITE] SELECT completed\r\n"
    assert [ev.command.name for ev in events] == ["NOOP"]  # type: ignore[union-attr]
    e.executed("OK", None, "NOOP completed")
    events, _ = run(e, b"c CLOSE\r\n")
    e.executed("OK", None, "CLOSE completed", False)
    assert e.state is State.AUTHENTICATED and e.take_output() == b"c OK CLOSE completed\r\n"


def test_a_reply_text_cannot_smuggle_a_line() -> None:
    e = logged_in()
    run(e, b"a STATUS INBOX (MESSAGES)\r\n")
    e.executed("NO", "NONEXISTENT", "no such\r\n* 1 EXISTS")
    assert e.take_output() == b"a NO [NONEXISTENT] no such??* 1 EXISTS\r\n"


def test_id_names_no_software() -> None:
    e = IMAPEngine(STARTTLS_PORT)
    _, out = run(e, b'a ID ("name" "Thunderbird" "version" "128")\r\nb ID NIL\r\n')
    assert out == b"* ID NIL\r\na OK ID completed\r\n* ID NIL\r\nb OK ID completed\r\n"


def test_logout_says_bye_then_ok() -> None:
    e = logged_in()
    _, out = run(e, b"z LOGOUT\r\nafter NOOP\r\n")
    assert out == b"* BYE Logging out\r\nz OK LOGOUT completed\r\n" and e.closed


# ------------------------------------------------------------------ IDLE


def test_idle_then_done() -> None:
    e = logged_in()
    events, out = run(e, b"i IDLE\r\n")
    assert events == [Idle("i")] and out == b"+ idling\r\n" and e.idling and not e.waiting
    e.write_untagged(b"* 4 EXISTS\r\n")
    assert e.take_output() == b"* 4 EXISTS\r\n"
    events, out = run(e, b"DONE\r\nn NOOP\r\n")
    assert events[0] == IdleEnded() and isinstance(events[1], Execute)
    assert out == b"i OK IDLE terminated\r\n" and not e.idling


def test_idle_ended_by_something_else_is_bad() -> None:
    e = logged_in()
    run(e, b"i IDLE\r\n")
    events, out = run(e, b"j NOOP\r\n")
    assert events == [IdleEnded()] and out == b"i BAD Expected DONE\r\n"


# ------------------------------------------------------------------ limits


def test_huge_literal_refused_before_login_without_buffering() -> None:
    e = IMAPEngine(STARTTLS_PORT, tls_active=True)
    events, out = run(e, b"a LOGIN {4294967295}\r\n")
    assert events == [] and out == b"a BAD [TOOBIG] literal too large\r\n"
    assert e.held == 0 and not e.closed
    # a non-synchronising one that large cannot even be skipped: BYE
    _, out = run(e, b"b LOGIN {4294967295+}\r\n")
    assert out.endswith(b"* BYE Protocol error, closing connection\r\n") and e.closed


def test_login_limits_are_tighter_than_the_session_ones() -> None:
    e = IMAPEngine(STARTTLS_PORT, tls_active=True)
    _, out = run(e, b"a LOGIN alice {2000}\r\n")
    assert out == b"a BAD [TOOBIG] literal too large\r\n"
    _, out = run(e, b"b APPEND INBOX {10}\r\n")  # no APPEND before login
    assert out == b"b NO [TOOBIG] literal too large\r\n"
    e = logged_in()
    _, out = run(e, b"c APPEND INBOX {2000}\r\n")
    assert out == b"+ Ready for literal data\r\n"


def test_error_limit_closes_with_bye() -> None:
    e = IMAPEngine(EngineSettings(max_errors=2))
    _, out = run(e, b"a BOGUS\r\nb BOGUS\r\nc BOGUS\r\nd CAPABILITY\r\n")
    assert out == (b"a BAD unknown command\r\nb BAD unknown command\r\n"
                   b"c BAD unknown command\r\n"
                   b"* BYE Too many errors, closing connection\r\n")
    assert e.closed


def test_slowdown_holds_replies_past_the_soft_limit() -> None:
    e = IMAPEngine(EngineSettings(max_errors=10, error_slowdown=Slowdown(1, 0.5, 2.0)))
    run(e, b"a BOGUS\r\n")
    assert e.take_hold() == 0
    run(e, b"b BOGUS\r\n")
    assert e.take_hold() == 0.5


def test_timeout_and_close_say_bye() -> None:
    e = logged_in()
    e.timeout()
    assert e.take_output() == b"* BYE Autologout; idle for too long\r\n" and e.closed
    e = IMAPEngine(STARTTLS_PORT)
    e.refuse_connection("[UNAVAILABLE] Too many connections")
    assert e.take_output() == b"* BYE [UNAVAILABLE] Too many connections\r\n"


def test_internal_error_closes_with_bye_and_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    e = IMAPEngine(STARTTLS_PORT)

    def broken(cmd: object) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(e, "_cmd_capability", broken)
    events, out = run(e, b"a CAPABILITY\r\n")
    assert events == [] and out == b"* BYE [SERVERBUG] Internal error, closing connection\r\n"
    assert isinstance(e.internal_error, KeyError) and e.closed


def test_answers_after_close_are_moot() -> None:
    e = logged_in()
    run(e, b"a SELECT INBOX\r\n")
    e.close("[UNAVAILABLE] shutting down")
    e.write_untagged(b"* 1 EXISTS\r\n")
    e.executed("OK", None, "done", True)
    assert e.take_output() == b"* BYE [UNAVAILABLE] shutting down\r\n"


# ------------------------------------------------------------------ fuzzing

COMMANDS = [
    b"a CAPABILITY", b"a NOOP", b"a LOGOUT", b"a STARTTLS", b"a LOGIN alice pw",
    b'a LOGIN "alice@example.test" {2}', b"pw", b"a AUTHENTICATE PLAIN",
    b"a AUTHENTICATE PLAIN " + PLAIN, b"a AUTHENTICATE PLAIN =", b"*", PLAIN,
    b"a ID NIL", b"a IDLE", b"DONE", b"a SELECT INBOX", b"a FETCH 1:* (FLAGS)",
    b"a UID FETCH 1 BODY.PEEK[]", b"a CLOSE", b"a APPEND INBOX {3}", b"abc",
    b"a APPEND INBOX {3+}", b"a LOGIN {4294967295}", b"a LOGIN {99999999999+}",
    b"a ENABLE QRESYNC", b"a CHECK", b"x" * 300, b"\xff\xfe", b"a \x00", b"",
]


def _answer(e: IMAPEngine, verdicts: list[int]) -> None:
    """Answer every event, choosing among the possible answers from ``verdicts``."""
    pick = iter(verdicts)
    while (ev := e.next_event()) is not None:
        choice = next(pick, 0)
        if isinstance(ev, CheckCredentials):
            assert e.tls_active or e.s.allow_plaintext
            [e.credentials_accepted, lambda _u: e.credentials_refused(),
             lambda _u: e.credentials_unverifiable()][choice % 3](ev.username)
        elif isinstance(ev, StartTLS):
            assert not e.tls_active
            e.tls_started()
        elif isinstance(ev, Execute):
            assert e.state in (State.AUTHENTICATED, State.SELECTED)
            e.write_untagged(b"* 1 EXISTS\r\n")
            e.executed(("OK", "NO", "BAD")[choice % 3], None, "done",
                       (None, True, False)[choice % 3])


@settings(max_examples=examples(300), deadline=None)
@given(
    tls=st.booleans(),
    plaintext=st.booleans(),
    lines_=st.lists(st.tuples(st.one_of(st.sampled_from(COMMANDS), st.binary(max_size=40)),
                              st.sampled_from([b"\r\n", b"\r\n", b"\n", b""])), max_size=30),
    verdicts=st.lists(st.integers(0, 2), max_size=20),
    split=st.integers(min_value=1, max_value=64),
)
def test_random_input_never_raises_and_every_line_is_a_response(
    tls: bool, plaintext: bool, lines_: list[tuple[bytes, bytes]], verdicts: list[int],
    split: int,
) -> None:
    e = IMAPEngine(EngineSettings(tls_available=True, allow_plaintext=plaintext,
                                  max_errors=1000), tls_active=tls)
    e.greet()
    data = b"".join(line + end for line, end in lines_)
    out = e.take_output()
    for i in range(0, len(data), split):
        e.receive(data[i:i + split])
        _answer(e, verdicts)
        out += e.take_output()
        assert e.held <= 8192 + 65536 + split  # bounded by the reader's limits
    assert out.endswith(b"\r\n")
    for ln in out.split(b"\r\n")[:-1]:
        assert ln.startswith((b"* ", b"+ ")) or ln.split(b" ")[1:2] in (
            [b"OK"], [b"NO"], [b"BAD"]), ln
        assert b"\r" not in ln and b"\n" not in ln
    assert e.internal_error is None
