"""The ManageSieve server protocol as a sans-I/O state machine (RFC 5804).

The shape is the POP3 and IMAP engines': bytes go in with ``receive``, events come out of
``next_event``, reply bytes accumulate for ``take_output``. The engine owns what the bytes
alone decide: the syntax of commands (atoms, quoted strings, literals), states, the error
limit, what the capabilities offer, the refusal of credentials before TLS and the discarding
of what was pipelined behind STARTTLS. The server answers each event:

* ``CheckCredentials`` → ``credentials_accepted(user)``, ``credentials_refused()`` (one
  reply whatever the reason) or ``credentials_unverifiable(text)`` (``TRYLATER``; not a
  failed login).
* ``StartTLS`` → ``tls_started()``: the engine then re-sends its capabilities (RFC 5804
  §2.2). The reader is cleared when STARTTLS is parsed, so plaintext pipelined behind it is
  never executed (the CVE-2011-0411 class of injection).
* ``Execute(name, args)``: a script command once logged in (HAVESPACE, PUTSCRIPT,
  LISTSCRIPTS, SETACTIVE, GETSCRIPT, DELETESCRIPT, RENAMESCRIPT, CHECKSCRIPT), its
  arguments checked for number and type → ``executed(ok, code, text)``, with ``listing``
  (LISTSCRIPTS) or ``script`` (GETSCRIPT) for an OK that carries data.

Strings. A quoted string holds at most 1024 octets (RFC 5804 §4). Clients send literals
as ``{N+}`` (literal-c2s, non-synchronising: the octets follow at once); ``{N}`` is read the
same way, since ManageSieve has no continuation that a client could wait for. So a literal
can never be refused before it is sent; what the engine does instead, at the ``{N+}`` and
before a single octet of it is held:

* the script of PUTSCRIPT or CHECKSCRIPT over ``max_script_size``: ``NO (QUOTA/MAXSIZE)``
  at once, then the announced octets are counted away, never buffered, so the session stays
  in step and the client learns why (HAVESPACE lets a client ask first);
* any other string over ``MAX_STRING`` (a name, a SASL response): ``NO``, counted away;
* anything announced past ``max_discard`` (and, before login, past ``LOGIN_DISCARD``):
  ``BYE`` and the session ends: reading megabytes only to throw them away would let one
  client use the server's bandwidth for nothing, and no real client sends that by mistake.

A command whose syntax is wrong is skipped to its end, literals included (a line that ends
in ``{N+}`` is followed by N octets that are part of it, never a command), then answered
``NO``. Lines end with CRLF only; a NUL or a bare CR or LF is refused (``lines.py``'s rule).
Errors count as in the other engines (``errors``): every ``NO`` the engine decides about
syntax, states and logins; past the limit the session ends with ``BYE``. Answers about
scripts (``NONEXISTENT``, quotas, a script that does not compile) are not counted: a client
meets them in normal use. An exception inside the engine is a bug: ``BYE`` and a close,
kept in ``internal_error``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from mailfort.protocol.errors import ErrorCounter, Slowdown
from mailfort.protocol.sasl import MAX_SASL_LINE, SaslError, decode_response, parse_plain

CRLF = b"\r\n"
# Octets of responses after which ``next_event`` parses no further pipelined command until
# the server takes them (``take_output``): what the engine answers itself (CAPABILITY, NOOP,
# refusals...) cannot pile up beyond this from one read. The same as the session's pass
# (server/session.py ``PUMP_FLUSH_AT``), which goes on at once after a pass this full.
OUTPUT_PAUSE = 64 * 1024
MAX_QUOTED = 1024  # octets between the quotes (RFC 5804 §4, erratum 2655)
MAX_STRING = MAX_SASL_LINE  # a literal that is not a script: a name, a SASL response
MAX_LINE = 8192  # octets of one command outside its literals, CRLF included
MAX_ARGS = 4  # no command has more than two arguments; a few more are a syntax error
LOGIN_DISCARD = 64 * 1024  # before login, a literal announced larger ends the session
MAX_AUTH_FAILURES = 3
MAX_NUMBER = 10  # digits of a number (HAVESPACE size, literal length)

# Texts.
ENCRYPT_NEEDED = "Use STARTTLS before AUTHENTICATE"
AUTH_FAILED = "Authentication failed"
TRY_LATER = "Temporary failure, try again later"
TOO_MANY_ERRORS = "Too many errors, closing connection"
TOO_MANY_FAILURES = "Too many authentication failures, closing connection"
IDLE_TIMEOUT = "Idle timeout, closing connection"
INTERNAL_ERROR = "Internal error, closing connection"
TOO_LARGE = "String too large, closing connection"
_SASL_ERRORS = {
    SaslError.CANCELLED: ("", "Authentication cancelled"),
    SaslError.BAD_BASE64: ("", "Invalid base64 in SASL response"),
    SaslError.MALFORMED: ("", "Malformed PLAIN response"),
    SaslError.NOT_AUTHORIZED: ("", "Proxy authorization not supported"),
}

# Commands by state (RFC 5804 §2). The script commands become ``Execute`` events.
ANY_STATE = frozenset({"CAPABILITY", "LOGOUT", "NOOP"})
NOT_AUTHENTICATED_ONLY = frozenset({"STARTTLS", "AUTHENTICATE"})
SCRIPT_COMMANDS = {  # name -> argument types: "s" string, "n" number
    "HAVESPACE": "sn", "PUTSCRIPT": "ss", "LISTSCRIPTS": "", "SETACTIVE": "s",
    "GETSCRIPT": "s", "DELETESCRIPT": "s", "RENAMESCRIPT": "ss", "CHECKSCRIPT": "s",
}
_SCRIPT_ARG = {"PUTSCRIPT": 2, "CHECKSCRIPT": 1}  # which argument is a script (1-based)

# ---------------------------------------------------------------------------- events


@dataclass(slots=True)
class CheckCredentials:
    """Needs ``credentials_accepted(user)``, ``credentials_refused()`` or
    ``credentials_unverifiable(text)``."""

    username: str
    password: str = field(repr=False)
    mechanism: str  # "PLAIN"


@dataclass(slots=True)
class StartTLS:
    """Needs ``tls_started()`` (or ``close``) once the handshake is over."""


@dataclass(slots=True)
class Execute:
    """A script command (see ``SCRIPT_COMMANDS``); needs ``executed(...)``.

    ``args``: strings as ``bytes`` (names are UTF-8, checked by the store; scripts are
    octets) and numbers as ``int``, as many and of the types the command takes."""

    name: str
    args: tuple[bytes | int, ...]


Event = CheckCredentials | StartTLS | Execute


class State(enum.Enum):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    LOGOUT = "logout"


@dataclass(frozen=True, slots=True)
class EngineSettings:
    tls_available: bool = False  # STARTTLS can be offered (a certificate is configured)
    allow_plaintext: bool = False  # AUTHENTICATE before TLS (loopback, by config)
    max_errors: int = 10
    error_slowdown: Slowdown | None = None
    max_auth_failures: int = MAX_AUTH_FAILURES
    implementation: str = "ManageSieve"  # IMPLEMENTATION: names no software or version
    sieve_extensions: tuple[str, ...] = ()  # SIEVE: what `require` accepts
    max_redirects: int = 4  # MAXREDIRECTS
    max_script_size: int = 65536  # a literal script larger is refused (QUOTA/MAXSIZE)
    max_discard: int = 4 * 1024 * 1024  # a refused literal larger ends the session
    unauthenticate: bool = True  # offer UNAUTHENTICATE (RFC 5804 §2.14.1)


class _W(enum.Enum):
    NONE = 0
    CREDENTIALS = 1
    TLS = 2
    EXECUTE = 3
    SASL = 4  # the client's response to a SASL challenge (not the server)


class _Tok(enum.Enum):
    ATOM = 0
    STRING = 1


def quote(value: bytes | str) -> bytes:
    """A string as the server sends it: quoted when short and on one line, else a literal
    (literal-s2c, ``{N}``)."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    if len(data) <= MAX_QUOTED and not any(c in data for c in b"\r\n\0"):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(data) + data


