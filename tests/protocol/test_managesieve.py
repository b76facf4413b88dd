"""The ManageSieve engine (RFC 5804) on its own: bytes in, replies and events out, and
fuzzing. Events are answered here by hand, as the driver would."""

from __future__ import annotations

import base64
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from mailfort.protocol.managesieve import (
    LOGIN_DISCARD,
    MAX_STRING,
    CheckCredentials,
    EngineSettings,
    Execute,
    ManageSieveEngine,
    StartTLS,
    State,
    quote,
)
from tests.fuzzing import examples

PLAIN = base64.b64encode(b"\0alice@example.test\0pw")
TLS = EngineSettings(tls_available=True, sieve_extensions=("fileinto", "vacation"))


def engine(settings: EngineSettings = TLS, *, tls: bool = False) -> ManageSieveEngine:
    e = ManageSieveEngine(settings, tls_active=tls)
    e.greet()
    e.take_output()
    return e


def logged_in(settings: EngineSettings = TLS) -> ManageSieveEngine:
    e = engine(settings, tls=True)
    e.receive(b'AUTHENTICATE "PLAIN" "' + PLAIN + b'"\r\n')
    ev = e.next_event()
    assert isinstance(ev, CheckCredentials) and ev.username == "alice@example.test"
    e.credentials_accepted("alice@example.test")
    assert e.take_output() == b'OK "Logged in"\r\n'
    return e


def feed(e: ManageSieveEngine, data: bytes) -> tuple[list[object], bytes]:
    """Feed and collect events (answered OK when they need an answer) and output."""
    e.receive(data)
    events: list[object] = []
    while (ev := e.next_event()) is not None:
        events.append(ev)
        if isinstance(ev, Execute):
            e.executed(True)
    return events, e.take_output()


# ------------------------------------------------------------------ capabilities and TLS


def test_greeting_before_tls_offers_starttls_and_no_mechanism() -> None:
    e = ManageSieveEngine(TLS)
    e.greet()
    out = e.take_output()
    assert out == (b'"IMPLEMENTATION" "ManageSieve"\r\n"SASL" ""\r\n'
                   b'"SIEVE" "fileinto vacation"\r\n"STARTTLS"\r\n"MAXREDIRECTS" "4"\r\n'
                   b'"UNAUTHENTICATE"\r\n"VERSION" "1.0"\r\nOK "ManageSieve ready"\r\n')
    assert b"NOTIFY" not in out and not re.search(rb"IMPLEMENTATION.*\d", out)


def test_authenticate_before_tls_is_refused_without_an_event() -> None:
    e = engine()
    events, out = feed(e, b'AUTHENTICATE "PLAIN" "' + PLAIN + b'"\r\n')
    assert events == [] and out == b'NO (ENCRYPT-NEEDED) "Use STARTTLS before AUTHENTICATE"\r\n'
    events, out = feed(e, b'AUTHENTICATE "PLAIN"\r\n')
    assert events == [] and out.startswith(b"NO (ENCRYPT-NEEDED)")  # no "" challenge either


def test_loopback_exception_allows_plain_in_the_clear() -> None:
    e = ManageSieveEngine(EngineSettings(tls_available=True, allow_plaintext=True))
    e.greet()
    assert b'"SASL" "PLAIN"\r\n' in e.take_output()
    events, _ = feed(e, b'AUTHENTICATE "PLAIN" "' + PLAIN + b'"\r\n')
    assert isinstance(events[0], CheckCredentials)


def test_starttls_discards_pipelined_plaintext_and_resends_capabilities() -> None:
    e = engine()
    e.receive(b'STARTTLS\r\nAUTHENTICATE "PLAIN" "' + PLAIN + b'"\r\nLOGOUT\r\n')
    assert isinstance(e.next_event(), StartTLS)
    assert e.take_output() == b'OK "Begin TLS negotiation now"\r\n'
    e.tls_started()
    out = e.take_output()
    assert b'"SASL" "PLAIN"\r\n' in out and b"STARTTLS" not in out
    assert out.endswith(b'OK "TLS active"\r\n')
    assert e.next_event() is None and not e.closed and e.take_output() == b""


def test_starttls_twice_or_without_certificate_is_refused() -> None:
    _, out = feed(engine(tls=True), b"STARTTLS\r\n")
    assert out == b'NO "TLS already active"\r\n'
    _, out = feed(engine(EngineSettings()), b"STARTTLS\r\n")
    assert out == b'NO "STARTTLS not available"\r\n'


# ------------------------------------------------------------------ authentication


