"""The milter codec and session (protocol/milter.py): framing, replies, negotiation, limits,
and the properties that matter against an untrusted filter (any bytes in any chunking: the
same events, no exception, at most one packet buffered)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailfort.protocol import milter as m
from tests.fuzzing import examples


def reply(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + command + data


def optneg(actions: int = m.OFFERED_ACTIONS, protocol: int = 0, extra: bytes = b"") -> bytes:
    return reply(b"O", struct.pack(">III", 6, actions, protocol) + extra)


def commands(data: bytes) -> list[tuple[bytes, bytes]]:
    """The test's own decoder of MTA packets: (command, data) pairs."""
    out = []
    while data:
        (length,) = struct.unpack(">I", data[:4])
        out.append((data[4:5], data[5:4 + length]))
        data = data[4 + length:]
    return out


def negotiated(protocol: int = 0, actions: int = m.OFFERED_ACTIONS,
               extra: bytes = b"") -> m.MilterSession:
    s = m.MilterSession()
    s.start()
    events = s.receive(optneg(actions, protocol, extra))
    assert isinstance(events[0], m.Negotiated), events
    return s


def to_eom(s: m.MilterSession) -> None:
    for send in (lambda: s.connect("h", "4", 25, "192.0.2.1"), lambda: s.helo("h"),
                 lambda: s.mail("a@b"), lambda: s.rcpt("c@d"), s.data,
                 lambda: s.header("Subject", "x"), s.end_of_headers, lambda: s.body(b"b"),
                 s.end_of_message):
        if send() and s.awaiting and s._awaiting is not m.Step.EOM:
            assert s.receive(reply(b"c")) == [m.Continue()]


# ------------------------------------------------------------------ commands


def test_commands_encode_as_the_protocol_says() -> None:
    assert commands(m.encode_optneg(0x1FF, 0x3)) == [(b"O", struct.pack(">III", 6, 0x1FF, 3))]
    assert commands(m.encode_connect("mx.example", "4", 2525, "192.0.2.1")) == [
        (b"C", b"mx.example\x004" + struct.pack(">H", 2525) + b"192.0.2.1\0")]
    assert commands(m.encode_connect("unknown", "U")) == [(b"C", b"unknown\0U")]
    assert commands(m.encode_macros(b"C", {"j": "mx", "{client_addr}": "192.0.2.1"})) == [
        (b"D", b"Cj\0mx\0{client_addr}\x00192.0.2.1\0")]
    assert commands(m.encode_mail("a@b", ["SIZE=10"])) == [(b"M", b"<a@b>\0SIZE=10\0")]
    assert commands(m.encode_rcpt("c@d")) == [(b"R", b"<c@d>\0")]
    assert commands(m.encode_header("Subject", "hi")) == [(b"L", b"Subject\0hi\0")]
    assert commands(m.encode_body(b"x" * 65535)) == [(b"B", b"x" * 65535)]
    for c in b"TNEAQ":
        assert commands(m.encode_simple(bytes([c]))) == [(bytes([c]), b"")]
    with pytest.raises(ValueError):
        m.encode_body(b"x" * 65536)
    with pytest.raises(ValueError):
        m.encode_header("A\0B", "x")


_text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                max_size=40)


@given(name=_text, value=_text, address=_text, args=st.lists(_text, max_size=3))
@settings(max_examples=examples(200))
def test_command_round_trip(name: str, value: str, address: str, args: list[str]) -> None:
    [(c, data)] = commands(m.encode_header(name, value))
    assert c == b"L" and data.split(b"\0")[:2] == [name.encode(), value.encode()]
    [(c, data)] = commands(m.encode_mail(address, args))
    fields = data[:-1].split(b"\0")
    assert c == b"M" and [f.decode() for f in fields] == [f"<{address}>", *args]


# ------------------------------------------------------------------ replies


