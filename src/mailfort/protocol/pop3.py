"""The POP3 server protocol as a sans-I/O state machine (RFC 1939, 2449, 2595, 3206, 5034).

Bytes go in with ``receive``; events come out of ``next_event``; reply bytes accumulate in an
output buffer the server drains with ``take_output``. The engine owns every rule that can be
decided from the bytes alone: syntax, states, line and error limits, what CAPA offers, the
refusal of credentials before TLS, and discarding what was pipelined after STLS. The server
owns the outside world and answers each waiting event:

* ``CheckCredentials`` → ``credentials_accepted(user)`` or ``credentials_refused()``; a
  refusal is one reply whatever the reason, so it discloses nothing about accounts.
* ``OpenMailbox`` → ``mailbox_opened(listing)`` with the login snapshot (uid, size) or
  ``mailbox_unavailable(text)`` (``[IN-USE]``, ``[SYS/TEMP]``).
* ``StartTLS`` → ``tls_started()``; every byte received after the STLS line and before the
  handshake is thrown away (the RFC 2595 rule; CVE-2011-0411 class of injection).
* ``Retrieve`` → ``retrieve_started(size)`` (the engine writes ``+OK``; the server then
  streams the encoded message, see ``MessageEncoder``) and ``retrieve_done()``; or
  ``retrieve_failed(text)``.
* ``Quit`` (UPDATE state) → ``update_done(failures)``: only then are deletions final.

The message listing (STAT, LIST, UIDL) and the deletion marks (DELE, RSET) are plain data
held here, so most of a session is answered without the server. No sockets, clocks or disk.

Lines, the error limit and SASL follow the rules shared with the SMTP engine
(``lines``, ``errors``, ``sasl``). Every byte sequence gets a ``-ERR`` at worst: an
exception inside the engine is a bug, and even then it closes the session with
``[SYS/TEMP]`` and is kept in ``internal_error`` rather than escaping to the server.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from mailfort.protocol.dotstuff import TERMINATOR, DotStuffer, SizeCounter
from mailfort.protocol.errors import ErrorCounter, Slowdown
from mailfort.protocol.lines import LineError, LineReader
from mailfort.protocol.sasl import (
    MAX_SASL_LINE,
    SaslError,
    decode_response,
    parse_plain,
)

MAX_LINE = 255  # octets including CRLF (RFC 2449 §4)
MAX_AUTH_FAILURES = 3  # the third failed login ends the session; shared counters do the rest
CRLF = b"\r\n"
# Octets of replies after which ``next_event`` parses no further pipelined command until
# the server takes them (``take_output``): answers the engine gives itself (LIST, UIDL,
# STAT...) cannot pile up beyond this from one read, however many commands it held.
OUTPUT_PAUSE = 64 * 1024

# ---------------------------------------------------------------------------- events


@dataclass(slots=True)
class CheckCredentials:
    """Needs ``credentials_accepted(user)`` or ``credentials_refused()``."""

    username: str
    password: str = field(repr=False)
    mechanism: str  # "USER" (USER/PASS) or "PLAIN"


@dataclass(slots=True)
class OpenMailbox:
    """Needs ``mailbox_opened(listing)`` or ``mailbox_unavailable(text)``."""

    user: str


@dataclass(slots=True)
class StartTLS:
    """Needs ``tls_started()`` (or ``close``) once the handshake is over."""


@dataclass(slots=True)
class Retrieve:
    """Needs ``retrieve_started(size)`` … ``retrieve_done()``, or ``retrieve_failed``.

    ``index`` is 0-based into the login listing; ``top_lines`` is None for RETR.
    """

    index: int
    uid: str
    top_lines: int | None


@dataclass(slots=True)
class Quit:
    """UPDATE state: remove these (0-based indexes, with uids), then ``update_done``."""

    deletions: tuple[tuple[int, str], ...]


Event = CheckCredentials | OpenMailbox | StartTLS | Retrieve | Quit


class State(enum.Enum):
    AUTHORIZATION = "authorization"
    TRANSACTION = "transaction"
    UPDATE = "update"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class EngineSettings:
    tls_available: bool = False  # STLS can be offered (a certificate is configured)
    allow_plaintext: bool = False  # USER/PASS/AUTH before TLS (loopback listener, by config)
    max_errors: int = 10
    error_slowdown: Slowdown | None = None  # replies held longer past a soft limit
    greeting: str = "POP3 ready"  # names no software or version
    # Failed logins that end a session; only the lab's legacy profile raises it.
    max_auth_failures: int = MAX_AUTH_FAILURES


# Replies (text after +OK / -ERR). Response codes per RFC 2449 §8 and RFC 3206.
NEED_TLS = "[AUTH] Plaintext authentication disallowed without TLS; use STLS"
AUTH_FAILED = "[AUTH] Authentication failed"
IN_USE = "[IN-USE] Mailbox is locked by another session"
SYS_TEMP = "[SYS/TEMP] Temporary system problem, try again later"
LINE_TOO_LONG = "Command line too long"
BARE_LINE_ENDING = "Bare CR or LF in command line not allowed"
NUL_IN_LINE = "NUL character in command line not allowed"
_LINE_ERRORS = {
    LineError.TOO_LONG: LINE_TOO_LONG,
    LineError.BARE_LINE_ENDING: BARE_LINE_ENDING,
    LineError.NUL: NUL_IN_LINE,
}
_SASL_ERRORS = {
    SaslError.CANCELLED: "[AUTH] Authentication cancelled",
    SaslError.BAD_BASE64: "Invalid base64 in SASL response",
    SaslError.MALFORMED: "Malformed PLAIN response",
    SaslError.NOT_AUTHORIZED: "[AUTH] Proxy authorization not supported",
}
TOO_MANY_ERRORS = "Too many errors, closing connection"
IDLE_TIMEOUT = "Idle timeout, closing connection"

_CAPA_COMMON = ("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING")


class _W(enum.Enum):
    """What the engine is waiting for, if anything."""

    NONE = 0
    CREDENTIALS = 1
    MAILBOX = 2
    TLS = 3
    RETRIEVE_START = 4
    RETRIEVE_DONE = 5
    UPDATE = 6
    SASL = 7  # a SASL continuation line from the client (not the server)


def _parse_number(arg: str) -> int | None:
    """A positive decimal without sign or spaces, bounded so int() stays cheap."""
    if not arg or len(arg) > 10 or not arg.isascii() or not arg.isdigit():
        return None
    return int(arg)


class POP3Engine:
    """One POP3 server session. See the module docstring for the contract."""

    def __init__(self, settings: EngineSettings, *, tls_active: bool = False) -> None:
        self.s = settings
        self.tls_active = tls_active
        self.state = State.AUTHORIZATION
        self.user: str | None = None  # canonical address once authenticated
        self._lines = LineReader()
        self._out: list[bytes] = []
        self._out_size = 0  # octets in _out: checked per pipelined RETR, so kept, not summed
        self._events: list[Event] = []
        self._wait = _W.NONE
        self._errors = ErrorCounter(settings.max_errors, settings.error_slowdown)
        self._auth_failures = 0
        self.internal_error: Exception | None = None  # a bug met while parsing, if any
        self._user_arg: str | None = None  # from USER, waiting for PASS
        self._uids: list[str] = []
        self._sizes: list[int] = []
        self._deleted: set[int] = set()

    # ------------------------------------------------------------------ public API

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def waiting(self) -> bool:
        """True while an event is waiting for the server's answer."""
        return self._wait not in (_W.NONE, _W.SASL)

    def greet(self) -> None:
        self._ok(self.s.greeting)

    def refuse_connection(self, text: str) -> None:
        self._close("-ERR " + text)

    def receive(self, data: bytes) -> None:
        """Buffer input. The plaintext pipelined behind STLS was dropped when STLS was
        parsed (RFC 2595 §4), and the server reads nothing more from the plaintext socket
        once StartTLS is emitted; so what arrives while the handshake is being noted came
        through TLS and is kept for after ``tls_started``."""
        if self.state is State.CLOSED:
            return
        self._lines.buffer += data  # LineReader.feed, without the call

    def next_event(self) -> Event | None:
        events = self._events
        if not events and not self._lines.buffer:
            return None  # nothing to parse: asked once more after every answered command
        try:
            # ``waiting`` and ``closed`` spelled out: this runs for every command
            while not events and (self._wait is _W.NONE or self._wait is _W.SASL) \
                    and self.state is not State.CLOSED \
                    and self._out_size < OUTPUT_PAUSE and self._step():
                pass
        except Exception as exc:  # a parser bug: a reply and a close, never a traceback
            self.internal_error = exc
            self._close("-ERR " + SYS_TEMP)
        return events.pop(0) if events else None

    def take_output(self) -> bytes:
        if not self._out:  # asked after every command, answered or not
            return b""
        out = b"".join(self._out)
        self._out.clear()
        self._out_size = 0
        return out

    def take_hold(self) -> float:
        """Seconds the server should wait before sending what ``take_output`` returned:
        more than zero only past the soft error limit (see ``errors``), never to close."""
        hold = self._errors.take_hold()
        return 0.0 if self.state is State.CLOSED else hold

    def timeout(self) -> None:
        """Autologout (RFC 1939 §3): no UPDATE state, nothing is deleted."""
        self._close("-ERR " + IDLE_TIMEOUT)

    def close(self, text: str) -> None:
        self._close("-ERR " + text)

    @property
    def message_count(self) -> int:
        return len(self._uids)

    # answers to events

    def credentials_accepted(self, user: str) -> None:
        if not self._expect(_W.CREDENTIALS):
            return
        self.user = user
        self._wait = _W.MAILBOX
        self._events.append(OpenMailbox(user))

    def credentials_refused(self) -> None:
        if not self._expect(_W.CREDENTIALS):
            return
        self._wait = _W.NONE
        self._auth_failures += 1
        self._err(AUTH_FAILED)
        if self._auth_failures >= self.s.max_auth_failures:
            self._close("-ERR " + TOO_MANY_ERRORS)

    def credentials_unverifiable(self, text: str = "") -> None:
        """The check could not be made now (e.g. ``SYS_TEMP``): not counted as a failure;
        the session stays in AUTHORIZATION and the client may try again later."""
        if not self._expect(_W.CREDENTIALS):
            return
        self._wait = _W.NONE
        self._err(text or SYS_TEMP)

    def mailbox_opened(self, listing: Sequence[tuple[str, int]]) -> None:
        if not self._expect(_W.MAILBOX):
            return
        self._wait = _W.NONE
        self._uids = [uid for uid, _ in listing]
        self._sizes = [size for _, size in listing]
        self.state = State.TRANSACTION
        n, total = self._stat()
        self._ok(f"Logged in, {n} messages ({total} octets)")

    def mailbox_unavailable(self, text: str) -> None:
        """After good credentials: e.g. ``IN_USE``; the session stays in AUTHORIZATION."""
        if not self._expect(_W.MAILBOX):
            return
        self._wait = _W.NONE
        self.user = None
        self._err(text)

    def tls_started(self) -> None:
        if not self._expect(_W.TLS):
            return
        self._wait = _W.NONE
        self.tls_active = True
        self._user_arg = None

    def retrieve_started(self, size: int) -> None:
        if not self._expect(_W.RETRIEVE_START):
            return
        self._wait = _W.RETRIEVE_DONE
        self._ok(f"{size} octets")

    def retrieve_whole(self, size: int, wire: bytes) -> None:
        """A message sent at once (``wire``: encoded, terminator included): its reply and
        octets join the output in order, so the server may send them with what the
        client pipelined after this command in one write (``take_output``)."""
        if not self._expect(_W.RETRIEVE_START):
            return
        self._wait = _W.NONE
        head = b"+OK %d octets\r\n" % size  # what ``_ok(f"{size} octets")`` writes
        self._out += (head, wire)
        self._out_size += len(head) + len(wire)

    @property
    def holding(self) -> bool:
        """Whether the output waiting must be held (a negative reply past the soft error
        limit): the server sends it only through ``take_hold``'s delay."""
        return self._errors.holding

    @property
    def output_size(self) -> int:
        """Octets ``take_output`` would return now."""
        return self._out_size

    @property
    def line_waiting(self) -> bool:
        """Whether a further command (a whole line) is already buffered: the client
        pipelined it."""
        return b"\n" in self._lines.buffer

    def retrieve_done(self) -> None:
        """The server has written the encoded message including its ``.`` terminator."""
        if not self._expect(_W.RETRIEVE_DONE):
            return
        self._wait = _W.NONE

    def retrieve_failed(self, text: str) -> None:
        if not self._expect(_W.RETRIEVE_START):
            return
        self._wait = _W.NONE
        self._err(text)

    def update_done(self, failures: int = 0) -> None:
        if not self._expect(_W.UPDATE):
            return
        self._wait = _W.NONE
        if failures:
            self._close(f"-ERR [SYS/TEMP] {failures} deleted messages not removed")
        else:
            self._close("+OK Bye")

    # ------------------------------------------------------------------ internals

    def _expect(self, wait: _W) -> bool:
        """False when the session closed meanwhile (timeout, shutdown): the answer is moot."""
        if self.state is State.CLOSED:
            return False
        if self._wait is not wait:
            raise RuntimeError(f"not waiting for {wait.name} (waiting for {self._wait.name})")
        return True

    def _emit(self, data: bytes) -> None:
        self._out.append(data)
        self._out_size += len(data)

    def _ok(self, text: str) -> None:
        self._emit(b"+OK " + text.encode() + CRLF)

    def _err(self, text: str) -> None:
        """A negative reply: counted (see ``errors``), and past the limit the session ends."""
        self._emit(b"-ERR " + text.encode() + CRLF)
        if self._errors.record():
            self._close("-ERR " + TOO_MANY_ERRORS)

    def _close(self, line: str) -> None:
        if self.closed:
            return
        self._emit(line.encode() + CRLF)
        self.state = State.CLOSED
        self._wait = _W.NONE
        self._lines.clear()
        self._events.clear()

    def _step(self) -> bool:
        """Handle one line if a whole one is buffered; False when more input is needed."""
        sasl = self._wait is _W.SASL
        line = self._lines.next_line(MAX_SASL_LINE if sasl else MAX_LINE)
        if line is None:
            return False
        if isinstance(line, LineError):
            self._wait = _W.NONE  # a bad line also ends a SASL exchange
            self._err(_LINE_ERRORS[line])
        elif sasl:
            self._sasl_response(line)
        else:
            self._command(line)
        return True

    def _command(self, line: bytes) -> None:
        try:  # UTF-8 so that PASS can carry any password (RFC 1939 says nothing of charset)
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._err("Command must be UTF-8")
            return
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        state = self.state  # compared, not hashed: an Enum's hash is a Python call
        table = _TRANS_CMDS if state is State.TRANSACTION else \
            _AUTH_CMDS if state is State.AUTHORIZATION else None
        handler = table.get(verb) if table is not None else None
        if handler is None:
            if verb in _KNOWN:
                self._err(f"{verb} not allowed now")
            else:
                self._err("Unknown command")
            return
        handler(self, arg)

    def _credentials_allowed(self) -> bool:
        return self.tls_active or self.s.allow_plaintext

    def _stat(self) -> tuple[int, int]:
        live = [i for i in range(len(self._uids)) if i not in self._deleted]
        return len(live), sum(self._sizes[i] for i in live)

    def _message(self, arg: str) -> int | None:
        """The 0-based index of a live message, or None after an -ERR."""
        n = _parse_number(arg)
        if n is None:
            self._err("Invalid message number")
            return None
        if not 1 <= n <= len(self._uids):
            self._err("No such message")
            return None
        if n - 1 in self._deleted:
            self._err("Message already deleted")
            return None
        return n - 1

    # AUTHORIZATION --------------------------------------------------------

    def _cmd_capa(self, arg: str) -> None:
        caps = list(_CAPA_COMMON)
        if self.state is State.AUTHORIZATION:
            if self._credentials_allowed():
                caps += ["USER", "SASL PLAIN"]
            if self.s.tls_available and not self.tls_active:
                caps.append("STLS")
        self._multiline("Capability list follows", caps)

    def _cmd_stls(self, arg: str) -> None:
        if arg:
            self._err("STLS takes no argument")
        elif self.tls_active:
            self._err("TLS already active")
        elif not self.s.tls_available:
            self._err("STLS not available")
        else:
            self._ok("Begin TLS negotiation")
            self._lines.clear()  # pipelined plaintext after STLS is discarded
            self._wait = _W.TLS
            self._events.append(StartTLS())

    def _cmd_user(self, arg: str) -> None:
        if not self._credentials_allowed():
            self._err(NEED_TLS)
            return
        if not arg:
            self._err("USER needs a name")
            return
        self._user_arg = arg
        self._ok("Send PASS")  # the same whether the user exists or not

    def _cmd_pass(self, arg: str) -> None:
        if not self._credentials_allowed():
            self._err(NEED_TLS)
            return
        if self._user_arg is None:
            self._err("USER first")
            return
        user, self._user_arg = self._user_arg, None
        self._check(user, arg, "USER")

    def _cmd_apop(self, arg: str) -> None:
        if not self._credentials_allowed():
            self._err(NEED_TLS)
        else:
            self._err("[AUTH] APOP not supported; use USER/PASS or AUTH PLAIN over TLS")

    def _cmd_auth(self, arg: str) -> None:
        if not self._credentials_allowed():
            self._err(NEED_TLS)
            return
        mech, _, initial = arg.partition(" ")
        if not mech:  # pre-RFC 5034 clients ask for the list this way
            self._multiline("Mechanisms follow", ["PLAIN"])
            return
        if mech.upper() != "PLAIN":
            self._err("Unsupported authentication mechanism")
            return
        self._user_arg = None
        if not initial:
            self._wait = _W.SASL
            self._emit(b"+ " + CRLF)
        else:  # the initial response may be any UTF-8 the client typed: sasl judges it
            self._sasl_response(initial.encode("utf-8"))

    def _sasl_response(self, line: bytes) -> None:
        """One PLAIN response (RFC 4616), by the rules of ``sasl``."""
        self._wait = _W.NONE
        decoded = decode_response(line)
        creds = decoded if isinstance(decoded, SaslError) else parse_plain(decoded)
        if isinstance(creds, SaslError):
            self._err(_SASL_ERRORS[creds])
        else:
            self._check(creds.authcid, creds.password, "PLAIN")

    def _check(self, user: str, password: str, mechanism: str) -> None:
        self._wait = _W.CREDENTIALS
        self._events.append(CheckCredentials(user, password, mechanism))

    def _cmd_quit(self, arg: str) -> None:
        if self.state is State.TRANSACTION:
            self.state = State.UPDATE
            self._wait = _W.UPDATE
            self._events.append(Quit(tuple((i, self._uids[i]) for i in sorted(self._deleted))))
        else:
            self._close("+OK Bye")

    # TRANSACTION ----------------------------------------------------------

    def _cmd_stat(self, arg: str) -> None:
        if arg:
            self._err("STAT takes no argument")
            return
        n, total = self._stat()
        self._ok(f"{n} {total}")

    def _cmd_list(self, arg: str) -> None:
        self._listing(arg, self._sizes, "octets")

    def _cmd_uidl(self, arg: str) -> None:
        self._listing(arg, self._uids, "")

    def _listing(self, arg: str, values: Sequence[object], what: str) -> None:
        if arg:
            i = self._message(arg)
            if i is not None:
                self._ok(f"{i + 1} {values[i]}")
            return
        n, total = self._stat()
        head = f"{n} messages ({total} octets)" if what else "Unique-ID listing follows"
        rows = [f"{i + 1} {v}" for i, v in enumerate(values) if i not in self._deleted]
        self._multiline(head, rows)

    def _cmd_retr(self, arg: str) -> None:
        i = self._message(arg)
        if i is not None:
            self._retrieve(i, None)

    def _cmd_top(self, arg: str) -> None:
        msg, _, lines = arg.partition(" ")
        n = _parse_number(lines)
        if n is None:
            self._err("Usage: TOP message lines")
            return
        i = self._message(msg)
        if i is not None:
            self._retrieve(i, n)

    def _retrieve(self, index: int, top: int | None) -> None:
        self._wait = _W.RETRIEVE_START
        self._events.append(Retrieve(index, self._uids[index], top))

    def _cmd_dele(self, arg: str) -> None:
        i = self._message(arg)
        if i is not None:
            self._deleted.add(i)
            self._ok(f"Message {i + 1} deleted")

    def _cmd_rset(self, arg: str) -> None:
        self._deleted.clear()
        n, total = self._stat()
        self._ok(f"{n} messages ({total} octets)")

    def _cmd_noop(self, arg: str) -> None:
        self._ok("")

    def _multiline(self, head: str, rows: Sequence[str]) -> None:
        body = "".join(f"{r}\r\n" for r in rows)
        self._emit(f"+OK {head}\r\n{body}.\r\n".encode())