def test_authenticate_with_a_continuation_literal() -> None:
    e = engine(tls=True)
    events, out = feed(e, b'AUTHENTICATE "PLAIN"\r\n')
    assert events == [] and out == b'""\r\n'
    events, _ = feed(e, b"{%d+}\r\n" % len(PLAIN) + PLAIN + b"\r\n")
    assert isinstance(events[0], CheckCredentials) and events[0].password == "pw"


def test_authenticate_cancelled_and_malformed() -> None:
    e = engine(tls=True)
    feed(e, b'AUTHENTICATE "PLAIN"\r\n')
    assert feed(e, b'"*"\r\n') == ([], b'NO "Authentication cancelled"\r\n')
    assert feed(e, b'AUTHENTICATE "PLAIN" "!!"\r\n')[1] == \
        b'NO "Invalid base64 in SASL response"\r\n'
    assert feed(e, b'AUTHENTICATE "DIGEST-MD5"\r\n')[1] == \
        b'NO "Unsupported authentication mechanism"\r\n'


def test_three_failed_logins_end_the_session() -> None:
    e = engine(tls=True)
    for _ in range(3):
        ev, _ = feed(e, b'AUTHENTICATE "PLAIN" "' + PLAIN + b'"\r\n')
        assert isinstance(ev[0], CheckCredentials)
        e.credentials_refused()
        out = e.take_output()
        assert out.startswith(b'NO "Authentication failed"\r\n')
    assert e.closed and out.endswith(b'BYE "Too many authentication failures, closing '
                                      b'connection"\r\n')


def test_unverifiable_login_says_trylater_and_is_not_a_failure() -> None:
    e = engine(tls=True)
    feed(e, b'AUTHENTICATE "PLAIN" "' + PLAIN + b'"\r\n')
    e.credentials_unverifiable()
    assert e.take_output().startswith(b"NO (TRYLATER)")
    assert e.state is State.NOT_AUTHENTICATED and not e.closed


def test_unauthenticate_returns_to_the_start() -> None:
    e = logged_in()
    _, out = feed(e, b"UNAUTHENTICATE\r\nLISTSCRIPTS\r\n")
    assert out == (b'OK "Logged out, authenticate again"\r\n'
                   b'NO "LISTSCRIPTS not allowed now: log in first"\r\n')
    assert e.user is None


# ------------------------------------------------------------------ script commands


def test_script_commands_need_a_login() -> None:
    _, out = feed(engine(tls=True), b'GETSCRIPT "a"\r\n')
    assert out == b'NO "GETSCRIPT not allowed now: log in first"\r\n'


def test_script_commands_become_events_with_typed_arguments() -> None:
    e = logged_in()
    events, out = feed(e, b'PUTSCRIPT "my script" {6+}\r\nkeep;\n\r\nHAVESPACE "x" 100\r\n'
                       b'RENAMESCRIPT "a" {1+}\r\nb\r\nSETACTIVE ""\r\nCHECKSCRIPT "stop;"\r\n')
    assert events == [Execute("PUTSCRIPT", (b"my script", b"keep;\n")),
                      Execute("HAVESPACE", (b"x", 100)),
                      Execute("RENAMESCRIPT", (b"a", b"b")),
                      Execute("SETACTIVE", (b"",)),
                      Execute("CHECKSCRIPT", (b"stop;",))]
    assert out == b"OK\r\n" * 5


def test_wrong_arguments_are_refused_by_the_engine() -> None:
    e = logged_in()
    events, out = feed(e, b'HAVESPACE "x" "100"\r\nGETSCRIPT\r\nLISTSCRIPTS "x"\r\n'
                       b"DELETESCRIPT foo\r\n")
    assert events == []
    assert out == (b'NO "HAVESPACE: a number argument is expected"\r\n'
                   b'NO "GETSCRIPT takes 1 argument(s)"\r\n'
                   b'NO "LISTSCRIPTS takes 0 argument(s)"\r\n'
                   b'NO "DELETESCRIPT: a string argument is expected"\r\n')


def test_listing_and_script_answers() -> None:
    e = logged_in()
    e.receive(b"LISTSCRIPTS\r\nGETSCRIPT \"a\"\r\n")
    assert e.next_event() == Execute("LISTSCRIPTS", ())
    e.executed(True, listing=[("a", True), ('q"uote', False), ("x" * 2000, False)])
    assert e.next_event() == Execute("GETSCRIPT", (b"a",))
    e.executed(True, script=b"keep;\r\n")
    assert e.take_output() == (b'"a" ACTIVE\r\n"q\\"uote"\r\n{2000}\r\n' + b"x" * 2000
                               + b"\r\nOK\r\n{7}\r\nkeep;\r\n\r\nOK\r\n")
    e.receive(b'DELETESCRIPT "a"\r\n')
    e.next_event()
    e.executed(False, "ACTIVE", "the active script cannot be deleted")
    assert e.take_output() == b'NO (ACTIVE) "the active script cannot be deleted"\r\n'


