"""Unit tests of the sans-I/O SMTP engine: bytes in, replies and events out."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailfort.protocol.replies import Reply
from mailfort.protocol.smtp import (
    AuthCredentials,
    Closing,
    DataChunk,
    DataStart,
    EngineSettings,
    MailFrom,
    MessageAborted,
    MessageComplete,
    RcptTo,
    SMTPEngine,
    StartTLS,
)
from tests.fuzzing import examples


class Driver:
    """Feeds an engine and answers its decisions like a permissive MX would."""

    def __init__(self, **kw: object) -> None:
        self.engine = SMTPEngine(EngineSettings(hostname="mx.test", **kw))  # type: ignore[arg-type]
        self.engine.greet()
        self.banner = self.engine.take_output()
        self.stored: list[bytes] = []
        self.body = bytearray()
        self.events: list[object] = []
        self.rcpt_reply = Reply(250, "2.1.5", "OK")

    def send(self, data: bytes) -> str:
        self.engine.receive(data)
        self.pump()
        return self.engine.take_output().decode()

    def pump(self) -> None:
        e = self.engine
        while (ev := e.next_event()) is not None:
            self.events.append(ev)
            if isinstance(ev, MailFrom):
                e.decide(Reply(250, "2.1.0", "OK"))
            elif isinstance(ev, RcptTo):
                e.decide(self.rcpt_reply)
            elif isinstance(ev, DataStart):
                self.body = bytearray()
                e.decide(Reply(354, "", "go") if not ev.bdat else Reply(250, "2.0.0", "ok"))
            elif isinstance(ev, DataChunk):
                self.body += ev.data
            elif isinstance(ev, MessageComplete):
                self.stored.append(bytes(self.body))
                e.decide(Reply(250, "2.0.0", "stored"))
            elif isinstance(ev, AuthCredentials):
                ok = ev.username == "alice" and ev.password == "secret"
                e.decide(Reply(235, "2.7.0", "ok") if ok else Reply(535, "5.7.8", "no"))

    def codes(self, out: str) -> list[str]:
        return [line[:3] for line in out.split("\r\n") if line and line[3:4] == " "]

    def transaction(self, body: bytes) -> str:
        self.send(b"EHLO c.test\r\n")
        self.send(b"MAIL FROM:<a@b.test>\r\n")
        self.send(b"RCPT TO:<u@mx.test>\r\n")
        self.send(b"DATA\r\n")
        return self.send(body)


def test_banner_names_no_software() -> None:
    d = Driver()
    assert d.banner == b"220 mx.test ESMTP ready\r\n"


def test_ehlo_advertises_extensions_in_one_reply() -> None:
    d = Driver(tls_available=True)
    out = d.send(b"EHLO client.test\r\n")
    lines = out.split("\r\n")[:-1]
    assert lines[0] == "250-mx.test"
    kws = {line[4:].split(" ")[0] for line in lines[1:]}
    assert {"PIPELINING", "SIZE", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "CHUNKING",
            "STARTTLS"} <= kws
    assert lines[-1].startswith("250 ")
    assert "AUTH" not in kws


def test_full_transaction_and_dot_unstuffing() -> None:
    d = Driver()
    out = d.transaction(b"Subject: x\r\n\r\n..leading dot\r\n.not end\r\n...\r\n.\r\n")
    assert "250 2.0.0 stored" in out
    assert d.stored == [b"Subject: x\r\n\r\n.leading dot\r\nnot end\r\n..\r\n"]


def test_pipelined_commands_answered_in_order() -> None:
    d = Driver()
    d.rcpt_reply = Reply(550, "5.1.1", "No such user here")
    out = d.send(
        b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@mx.test>\r\nRCPT TO:<y@mx.test>\r\n"
        b"NOOP\r\nRSET\r\nQUIT\r\n"
    )
    assert d.codes(out) == ["250", "250", "550", "550", "250", "250", "221"]
    assert d.engine.closed


@pytest.mark.parametrize(
    "body",
    [
        b"Subject: x\r\n\r\nhi\n.\nsmuggled\r\n.\r\n",  # <LF>.<LF>
        b"Subject: x\r\n\r\nhi\r.\rsmuggled\r\n.\r\n",  # <CR>.<CR>
        b"Subject: x\r\n\r\nhi\n.\r\nsmuggled\r\n.\r\n",  # <LF>.<CRLF>
        b"Subject: x\r\n\r\nhi\r\n.\nsmuggled\r\n.\r\n",  # <CRLF>.<LF>
        b"Subject: x\r\n\r\nbare\rcr\r\n.\r\n",
    ],
)
def test_smuggling_forms_never_end_data_and_refuse_message(body: bytes) -> None:
    d = Driver()
    out = d.transaction(body)
    assert "550 5.6.0" in out
    assert d.stored == []
    assert any(isinstance(e, MessageAborted) for e in d.events)
    # the session is still usable
    assert d.send(b"NOOP\r\n").startswith("250")


def test_smuggled_command_is_not_executed() -> None:
    d = Driver()
    out = d.transaction(
        b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<v@mx.test>\r\n.\r\n"
    )
    assert d.codes(out) == ["550"]
    assert sum(isinstance(e, MailFrom) for e in d.events) == 1


def test_bare_lf_and_nul_in_command() -> None:
    d = Driver()
    assert d.send(b"EHLO x\n").startswith("500 5.5.2")
    assert d.send(b"NOOP\0\r\n").startswith("500 5.5.2")
    assert d.send(b"NO\rOP\r\n").startswith("500 5.5.2")


def test_command_line_too_long() -> None:
    d = Driver()
    out = d.send(b"NOOP " + b"x" * 600 + b"\r\n")
    assert d.codes(out) == ["500"]
    assert "5.5.2" in out
    assert d.send(b"NOOP\r\n").startswith("250")


def test_command_line_limit_is_512_octets_with_crlf() -> None:
    d = Driver()
    ok = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
    assert len(ok) == 512
    assert d.send(ok).startswith("250")
    too_long = b"NOOP " + b"x" * (513 - 7) + b"\r\n"
    assert d.send(too_long).startswith("500 5.5.2")
    assert d.send(b"NOOP\r\n").startswith("250")


def test_data_line_too_long_refused_after_end() -> None:
    d = Driver()
    out = d.transaction(b"Subject: x\r\n\r\n" + b"y" * 1200 + b"\r\n.\r\n")
    assert out.startswith("552 5.6.0")
    assert d.stored == []


def test_data_line_of_exactly_1000_octets_is_fine() -> None:
    d = Driver()
    out = d.transaction(b"Subject: x\r\n\r\n" + b"y" * 998 + b"\r\n.\r\n")
    assert "250" in out
    assert len(d.stored) == 1


def test_data_line_too_long_across_many_chunks_keeps_memory_bounded() -> None:
    d = Driver()
    d.transaction(b"Subject: x\r\n\r\n")
    for _ in range(200):
        d.send(b"z" * 10_000)
    assert len(d.engine._lines.buffer) < 2000
    out = d.send(b"\r\n.\r\n")
    assert out.startswith("552 5.6.0")


def test_size_declared_too_big() -> None:
    d = Driver(max_message_size=1000)
    d.send(b"EHLO c\r\n")
    assert d.send(b"MAIL FROM:<a@b.test> SIZE=1001\r\n").startswith("552 5.3.4")


def test_size_and_bdat_take_ascii_digits_only() -> None:
    d = Driver()
    d.send(b"EHLO c\r\n")
    assert d.send("MAIL FROM:<a@b.test> SIZE=١٠\r\n".encode()).startswith("5")
    d.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@mx.test>\r\n")
    assert d.send("BDAT ١\r\n".encode()).startswith("5")


def test_actual_size_too_big() -> None:
    d = Driver(max_message_size=1000)
    out = d.transaction(b"Subject: x\r\n\r\n" + b"y" * 500 + b"\r\n" + b"y" * 600 + b"\r\n.\r\n")
    assert out.startswith("552 5.3.4")
    assert d.stored == []


def test_too_many_recipients() -> None:
    d = Driver(max_recipients=3)
    d.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
    out = d.send(b"".join(b"RCPT TO:<u%d@mx.test>\r\n" % i for i in range(4)))
    assert d.codes(out) == ["250", "250", "250", "452"]
    assert "4.5.3" in out


def test_too_many_errors_closes() -> None:
    d = Driver(max_errors=10)
    out = d.send(b"BOGUS\r\n" * 12)
    assert d.codes(out)[-1] == "421"
    assert "4.7.0" in out
    assert d.engine.closed
    assert any(isinstance(e, Closing) for e in d.events)


def test_too_many_received_headers() -> None:
    d = Driver()
    headers = b"".join(b"Received: from h%d\r\n" % i for i in range(51))
    out = d.transaction(headers + b"\r\nbody\r\n.\r\n")
    assert out.startswith("554 5.4.6")


def test_fifty_received_headers_are_fine() -> None:
    d = Driver()
    headers = b"".join(b"Received: from h%d\r\n" % i for i in range(50))
    out = d.transaction(headers + b"\r\nbody\r\n.\r\n")
    assert out.startswith("250")


def test_vrfy_and_expn_disclose_nothing() -> None:
    d = Driver()
    d.send(b"EHLO c\r\n")
    assert d.send(b"VRFY root\r\n") == d.send(b"VRFY nosuchuser\r\n")
    assert d.send(b"VRFY root\r\n").startswith("252 2.5.2")
    assert d.send(b"EXPN staff\r\n").startswith("502 5.5.1")


def test_starttls_discards_pipelined_commands() -> None:
    d = Driver(tls_available=True)
    d.send(b"EHLO c\r\n")
    out = d.send(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\n")
    assert d.codes(out) == ["220"]
    assert isinstance(d.events[-1], StartTLS)
    d.engine.tls_started()
    # the injected MAIL was thrown away and the session starts over: EHLO is needed again
    assert d.send(b"MAIL FROM:<a@b.test>\r\n").startswith("503 5.5.1")
    assert not any(isinstance(e, MailFrom) for e in d.events)
    out = d.send(b"EHLO c\r\n")
    assert "STARTTLS" not in out


def test_requiretls_offered_and_accepted_only_over_tls() -> None:
    """RFC 8689 §2: REQUIRETLS is advertised only once TLS is active; the MAIL parameter in
    the clear is refused with 530 5.7.10 and no MailFrom reaches the server."""
    d = Driver(tls_available=True)
    assert "REQUIRETLS" not in d.send(b"EHLO c\r\n")
    assert d.send(b"MAIL FROM:<a@b.test> REQUIRETLS\r\n").startswith("530 5.7.10")
    assert not any(isinstance(e, MailFrom) for e in d.events)
    d.send(b"STARTTLS\r\n")
    d.engine.tls_started()
    assert "REQUIRETLS\r\n" in d.send(b"EHLO c\r\n")
    assert d.send(b"MAIL FROM:<a@b.test> requiretls\r\n").startswith("250")
    mail = [e for e in d.events if isinstance(e, MailFrom)]
    assert len(mail) == 1 and mail[0].requiretls
    d.send(b"RSET\r\n")
    d.send(b"MAIL FROM:<a@b.test>\r\n")
    assert [e.requiretls for e in d.events if isinstance(e, MailFrom)] == [True, False]


def test_requiretls_takes_no_value_and_not_twice() -> None:
    d = Driver(tls_available=True)
    d.engine.tls_active = True
    d.send(b"EHLO c\r\n")
    assert d.send(b"MAIL FROM:<a@b.test> REQUIRETLS=YES\r\n").startswith("501 5.5.4")
    assert d.send(b"MAIL FROM:<a@b.test> REQUIRETLS REQUIRETLS\r\n").startswith("501")
    assert not any(isinstance(e, MailFrom) for e in d.events)


def test_requiretls_needs_ehlo_and_can_be_switched_off() -> None:
    d = Driver(tls_available=True)
    d.engine.tls_active = True
    d.send(b"HELO c\r\n")  # RFC 1869: no ESMTP parameters after HELO
    assert d.send(b"MAIL FROM:<a@b.test> REQUIRETLS\r\n").startswith("555")
    off = Driver(tls_available=True, requiretls=False)
    off.engine.tls_active = True
    assert "REQUIRETLS" not in off.send(b"EHLO c\r\n")
    assert off.send(b"MAIL FROM:<a@b.test> REQUIRETLS\r\n").startswith("555")


def test_auth_not_offered_before_tls_and_refused() -> None:
    d = Driver(tls_available=True, auth_mechanisms=("PLAIN", "LOGIN"), auth_required=True)
    out = d.send(b"EHLO c\r\n")
    assert "AUTH" not in out
    token = base64.b64encode(b"\0alice\0secret")
    assert d.send(b"AUTH PLAIN " + token + b"\r\n").startswith("538 5.7.11")
    assert d.send(b"MAIL FROM:<alice@mx.test>\r\n").startswith("530 5.7.0")


def test_auth_plain_and_login_after_tls() -> None:
    d = Driver(tls_available=True, auth_mechanisms=("PLAIN", "LOGIN"), auth_required=True)
    d.engine.tls_active = True
    assert "AUTH PLAIN LOGIN" in d.send(b"EHLO c\r\n")
    bad = base64.b64encode(b"\0alice\0wrong")
    assert d.send(b"AUTH PLAIN " + bad + b"\r\n").startswith("535 5.7.8")
    assert d.send(b"AUTH LOGIN\r\n").startswith("334 ")
    assert d.send(base64.b64encode(b"alice") + b"\r\n").startswith("334 ")
    assert d.send(base64.b64encode(b"secret") + b"\r\n").startswith("235 2.7.0")
    assert d.engine.authenticated_as == "alice"
    assert d.send(b"MAIL FROM:<alice@mx.test>\r\n").startswith("250")


def test_auth_cancel_and_credentials_hidden_in_repr() -> None:
    d = Driver(auth_mechanisms=("PLAIN",), auth_requires_tls=False)
    d.send(b"EHLO c\r\n")
    assert d.send(b"AUTH PLAIN\r\n") == "334 \r\n"  # RFC 4954 §8: "334" SP [base64]
    assert d.send(b"*\r\n").startswith("501")
    ev = AuthCredentials("PLAIN", "alice", "hunter2")
    assert "hunter2" not in repr(ev)


def test_bdat_chunking() -> None:
    d = Driver()
    d.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@mx.test>\r\n")
    part1 = b"Subject: x\r\n\r\n"
    part2 = b".no unstuffing in BDAT\r\n"
    out = d.send(b"BDAT %d\r\n" % len(part1) + part1 + b"BDAT %d LAST\r\n" % len(part2) + part2)
    assert d.codes(out) == ["250", "250"]
    assert d.stored == [part1 + part2]


def test_bdat_without_transaction_consumes_chunk() -> None:
    d = Driver()
    d.send(b"EHLO c\r\n")
    out = d.send(b"BDAT 10 LAST\r\nQUIT\r\nxxxx")
    assert d.codes(out) == ["503"]
    assert not d.engine.closed  # "QUIT" was chunk data, not a command


def test_data_without_recipients() -> None:
    d = Driver()
    d.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
    assert d.send(b"DATA\r\n").startswith("554 5.5.1")


def test_mail_before_helo() -> None:
    d = Driver()
    assert d.send(b"MAIL FROM:<a@b.test>\r\n").startswith("503 5.5.1")


def test_timeout_reply() -> None:
    d = Driver()
    d.engine.timeout()
    assert d.engine.take_output() == b"421 4.4.2 Idle timeout, closing connection\r\n"
    assert d.engine.closed


def test_every_reply_has_enhanced_code() -> None:
    d = Driver(tls_available=True)
    out = d.send(
        b"EHLO c\r\nNOOP\r\nHELP\r\nVRFY x\r\nEXPN x\r\nMAIL FROM:<a@b.test>\r\n"
        b"RCPT TO:<u@mx.test>\r\nRSET\r\nBOGUS\r\nQUIT\r\n"
    )
    lines = [ln for ln in out.split("\r\n") if ln][8:]  # skip the EHLO reply
    for line in lines:
        assert line[4].isdigit() and line[5] == ".", line


_commands = st.sampled_from(
    [b"EHLO x\r\n", b"HELO x\r\n", b"MAIL FROM:<a@b.test>\r\n", b"MAIL FROM:<>\r\n",
     b"RCPT TO:<u@mx.test>\r\n", b"DATA\r\n", b".\r\n", b"\r\n.\r\n", b"RSET\r\n", b"BDAT 3\r\n",
     b"BDAT 0 LAST\r\n", b"STARTTLS\r\n", b"AUTH PLAIN\r\n", b"\n.\n", b"x" * 600, b"\r", b"\n",
     b"QUIT\r\n", b"NOOP\r\n", b"VRFY a\r\n", b"MAIL FROM:<a@b.test> REQUIRETLS\r\n",
     b"MAIL FROM:<> REQUIRETLS SIZE=10\r\n"]
)


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(st.one_of(_commands, st.binary(max_size=80)), max_size=40))
def test_arbitrary_streams_never_crash_and_never_store_malformed(chunks: list[bytes]) -> None:
    d = Driver(tls_available=True, max_message_size=4096)
    for chunk in chunks:
        seen = len(d.events)
        d.send(chunk)
        # REQUIRETLS (RFC 8689) is only ever granted to a transaction that TLS protects
        assert all(d.engine.tls_active for e in d.events[seen:]
                   if isinstance(e, MailFrom) and e.requiretls)
        if d.engine.waiting and isinstance(d.events[-1], StartTLS):
            d.engine.tls_started()
    for msg in d.stored:
        # a stored message never carries a bare CR or LF and never a line over 998 octets
        assert msg.count(b"\r") == msg.count(b"\n") == msg.count(b"\r\n")
        assert all(len(line) <= 998 for line in msg.split(b"\r\n"))
        assert len(msg) <= 4096
    assert d.engine.internal_error is None


# ------------------------------------------------------------------ fuzzing with AUTH

_SMTP_VERBS = [b"EHLO", b"HELO", b"AUTH", b"AUTH PLAIN", b"auth plain", b"AUTH LOGIN",
               b"AUTH CRAM-MD5", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"BDAT", b"RSET",
               b"NOOP", b"VRFY", b"STARTTLS", b"QUIT"]
_SASL_PLAIN = st.tuples(
    st.sampled_from(["", "alice", "ALICE", "bob"]),
    st.sampled_from(["", "alice", "\u00e9"]),
    st.sampled_from(["", "secret", "p\u00e4ss"]),
).map(lambda t: base64.b64encode("\0".join(t).encode()))
_SMTP_ARG = st.one_of(st.binary(max_size=40), st.text(max_size=20).map(str.encode), _SASL_PLAIN,
                      st.binary(max_size=30).map(base64.b64encode))
_SMTP_LINE = st.one_of(
    _commands.map(lambda c: c.removesuffix(b"\r\n")),
    st.tuples(st.sampled_from(_SMTP_VERBS), _SMTP_ARG).map(lambda t: t[0] + b" " + t[1]),
    _SMTP_ARG,  # a SASL continuation, or noise
)
_SMTP_END = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""])


@settings(max_examples=examples(300), deadline=None)
@given(
    tls=st.booleans(),
    requires_tls=st.booleans(),
    lines=st.lists(st.tuples(_SMTP_LINE, _SMTP_END), max_size=25),
    split=st.integers(min_value=1, max_value=64),
)
def test_arbitrary_streams_with_auth_never_crash(
    tls: bool, requires_tls: bool, lines: list[tuple[bytes, bytes]], split: int
) -> None:
    """AUTH offered (PLAIN and LOGIN): any bytes get well-formed replies, never an exception; a
    session is authenticated only by a positive answer to an AuthCredentials event."""
    d = Driver(tls_available=True, auth_mechanisms=("PLAIN", "LOGIN"),
               auth_requires_tls=requires_tls, max_message_size=4096)
    d.engine.tls_active = tls
    data = b"".join(line + end for line, end in lines)
    out = ""
    for i in range(0, len(data), split):
        out += d.send(data[i:i + split])
        if d.engine.waiting and isinstance(d.events[-1], StartTLS):
            d.engine.tls_started()
        if d.engine.authenticated_as is not None:
            creds = [e for e in d.events if isinstance(e, AuthCredentials)]
            assert creds and d.engine.authenticated_as == creds[-1].username == "alice"
    for ev in d.events:
        if isinstance(ev, AuthCredentials):
            assert d.engine.tls_active or not requires_tls
    for line in out.split("\r\n")[:-1]:
        assert line[:3].isdigit() and line[3:4] in (" ", "-"), line
    assert d.engine.internal_error is None
