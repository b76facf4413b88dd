"""Message octets to their dot-stuffed wire form: one rule for SMTP DATA and POP3 RETR/TOP.

The rule, stated once (RFC 5321 §4.5.2, RFC 1939 §3):

- a line ends at CRLF, at a bare LF and at a bare CR; every line end goes out as CRLF, so
  the peer never sees a bare CR or LF (on SMTP, a smuggled end of data; on POP3, a line its
  client splits differently from us);
- a line that starts with "." gets another ".";
- a message that does not end with a line end gets one, then "." CRLF ends it.

Pieces may be cut anywhere, even between the CR and the LF of one line end: the output does
not depend on where. ``SizeCounter`` counts the octets of the same form before stuffing
(RFC 1939's sizes, LIST must match RETR) without making it.
"""

from __future__ import annotations

CRLF = b"\r\n"
TERMINATOR = b".\r\n"


def _crlf(data: bytes) -> bytes:
    """Every line end in ``data`` (CRLF, bare LF, bare CR) as CRLF.

    Three C-level passes (a bare CR is rare: the middle one is usually a scan only), about
    twice as fast as one regular-expression substitution. Data without any CR (files
    stored with LF endings, as Postfix and mailfort write them) needs only the last one:
    the search for CRLF costs 1.8 us on a 1 KB message even when it finds nothing, the
    memchr for CR 0.2 us (bench/RESULTS.md, POP3 warm)."""
    if b"\r" not in data:
        return data.replace(b"\n", CRLF)
    out = data.replace(CRLF, b"\n")
    if b"\r" in out:
        out = out.replace(b"\r", b"\n")
    return out.replace(b"\n", CRLF)


def encode_whole(data: bytes) -> bytes:
    """A whole message in one piece to its wire form, terminator included: the octets of
    ``DotStuffer().feed(data) + end()`` without the per-piece state (a POP3 session sends
    thousands of small messages, each read at once)."""
    # _crlf's first case spelled out: files stored with LF endings, thousands a session
    out = data.replace(b"\n", CRLF) if b"\r" not in data else _crlf(data)
    if out[:1] == b".":
        out = b"." + out
    out = out.replace(b"\r\n.", b"\r\n..")
    if out and out[-1:] != b"\n":
        out += CRLF
    return out + TERMINATOR


class DotStuffer:
    """Feed pieces, get wire octets; ``end`` closes the message.

    ``feed`` is ``stuff(crlf(data))``; the two halves are public so that POP3 TOP can cut
    the normalised lines before they are stuffed.
    """

    __slots__ = ("_bol", "_cr")

    def __init__(self) -> None:
        self._bol = True  # the next output octet starts a line
        self._cr = False  # a CR held back from the end of a piece: its LF may come next

    def feed(self, data: bytes) -> bytes:
        return self.stuff(self.crlf(data))

    def crlf(self, data: bytes) -> bytes:
        """``data``'s line ends as CRLF; a final CR waits for the next piece."""
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr = True
        return _crlf(data) if data else data

    def stuff(self, out: bytes) -> bytes:
        """Double the dot that starts a line of ``out`` (output of ``crlf``)."""
        if not out:
            return out
        if self._bol and out[:1] == b".":
            out = b"." + out
        out = out.replace(b"\r\n.", b"\r\n..")
        self._bol = out[-1:] == b"\n"
        return out

    def drop_pending(self) -> None:
        """Forget a held-back CR (POP3 TOP stops in the middle of a message)."""
        self._cr = False

    def end(self) -> bytes:
        """A held-back CR or an unfinished line ended, then the terminator."""
        out = CRLF if self._cr or not self._bol else b""
        self._cr = False
        self._bol = True
        return out + TERMINATOR


class SizeCounter:
    """Octets of ``DotStuffer``'s output before stuffing and without the terminator, counted
    piece by piece: each line end is two octets, and a missing final one adds two."""

    __slots__ = ("_last", "_n")

    def __init__(self) -> None:
        self._n = 0
        self._last = b""

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        # a bare LF or a bare CR is one octet that goes out as two; a CRLF stays two
        pairs = chunk.count(CRLF)
        n = len(chunk) + chunk.count(b"\n") - pairs
        if b"\r" in chunk:  # a fast scan; LF files skip the count
            n += chunk.count(b"\r") - pairs
        if chunk[:1] == b"\n" and self._last == b"\r":
            n -= 2  # the CR ending the previous chunk, counted as a line end, was this one's
        self._n += n
        self._last = chunk[-1:]

    def size(self) -> int:
        if self._n and self._last not in (b"\n", b"\r"):
            return self._n + 2
        return self._n
