"""Strict RFC 5321 path parsing for MAIL FROM and RCPT TO (sans-I/O, linear time).

Open relays of old were made by parsers that *interpreted* addresses: ``u%foreign@local``,
``foreign!u@local``, ``"u@foreign"@local`` and source routes were turned into a next hop.
This parser does the opposite: it checks the grammar and returns the local part as an
opaque string and the domain as written (lower-cased). A source route is parsed for syntax
and then ignored, as RFC 5321 §4.1.1.3 and Appendix C ask; nothing else is rewritten.

A small hand-written scanner, not a regular expression: every character is looked at once.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from mailfort.protocol.replies import Reply

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_LABEL = 63

_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)
_LETDIG = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_KEYWORD = _LETDIG | {"-"}


class AddressError(ValueError):
    """A path or parameter that does not follow the grammar; ``reply`` is what to send."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.lines[0])
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Mailbox:
    local_part: str  # unquoted: the content of a quoted string, with quoted pairs resolved
    domain: str  # lower-cased; "[192.0.2.1]" / "[IPv6:...]" for an address literal
    literal: bool = False

    def __str__(self) -> str:
        return f"{quote_local_part(self.local_part)}@{self.domain}"


def quote_local_part(local: str) -> str:
    """The local part as it must be written: a dot-string if it can be, else quoted."""
    if local and _is_dot_string(local):
        return local
    escaped = "".join("\\" + c if c in '"\\' else c for c in local)
    return f'"{escaped}"'


def _is_atext(c: str) -> bool:
    return c in _ATEXT or ord(c) > 127


def _is_dot_string(s: str) -> bool:
    return all(atom and all(_is_atext(c) for c in atom) for atom in s.split("."))


class _Scanner:
    __slots__ = ("error", "pos", "text", "utf8")

    def __init__(self, text: str, utf8: bool, error: Reply) -> None:
        self.text = text
        self.pos = 0
        self.utf8 = utf8
        self.error = error

    def fail(self, why: str) -> AddressError:
        r = self.error
        return AddressError(Reply(r.code, r.enhanced, f"{r.lines[0]}: {why}"))

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, c: str) -> None:
        if self.peek() != c:
            raise self.fail(f"expected {c!r}")
        self.pos += 1

    def check_char(self, c: str) -> None:
        if ord(c) > 127 and not self.utf8:
            raise self.fail("non-ASCII address without SMTPUTF8")

    def domain(self) -> str:
        """Domain = sub-domain *("." sub-domain); no trailing dot, no empty label."""
        start = self.pos
        while True:
            label_start = self.pos
            while True:
                c = self.peek()
                if not c or not (c in _KEYWORD or ord(c) > 127):
                    break
                self.check_char(c)
                self.pos += 1
            label = self.text[label_start : self.pos]
            if not label or label[0] == "-" or label[-1] == "-":
                raise self.fail("bad domain")
            if len(label.encode()) > MAX_LABEL:
                raise self.fail("domain label too long")
            if self.peek() != ".":
                break
            self.pos += 1
        name = self.text[start : self.pos]
        if len(name.encode()) > MAX_DOMAIN:
            raise self.fail("domain too long")
        return name.lower()

    def address_literal(self) -> str:
        self.expect("[")
        end = self.text.find("]", self.pos)
        if end < 0:
            raise self.fail("unterminated address literal")
        body = self.text[self.pos : end]
        self.pos = end + 1
        try:
            if body[:5].lower() == "ipv6:":
                return f"[IPv6:{ipaddress.IPv6Address(body[5:]).compressed}]"
            if body.count(".") == 3 and all(p.isdigit() for p in body.split(".")):
                return f"[{ipaddress.IPv4Address(body)}]"
        except ValueError:
            pass
        raise self.fail("bad address literal")

    def local_part(self) -> str:
        if self.peek() == '"':
            return self.quoted_string()
        start = self.pos
        while True:
            atom_start = self.pos
            while (c := self.peek()) and _is_atext(c):
                self.check_char(c)
                self.pos += 1
            if self.pos == atom_start:
                raise self.fail("bad local part")
            if self.peek() != ".":
                break
            self.pos += 1
        return self.text[start : self.pos]

    def quoted_string(self) -> str:
        self.expect('"')
        out: list[str] = []
        while True:
            c = self.peek()
            if not c:
                raise self.fail("unterminated quoted string")
            self.pos += 1
            if c == '"':
                return "".join(out)
            if c == "\\":
                c = self.peek()
                if not c or not (32 <= ord(c) <= 126 or ord(c) > 127):
                    raise self.fail("bad quoted pair")
                self.pos += 1
            elif not (32 <= ord(c) <= 126 or ord(c) > 127):
                raise self.fail("control character in quoted string")
            self.check_char(c)
            out.append(c)

    def path(self, null_allowed: bool) -> Mailbox | None:
        self.expect("<")
        if self.peek() == ">":
            self.pos += 1
            if not null_allowed:
                raise self.fail("null path not allowed here")
            return None
        if self.peek() == "@":  # A-d-l: parsed for syntax, then ignored (RFC 5321 §4.1.1.3)
            while True:
                self.expect("@")
                if self.peek() == "[":
                    self.address_literal()
                else:
                    self.domain()
                if self.peek() != ",":
                    break
                self.pos += 1
            self.expect(":")
        local = self.local_part()
        if len(local.encode()) > MAX_LOCAL_PART:
            raise self.fail("local part too long")
        self.expect("@")
        if self.peek() == "[":
            mbox = Mailbox(local, self.address_literal(), literal=True)
        else:
            mbox = Mailbox(local, self.domain())
        self.expect(">")
        return mbox