def test_every_reply_decodes_to_its_event() -> None:
    idx = struct.pack(">I", 2)
    cases = {
        reply(b"a"): m.Accept(), reply(b"c"): m.Continue(), reply(b"r"): m.Reject(),
        reply(b"t"): m.Tempfail(), reply(b"d"): m.Discard(), reply(b"s"): m.Skip(),
        reply(b"p"): m.Progress(),
        reply(b"y", b"554 5.7.1 Gtube pattern\0"): m.ReplyCode(554, "5.7.1 Gtube pattern"),
        reply(b"q", b"why\0"): m.Quarantine("why"),
        reply(b"h", b"X-Spam\0Yes\0"): m.AddHeader("X-Spam", "Yes"),
        reply(b"h", b"X-R\0a;\r\n\tb;\n c\0"): m.AddHeader("X-R", "a;\r\n\tb;\n c"),
        reply(b"y", b"550-5.7.1 a\r\n550 5.7.1 b\0"): m.ReplyCode(550, "5.7.1 a\r\n550 5.7.1 b"),
        reply(b"m", idx + b"Subject\0\0"): m.ChangeHeader(2, "Subject", ""),
        reply(b"i", idx + b"X-A\0b\0"): m.InsertHeader(2, "X-A", "b"),
        reply(b"+", b"<x@y>\0"): m.AddRecipient("<x@y>"),
        reply(b"2", b"<x@y>\0NOTIFY=NEVER\0"): m.AddRecipient("<x@y>", "NOTIFY=NEVER"),
        reply(b"-", b"<x@y>\0"): m.DeleteRecipient("<x@y>"),
        reply(b"e", b"<s@y>\0"): m.ChangeSender("<s@y>"),
        reply(b"b", b"\0\xffbody"): m.ReplaceBody(b"\0\xffbody"),
        optneg(0x1FF, 0x10, struct.pack(">I", 5) + b"i {auth_authen}\0"):
            m.Negotiated(6, 0x1FF, 0x10, {5: ("i", "{auth_authen}")}),
    }
    for wire, event in cases.items():
        assert m.ReplyDecoder().feed(wire) == [event], wire


@pytest.mark.parametrize("wire", [
    reply(b"Z"), reply(b"c", b"junk"), reply(b"y", b"250 ok\0"), reply(b"y", b"554 a\nb\0"),
    reply(b"h", b"X\0"), reply(b"h", b"X\0v"), reply(b"h", b"\0v\0"), reply(b"m", b"\0\0"),
    reply(b"h", b"X\0\x01\0"), reply(b"q", b"\xff\0"), reply(b"O", b"\0\0\0\6"),
    reply(b"h", b"X\0a\r\nBcc: x@y\0"), reply(b"h", b"X: y\0v\0"), reply(b"h", b"X\0a\rb\0"),
    reply(b"+", b"<a@b>\r\nRCPT TO:<c@d>\0"), reply(b"y", b"\xd9\xa5\xd9\xa5\xd9\xa5 x\0"),
    struct.pack(">I", 0), struct.pack(">I", m.MAX_REPLY + 1),
])
def test_malformed_replies_are_protocol_errors(wire: bytes) -> None:
    decoder = m.ReplyDecoder()
    events = decoder.feed(wire + reply(b"c"))
    assert len(events) == 1 and isinstance(events[0], m.ProtocolError), events
    assert decoder.failed and decoder.buffered == 0 and decoder.feed(reply(b"c")) == []


def test_oversized_length_is_refused_before_its_data_arrives() -> None:
    decoder = m.ReplyDecoder()
    [event] = decoder.feed(struct.pack(">I", 2**31) + b"b")
    assert isinstance(event, m.ProtocolError) and decoder.buffered == 0


@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=12),
       valid=st.lists(st.sampled_from([reply(b"c"), reply(b"h", b"A\0b\0"),
                                       reply(b"b", b"x" * 300), reply(b"p")]), max_size=4))
@settings(max_examples=examples(300))
def test_any_bytes_in_any_chunking_same_events_bounded(data: bytes, cuts: list[int],
                                                         valid: list[bytes]) -> None:
    wire = b"".join(valid) + data
    whole = m.ReplyDecoder().feed(wire)
    decoder = m.ReplyDecoder(max_packet=1024)
    chunked: list[m.Event] = []
    start = 0
    for cut in [*sorted(c for c in cuts if c <= len(wire)), len(wire)]:
        chunked += decoder.feed(wire[start:cut])
        start = cut
        assert decoder.buffered <= 4 + 1024
    small = m.ReplyDecoder(max_packet=1024).feed(wire)
    assert chunked == small
    assert [e for e in whole if not isinstance(e, m.ProtocolError)][:len(valid)] == [
        e for e in small if not isinstance(e, m.ProtocolError)][:len(valid)]
    assert sum(isinstance(e, m.ProtocolError) for e in chunked) <= 1


