"""The MTA side of the Sendmail milter protocol (version 6, as Postfix speaks it), sans-I/O.

Why written here: of the Python implementations on PyPI, ``kilter-protocol`` (MPL-2.0,
"planning" status) and ``purepythonmilter`` (Apache-2.0, 0.0.1 alpha) implement only the
filter side; ``miltertest`` (GPL-3.0) has an MTA side, but over a blocking socket, raising
exceptions on bad input and built to test filters, not to face an untrusted one in production.
None gives a bounded, exception-free MTA engine, so this module is one, like the SMTP and POP3
engines: bytes in, typed events out, no sockets or clocks (``policy/milter_client.py`` drives
it over asyncio).

The wire: every packet is a 4-byte big-endian length, then a command byte, then its data
(the length counts the command byte). The filter is a peer we do not trust: a packet longer
than ``MAX_REPLY`` is a ``ProtocolError`` as soon as its length is read (nothing buffered
beyond one packet), and so is any malformed, unknown, unsolicited or un-negotiated reply. After
an error the session is dead: further input is ignored, nothing raises.

The order of a message (``Step``): OPTNEG, CONNECT, HELO, MAIL, RCPT…, DATA, HEADER…, EOH,
BODY…, EOM, then ABORT (next message), QUIT, or QUIT_NC (``new_connection``: the filter forgets
the SMTP client and the next CONNECT starts another on the same filter connection, without a
new OPTNEG). The filter's ``SMFIP_NO*`` flags skip steps (the encoder returns nothing for them),
its ``SMFIP_NR_*`` flags say a step gets no reply: the driver may then send the steps up to the
next one that is answered in one write. The MTA offers only the actions it will honour
(``OFFERED_ACTIONS``), and a modification the filter did not negotiate is a protocol error, not
a silent change of the message.
"""

from __future__ import annotations

import enum
import itertools
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

VERSION = 6
MAX_REPLY = 65536 + 16  # one SMFIR_REPLBODY chunk (≤ 65535 data octets) and its framing
MAX_BODY_CHUNK = 65535  # SMFIC_BODY data, as the protocol's MILTER_CHUNK_SIZE
MAX_MODIFICATIONS = 1024  # per message: a filter cannot make the MTA hold an endless list
MAX_REPLACED_BODY = 64 * 1024 * 1024  # octets of SMFIR_REPLBODY per message

# actions the MTA lets the filter take (SMFIF_*)
ADDHDRS, CHGBODY, ADDRCPT, DELRCPT, CHGHDRS, QUARANTINE, CHGFROM, ADDRCPT_PAR, SETSYMLIST = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x100,
)
OFFERED_ACTIONS = (
    ADDHDRS | CHGBODY | ADDRCPT | DELRCPT | CHGHDRS | QUARANTINE | CHGFROM | ADDRCPT_PAR
    | SETSYMLIST
)

# protocol steps the filter may skip or leave unanswered (SMFIP_*)
NOCONNECT, NOHELO, NOMAIL, NORCPT, NOBODY, NOHDRS, NOEOH, NR_HDR = (
    0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80,
)
NOUNKNOWN, NODATA, SKIP, RCPT_REJ = 0x100, 0x200, 0x400, 0x800
NR_CONN, NR_HELO, NR_MAIL, NR_RCPT, NR_DATA, NR_UNKN, NR_EOH, NR_BODY = (
    0x1000, 0x2000, 0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000,
)
HDR_LEADSPC = 0x100000
# offered: every skip and no-reply flag and SKIP; not RCPT_REJ (we do not send rejected
# recipients), not HDR_LEADSPC (values are sent without their leading space), not larger chunks
OFFERED_PROTOCOL = (
    NOCONNECT | NOHELO | NOMAIL | NORCPT | NOBODY | NOHDRS | NOEOH | NR_HDR | NOUNKNOWN | NODATA
    | SKIP | NR_CONN | NR_HELO | NR_MAIL | NR_RCPT | NR_DATA | NR_UNKN | NR_EOH | NR_BODY
)


