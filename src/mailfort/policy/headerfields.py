"""Header fields read the way the most tolerant reader reads them (RFC 5322, obsolete syntax
included), so that what we check is what any mail reader may show.

One field reader serves DMARC (the From: domain, policy/dmarc.py), the submission sender
check (From:, Sender:, Resent-*, policy/senders.py) and Authentication-Results
(policy/authresults.py): two readers that disagree on which fields a message has are how a
second, unchecked ``From :`` slips by. The reader errs on the side of seeing more: a name
with white space before its colon (RFC 5322 §4.5.3) is that field (so is one with a control
character inside, which some readers drop), any line ending ends a line, and a line that is
not a field does not end the section. The parsers answer None when
they cannot tell (the callers refuse or remove): comments nest and hold quoted-pairs
(§3.2.2), which a naive reader gets wrong one way or the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE_END = re.compile(r"\r\n|\r|\n")
_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 §2.2: printable US-ASCII except ":"
WSP = " \t"
_IGNORED_IN_NAME = re.compile(r"[\x00-\x20\x7f]")
_SPECIALS = frozenset('()<>[]:;@\\,."')  # RFC 5322 §3.2.3


def fields(block: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of every field of ``block``, up to its first empty
    line. Values keep their white space; bytes that are not UTF-8 become U+FFFD."""
    out: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for line in lines(block.decode("utf-8", "replace")):
        if line == "":
            break
        if line[0] in WSP:
            if current is not None:
                current.append(line)
            continue
        name, value = field_name(line), line.partition(":")[2]
        if name is not None:
            current = [value]
            out.append((name, current))
        else:
            current = None  # not a field: lines folded under it belong to nothing
    return [(name, "".join(parts)) for name, parts in out]


def lines(text: str) -> list[str]:
    """``text`` split at CRLF, CR and LF alike (``_LINE_END``); by ``str.split`` when every
    line ends the same way (the expression costs ~6 µs on a signed message's header)."""
    if "\r" not in text:
        return text.split("\n")
    crlf = text.count("\r\n")
    if text.count("\r") == crlf == text.count("\n"):
        return text.split("\r\n")
    return _LINE_END.split(text)


def field_name(line: str) -> str | None:
    """The lower-case name of the field that ``line`` (not a continuation line) starts, or
    None when it starts none. White space and control characters before the colon do not
    count: ``From :`` (obsolete syntax) and ``Fr<NUL>om:`` are From: to some reader."""
    name, colon, _ = line.partition(":")
    if not colon:
        return None
    if _NAME.fullmatch(name):  # none of the ignored characters is a _NAME character
        return name.lower()
    name = _IGNORED_IN_NAME.sub("", name)
    return name.lower() if _NAME.fullmatch(name) else None


def values(block: bytes, name: str) -> list[str]:
    """The values of every field called ``name`` (any case)."""
    name = name.lower()
    return [v for n, v in fields(block) if n == name]


class Unreadable(ValueError):
    """The text is not what the grammar allows; the caller cannot tell what it says."""


