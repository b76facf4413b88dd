"""Unit tests of the sans-I/O POP3 engine and the RETR/TOP encoder (no sockets)."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailfort.protocol.pop3 import (
    MAX_LINE,
    CheckCredentials,
    EngineSettings,
    MessageEncoder,
    OpenMailbox,
    POP3Engine,
    Quit,
    Retrieve,
    StartTLS,
    State,
    wire_size,
)
from tests.fuzzing import examples

STLS_SETTINGS = EngineSettings(tls_available=True, max_errors=5)
LISTING = [("uid-a", 100), ("uid-b", 250), ("uid-c", 7)]


def run(engine: POP3Engine, data: bytes = b"") -> tuple[list[object], bytes]:
    """Feed data; collect events (without answering) and output."""
    engine.receive(data)
    events = []
    while (ev := engine.next_event()) is not None:
        events.append(ev)
    return events, engine.take_output()


def logged_in(listing: list[tuple[str, int]] = LISTING) -> POP3Engine:
    e = POP3Engine(STLS_SETTINGS, tls_active=True)
    e.greet()
    events, _ = run(e, b"USER alice@example.test\r\nPASS secret pw\r\n")
    assert events == [CheckCredentials("alice@example.test", "secret pw", "USER")]
    e.credentials_accepted("alice@example.test")
    events, _ = run(e)
    assert events == [OpenMailbox("alice@example.test")]
    e.mailbox_opened(listing)
    e.take_output()
    assert e.state is State.TRANSACTION
    return e


def lines(out: bytes) -> list[str]:
    return out.decode().split("\r\n")[:-1]


def test_greeting_names_no_software() -> None:
    e = POP3Engine(EngineSettings())
    e.greet()
    out = e.take_output()
    assert out == b"+OK POP3 ready\r\n"


def test_capa_before_tls_hides_user_and_sasl_and_offers_stls() -> None:
    e = POP3Engine(STLS_SETTINGS)
    _, out = run(e, b"CAPA\r\n")
    caps = lines(out)
    assert caps[0].startswith("+OK")
    assert caps[-1] == "."
    for cap in ("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "STLS"):
        assert cap in caps
    assert "USER" not in caps
    assert not any(c.startswith("SASL") for c in caps)
    assert not any("APOP" in c or "IMPLEMENTATION" in c for c in caps)


def test_capa_after_tls_offers_user_and_sasl_plain_not_stls() -> None:
    e = POP3Engine(STLS_SETTINGS, tls_active=True)
    _, out = run(e, b"CAPA\r\n")
    caps = lines(out)
    assert "USER" in caps and "SASL PLAIN" in caps
    assert "STLS" not in caps


def test_utf8_password_reaches_the_check() -> None:
    e = POP3Engine(STLS_SETTINGS, tls_active=True)
    events, _ = run(e, "USER j\u00fcrgen@example.test\r\nPASS p\u00e4ss w\u00f6rd\r\n".encode())
    assert events == [CheckCredentials("j\u00fcrgen@example.test", "p\u00e4ss w\u00f6rd", "USER")]
    e.credentials_refused()
    e.take_output()
    _, out = run(e, b"\xff\xfe\r\n")
    assert out.startswith(b"-ERR")


def test_plaintext_allowed_by_setting_offers_user() -> None:
    e = POP3Engine(EngineSettings(allow_plaintext=True))
    _, out = run(e, b"CAPA\r\n")
    assert "USER" in lines(out)
    events, _ = run(e, b"USER a\r\nPASS b\r\n")
    assert events == [CheckCredentials("a", "b", "USER")]


def test_credentials_refused_before_tls_without_event() -> None:
    e = POP3Engine(STLS_SETTINGS)
    token = base64.b64encode(b"\0alice\0pw").decode()
    events, out = run(e, f"USER alice\r\nPASS pw\r\nAUTH PLAIN {token}\r\nAPOP a b\r\n".encode())
    assert events == []
    replies = lines(out)
    assert len(replies) == 4
    assert all(r.startswith("-ERR [AUTH]") for r in replies)
    assert e.state is State.AUTHORIZATION


def test_stls_discards_pipelined_plaintext() -> None:
    e = POP3Engine(STLS_SETTINGS)
    events, out = run(e, b"STLS\r\nUSER mallory\r\nPASS x\r\n")
    assert events == [StartTLS()]
    assert out == b"+OK Begin TLS negotiation\r\n"
    assert e.waiting
    # The server reads no more plaintext once StartTLS is out, so what arrives now came
    # through TLS before the handshake was noted: it is answered after tls_started.
    e.receive(b"CAPA\r\n")
    assert e.next_event() is None and e.take_output() == b""
    e.tls_started()
    events, out = run(e)
    assert events == [] and out.startswith(b"+OK Capabil")
    events, out = run(e, b"PASS x\r\n")
    assert events == []
    assert out.startswith(b"-ERR")  # the pre-TLS USER did not survive
    _, out = run(e, b"STLS\r\n")
    assert out.startswith(b"-ERR")


def test_stls_unavailable_without_certificate() -> None:
    e = POP3Engine(EngineSettings())
    events, out = run(e, b"STLS\r\n")
    assert events == [] and out.startswith(b"-ERR")


def test_auth_plain_initial_response_and_continuation_and_cancel() -> None:
    e = POP3Engine(STLS_SETTINGS, tls_active=True)
    token = base64.b64encode(b"\0alice@example.test\0pw").decode()
    events, _ = run(e, f"AUTH PLAIN {token}\r\n".encode())
    assert events == [CheckCredentials("alice@example.test", "pw", "PLAIN")]
    e.credentials_refused()
    assert e.take_output() == b"-ERR [AUTH] Authentication failed\r\n"

    events, out = run(e, b"AUTH PLAIN\r\n")
    assert out == b"+ \r\n" and events == []
    events, _ = run(e, token.encode() + b"\r\n")
    assert events == [CheckCredentials("alice@example.test", "pw", "PLAIN")]
    e.credentials_refused()
    e.take_output()

    e2 = POP3Engine(STLS_SETTINGS, tls_active=True)
    run(e2, b"AUTH PLAIN\r\n")
    events, out = run(e2, b"*\r\n")
    assert events == [] and out.startswith(b"-ERR")
    events, out = run(e2, b"AUTH PLAIN\r\n!!notbase64\r\n")
    assert events == [] and b"-ERR" in out


def test_auth_plain_refuses_proxy_authorization_and_other_mechanisms() -> None:
    e = POP3Engine(STLS_SETTINGS, tls_active=True)
    token = base64.b64encode(b"bob\0alice\0pw").decode()
    events, out = run(e, f"AUTH PLAIN {token}\r\nAUTH CRAM-MD5\r\n".encode())
    assert events == []
    assert [r[:4] for r in lines(out)] == ["-ERR", "-ERR"]


@pytest.mark.parametrize(
    "arg", ["\u00e9", "\u00e9\u00e9\u00e9\u00e9", "AGFsaWNlAHB3\u00e9", "\U0001f600"])
def test_non_ascii_initial_response_gets_err_not_an_exception(arg: str) -> None:
    """Issue 15 item 2: ``AUTH PLAIN é`` raised UnicodeEncodeError out of the engine."""
    e = POP3Engine(STLS_SETTINGS, tls_active=True)
    events, out = run(e, f"AUTH PLAIN {arg}\r\nCAPA\r\n".encode())
    assert events == []
    assert lines(out)[0] == "-ERR Invalid base64 in SASL response"
    assert lines(out)[1].startswith("+OK Capability")  # the session goes on
    assert e.internal_error is None


def test_authzid_naming_the_same_account_in_another_spelling_is_accepted() -> None:
    e = POP3Engine(STLS_SETTINGS, tls_active=True)
    token = base64.b64encode(b"ALICE@Example.Test.\0alice@example.test\0pw").decode()
    events, _ = run(e, f"AUTH PLAIN {token}\r\n".encode())
    assert events == [CheckCredentials("alice@example.test", "pw", "PLAIN")]


def test_bare_lf_ends_no_line() -> None:
    """CRLF only, as in SMTP: ``USER x<LF>`` is refused, not taken as a command."""
    e = POP3Engine(STLS_SETTINGS, tls_active=True)
    events, out = run(e, b"USER alice\nPASS pw\r\n")
    assert events == []
    assert lines(out) == ["-ERR Bare CR or LF in command line not allowed", "-ERR USER first"]


def test_credentials_before_tls_count_as_errors() -> None:
    """Every -ERR counts: USER refused before STLS, repeated, once went on forever."""
    e = POP3Engine(STLS_SETTINGS)
    _, out = run(e, b"USER a\r\n" * 10)
    assert e.closed
    assert lines(out)[-1] == "-ERR Too many errors, closing connection"
    assert len(lines(out)) == 7


def test_auth_without_mechanism_lists_plain() -> None:
    e = POP3Engine(STLS_SETTINGS, tls_active=True)
    _, out = run(e, b"AUTH\r\n")
    assert lines(out) == ["+OK Mechanisms follow", "PLAIN", "."]


def test_three_failed_logins_close_the_session() -> None:
    e = POP3Engine(STLS_SETTINGS, tls_active=True)
    for _ in range(3):
        run(e, b"USER a\r\nPASS b\r\n")
        e.credentials_refused()
    assert e.closed


def test_in_use_keeps_authorization_state() -> None:
    e = POP3Engine(STLS_SETTINGS, tls_active=True)
    run(e, b"USER a\r\nPASS b\r\n")
    e.credentials_accepted("a@example.test")
    run(e)
    e.mailbox_unavailable("[IN-USE] Mailbox is locked by another session")
    assert e.take_output().startswith(b"-ERR [IN-USE]")
    assert e.state is State.AUTHORIZATION and e.user is None
    _, out = run(e, b"STAT\r\n")
    assert out.startswith(b"-ERR")


def test_line_limit_is_255_octets_including_crlf() -> None:
    e = POP3Engine(STLS_SETTINGS, tls_active=True)
    ok_line = b"USER " + b"a" * (MAX_LINE - 7) + b"\r\n"
    assert len(ok_line) == MAX_LINE
    _, out = run(e, ok_line)
    assert out.startswith(b"+OK")
    long_line = b"USER " + b"a" * MAX_LINE + b"\r\n"
    events, out = run(e, long_line + b"NOOP\r\n")
    # one -ERR for the long line; its tail is skipped; NOOP is not valid before login
    assert lines(out)[0] == "-ERR Command line too long"
    assert len(lines(out)) == 2
    assert events == []


def test_bad_commands_close_after_max_errors() -> None:
    e = POP3Engine(STLS_SETTINGS)
    _, out = run(e, b"FOO\r\n" * 10)
    assert e.closed
    assert lines(out)[-1].startswith("-ERR Too many errors")
    # max_errors=5: five errors are forgiven, the sixth is answered and ends the session
    assert len(lines(out)) == 7


def test_transaction_commands_per_rfc1939() -> None:
    e = logged_in()
    _, out = run(e, b"STAT\r\nLIST\r\nLIST 2\r\nUIDL\r\nUIDL 3\r\nLIST 4\r\nLIST 0\r\n")
    assert lines(out) == [
        "+OK 3 357",
        "+OK 3 messages (357 octets)", "1 100", "2 250", "3 7", ".",
        "+OK 2 250",
        "+OK Unique-ID listing follows", "1 uid-a", "2 uid-b", "3 uid-c", ".",
        "+OK 3 uid-c",
        "-ERR No such message",
        "-ERR No such message",
    ]
    _, out = run(e, b"DELE 2\r\nDELE 2\r\nSTAT\r\nLIST\r\nRETR 2\r\nUIDL 2\r\n")
    assert lines(out) == [
        "+OK Message 2 deleted",
        "-ERR Message already deleted",
        "+OK 2 107",
        "+OK 2 messages (107 octets)", "1 100", "3 7", ".",
        "-ERR Message already deleted",
        "-ERR Message already deleted",
    ]
    _, out = run(e, b"RSET\r\nSTAT\r\nNOOP\r\n")
    assert lines(out) == ["+OK 3 messages (357 octets)", "+OK 3 357", "+OK "]


def test_retr_and_top_events_wait_for_the_server() -> None:
    e = logged_in()
    events, out = run(e, b"RETR 1\r\nTOP 3 5\r\n")
    assert events == [Retrieve(0, "uid-a", None)]
    assert out == b""
    e.retrieve_started(100)
    assert e.take_output() == b"+OK 100 octets\r\n"
    e.retrieve_done()
    events, _ = run(e)
    assert events == [Retrieve(2, "uid-c", 5)]
    e.retrieve_failed("[SYS/TEMP] gone")
    assert e.take_output() == b"-ERR [SYS/TEMP] gone\r\n"
    _, out = run(e, b"TOP 1\r\nTOP 1 -1\r\n")
    assert [r[:4] for r in lines(out)] == ["-ERR", "-ERR"]


@settings(max_examples=examples(50), deadline=None)
@given(st.integers(min_value=0, max_value=10**12), st.binary(max_size=20))
def test_a_message_sent_whole_has_the_streamed_reply(size: int, wire: bytes) -> None:
    """``retrieve_whole`` formats its ``+OK`` itself (one %-format, not ``_ok``): the same
    octets as ``retrieve_started`` followed by the message, and counted in
    ``output_size``."""
    whole, streamed = logged_in(), logged_in()
    run(whole, b"RETR 1\r\n")
    run(streamed, b"RETR 1\r\n")
    whole.retrieve_whole(size, wire)
    assert whole.output_size == len(f"+OK {size} octets\r\n") + len(wire)
    streamed.retrieve_started(size)
    assert whole.take_output() == streamed.take_output() + wire
    assert whole.take_output() == b""


def test_quit_in_transaction_enters_update_with_deletions() -> None:
    e = logged_in()
    events, _ = run(e, b"DELE 3\r\nDELE 1\r\nQUIT\r\n")
    assert events == [Quit(((0, "uid-a"), (2, "uid-c")))]
    assert e.state is State.UPDATE
    e.take_output()
    e.update_done(0)
    assert e.take_output() == b"+OK Bye\r\n"
    assert e.closed


def test_quit_in_authorization_has_no_update() -> None:
    e = POP3Engine(STLS_SETTINGS)
    events, out = run(e, b"QUIT\r\n")
    assert events == [] and out == b"+OK Bye\r\n" and e.closed


def test_timeout_does_not_enter_update() -> None:
    e = logged_in()
    run(e, b"DELE 1\r\n")
    e.timeout()
    events, out = run(e)
    assert events == [] and out.startswith(b"-ERR")
    assert e.closed and e.state is not State.UPDATE


def test_transaction_refuses_authorization_commands() -> None:
    e = logged_in()
    _, out = run(e, b"USER x\r\nSTLS\r\nCAPA\r\n")
    replies = lines(out)
    assert replies[0].startswith("-ERR") and replies[1].startswith("-ERR")
    assert "USER" not in replies and "STLS" not in replies


# ------------------------------------------------------------------ encoder

def encode(data: bytes, top: int | None = None, chunk: int = 7) -> bytes:
    enc = MessageEncoder(top)
    out = b"".join(enc.feed(data[i:i + chunk]) for i in range(0, len(data), chunk))
    return out + enc.finish()


def unstuff(wire: bytes) -> bytes:
    assert wire.endswith(b".\r\n")
    body = wire[:-3]
    lines_ = body.split(b"\r\n")
    return b"\r\n".join(ln[1:] if ln.startswith(b".") else ln for ln in lines_)


def test_encoder_stuffs_dots_and_normalises_line_endings() -> None:
    data = b"Subject: x\n\n.hidden\r\n..two\nend"
    assert encode(data) == b"Subject: x\r\n\r\n..hidden\r\n...two\r\nend\r\n.\r\n"
    assert encode(b"") == b".\r\n"
    assert encode(b".\r\n") == b"..\r\n.\r\n"


def test_encoder_top() -> None:
    msg = b"A: 1\r\nB: 2\r\n\r\nl1\r\n.l2\r\nl3\r\n"
    assert encode(msg, 0) == b"A: 1\r\nB: 2\r\n\r\n.\r\n"
    assert encode(msg, 2) == b"A: 1\r\nB: 2\r\n\r\nl1\r\n..l2\r\n.\r\n"
    assert encode(msg, 99) == encode(msg)
    assert encode(b"A: 1\nB: 2\n", 1) == b"A: 1\r\nB: 2\r\n.\r\n"  # no body at all


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=300).map(lambda b: b.replace(b"x", b"\n").replace(b"y", b"\r")),
       st.integers(min_value=1, max_value=20))
def test_encoder_properties(data: bytes, chunk: int) -> None:
    wire = encode(data, chunk=chunk)
    assert wire == encode(data, chunk=len(data) or 1)  # chunking never matters
    plain = unstuff(wire)
    assert len(plain) == wire_size([data[i:i + chunk] for i in range(0, len(data), chunk)])
    # nothing on the wire but CRLF line ends, and the terminator appears only at the end
    assert b"\r\n.\r\n" not in wire[:-3] and not wire[:-3].startswith(b".\r\n")
    assert b"\n" not in wire.replace(b"\r\n", b"")
    assert b"\r" not in wire.replace(b"\r\n", b"")
    # CRLF, bare LF and bare CR each end a line (protocol/dotstuff.py, as SMTP DATA)
    lines_ = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    assert plain.replace(b"\r\n", b"\n") == lines_ + (
        b"\n" if lines_ and not lines_.endswith(b"\n") else b"")


# ------------------------------------------------------------------ property test

COMMANDS = [
    b"USER alice", b"PASS pw", b"PASS", b"AUTH PLAIN", b"AUTH PLAIN AGFsaWNlAHB3", b"AUTH", b"*",
    b"AUTH PLAIN =", b"APOP a b", b"STLS", b"CAPA", b"STAT", b"LIST", b"LIST 1", b"UIDL",
    b"UIDL 2", b"RETR 1", b"TOP 1 0", b"TOP 2 3", b"DELE 1", b"RSET", b"NOOP", b"QUIT",
    b"LIST 99999999999", b"x" * 300, b"\xff\xfe", b"RETR \x00", b"",
]


@settings(max_examples=examples(400), deadline=None)
@given(
    tls=st.booleans(),
    plaintext=st.booleans(),
    stream=st.lists(
        st.one_of(st.sampled_from(COMMANDS), st.binary(max_size=40)), max_size=30
    ),
    answers=st.lists(st.booleans(), max_size=30),
    split=st.integers(min_value=1, max_value=50),
)
def test_random_streams_never_crash_or_skip_authentication(
    tls: bool, plaintext: bool, stream: list[bytes], answers: list[bool], split: int
) -> None:
    e = POP3Engine(EngineSettings(tls_available=True, allow_plaintext=plaintext), tls_active=tls)
    e.greet()
    data = b"".join(c + b"\r\n" for c in stream)
    answer = iter(answers)
    accepted = False
    for i in range(0, len(data), split):
        e.receive(data[i:i + split])
        while (ev := e.next_event()) is not None:
            if isinstance(ev, CheckCredentials):
                assert e.tls_active or plaintext
                if next(answer, False):
                    accepted = True
                    e.credentials_accepted(ev.username)
                else:
                    e.credentials_refused()
            elif isinstance(ev, OpenMailbox):
                assert accepted
                e.mailbox_opened(LISTING)
            elif isinstance(ev, StartTLS):
                e.tls_started()
            elif isinstance(ev, Retrieve):
                assert e.state is State.TRANSACTION
                e.retrieve_started(LISTING[ev.index][1])
                e.retrieve_done()
            elif isinstance(ev, Quit):
                assert e.state is State.UPDATE
                e.update_done(0)
        out = e.take_output()
        assert all(ln[:1] in (b"+", b"-", b".") or ln[:1].isalnum() or ln == b""
                   for ln in out.split(b"\r\n"))
        if e.state in (State.TRANSACTION, State.UPDATE):
            assert accepted
    assert e.state is not State.TRANSACTION or accepted
    assert e.internal_error is None


# ------------------------------------------------------------------ fuzzing with AUTH

_VERBS = [b"USER", b"PASS", b"AUTH", b"AUTH PLAIN", b"auth plain", b"AUTH LOGIN", b"APOP",
          b"STLS", b"CAPA", b"STAT", b"LIST", b"UIDL", b"RETR", b"TOP", b"DELE", b"RSET",
          b"NOOP", b"QUIT"]
_PLAIN = st.tuples(
    st.sampled_from(["", "alice@example.test", "ALICE@Example.TEST.", "bob@example.test"]),
    st.sampled_from(["", "alice@example.test", "\u00e9@example.test"]),
    st.sampled_from(["", "pw", "p\u00e4ss"]),
).map(lambda t: base64.b64encode("\0".join(t).encode()))
# An argument is anything: raw bytes (non-ASCII, NUL, CR), text, base64 of a PLAIN message.
_ARG = st.one_of(st.binary(max_size=40), st.text(min_size=1, max_size=20).map(str.encode),
                 _PLAIN, st.binary(max_size=30).map(base64.b64encode))
# Credentials commands are drawn more often: they are where the engine decodes the most.
_VERB = st.one_of(st.sampled_from([b"AUTH PLAIN", b"USER", b"PASS"]), st.sampled_from(_VERBS))
_LINE = st.one_of(
    st.tuples(_VERB, _ARG).map(lambda t: t[0] + b" " + t[1]),
    st.sampled_from(COMMANDS),
    _ARG,  # a bare SASL continuation, or noise
)
_END = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""])


def _answer_pop3(e: POP3Engine, accept: Iterator[bool], plaintext: bool) -> None:
    while (ev := e.next_event()) is not None:
        if isinstance(ev, CheckCredentials):
            assert e.tls_active or plaintext
            if next(accept, False):
                e.credentials_accepted(ev.username)
            else:
                e.credentials_refused()
        elif isinstance(ev, OpenMailbox):
            e.mailbox_opened(LISTING)
        elif isinstance(ev, StartTLS):
            e.tls_started()
        elif isinstance(ev, Retrieve):
            e.retrieve_started(LISTING[ev.index][1])
            e.retrieve_done()
        elif isinstance(ev, Quit):
            e.update_done(0)


@settings(max_examples=examples(300), deadline=None)
@given(
    tls=st.booleans(),
    plaintext=st.booleans(),
    lines_=st.lists(st.tuples(_LINE, _END), max_size=25),
    accept=st.lists(st.booleans(), max_size=10),
    split=st.integers(min_value=1, max_value=64),
)
def test_random_commands_with_auth_always_get_a_reply(
    tls: bool, plaintext: bool, lines_: list[tuple[bytes, bytes]], accept: list[bool],
    split: int,
) -> None:
    """Any bytes, with AUTH/USER/PASS reachable: never an exception, every line a reply."""
    e = POP3Engine(EngineSettings(tls_available=True, allow_plaintext=plaintext), tls_active=tls)
    e.greet()
    answers = iter(accept)
    data = b"".join(line + end for line, end in lines_)
    out = e.take_output()
    for i in range(0, len(data), split):
        e.receive(data[i:i + split])
        _answer_pop3(e, answers, plaintext)
        out += e.take_output()
    # the session still answers: end any partial line, then one command
    e.receive(b"\r\nCAPA\r\n")
    _answer_pop3(e, answers, plaintext)
    tail = e.take_output()
    assert tail or e.closed
    for ln in (out + tail).split(b"\r\n")[:-1]:
        assert ln.startswith((b"+OK", b"-ERR", b"+ ")) or ln == b"." or ln[:1].isalnum(), ln
    assert e.internal_error is None


def test_credentials_unverifiable_is_temporary_and_not_a_failure() -> None:
    """Shared counters down (policy/authn.py): -ERR [SYS/TEMP]; it does not count toward
    the failures that end the session, and the client may try again in the session."""
    e = POP3Engine(STLS_SETTINGS, tls_active=True)
    for _ in range(STLS_SETTINGS.max_auth_failures + 1):
        events, _ = run(e, b"USER alice@example.test\r\nPASS pw\r\n")
        assert events == [CheckCredentials("alice@example.test", "pw", "USER")]
        e.credentials_unverifiable()
        assert e.take_output().startswith(b"-ERR [SYS/TEMP] ")
        assert not e.closed
    run(e, b"USER alice@example.test\r\nPASS pw\r\n")
    e.credentials_accepted("alice@example.test")
    assert e.next_event() == OpenMailbox("alice@example.test")