class Step(enum.Enum):
    """A step of the conversation: its command byte, skip flag, no-reply flag, macro stage."""

    OPTNEG = (b"O", 0, 0, None)
    CONNECT = (b"C", NOCONNECT, NR_CONN, 0)
    HELO = (b"H", NOHELO, NR_HELO, 1)
    MAIL = (b"M", NOMAIL, NR_MAIL, 2)
    RCPT = (b"R", NORCPT, NR_RCPT, 3)
    DATA = (b"T", NODATA, NR_DATA, 4)
    HEADER = (b"L", NOHDRS, NR_HDR, None)
    EOH = (b"N", NOEOH, NR_EOH, 6)
    BODY = (b"B", NOBODY, NR_BODY, None)
    EOM = (b"E", 0, 0, 5)

    def __init__(self, command: bytes, skip: int, no_reply: int, stage: int | None) -> None:
        self.command = command
        self.skip_flag = skip
        self.no_reply_flag = no_reply
        self.stage = stage
        self.position = 0  # in _ORDER, set below
        self.repeats = False


# the order of one message; RCPT, HEADER and BODY repeat
_ORDER = [Step.OPTNEG, Step.CONNECT, Step.HELO, Step.MAIL, Step.RCPT, Step.DATA, Step.HEADER,
          Step.EOH, Step.BODY, Step.EOM]
_REPEATS = {Step.RCPT, Step.HEADER, Step.BODY}
for _i, _step in enumerate(_ORDER):  # attributes: an Enum member hashes in Python code
    _step.position, _step.repeats = _i, _step in _REPEATS
_MACRO, _ABORT, _QUIT, _QUIT_NC = b"D", b"A", b"Q", b"K"

# ---------------------------------------------------------------------------- replies


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The filter's OPTNEG answer, already intersected with what we offered."""

    version: int
    actions: int
    protocol: int
    macros: Mapping[int, tuple[str, ...]] = field(default_factory=dict)  # stage → names


@dataclass(frozen=True, slots=True)
class Accept:
    """Accept the message; no further steps are sent to this filter for it."""


@dataclass(frozen=True, slots=True)
class Continue:
    """Go on to the next step."""


@dataclass(frozen=True, slots=True)
class Reject:
    """Reject (the MTA chooses the text: 550 5.7.1)."""


@dataclass(frozen=True, slots=True)
class Tempfail:
    """Temporary failure (the MTA chooses the text: 451 4.7.1)."""


@dataclass(frozen=True, slots=True)
class Discard:
    """Accept in the session but drop the message silently."""


@dataclass(frozen=True, slots=True)
class ReplyCode:
    """Reject or tempfail with the filter's own SMTP reply: code 4xx/5xx and the text after it
    (a multi-line reply keeps its CRLFs and the codes of its later lines)."""

    code: int
    text: str


@dataclass(frozen=True, slots=True)
class Skip:
    """Send no more body chunks; go on to end of message."""


@dataclass(frozen=True, slots=True)
class Progress:
    """The filter is still working: wait longer for the same step."""


@dataclass(frozen=True, slots=True)
class Quarantine:
    reason: str


@dataclass(frozen=True, slots=True)
class AddHeader:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    """Change the ``index``-th (1-based) field called ``name``; an empty value deletes it."""

    index: int
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class InsertHeader:
    """Insert a field at position ``index`` (0 = on top)."""

    index: int
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class AddRecipient:
    address: str
    args: str = ""


@dataclass(frozen=True, slots=True)
class DeleteRecipient:
    address: str


