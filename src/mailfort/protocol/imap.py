"""The IMAP server protocol as a sans-I/O state machine (RFC 9051, RFC 3501 for older clients).

The shape is the POP3 engine's: bytes go in with ``receive``, events come out of
``next_event``, reply bytes accumulate for ``take_output``. Commands are split and parsed by
``imap_parse.CommandReader`` (literals bounded before a byte is held); this module decides
what a parsed command means in the session's state and answers what it can alone:
CAPABILITY, NOOP and LOGOUT before login, STARTTLS, LOGIN and AUTHENTICATE PLAIN (with
SASL-IR), ID, IDLE, every syntax and state error. The server answers each event:

* ``CheckCredentials`` → ``credentials_accepted(user)``, ``credentials_refused()`` (one
  reply whatever the reason, so nothing about accounts shows) or
  ``credentials_unverifiable(text)`` (not now: ``[UNAVAILABLE]``, ``[LIMIT]``; not counted
  as a failed login).
* ``StartTLS`` → ``tls_started()``. The reader is cleared when STARTTLS is parsed, so
  whatever the client pipelined behind it in plaintext is never executed (RFC 9051 §6.2.1;
  the CVE-2011-0411 class of injection).
* ``Execute(command)``: a command of the mailbox side (SELECT, FETCH, NOOP, CHECK, …),
  valid in the current state (a SELECTED-only command in AUTHENTICATED state never
  becomes an event). The server writes the untagged responses with ``write_untagged``,
  then answers ``executed(status, code, text, selected)``: the engine writes the tagged
  line and moves between AUTHENTICATED and SELECTED as ``selected`` says.
* ``Idle(tag)``: ``+ idling`` has been written and the engine waits for ``DONE``; the
  server may write updates meanwhile (``write_untagged``). ``IdleEnded`` tells it the
  client said DONE (the tagged reply is written); it needs no answer.

Credentials are refused before TLS (``LOGINDISABLED``, ``NO [PRIVACYREQUIRED]``) unless
``allow_plaintext`` (the loopback exception, as POP3's). The reader runs with tighter
``Limits`` before login (small literals, no APPEND) than after. Errors count as in the
other engines (``errors``): every BAD, and every NO the engine decides about logins; past
the limit the session ends with ``* BYE``. Mailbox answers (``NO [NONEXISTENT]`` …) are not
counted: a long-lived IMAP session meets them in normal use. An exception inside the engine
is a bug: it ends the session with ``* BYE [SERVERBUG]`` and is kept in ``internal_error``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from mailfort.protocol.errors import ErrorCounter, Slowdown
from mailfort.protocol.imap_parse import (
    Command,
    CommandReader,
    ContinuationRequest,
    IdleDone,
    Limits,
    ParseError,
    SaslResponse,
    Secret,
)
from mailfort.protocol.sasl import SaslError, decode_response, parse_plain

CRLF = b"\r\n"
# Octets of responses after which ``next_event`` parses no further pipelined command until
# the server takes them (``take_output``): what the engine answers itself (CAPABILITY, ID,
# commands refused in this state...) cannot pile up beyond this from one read. The same as
# the session's pass (server/session.py ``PUMP_FLUSH_AT``), which goes on at once after a
# pass this full.
OUTPUT_PAUSE = 64 * 1024
MAX_AUTH_FAILURES = 3  # the third failed login ends the session; shared counters do the rest
APPEND_LIMIT = 50 * 1024 * 1024

SESSION_LIMITS = Limits()  # after login (max_append: the settings' append_limit)
# Before login a client may send only small things: a user name and a password.
LOGIN_LIMITS = Limits(max_line=4096, max_literal=1024, max_append=0, max_discard=64 * 1024)

# After login (RFC 9051 and the extensions the mailbox side implements, see
# server/imap_commands.py); APPENDLIMIT=N is added from the settings. LITERAL+ (RFC 7888):
# the reader holds a non-synchronising literal to the limits of a synchronising one and
# skips a refused one without buffering it (an APPEND {N+} over APPENDLIMIT: NO [TOOBIG],
# its octets counted away, up to the limits' max_discard, past which BYE).
SESSION_CAPABILITIES = (
    "IMAP4rev1", "IMAP4rev2", "ENABLE", "IDLE", "UIDPLUS", "MOVE", "SPECIAL-USE",
    "CREATE-SPECIAL-USE", "NAMESPACE", "UNSELECT", "LITERAL+", "SASL-IR", "ID", "ESEARCH",
    "SEARCHRES", "LIST-EXTENDED", "LIST-STATUS", "CONDSTORE", "QRESYNC", "QUOTA",
    "QUOTA=RES-STORAGE", "QUOTA=RES-MESSAGE", "STATUS=SIZE", "BINARY", "CHILDREN",
)
_LOGIN_TAIL = ("LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE")

# Texts (after the status and code).
AUTH_FAILED = "[AUTHENTICATIONFAILED] Authentication failed"
PRIVACY_REQUIRED = "[PRIVACYREQUIRED] Use STARTTLS before logging in"
UNAVAILABLE = "[UNAVAILABLE] Temporary failure, try again later"
TOO_MANY_ERRORS = "Too many errors, closing connection"
TOO_MANY_FAILURES = "Too many authentication failures, closing connection"
IDLE_TIMEOUT = "Autologout; idle for too long"
INTERNAL_ERROR = "[SERVERBUG] Internal error, closing connection"
_SASL_ERRORS = {
    SaslError.CANCELLED: ("BAD", "Authentication cancelled"),
    SaslError.BAD_BASE64: ("BAD", "Invalid base64 in SASL response"),
    SaslError.MALFORMED: ("BAD", "Malformed PLAIN response"),
    SaslError.NOT_AUTHORIZED: ("NO", "[AUTHORIZATIONFAILED] Proxy authorization not supported"),
}

# Commands by the states they are valid in (RFC 9051 §6).
ANY_STATE = frozenset({"CAPABILITY", "NOOP", "LOGOUT", "ID"})
NOT_AUTHENTICATED_ONLY = frozenset({"STARTTLS", "LOGIN", "AUTHENTICATE"})
SELECTED_ONLY = frozenset({"CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE",
                           "COPY", "MOVE"})

# ---------------------------------------------------------------------------- events


@dataclass(slots=True)
class CheckCredentials:
    """Needs ``credentials_accepted(user)``, ``credentials_refused()`` or
    ``credentials_unverifiable(text)``."""

    username: str
    password: str = field(repr=False)
    mechanism: str  # "LOGIN" or "PLAIN"


@dataclass(slots=True)
class StartTLS:
    """Needs ``tls_started()`` (or ``close``) once the handshake is over."""


@dataclass(slots=True)
class Execute:
    """Needs ``write_untagged`` (any number of times) then ``executed(...)``."""

    command: Command


@dataclass(slots=True)
class Idle:
    """``+ idling`` was sent; updates may be written until ``IdleEnded``. No answer."""

    tag: str


@dataclass(slots=True)
class IdleEnded:
    """The client ended IDLE (the tagged reply is written). No answer."""


Event = CheckCredentials | StartTLS | Execute | Idle | IdleEnded


class State(enum.Enum):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


@dataclass(frozen=True, slots=True)
class EngineSettings:
    tls_available: bool = False  # STARTTLS can be offered (a certificate is configured)
    allow_plaintext: bool = False  # LOGIN/AUTHENTICATE before TLS (loopback, by config)
    max_errors: int = 10
    error_slowdown: Slowdown | None = None
    greeting: str = "IMAP ready"  # names no software or version
    max_auth_failures: int = MAX_AUTH_FAILURES
    append_limit: int = APPEND_LIMIT  # APPENDLIMIT, and the reader's max_append
    limits: Limits = SESSION_LIMITS
    login_limits: Limits = LOGIN_LIMITS
    capabilities: tuple[str, ...] = SESSION_CAPABILITIES  # after login, without APPENDLIMIT


class _W(enum.Enum):
    NONE = 0
    CREDENTIALS = 1
    TLS = 2
    EXECUTE = 3
    SASL = 4  # the client's AUTHENTICATE response line (not the server)
    IDLE = 5  # the client's DONE (not the server)


def _clean(text: str) -> bytes:
    """Text of a response line: one line, printable ASCII (never a CR or LF smuggled in)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text).encode("ascii")