def test_noop_with_a_tag_and_logout_ends_reading() -> None:
    e = engine()
    _, out = feed(e, b'NOOP "t1"\r\nLOGOUT\r\nCAPABILITY\r\n')
    assert out == b'OK (TAG "t1") "Done"\r\nOK "Logout completed"\r\n'
    assert e.closed


# ------------------------------------------------------------------ strings and limits


def test_script_literal_over_the_limit_is_refused_at_its_announcement() -> None:
    e = logged_in(EngineSettings(tls_available=True, max_script_size=100))
    events, out = feed(e, b'PUTSCRIPT "big" {101+}\r\n')
    assert events == [] and out == b'NO (QUOTA/MAXSIZE) "A script is at most 100 octets"\r\n'
    # The octets are counted away, never held; what follows the command is read.
    events, out = feed(e, b"x" * 60)
    assert e.held < 60 and out == b""  # the name and command only
    events, out = feed(e, b"LOGOUT\r\n" + b"y" * 33 + b"\r\nNOOP\r\n")
    assert events == [] and out == b'OK "Done"\r\n' and not e.closed


def test_literal_past_the_discard_bound_ends_the_session_unread() -> None:
    e = logged_in(EngineSettings(tls_available=True, max_script_size=100, max_discard=1000))
    _, out = feed(e, b'PUTSCRIPT "big" {1001+}\r\n')
    assert out == b'BYE "String too large, closing connection"\r\n' and e.closed


def test_before_login_a_large_literal_ends_the_session() -> None:
    e = engine(tls=True)
    _, out = feed(e, b'AUTHENTICATE "PLAIN" {%d+}\r\n' % (LOGIN_DISCARD + 1))
    assert out.startswith(b"BYE") and e.closed
    e = engine(tls=True)
    _, out = feed(e, b'NOOP {%d+}\r\n' % (MAX_STRING + 1) + b"a" * (MAX_STRING + 1) + b"\r\n")
    assert out == b'NO "String too long"\r\n' and not e.closed


def test_quoted_strings_are_bounded_and_strict() -> None:
    e = engine()
    _, out = feed(e, b'NOOP "' + b"a" * 1025 + b'"\r\nNOOP "a\\b"\r\nNOOP "ok\\"\\\\"\r\n')
    assert out == (b'NO "Quoted string too long, use a literal"\r\n'
                   b'NO "Invalid escape in quoted string"\r\n'
                   b'OK (TAG "ok\\"\\\\") "Done"\r\n')


def test_a_refused_command_skips_its_literals() -> None:
    """A line that ends in {N+} is followed by N octets of the same command: a refused
    command must skip them, or they would be read as commands (smuggling)."""
    e = engine(tls=True)
    _, out = feed(e, b'BOGUS x {8+}\r\nLOGOUT\r\n\r\nNOOP\r\n')
    assert out == b'NO "Unknown command"\r\nOK "Done"\r\n' and not e.closed
    _, out = feed(e, b'NOOP  "x" {8+}\r\nLOGOUT\r\n\r\nNOOP\r\n')  # a syntax error
    assert out == b'NO "Unexpected space"\r\nOK "Done"\r\n' and not e.closed


def test_a_refused_line_never_takes_the_next_command_or_a_literal_with_it() -> None:
    """An empty line, and a line that meets the length limit at its {N+}: each is refused
    alone; the literal's octets are skipped, not read as commands."""
    e = engine(tls=True)
    _, out = feed(e, b"\r\nNOOP\r\n")
    assert out == b'NO "Empty command"\r\nOK "Done"\r\n'
    inner = b"x\r\nLOGOUT\r\nyy"
    _, out = feed(e, b"NOOP " + b"A" * 8186 + b" {%d+}\r\n" % len(inner) + inner
                  + b"\r\nNOOP\r\n")
    assert out == b'NO "Command line too long"\r\nOK "Done"\r\n' and not e.closed


def test_bare_line_endings_and_nul_are_refused() -> None:
    e = engine()
    _, out = feed(e, b"NOOP\nNOOP\r\nNO\x00OP\r\nNOOP\rX\r\n")
    assert out.count(b"NO ") == 3 and out.count(b'OK "Done"') == 1, out


def test_error_limit_closes_the_session() -> None:
    e = engine(EngineSettings(max_errors=2))
    _, out = feed(e, b"X\r\nX\r\nX\r\nX\r\n")
    assert out == b'NO "Unknown command"\r\n' * 3 + b'BYE "Too many errors, closing connection"\r\n'
    assert e.closed


def test_quote_chooses_a_literal_for_long_or_multiline_text() -> None:
    assert quote("a\"b\\") == b'"a\\"b\\\\"'
    assert quote(b"a\r\nb") == b"{4}\r\na\r\nb"


