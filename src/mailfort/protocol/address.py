"""Strict RFC 5321 path parsing for MAIL FROM and RCPT TO (sans-I/O, linear time).

Open relays of old were made by parsers that *interpreted* addresses: ``u%foreign@local``,
``foreign!u@local``, ``"u@foreign"@local`` and source routes were turned into a next hop.
This parser does the opposite: it checks the grammar and returns the local part as an
opaque string and the domain as written (ASCII lower-cased). A source route is parsed for
syntax and then ignored, as RFC 5321 §4.1.1.3 and Appendix C ask; nothing else is rewritten.

Deliberate strictness (each refusal is a 501 with an enhanced code):

- angle brackets are required (``MAIL FROM:a@b`` is refused, no guessing where a path ends);
- one space after the colon is tolerated (``MAIL FROM: <a@b>``): common clients send it and
  it is unambiguous; more is refused. Trailing spaces after the path/parameters are ignored;
- no trailing dot in a domain, no empty label, no empty local part (``""@x``), no second
  unquoted ``@``, no whitespace or control character outside a quoted string, none at all
  (C0, DEL, C1, Unicode separators/format characters, surrogates) anywhere;
- UTF-8 only when the caller says SMTPUTF8 is in force (RFC 6531);
- ``<Postmaster>`` without a domain is not accepted (mailfort always wants a domain);
- lengths: local part 64 octets as written, label 63, domain 255, whole path 256.

A small hand-written scanner, not a regular expression: every character is looked at once.
The everyday path (ASCII dot-atom ``<local@host.domain>``, no route, no literal, no quotes)
is first tried against one anchored pattern with no nested repetition over a bounded
window; it only ever accepts what the scanner accepts, with the same result (a property
test holds it to that), and everything else goes to the scanner.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

from mailfort.protocol.replies import Reply

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_LABEL = 63
MAX_PATH = 256  # RFC 5321 §4.5.3.1.3, including "<", ">" and any source route

_LETDIG = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_ATEXT = _LETDIG | frozenset("!#$%&'*+-/=?^_`{|}~")
_KEYWORD = _LETDIG | {"-"}
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# The common case, ASCII only (see the module docstring): dot-atom local part, LDH labels.
_ATOM = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_LDH_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_ASCII_DOT_STRING = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_PLAIN_PATH = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*)@({_LDH_LABEL}(?:\.{_LDH_LABEL})*)>")

AddressKind = Literal["sender", "recipient", "syntax"]

_BASE: dict[str, Reply] = {
    "sender": Reply(501, "5.1.7", "Bad sender address syntax"),
    "recipient": Reply(501, "5.1.3", "Bad recipient address syntax"),
    "syntax": Reply(501, "5.5.4", "Syntax error in parameters or arguments"),
}


class AddressError(ValueError):
    """A path or parameter that breaks the grammar; ``reply`` is what the server sends.

    ``kind`` picks the enhanced code: "sender" 5.1.7 (MAIL), "recipient" 5.1.3 (RCPT),
    "syntax" 5.5.4 (wrong prefix, bad ESMTP parameter). All are 501.
    """

    def __init__(self, why: str, *, kind: AddressKind) -> None:
        base = _BASE[kind]
        self.kind: AddressKind = kind
        self.why = why
        self.reply = Reply(base.code, base.enhanced, f"{base.lines[0]}: {why}")
        super().__init__(self.reply.lines[0])


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A parsed mailbox. Built by the parser; its fields are already validated."""

    local_part: str  # unquoted: the content of a quoted string, with quoted pairs resolved
    domain: str  # ASCII lower-cased; "[192.0.2.1]" / "[IPv6:...]" for an address literal
    literal: bool = False

    def __str__(self) -> str:
        return f"{quote_local_part(self.local_part)}@{self.domain}"


def quote_local_part(local: str) -> str:
    """The local part as it must be written: a dot-string if it can be, else quoted."""
    if _ASCII_DOT_STRING.fullmatch(local) or (local and _is_dot_string(local)):
        return local
    escaped = "".join("\\" + c if c in '"\\' else c for c in local)
    return f'"{escaped}"'


