"""The IMAP command reader: client bytes in, parsed commands out (RFC 9051 §9, RFC 3501).

This is the input half of the IMAP engine, sans-I/O like the SMTP and POP3 engines: the
driver feeds octets with ``feed`` and pulls events with ``next_event``; no sockets, clocks or
disk. It knows the *syntax* of what clients send, not what a command means: answering is
the engine's business.

Why a reader of its own and not ``lines.LineReader``: an IMAP command is not one line. It
is a line that may end in a literal announcement (``{N}``, ``{N+}`` LITERAL+, ``~{N}``
BINARY), then N raw octets, then the rest of the command, and so on. Whoever splits the
stream must know where each literal starts and ends, or literal octets get read as commands
(the smuggling class ``lines.py`` closes for SMTP). The line rule is the same as there: a
line ends with CRLF only, a bare CR or LF or a NUL in a line is refused.

Limits (``Limits``), each refused before it costs memory:

* ``max_line``: octets of one command *outside* its literals, CRLFs included, summed over
  all the lines of the command (8 KiB, as Dovecot): many small literals cannot make a
  command unbounded. Reported as soon as the limit is reached, without waiting for an LF.
* ``max_literal`` / ``max_append``: the size announced by ``{N}`` is checked when the
  announcement arrives, *before* any literal octet is buffered; APPEND has its own (larger)
  limit, every other command the small one (a password, a SEARCH string). The sum of the
  literals of one command is held to the same limit. A synchronising literal is accepted
  with ``ContinuationRequest`` only after the check (and after the tag and command name
  were found valid); refused, the client never sends it. The rest of the syntax is judged
  when the command is complete, so a command may get its ``+`` and still end in BAD.
* Non-synchronising literals (``{N+}``, LITERAL+, RFC 7888 §3) are held to the same limits
  as synchronising ones (``max_nonsync_literal`` None); a number there is LITERAL-'s bound
  (§4: over it, tagged BAD ``[TOOBIG]``). Such a literal arrives unasked, so a refusal
  (over the limit, or an APPEND over ``max_append``: NO ``[TOOBIG]``, RFC 7889) must skip
  its N octets to stay in step: they are counted away, never buffered, so an APPEND
  ``{N+}`` over APPENDLIMIT costs no memory. Up to ``max_discard`` octets only: over it the
  error is ``fatal`` and the engine says BYE rather than read on (a client that sends more
  than that past a limit it was told is not one that will recover; reading on would hold
  the session and the link for nothing).
* ``max_depth`` (nested lists and SEARCH parentheses/NOT/OR), ``max_ranges`` (ranges in
  all sequence sets of a command), ``max_search_keys`` (keys of one SEARCH).

Every error names the tag when the reader could read one (``tag BAD``), else None
(``* BAD``), and the reader then resumes at the start of the next command, skipping the
rest of the failed one *including its literals*, so that no literal octet is ever taken as
a command.

Events and what the engine does with them:

* ``ContinuationRequest``: write ``+ OK`` (any text) so the client sends its literal.
* ``Command``: answer it. ``args`` holds typed values, per command (see ``Command``).
* ``ParseError``: write ``tag BAD [code] text`` (``NO`` when ``status`` says so; ``*`` when
  ``tag`` is None); close the connection after it when ``fatal``.
* ``IdleDone`` after ``expect_done()`` (sent after ``+ idling``): end IDLE with the IDLE
  command's tagged OK, or BAD when ``valid`` is false.
* ``SaslResponse`` after ``expect_sasl_response()`` (sent after a ``+ challenge``): the raw
  line for ``sasl.decode_response``; ``line`` None when the line was refused (too long,
  bare LF): fail the AUTHENTICATE with a tagged BAD.

The engine must call ``expect_done``/``expect_sasl_response`` before it pulls the next
event, and ``clear`` at STARTTLS (pipelined plaintext is discarded). Memory: the driver
feeds only after ``next_event`` returned None; then the buffer holds at most one unfinished
command, bounded by ``max_line`` plus the literal limit plus one read.
"""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass, field
from typing import Literal as TypingLiteral

from mailfort.protocol.sasl import MAX_SASL_LINE

CRLF = b"\r\n"


# ---------------------------------------------------------------------------- limits


@dataclass(frozen=True, slots=True)
class Limits:
    """Every bound of the reader; the engine may swap in others (e.g. before login)."""

    max_line: int = 8192  # octets outside literals per command, CRLFs included
    max_literal: int = 65536  # one literal, and all of a command, outside APPEND
    max_append: int = 50 * 1024 * 1024  # the APPEND message (the engine's APPENDLIMIT)
    max_nonsync_literal: int | None = None  # None: LITERAL+; 4096: LITERAL- (RFC 7888 §4)
    max_discard: int = 64 * 1024 * 1024  # a refused {N+} larger than this ends the session
    max_depth: int = 16  # nested parentheses, NOT/OR in SEARCH
    max_ranges: int = 2000  # ranges in all sequence sets of one command
    max_search_keys: int = 256  # keys in one SEARCH
    max_sasl_line: int = MAX_SASL_LINE  # an AUTHENTICATE response line
    max_idle_line: int = 64  # the line that ends IDLE ("DONE")
    # Commands whose literals are refused at the announcement, before the "+" that would
    # let the client send them: LOGIN before TLS, whose literal is a password.
    refused_literals: frozenset[str] = frozenset()
    refused_literal_reply: tuple[str, str] = ("NO", "PRIVACYREQUIRED")  # status, code