def _no_password_literals(limits: Limits) -> Limits:
    """``limits`` with LOGIN's literals refused at the ``{N}``: a client that ignores
    LOGINDISABLED and sends its password as a literal is refused before the ``+``, so the
    password never crosses the wire in the clear."""
    return replace(limits, refused_literals=frozenset({"LOGIN"}))


class IMAPEngine:
    """One IMAP server session. See the module docstring for the contract."""

    def __init__(self, settings: EngineSettings, *, tls_active: bool = False) -> None:
        self.s = settings
        self.tls_active = tls_active
        self.state = State.NOT_AUTHENTICATED
        self.user: str | None = None  # canonical address once authenticated
        self.reader = CommandReader(settings.login_limits if self._credentials_allowed()
                                    else _no_password_literals(settings.login_limits))
        self._out: list[bytes] = []
        self._out_size = 0  # octets in _out, kept (summing the list per step is quadratic)
        self._events: list[Event] = []
        self._wait = _W.NONE
        self._tag = ""  # of the command being answered (event, SASL exchange, IDLE)
        self._errors = ErrorCounter(settings.max_errors, settings.error_slowdown)
        self._auth_failures = 0
        self.internal_error: Exception | None = None

    # ------------------------------------------------------------------ public API

    @property
    def closed(self) -> bool:
        return self.state is State.LOGOUT

    @property
    def waiting(self) -> bool:
        """True while an event is waiting for the server's answer."""
        return self._wait in (_W.CREDENTIALS, _W.TLS, _W.EXECUTE)

    @property
    def idling(self) -> bool:
        return self._wait is _W.IDLE

    def capabilities(self) -> list[str]:
        """What CAPABILITY says now (it changes with TLS and login)."""
        if self.state is not State.NOT_AUTHENTICATED:
            return [*self.s.capabilities, f"APPENDLIMIT={self.s.append_limit}"]
        caps = ["IMAP4rev1", "IMAP4rev2"]
        if self.s.tls_available and not self.tls_active:
            caps.append("STARTTLS")
        caps.append("AUTH=PLAIN" if self._credentials_allowed() else "LOGINDISABLED")
        return caps + list(_LOGIN_TAIL)

    def greet(self) -> None:
        self._untagged("OK [CAPABILITY " + " ".join(self.capabilities()) + "] " + self.s.greeting)

    def refuse_connection(self, text: str) -> None:
        self._close(text)

    def receive(self, data: bytes) -> None:
        if not self.closed:
            self.reader.feed(data)

    def next_event(self) -> Event | None:
        try:
            while not self._events and not self.waiting and not self.closed \
                    and self._out_size < OUTPUT_PAUSE and self._step():
                pass
        except Exception as exc:  # a bug: a BYE and a close, never a traceback to the client
            self.internal_error = exc
            self._close(INTERNAL_ERROR)
        return self._events.pop(0) if self._events else None

    def take_output(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        self._out_size = 0
        return out

    @property
    def output_size(self) -> int:
        """Octets ``take_output`` would return now."""
        return self._out_size

    def take_hold(self) -> float:
        """Seconds the server should hold what ``take_output`` returned (past the soft
        error limit, see ``errors``); never to close."""
        hold = self._errors.take_hold()
        return 0.0 if self.closed else hold

    def timeout(self) -> None:
        self._close(IDLE_TIMEOUT)

    def close(self, text: str) -> None:
        """A close the server decides (shutdown, stress, a failed handshake): ``* BYE``."""
        self._close(text)

    @property
    def held(self) -> int:
        """Octets of client input held (the reader's buffer and command)."""
        return self.reader.held

    # answers to events

    def credentials_accepted(self, user: str) -> None:
        if not self._expect(_W.CREDENTIALS):
            return
        self._wait = _W.NONE
        self.user = user
        self.state = State.AUTHENTICATED
        self.reader.limits = replace(self.s.limits, max_append=self.s.append_limit)
        caps = " ".join(self.capabilities())
        self._tagged(self._tag, "OK", f"[CAPABILITY {caps}] Logged in", count=False)

    def credentials_refused(self) -> None:
        if not self._expect(_W.CREDENTIALS):
            return
        self._wait = _W.NONE
        self._auth_failures += 1
        self._tagged(self._tag, "NO", AUTH_FAILED)
        if self._auth_failures >= self.s.max_auth_failures:
            self._close(TOO_MANY_FAILURES)

    def credentials_unverifiable(self, text: str = UNAVAILABLE) -> None:
        """Not now (the shared counters are down, too many sessions of this user): not a
        failed login; the session stays NOT_AUTHENTICATED."""
        if not self._expect(_W.CREDENTIALS):
            return
        self._wait = _W.NONE
        self._tagged(self._tag, "NO", text)

    def tls_started(self) -> None:
        if not self._expect(_W.TLS):
            return
        self._wait = _W.NONE
        self.tls_active = True
        self.reader.limits = self.s.login_limits

    def write_untagged(self, data: bytes) -> None:
        """Complete untagged responses (each ending CRLF) from the mailbox side: while an
        ``Execute`` waits, or during IDLE. Dropped once the session is closed."""
        if not self.closed and data:
            self._emit(data)

    def executed(self, status: str, code: str | None, text: str,
                 selected: bool | None = None) -> None:
        """The tagged reply of an ``Execute``; ``selected``: the new state, if it changed."""
        if not self._expect(_W.EXECUTE):
            return
        self._wait = _W.NONE
        if selected is True:
            self.state = State.SELECTED
        elif selected is False:
            self.state = State.AUTHENTICATED
        if status not in ("OK", "NO", "BAD"):
            raise ValueError(f"bad status {status!r}")
        full = f"[{code}] {text}" if code else text
        self._tagged(self._tag, status, full, count=status == "BAD")

    # ------------------------------------------------------------------ output

    def _emit(self, data: bytes) -> None:
        self._out.append(data)
        self._out_size += len(data)

    def _untagged(self, text: str) -> None:
        self._emit(b"* " + _clean(text) + CRLF)

    def _tagged(self, tag: str, status: str, text: str, *, count: bool = True) -> None:
        """A tagged reply; a BAD or NO (unless ``count`` is off) counts as an error."""
        self._emit((tag or "*").encode("ascii") + b" " + status.encode() + b" "
                   + _clean(text) + CRLF)
        if status != "OK" and count and self._errors.record():
            self._close(TOO_MANY_ERRORS)

    def _close(self, text: str) -> None:
        if self.closed:
            return
        self._untagged("BYE " + text)
        self.state = State.LOGOUT
        self._wait = _W.NONE
        self._events.clear()
        self.reader.clear()

    def _expect(self, wait: _W) -> bool:
        """False when the session closed meanwhile (timeout, shutdown): the answer is moot."""
        if self.closed:
            return False
        if self._wait is not wait:
            raise RuntimeError(f"not waiting for {wait.name} (waiting for {self._wait.name})")
        return True

    # ------------------------------------------------------------------ input

    def _step(self) -> bool:
        ev = self.reader.next_event()
        if ev is None:
            return False
        if isinstance(ev, ContinuationRequest):
            self._emit(b"+ Ready for literal data" + CRLF)
        elif isinstance(ev, ParseError):
            self._parse_error(ev)
        elif isinstance(ev, IdleDone):
            self._idle_done(ev.valid)
        elif isinstance(ev, SaslResponse):
            self._sasl_line(ev.line)
        else:
            self._command(ev)
        return True

    def _parse_error(self, ev: ParseError) -> None:
        text = f"[{ev.code}] {ev.text}" if ev.code else ev.text
        self._tagged(ev.tag or "*", ev.status, text)
        if ev.fatal:
            self._close("Protocol error, closing connection")

    def _credentials_allowed(self) -> bool:
        return self.tls_active or self.s.allow_plaintext

    def _command(self, cmd: Command) -> None:
        name = cmd.name
        if name in ANY_STATE and not (name == "NOOP" and self.state is not
                                      State.NOT_AUTHENTICATED):
            getattr(self, "_cmd_" + name.lower())(cmd)
            return
        if name in NOT_AUTHENTICATED_ONLY:
            if self.state is not State.NOT_AUTHENTICATED:
                self._tagged(cmd.tag, "BAD", f"{name} not allowed now: already logged in")
                return
            getattr(self, "_cmd_" + name.lower())(cmd)
            return
        if self.state is State.NOT_AUTHENTICATED:
            self._tagged(cmd.tag, "BAD", f"{name} not allowed now: log in first")
            return
        if name in SELECTED_ONLY and self.state is not State.SELECTED:
            self._tagged(cmd.tag, "BAD", f"{name} not allowed now: no mailbox selected")
            return
        if name == "IDLE":
            self._cmd_idle(cmd)
            return
        self._tag = cmd.tag
        self._wait = _W.EXECUTE
        self._events.append(Execute(cmd))

    # any state --------------------------------------------------------------

    def _cmd_capability(self, cmd: Command) -> None:
        self._untagged("CAPABILITY " + " ".join(self.capabilities()))
        self._tagged(cmd.tag, "OK", "CAPABILITY completed")

    def _cmd_noop(self, cmd: Command) -> None:  # before login; after, the server's
        self._tagged(cmd.tag, "OK", "NOOP completed")

    def _cmd_logout(self, cmd: Command) -> None:
        self._untagged("BYE Logging out")
        self._tagged(cmd.tag, "OK", "LOGOUT completed")
        self.state = State.LOGOUT
        self._wait = _W.NONE
        self.reader.clear()

    def _cmd_id(self, cmd: Command) -> None:
        self._untagged("ID NIL")  # RFC 2971 allows it; no software or version disclosed
        self._tagged(cmd.tag, "OK", "ID completed")

    # not authenticated ---------------------------------------------------------

    def _cmd_starttls(self, cmd: Command) -> None:
        if self.tls_active:
            self._tagged(cmd.tag, "BAD", "TLS already active")
        elif not self.s.tls_available:
            self._tagged(cmd.tag, "BAD", "STARTTLS not available")
        else:
            self._tagged(cmd.tag, "OK", "Begin TLS negotiation now")
            self.reader.clear()  # what was pipelined behind STARTTLS is never executed
            self._wait = _W.TLS
            self._events.append(StartTLS())

    def _cmd_login(self, cmd: Command) -> None:
        if not self._credentials_allowed():
            self._tagged(cmd.tag, "NO", PRIVACY_REQUIRED)
            return
        user_raw, secret = cmd.args
        assert isinstance(user_raw, bytes) and isinstance(secret, Secret)
        try:
            user, password = user_raw.decode("utf-8"), secret.value.decode("utf-8")
        except UnicodeDecodeError:
            self._tagged(cmd.tag, "NO", AUTH_FAILED)  # no account has such a name
            return
        self._check(cmd.tag, user, password, "LOGIN")

    def _cmd_authenticate(self, cmd: Command) -> None:
        mech, initial = cmd.args
        if not self._credentials_allowed():
            self._tagged(cmd.tag, "NO", PRIVACY_REQUIRED)
            return
        if mech != "PLAIN":
            self._tagged(cmd.tag, "NO", "Unsupported authentication mechanism")
            return
        if initial is None:
            self._tag = cmd.tag
            self._wait = _W.SASL
            self.reader.expect_sasl_response()
            self._emit(b"+ " + CRLF)
            return
        assert isinstance(initial, Secret)
        self._tag = cmd.tag
        self._sasl_line(initial.value)

    def _sasl_line(self, line: bytes | None) -> None:
        """One PLAIN response (RFC 4616) by the rules of ``sasl``; None: the line was bad."""
        self._wait = _W.NONE
        tag = self._tag
        if line is None:
            self._tagged(tag, "BAD", "SASL response line refused")
            return
        decoded = decode_response(line)
        creds = decoded if isinstance(decoded, SaslError) else parse_plain(decoded)
        if isinstance(creds, SaslError):
            status, text = _SASL_ERRORS[creds]
            self._tagged(tag, status, text)
        else:
            self._check(tag, creds.authcid, creds.password, "PLAIN")

    def _check(self, tag: str, user: str, password: str, mechanism: str) -> None:
        self._tag = tag
        self._wait = _W.CREDENTIALS
        self._events.append(CheckCredentials(user, password, mechanism))

    # authenticated -------------------------------------------------------------

    def _cmd_idle(self, cmd: Command) -> None:
        self._tag = cmd.tag
        self._wait = _W.IDLE
        self.reader.expect_done()
        self._emit(b"+ idling" + CRLF)
        self._events.append(Idle(cmd.tag))

    def _idle_done(self, valid: bool) -> None:
        self._wait = _W.NONE
        if valid:
            self._tagged(self._tag, "OK", "IDLE terminated")
        else:
            self._tagged(self._tag, "BAD", "Expected DONE")
        self._events.append(IdleEnded())