def _utf8_ok(c: str) -> bool:
    """A non-ASCII character we accept: no controls, separators, format chars, surrogates."""
    return unicodedata.category(c)[0] not in "CZ"


def _is_atext(c: str) -> bool:
    return c in _ATEXT or (ord(c) > 127 and _utf8_ok(c))


def _is_dot_string(s: str) -> bool:
    return all(atom and all(_is_atext(c) for c in atom) for atom in s.split("."))


def _is_label_char(c: str) -> bool:
    # U-labels: letters, marks and digits only (a cheap stand-in for IDNA2008 rules).
    return c in _KEYWORD or (ord(c) > 127 and unicodedata.category(c)[0] in "LMN")


def _octets(s: str) -> int:
    return len(s.encode("utf-8"))  # safe: the scanner never lets a surrogate through


class _Scanner:
    __slots__ = ("kind", "pos", "text", "utf8")

    def __init__(self, text: str, utf8: bool, kind: AddressKind) -> None:
        self.text = text
        self.pos = 0
        self.utf8 = utf8
        self.kind: AddressKind = kind

    def fail(self, why: str) -> AddressError:
        return AddressError(why, kind=self.kind)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, c: str) -> None:
        if self.peek() != c:
            raise self.fail(f"expected {c!r}")
        self.pos += 1

    def check_non_ascii(self, c: str) -> None:
        if not self.utf8:
            raise self.fail("non-ASCII address without SMTPUTF8")
        if not _utf8_ok(c):
            raise self.fail("forbidden character")

    def domain(self) -> str:
        """Domain = sub-domain *("." sub-domain); no trailing dot, no empty label."""
        start = self.pos
        while True:
            label_start = self.pos
            while (c := self.peek()) and _is_label_char(c):
                if ord(c) > 127:
                    self.check_non_ascii(c)
                self.pos += 1
            label = self.text[label_start : self.pos]
            if not label or label[0] == "-" or label[-1] == "-":
                raise self.fail("bad domain")
            if _octets(label) > MAX_LABEL:
                raise self.fail("domain label too long")
            if self.peek() != ".":
                break
            self.pos += 1
        name = self.text[start : self.pos]
        if _octets(name) > MAX_DOMAIN:
            raise self.fail("domain too long")
        return name.translate(_ASCII_LOWER)

    def address_literal(self) -> str:
        """IPv4 or "IPv6:" literal, validated by ipaddress and written canonically."""
        self.expect("[")
        end = self.text.find("]", self.pos)
        if end < 0:
            raise self.fail("unterminated address literal")
        body = self.text[self.pos : end]
        self.pos = end + 1
        if body.isascii() and "%" not in body:  # "%" would be an IPv6 zone id
            try:
                if body[:5].lower() == "ipv6:":
                    return f"[IPv6:{ipaddress.IPv6Address(body[5:]).compressed}]"
                if body.count(".") == 3:
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
            while (c := self.peek()) and (c in _ATEXT or ord(c) > 127):
                if ord(c) > 127:
                    self.check_non_ascii(c)
                self.pos += 1
            if self.pos == atom_start:
                raise self.fail("bad local part")
            if self.peek() != ".":
                break
            self.pos += 1
        return self.text[start : self.pos]

    def quoted_string(self) -> str:
        """Quoted-string with quoted pairs resolved; printable ASCII (and UTF-8) only."""
        self.expect('"')
        out: list[str] = []
        while True:
            c = self.peek()
            if not c:
                raise self.fail("unterminated quoted string")
            self.pos += 1
            if c == '"':
                if not out:
                    raise self.fail("empty local part")
                return "".join(out)
            if c == "\\":
                c = self.peek()
                if not c:
                    raise self.fail("unterminated quoted string")
                self.pos += 1
            if ord(c) > 127:
                self.check_non_ascii(c)
            elif not 32 <= ord(c) <= 126:
                raise self.fail("control character in quoted string")
            out.append(c)

    def path(self, null_allowed: bool) -> Mailbox | None:
        """Path = "<" [A-d-l ":"] Mailbox ">"; the A-d-l is checked, then dropped."""
        self.expect("<")
        if self.peek() == ">":
            self.pos += 1
            if not null_allowed:
                raise self.fail("null path not allowed here")
            return None
        if self.peek() == "@":
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
        local_start = self.pos
        local = self.local_part()
        if _octets(self.text[local_start : self.pos]) > MAX_LOCAL_PART:
            raise self.fail("local part too long")
        self.expect("@")
        if self.peek() == "[":
            mbox = Mailbox(local, self.address_literal(), literal=True)
        else:
            mbox = Mailbox(local, self.domain())
        self.expect(">")
        if _octets(self.text[: self.pos]) > MAX_PATH:
            raise self.fail("path too long")
        return mbox