# ---------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Atom:
    """An atom as sent (case kept; the engine compares IMAP keywords case-insensitively)."""

    value: str


@dataclass(frozen=True, slots=True)
class Quoted:
    value: bytes


@dataclass(frozen=True, slots=True)
class LiteralBytes:
    """A literal's octets; ``binary`` for ``~{N}`` (RFC 3516: NUL allowed)."""

    data: bytes = field(repr=False)
    binary: bool = False


@dataclass(frozen=True, slots=True)
class Secret:
    """A password or SASL initial response: kept out of reprs and logs."""

    value: bytes = field(repr=False)


Value = Atom | Quoted | LiteralBytes | None | tuple  # None is NIL; tuple a parenthesised list


@dataclass(frozen=True, slots=True)
class SequenceSet:
    """Ranges as sent, ``None`` for ``*``; a single number is a range (n, n).

    ``saved`` is ``$`` (RFC 5182 SEARCHRES): the result the last ``SEARCH RETURN (SAVE)``
    kept; it stands alone, with no ranges."""

    ranges: tuple[tuple[int | None, int | None], ...]
    saved: bool = False


@dataclass(frozen=True, slots=True)
class Section:
    """``BODY[1.2.HEADER.FIELDS (From To)]``: part (1, 2), text "HEADER.FIELDS", fields."""

    part: tuple[int, ...] = ()
    text: str | None = None  # HEADER, HEADER.FIELDS, HEADER.FIELDS.NOT, TEXT, MIME
    fields: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FetchAtt:
    """One FETCH item: ``name`` upper-cased (BODY, BODY.PEEK, BINARY, FLAGS, UID, …)."""

    name: str
    section: Section | None = None  # present for BODY[…], BINARY[…] and their PEEK forms
    partial: tuple[int, int] | None = None  # <start.count>


@dataclass(frozen=True, slots=True)
class SearchKey:
    """A SEARCH key tree: ``AND``/``OR``/``NOT`` have children; leaves have args.

    Leaves: ``ALL``, ``SEEN`` …; ``FROM`` (bytes,); ``HEADER`` (name, bytes); ``SINCE``
    (date,); ``LARGER`` (int,); ``UID`` (SequenceSet,); ``SEQSET`` (SequenceSet,);
    ``KEYWORD`` (str,); ``MODSEQ`` (int,) or (entry, type, int); ``OLDER`` (int,).
    """

    name: str
    args: tuple[object, ...] = ()
    children: tuple[SearchKey, ...] = ()


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class ContinuationRequest:
    """Write ``+ …`` now: the client waits for it before sending its literal."""


@dataclass(frozen=True, slots=True)
class Command:
    """A complete command. ``name`` is upper-case; ``uid`` for the ``UID`` prefix.

    ``args`` per command (mailbox names are ``str``, INBOX in any case is ``"INBOX"``;
    other astrings ``bytes``):

    * CAPABILITY NOOP LOGOUT STARTTLS CLOSE UNSELECT EXPUNGE IDLE NAMESPACE CHECK: ()
    * LOGIN: (user bytes, Secret)        AUTHENTICATE: (mechanism str, Secret | None)
    * ENABLE: (capability str, …)        ID: None or ((key bytes, value bytes|None), …)
    * SELECT EXAMINE CREATE: (mailbox, params tuple)   DELETE SUBSCRIBE UNSUBSCRIBE
      GETQUOTAROOT: (mailbox,)           RENAME: (old, new)     GETQUOTA: (root bytes,)
    * LIST: (selection options (str, …), reference, patterns (str, …), return options
      tuple of values)                   LSUB: (reference, pattern)
    * STATUS: (mailbox, (item str, …))
    * APPEND: (mailbox, flags (str, …), datetime | None, LiteralBytes)
    * SEARCH: (return options (str, …) or None, charset str | None, SearchKey "AND")
    * FETCH: (SequenceSet, (FetchAtt, …), modifiers tuple)
    * STORE: (SequenceSet, modifiers tuple, action "FLAGS"/"+FLAGS"/"-FLAGS", silent bool,
      flags (str, …))
    * COPY MOVE: (SequenceSet, mailbox)  UID EXPUNGE: (SequenceSet,)
    """

    tag: str
    name: str
    uid: bool
    args: tuple[object, ...]


@dataclass(frozen=True, slots=True)
class ParseError:
    """Answer ``tag status [code] text`` (``*`` if no tag); close afterwards if ``fatal``."""

    tag: str | None
    text: str
    code: str | None = None  # "TOOBIG" for the size limits, else None
    status: TypingLiteral["BAD", "NO"] = "BAD"
    fatal: bool = False


@dataclass(frozen=True, slots=True)
class IdleDone:
    """The line after IDLE: ``valid`` if it was DONE."""

    valid: bool


@dataclass(frozen=True, slots=True)
class SaslResponse:
    """One AUTHENTICATE response line, raw; None when the line itself was refused."""

    line: bytes | None = field(repr=False)


Event = ContinuationRequest | Command | ParseError | IdleDone | SaslResponse


class _Fail(Exception):
    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.text, self.code = text, code


# ---------------------------------------------------------------------------- characters