# ------------------------------------------------------------------ fuzzing

COMMANDS = [
    b"CAPABILITY", b"NOOP", b'NOOP "x"', b"LOGOUT", b"STARTTLS", b'AUTHENTICATE "PLAIN"',
    b'AUTHENTICATE "PLAIN" "' + PLAIN + b'"', b'"' + PLAIN + b'"', b'"*"',
    b'AUTHENTICATE "PLAIN" {%d+}' % len(PLAIN), PLAIN, b"LISTSCRIPTS", b'GETSCRIPT "a"',
    b'PUTSCRIPT "a" {6+}', b"keep;\n", b'PUTSCRIPT "a" {5000+}', b'PUTSCRIPT "a" {99999999+}',
    b'HAVESPACE "a" 10', b'SETACTIVE "a"', b'DELETESCRIPT "a"', b'RENAMESCRIPT "a" "b"',
    b'CHECKSCRIPT "keep;"', b"UNAUTHENTICATE", b"{3+}", b"{3}", b'"unterminated', b"x" * 300,
    b"\xff\xfe", b"NOOP \x00", b"", b'NOOP "\\q"', b"NOOP {}",
    b"NOOP " + b"A" * 8186 + b" {13+}",  # the line limit met at a literal's announcement
]

_LINE = re.compile(rb'(OK|NO|BYE)( \([^()\r\n]*( "[^"\r\n]*")?\))?( ".*")?|""|'
                   rb'"[^"\r\n]*(\\.[^"\r\n]*)*"( ".*"| ACTIVE)?')


def check_output(out: bytes) -> None:
    """Every reply is a response line, a quoted capability or listing line, or a
    literal (``{N}`` CRLF N octets) that is followed by CRLF."""
    i = 0
    while i < len(out):
        end = out.index(b"\r\n", i)
        line = out[i:end]
        i = end + 2
        m = re.fullmatch(rb"\{(\d+)\}", line)
        if m:
            i += int(m.group(1))
            assert out[i:i + 2] == b"\r\n", out[i - 10:i + 10]
            i += 2
            continue
        assert _LINE.fullmatch(line), line
        assert b"\r" not in line and b"\n" not in line


def drive(data: bytes, split: int, verdicts: list[int], *, tls: bool,
          plaintext: bool) -> bytes:
    e = ManageSieveEngine(EngineSettings(tls_available=True, allow_plaintext=plaintext,
                                         max_errors=1000, max_script_size=4096,
                                         max_discard=8192), tls_active=tls)
    e.greet()
    out = e.take_output()
    pick = iter(verdicts)
    for i in range(0, len(data), split):
        e.receive(data[i:i + split])
        while (ev := e.next_event()) is not None:
            choice = next(pick, 0)
            if isinstance(ev, CheckCredentials):
                assert e.tls_active or plaintext
                [e.credentials_accepted, lambda _u: e.credentials_refused(),
                 lambda _u: e.credentials_unverifiable()][choice % 3](ev.username)
            elif isinstance(ev, StartTLS):
                assert not e.tls_active
                e.tls_started()
            elif isinstance(ev, Execute):
                assert e.state is State.AUTHENTICATED
                e.executed(choice % 2 == 0, "NONEXISTENT" if choice % 3 else "",
                           "text", listing=[("a", True)] if choice % 4 == 0 else None,
                           script=b"keep;\r\n" if choice % 4 == 2 else None)
        out += e.take_output()
        assert e.held <= 4096 + 4 * MAX_STRING + split + 64  # bounded by the limits
    assert e.internal_error is None
    return out


@settings(max_examples=examples(300), deadline=None)
@given(
    tls=st.booleans(),
    plaintext=st.booleans(),
    lines_=st.lists(st.tuples(st.one_of(st.sampled_from(COMMANDS), st.binary(max_size=40)),
                              st.sampled_from([b"\r\n", b"\r\n", b"\n", b""])), max_size=30),
    verdicts=st.lists(st.integers(0, 5), max_size=20),
    split=st.integers(min_value=1, max_value=64),
)
def test_random_input_never_raises_and_every_line_is_a_response(
    tls: bool, plaintext: bool, lines_: list[tuple[bytes, bytes]], verdicts: list[int],
    split: int,
) -> None:
    data = b"".join(line + end for line, end in lines_)
    out = drive(data, split, verdicts, tls=tls, plaintext=plaintext)
    check_output(out)
    # The same input in one piece gives the same replies: no framing depends on chunks
    # (but for STARTTLS, where what came in the same piece is dropped by design).
    if b"STARTTLS" not in data:
        assert drive(data, max(1, len(data)), verdicts, tls=tls, plaintext=plaintext) == out
