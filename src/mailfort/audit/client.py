"""The auditor's own raw-socket client: bytes exactly as given, every read bounded.

Probes for smuggling, injection, overlong lines and NUL must send bytes that no
well-behaved client library would send, so the auditor speaks SMTP and POP3 over a
plain socket. Every reply is bounded as a whole, by one deadline and a number of lines
(a server that trickles continuation lines cannot stretch it), and every wait is also
bounded by the run's budget (``deadline``), so a server that stops answering or answers
forever can slow a check down but never hang it or the run. Every exchange is kept in a
transcript (trimmed) that becomes the check's evidence.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import time

MAX_REPLY = 64 * 1024  # octets kept per line; a server that sends more is cut off
MAX_LINES = 100  # lines of one reply (EHLO and HELP send a few dozen at most)
TRIM = 160  # characters of one transcript line


class ProbeError(Exception):
    """The connection failed, timed out or was closed: the session is over."""


class NoReply(ProbeError):
    """No complete reply within the time (or lines) allowed.

    Unlike a close, this says nothing about what the server did with the command: it may
    still be thinking (an SPF check, a callout, a tarpit). A check must not read it as a
    refusal.
    """


class BudgetSpent(Exception):
    """The run's ``--budget`` ran out in the middle of a check.

    Not a ProbeError, so that no check mistakes it for the server's doing; the engine
    makes the check INCONCLUSIVE.
    """


def insecure_context(*, legacy: bool = False) -> ssl.SSLContext:
    """A client context that accepts any certificate (probes audit, they do not trust).

    ``legacy`` also allows every protocol version and cipher the local OpenSSL has, so
    that a probe can ask whether the *server* accepts them.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if legacy:
        ctx.set_ciphers("@SECLEVEL=0:ALL")
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    return ctx


def trim(data: bytes | str) -> str:
    """One printable transcript line: control bytes shown escaped, long lines cut."""
    text = data.decode("latin-1") if isinstance(data, bytes) else data
    shown = text.encode("unicode_escape").decode("ascii").replace("\\'", "'")
    if len(shown) > TRIM:
        shown = f"{shown[:TRIM]}… ({len(text)} chars)"
    return shown


