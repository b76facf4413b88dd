"""The message an outbound transaction sends: read from its file in chunks, never whole.

``Traits`` are what the MAIL command must declare about a message (RFC 6152 BODY=8BITMIME,
RFC 6531 SMTPUTF8); the queue records them at enqueue (``scan``) so that a delivery needs no
extra pass over the file. ``DataEncoder`` turns pieces of the message into the DATA wire
form (CRLF line ends, dot-stuffing, RFC 5321 §4.5.2) whatever the piece boundaries.
``ReturnPathFilter`` drops the Return-Path fields on the way out: every spooled message
starts with ours, and a relay must not send one (RFC 5321 §4.4).
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mailfort.protocol.dotstuff import DotStuffer

CHUNK = 64 * 1024  # bytes read from the file (and written to the remote) at a time
MAX_HEADER_SCAN = 1 << 20  # a header block longer than this: the rest counts as body

_RETURN_PATH = re.compile(rb"return-path[ \t]*:", re.IGNORECASE)  # obs: WSP before ":"


@dataclass(frozen=True)
class Traits:
    """What a message's octets require of the receiving server."""

    eight_bit: bool  # any octet > 127 anywhere: BODY=8BITMIME
    utf8_headers: bool  # any octet > 127 in the header block: SMTPUTF8 (RFC 6532 headers)


def needs_smtputf8(traits: Traits, sender: str, recipients: Iterable[str]) -> bool:
    """RFC 6531: a transaction needs SMTPUTF8 when an envelope address or a header is
    non-ASCII (the recipients are those of this transaction, not of the whole entry)."""
    return (traits.utf8_headers or not sender.isascii()
            or any(not r.isascii() for r in recipients))


class _TraitScanner:
    """Traits of a message fed in pieces; the end of headers is the first empty line."""

    def __init__(self) -> None:
        self.eight_bit = False
        self.utf8_headers = False
        self._in_headers = True
        self._seen = 0
        self._tail = b""  # the last 3 octets of headers, to find CRLFCRLF across pieces

    def feed(self, data: bytes) -> None:
        if not self.eight_bit and not data.isascii():
            self.eight_bit = True
        if not self._in_headers:
            return
        window = self._tail + data
        if self._seen == 0 and (window.startswith(b"\r\n") or window.startswith(b"\n")):
            end = 0  # no headers at all
        else:
            ends = [i for i in (window.find(b"\r\n\r\n"), window.find(b"\n\n")) if i >= 0]
            end = min(ends) if ends else -1
        head = window if end < 0 else window[:end]
        if not head.isascii():
            self.utf8_headers = True
        self._seen += len(data)
        if end >= 0 or self._seen > MAX_HEADER_SCAN:
            self._in_headers = False
        self._tail = window[-3:]

    def traits(self) -> Traits:
        return Traits(self.eight_bit, self.utf8_headers)


def scan_bytes(data: bytes) -> Traits:
    s = _TraitScanner()
    s.feed(data)
    return s.traits()


def scan_file(path: Path) -> Traits:
    """One pass over the file in CHUNK pieces (memory stays at one chunk)."""
    s = _TraitScanner()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            s.feed(chunk)
    return s.traits()


class DataEncoder(DotStuffer):
    """Message octets in, DATA octets out, by ``protocol/dotstuff.py``'s rule: every line
    end CRLF (bare CR and bare LF too: a remote must never see one, SMTP smuggling), a
    leading "." doubled. Pieces may split anywhere, including between the CR and LF of one
    line end; ``end`` closes the data."""

    __slots__ = ()


class ReturnPathFilter:
    """Message octets in, the same without Return-Path fields in the header section.

    RFC 5321 §4.4: Return-Path is added at final delivery only; a relay or forward must not
    send one, and a message that has one should not be sent on. The queue file keeps the
    field we wrote when the message arrived (it is the spool file, linked); it is dropped
    here, with its continuation lines, whatever the piece boundaries. A header line longer
    than the scan limit ends the filtering (the rest passes unchanged).
    """

    def __init__(self) -> None:
        self._held = bytearray()  # an incomplete header line
        self._in_headers = True
        self._dropping = False  # inside a Return-Path field (continuation lines go too)
        self._seen = 0

    def feed(self, data: bytes) -> bytes:
        if not self._in_headers:
            return data
        self._held += data
        buf = self._held
        out = bytearray()
        pos = 0
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            line = bytes(buf[pos:nl + 1])
            pos = nl + 1
            self._seen += len(line)
            if line in (b"\r\n", b"\n"):  # end of the header section
                self._in_headers = False
                out += line
                break
            if line[:1] not in (b" ", b"\t"):
                self._dropping = _RETURN_PATH.match(line) is not None
            if not self._dropping:
                out += line
            if self._seen > MAX_HEADER_SCAN:
                self._in_headers = False
                break
        rest = bytes(buf[pos:])
        self._held = bytearray()
        if not self._in_headers or self._seen + len(rest) > MAX_HEADER_SCAN:
            self._in_headers = False
            return bytes(out) + rest
        self._held += rest
        return bytes(out)

    def end(self) -> bytes:
        """What is still held: a last header line without a line end."""
        rest = bytes(self._held)
        self._held = bytearray()
        if not self._in_headers:
            return rest
        self._in_headers = False
        if rest[:1] in (b" ", b"\t"):
            return b"" if self._dropping else rest
        return b"" if _RETURN_PATH.match(rest) else rest


@dataclass(frozen=True)
class Outbound:
    """The message of one delivery: how to open it, its size and its traits."""

    open: Callable[[], BinaryIO]
    size: int
    traits: Traits

    @classmethod
    def from_bytes(cls, data: bytes) -> Outbound:
        return cls(lambda: io.BytesIO(data), len(data), scan_bytes(data))

    @classmethod
    def from_file(cls, path: Path, traits: Traits | None = None) -> Outbound:
        """``traits`` as recorded at enqueue; scanned here when not recorded."""
        return cls(lambda: open(path, "rb"), path.stat().st_size,
                   traits if traits is not None else scan_file(path))