@given(data=st.binary(max_size=300))
@settings(max_examples=examples(200))
def test_session_never_raises_on_filter_input(data: bytes) -> None:
    s = negotiated(protocol=m.SKIP)
    to_eom(s)
    s.receive(data)
    s.receive(data)
    assert s._decoder.buffered <= 4 + m.MAX_REPLY


# ------------------------------------------------------------------ the session


def test_negotiation_masks_to_what_was_offered_and_skips_steps() -> None:
    s = m.MilterSession(actions=m.ADDHDRS)
    out = commands(s.start())
    assert out == [(b"O", struct.pack(">III", 6, m.ADDHDRS, m.OFFERED_PROTOCOL))]
    [event] = s.receive(optneg(0x1FF, m.NOHELO | m.NR_CONN | m.RCPT_REJ))
    assert event == m.Negotiated(6, m.ADDHDRS, m.NOHELO | m.NR_CONN, {})
    assert s.connect("h", "U") and not s.awaiting  # sent, no reply awaited
    assert s.helo("h", {"j": "mx"}) == b""  # skipped, and its macros with it
    assert s.mail("a@b") and s.awaiting


def test_macros_follow_the_filters_list() -> None:
    s = negotiated(extra=struct.pack(">I", 2) + b"{mail_addr}\0")
    s.connect("h", "U")
    s.receive(reply(b"c"))
    s.helo("h")
    s.receive(reply(b"c"))
    out = commands(s.mail("a@b", macros={"{mail_addr}": "a@b", "{auth_authen}": "u"}))
    assert out[0] == (b"D", b"M{mail_addr}\0a@b\0")


def test_replies_out_of_place_are_protocol_errors() -> None:
    s = negotiated()
    assert isinstance(s.receive(reply(b"c"))[0], m.ProtocolError)  # nothing was asked
    s = negotiated()
    s.connect("h", "U")
    assert isinstance(s.receive(reply(b"h", b"A\0b\0"))[0], m.ProtocolError)  # before EOM
    s = negotiated(protocol=0)
    to_eom(s)
    s2 = negotiated(protocol=m.SKIP)
    s2.connect("h", "U")
    assert isinstance(s2.receive(reply(b"s"))[0], m.ProtocolError)  # SKIP outside the body
    assert isinstance(s.receive(reply(b"s"))[0], m.ProtocolError)  # SKIP at EOM
    s = negotiated(actions=m.ADDHDRS)
    to_eom(s)
    assert isinstance(s.receive(reply(b"-", b"<x@y>\0"))[0], m.ProtocolError)  # not negotiated
    s = m.MilterSession()
    s.start()
    assert isinstance(s.receive(reply(b"c"))[0], m.ProtocolError)  # no OPTNEG
    s = m.MilterSession()
    s.start()
    assert isinstance(s.receive(optneg(0, 0, struct.pack(">I", 1) + b"j\0"))[0],
                      m.ProtocolError)  # macro list without SETSYMLIST


def test_end_of_message_collects_modifications_until_the_final_reply() -> None:
    s = negotiated()
    to_eom(s)
    events = s.receive(reply(b"h", b"X-A\0b\0") + reply(b"p") + reply(b"q", b"r\0"))
    assert events == [m.AddHeader("X-A", "b"), m.Progress(), m.Quarantine("r")]
    assert s.awaiting
    assert s.receive(reply(b"a")) == [m.Accept()] and s.done
    s.abort()
    assert s.mail("a@b")  # the next message on the same connection


def test_modification_flood_and_body_size_are_bounded() -> None:
    s = m.MilterSession(max_modifications=3, max_replaced_body=10)
    s.start()
    s.receive(optneg())
    to_eom(s)
    events = s.receive(reply(b"h", b"A\0b\0") * 5)
    assert isinstance(events[-1], m.ProtocolError) and len(events) == 4
    s = m.MilterSession(max_replaced_body=10)
    s.start()
    s.receive(optneg())
    to_eom(s)
    assert isinstance(s.receive(reply(b"b", b"x" * 6) * 2)[-1], m.ProtocolError)