_AUTH_CMDS = {
    "CAPA": POP3Engine._cmd_capa,
    "STLS": POP3Engine._cmd_stls,
    "USER": POP3Engine._cmd_user,
    "PASS": POP3Engine._cmd_pass,
    "APOP": POP3Engine._cmd_apop,
    "AUTH": POP3Engine._cmd_auth,
    "QUIT": POP3Engine._cmd_quit,
}
_TRANS_CMDS = {
    "CAPA": POP3Engine._cmd_capa,
    "STAT": POP3Engine._cmd_stat,
    "LIST": POP3Engine._cmd_list,
    "UIDL": POP3Engine._cmd_uidl,
    "RETR": POP3Engine._cmd_retr,
    "TOP": POP3Engine._cmd_top,
    "DELE": POP3Engine._cmd_dele,
    "RSET": POP3Engine._cmd_rset,
    "NOOP": POP3Engine._cmd_noop,
    "QUIT": POP3Engine._cmd_quit,
}
_KNOWN = frozenset(_AUTH_CMDS) | frozenset(_TRANS_CMDS)


# ---------------------------------------------------------------------------- encoding


class MessageEncoder(DotStuffer):
    """Turns a stored message, fed in chunks, into its RETR/TOP form on the wire.

    The line-end and dot-stuffing rule is ``protocol/dotstuff.py``'s, the same as SMTP
    DATA's. With ``top_lines`` it stops after the header section and that many body lines,
    and ``done`` tells the reader it may stop reading. Output before stuffing is exactly
    ``wire_size`` of the same input, so LIST matches RETR.
    """

    __slots__ = ("_in_headers", "_left", "done")

    def __init__(self, top_lines: int | None = None) -> None:
        super().__init__()
        self._in_headers = top_lines is not None
        self._left = top_lines
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return b""
        out = self.crlf(data)
        if self._left is not None:
            out = self._cut(out)
        return self.stuff(out)

    def finish(self) -> bytes:
        if self.done:
            return TERMINATOR
        self.done = True
        return self.end()

    def _cut(self, out: bytes) -> bytes:
        """Keep the header section and ``_left`` body lines of normalised output."""
        start = 0
        if self._in_headers:
            if self._bol and out.startswith(CRLF):
                start = 2
            else:
                idx = out.find(b"\r\n\r\n")
                if idx < 0:
                    return out
                start = idx + 4
            self._in_headers = False
        left = self._left
        assert left is not None
        pos = start
        while left > 0:
            idx = out.find(CRLF, pos)
            if idx < 0:
                break
            pos = idx + 2
            left -= 1
        self._left = left
        if left == 0:
            self.done = True
            self.drop_pending()
            return out[:pos]
        return out


def wire_size(chunks: Iterable[bytes]) -> int:
    """Octets of a message on the wire before byte-stuffing (RFC 1939 sizes), by counting
    (``dotstuff.SizeCounter``: what ``MessageEncoder`` sends before stuffing)."""
    counter = SizeCounter()
    for chunk in chunks:
        counter.feed(chunk)
    return counter.size()
