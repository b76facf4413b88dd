"""The auditor's own raw-socket client: bytes exactly as given, every read bounded.

Probes for smuggling, injection, overlong lines and NUL must send bytes that no
well-behaved client library would send, so the auditor speaks SMTP and POP3 over a
plain socket. Every read has a timeout and a size cap, so a server that stops answering
or answers forever can slow a check down but never hang it. Every exchange is kept in a
transcript (trimmed) that becomes the check's evidence.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time

MAX_REPLY = 64 * 1024  # octets kept per reply; a server that sends more is cut off
TRIM = 160  # characters of one transcript line


class ProbeError(Exception):
    """The connection failed, timed out or was closed: the session is over."""


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
    """One TCP connection (optionally TLS) with line reads under a timeout."""

    def __init__(self, host: str, port: int, timeout: float,
                 transcript: list[str] | None = None) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.transcript = transcript if transcript is not None else []
        self.buf = b""
        self.closed = False
        try:
            self.sock: socket.socket = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise ProbeError(f"connect {host}:{port}: {exc}") from exc
        self.sock.settimeout(timeout)

    # -- bytes ------------------------------------------------------------------------

    def send(self, data: bytes, *, note: str | None = None) -> None:
        self.transcript.append("> " + (note or trim(data.rstrip(b"\r\n"))))
        try:
            self.sock.sendall(data)
        except OSError as exc:
            self.closed = True
            raise ProbeError(f"send: {exc}") from exc

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProbeError("timeout")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError as exc:
            raise ProbeError("timeout") from exc
        except (OSError, ssl.SSLError) as exc:
            self.closed = True
            raise ProbeError(f"recv: {exc}") from exc
        if not chunk:
            self.closed = True
            raise ProbeError("connection closed by the server")
        self.buf += chunk

    def read_line(self, timeout: float | None = None) -> bytes:
        """One line without its CRLF (or LF); ProbeError on timeout or close."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_REPLY:
                line, self.buf = self.buf, b""
                return line
            self._fill(deadline)
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r")

    # -- SMTP -------------------------------------------------------------------------

    def reply(self, timeout: float | None = None) -> tuple[int, list[str]]:
        """One SMTP reply (all its lines): (code, texts). Code 0 for garbage."""
        lines: list[str] = []
        while True:
            raw = self.read_line(timeout)
            text = raw.decode("latin-1")
            lines.append(text)
            self.transcript.append("< " + trim(text))
            if len(text) < 4 or text[3] != "-" or sum(map(len, lines)) > MAX_REPLY:
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
        """The body of a POP3 multi-line response, up to the lone '.'."""
        out: list[str] = []
        while True:
            text = self.read_line(timeout).decode("latin-1")
            if text == ".":
                break
            out.append(text)
            if len(out) > 200:
                break
        self.transcript.append("< " + trim(" | ".join(out)))
        return out

    # -- TLS and end ------------------------------------------------------------------

    def starttls(self, ctx: ssl.SSLContext | None = None) -> ssl.SSLSocket:
        """Wrap the socket in TLS. Bytes already buffered stay (they came in the clear)."""
        try:
            tls = (ctx or insecure_context()).wrap_socket(self.sock, server_hostname=self.host)
        except (OSError, ssl.SSLError) as exc:
            self.closed = True
            raise ProbeError(f"TLS handshake: {exc}") from exc
        self.sock = tls
        self.transcript.append(f"  [TLS {tls.version()} {(tls.cipher() or ('?',))[0]}]")
        return tls

    def pending(self, wait: float) -> bool:
        """Whether the server sends anything unasked within ``wait`` seconds."""
        if self.buf:
            return True
        try:
            self._fill(time.monotonic() + wait)
        except ProbeError:
            return bool(self.buf)
        return True

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()

    def quit(self, pop3: bool = False) -> None:
        """QUIT politely when possible, then close; never raises."""
        if not self.closed:
            try:
                self.send(b"QUIT\r\n")
                if pop3:
                    self.status(min(self.timeout, 2.0))
                else:
                    self.reply(min(self.timeout, 2.0))
            except ProbeError:
                pass
        self.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
