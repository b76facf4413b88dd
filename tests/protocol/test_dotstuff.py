"""The one dot-stuffing rule (protocol/dotstuff.py), as SMTP DATA and POP3 RETR both send it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mailfort.delivery.message import DataEncoder
from mailfort.protocol.dotstuff import DotStuffer, SizeCounter, encode_whole
from mailfort.protocol.pop3 import MessageEncoder, wire_size
from tests.fuzzing import examples

# Messages made mostly of what the rule is about: CR, LF, dots, and a little else.
_MESSAGE = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"a", b"\xff"]),
                    max_size=60).map(b"".join)
_CUTS = st.lists(st.integers(min_value=0, max_value=200), max_size=6)


def _encode(enc: DotStuffer, message: bytes, cuts: list[int]) -> bytes:
    """``message`` fed in the pieces that ``cuts`` make, then ended."""
    out, start = [], 0
    for cut in [*sorted(c for c in cuts if c <= len(message)), len(message)]:
        out.append(enc.feed(message[start:cut]))
        start = cut
    out.append(enc.finish() if isinstance(enc, MessageEncoder) else enc.end())
    return b"".join(out)


def decode(wire: bytes) -> bytes:
    """What a receiver makes of the wire form: lines up to the lone ".", one leading dot of
    each removed (RFC 5321 §4.5.2, RFC 1939 §3)."""
    lines = wire.split(b"\r\n")
    end = lines.index(b".")
    assert lines[end + 1:] == [b""], "octets after the terminator"
    return b"".join(ln[1:] + b"\r\n" if ln.startswith(b".") else ln + b"\r\n"
                    for ln in lines[:end])


def lines_of(message: bytes) -> bytes:
    """The rule's reading of ``message``: CRLF, bare LF and bare CR each end a line."""
    text = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if text and not text.endswith(b"\n"):
        text += b"\n"
    return text.replace(b"\n", b"\r\n")


@settings(max_examples=examples(500), deadline=None)
@given(_MESSAGE, _CUTS)
def test_round_trip_and_nothing_but_crlf(message: bytes, cuts: list[int]) -> None:
    wire = _encode(DotStuffer(), message, cuts)
    assert wire == _encode(DotStuffer(), message, [])  # where the pieces end never matters
    assert decode(wire) == lines_of(message)
    # no bare CR or LF reaches the peer, and the terminator is only at the end
    body = wire[:-3]
    assert b"\r" not in wire.replace(b"\r\n", b"") and b"\n" not in wire.replace(b"\r\n", b"")
    assert wire.endswith(b".\r\n") and b"\r\n.\r\n" not in body and not body.startswith(b".\r\n")
    assert body == b"" or body.endswith(b"\r\n")


@settings(max_examples=examples(300), deadline=None)
@given(_MESSAGE, _CUTS)
def test_smtp_data_and_pop3_retr_send_the_same_octets(message: bytes, cuts: list[int]) -> None:
    """One rule: before, a bare CR went to a POP3 client as it was, to an SMTP peer as CRLF."""
    data = _encode(DataEncoder(), message, cuts)
    assert data == _encode(MessageEncoder(), message, cuts)
    assert data == _encode(DotStuffer(), message, cuts)


@settings(max_examples=examples(300), deadline=None)
@given(_MESSAGE)
def test_a_whole_message_at_once_is_the_same_octets(message: bytes) -> None:
    """POP3 sends a small message read in one piece with ``encode_whole`` (no per-piece
    state): the octets must be those of the piecewise rule, so LIST still matches RETR."""
    assert encode_whole(message) == _encode(DotStuffer(), message, [])
    for fixed in (b"", b".", b"\r", b"a\r", b".\r\n.\r\n", b"a\rb\nc\r\n.d", b"\n.", b"x\r\n"):
        assert encode_whole(fixed) == _encode(DotStuffer(), fixed, [])


@given(_MESSAGE, st.integers(min_value=1, max_value=20))
def test_size_counter_is_the_unstuffed_length(message: bytes, chunk: int) -> None:
    """LIST's size (counted) is RETR's length before stuffing (sent), however it is read."""
    pieces = [message[i:i + chunk] for i in range(0, len(message), chunk)]
    assert wire_size(pieces) == len(lines_of(message))
    counter = SizeCounter()
    for piece in pieces:
        counter.feed(piece)
    assert counter.size() == len(decode(_encode(MessageEncoder(), message, [])))


def test_examples() -> None:
    enc = DotStuffer
    assert _encode(enc(), b"", []) == b".\r\n"
    assert _encode(enc(), b".", []) == b"..\r\n.\r\n"
    assert _encode(enc(), b"a\r.b\n.\r", [2]) == b"a\r\n..b\r\n..\r\n.\r\n"
    assert _encode(enc(), b"a\r\n.\r\n", [1, 2, 3]) == b"a\r\n..\r\n.\r\n"


def test_lf_only_messages_take_the_short_path_to_the_same_octets() -> None:
    """A file stored with LF endings (no CR at all) skips the CRLF and bare-CR passes; what
    goes out is what the full rule gives, dot lines, a last line without end included."""
    for lf in (b"a\n.b\n..\n\n", b".x\nlast", b"\n", b"no end"):
        assert encode_whole(lf) == _encode(DotStuffer(), lf, [])
        assert encode_whole(lf) == encode_whole(lf.replace(b"\n", b"\r\n"))
