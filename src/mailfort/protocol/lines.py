"""Command lines out of a byte stream: the one line reader of the SMTP and POP3 engines.

The rule, the same for both protocols:

* A line ends with CRLF and nothing else. RFC 5321 §2.3.8 and RFC 1939 §3 both terminate
  commands with CRLF; a bare LF or CR inside a line is refused (``BARE_LINE_ENDING``), not
  guessed at. Two parsers that disagree on where a line ends are how commands get smuggled
  past a filter or a proxy, so mailfort never accepts a second spelling of the end of line.
* A NUL anywhere is refused (``NUL``): commands are text.
* ``limit`` counts the octets of the line *including* its CRLF (RFC 5321 §4.5.3.1.4:
  512 for SMTP commands; RFC 2449 §4: 255 for POP3). As soon as ``limit`` octets have
  arrived without an LF, ``TOO_LONG`` is reported once, without waiting for the end, and
  the rest of that line up to its LF is dropped as it arrives: memory stays bounded and the
  client hears at once, and the tail is never taken as a command of its own.

The reader owns the input buffer; the SMTP engine reads DATA and BDAT octets from
``buffer`` directly, and STARTTLS/STLS clears it (pipelined plaintext is never read).
"""

from __future__ import annotations

import enum

CRLF = b"\r\n"


class LineError(enum.Enum):
    """Why a line was refused; each engine words its own reply."""

    TOO_LONG = "too long"
    BARE_LINE_ENDING = "bare CR or LF"
    NUL = "NUL"


class LineReader:
    """Splits buffered input into command lines by the rule in the module docstring."""

    __slots__ = ("_skipping", "buffer")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self._skipping = False  # dropping the tail of an over-long line

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def clear(self) -> None:
        """Forget everything buffered, including a partly skipped line."""
        self.buffer.clear()
        self._skipping = False

    def next_line(self, limit: int) -> bytes | LineError | None:
        """The next line without its CRLF, a ``LineError``, or None until more input comes."""
        buf = self.buffer
        while self._skipping:
            nl = buf.find(b"\n")
            if nl < 0:
                buf.clear()
                return None
            del buf[: nl + 1]
            self._skipping = False
        nl = buf.find(b"\n", 0, limit)
        if nl < 0:
            if len(buf) < limit:
                return None
            del buf[:limit]
            self._skipping = True
            return LineError.TOO_LONG
        end = nl + 1
        if end == len(buf):  # the usual case, one command per read: no slice to copy
            raw = bytes(buf)
            buf.clear()
        else:
            raw = bytes(buf[:end])
            del buf[:end]
        if not raw.endswith(CRLF) or raw.find(b"\r", 0, end - 2) >= 0:
            return LineError.BARE_LINE_ENDING
        if b"\0" in raw:
            return LineError.NUL
        return raw[:-2]