def test_skip_stops_the_body() -> None:
    s = negotiated(protocol=m.SKIP)
    for send in (lambda: s.connect("h", "U"), lambda: s.helo("h"), lambda: s.mail("a@b"),
                 lambda: s.rcpt("c@d"), s.data, s.end_of_headers):
        send()
        s.receive(reply(b"c"))
    assert s.body(b"x")
    assert s.receive(reply(b"s")) == [m.Skip()] and s.skip_body
    assert s.body(b"y") == b""
    assert commands(s.end_of_message()) == [(b"E", b"")]


def test_steps_out_of_order_are_the_callers_bug() -> None:
    s = m.MilterSession()
    with pytest.raises(RuntimeError):
        s.helo("h")
    s = negotiated()
    s.connect("h", "U")
    with pytest.raises(RuntimeError):  # its reply is still awaited
        s.helo("h")
    s.receive(reply(b"c"))
    with pytest.raises(RuntimeError):
        s.data()


def test_quit_nc_only_after_end_of_message_then_connect_again() -> None:
    """QUIT_NC is taken by libmilter only after EOM; the session then starts at CONNECT."""
    s = m.MilterSession()
    s.start()
    s.receive(m.packet(b"O", struct.pack(">III", 6, 0, m.NR_CONN | m.NR_MAIL | m.NR_RCPT)))
    s.connect("h", "4", 25, "192.0.2.1")
    s.mail("a@b")
    with pytest.raises(RuntimeError):
        s.new_connection()  # mid-message
    s.rcpt("c@d")
    s.data()
    s.receive(m.packet(b"c"))
    s.end_of_headers()
    s.receive(m.packet(b"c"))
    s.end_of_message()
    s.receive(m.packet(b"a"))
    assert s.new_connection() == m.packet(b"K")
    assert s.connect("h2", "4", 25, "192.0.2.2")[4:5] == b"C"  # no new OPTNEG first
    assert not s.awaiting  # NR_CONN: no reply awaited


def _to_headers(protocol: int) -> m.MilterSession:
    s = negotiated(protocol)
    for send in (lambda: s.connect("h", "4", 25, "192.0.2.1"), lambda: s.helo("h"),
                 lambda: s.mail("a@b"), lambda: s.rcpt("c@d"), s.data):
        send()
        if s.awaiting:
            s.receive(reply(b"c"))
    return s


def test_unanswered_headers_are_encoded_in_one_call_as_one_at_a_time() -> None:
    """rspamd answers no header (NR_HDR): all of them in one call, the same octets as one
    ``header`` call each (the milter path's cost per message), never for a filter that
    answers each, and none for one that skips them."""
    fields = [("Received", "from a\r\n\tby b"), ("Subject", "x"), ("X-Empty", "")]
    one_by_one = _to_headers(m.NR_HDR)
    expected = b"".join(one_by_one.header(n, v) for n, v in fields)
    batched = _to_headers(m.NR_HDR)
    assert batched.headers(fields) == expected and not batched.awaiting
    assert batched.end_of_headers() == m.packet(b"N")  # the order goes on from there
    assert _to_headers(m.NOHDRS).headers(fields) == b""
    with pytest.raises(RuntimeError):
        _to_headers(0).headers(fields)  # each answered: one at a time, each awaited


def test_folding_and_field_name_checks_of_a_filters_header() -> None:
    """The checks on a field a filter adds (one regular expression each now)."""
    def added(name: bytes, value: bytes) -> m.Event:
        s = _to_headers(0)
        s.end_of_headers()
        s.receive(reply(b"c"))
        s.end_of_message()
        return s.receive(reply(b"h", name + b"\0" + value + b"\0"))[0]

    assert added(b"X-Spamd-Result", b"a;\n\tb;\r\n c") == m.AddHeader(
        "X-Spamd-Result", "a;\n\tb;\r\n c")
    for name, value in ((b"X-A", b"a\nb"), (b"X-A", b"a\n"), (b"X-A", b"a\r\n"),
                        (b"X-A", b"a\rb"), (b"X A", b"v"), (b"X:A", b"v"), (b"", b"v"),
                        (b"X-\xc3\xa9", b"v"), (b"X-A", b"a\n\t\x01")):
        assert isinstance(added(name, value), m.ProtocolError), (name, value)
