"""Incremental checks on a message body as it streams (sans-I/O).

One checker serves DATA (after dot-unstuffing) and BDAT (raw chunks): it sees the message
bytes exactly as they will be stored, in pieces cut anywhere, and records the first problem
it finds. Nothing is buffered beyond the current header line, so memory does not grow
with message size.
"""

from __future__ import annotations

from mailfort.protocol.replies import Reply

BARE_LINE_ENDING = Reply(
    550, "5.6.0", "Message refused: bare CR or LF in message (only CRLF line endings allowed)"
)
DATA_LINE_TOO_LONG = Reply(552, "5.6.0", "Message refused: a line is longer than 1000 octets")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
MAIL_LOOP = Reply(554, "5.4.6", "Too many Received headers: mail loop detected")
# The header section is bounded as a whole (as Postfix's header_size_limit, which truncates
# instead): what reads it after us (the forged Authentication-Results filter, DMARC, the
# submission checks) then always sees all of it, never a first part only.
MAX_HEADER_SECTION = 1024 * 1024
HEADER_TOO_BIG = Reply(552, "5.3.4", "Message header section exceeds fixed maximum size")

_MAX_HEADER_LINE = 1000


class BodyChecker:
    """Size, line-ending, line-length and Received-count checks across arbitrary chunks."""

    __slots__ = (
        "_bare_ok",
        "_header_size",
        "_line_len",
        "_max_line",
        "_max_received",
        "_max_size",
        "_pending_cr",
        "_received",
        "_tail",
        "error",
        "in_headers",
        "size",
    )

    def __init__(self, max_size: int, max_line: int = 1000, max_received: int = 50, *,
                 bare_line_endings: bool = False) -> None:
        """``bare_line_endings``: the lab's legacy profile only; accept bare CR and LF."""
        self._bare_ok = bare_line_endings
        self._max_size = max_size
        self._max_line = max_line - 2  # the limit counts the CRLF
        self._max_received = max_received
        self._pending_cr = False  # previous chunk ended in CR
        self._line_len = 0  # octets of the current (unfinished) line
        self._tail = b""  # unfinished header line
        self._received = 0
        self._header_size = 0  # octets of the header section so far
        self.in_headers = True
        self.size = 0
        self.error: Reply | None = None

    def feed(self, data: bytes) -> bool:
        """Check one piece; False once the message is refused (later data can be dropped)."""
        if self.error is not None:
            return False
        self.size += len(data)
        if self.size > self._max_size:
            self.error = MESSAGE_TOO_BIG
            return False
        chunk = b"\r" + data if self._pending_cr else data
        self._pending_cr = chunk.endswith(b"\r")
        if self._pending_cr:
            chunk = chunk[:-1]
        crlf = chunk.count(b"\r\n")
        bare = chunk.count(b"\r") != crlf or chunk.count(b"\n") != crlf
        if bare and not self._bare_ok:
            self.error = BARE_LINE_ENDING
            return False
        if not self._check_lines(chunk, crlf):
            return False
        if self.in_headers:
            self._scan_headers(chunk)
        return self.error is None

    def finish(self) -> Reply | None:
        """The refusal for the whole message, or None if it may be stored."""
        if self.error is None and self._pending_cr and not self._bare_ok:
            self.error = BARE_LINE_ENDING
        return self.error

    def _check_lines(self, chunk: bytes, crlf: int) -> bool:
        if crlf == 0:
            self._line_len += len(chunk)
        elif self._line_len + len(chunk) <= self._max_line:
            self._line_len = len(chunk) - chunk.rfind(b"\n") - 1
        else:
            lines = chunk.split(b"\r\n")
            # the first piece continues the line left open by the previous chunk
            longest = max(self._line_len + len(lines[0]), max(map(len, lines[1:])))
            if longest > self._max_line:
                self.error = DATA_LINE_TOO_LONG
                return False
            self._line_len = len(lines[-1])
        if self._line_len > self._max_line:
            self.error = DATA_LINE_TOO_LONG
            return False
        return True

    def _scan_headers(self, chunk: bytes) -> None:
        data = self._tail + chunk
        before = len(self._tail)  # data[before:] is this chunk
        start = 0
        while True:
            end = data.find(b"\r\n", start)
            if end < 0:
                break
            if end == start:  # empty line: end of the header section
                self.in_headers = False
                self._tail = b""
                self._header_size += start - before
                if self._header_size > MAX_HEADER_SECTION:
                    self.error = HEADER_TOO_BIG
                return
            if data[start : start + 9].lower() == b"received:":
                self._received += 1
                if self._received > self._max_received:
                    self.error = MAIL_LOOP
                    self.in_headers = False
                    return
            start = end + 2
        self._tail = data[start:][:_MAX_HEADER_LINE]
        self._header_size += len(chunk)
        if self._header_size > MAX_HEADER_SECTION:
            self.error = HEADER_TOO_BIG
            self.in_headers = False