def _plain_path(text: str) -> tuple[Mailbox, int] | None:
    """The everyday path at the start of ``text`` and where it ends, or None: then the
    scanner decides (it may still accept it, or says what is wrong)."""
    m = _PLAIN_PATH.match(text, 0, MAX_PATH + 1)
    if m is None or m.end() > MAX_PATH or len(m[1]) > MAX_LOCAL_PART:
        return None
    domain = m[2]
    if len(domain) > MAX_DOMAIN or any(len(label) > MAX_LABEL for label in domain.split(".")):
        return None
    return Mailbox(m[1], domain.translate(_ASCII_LOWER)), m.end()


def parse_esmtp_params(text: str, *, smtputf8_allowed: bool = False) -> dict[str, str | None]:
    """esmtp-param *(SP esmtp-param); keys upper-cased, duplicates refused.

    esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-"); esmtp-value = 1*(%d33-60 /
    %d62-126), plus non-control UTF-8 under SMTPUTF8 (RFC 6531 §3.3).
    """
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
            or not all(
                (33 <= ord(c) <= 126 and c != "=")
                or (ord(c) > 127 and smtputf8_allowed and _utf8_ok(c))
                for c in value
            )
        ):
            raise AddressError(f"bad parameter {item[:40]!r}", kind="syntax")
        k = key.upper()
        if k in params:
            raise AddressError(f"duplicate parameter {k}", kind="syntax")
        params[k] = value if eq else None
    return params


def parse_mail_argument(
    arg: str, *, prefix: str, null_allowed: bool, smtputf8_allowed: bool
) -> tuple[Mailbox | None, dict[str, str | None]]:
    """Parse ``FROM:<path> params`` / ``TO:<path> params`` (the text after the verb).

    ``prefix`` is "FROM:" or "TO:" (matched case-insensitively; anything else is a
    programming error and raises plain ValueError). Returns the mailbox (None for ``<>``
    when ``null_allowed``) and the ESMTP parameters. Raises AddressError only.
    """
    if prefix.upper() == "FROM:":
        kind: AddressKind = "sender"
    elif prefix.upper() == "TO:":
        kind = "recipient"
    else:
        raise ValueError(f"prefix must be 'FROM:' or 'TO:', not {prefix!r}")
    if arg[: len(prefix)].upper() != prefix.upper():
        verb = "MAIL FROM" if kind == "sender" else "RCPT TO"
        raise AddressError(f"expected {verb}:<address>", kind="syntax")
    rest = arg[len(prefix) :]
    if rest.startswith(" "):
        rest = rest[1:]
    scanner = _Scanner(rest, smtputf8_allowed, kind)
    plain = _plain_path(rest)
    if plain is not None:
        mailbox, scanner.pos = plain
    else:
        mailbox = scanner.path(null_allowed)
    tail = rest[scanner.pos :].rstrip(" ")
    if tail and not tail.startswith(" "):
        raise scanner.fail("junk after address")
    return mailbox, parse_esmtp_params(tail[1:], smtputf8_allowed=smtputf8_allowed)