def _clean(text: str) -> str:
    """A response text: one line of printable characters (no CR or LF smuggled in)."""
    return "".join(c if c.isprintable() else "?" for c in text)


class _SyntaxError(Exception):
    """A command that does not parse; the reader skips the rest of it."""


class _Fatal(Exception):
    """Input the session ends on (a literal announced past the discard bound)."""


class ManageSieveEngine:
    """One ManageSieve server session. See the module docstring for the contract."""

    def __init__(self, settings: EngineSettings, *, tls_active: bool = False) -> None:
        self.s = settings
        self.tls_active = tls_active
        self.state = State.NOT_AUTHENTICATED
        self.user: str | None = None  # canonical address once authenticated
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._out_size = 0  # octets in _out, kept (summing the list per step is quadratic)
        self._events: list[Event] = []
        self._wait = _W.NONE
        self._errors = ErrorCounter(settings.max_errors, settings.error_slowdown)
        self._auth_failures = 0
        self.internal_error: Exception | None = None
        # The command being read: its tokens, octets outside literals, the literal under way.
        self._toks: list[tuple[_Tok, bytes]] = []
        self._line_used = 0
        self._lit_left = 0  # octets of the current literal still to come
        self._lit: bytearray | None = None  # None while a literal is being discarded
        self._in_literal = False
        self._space = False  # the last thing read was the space before an argument
        self._skipping = False  # dropping the rest of a command already answered or refused
        self._answered = False  # the command got its reply already (a refused literal)
        self._pending_error = ""  # the NO a skipped command gets at its end

    # ------------------------------------------------------------------ public API

    @property
    def closed(self) -> bool:
        return self.state is State.LOGOUT

    @property
    def waiting(self) -> bool:
        """True while an event is waiting for the server's answer."""
        return self._wait in (_W.CREDENTIALS, _W.TLS, _W.EXECUTE)

    @property
    def held(self) -> int:
        """Octets of client input held (the buffer and the current command's strings)."""
        return len(self._buf) + sum(len(v) for _, v in self._toks) + len(self._lit or b"")

    def capabilities(self) -> list[bytes]:
        """The capability lines (RFC 5804 §1.7), without the closing OK."""
        caps: list[tuple[str, str | None]] = [("IMPLEMENTATION", self.s.implementation)]
        # RFC 5804 §1.7: an empty SASL list is allowed when STARTTLS is advertised; after
        # TLS (or on loopback, by config) PLAIN is offered.
        caps.append(("SASL", "PLAIN" if self._credentials_allowed() else ""))
        caps.append(("SIEVE", " ".join(self.s.sieve_extensions)))
        if self.s.tls_available and not self.tls_active \
                and self.state is State.NOT_AUTHENTICATED:
            caps.append(("STARTTLS", None))
        caps.append(("MAXREDIRECTS", str(self.s.max_redirects)))
        if self.user is not None:
            caps.append(("OWNER", self.user))
        if self.s.unauthenticate:
            caps.append(("UNAUTHENTICATE", None))
        caps.append(("VERSION", "1.0"))
        return [quote(k) + (b" " + quote(v) if v is not None else b"") + CRLF
                for k, v in caps]

    def greet(self) -> None:
        self._emit(*self.capabilities())
        self._reply("OK", "", "ManageSieve ready", count=False)

    def refuse_connection(self, text: str) -> None:
        self._close(text)

    def receive(self, data: bytes) -> None:
        if not self.closed:
            self._buf += data

    def next_event(self) -> Event | None:
        try:
            while not self._events and not self.waiting and not self.closed \
                    and self._out_size < OUTPUT_PAUSE and self._step():
                pass
        except Exception as exc:  # a bug: a BYE and a close, never a traceback
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
        hold = self._errors.take_hold()
        return 0.0 if self.closed else hold

    def timeout(self) -> None:
        self._close(IDLE_TIMEOUT)

    def close(self, text: str) -> None:
        """A close the server decides (shutdown, stress, a failed handshake): ``BYE``."""
        self._close(text)

    # answers to events

    def credentials_accepted(self, user: str) -> None:
        if not self._expect(_W.CREDENTIALS):
            return
        self._wait = _W.NONE
        self.user = user
        self.state = State.AUTHENTICATED
        self._reply("OK", "", "Logged in", count=False)

    def credentials_refused(self) -> None:
        if not self._expect(_W.CREDENTIALS):
            return
        self._wait = _W.NONE
        self._auth_failures += 1
        self._reply("NO", "", AUTH_FAILED)
        if self._auth_failures >= self.s.max_auth_failures:
            self._close(TOO_MANY_FAILURES)

    def credentials_unverifiable(self, text: str = TRY_LATER) -> None:
        """Not now (the shared counters are down): not a failed login."""
        if not self._expect(_W.CREDENTIALS):
            return
        self._wait = _W.NONE
        self._reply("NO", "TRYLATER", text, count=False)

    def tls_started(self) -> None:
        if not self._expect(_W.TLS):
            return
        self._wait = _W.NONE
        self.tls_active = True
        self._emit(*self.capabilities())  # RFC 5804 §2.2: re-issued after the handshake
        self._reply("OK", "", "TLS active", count=False)

    def executed(self, ok: bool, code: str = "", text: str = "", *,
                 listing: Sequence[tuple[str, bool]] | None = None,
                 script: bytes | None = None) -> None:
        """The answer to an ``Execute``: ``listing`` (LISTSCRIPTS: name, active) or
        ``script`` (GETSCRIPT) precede an OK; ``code`` is a response code without its
        parentheses (``QUOTA/MAXSIZE``, ``NONEXISTENT``, ``WARNINGS`` …)."""
        if not self._expect(_W.EXECUTE):
            return
        self._wait = _W.NONE
        if ok and listing is not None:
            self._emit(*[quote(name) + (b" ACTIVE" if active else b"") + CRLF
                         for name, active in listing])
        if ok and script is not None:
            self._emit(b"{%d}\r\n" % len(script) + script + CRLF)
        self._reply("OK" if ok else "NO", code, text, count=False)

    # ------------------------------------------------------------------ output

    def _emit(self, *data: bytes) -> None:
        self._out.extend(data)
        self._out_size += sum(len(d) for d in data)

    def _reply(self, status: str, code: str, text: str, *, count: bool = True) -> None:
        """``OK``/``NO`` with an optional ``(code)`` and text; a counted NO past the error
        limit closes the session."""
        line = status.encode()
        if code:
            line += b" (" + _clean(code).encode() + b")"
        if text:
            line += b" " + quote(_clean(text))
        self._emit(line + CRLF)
        if status == "NO" and count and self._errors.record():
            self._close(TOO_MANY_ERRORS)

    def _close(self, text: str) -> None:
        if self.closed:
            return
        self._emit(b"BYE " + quote(_clean(text)) + CRLF)
        self._end()

    def _end(self) -> None:
        self.state = State.LOGOUT
        self._wait = _W.NONE
        self._events.clear()
        self._reset_reader()

    def _expect(self, wait: _W) -> bool:
        if self.closed:
            return False
        if self._wait is not wait:
            raise RuntimeError(f"not waiting for {wait.name} (waiting for {self._wait.name})")
        return True

    # ------------------------------------------------------------------ the reader

    def _reset_reader(self) -> None:
        """Forget everything buffered (STARTTLS, close)."""
        self._buf.clear()
        self._reset_command()

    def _reset_command(self) -> None:
        self._toks = []
        self._line_used = 0
        self._lit_left = 0
        self._lit = None
        self._in_literal = False
        self._space = False
        self._skipping = False
        self._answered = False
        self._pending_error = ""

    def _step(self) -> bool:
        """Advance over buffered input; True after one command (or response) was handled,
        False when more input is needed."""
        try:
            toks = self._read_command()
        except _Fatal as exc:
            self._close(str(exc))
            return True
        if toks is None:
            return False
        answered, error = self._answered, self._pending_error
        self._reset_command()
        if answered:
            return True
        if error:
            if self._wait is _W.SASL:
                self._wait = _W.NONE
            self._reply("NO", "", error)
            return True
        if self._wait is _W.SASL:
            self._sasl_response(toks)
        else:
            self._command(toks)
        return True

    def _read_command(self) -> list[tuple[_Tok, bytes]] | None:
        """Tokens of one whole command (through its CRLF), or None until more input. A
        syntax error switches to skipping: the command still ends where its framing says."""
        buf = self._buf
        while True:
            if self._in_literal:
                if not self._take_literal():
                    return None
                continue
            if self._skipping:
                if not self._skip_line():
                    return None
                if not self._in_literal:
                    return self._toks
                continue
            if not buf:
                return None
            try:
                done = self._token()
            except _SyntaxError as exc:
                self._pending_error = self._pending_error or str(exc)
                self._skipping = True
                continue
            if done is None:
                return None
            if done:
                return self._toks

    def _limit_line(self, n: int) -> None:
        self._line_used += n
        if self._line_used > MAX_LINE:
            raise _SyntaxError("Command line too long")

    def _token(self) -> bool | None:
        """Read one token or the end of the command: True at the CRLF, False after a token,
        None when the buffer holds too little to tell."""
        buf = self._buf
        c = buf[0]
        if c == 0x0D:
            if len(buf) < 2:
                return None
            if buf[1] != 0x0A:
                raise _SyntaxError("Bare CR in command line not allowed")
            # Judged before the CRLF is taken: a refused command is skipped through its own
            # CRLF, never through the next command's.
            if not self._toks:
                raise _SyntaxError("Empty command")
            self._limit_line(2)
            del buf[:2]
            return True
        if c == 0x20:
            if not self._toks or self._space:
                raise _SyntaxError("Unexpected space")
            del buf[:1]
            self._limit_line(1)
            self._space = True
            return False
        if self._toks and not self._space:
            raise _SyntaxError("Space expected between arguments")
        if len(self._toks) > MAX_ARGS:
            raise _SyntaxError("Too many arguments")
        if c == 0x22:  # "
            return self._quoted()
        if c == 0x7B:  # {
            return self._literal_header()
        return self._atom()

    def _atom(self) -> bool | None:
        buf = self._buf
        end = 0
        while end < len(buf) and buf[end] not in b" \r\n\"{":
            end += 1
        if end == len(buf):
            if end > MAX_LINE:
                raise _SyntaxError("Command line too long")
            return None
        atom = bytes(buf[:end])
        if not atom or not all(0x21 <= b <= 0x7E for b in atom):
            raise _SyntaxError("Invalid characters in command")
        del buf[:end]
        self._limit_line(end)
        self._push(_Tok.ATOM, atom)
        return False

    def _quoted(self) -> bool | None:
        buf = self._buf
        out = bytearray()
        i = 1
        while i < len(buf):
            b = buf[i]
            if b == 0x5C:  # backslash: only \" and \\ (QUOTED-SPECIALS)
                if i + 1 >= len(buf):
                    return None
                nxt = buf[i + 1]
                if nxt not in b'"\\':
                    raise _SyntaxError("Invalid escape in quoted string")
                out.append(nxt)
                i += 2
            elif b == 0x22:
                del buf[: i + 1]
                self._limit_line(i + 1)
                self._push(_Tok.STRING, bytes(out))
                return False
            elif b in b"\r\n\0":
                raise _SyntaxError("Invalid character in quoted string")
            else:
                out.append(b)
                i += 1
            if len(out) > MAX_QUOTED:
                raise _SyntaxError("Quoted string too long, use a literal")
        return None

    def _literal_header(self) -> bool | None:
        buf = self._buf
        end = buf.find(b"}", 0, MAX_NUMBER + 3)
        if b"\n" in buf[: end if end >= 0 else MAX_NUMBER + 3]:
            raise _SyntaxError("Invalid literal")
        if end < 0:
            if len(buf) < MAX_NUMBER + 3:
                return None
            raise _SyntaxError("Invalid literal")
        if len(buf) < end + 3:
            return None
        if buf[end + 1: end + 3] != CRLF:
            raise _SyntaxError("Literal must end its line")
        digits = bytes(buf[1:end]).removesuffix(b"+")
        if not digits or not digits.isdigit():
            raise _SyntaxError("Invalid literal")
        size = int(digits)
        self._limit_line(end + 3)  # before the {N+} is taken: skipping then skips its octets
        del buf[: end + 3]
        self._start_literal(size)
        return False

    def _push(self, kind: _Tok, value: bytes) -> None:
        self._toks.append((kind, value))
        self._space = False

    def _start_literal(self, size: int) -> None:
        """Decide on a literal at its ``{N+}``, before any of its octets is held."""
        name = self._toks[0][1].upper() if self._toks and self._wait is not _W.SASL else b""
        position = len(self._toks)  # the literal is argument number ``position``
        authenticated = self.state is State.AUTHENTICATED
        is_script = authenticated and _SCRIPT_ARG.get(name.decode("ascii", "replace")) \
            == position
        limit = self.s.max_script_size if is_script else MAX_STRING
        bound = max(self.s.max_discard, limit) if authenticated else LOGIN_DISCARD
        self._in_literal = True
        self._lit_left = size
        if size <= limit:
            self._lit = bytearray()
            return
        if size > bound:
            raise _Fatal(TOO_LARGE)
        self._lit = None  # counted away
        if is_script:
            self._reply("NO", "QUOTA/MAXSIZE",
                        f"A script is at most {self.s.max_script_size} octets", count=False)
            self._answered = True
        else:
            self._pending_error = self._pending_error or "String too long"
        self._skipping = True  # after the literal, the rest of the command is dropped

    def _take_literal(self) -> bool:
        """Consume literal octets; True once the literal is complete."""
        buf = self._buf
        n = min(len(buf), self._lit_left)
        if self._lit is not None:
            self._lit += buf[:n]
        del buf[:n]
        self._lit_left -= n
        if self._lit_left:
            return False
        self._in_literal = False
        if self._lit is not None:
            self._push(_Tok.STRING, bytes(self._lit))
            self._lit = None
        return True

    def _skip_line(self) -> bool:
        """Drop the rest of a refused command: through its CRLF, and when the dropped line
        announced a literal (``{N+}`` before the CRLF), through that literal too (the line
        after it is the same command's). False until its end is buffered."""
        buf = self._buf
        nl = buf.find(b"\n")
        if nl < 0:
            keep = MAX_NUMBER + 3  # enough to see a literal announcement at the end
            if len(buf) > keep:
                del buf[: len(buf) - keep]
            return False
        line = bytes(buf[: nl + 1])
        del buf[: nl + 1]
        tail = line[:-2] if line.endswith(CRLF) else line[:-1]
        if tail.endswith(b"}"):
            start = tail.rfind(b"{")
            digits = tail[start + 1: -1].removesuffix(b"+") if start >= 0 else b""
            if digits.isdigit() and len(digits) <= MAX_NUMBER:
                size = int(digits)
                bound = max(self.s.max_discard, self.s.max_script_size) \
                    if self.state is State.AUTHENTICATED else LOGIN_DISCARD
                if size > bound:
                    raise _Fatal(TOO_LARGE)
                self._in_literal = True
                self._lit_left = size
                self._lit = None
                return True
        self._skipping = False
        return True

    # ------------------------------------------------------------------ commands

    def _credentials_allowed(self) -> bool:
        return self.tls_active or self.s.allow_plaintext

    def _command(self, toks: list[tuple[_Tok, bytes]]) -> None:
        kind, raw = toks[0]
        if kind is not _Tok.ATOM:
            self._reply("NO", "", "Command name expected")
            return
        name = raw.decode("ascii").upper()
        args = toks[1:]
        if name in ANY_STATE:
            getattr(self, "_cmd_" + name.lower())(args)
        elif name in NOT_AUTHENTICATED_ONLY:
            if self.state is not State.NOT_AUTHENTICATED:
                self._reply("NO", "", f"{name} not allowed now: already logged in")
            else:
                getattr(self, "_cmd_" + name.lower())(args)
        elif name == "UNAUTHENTICATE" and self.s.unauthenticate:
            self._cmd_unauthenticate(args)
        elif name in SCRIPT_COMMANDS:
            if self.state is not State.AUTHENTICATED:
                self._reply("NO", "", f"{name} not allowed now: log in first")
            else:
                self._script_command(name, args)
        else:
            self._reply("NO", "", "Unknown command")

    def _script_command(self, name: str, args: list[tuple[_Tok, bytes]]) -> None:
        types = SCRIPT_COMMANDS[name]
        if len(args) != len(types):
            self._reply("NO", "", f"{name} takes {len(types)} argument(s)")
            return
        values: list[bytes | int] = []
        for (kind, raw), want in zip(args, types, strict=True):
            if want == "s":
                if kind is not _Tok.STRING:
                    self._reply("NO", "", f"{name}: a string argument is expected")
                    return
                values.append(raw)
            else:
                if kind is not _Tok.ATOM or not raw.isdigit() or len(raw) > MAX_NUMBER:
                    self._reply("NO", "", f"{name}: a number argument is expected")
                    return
                values.append(int(raw))
        self._wait = _W.EXECUTE
        self._events.append(Execute(name, tuple(values)))

    def _no_args(self, name: str, args: list[tuple[_Tok, bytes]]) -> bool:
        if args:
            self._reply("NO", "", f"{name} takes no argument")
            return False
        return True

    def _cmd_capability(self, args: list[tuple[_Tok, bytes]]) -> None:
        if self._no_args("CAPABILITY", args):
            self._emit(*self.capabilities())
            self._reply("OK", "", "Capability completed")

    def _cmd_noop(self, args: list[tuple[_Tok, bytes]]) -> None:
        if not args:
            self._reply("OK", "", "Done")
        elif len(args) == 1 and args[0][0] is _Tok.STRING:
            # RFC 5804 §2.15: the string comes back as the TAG response code's argument.
            self._emit(b"OK (TAG " + quote(args[0][1]) + b') "Done"' + CRLF)
        else:
            self._reply("NO", "", "NOOP takes at most one string")

    def _cmd_logout(self, args: list[tuple[_Tok, bytes]]) -> None:
        # RFC 5804 erratum 7825: LOGOUT is answered OK, and nothing after it is read.
        self._reply("OK", "", "Logout completed", count=False)
        self._end()

    def _cmd_starttls(self, args: list[tuple[_Tok, bytes]]) -> None:
        if not self._no_args("STARTTLS", args):
            return
        if self.tls_active:
            self._reply("NO", "", "TLS already active")
        elif not self.s.tls_available:
            self._reply("NO", "", "STARTTLS not available")
        else:
            self._reply("OK", "", "Begin TLS negotiation now", count=False)
            self._reset_reader()  # what was pipelined behind STARTTLS is never executed
            self._wait = _W.TLS
            self._events.append(StartTLS())

    def _cmd_authenticate(self, args: list[tuple[_Tok, bytes]]) -> None:
        if not self._credentials_allowed():
            self._reply("NO", "ENCRYPT-NEEDED", ENCRYPT_NEEDED)
            return
        if not 1 <= len(args) <= 2 or args[0][0] is not _Tok.STRING \
                or (len(args) == 2 and args[1][0] is not _Tok.STRING):
            self._reply("NO", "", "Usage: AUTHENTICATE \"PLAIN\" [initial-response]")
            return
        if args[0][1].upper() != b"PLAIN":
            self._reply("NO", "", "Unsupported authentication mechanism")
            return
        if len(args) == 1:
            self._wait = _W.SASL
            self._emit(b'""' + CRLF)  # the empty PLAIN challenge
            return
        self._plain(args[1][1])

    def _sasl_response(self, toks: list[tuple[_Tok, bytes]]) -> None:
        self._wait = _W.NONE
        if len(toks) != 1 or toks[0][0] is not _Tok.STRING:
            self._reply("NO", "", "A SASL response is one string")
            return
        self._plain(toks[0][1])

    def _plain(self, response: bytes) -> None:
        """One PLAIN response (RFC 4616) by the rules of ``sasl``."""
        decoded = decode_response(response)
        creds = decoded if isinstance(decoded, SaslError) else parse_plain(decoded)
        if isinstance(creds, SaslError):
            code, text = _SASL_ERRORS[creds]
            self._reply("NO", code, text)
            return
        self._wait = _W.CREDENTIALS
        self._events.append(CheckCredentials(creds.authcid, creds.password, "PLAIN"))

    def _cmd_unauthenticate(self, args: list[tuple[_Tok, bytes]]) -> None:
        if not self._no_args("UNAUTHENTICATE", args):
            return
        if self.state is not State.AUTHENTICATED:
            self._reply("NO", "", "UNAUTHENTICATE not allowed now: not logged in")
            return
        self.state = State.NOT_AUTHENTICATED
        self.user = None
        self._reply("OK", "", "Logged out, authenticate again", count=False)
