"""The SMTP server protocol as a sans-I/O state machine (RFC 5321 and extensions).

Bytes go in with ``receive``; events come out of ``next_event``; replies accumulate in an
output buffer the server drains with ``take_output``. The engine owns every rule that can be
decided from the bytes alone (syntax, sequence, limits, smuggling, STARTTLS injection); the
server owns everything that needs the outside world and answers through ``decide``:

* ``MailFrom``, ``RcptTo``, ``DataStart``, ``MessageComplete`` and ``AuthCredentials`` wait
  for ``decide(reply)``; until then the engine parses nothing more, so pipelined commands
  are answered strictly in order (RFC 2920).
* ``StartTLS`` waits for ``tls_started()``; whatever the client sent after the STARTTLS line
  is thrown away (CVE-2011-0411 class) and the session starts over.
* ``DataChunk`` carries message bytes exactly as they will be stored (dot-unstuffed).
* ``MessageAborted`` tells the server to drop the spooled body; ``Closing`` to hang up once
  the output is written.

No sockets, clocks or disk: the same engine runs MX, submission, the lab and the fuzzers.
Command lines, the error limit and SASL follow the rules shared with the POP3 engine
(``lines``, ``errors``, ``sasl``). Every byte sequence gets a reply: an exception inside
the engine is a bug, and even then it closes the session with 421 and is kept in
``internal_error`` rather than escaping to the server.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Protocol

from mailfort.protocol.address import AddressError, Mailbox, parse_mail_argument
from mailfort.protocol.body import DATA_LINE_TOO_LONG, BodyChecker
from mailfort.protocol.errors import ErrorCounter, Slowdown
from mailfort.protocol.lines import LineError, LineReader
from mailfort.protocol.replies import (
    BAD_SEQUENCE,
    IDLE_TIMEOUT,
    LINE_TOO_LONG,
    OK,
    SYNTAX_ERROR,
    TOO_MANY_ERRORS,
    Reply,
)
from mailfort.protocol.sasl import (
    MAX_SASL_LINE,
    SaslError,
    decode_response,
    decode_text,
    parse_plain,
)

# ---------------------------------------------------------------------------- events


@dataclass(slots=True)
class Helo:
    name: str
    esmtp: bool


@dataclass(slots=True)
class MailFrom:
    """Needs decide(). ``sender`` is None for the null reverse-path ``<>``. ``requiretls``:
    the client asked for REQUIRETLS (RFC 8689), granted only over TLS."""

    sender: Mailbox | None
    params: dict[str, str | None]
    size: int | None
    requiretls: bool = False


@dataclass(slots=True)
class RcptTo:
    """Needs decide()."""

    recipient: Mailbox
    params: dict[str, str | None]


@dataclass(slots=True)
class DataStart:
    """Needs decide(): a positive reply means the server is ready to spool the body."""

    bdat: bool


@dataclass(slots=True)
class DataChunk:
    data: bytes


@dataclass(slots=True)
class MessageComplete:
    """Needs decide(): 250 only once the message is durable."""

    size: int


@dataclass(slots=True)
class MessageAborted:
    reply: Reply


@dataclass(slots=True)
class ResetTransaction:
    pass


@dataclass(slots=True)
class StartTLS:
    pass


@dataclass(slots=True)
class AuthCredentials:
    """Needs decide(): 235 on success, 535 on failure, 421 to hang up."""

    mechanism: str
    username: str
    password: str = field(repr=False)


@dataclass(slots=True)
class Closing:
    pass


Event = (
    Helo | MailFrom | RcptTo | DataStart | DataChunk | MessageComplete | MessageAborted
    | ResetTransaction | StartTLS | AuthCredentials | Closing
)


# ---------------------------------------------------------------------------- settings


class AccountLookup(Protocol):
    """What VRFY and EXPN answer when they disclose accounts: the lab's legacy profile
    only (set in Python, server/profile.py). Hardened mailfort has none: VRFY is 252 and
    EXPN 502 for every argument, so nothing tells users apart."""

    def vrfy(self, arg: str) -> Reply: ...

    def expn(self, arg: str) -> Reply: ...


@dataclass(frozen=True, slots=True)
class EngineSettings:
    hostname: str
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_errors: int = 10
    error_slowdown: Slowdown | None = None  # replies held longer past a soft limit
    max_received_headers: int = 50
    max_command_line: int = 512
    max_data_line: int = 1000
    tls_available: bool = False
    auth_mechanisms: tuple[str, ...] = ()  # empty: AUTH is not offered at all
    auth_requires_tls: bool = True
    auth_required: bool = False  # submission: MAIL before AUTH gets 530
    requiretls: bool = True  # RFC 8689: offered (after TLS only) and the MAIL parameter taken
    # The lab's legacy profile only (server/profile.py; no config key reaches these):
    # VRFY/EXPN answered from the directory, and bare LF taken as a line end in DATA
    # (so "<LF>.<LF>" ends it: the SMTP smuggling hole). Defaults are the hardened rules.
    legacy_accounts: AccountLookup | None = None
    legacy_bare_lf: bool = False


class _S(enum.Enum):
    COMMAND = "command"
    WAIT = "wait"  # a decision or TLS handshake is pending
    DATA = "data"
    BDAT = "bdat"
    AUTH = "auth"  # reading a SASL continuation line
    CLOSED = "closed"


_CRLF = b"\r\n"
# Octets of replies after which ``next_event`` parses no further pipelined command until
# the server takes them (``take_output``): what the engine answers itself (NOOP, VRFY,
# HELP, RSET...) cannot pile up beyond this from one read, however many commands it held.
# The same as the session's pass (server/session.py ``PUMP_FLUSH_AT``), which goes on at
# once after a pass this full.
OUTPUT_PAUSE = 64 * 1024

GREETING_TEXT = "ESMTP ready"
HELP = Reply(214, "2.0.0", "See RFC 5321")
VRFY_REPLY = Reply(252, "2.5.2", "Cannot VRFY user; try RCPT to attempt delivery")
EXPN_REPLY = Reply(502, "5.5.1", "EXPN not available")
NO_VALID_RCPT = Reply(554, "5.5.1", "No valid recipients")
NEED_HELO = Reply(503, "5.5.1", "Send EHLO/HELO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
TOO_MANY_RCPT = Reply(452, "4.5.3", "Too many recipients")
SIZE_EXCEEDED = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BARE_LF_COMMAND = Reply(500, "5.5.2", "Bare CR or LF in command line not allowed")
NUL_COMMAND = Reply(500, "5.5.2", "NUL character in command line not allowed")
NO_PARAMS = Reply(501, "5.5.4", "No parameters allowed")
UNSUPPORTED_PARAM = Reply(555, "5.5.4", "Unsupported parameter")
NEED_UTF8 = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
TLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
TLS_ACTIVE = Reply(503, "5.5.1", "TLS already active")
TLS_UNAVAILABLE = Reply(502, "5.5.1", "STARTTLS not available")
AUTH_UNAVAILABLE = Reply(502, "5.5.1", "AUTH not available")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
# RFC 8689 §4.1 / RFC 5248: REQUIRETLS asked for on a session that TLS does not protect.
REQUIRETLS_NEEDS_TLS = Reply(530, "5.7.10", "REQUIRETLS needs a TLS-protected session")
REQUIRETLS_SYNTAX = Reply(501, "5.5.4", "REQUIRETLS takes no value")
AUTH_DONE = Reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
AUTH_BAD_MECH = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_BAD_B64 = Reply(501, "5.5.2", "Cannot decode response")
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
INTERNAL_ERROR = Reply(421, "4.3.0", "Internal error, closing connection")
_LINE_ERRORS = {
    LineError.TOO_LONG: LINE_TOO_LONG,
    LineError.BARE_LINE_ENDING: BARE_LF_COMMAND,
    LineError.NUL: NUL_COMMAND,
}
# RFC 4954: 501 for a response that cannot be decoded or a cancel (§4); 535 for PLAIN that
# decodes but is malformed or asks for proxy authorization (§6).
_SASL_ERRORS = {
    SaslError.CANCELLED: AUTH_CANCELLED,
    SaslError.BAD_BASE64: AUTH_BAD_B64,
    SaslError.MALFORMED: AUTH_INVALID,
    SaslError.NOT_AUTHORIZED: AUTH_INVALID,
}
BYE = Reply(221, "2.0.0", "Bye")
START_INPUT = Reply(354, "", "End data with <CR><LF>.<CR><LF>")


class SMTPEngine:
    """One SMTP server session. See the module docstring for the contract."""

    def __init__(self, settings: EngineSettings, *, tls_active: bool = False) -> None:
        self.s = settings
        self.tls_active = tls_active
        self.authenticated_as: str | None = None
        self.helo: str | None = None
        self.esmtp = False
        self._state = _S.COMMAND
        self._lines = LineReader()  # its buffer also holds DATA and BDAT octets
        self._out: list[bytes] = []
        self._out_size = 0  # octets in _out, kept (summing the list per step is quadratic)
        self._events: list[Event] = []
        self._errors = ErrorCounter(settings.max_errors, settings.error_slowdown)
        self.internal_error: Exception | None = None  # a bug met while parsing, if any
        self._refusals: list[tuple[str, Reply]] = []  # see take_refusals
        self._verb = "CONNECT"  # the command being answered, for take_refusals
        self._pending: type | None = None  # event type awaiting decide()
        self._reset_transaction()
        # AUTH exchange
        self._auth_mech = ""
        self._auth_user: str | None = None
        # BDAT
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_refused: Reply | None = None
        self._data_bdat = False

    # ------------------------------------------------------------------ public API

    def greet(self) -> None:
        self._reply(Reply(220, "", f"{self.s.hostname} {GREETING_TEXT}"))

    def refuse_connection(self, reply: Reply) -> None:
        """Answer the greeting with a refusal (connection limits, blocklists) and close."""
        self._close(reply)

    @property
    def closed(self) -> bool:
        return self._state is _S.CLOSED

    @property
    def waiting(self) -> bool:
        return self._state is _S.WAIT

    def receive(self, data: bytes) -> None:
        if self._state is not _S.CLOSED:
            self._lines.feed(data)

    def next_event(self) -> Event | None:
        """The next event, or None when more input (or a decision) is needed."""
        try:
            while not self._events and self._out_size < OUTPUT_PAUSE:
                if self._state in (_S.WAIT, _S.CLOSED) or not self._step():
                    break
        except Exception as exc:  # a parser bug: a reply and a close, never a traceback
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
        """Seconds the server should wait before sending what ``take_output`` returned:
        more than zero only past the soft error limit (see ``errors``), never to close."""
        hold = self._errors.take_hold()
        return 0.0 if self._state is _S.CLOSED else hold

    def decide(self, reply: Reply) -> None:
        """Answer the pending MailFrom / RcptTo / DataStart / MessageComplete / Auth event."""
        pending, self._pending = self._pending, None
        if self._state is not _S.WAIT or pending is None:
            raise RuntimeError("decide() without a pending decision")
        self._state = _S.COMMAND
        if pending is MailFrom:
            if reply.positive:
                self._mail_given = True
            self._command_reply(reply, decided=True)
        elif pending is RcptTo:
            if reply.positive:
                self._rcpt_count += 1
            self._command_reply(reply, decided=True)
        elif pending is DataStart:
            self._start_body(reply)
        elif pending is MessageComplete:
            self._command_reply(reply, decided=True)
            self._reset_transaction()
            self._events.append(ResetTransaction())
        elif pending is AuthCredentials:
            if reply.positive:
                self.authenticated_as = self._auth_user
            self._auth_user = None
            if reply.code == 421:
                self._close(reply)
            else:
                self._command_reply(reply, decided=True)

    def tls_started(self) -> None:
        """The handshake finished: forget the session, the client must EHLO again.

        The plaintext that followed the STARTTLS line was dropped when that line was
        parsed; whatever ``receive`` got since came through TLS (the server stops reading
        the plaintext socket once StartTLS is emitted) and is kept.
        """
        if self._pending is not StartTLS:
            raise RuntimeError("tls_started() without STARTTLS")
        self._pending = None
        self.tls_active = True
        self.helo = None
        self.esmtp = False
        self.authenticated_as = None
        self._reset_transaction()
        self._state = _S.COMMAND

    def timeout(self) -> None:
        self._close(IDLE_TIMEOUT)

    def close(self, reply: Reply) -> None:
        """Server-initiated close (shutdown, session time limit)."""
        self._close(reply)

    # ------------------------------------------------------------------ internals

    def _reply(self, reply: Reply) -> None:
        self._emit(reply.encode())

    def _emit(self, data: bytes) -> None:
        self._out.append(data)
        self._out_size += len(data)

    def _close(self, reply: Reply) -> None:
        if self._state is _S.CLOSED:
            return
        self._reply(reply)
        if self._mail_given or self._body is not None:
            self._events.append(MessageAborted(reply))
        self._state = _S.CLOSED
        self._lines.clear()
        self._events.append(Closing())

    def _command_reply(self, reply: Reply, *, decided: bool = False) -> None:
        """Send a reply to what the client sent; a negative one counts (see ``errors``).
        The engine's own refusals (not ``decided`` by the server, which logs those) are
        kept for the server's decision log (``take_refusals``)."""
        self._reply(reply)
        if reply.code >= 400 and not decided:
            self._refusals.append((self._verb, reply))
        if reply.code >= 400 and reply.code != 421 and self._errors.record():
            self._refusals.append(("SESSION", TOO_MANY_ERRORS))
            self._close(TOO_MANY_ERRORS)

    def take_refusals(self) -> list[tuple[str, Reply]]:
        """(command verb, reply) for each refusal the engine itself answered since the last
        call: syntax, sequence and limit errors, and the close for too many errors."""
        out, self._refusals = self._refusals, []
        return out

    def _wait(self, event: Event) -> None:
        self._pending = type(event)
        self._state = _S.WAIT
        self._events.append(event)

    def _reset_transaction(self) -> None:
        self._mail_given = False
        self._smtputf8 = False
        self._rcpt_count = 0
        self._body: BodyChecker | None = None
        self._bdat_open = False

    def _step(self) -> bool:
        """Consume some input; False when no progress is possible without more."""
        if self._state is _S.DATA:
            return self._step_data()
        if self._state is _S.BDAT:
            return self._step_bdat()
        return self._step_line()

    # ------------------------------------------------------------------ command lines

    def _step_line(self) -> bool:
        auth = self._state is _S.AUTH
        line = self._lines.next_line(MAX_SASL_LINE if auth else self.s.max_command_line)
        if line is None:
            return False
        if isinstance(line, LineError):
            self._verb = "LINE"
            if auth:  # a bad line also ends a SASL exchange
                self._state = _S.COMMAND
                self._auth_user = None
            self._command_reply(_LINE_ERRORS[line])
        elif auth:
            self._auth_continue(line)
        else:
            self._command(line)
        return True

    def _command(self, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._verb = "UNKNOWN"
            self._command_reply(SYNTAX_ERROR)
            return
        verb, _, arg = text.partition(" ")
        self._verb = verb.upper() if verb.upper() in _HANDLERS else "UNKNOWN"
        handler = _HANDLERS.get(verb.upper())
        if handler is None:
            self._command_reply(Reply(500, "5.5.2", "Command unrecognized"))
            return
        if not text.isascii() and verb.upper() not in ("MAIL", "RCPT"):
            self._command_reply(SYNTAX_ERROR)
            return
        handler(self, arg)

    def _cmd_ehlo(self, arg: str) -> None:
        self._hello(arg, esmtp=True)

    def _cmd_helo(self, arg: str) -> None:
        self._hello(arg, esmtp=False)

    def _hello(self, arg: str, *, esmtp: bool) -> None:
        name = arg.strip()
        if not name or " " in name or not name.isascii():
            self._command_reply(Reply(501, "5.5.4", "Syntax: EHLO hostname"))
            return
        if self._mail_given:
            self._events.append(ResetTransaction())
        self._reset_transaction()
        self.helo, self.esmtp = name, esmtp
        self._events.append(Helo(name, esmtp))
        if not esmtp:
            self._reply(Reply(250, "", self.s.hostname))
            return
        lines = [
            self.s.hostname,
            "PIPELINING",
            f"SIZE {self.s.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "CHUNKING",
        ]
        if self.s.tls_available and not self.tls_active:
            lines.append("STARTTLS")
        if self.s.requiretls and self.tls_active:  # RFC 8689 §2: never before TLS
            lines.append("REQUIRETLS")
        if self._auth_offered():
            lines.append("AUTH " + " ".join(self.s.auth_mechanisms))
        self._reply(Reply(250, "", tuple(lines)))

    def _auth_offered(self) -> bool:
        return bool(self.s.auth_mechanisms) and (self.tls_active or not self.s.auth_requires_tls)

    def _cmd_mail(self, arg: str) -> None:
        if self.helo is None:
            self._command_reply(NEED_HELO)
            return
        if self._mail_given:
            self._command_reply(NESTED_MAIL)
            return
        if self.s.auth_required and self.authenticated_as is None:
            self._command_reply(AUTH_REQUIRED)
            return
        try:
            sender, params = parse_mail_argument(
                arg, prefix="FROM:", null_allowed=True, smtputf8_allowed=True
            )
        except AddressError as exc:
            self._command_reply(exc.reply)
            return
        size: int | None = None
        for key, value in params.items():
            if not self.esmtp:
                self._command_reply(UNSUPPORTED_PARAM)
                return
            if key == "SIZE":
                if value is None or not (value.isascii() and value.isdigit()) or len(value) > 20:
                    self._command_reply(Reply(501, "5.5.4", "Bad SIZE parameter"))
                    return
                size = int(value)
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    self._command_reply(Reply(555, "5.5.4", "Unsupported BODY type"))
                    return
            elif key == "SMTPUTF8":
                if value is not None:
                    self._command_reply(UNSUPPORTED_PARAM)
                    return
            elif key == "AUTH":
                pass  # RFC 4954 §5: accepted and not trusted
            elif key == "REQUIRETLS" and self.s.requiretls:
                if value is not None:
                    self._command_reply(REQUIRETLS_SYNTAX)
                    return
                if not self.tls_active:
                    self._command_reply(REQUIRETLS_NEEDS_TLS)
                    return
            else:
                self._command_reply(UNSUPPORTED_PARAM)
                return
        smtputf8 = "SMTPUTF8" in params
        if sender is not None and not smtputf8 and not str(sender).isascii():
            self._command_reply(NEED_UTF8)
            return
        if size is not None and size > self.s.max_message_size:
            self._command_reply(SIZE_EXCEEDED)
            return
        self._smtputf8 = smtputf8
        self._wait(MailFrom(sender, params, size, requiretls="REQUIRETLS" in params))

    def _cmd_rcpt(self, arg: str) -> None:
        if not self._mail_given:
            self._command_reply(NEED_MAIL)
            return
        if self._rcpt_count >= self.s.max_recipients:
            self._command_reply(TOO_MANY_RCPT)
            return
        try:
            rcpt, params = parse_mail_argument(
                arg, prefix="TO:", null_allowed=False, smtputf8_allowed=True
            )
        except AddressError as exc:
            self._command_reply(exc.reply)
            return
        if params:
            self._command_reply(UNSUPPORTED_PARAM)
            return
        if rcpt is None:  # parse_mail_argument refuses <> here; keep the type checker honest
            self._command_reply(Reply(501, "5.1.3", "Bad recipient address syntax"))
            return
        if not self._smtputf8 and not str(rcpt).isascii():
            self._command_reply(NEED_UTF8)
            return
        self._wait(RcptTo(rcpt, params))

    def _cmd_data(self, arg: str) -> None:
        if arg:
            self._command_reply(NO_PARAMS)
        elif not self._transaction_ready():
            return
        elif self._bdat_open:
            self._command_reply(BAD_SEQUENCE)
        else:
            self._data_bdat = False
            self._wait(DataStart(bdat=False))

    def _transaction_ready(self) -> bool:
        if not self._mail_given:
            self._command_reply(NEED_MAIL)
            return False
        if self._rcpt_count == 0:
            self._command_reply(NO_VALID_RCPT)
            return False
        return True

    def _cmd_bdat(self, arg: str) -> None:
        parts = arg.split(" ")
        if (
            not 1 <= len(parts) <= 2
            or not (parts[0].isascii() and parts[0].isdigit())
            or len(parts[0]) > 20
            or (len(parts) == 2 and parts[1].upper() != "LAST")
        ):
            self._command_reply(Reply(501, "5.5.4", "Syntax: BDAT size [LAST]"))
            return
        self._bdat_left = int(parts[0])
        self._bdat_last = len(parts) == 2
        self._bdat_refused = None
        if not self._mail_given:
            self._bdat_refused = NEED_MAIL
        elif self._rcpt_count == 0:
            self._bdat_refused = NO_VALID_RCPT
        if self._bdat_refused is not None or self._bdat_open:
            self._state = _S.BDAT  # the chunk must be read (and dropped) either way
        else:
            self._data_bdat = True
            self._wait(DataStart(bdat=True))

    def _start_body(self, reply: Reply) -> None:
        if not reply.positive:
            if self._data_bdat:
                self._bdat_refused = reply  # the chunk's octets still have to be read
                self._state = _S.BDAT
            else:
                self._command_reply(reply, decided=True)
            return
        self._body = BodyChecker(
            self.s.max_message_size, self.s.max_data_line, self.s.max_received_headers,
            bare_line_endings=self.s.legacy_bare_lf,
        )
        if self._data_bdat:
            self._bdat_open = True
            self._state = _S.BDAT
        else:
            self._reply(START_INPUT)
            self._state = _S.DATA

    def _cmd_rset(self, arg: str) -> None:
        if arg:
            self._command_reply(NO_PARAMS)
            return
        if self._mail_given:
            self._events.append(ResetTransaction())
        self._reset_transaction()
        self._reply(OK)

    def _cmd_noop(self, arg: str) -> None:
        self._reply(OK)

    def _cmd_quit(self, arg: str) -> None:
        self._close(BYE)

    def _cmd_vrfy(self, arg: str) -> None:
        if self.s.legacy_accounts is not None:  # lab legacy profile only
            self._command_reply(self.s.legacy_accounts.vrfy(arg))
            return
        # Same answer for every argument: VRFY must not tell which accounts exist.
        self._reply(VRFY_REPLY)

    def _cmd_expn(self, arg: str) -> None:
        if self.s.legacy_accounts is not None:  # lab legacy profile only
            self._command_reply(self.s.legacy_accounts.expn(arg))
            return
        self._command_reply(EXPN_REPLY)

    def _cmd_help(self, arg: str) -> None:
        self._reply(HELP)

    def _cmd_starttls(self, arg: str) -> None:
        if arg:
            self._command_reply(NO_PARAMS)
        elif self.tls_active:
            self._command_reply(TLS_ACTIVE)
        elif not self.s.tls_available:
            self._command_reply(TLS_UNAVAILABLE)
        elif self._mail_given:
            self._command_reply(BAD_SEQUENCE)
        else:
            self._reply(TLS_READY)
            self._lines.clear()  # pipelined plaintext must never reach the TLS session
            self._wait(StartTLS())

    # ------------------------------------------------------------------ AUTH (SASL)

    def _cmd_auth(self, arg: str) -> None:
        if not self.s.auth_mechanisms:
            self._command_reply(AUTH_UNAVAILABLE)
            return
        if not self._auth_offered():
            self._command_reply(AUTH_NEEDS_TLS)
            return
        if self.helo is None:
            self._command_reply(NEED_HELO)
            return
        if self.authenticated_as is not None:
            self._command_reply(AUTH_DONE)
            return
        if self._mail_given:
            self._command_reply(AUTH_IN_TRANSACTION)
            return
        mech, _, initial = arg.strip().partition(" ")
        mech = mech.upper()
        if mech not in self.s.auth_mechanisms:
            self._command_reply(AUTH_BAD_MECH)
            return
        self._auth_mech = mech
        self._auth_user = None
        if initial:
            self._auth_continue(initial.encode("utf-8"))
        elif mech == "PLAIN":
            self._state = _S.AUTH
            self._emit(b"334 \r\n")  # RFC 4954 syntax: "334" SP [base64], SP even if empty
        else:  # LOGIN
            self._state = _S.AUTH
            self._reply(Reply(334, "", "VXNlcm5hbWU6"))

    def _auth_continue(self, line: bytes) -> None:
        """One SASL response (PLAIN, or a LOGIN step), by the rules of ``sasl``."""
        self._state = _S.COMMAND
        if self._auth_mech == "PLAIN":
            decoded = decode_response(line)
            creds = decoded if isinstance(decoded, SaslError) else parse_plain(decoded)
            if isinstance(creds, SaslError):
                self._command_reply(_SASL_ERRORS[creds])
                return
            self._auth_user = creds.authcid
            self._wait(AuthCredentials("PLAIN", creds.authcid, creds.password))
            return
        text = decode_text(line)
        if isinstance(text, SaslError):
            self._auth_user = None
            self._command_reply(_SASL_ERRORS[text])
        elif self._auth_user is None:  # LOGIN, first step: the user name
            self._auth_user = text
            self._state = _S.AUTH
            self._reply(Reply(334, "", "UGFzc3dvcmQ6"))
        else:
            self._wait(AuthCredentials("LOGIN", self._auth_user, text))

    # ------------------------------------------------------------------ DATA

    def _step_data(self) -> bool:
        """Consume complete lines of DATA; only <CRLF>.<CRLF> ends it."""
        if self.s.legacy_bare_lf:
            return self._step_data_legacy()
        buf = self._lines.buffer
        body = self._body
        assert body is not None
        # The buffer always starts at the beginning of a line.
        if buf.startswith(b".\r\n"):
            end, stop = 0, 3
        else:
            end = buf.find(b"\r\n.\r\n")
            stop = end + 5
            if end >= 0:
                end += 2
        if end >= 0:
            self._emit_body(bytes(buf[:end]))
            del buf[:stop]
            self._finish_body()
            return True
        last = buf.rfind(_CRLF)
        if last >= 0:
            self._emit_body(bytes(buf[: last + 2]))
            del buf[: last + 2]
            return True
        if len(buf) > self.s.max_data_line:
            # An over-long line: record the refusal and drop what we hold, keeping one
            # octet so a following LF still pairs with a CR and a "." stays mid-line.
            if body.error is None:
                body.error = DATA_LINE_TOO_LONG
            del buf[:-1]
            if buf != b"\r":
                buf[:] = b"x"
        return False

    def _step_data_legacy(self) -> bool:
        """The lab's legacy profile: any LF ends a line, so "<LF>.<LF>" (or a mix with CR)
        ends DATA too, and what follows is read as commands: SMTP smuggling."""
        buf = self._lines.buffer
        end = _LEGACY_END.search(buf)
        if end is not None:
            self._emit_body(bytes(buf[: end.start() + len(end.group(1) or b"")]))
            del buf[: end.end()]
            self._finish_body()
            return True
        last = buf.rfind(b"\n")
        if last >= 0:
            self._emit_body(bytes(buf[: last + 1]))
            del buf[: last + 1]
            return True
        if len(buf) > self.s.max_data_line:
            del buf[:-1]
        return False

    def _emit_body(self, raw: bytes) -> None:
        """Dot-unstuff complete lines and pass them on; raw starts at a line start."""
        if not raw:
            return
        if b"\r\n." in raw or raw.startswith(b"."):
            raw = (b"\r\n" + raw).replace(b"\r\n.", b"\r\n")[2:]
        body = self._body
        assert body is not None
        if body.feed(raw):
            self._events.append(DataChunk(raw))

    def _finish_body(self) -> None:
        body = self._body
        assert body is not None
        error = body.finish()
        self._state = _S.COMMAND
        if error is not None:
            self._events.append(MessageAborted(error))
            self._reset_transaction()
            self._command_reply(error)
        else:
            self._wait(MessageComplete(body.size))

    # ------------------------------------------------------------------ BDAT

    def _step_bdat(self) -> bool:
        buf = self._lines.buffer
        if self._bdat_left:
            if not buf:
                return False
            n = min(self._bdat_left, len(buf))
            chunk = bytes(buf[:n])
            del buf[:n]
            self._bdat_left -= n
            body = self._body
            if self._bdat_refused is None and body is not None and body.feed(chunk):
                self._events.append(DataChunk(chunk))
            if self._bdat_left:
                return True
        # The whole chunk has been read.
        self._state = _S.COMMAND
        if self._bdat_refused is not None:
            reply, self._bdat_refused = self._bdat_refused, None
            if self._bdat_open:
                self._events.append(MessageAborted(reply))
                self._reset_transaction()
            self._command_reply(reply)
            return True
        if self._bdat_last:
            self._bdat_open = False
            self._finish_body()
        else:
            body = self._body
            assert body is not None
            self._reply(Reply(250, "2.0.0", f"{body.size} octets received"))
        return True


# The legacy end of data: a "." alone on a line, whatever ends the lines (group 1 is the
# line end before the dot, empty at the start of the buffer).
_LEGACY_END = re.compile(rb"(?:^|(\r?\n))\.\r?\n")

_HANDLERS = {
    "EHLO": SMTPEngine._cmd_ehlo,
    "HELO": SMTPEngine._cmd_helo,
    "MAIL": SMTPEngine._cmd_mail,
    "RCPT": SMTPEngine._cmd_rcpt,
    "DATA": SMTPEngine._cmd_data,
    "BDAT": SMTPEngine._cmd_bdat,
    "RSET": SMTPEngine._cmd_rset,
    "NOOP": SMTPEngine._cmd_noop,
    "QUIT": SMTPEngine._cmd_quit,
    "VRFY": SMTPEngine._cmd_vrfy,
    "EXPN": SMTPEngine._cmd_expn,
    "HELP": SMTPEngine._cmd_help,
    "STARTTLS": SMTPEngine._cmd_starttls,
    "AUTH": SMTPEngine._cmd_auth,
}