def parse_esmtp_params(text: str) -> dict[str, str | None]:
    """esmtp-param *(SP esmtp-param); keys upper-cased, duplicates refused."""
    params: dict[str, str | None] = {}
    if not text:
        return params
    for item in text.split(" "):
        key, eq, value = item.partition("=")
        if (
            not key
            or key[0] not in _LETDIG
            or any(c not in _KEYWORD for c in key)
            or (eq and not value)
            or any(ord(c) < 33 or c == "=" or ord(c) == 127 for c in value)
        ):
            raise AddressError(Reply(501, "5.5.4", f"Bad parameter syntax: {item[:40]!r}"))
        k = key.upper()
        if k in params:
            raise AddressError(Reply(501, "5.5.4", f"Duplicate parameter {k}"))
        params[k] = value if eq else None
    return params


def parse_mail_argument(
    arg: str, *, prefix: str, null_allowed: bool, smtputf8_allowed: bool
) -> tuple[Mailbox | None, dict[str, str | None]]:
    """Parse ``FROM:<path> params`` / ``TO:<path> params`` (the text after the verb).

    Angle brackets are required. One space after the colon is tolerated, because common
    clients send it and it is unambiguous; anything looser is refused.
    """
    sender = prefix.upper() == "FROM:"
    error = (
        Reply(501, "5.1.7", "Bad sender address syntax")
        if sender
        else Reply(501, "5.1.3", "Bad recipient address syntax")
    )
    if arg[: len(prefix)].upper() != prefix.upper():
        verb = "MAIL FROM" if sender else "RCPT TO"
        raise AddressError(Reply(501, "5.5.4", f"Syntax: {verb}:<address>"))
    rest = arg[len(prefix) :]
    if rest.startswith(" "):
        rest = rest[1:]
    scanner = _Scanner(rest, smtputf8_allowed, error)
    mailbox = scanner.path(null_allowed)
    tail = rest[scanner.pos :]
    if tail and not tail.startswith(" "):
        raise scanner.fail("junk after address")
    return mailbox, parse_esmtp_params(tail[1:])