_CTL = set(range(0x00, 0x20)) | {0x7F}
_ATOM_SPECIALS = set(b'(){ %*"\\]') | _CTL
ATOM_CHARS = frozenset(c for c in range(0x01, 0x80) if c not in _ATOM_SPECIALS)
ASTRING_CHARS = ATOM_CHARS | {ord("]")}
TAG_CHARS = ASTRING_CHARS - {ord("+")}
LIST_CHARS = ATOM_CHARS | {ord("%"), ord("*"), ord("]")}
_DIGITS = frozenset(b"0123456789")
_MONTHS = {m: i + 1 for i, m in enumerate(
    ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"))}

NO_ARGS = frozenset({"CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "CLOSE", "UNSELECT",
                     "EXPUNGE", "IDLE", "NAMESPACE", "CHECK"})
UID_COMMANDS = frozenset({"FETCH", "STORE", "COPY", "MOVE", "SEARCH", "EXPUNGE"})
STATUS_ITEMS = frozenset({"MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "DELETED", "SIZE",
                          "RECENT", "HIGHESTMODSEQ", "APPENDLIMIT", "MAILBOXID"})
FETCH_SIMPLE = frozenset({"ENVELOPE", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "RFC822",
                          "RFC822.HEADER", "RFC822.TEXT", "BODY", "BODYSTRUCTURE", "UID",
                          "MODSEQ", "EMAILID", "THREADID", "SAVEDATE", "X-GM-MSGID"})
FETCH_MACROS = frozenset({"ALL", "FAST", "FULL"})
SEARCH_FLAGS = frozenset({"ALL", "ANSWERED", "DELETED", "FLAGGED", "SEEN", "DRAFT", "NEW",
                          "OLD", "RECENT", "UNANSWERED", "UNDELETED", "UNFLAGGED", "UNSEEN",
                          "UNDRAFT"})
SEARCH_ASTRING = frozenset({"BCC", "BODY", "CC", "FROM", "SUBJECT", "TEXT", "TO"})
SEARCH_DATE = frozenset({"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"})
SEARCH_NUMBER = frozenset({"LARGER", "SMALLER", "OLDER", "YOUNGER"})
SEARCH_RETURN = frozenset({"MIN", "MAX", "ALL", "COUNT", "SAVE"})


# ---------------------------------------------------------------------------- the parser


class _Cursor:
    """Recursive descent over one complete command: its lines and the literals between.

    ``lines[i]`` had its literal announcement cut off; ``lits[i]`` is that literal. So the
    end of any line but the last is exactly where a literal stands.
    """

    def __init__(self, lines: list[bytes], lits: list[LiteralBytes], limits: Limits) -> None:
        self.lines, self.lits, self.limits = lines, lits, limits
        self.i = 0
        self.p = 0
        self.ranges = 0
        self.keys = 0

    # -- primitives

    @property
    def line(self) -> bytes:
        return self.lines[self.i]

    def peek(self) -> int | None:
        """The next octet, or None at the end of a line (a literal, or the end)."""
        return self.line[self.p] if self.p < len(self.line) else None

    def at_literal(self) -> bool:
        return self.p >= len(self.line) and self.i < len(self.lines) - 1

    def at_end(self) -> bool:
        return self.p >= len(self.line) and self.i == len(self.lines) - 1

    def take(self, char: bytes) -> bool:
        if self.line[self.p:self.p + 1] == char:
            self.p += 1
            return True
        return False

    def expect(self, char: bytes, what: str) -> None:
        if not self.take(char):
            raise _Fail(f"expected {what}")

    def sp(self) -> None:
        self.expect(b" ", "a space")

    def run(self, chars: frozenset[int]) -> bytes:
        start = self.p
        line = self.line
        while self.p < len(line) and line[self.p] in chars:
            self.p += 1
        return line[start:self.p]

    def literal(self) -> LiteralBytes:
        lit = self.lits[self.i]
        self.i += 1
        self.p = 0
        return lit

    # -- strings and atoms

    def atom(self, what: str = "an atom") -> str:
        raw = self.run(ATOM_CHARS)
        if not raw:
            raise _Fail(f"expected {what}")
        return raw.decode("ascii")

    def quoted(self) -> bytes:
        self.expect(b'"', "a quoted string")
        line, out = self.line, bytearray()
        while self.p < len(line):
            c = line[self.p]
            self.p += 1
            if c == 0x22:
                return bytes(out)
            if c == 0x5C:
                if self.p >= len(line) or line[self.p] not in (0x22, 0x5C):
                    raise _Fail("bad escape in quoted string")
                c = line[self.p]
                self.p += 1
            out.append(c)
        raise _Fail("unterminated quoted string")

    def string(self, binary_ok: bool = False) -> bytes | LiteralBytes:
        """A quoted string (bytes) or a literal (LiteralBytes)."""
        if self.peek() == 0x22:
            return self.quoted()
        if self.at_literal():
            lit = self.literal()
            if lit.binary and not binary_ok:
                raise _Fail("literal8 not allowed here")
            return lit
        raise _Fail("expected a string")

    def astring(self) -> bytes:
        if self.peek() == 0x22 or self.at_literal():
            s = self.string()
            return s.data if isinstance(s, LiteralBytes) else s
        raw = self.run(ASTRING_CHARS)
        if not raw:
            raise _Fail("expected an astring")
        return raw

    def nstring(self) -> bytes | None:
        if self.peek() in (0x4E, 0x6E) and self.line[self.p:self.p + 3].upper() == b"NIL":
            self.p += 3
            return None
        s = self.string()
        return s.data if isinstance(s, LiteralBytes) else s

    def mailbox(self) -> str:
        return _mailbox_name(self.astring())

    def list_mailbox(self) -> str:
        if self.peek() == 0x22 or self.at_literal():
            raw = self.astring()
        else:
            raw = self.run(LIST_CHARS)
            if not raw:
                raise _Fail("expected a mailbox pattern")
        return _mailbox_name(raw)

    # -- numbers, sets, dates

    def number(self, nonzero: bool = False, digits: int = 10) -> int:
        raw = self.run(_DIGITS)
        if not raw:
            raise _Fail("expected a number")
        if len(raw) > digits:
            raise _Fail("number too large")
        n = int(raw)
        if n > (0xFFFFFFFF if digits == 10 else 2**63 - 1) or (nonzero and n == 0):
            raise _Fail("number out of range")
        return n

    def seq_number(self) -> int | None:
        if self.take(b"*"):
            return None
        return self.number(nonzero=True)

    def sequence_set(self) -> SequenceSet:
        ranges = []
        if self.take(b"$"):
            self.ranges += 1
            return SequenceSet((), saved=True)
        while True:
            self.ranges += 1
            if self.ranges > self.limits.max_ranges:
                raise _Fail("too many ranges in sequence sets", "LIMIT")
            lo = self.seq_number()
            hi = self.seq_number() if self.take(b":") else lo
            ranges.append((lo, hi))
            if not self.take(b","):
                return SequenceSet(tuple(ranges))

    def date(self) -> datetime.date:
        """``d-Mon-yyyy``, bare or quoted (RFC 9051 date)."""
        raw = self.quoted() if self.peek() == 0x22 else self.run(ATOM_CHARS)
        parts = raw.split(b"-")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[2].isdigit() \
                or len(parts[0]) > 2 or len(parts[2]) != 4:
            raise _Fail("bad date")
        month = _MONTHS.get(parts[1].decode("ascii", "replace").upper())
        try:
            return datetime.date(int(parts[2]), month or 0, int(parts[0]))
        except ValueError:
            raise _Fail("bad date") from None

    def date_time(self) -> datetime.datetime:
        """``"dd-Mon-yyyy hh:mm:ss +zzzz"`` (day may be space-padded)."""
        raw = self.quoted()
        if len(raw) != 26 or raw[2:3] != b"-" or raw[6:7] != b"-" or raw[11:12] != b" " \
                or raw[20:21] != b" " or raw[21:22] not in (b"+", b"-"):
            raise _Fail("bad date-time")
        try:
            day = int(raw[0:2].lstrip(b" ") or b"x")
            month = _MONTHS[raw[3:6].decode("ascii").upper()]
            year, zone = int(raw[7:11]), raw[22:26]
            hh, mm, ss = (int(x) for x in raw[12:20].split(b":"))
            if not (raw[7:11] + raw[12:14] + raw[15:17] + raw[18:20] + zone).isdigit():
                raise ValueError
            offset = datetime.timedelta(hours=int(zone[:2]), minutes=int(zone[2:]))
            if raw[21:22] == b"-":
                offset = -offset
            return datetime.datetime(year, month, day, hh, mm, ss,
                                     tzinfo=datetime.timezone(offset))
        except (ValueError, KeyError):
            raise _Fail("bad date-time") from None

    # -- lists

    def plist(self, item, depth: int = 1) -> tuple:  # type: ignore[no-untyped-def]
        """``(item *(SP item))``, possibly empty; ``item`` parses one element."""
        if depth > self.limits.max_depth:
            raise _Fail("lists nested too deep", "LIMIT")
        self.expect(b"(", "(")
        out = []
        if not self.take(b")"):
            while True:
                out.append(item())
                if self.take(b")"):
                    break
                self.sp()
        return tuple(out)

    def value(self, depth: int = 1) -> Value:
        """Any value: for parameters whose grammar belongs to extensions (modifiers …)."""
        c = self.peek()
        if c == 0x28:
            return self.plist(lambda: self.value(depth + 1), depth)
        if c == 0x22:
            return Quoted(self.quoted())
        if self.at_literal():
            return self.literal()
        raw = self.run(ASTRING_CHARS | {ord("%"), ord("*"), ord("\\")})
        if not raw:
            raise _Fail("expected a value")
        if raw.upper() == b"NIL":
            return None
        return Atom(raw.decode("ascii"))

    def flag(self) -> str:
        if self.take(b"\\"):
            if self.take(b"*"):
                return "\\*"
            return "\\" + self.atom("a flag")
        return self.atom("a flag")

    def end(self) -> None:
        if not self.at_end():
            raise _Fail("unexpected characters at end of command")


def _mailbox_name(raw: bytes) -> str:
    """UTF-8 (RFC 9051 §5.1; modified UTF-7 is ASCII and passes); INBOX in any case."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Fail("mailbox name is not UTF-8") from None
    return "INBOX" if name.upper() == "INBOX" else name


# ---------------------------------------------------------------------------- grammar


def _parse_fetch_att(c: _Cursor) -> FetchAtt:
    name = c.run(frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-"))
    upper = name.decode("ascii").upper()
    if not upper:
        raise _Fail("expected a fetch item")
    if c.peek() != 0x5B:  # "["
        if upper in FETCH_SIMPLE:
            return FetchAtt(upper)
        raise _Fail(f"unknown fetch item {upper[:40]}")
    if upper in ("BODY", "BODY.PEEK"):
        section = _parse_section(c)
    elif upper in ("BINARY", "BINARY.PEEK", "BINARY.SIZE"):
        c.expect(b"[", "[")
        part = _parse_part(c) if c.peek() in _DIGITS else ()
        c.expect(b"]", "]")
        section = Section(part)
    else:
        raise _Fail(f"unknown fetch item {upper[:40]}")
    partial = None
    if upper != "BINARY.SIZE" and c.take(b"<"):
        start = c.number(digits=19)
        c.expect(b".", ".")
        partial = (start, c.number(nonzero=True, digits=19))
        c.expect(b">", ">")
    return FetchAtt(upper, section, partial)


def _parse_part(c: _Cursor) -> tuple[int, ...]:
    part = [c.number(nonzero=True)]
    while c.peek() == 0x2E and c.line[c.p + 1:c.p + 2].isdigit():
        c.p += 1
        part.append(c.number(nonzero=True))
        if len(part) > c.limits.max_depth:
            raise _Fail("section part too deep", "LIMIT")
    return tuple(part)


def _parse_section(c: _Cursor) -> Section:
    c.expect(b"[", "[")
    part: tuple[int, ...] = ()
    if c.peek() in _DIGITS:
        part = _parse_part(c)
        if not c.take(b"."):
            c.expect(b"]", "]")
            return Section(part)
    if c.take(b"]"):
        if part:
            raise _Fail("bad section")
        return Section()
    text = c.run(frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.")).decode()
    text = text.upper()
    fields: tuple[str, ...] = ()
    if text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        c.sp()
        fields = c.plist(lambda: c.astring().decode("ascii", "replace"))
        if not fields:
            raise _Fail("empty header list")
    elif text not in ("HEADER", "TEXT") and not (text == "MIME" and part):
        raise _Fail("bad section")
    c.expect(b"]", "]")
    return Section(part, text, fields)


def _parse_search_key(c: _Cursor, depth: int) -> SearchKey:
    c.keys += 1
    if c.keys > c.limits.max_search_keys:
        raise _Fail("too many search keys", "LIMIT")
    if depth > c.limits.max_depth:
        raise _Fail("search nested too deep", "LIMIT")
    if c.peek() == 0x28:
        return SearchKey("AND", children=c.plist(lambda: _parse_search_key(c, depth + 1), depth))
    if c.peek() in _DIGITS or c.peek() in (0x2A, 0x24):  # a number, "*" or "$"
        return SearchKey("SEQSET", (c.sequence_set(),))
    name = c.atom("a search key").upper()
    if name in SEARCH_FLAGS:
        return SearchKey(name)
    c.sp()
    if name == "NOT":
        return SearchKey(name, children=(_parse_search_key(c, depth + 1),))
    if name == "OR":
        left = _parse_search_key(c, depth + 1)
        c.sp()
        return SearchKey(name, children=(left, _parse_search_key(c, depth + 1)))
    if name in SEARCH_ASTRING:
        return SearchKey(name, (c.astring(),))
    if name in SEARCH_DATE:
        return SearchKey(name, (c.date(),))
    if name in SEARCH_NUMBER:
        return SearchKey(name, (c.number(digits=19, nonzero=name in ("OLDER", "YOUNGER")),))
    if name in ("KEYWORD", "UNKEYWORD"):
        return SearchKey(name, (c.atom("a keyword"),))
    if name == "HEADER":
        field_name = c.astring().decode("ascii", "replace")
        c.sp()
        return SearchKey(name, (field_name, c.astring()))
    if name == "UID":
        return SearchKey(name, (c.sequence_set(),))
    if name == "MODSEQ":  # RFC 7162: MODSEQ ["/flags/\\Seen" SP all|shared|priv SP] n
        if c.peek() == 0x22:
            entry = c.quoted().decode("utf-8", "replace")
            c.sp()
            kind = c.atom().lower()
            if kind not in ("all", "shared", "priv"):
                raise _Fail("bad MODSEQ entry type")
            c.sp()
            return SearchKey(name, (entry, kind, c.number(digits=19)))
        return SearchKey(name, (c.number(digits=19),))
    raise _Fail(f"unknown search key {name[:40]}")


def _args(c: _Cursor, name: str, uid: bool) -> tuple[object, ...]:
    """The arguments of ``name``; the cursor stands after the command name."""
    if name in NO_ARGS and not (uid and name == "EXPUNGE"):
        return ()
    c.sp()
    if name == "LOGIN":
        user = c.astring()
        c.sp()
        return (user, Secret(c.astring()))
    if name == "AUTHENTICATE":
        mech = c.atom("a mechanism").upper()
        if not c.take(b" "):
            return (mech, None)
        initial = c.run(frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                  b"0123456789+/="))
        if not initial:
            raise _Fail("bad initial response")
        return (mech, Secret(initial))
    if name == "ENABLE":
        caps = [c.atom("a capability").upper()]
        while c.take(b" "):
            caps.append(c.atom("a capability").upper())
        return tuple(caps)
    if name == "ID":
        if c.line[c.p:c.p + 3].upper() == b"NIL":
            c.p += 3
            return (None,)

        def pair() -> tuple[bytes, bytes | None]:
            key = c.string()
            c.sp()
            return (key.data if isinstance(key, LiteralBytes) else key, c.nstring())

        items = c.plist(lambda: pair())
        if len(items) > 30:  # RFC 2971 §3.3
            raise _Fail("too many ID fields", "LIMIT")
        return (items,)
    if name in ("SELECT", "EXAMINE", "CREATE"):
        box = c.mailbox()
        params = c.plist(lambda: c.value(2)) if c.take(b" ") else ()
        return (box, params)
    if name in ("DELETE", "SUBSCRIBE", "UNSUBSCRIBE", "GETQUOTAROOT"):
        return (c.mailbox(),)
    if name == "GETQUOTA":
        return (c.astring(),)
    if name == "RENAME":
        old = c.mailbox()
        c.sp()
        return (old, c.mailbox())
    if name == "LSUB":
        ref = c.mailbox()
        c.sp()
        return (ref, c.list_mailbox())
    if name == "LIST":
        select: tuple[str, ...] = ()
        if c.peek() == 0x28:
            select = c.plist(lambda: c.atom("a selection option").upper())
            c.sp()
        ref = c.mailbox()
        c.sp()
        pats = (c.plist(c.list_mailbox) if c.peek() == 0x28 else (c.list_mailbox(),))
        if not pats:
            raise _Fail("empty pattern list")
        ret: tuple = ()
        if c.take(b" "):
            if c.atom().upper() != "RETURN":
                raise _Fail("expected RETURN")
            c.sp()
            ret = c.plist(lambda: c.value(2))
        return (select, ref, pats, ret)
    if name == "STATUS":
        box = c.mailbox()
        c.sp()
        items = c.plist(lambda: c.atom("a status item").upper())
        for item in items:
            if item not in STATUS_ITEMS:
                raise _Fail(f"unknown status item {item[:40]}")
        if not items:
            raise _Fail("empty status list")
        return (box, items)
    if name == "APPEND":
        box = c.mailbox()
        c.sp()
        flags: tuple[str, ...] = ()
        when = None
        if c.peek() == 0x28:
            flags = c.plist(c.flag)
            c.sp()
        if c.peek() == 0x22:
            when = c.date_time()
            c.sp()
        if not c.at_literal():
            raise _Fail("expected the message as a literal")
        return (box, flags, when, c.literal())
    if name == "SEARCH":
        ret: tuple[str, ...] | None = None
        charset = None
        if c.line[c.p:c.p + 7].upper() == b"RETURN ":
            c.p += 7
            ret = c.plist(lambda: c.atom("a return option").upper())
            for r in ret:
                if r not in SEARCH_RETURN:
                    raise _Fail(f"unknown search return option {r[:40]}")
            c.sp()
        if c.line[c.p:c.p + 8].upper() == b"CHARSET ":
            c.p += 8
            charset = c.astring().decode("ascii", "replace").upper()
            c.sp()
        keys = [_parse_search_key(c, 1)]
        while c.take(b" "):
            keys.append(_parse_search_key(c, 1))
        return (ret, charset, SearchKey("AND", children=tuple(keys)))
    # the commands on a sequence set
    seqs = c.sequence_set()
    if name == "EXPUNGE":  # UID EXPUNGE
        return (seqs,)
    c.sp()
    if name == "FETCH":
        if c.peek() == 0x28:
            items = c.plist(lambda: _parse_fetch_att(c))
            if not items:
                raise _Fail("empty fetch list")
        else:
            save = c.p
            word = c.run(ATOM_CHARS).decode("ascii").upper()
            if word in FETCH_MACROS:
                items = (FetchAtt(word),)
            else:
                c.p = save
                items = (_parse_fetch_att(c),)
        mods = c.plist(lambda: c.value(2)) if c.take(b" ") else ()
        return (seqs, items, mods)
    if name == "STORE":
        mods: tuple = ()
        if c.peek() == 0x28:
            mods = c.plist(lambda: c.value(2))
            c.sp()
        action = c.atom("+FLAGS, -FLAGS or FLAGS").upper()
        silent = action.endswith(".SILENT")
        action = action.removesuffix(".SILENT")
        if action not in ("FLAGS", "+FLAGS", "-FLAGS"):
            raise _Fail("expected +FLAGS, -FLAGS or FLAGS")
        c.sp()
        if c.peek() == 0x28:
            flags = c.plist(c.flag)
        else:
            flag_list = [c.flag()]
            while c.take(b" "):
                flag_list.append(c.flag())
            flags = tuple(flag_list)
        return (seqs, mods, action, silent, flags)
    if name in ("COPY", "MOVE"):
        return (seqs, c.mailbox())
    raise _Fail("unknown command")  # pragma: no cover - KNOWN and this table agree


KNOWN = NO_ARGS | {"LOGIN", "AUTHENTICATE", "ENABLE", "ID", "SELECT", "EXAMINE", "CREATE",
                   "DELETE", "SUBSCRIBE", "UNSUBSCRIBE", "GETQUOTAROOT", "GETQUOTA", "RENAME",
                   "LSUB", "LIST", "STATUS", "APPEND", "SEARCH", "FETCH", "STORE", "COPY",
                   "MOVE", "UID"}


def _head(line: bytes) -> tuple[str | None, str | None, bool, str | None]:
    """(tag, command name, uid, error) from the first line of a command."""
    end = 0
    while end < len(line) and line[end] in TAG_CHARS:
        end += 1
    if end == 0 or (end < len(line) and line[end] != 0x20):
        return None, None, False, "bad tag"
    tag = line[:end].decode("ascii")
    if end == len(line):
        return tag, None, False, "missing command"
    words = line[end + 1:].split(b" ", 2)
    name = words[0].decode("ascii", "replace").upper()
    if name not in KNOWN:
        return tag, None, False, "unknown command"
    if name != "UID":
        return tag, name, False, None
    sub = words[1].decode("ascii", "replace").upper() if len(words) > 1 else ""
    if sub not in UID_COMMANDS:
        return tag, None, True, "unknown UID command"
    return tag, sub, True, None


def _tag_of(head: bytes) -> str | None:
    """The tag at the start of a refused line, if it is one (so the error can name it)."""
    end = 0
    while end < len(head) and head[end] in TAG_CHARS:
        end += 1
    return head[:end].decode("ascii") if end and head[end:end + 1] == b" " else None


def parse_command(lines: list[bytes], lits: list[LiteralBytes],
                  limits: Limits) -> Command | ParseError:
    """One complete command (lines without CRLF and announcements, literals between)."""
    tag, name, uid, error = _head(lines[0])
    if error is not None or name is None or tag is None:
        return ParseError(tag, error or "bad command")
    c = _Cursor(lines, lits, limits)
    c.p = len(tag) + 1 + len(name) + (4 if uid else 0)
    try:
        args = _args(c, name, uid)
        c.end()
        for lit in lits:
            if not lit.binary and b"\0" in lit.data:
                raise _Fail("NUL in a literal (use literal8)")
    except _Fail as fail:
        return ParseError(tag, fail.text, fail.code)
    return Command(tag, name, uid, args)


# ---------------------------------------------------------------------------- the reader


class Mode(enum.Enum):
    COMMAND = "command"
    IDLE = "idle"  # the next line must be DONE
    SASL = "sasl"  # the next line is an AUTHENTICATE response


class _State(enum.Enum):
    LINE = 1  # reading a line of a command
    LITERAL = 2  # collecting the octets of an accepted literal
    DISCARD = 3  # counting away the octets of a refused non-synchronising literal
    SKIP = 4  # dropping the rest of a refused line, up to its LF
    CLOSED = 5  # after a fatal error: everything is dropped, the engine closes


_AGAIN = object()  # _command_line: nothing to report yet, but read on
_TAIL = 32  # octets kept of a skipped line: enough for "~{18446744073709551615+}"


def _announcement(line: bytes) -> tuple[int, int, bool, bool] | None:
    """(start, size, non-synchronising, binary) if ``line`` ends with ``{N}``/``{N+}``/``~{N}``.

    A size of more than 20 digits is reported as -1 (too large, whatever the limit).
    """
    if not line.endswith(b"}"):
        return None
    brace = line.rfind(b"{", max(0, len(line) - 32))
    if brace < 0:
        return None
    inner = line[brace + 1:-1]
    nonsync = inner.endswith(b"+")
    digits = inner[:-1] if nonsync else inner
    if not digits or not digits.isdigit():
        return None
    binary = brace > 0 and line[brace - 1] == 0x7E
    size = int(digits) if len(digits) <= 20 else -1
    return (brace - 1 if binary else brace), size, nonsync, binary


class CommandReader:
    """The state machine of the module docstring: ``feed`` bytes, pull ``next_event``."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.buffer = bytearray()
        self.mode = Mode.COMMAND
        self._state = _State.LINE
        self._reset_command()
        self._remaining = 0  # LITERAL / DISCARD: octets still to come
        self._tail = b""  # SKIP: the last octets of the skipped line
        self._skip_literals = True  # SKIP: honour a literal announced at the end
        self._fatal_pending = False  # a skipped line announced a literal too large to skip
        self._last_head = b""  # the start (or, if complete, all) of the last line read
        self._scanned = 0  # octets of the buffer known to hold no LF

    def _reset_command(self) -> None:
        self._lines: list[bytes] = []
        self._lits: list[LiteralBytes] = []
        self._used = 0  # octets outside literals so far
        self._literal_total = 0
        self._tag: str | None = None
        self._name: str | None = None
        self._literal = bytearray()
        self._binary = False

    # -- the engine's side

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def clear(self) -> None:
        """STARTTLS: forget everything buffered (RFC 9051 §6.2.1: no plaintext injection)."""
        self.buffer.clear()
        self._scanned = 0
        self._state = _State.LINE
        self.mode = Mode.COMMAND
        self._reset_command()

    def expect_done(self) -> None:
        """After ``+ idling``: the next line ends IDLE."""
        self.mode = Mode.IDLE

    def expect_sasl_response(self) -> None:
        """After a ``+ challenge``: the next line is a SASL response."""
        self.mode = Mode.SASL

    @property
    def held(self) -> int:
        """Octets held in memory: the buffer, the lines and literals of the command."""
        return (len(self.buffer) + len(self._literal) + sum(len(x) for x in self._lines)
                + sum(len(x.data) for x in self._lits) + len(self._tail))

    # -- the machine

    def next_event(self) -> Event | None:
        """The next event, or None until more input is fed."""
        while True:
            if self._state is _State.CLOSED:
                self.buffer.clear()
                self._scanned = 0
                if self._fatal_pending:
                    self._fatal_pending = False
                    return ParseError(None, "literal too large to skip", "TOOBIG", "BAD", True)
                return None
            if self._state is _State.DISCARD:
                n = min(self._remaining, len(self.buffer))
                del self.buffer[:n]
                self._scanned = 0
                self._remaining -= n
                if self._remaining:
                    return None
                self._state, self._tail = _State.SKIP, b""
                continue
            if self._state is _State.SKIP:
                if not self._skip():
                    return None
                continue
            if self._state is _State.LITERAL:
                n = min(self._remaining, len(self.buffer))
                self._literal += self.buffer[:n]
                del self.buffer[:n]
                self._scanned = 0
                self._remaining -= n
                if self._remaining:
                    return None
                self._lits.append(LiteralBytes(bytes(self._literal), self._binary))
                self._literal = bytearray()
                self._state = _State.LINE
                continue
            if self.mode is not Mode.COMMAND:
                return self._special_line()
            event = self._command_line()
            if event is not _AGAIN:
                return event  # type: ignore[return-value]

    def _skip(self) -> bool:
        """Drop up to the LF of the refused line; True once past it."""
        nl = self.buffer.find(b"\n")
        if nl < 0:
            self._tail = (self._tail + bytes(self.buffer[-_TAIL:]))[-_TAIL:]
            self.buffer.clear()
            self._scanned = 0
            return False
        line = (self._tail + bytes(self.buffer[max(0, nl - _TAIL):nl]))[-_TAIL:]
        del self.buffer[: nl + 1]
        self._scanned = 0
        self._tail = b""
        found = _announcement(line.removesuffix(b"\r")) if self._skip_literals else None
        if found is not None and found[2]:  # the client sends {N+} octets unasked
            size = found[1]
            if size < 0 or size > self.limits.max_discard:
                self._state, self._fatal_pending = _State.CLOSED, True
                self._reset_command()
                return True
            self._state, self._remaining = _State.DISCARD, size
            return True
        self._state = _State.LINE
        self._reset_command()
        return True

    def _line(self, limit: int) -> bytes | str | None:
        """The next line without CRLF, an error text, or None (no LF within ``limit`` yet).

        On "too long" the rest of the line is being skipped (state SKIP).
        """
        buf = self.buffer
        limit = max(limit, 1)
        nl = buf.find(b"\n", self._scanned, limit)
        if nl < 0:
            if len(buf) < limit:
                self._scanned = len(buf)  # a trickle of octets is not searched again
                return None
            self._last_head = bytes(buf[:64])
            self._tail = bytes(buf[max(0, limit - _TAIL):limit])
            del buf[:limit]
            self._scanned = 0
            self._state = _State.SKIP
            return "line too long"
        raw = bytes(buf[: nl + 1])
        del buf[: nl + 1]
        self._scanned = 0
        self._last_head = raw if len(raw) <= 64 else raw[:32] + raw[-32:]
        if not raw.endswith(CRLF) or b"\r" in raw[:-2]:
            return "bare CR or LF"
        if b"\0" in raw:
            return "NUL in command"
        return raw[:-2]

    def _special_line(self) -> Event | None:
        mode = self.mode
        limit = self.limits.max_idle_line if mode is Mode.IDLE else self.limits.max_sasl_line
        self._skip_literals = False
        line = self._line(limit)
        if line is None:
            return None
        self.mode = Mode.COMMAND
        if mode is Mode.IDLE:
            return IdleDone(isinstance(line, bytes) and line.upper() == b"DONE")
        return SaslResponse(line if isinstance(line, bytes) else None)

    def _fail(self, text: str, code: str | None = None, status: str = "BAD",
              fatal: bool = False) -> ParseError:
        tag = self._tag
        self._reset_command()
        return ParseError(tag, text, code, status, fatal)  # type: ignore[arg-type]

    def _command_line(self) -> Event | object | None:
        budget = self.limits.max_line - self._used
        self._skip_literals = True
        line = self._line(budget)
        if line is None:
            return None
        if isinstance(line, str):
            if not self._lines:
                self._tag = _tag_of(self._last_head)
            found = _announcement(self._last_head.rstrip(b"\r\n"))
            if line != "line too long" and found is not None:
                return self._refuse_literal(found, line, None)
            return self._fail(line, "TOOBIG" if line == "line too long" else None)
        self._used += len(line) + 2
        first = not self._lines
        found = _announcement(line)
        if first:
            tag, name, _uid, error = _head(line[: found[0]] if found else line)
            self._tag, self._name = tag, name
            if error is not None and found is None:
                return self._fail(error)
            if error is not None:
                return self._refuse_literal(found, error, None)  # type: ignore[arg-type]
        if found is None:
            self._lines.append(line)
            event = parse_command(self._lines, self._lits, self.limits)
            self._reset_command()
            return event
        start, size, nonsync, binary = found
        if self._name in self.limits.refused_literals:
            status, code = self.limits.refused_literal_reply
            return self._refuse_literal(found, "Use STARTTLS before logging in", code, status)
        limit = self.limits.max_append if self._name == "APPEND" else self.limits.max_literal
        if size < 0 or self._literal_total + size > limit:
            status = "NO" if self._name == "APPEND" else "BAD"  # RFC 7889: NO [TOOBIG]
            return self._refuse_literal(found, "literal too large", "TOOBIG", status)
        bound = self.limits.max_nonsync_literal
        if nonsync and bound is not None and size > bound:
            text = f"non-synchronizing literal over {bound} octets"
            return self._refuse_literal(found, text, "TOOBIG")
        self._literal_total += size
        self._lines.append(line[:start])
        self._binary = binary
        self._state, self._remaining = _State.LITERAL, size
        self._literal = bytearray()
        return _AGAIN if nonsync else ContinuationRequest()

    def _refuse_literal(self, found: tuple[int, int, bool, bool], text: str,
                        code: str | None, status: str = "BAD") -> ParseError:
        """Refuse the command at a literal: skip what the client sends without asking."""
        _start, size, nonsync, _binary = found
        if not nonsync:  # the client waits for "+": it sends nothing more of this command
            return self._fail(text, code, status)
        if size < 0 or size > self.limits.max_discard:
            self._state = _State.CLOSED
            return self._fail(text, code, status, fatal=True)
        self._state, self._remaining = _State.DISCARD, size
        return self._fail(text, code, status)
