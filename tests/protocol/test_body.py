"""The header section limit of the body checker (issue 24 #5a): what reads the header
section after reception always sees all of it."""

from __future__ import annotations

from mailfort.protocol.body import HEADER_TOO_BIG, MAX_HEADER_SECTION, BodyChecker

LINE = b"X-Pad: " + b"p" * 990 + b"\r\n"  # 999 octets


def feed_all(chunks: list[bytes]) -> BodyChecker:
    checker = BodyChecker(50 * 1024 * 1024)
    for chunk in chunks:
        checker.feed(chunk)
    checker.finish()
    return checker


def test_header_section_over_the_limit_is_refused_in_any_chunking() -> None:
    lines = MAX_HEADER_SECTION // len(LINE) + 1
    header = LINE * lines
    assert len(header) > MAX_HEADER_SECTION
    message = header + b"\r\nbody\r\n"
    for size in (len(message), 1, 7, 1000, 65536):
        chunks = [message[i:i + size] for i in range(0, len(message), size)]
        assert feed_all(chunks).error == HEADER_TOO_BIG, size
    # No body at all: the whole message is the header section.
    assert feed_all([header]).error == HEADER_TOO_BIG


def test_a_large_body_under_a_small_header_is_fine() -> None:
    header = LINE * (MAX_HEADER_SECTION // len(LINE) - 1)
    body = b"b" * 998 + b"\r\n"
    message = header + b"\r\n" + body * 3000  # 3 MB of body
    assert feed_all([message]).error is None
    assert feed_all([message[i:i + 4096] for i in range(0, len(message), 4096)]).error is None