class RawClient:
    """One TCP connection (optionally TLS) with line reads under a timeout.

    ``timeout`` bounds the connect, each send and each reply as a whole; ``deadline`` (a
    ``time.monotonic()`` value, the end of the run's budget) bounds them all.
    """

    deadline: float | None = None  # (a subclass may set up its socket itself)

    def __init__(self, host: str, port: int, timeout: float,
                 transcript: list[str] | None = None, *, deadline: float | None = None) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.deadline = deadline
        self.transcript = transcript if transcript is not None else []
        self.buf = b""
        self.closed = False
        try:
            self.sock: socket.socket = socket.create_connection(
                (host, port), timeout=self._left(self._until(timeout)))
        except TimeoutError as exc:
            raise self._late(self._until(timeout), "connect timeout") from exc
        except OSError as exc:
            raise ProbeError(f"connect {host}:{port}: {exc}") from exc

    # -- deadlines --------------------------------------------------------------------

    def _until(self, seconds: float | None) -> float:
        """The moment a wait of ``seconds`` (default: the timeout) ends, budget included."""
        end = time.monotonic() + (self.timeout if seconds is None else seconds)
        return end if self.deadline is None else min(end, self.deadline)

    def _late(self, deadline: float, what: str = "timeout") -> Exception:
        """The error for a wait that ended at ``deadline``: the budget's, or the reply's."""
        if self.deadline is not None and deadline >= self.deadline:
            return BudgetSpent("the run's time budget ran out")
        return NoReply(what)

    def _left(self, deadline: float) -> float:
        """Seconds to ``deadline``; raises when none are left."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._late(deadline)
        return remaining

    # -- bytes ------------------------------------------------------------------------

    def send(self, data: bytes, *, note: str | None = None) -> None:
        self.transcript.append("> " + (note or trim(data.rstrip(b"\r\n"))))
        self.send_raw(data)

    def send_raw(self, data: bytes) -> None:
        """Send ``data`` whole, within the timeout and the budget, and keep no transcript."""
        deadline = self._until(None)
        try:
            self.sock.settimeout(self._left(deadline))
            self.sock.sendall(data)
        except TimeoutError as exc:
            self.closed = True  # part of ``data`` may be sent: the session is unusable
            raise self._late(deadline, "send timeout") from exc
        except OSError as exc:
            self.closed = True
            raise ProbeError(f"send: {exc}") from exc

    def _fill(self, deadline: float) -> None:
        """Read more; a read that ends late closes the session, which is out of step for
        good (a late reply would be read as the next command's)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self.close()
            raise self._late(deadline)
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError as exc:
            self.close()
            raise self._late(deadline) from exc
        except (OSError, ssl.SSLError) as exc:
            self.closed = True
            raise ProbeError(f"recv: {exc}") from exc
        if not chunk:
            self.closed = True
            raise ProbeError("connection closed by the server")
        self.buf += chunk

    def read_line(self, timeout: float | None = None, *,
                  deadline: float | None = None) -> bytes:
        """One line without its CRLF (or LF): NoReply when late, BudgetSpent when the run's
        budget ends first, ProbeError on a close.

        ``deadline`` (of the whole reply the line belongs to) wins over ``timeout``.
        """
        end = self._until(timeout) if deadline is None else deadline
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_REPLY:
                line, self.buf = self.buf, b""
                return line
            self._fill(end)
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r")

    # -- SMTP -------------------------------------------------------------------------

    def reply(self, timeout: float | None = None) -> tuple[int, list[str]]:
        """One SMTP reply (all its lines): (code, texts). Code 0 for garbage.

        ``timeout`` bounds the whole reply, not each line, and a reply has at most
        MAX_LINES lines and MAX_REPLY octets: NoReply (and the session closed) otherwise.
        """
        deadline = self._until(timeout)
        lines: list[str] = []
        while True:
            if len(lines) >= MAX_LINES or sum(map(len, lines)) > MAX_REPLY:
                self.close()  # the rest of it would be read as the next reply
                raise NoReply(f"a reply of more than {MAX_LINES} lines or {MAX_REPLY} octets")
            raw = self.read_line(deadline=deadline)
            text = raw.decode("latin-1")
            lines.append(text)
            self.transcript.append("< " + trim(text))
            if len(text) < 4 or text[3] != "-":
                break
        code = int(lines[-1][:3]) if lines[-1][:3].isdigit() else 0
        return code, [ln[4:] for ln in lines]

    def cmd(self, line: str | bytes, timeout: float | None = None) -> tuple[int, list[str]]:
        data = line if isinstance(line, bytes) else line.encode("latin-1")
        self.send(data + b"\r\n")
        return self.reply(timeout)

    # -- POP3 -------------------------------------------------------------------------

    def status(self, timeout: float | None = None) -> tuple[bool, str]:
        """One POP3 status line: (ok, text)."""
        text = self.read_line(timeout).decode("latin-1")
        self.transcript.append("< " + trim(text))
        return text.startswith("+OK"), text

    def multiline(self, timeout: float | None = None) -> list[str]:
        """The body of a POP3 multi-line response, up to the lone '.' (one deadline)."""
        deadline = self._until(timeout)
        out: list[str] = []
        while True:
            text = self.read_line(deadline=deadline).decode("latin-1")
            if text == ".":
                break
            out.append(text)
            if len(out) > 200:
                break
        self.transcript.append("< " + trim(" | ".join(out)))
        return out

    # -- IMAP -------------------------------------------------------------------------

    def tagged(self, tag: str, timeout: float | None = None) -> tuple[str, list[str]]:
        """Lines up to the tagged reply of ``tag`` (one deadline, at most MAX_LINES):
        (its status word, OK/NO/BAD, and the untagged lines before it). A ``+``
        continuation comes back as status ``+``: the server waits for a literal."""
        deadline = self._until(timeout)
        untagged: list[str] = []
        for _ in range(MAX_LINES):
            text = self.read_line(deadline=deadline).decode("latin-1")
            self.transcript.append("< " + trim(text))
            word, _, rest = text.partition(" ")
            if word == tag:
                return rest.partition(" ")[0].upper(), untagged
            if word == "+":
                return "+", untagged
            untagged.append(text)
        self.close()
        raise NoReply(f"more than {MAX_LINES} lines before the reply to {tag}")

    def imap(self, tag: str, line: str, timeout: float | None = None) -> tuple[str, list[str]]:
        """Send ``TAG line`` and read up to its tagged reply (see :meth:`tagged`)."""
        self.send(f"{tag} {line}\r\n".encode("latin-1"))
        return self.tagged(tag, timeout)

    # -- ManageSieve ------------------------------------------------------------------

    def sieve(self, timeout: float | None = None, *,
              challenge: bool = False) -> tuple[str, list[str]]:
        """One ManageSieve response (RFC 5804): the data lines (capabilities) up to the
        line that starts with OK, NO or BYE: (that word, the data lines). With
        ``challenge`` (after AUTHENTICATE), a first line that is a lone string (quoted or
        ``{N}``) is a SASL challenge and comes back as status ``""``: the server waits for
        the client's response. One deadline, at most MAX_LINES lines."""
        deadline = self._until(timeout)
        data: list[str] = []
        for _ in range(MAX_LINES):
            text = self.read_line(deadline=deadline).decode("latin-1")
            self.transcript.append("< " + trim(text))
            word = text.partition(" ")[0].upper()
            if word in ("OK", "NO", "BYE"):
                return word, data
            lone = (text.startswith('"') and text.rstrip().endswith('"')
                    and text.count('"') == 2) or bool(re.fullmatch(r"\{\d+\+?\}", text))
            if challenge and lone and not data:
                return '""', [text]
            data.append(text)
        self.close()
        raise NoReply(f"more than {MAX_LINES} lines before a ManageSieve status")

    # -- TLS and end ------------------------------------------------------------------

    def starttls(self, ctx: ssl.SSLContext | None = None) -> ssl.SSLSocket:
        """Wrap the socket in TLS. Bytes already buffered stay (they came in the clear)."""
        deadline = self._until(None)
        try:
            self.sock.settimeout(self._left(deadline))
            tls = (ctx or insecure_context()).wrap_socket(self.sock, server_hostname=self.host)
        except TimeoutError as exc:
            self.closed = True
            raise self._late(deadline, "TLS handshake timeout") from exc
        except (OSError, ssl.SSLError) as exc:
            self.closed = True
            raise ProbeError(f"TLS handshake: {exc}") from exc
        self.sock = tls
        self.transcript.append(f"  [TLS {tls.version()} {(tls.cipher() or ('?',))[0]}]")
        return tls

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()

    def quit(self, pop3: bool = False, imap: bool = False, sieve: bool = False) -> None:
        """QUIT (IMAP, ManageSieve: LOGOUT) politely when possible, then close; never
        raises."""
        if not self.closed:
            try:
                if sieve:
                    self.send(b"LOGOUT\r\n")
                    self.sieve(min(self.timeout, 2.0))
                elif imap:
                    self.imap("Z", "LOGOUT", min(self.timeout, 2.0))
                else:
                    self.send(b"QUIT\r\n")
                    if pop3:
                        self.status(min(self.timeout, 2.0))
                    else:
                        self.reply(min(self.timeout, 2.0))
            except (ProbeError, BudgetSpent):
                pass
        self.close()

    def replies_before_quit(self, pop3: bool = False, imap: bool = False) -> list[str]:
        """Send QUIT as a marker and return the replies that come before its own.

        For IMAP the marker is ``Z LOGOUT`` and the replies counted are the tagged ones
        (untagged data and BYE are not replies to a command); its own tagged reply, or the
        close after its BYE, ends the count.

        A reply that comes late is still a reply: counting up to the marker's reply (221,
        or for POP3 the server's close that follows its +OK) does not mistake a slow
        server for a silent one. Returns the SMTP codes (POP3 status lines) before the
        marker's reply; a close before it ends the count too. NoReply when the marker is
        not answered in time: then the replies cannot be counted.
        """
        with contextlib.suppress(ProbeError):  # closed already: count what it sent
            self.send(b"Z LOGOUT\r\n" if imap else b"QUIT\r\n")
        seen: list[str] = []
        try:
            for _ in range(MAX_LINES):
                if imap:
                    text = self.read_line().decode("latin-1")
                    self.transcript.append("< " + trim(text))
                    tag = text.partition(" ")[0]
                    if tag == "Z":
                        return seen
                    if tag not in ("*", "+"):
                        seen.append(text)
                    continue
                if pop3:
                    seen.append(self.read_line().decode("latin-1"))
                    self.transcript.append("< " + trim(seen[-1]))
                    continue
                code, _ = self.reply()
                if code == 221:
                    return seen
                seen.append(str(code))
        except NoReply:
            raise
        except ProbeError:  # the server closed the connection: nothing more will come
            if pop3 and seen and seen[-1].startswith("+OK"):
                seen.pop()  # QUIT's own answer; the close that followed is the marker
            return seen
        raise NoReply(f"more than {MAX_LINES} replies before QUIT's")

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
