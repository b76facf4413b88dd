"""The message as a Sieve script sees it: headers (unfolded, RFC 2047 decoded), addresses and
their parts, envelope, body text for the ``body`` test (RFC 5173).

Everything is parsed lazily and once: the header block on the first header test, each
value's RFC 2047 decoding on first use, the body (and its MIME structure) only when a
``body`` test asks; a script that only looks at the envelope parses nothing. What is tested
is bounded by ``max_header_bytes_tested`` and ``max_body_bytes_tested``.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import quopri
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from email import message_from_bytes
from email import policy as email_policy
from email.message import Message

from mailfort.protocol.sieve_match import fold

_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([QqBb])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"^[ \t\r\n]+$")
_FIELD_NAME = re.compile(r"^[!-9;-~]+$")


def decode_mime_words(value: str) -> str:
    """RFC 2047 encoded words decoded; white space between two adjacent ones dropped.

    An unknown charset or a malformed word stays as written."""
    if "=?" not in value:
        return value
    out: list[str] = []
    pos = 0
    last_was_word = False
    for m in _ENCODED_WORD.finditer(value):
        gap = value[pos:m.start()]
        decoded = _decode_word(m.group(1), m.group(2), m.group(3))
        if decoded is None:
            out.append(gap + m.group())
            last_was_word = False
        else:
            if not (last_was_word and _BETWEEN_WORDS.match(gap)):
                out.append(gap)
            out.append(decoded)
            last_was_word = True
        pos = m.end()
    out.append(value[pos:])
    return "".join(out)


def _decode_word(charset: str, encoding: str, text: str) -> str | None:
    charset = charset.split("*", 1)[0]  # RFC 2231 language suffix
    try:
        codecs.lookup(charset)
    except LookupError:
        return None
    try:
        if encoding in "Bb":
            raw = base64.b64decode(text + "=" * (-len(text) % 4))
        else:
            raw = quopri.decodestring(text.replace("_", " ").encode("ascii", "replace"),
                                      header=True)
    except (binascii.Error, ValueError):
        return None
    return raw.decode(charset, "replace")


def _header_end(text: str) -> int:
    """Where the first empty line ("" or "\\r" between line ends) starts; the length
    when there is none. String searches: a multi-line regex costs more than the parse."""
    if text[:1] == "\n" or text[:2] == "\r\n" or text == "\r":
        return 0
    end = len(text)
    for found in (text.find("\n\n"), text.find("\n\r\n")):
        if 0 <= found < end:
            end = found + 1
    if text.endswith("\n\r"):
        end = min(end, len(text) - 1)
    return end


def parse_header_block(block: bytes, limit: int) -> dict[str, list[str]]:
    """Field name (lower case) to its values in order, unfolded, raw (not 2047-decoded)."""
    text = block[:limit].decode("utf-8", "replace")
    text = text[:_header_end(text)]
    if "\n " in text or "\n\t" in text:  # unfold; no empty line is left, so this is exact
        text = (text.replace("\r\n ", " ").replace("\r\n\t", "\t")
                .replace("\n ", " ").replace("\n\t", "\t"))
    fields: dict[str, list[str]] = {}
    for chunk in text.split("\n"):
        name, colon, value = chunk.partition(":")
        if not colon:
            continue
        name = name.rstrip(" \t").lower()
        if not name or not _FIELD_NAME.match(name):
            continue
        fields.setdefault(name, []).append(value.strip(" \t\r"))
    return fields


# ------------------------------------------------------------------------- addresses


def parse_addresses(value: str) -> list[str]:
    """The addr-specs of an address-list header value (display names, comments and groups
    taken away); a part that is not an address is returned as written, without spaces."""
    out: list[str] = []
    current: list[str] = []
    found: str | None = None  # the <addr-spec> of the current element
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c == '"':
            j = i + 1
            while j < n and value[j] != '"':
                j += 2 if value[j] == "\\" else 1
            current.append(value[i:j + 1])
            i = j + 1
        elif c == "(":
            depth, i = 1, i + 1
            while i < n and depth:
                if value[i] == "\\":
                    i += 1
                elif value[i] == "(":
                    depth += 1
                elif value[i] == ")":
                    depth -= 1
                i += 1
        elif c == "<":
            close = value.find(">", i + 1)
            close = n if close < 0 else close
            spec = "".join(value[i + 1:close].split())
            if spec.startswith("@") and ":" in spec:  # obsolete source route
                spec = spec.split(":", 1)[1]
            found = spec
            i = close + 1
        elif c in ",;":
            _flush(current, found, out)
            current, found = [], None
            i += 1
        elif c == ":" and found is None and "@" not in "".join(current):
            current = []  # a group's display name
            i += 1
        else:
            current.append(c)
            i += 1
    _flush(current, found, out)
    return out


def _flush(current: list[str], found: str | None, out: list[str]) -> None:
    if found is not None:
        if found:
            out.append(found)
        return
    spec = "".join("".join(current).split())
    if spec:
        out.append(spec)


def address_part(address: str, part: str, separator: str = "+") -> str | None:
    """``all``, ``localpart``, ``domain``, ``user``, ``detail`` of one address; None when the
    part does not exist (``detail`` of an address without a separator)."""
    if part == "all":
        return address
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    if part == "localpart":
        return local
    if part == "domain":
        return domain
    user, sep, detail = local.partition(separator)
    if part == "user":
        return user
    return detail if sep else None


# ------------------------------------------------------------------------- the message


@dataclass
class SieveMessage:
    """One message and its envelope, for one recipient."""

    header_block: bytes
    body_loader: Callable[[], bytes]
    size: int
    envelope_from: str
    envelope_to: str
    original_to: str | None = None
    auth: str | None = None
    _fields: dict[str, list[str]] | None = field(default=None, repr=False)
    _decoded: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _addresses: dict[str, list[list[str]]] = field(default_factory=dict, repr=False)
    # what the tests of a script compare, built once per message and shared by every test
    # that asks the same (a 50-rule script asks "from" ten times): see ``folded``, ``parts``
    folded_cache: dict[str, list[str]] = field(default_factory=dict, repr=False)
    parts_cache: dict[tuple[str, str, bool], list[str]] = field(default_factory=dict, repr=False)
    _body: bytes | None = field(default=None, repr=False)
    _mime: Message | None = field(default=None, repr=False)

    @classmethod
    def from_bytes(cls, header_block: bytes, body: Callable[[], bytes], *, size: int,
                   envelope_from: str, envelope_to: str, original_to: str | None = None,
                   auth: str | None = None) -> SieveMessage:
        return cls(header_block, body, size, envelope_from, envelope_to, original_to, auth)

    def fields(self, limit: int) -> dict[str, list[str]]:
        if self._fields is None:
            self._fields = parse_header_block(self.header_block, limit)
        return self._fields

    def header(self, name: str, limit: int) -> list[str]:
        """The decoded values of one field (name in lower case), in order."""
        got = self._decoded.get(name)
        if got is None:
            got = [decode_mime_words(v) for v in self.fields(limit).get(name, ())]
            self._decoded[name] = got
        return got

    def addresses(self, name: str, limit: int) -> list[list[str]]:
        """The addresses of each field of that name, parsed once per message: from the raw
        value, so an encoded display name ("=?utf-8?q?Doe=2C_J?=") cannot become a comma."""
        got = self._addresses.get(name)
        if got is None:
            got = [parse_addresses(v) for v in self.fields(limit).get(name, ())]
            self._addresses[name] = got
        return got

    def folded(self, name: str, limit: int) -> list[str]:
        """``header``'s values under i;ascii-casemap, for :is and :contains with constant
        keys (which are folded once, when the script is compiled)."""
        got = self.folded_cache.get(name)
        if got is None:
            got = [fold(v) for v in self.header(name, limit)]
            self.folded_cache[name] = got
        return got

    def parts(self, name: str, part: str, casemap: bool, limit: int) -> list[str]:
        """One part (``address_part``) of every address in every field of that name, in
        order, folded with ``casemap``: what an ``address`` test without :index compares."""
        key = (name, part, casemap)
        got = self.parts_cache.get(key)
        if got is None:
            got = []
            for addresses in self.addresses(name, limit):
                for address in addresses:
                    value = address_part(address, part)
                    if value is not None:
                        got.append(fold(value) if casemap else value)
            self.parts_cache[key] = got
        return got

    def envelope(self, name: str, part: str, casemap: bool) -> list[str]:
        """What an ``envelope`` test compares for one envelope part ("from", "to",
        "auth"; lower case): [] for an unknown part or no AUTH, [""] for the null
        reverse-path whatever the address part; cached like ``parts``."""
        key = ("\x00" + name, part, casemap)  # no field name holds a NUL
        got = self.parts_cache.get(key)
        if got is None:
            address = (self.envelope_from if name == "from" else self.envelope_to
                       if name == "to" else self.auth if name == "auth" else None)
            got = []
            if address == "":
                got.append("")
            elif address is not None:
                value = address_part(address, part)
                if value is not None:
                    got.append(fold(value) if casemap else value)
            self.parts_cache[key] = got
        return got

    def raw_header(self, name: str, limit: int) -> list[str]:
        return self.fields(limit).get(name, [])

    def body(self, limit: int) -> bytes:
        if self._body is None:
            self._body = self.body_loader()[:limit]
        return self._body

    def body_texts(self, transform: str, types: tuple[str, ...], limit: int) -> list[str]:
        """What a ``body`` test compares: the raw body, the text parts, or the parts of
        the given content types, transfer-decoded and in Unicode."""
        raw = self.body(limit)
        if transform == "raw":
            return [raw.decode("utf-8", "replace")]
        if self._mime is None:
            self._mime = message_from_bytes(self.header_block + raw, policy=email_policy.compat32)
        wanted = ("text",) if transform == "text" else types
        out: list[str] = []
        for part in self._mime.walk():
            if part.is_multipart():
                continue
            ctype = part.get_content_type().lower()
            if not any(_type_matches(ctype, w.lower()) for w in wanted):
                continue
            payload = part.get_payload(decode=True)
            if not isinstance(payload, bytes):
                continue
            charset = part.get_content_charset() or "us-ascii"
            try:
                out.append(payload.decode(charset, "replace"))
            except LookupError:
                out.append(payload.decode("utf-8", "replace"))
        return out


def _type_matches(ctype: str, wanted: str) -> bool:
    if wanted == "":
        return True
    if "/" in wanted:
        return ctype == wanted
    return ctype.split("/", 1)[0] == wanted