class Scanner:
    """RFC 5322 lexical tokens over one unfolded field value."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_cfws(self) -> None:
        """Skip white space and comments (nested, with quoted-pairs); Unreadable when a
        comment does not end."""
        t = self.text
        while self.pos < len(t):
            ch = t[self.pos]
            if ch in WSP:
                self.pos += 1
            elif ch == "(":
                self._comment()
            else:
                return

    def _comment(self) -> None:
        t, depth = self.text, 0
        while self.pos < len(t):
            ch = t[self.pos]
            if ch == "\\":
                self.pos += 2  # a quoted-pair: the next character, whatever it is
                continue
            self.pos += 1
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    return
        raise Unreadable("unterminated comment")

    def quoted_string(self) -> str:
        """The content of the quoted-string at the position, quoted-pairs undone."""
        t, out = self.text, []
        self.pos += 1  # the opening DQUOTE
        while self.pos < len(t):
            ch = t[self.pos]
            if ch == "\\":
                if self.pos + 1 >= len(t):
                    break
                out.append(t[self.pos + 1])
                self.pos += 2
            elif ch == '"':
                self.pos += 1
                return "".join(out)
            else:
                out.append(ch)
                self.pos += 1
        raise Unreadable("unterminated quoted-string")

    def domain_literal(self) -> str:
        end = self.text.find("]", self.pos)
        if end < 0 or "[" in self.text[self.pos + 1:end] or "\\" in self.text[self.pos:end]:
            raise Unreadable("bad domain literal")
        lit = self.text[self.pos:end + 1]
        self.pos = end + 1
        return lit

    def atom(self) -> str:
        t, start = self.text, self.pos
        while self.pos < len(t) and t[self.pos] not in _SPECIALS and t[self.pos] > " " \
                and t[self.pos] != "\x7f":
            self.pos += 1
        return t[start:self.pos]

    def word(self) -> str | None:
        """An atom or a quoted-string after CFWS, or None when the next thing is neither."""
        self.skip_cfws()
        if self.peek() == '"':
            return self.quoted_string()
        return self.atom() or None


@dataclass(frozen=True)
class AddressList:
    mailboxes: list[str]  # local@domain, the domain in lower case
    groups: int  # how many group constructs (``undisclosed:;``) the list had

    @property
    def single(self) -> str | None:
        """The address when the list is exactly one mailbox and nothing else."""
        return self.mailboxes[0] if len(self.mailboxes) == 1 and not self.groups else None


def domain_of(address: str) -> str:
    return address.rpartition("@")[2]


def address_list(text: str) -> AddressList | None:
    """The mailboxes of an address-list (RFC 5322 §3.4, with the obsolete forms of §4.4:
    empty list elements, routes, phrases with dots); None when it is not one."""
    s = Scanner(text)
    boxes: list[str] = []
    groups = 0
    try:
        in_group = False
        while True:
            s.skip_cfws()
            ch = s.peek()
            if ch == ",":
                s.pos += 1
                continue
            if ch == ";" and in_group:
                s.pos += 1
                in_group = False
                continue
            if not ch:
                break
            kind, value = _address(s, in_group)
            if kind == "group":
                groups += 1
                in_group = True
                continue
            boxes.append(value)
            s.skip_cfws()
            if s.peek() not in (",", ";", ""):
                raise Unreadable("garbage after an address")
        if in_group:
            raise Unreadable("group without its ';'")
    except Unreadable:
        return None
    return AddressList(boxes, groups)


def _words(s: Scanner) -> list[str]:
    """The words and dots of a display name or local part (obs-phrase allows dots too)."""
    words: list[str] = []
    while True:
        s.skip_cfws()
        if s.peek() == ".":
            words.append(".")
            s.pos += 1
            continue
        w = s.word()
        if w is None:
            return words
        words.append(w)


def _address(s: Scanner, in_group: bool) -> tuple[str, str]:
    """("mailbox", address) or ("group", "") for the group's display name and colon."""
    words = _words(s)
    ch = s.peek()
    if ch == "<":
        s.pos += 1
        addr = _angle_addr(s)
        return "mailbox", addr
    if ch == ":" and words and not in_group:
        s.pos += 1
        return "group", ""
    if ch == "@" and words:
        s.pos += 1
        return "mailbox", _addr_spec_rest(s, words)
    raise Unreadable("not an address")


def _angle_addr(s: Scanner) -> str:
    s.skip_cfws()
    if s.peek() == "@":  # obs-route: "@a.test,@b.test:" before the address
        while s.peek() in ("@", ","):
            if s.peek() == ",":
                s.pos += 1
                s.skip_cfws()
                continue
            s.pos += 1
            _domain(s)
            s.skip_cfws()
        if s.peek() != ":":
            raise Unreadable("bad route")
        s.pos += 1
    words = _words(s)
    if s.peek() != "@" or not words:
        raise Unreadable("no address in <>")
    s.pos += 1
    addr = _addr_spec_rest(s, words)
    s.skip_cfws()
    if s.peek() != ">":
        raise Unreadable("no closing >")
    s.pos += 1
    return addr


def _addr_spec_rest(s: Scanner, local_words: list[str]) -> str:
    """The address from its local-part's words (and dots), the "@" just read."""
    if local_words[0] == "." or local_words[-1] == ".":
        raise Unreadable("local-part starts or ends with a dot")
    return "".join(local_words) + "@" + _domain(s)


def _domain(s: Scanner) -> str:
    s.skip_cfws()
    if s.peek() == "[":
        return s.domain_literal()
    labels = []
    while True:
        s.skip_cfws()
        a = s.atom()
        if not a:
            raise Unreadable("empty domain label")
        labels.append(a)
        s.skip_cfws()
        if s.peek() != ".":
            break
        s.pos += 1
        s.skip_cfws()
        if s.peek() in (">", ",", ";", ""):  # a trailing dot ends the name
            break
    return ".".join(labels).lower()
