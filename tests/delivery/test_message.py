"""The DATA encoder and message traits: the wire form must not depend on chunk boundaries."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from mailfort.delivery.message import (
    DataEncoder,
    Outbound,
    ReturnPathFilter,
    Traits,
    needs_smtputf8,
    scan_bytes,
    scan_file,
)

_ENDS = re.compile(rb"\r\n|\n|\r")


def reference(message: bytes) -> bytes:
    """The DATA form of RFC 5321 §4.5.2, written out plainly for the whole message."""
    lines = _ENDS.split(message)
    if lines and lines[-1] == b"":
        lines.pop()
    out = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    return out + b".\r\n"


def encode_in_pieces(message: bytes, cuts: list[int]) -> bytes:
    enc = DataEncoder()
    out = []
    start = 0
    for cut in [*sorted(cuts), len(message)]:
        out.append(enc.feed(message[start:cut]))
        start = cut
    out.append(enc.end())
    return b"".join(out)


CASES = [
    b"",
    b"Subject: x\r\n\r\nbody\r\n",
    b".\r\n",
    b".leading\r\n..two\r\nmid.dle\r\n.",
    b"no final line end",
    b"bare\nLF\nand bare\rCR\r",
    b"\r\n.\r\n.\r\n",  # what would end DATA early unless stuffed
    b"a\r\r\nb\n\rc",
    b"\r",
    b"\n.\n",
]


@pytest.mark.parametrize("message", CASES)
def test_every_split_gives_the_reference_wire_form(message: bytes) -> None:
    want = reference(message)
    for i in range(len(message) + 1):
        for j in range(i, len(message) + 1):
            assert encode_in_pieces(message, [i, j]) == want, (message, i, j)


def test_random_messages_in_random_pieces() -> None:
    rng = random.Random(6531)
    alphabet = [b"\r", b"\n", b".", b"a", b"\r\n", b"\xc3\xa9"]
    for _ in range(2000):
        message = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        cuts = [rng.randrange(0, len(message) + 1) for _ in range(rng.randrange(0, 6))]
        wire = encode_in_pieces(message, cuts)
        assert wire == reference(message)
        # what the remote sees: CRLF lines only, and the end of data only at the end
        assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
        assert b"\r\n.\r\n" not in wire[:-3]
        assert _ENDS.sub(b"", wire.replace(b"\r\n", b"")) == wire.replace(b"\r\n", b"")


def test_traits() -> None:
    assert scan_bytes(b"Subject: x\r\n\r\nplain\r\n") == Traits(False, False)
    assert scan_bytes(b"Subject: x\r\n\r\ncaf\xc3\xa9\r\n") == Traits(True, False)
    assert scan_bytes("Subject: café\r\n\r\nx\r\n".encode()) == Traits(True, True)
    assert scan_bytes(b"\r\n\xc3\xa9 body only\r\n") == Traits(True, False)
    assert scan_bytes("Subject: x\n\nbody é\n".encode()) == Traits(True, False)


def test_traits_from_a_file_in_chunks_find_headers_across_chunk_edges(tmp_path: Path) -> None:
    from mailfort.delivery import message as m

    head = b"X-Pad: " + b"a" * (m.CHUNK - 9) + b"\r\n"  # the blank line straddles a chunk edge
    p = tmp_path / "m"
    p.write_bytes(head + b"\r\n" + "é body".encode() + b"\r\n")
    assert scan_file(p) == Traits(True, False)
    p.write_bytes(head + "Subject: é\r\n\r\nbody\r\n".encode())
    assert scan_file(p) == Traits(True, True)
    o = Outbound.from_file(p)
    assert o.size == p.stat().st_size and o.traits == Traits(True, True)


def test_needs_smtputf8() -> None:
    ascii_msg = Traits(eight_bit=True, utf8_headers=False)  # an 8-bit body alone: 8BITMIME
    assert not needs_smtputf8(ascii_msg, "a@x.test", ["b@y.test"])
    assert needs_smtputf8(ascii_msg, "ä@x.test", ["b@y.test"])
    assert needs_smtputf8(ascii_msg, "a@x.test", ["b@y.test", "ü@y.test"])
    assert needs_smtputf8(Traits(True, True), "", ["b@y.test"])


RP_MESSAGE = (b"Return-Path: <a@example.test>\r\nReceived: from x\r\n\tby y; date\r\n"
              b"return-path :\r\n <folded@elsewhere.test>\r\nSubject: Return-Path: kept\r\n"
              b"X-Return-Path: kept\r\n\r\nReturn-Path: <in the body, kept>\r\n")
RP_EXPECTED = (b"Received: from x\r\n\tby y; date\r\nSubject: Return-Path: kept\r\n"
               b"X-Return-Path: kept\r\n\r\nReturn-Path: <in the body, kept>\r\n")


def strip_in_pieces(message: bytes, cuts: list[int]) -> bytes:
    f = ReturnPathFilter()
    out, start = [], 0
    for cut in [*sorted(cuts), len(message)]:
        out.append(f.feed(message[start:cut]))
        start = cut
    out.append(f.end())
    return b"".join(out)


def test_return_path_fields_are_dropped_from_the_header_section_only() -> None:
    """RFC 5321 §4.4: a relay sends no Return-Path (ours is the spool's first line)."""
    for cut in range(len(RP_MESSAGE) + 1):
        assert strip_in_pieces(RP_MESSAGE, [cut]) == RP_EXPECTED, cut
    rng = random.Random(24)
    for _ in range(200):
        cuts = rng.sample(range(len(RP_MESSAGE) + 1), rng.randint(0, 8))
        assert strip_in_pieces(RP_MESSAGE, cuts) == RP_EXPECTED
    assert strip_in_pieces(b"Return-Path: <x@y>", []) == b""  # no line end, no body
    assert strip_in_pieces(b"Subject: x\r\n", [3]) == b"Subject: x\r\n"


def test_return_path_filter_gives_up_past_the_scan_limit() -> None:
    from mailfort.delivery.message import MAX_HEADER_SCAN
    long = b"X-Long: " + b"a" * (MAX_HEADER_SCAN + 10) + b"\r\nReturn-Path: <late>\r\n\r\nb\r\n"
    assert strip_in_pieces(long, [100, 70_000]) == long
