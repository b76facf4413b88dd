"""The shared command-line reader (protocol/lines.py): one rule for SMTP and POP3."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mailfort.protocol.lines import LineError, LineReader
from tests.fuzzing import examples

LIMIT = 16


def read_all(reader: LineReader, limit: int = LIMIT) -> list[bytes | LineError]:
    out: list[bytes | LineError] = []
    while (item := reader.next_line(limit)) is not None:
        out.append(item)
    return out


def feed(data: bytes, limit: int = LIMIT) -> list[bytes | LineError]:
    r = LineReader()
    r.feed(data)
    return read_all(r, limit)


def test_lines_end_with_crlf_only() -> None:
    assert feed(b"NOOP\r\nQUIT\r\n") == [b"NOOP", b"QUIT"]
    assert feed(b"NOOP\nQUIT\r\n") == [LineError.BARE_LINE_ENDING, b"QUIT"]
    assert feed(b"NO\rOP\r\n") == [LineError.BARE_LINE_ENDING]
    assert feed(b"NOOP\r\r\n") == [LineError.BARE_LINE_ENDING]
    assert feed(b"NO\0OP\r\n") == [LineError.NUL]
    assert feed(b"\r\n") == [b""]
    assert feed(b"NOOP\r") == []  # waits: the LF may come in the next packet


def test_limit_counts_the_crlf() -> None:
    exact = b"x" * (LIMIT - 2) + b"\r\n"
    assert feed(exact) == [b"x" * (LIMIT - 2)]
    one_more = b"x" * (LIMIT - 1) + b"\r\n"
    assert feed(one_more + b"NEXT\r\n") == [LineError.TOO_LONG, b"NEXT"]


def test_too_long_is_reported_at_once_and_the_tail_is_dropped_as_it_comes() -> None:
    r = LineReader()
    r.feed(b"y" * LIMIT)
    assert r.next_line(LIMIT) is LineError.TOO_LONG  # before any LF has arrived
    for _ in range(100):
        r.feed(b"z" * 1000)
        assert r.next_line(LIMIT) is None
        assert len(r.buffer) == 0  # memory stays bounded
    r.feed(b"tail\r\nNOOP\r\n")
    assert read_all(r) == [b"NOOP"]  # the tail is never taken as a command


def test_clear_forgets_a_partly_skipped_line() -> None:
    r = LineReader()
    r.feed(b"y" * (LIMIT + 3))
    assert r.next_line(LIMIT) is LineError.TOO_LONG
    r.clear()
    r.feed(b"NOOP\r\n")
    assert r.next_line(LIMIT) == b"NOOP"


_STREAM = st.lists(
    st.one_of(st.sampled_from([b"\r\n", b"\n", b"\r", b"\0", b"x" * 20, b"NOOP"]),
              st.binary(max_size=12)),
    max_size=30,
).map(b"".join)


@settings(max_examples=examples(300), deadline=None)
@given(_STREAM, st.lists(st.integers(min_value=1, max_value=25), min_size=1, max_size=10))
def test_reader_properties(data: bytes, cuts: list[int]) -> None:
    """However the stream is cut into packets: the same lines, none with CR, LF or NUL,
    none longer than the limit, and never more buffered than the limit."""
    whole = feed(data)
    r = LineReader()
    got: list[bytes | LineError] = []
    pos, i = 0, 0
    while pos < len(data):
        n = cuts[i % len(cuts)]
        r.feed(data[pos:pos + n])
        pos, i = pos + n, i + 1
        got += read_all(r)
        assert len(r.buffer) < LIMIT
    assert got == whole
    for item in whole:
        if isinstance(item, bytes):
            assert len(item) + 2 <= LIMIT
            assert not {0, 10, 13} & set(item)


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(st.sampled_from([b"RETR 1\r\n", b"\r\n", b"\n", b"\r\r\n", b"RE\rTR\r\n",
                                 b"x\nRETR 2\r\n", b"NO\0OP\r\n", b"LIST\r\n\r\n"]),
                max_size=12))
def test_a_line_read_alone_is_read_as_in_a_longer_buffer(lines: list[bytes]) -> None:
    """One command per read (the whole buffer is the line: no slice is copied) and the same
    bytes buffered together give the same lines and the same refusals."""
    alone = LineReader()
    got: list[bytes | LineError] = []
    for line in lines:
        alone.feed(line)
        got += read_all(alone)
    assert got == feed(b"".join(lines))