@dataclass(frozen=True, slots=True)
class ReplaceBody:
    """One chunk of the new body; consecutive chunks are concatenated."""

    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ChangeSender:
    address: str
    args: str = ""


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The filter broke the protocol; the connection must be closed and the error verdict used."""

    reason: str


Final = Accept | Continue | Reject | Tempfail | Discard | ReplyCode
Modification = (Quarantine | AddHeader | ChangeHeader | InsertHeader | AddRecipient
                | DeleteRecipient | ReplaceBody | ChangeSender)
Reply = Final | Skip | Progress | Modification | Negotiated
Event = Reply | ProtocolError

# the action each modification needs to have been negotiated
_NEEDS: dict[type, int] = {
    Quarantine: QUARANTINE, AddHeader: ADDHDRS, ChangeHeader: CHGHDRS, InsertHeader: ADDHDRS,
    AddRecipient: ADDRCPT, DeleteRecipient: DELRCPT, ReplaceBody: CHGBODY, ChangeSender: CHGFROM,
}


class _Malformed(Exception):
    """Internal: a packet that does not parse; turned into a ProtocolError, never escapes."""


_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")  # controls but TAB (one C-level scan)
_NOT_FOLDING = re.compile("\n(?![ \t])")  # a line break not followed by a space or TAB
_FIELD_NAME = re.compile("[!-9;-~]+")  # printable ASCII but the colon (RFC 5322 ftext)


def _strings(data: bytes, count: int, *, optional: int = 0, folded: int = -1) -> list[str]:
    """``count`` NUL-terminated UTF-8 strings (the last ``optional`` of them may be absent).

    No control characters but TAB; the string at index ``folded`` (a header value) may hold
    line breaks only as folding (CRLF or LF followed by a space or TAB): whatever the filter
    sends is later written into a message or a reply, and must not add lines of its own."""
    if not data.endswith(b"\0") and data:
        raise _Malformed("string not NUL-terminated")
    parts = data[:-1].split(b"\0") if data else []
    if not count - optional <= len(parts) <= count:
        raise _Malformed(f"expected {count} strings, got {len(parts)}")
    out = []
    for i, part in enumerate(parts):
        try:
            text = part.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Malformed("string not UTF-8") from exc
        if i == folded:  # regular expressions: one C-level scan each, not a loop per line
            text_check = text.replace("\r\n", "\n")
            if _NOT_FOLDING.search(text_check):
                raise _Malformed("line break in a header value that is not folding")
            text_check = text_check.replace("\n", "")
        else:
            text_check = text
        if _CONTROL.search(text_check):
            raise _Malformed("control character in string")
        out.append(text)
    return out + [""] * (count - len(parts))


def _header(data: bytes) -> tuple[str, str]:
    name, value = _strings(data, 2, folded=1)
    if _FIELD_NAME.fullmatch(name) is None:
        raise _Malformed("bad header field name")
    return name, value


def _index(data: bytes) -> tuple[int, bytes]:
    if len(data) < 4:
        raise _Malformed("short index")
    return struct.unpack(">I", data[:4])[0], data[4:]


def _reply_code(data: bytes) -> ReplyCode:
    _strings(data.replace(b"\r\n", b" "), 1)  # the checks, with CRLF (a line break) allowed
    text = data[:-1].decode("utf-8")
    code = text[:3]
    well_formed = len(code) == 3 and code.isascii() and code.isdigit()
    if not (well_formed and code[0] in "45" and text[3:4] in ("", " ", "-")):
        raise _Malformed("reply code not 4xx/5xx")
    return ReplyCode(int(code), text[4:])


def _optneg(data: bytes) -> Negotiated:
    if len(data) < 12:
        raise _Malformed("short OPTNEG")
    version, actions, protocol = struct.unpack(">III", data[:12])
    rest, macros = data[12:], {}
    while rest:
        stage, rest = _index(rest)
        end = rest.find(b"\0")
        if stage > 6 or end < 0:
            raise _Malformed("bad macro list in OPTNEG")
        (names,) = _strings(rest[: end + 1], 1)
        macros[stage] = tuple(n for n in names.split() if n)
        rest = rest[end + 1:]
    return Negotiated(version, actions, protocol, macros)


_NO_DATA: dict[bytes, Reply] = {
    b"a": Accept(), b"c": Continue(), b"r": Reject(), b"t": Tempfail(), b"d": Discard(),
    b"s": Skip(), b"p": Progress(),
}


_DECODERS: dict[bytes, Callable[[bytes], Reply]] = {
    b"y": _reply_code,
    b"q": lambda d: Quarantine(*_strings(d, 1)),
    b"+": lambda d: AddRecipient(*_strings(d, 1)),
    b"2": lambda d: AddRecipient(*_strings(d, 2, optional=1)),
    b"-": lambda d: DeleteRecipient(*_strings(d, 1)),
    b"e": lambda d: ChangeSender(*_strings(d, 2, optional=1)),
    b"b": ReplaceBody,
    b"O": _optneg,
}


def _decode(command: bytes, data: bytes) -> Reply:
    """One reply packet to its event; ``_Malformed`` for anything else."""
    if command in _NO_DATA:
        if data:
            raise _Malformed("data after a reply that takes none")
        return _NO_DATA[command]
    if command in (b"m", b"i"):
        index, rest = _index(data)
        return (ChangeHeader if command == b"m" else InsertHeader)(index, *_header(rest))
    if command == b"h":
        return AddHeader(*_header(data))
    decoder = _DECODERS.get(command)
    if decoder is not None:
        return decoder(data)
    raise _Malformed(f"unknown reply {command!r}")


class ReplyDecoder:
    """Frames and decodes the filter's packets. Holds at most one incomplete packet
    (≤ ``MAX_REPLY`` + 4 octets); the first error is final and later bytes are ignored."""

    __slots__ = ("_buffer", "failed", "max_packet")

    def __init__(self, max_packet: int = MAX_REPLY) -> None:
        self._buffer = bytearray()
        self.max_packet = max_packet
        self.failed = False

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Event]:
        if self.failed:
            return []
        self._buffer += data
        events: list[Event] = []
        while len(self._buffer) >= 4:
            (length,) = struct.unpack(">I", self._buffer[:4])
            if not 1 <= length <= self.max_packet:
                return self._fail(events, f"packet length {length} out of bounds")
            if len(self._buffer) < 4 + length:
                break
            command, payload = bytes(self._buffer[4:5]), bytes(self._buffer[5:4 + length])
            del self._buffer[:4 + length]
            try:
                events.append(_decode(command, payload))
            except _Malformed as exc:
                return self._fail(events, f"{command!r}: {exc}")
        return events

    def _fail(self, events: list[Event], reason: str) -> list[Event]:
        self.failed = True
        self._buffer.clear()
        events.append(ProtocolError(reason))
        return events


# ---------------------------------------------------------------------------- commands


def parse_address(address: str) -> tuple[str, str, int]:
    """``inet:host:port`` → ("inet", host, port); ``unix:/path`` → ("unix", path, 0)."""
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        return ("unix", rest, 0)
    if kind in ("inet", "inet6") and rest:
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return ("inet", host, int(port))
    raise ValueError(f"milter address must be inet:HOST:PORT or unix:/path, not {address!r}")



def packet(command: bytes, data: bytes = b"") -> bytes:
    """Frame one packet: length (command byte included), command, data."""
    return struct.pack(">I", len(data) + 1) + command + data


def _z(*parts: str) -> bytes:
    """NUL-terminated strings; a NUL inside one is refused (it would split the field)."""
    if not parts:
        return b""
    joined = "\0".join(parts)
    if joined.count("\0") != len(parts) - 1:
        raise ValueError("NUL in a milter string")
    return joined.encode("utf-8", "surrogateescape") + b"\0"


def encode_optneg(actions: int = OFFERED_ACTIONS, protocol: int = OFFERED_PROTOCOL) -> bytes:
    return packet(b"O", struct.pack(">III", VERSION, actions, protocol))


def encode_connect(hostname: str, family: str, port: int = 0, address: str = "") -> bytes:
    """``family``: "4", "6", "L" (unix socket) or "U" (unknown: no port or address)."""
    if family not in ("4", "6", "L", "U"):
        raise ValueError(f"bad family {family!r}")
    data = _z(hostname) + family.encode()
    if family != "U":
        data += struct.pack(">H", port) + _z(address)
    return packet(b"C", data)


def encode_macros(command: bytes, macros: Mapping[str, str]) -> bytes:
    return packet(_MACRO, command + _z(*itertools.chain.from_iterable(macros.items())))


def encode_helo(name: str) -> bytes:
    return packet(b"H", _z(name))


def encode_mail(address: str, args: Sequence[str] = ()) -> bytes:
    return packet(b"M", _z(f"<{address}>", *args))


def encode_rcpt(address: str, args: Sequence[str] = ()) -> bytes:
    return packet(b"R", _z(f"<{address}>", *args))


def encode_header(name: str, value: str) -> bytes:
    return packet(b"L", _z(name, value))


def encode_body(chunk: bytes) -> bytes:
    if len(chunk) > MAX_BODY_CHUNK:
        raise ValueError("body chunk over 65535 octets")
    return packet(b"B", chunk)


def encode_simple(command: bytes) -> bytes:
    """DATA (T), EOH (N), EOM (E), ABORT (A), QUIT (Q), QUIT_NC (K): no data."""
    return packet(command)


# ---------------------------------------------------------------------------- session


class MilterSession:
    """One connection to one filter, one message at a time.

    Each step method returns the bytes to send, or ``b""`` when the filter negotiated the
    step away (then no reply is awaited). After sending, if ``awaiting`` is true, feed the
    filter's bytes to ``receive`` until ``done`` is true: the events say what it decided. A
    step called out of order is the caller's bug and raises ``RuntimeError``; nothing the
    filter sends raises.
    """

    def __init__(self, *, actions: int = OFFERED_ACTIONS, protocol: int = OFFERED_PROTOCOL,
                 max_modifications: int = MAX_MODIFICATIONS,
                 max_replaced_body: int = MAX_REPLACED_BODY) -> None:
        self.offered_actions = actions
        self.offered_protocol = protocol
        self.negotiated: Negotiated | None = None
        self.max_modifications = max_modifications
        self.max_replaced_body = max_replaced_body
        self._decoder = ReplyDecoder()
        self._step: Step | None = None  # last step sent
        self._awaiting: Step | None = None  # step whose reply is awaited
        self._modifications = 0
        self._replaced = 0
        self.skip_body = False
        self.error: str | None = None
        self._wanted: dict[int, frozenset[str]] = {}  # stage → the macro names it asked for

    @property
    def awaiting(self) -> bool:
        return self._awaiting is not None and self.error is None

    @property
    def done(self) -> bool:
        """The awaited reply has come (or the session failed): time for the next step."""
        return not self.awaiting

    # -- steps

    def start(self) -> bytes:
        self._advance(Step.OPTNEG)
        self._awaiting = Step.OPTNEG
        return encode_optneg(self.offered_actions, self.offered_protocol)

    def connect(self, hostname: str, family: str, port: int = 0, address: str = "",
                macros: Mapping[str, str] | None = None) -> bytes:
        return self._send(Step.CONNECT, encode_connect(hostname, family, port, address), macros)

    def helo(self, name: str, macros: Mapping[str, str] | None = None) -> bytes:
        return self._send(Step.HELO, encode_helo(name), macros)

    def mail(self, address: str, args: Sequence[str] = (),
             macros: Mapping[str, str] | None = None) -> bytes:
        self._modifications = self._replaced = 0
        self.skip_body = False
        return self._send(Step.MAIL, encode_mail(address, args), macros)

    def rcpt(self, address: str, args: Sequence[str] = (),
             macros: Mapping[str, str] | None = None) -> bytes:
        return self._send(Step.RCPT, encode_rcpt(address, args), macros)

    def data(self, macros: Mapping[str, str] | None = None) -> bytes:
        return self._send(Step.DATA, encode_simple(b"T"), macros)

    def header(self, name: str, value: str) -> bytes:
        return self._send(Step.HEADER, encode_header(name, value), None)

    def headers(self, fields: Sequence[tuple[str, str]]) -> bytes:
        """Every header field at once, for a filter that answers none of them (``NR_HDR``)
        or skips them: one call instead of a step each (``header`` otherwise)."""
        if not fields:
            return b""
        if not (self.skips(Step.HEADER) or self._has(NR_HDR)):
            raise RuntimeError("each header is answered: send them one at a time")
        self._advance(Step.HEADER)
        if self.skips(Step.HEADER):
            return b""
        return b"".join([encode_header(name, value) for name, value in fields])

    def end_of_headers(self, macros: Mapping[str, str] | None = None) -> bytes:
        return self._send(Step.EOH, encode_simple(b"N"), macros)

    def body(self, chunk: bytes) -> bytes:
        if self.skip_body or self.skips(Step.BODY):
            self._advance(Step.BODY)
            return b""
        return self._send(Step.BODY, encode_body(chunk), None)

    def end_of_message(self, macros: Mapping[str, str] | None = None) -> bytes:
        return self._send(Step.EOM, encode_simple(b"E"), macros)

    def abort(self) -> bytes:
        """End this message (after EOM or midway); the connection may carry the next MAIL."""
        self._check_idle()
        self._step, self._awaiting = Step.HELO, None
        return encode_simple(_ABORT)

    def quit(self) -> bytes:
        self._awaiting = None
        return encode_simple(_QUIT)

    def new_connection(self) -> bytes:
        """QUIT_NC after a finished message: the filter closes its view of this SMTP client
        and keeps the milter connection (and what OPTNEG settled) for a CONNECT of another.
        Only after EOM: Sendmail's libmilter accepts it there and ignores it (and then the
        CONNECT after it) anywhere else."""
        self._check_idle()
        if self._step is not Step.EOM:
            raise RuntimeError(f"QUIT_NC after {self._step.name if self._step else 'nothing'}")
        self._step = Step.OPTNEG
        return encode_simple(_QUIT_NC)

    # -- replies

    def receive(self, data: bytes) -> list[Event]:
        """Decode the filter's bytes; every event is legal at this step or a ProtocolError."""
        if self.error is not None:
            return []
        out: list[Event] = []
        for event in self._decoder.feed(data):
            checked = self._check(event)
            out.append(checked)
            if isinstance(checked, ProtocolError):
                self.error = checked.reason
                break
        return out

    def _check(self, event: Event) -> Event:
        if isinstance(event, ProtocolError):
            return event
        step = self._awaiting
        if step is None:
            return ProtocolError(f"unsolicited {type(event).__name__}")
        if step is Step.OPTNEG:
            return self._negotiate(event)
        if isinstance(event, Negotiated):
            return ProtocolError("OPTNEG after negotiation")
        if isinstance(event, Progress):
            return event
        if isinstance(event, Skip):
            if step is not Step.BODY or not self._has(SKIP):
                return ProtocolError("SKIP outside the body or not negotiated")
            self.skip_body = True
            self._awaiting = None
            return event
        if type(event) in _NEEDS:
            return self._modification(step, event)
        self._awaiting = None  # a final reply ends the step
        return event

    def _negotiate(self, event: Event) -> Event:
        if not isinstance(event, Negotiated):
            return ProtocolError(f"{type(event).__name__} instead of OPTNEG")
        if event.version < 2 or event.version > VERSION:
            return ProtocolError(f"unsupported milter version {event.version}")
        if event.macros and not event.actions & SETSYMLIST & self.offered_actions:
            return ProtocolError("macro lists without SETSYMLIST")
        negotiated = Negotiated(
            event.version, event.actions & self.offered_actions,
            event.protocol & self.offered_protocol, dict(event.macros),
        )
        self.negotiated = negotiated
        self._awaiting = None
        return negotiated

    def _modification(self, step: Step, event: Event) -> Event:
        if step is not Step.EOM:
            return ProtocolError(f"{type(event).__name__} before end of message")
        if not self._has_action(_NEEDS[type(event)]):
            return ProtocolError(f"{type(event).__name__} not negotiated")
        self._modifications += 1
        if self._modifications > self.max_modifications:
            return ProtocolError("too many modifications")
        if isinstance(event, ReplaceBody):
            self._replaced += len(event.data)
            if self._replaced > self.max_replaced_body:
                return ProtocolError("replaced body too large")
        return event

    # -- helpers

    def _has(self, flag: int) -> bool:
        return self.negotiated is not None and bool(self.negotiated.protocol & flag)

    def _has_action(self, flag: int) -> bool:
        return self.negotiated is not None and bool(self.negotiated.actions & flag)

    def answers(self, step: Step) -> bool:
        """The filter replies to this step (it did not negotiate ``SMFIP_NR_*`` for it)."""
        return not self._has(step.no_reply_flag)

    def skips(self, step: Step) -> bool:
        """The filter negotiated this step away."""
        return bool(step.skip_flag) and self._has(step.skip_flag)

    def _check_idle(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"milter session failed: {self.error}")
        if self._awaiting is not None:
            raise RuntimeError(f"reply to {self._awaiting.name} still awaited")
        if self.negotiated is None and self._step is not None:
            raise RuntimeError("not negotiated")

    def _advance(self, step: Step) -> None:
        self._check_idle()
        last = self._step
        if step is Step.OPTNEG:
            if last is not None:
                raise RuntimeError("OPTNEG sent twice")
        else:
            if last is None:
                raise RuntimeError("OPTNEG first")
            here, before = step.position, last.position
            if not (here > before or (here == before and step.repeats)):
                raise RuntimeError(f"{step.name} after {last.name}")
            if step is Step.DATA and last is not Step.RCPT:
                raise RuntimeError("DATA needs a recipient")
            if step in (Step.RCPT, Step.HEADER) and before < here - 1:
                raise RuntimeError(f"{step.name} after {last.name}")
        self._step = step

    def _send(self, step: Step, command: bytes, macros: Mapping[str, str] | None) -> bytes:
        self._advance(step)
        if self.skips(step):
            return b""
        out = b""
        if macros and step.stage is not None:
            wanted = self.negotiated.macros.get(step.stage) if self.negotiated else None
            if wanted is not None:
                names = self._wanted.get(step.stage)
                if names is None:  # once per negotiation, not per step and message
                    names = self._wanted[step.stage] = frozenset(n.strip("{}") for n in wanted)
                macros = {k: v for k, v in macros.items() if k.strip("{}") in names}
            if macros:
                out += encode_macros(step.command, macros)
        if not self._has(step.no_reply_flag):
            self._awaiting = step
        return out + command
