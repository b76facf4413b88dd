"""What IMAP FETCH returns and what SEARCH matches, for one message (RFC 9051 §6.4.4, §7.5.2).

Pure functions on the message octets: the caller reads the file, hands over its bytes and
the store's facts (flags, UID, size, internal date); nothing here opens a file or reads a
clock. Section octets and sizes are the raw octets of the file, in wire form: a file with
bare LF line ends is seen with CRLF (``to_wire``, as the store's RFC822.SIZE and Dovecot).

Why the MIME tree is cut here and not by ``email.message_from_bytes``: the ``email``
package (either policy) parses into objects and serialises them again, which refolds
headers and rewrites line ends; ``BODY[1.2]``, ``RFC822.SIZE`` and the body sizes of
BODYSTRUCTURE must be the stored octets, and a client that fetches ``BODY[HEADER]`` and
``BODY[TEXT]`` must get exactly ``BODY[]`` back. So header/body and boundary splitting work
on byte offsets, and ``email`` (``compat32`` helpers, which take a header value and never
see the octets) is used only where its job is the meaning of one value: Content-Type
parameters, RFC 2047 words for SEARCH, ``Date:`` for SENT*, charset decoding of bodies.

Bounds: nesting is cut at ``MAX_DEPTH`` levels (deeper parts are leaves), a multipart keeps
at most ``MAX_PARTS`` children, and SEARCH looks at no more than ``SEARCH_CAP`` octets of
decoded text per message, with ``in`` on case-folded text (never a regular expression from
the client). RFC 2047 encoded words are left as they are in ENVELOPE, as servers do.

Where the RFCs leave a choice (line counts, default charset, a multipart without boundary,
part 1 of a leaf, RFC 2231 parameters, SEARCH of a missing Date), the choice is the
reference Dovecot's, and tests/protocol/test_imap_message.py compares the two.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import datetime
import email.errors
import email.header
import email.message
import email.utils
import itertools
import quopri
import re
import urllib.parse
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

from mailfort.protocol.imap_parse import FetchAtt, SearchKey, Section, SequenceSet

MAX_DEPTH = 32  # MIME nesting kept; a deeper part is a leaf (Dovecot cuts too)
MAX_PARTS = 10000  # children of one multipart
SEARCH_CAP = 10 * 1024 * 1024  # octets of decoded text searched per message
QUOTED_MAX = 1024  # a longer string is sent as a literal

Nil = None


class UnknownCTE(ValueError):
    """BINARY on a part whose transfer encoding we cannot undo (``NO [UNKNOWN-CTE]``)."""


class Concat(tuple):
    """Items written side by side without spaces: the bodies of a multipart structure."""


class Literal8(bytes):
    """Binary octets that may hold NUL: written ``~{n}`` (RFC 3516)."""


# ---------------------------------------------------------------------------- the tree


def to_wire(data: bytes) -> bytes:
    """The message as IMAP shows it: a bare LF becomes CRLF (the store's RFC822.SIZE counts
    so too). Files written by mailfort are CRLF already and come back unchanged, uncopied;
    a file with no CR at all (LF endings, as Postfix writes) is converted in one pass."""
    if b"\r" not in data:
        return data.replace(b"\n", b"\r\n") if b"\n" in data else data
    if data.count(b"\n") == data.count(b"\r\n"):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@dataclass(eq=False)
class Part:
    """One MIME entity, as offsets into the octets it came from."""

    header: bytes  # the header block, the blank line that ends it included
    body: bytes
    fields: list[tuple[str, bytes]]  # (lower-case name, raw field with its line ends)
    maintype: str = "text"
    subtype: str = "plain"
    params: list[tuple[str, str]] = field(default_factory=list)
    children: list[Part] = field(default_factory=list)
    frames: list[bytes] = field(default_factory=list)  # around the children (multipart)
    message: Part | None = None  # the embedded message of message/rfc822

    @property
    def multipart(self) -> bool:
        return self.maintype.lower() == "multipart"

    def get(self, name: str) -> bytes | None:
        """The first field ``name``, unfolded, without its name: what ENVELOPE shows."""
        for lname, raw in self.fields:
            if lname == name:
                value = raw.split(b":", 1)[1] if b":" in raw else b""
                return value.replace(b"\r\n", b"").replace(b"\n", b"").strip(b" \t")
        return None


def _split_header(data: bytes) -> tuple[bytes, bytes]:
    """Header block (with its ending blank line) and body; a header-only entity has none."""
    if data.startswith(b"\r\n"):
        return data[:2], data[2:]
    if data.startswith(b"\n"):
        return data[:1], data[1:]
    crlf, lf = data.find(b"\r\n\r\n"), data.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf < lf + 1):
        return data[:crlf + 4], data[crlf + 4:]
    if lf >= 0:
        return data[:lf + 2], data[lf + 2:]
    return data, b""


# One field: a line that is not blank (its name before the first colon, if any), then the
# lines that start with a space or tab. Lines end as bytes.splitlines ends them (CRLF, CR,
# LF); a blank line ends the header. One regex match per field, not a loop per line.
_FIELD = re.compile(rb"(?!\r\n|\n)(?:([^\r\n:]*):)?[^\r\n]*(?:\r\n|\r|\n|\Z)"
                    rb"(?:[ \t][^\r\n]*(?:\r\n|\r|\n|\Z))*")


def _fields(header: bytes) -> list[tuple[str, bytes]]:
    """The fields of a header block, as ``_FIELD`` cuts them, from its lines: ``splitlines``
    ends lines where ``_FIELD`` does (CRLF, CR, LF), a line starting with a space or tab
    continues the field before it, a blank line ends the header. A third of the time
    of one match per field (the regex stays as the definition, ``_fields_by_regex``)."""
    out: list[tuple[str, bytes]] = []
    folded: list[bytes] = []  # the lines of the last field, when it has more than one
    for line in header.splitlines(keepends=True):
        if out and line[:1] in (b" ", b"\t"):
            if not folded:
                folded.append(out[-1][1])
            folded.append(line)  # joined once at the end of the field: linear
            continue
        if folded:
            out[-1] = (out[-1][0], b"".join(folded))
            folded = []
        if line == b"\r\n" or line == b"\n":
            break
        colon = line.find(b":")
        out.append((line[:colon].strip().decode("ascii", "replace").lower()
                    if colon > 0 else "", line))
    if folded:
        out[-1] = (out[-1][0], b"".join(folded))
    return out


def _fields_by_regex(header: bytes) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    pos, end = 0, len(header)
    match = _FIELD.match
    while pos < end:
        m = match(header, pos)
        if m is None or m.end() == pos:
            break
        name = m.group(1)
        out.append((name.strip().decode("ascii", "replace").lower() if name else "",
                    m.group(0)))
        pos = m.end()
    return out


def _content_type(part: Part, default: tuple[str, str]) -> None:
    raw = part.get("content-type")
    part.maintype, part.subtype = default
    part.params = [("charset", "us-ascii")] if default == ("text", "plain") else []
    if raw is None:
        return
    msg = email.message.Message()
    msg["Content-Type"] = raw.decode("utf-8", "surrogateescape")
    params = msg.get_params(header="content-type") or []
    if not params:
        return
    mime = params[0][0]
    if "/" not in mime:
        return
    main, sub = (x.strip() for x in mime.split("/", 1))
    if not main or not sub:
        return
    part.maintype, part.subtype = main, sub
    part.params = [_rfc2231(name, value) for name, value in params[1:]]
    if main.lower() == "text" and _param(part, "charset") is None:
        part.params.insert(0, ("charset", "us-ascii"))  # RFC 2045 §5.2, shown as Dovecot does


def _rfc2231(name: str, value: str | tuple[str, str, str]) -> tuple[str, str]:
    """A parameter as BODYSTRUCTURE shows it: continuations joined, an RFC 2231 value with
    a charset kept encoded (``name*`` "utf-8''%C3%A4"), as Dovecot does; IMAP strings have no
    charset of their own, so the client decodes it."""
    if not isinstance(value, tuple):
        return name, value
    charset, lang, text = value
    try:
        raw = text.encode("latin-1")  # email unquoted %XX into latin-1 characters
    except UnicodeEncodeError:
        return name, text
    if not charset:
        return name, raw.decode("utf-8", "surrogateescape")
    return f"{name}*", f"{charset}'{lang or ''}'" + urllib.parse.quote(raw, safe="!#$&+-.^_`|~")


def _param(part: Part, name: str) -> str | None:
    for key, value in part.params:
        if key.lower() == name:
            return value
    return None


def _split_multipart(body: bytes, boundary: bytes) -> tuple[list[bytes], list[bytes]]:
    """The bodies between ``--boundary`` lines (RFC 2046 §5.1.1: the CRLF before a
    delimiter belongs to it), and the frames around them (preamble and first delimiter,
    the delimiters between, the last and the epilogue): frames[0] + parts[0] + frames[1] …
    is the body again. No delimiter at all gives one empty part."""
    delim = b"--" + boundary
    starts: list[tuple[int, int, bool]] = []  # (line start, after the line, closing)
    pos = 0
    while len(starts) <= MAX_PARTS:
        i = body.find(delim, pos)
        if i < 0:
            break
        pos = i + len(delim)
        if i and body[i - 1:i] != b"\n":
            continue
        end = body.find(b"\n", pos)
        end = len(body) if end < 0 else end + 1
        closing = body[pos:pos + 2] == b"--"
        if not closing and body[pos:end].strip(b" \t\r\n"):
            continue  # a longer boundary that starts with ours
        starts.append((i, end, closing))
        pos = end
        if closing:
            break
    if not starts:
        return [b""], [body, b""]
    parts: list[bytes] = []
    frames: list[bytes] = []
    prev = 0
    for (_, after, closing), nxt in zip(starts, [*starts[1:], None], strict=True):
        if closing:
            break
        stop = len(body) if nxt is None else nxt[0]
        if nxt is not None:
            if body[stop - 2:stop] == b"\r\n" and stop - 2 >= after:
                stop -= 2
            elif body[stop - 1:stop] == b"\n" and stop - 1 >= after:
                stop -= 1
        frames.append(body[prev:after])
        parts.append(body[after:stop])
        prev = stop
    if not parts:
        return [b""], [body, b""]
    return parts, [*frames, body[prev:]]


def parse_header(data: bytes) -> Part:
    """The top header of ``data`` only, its fields split, no MIME look (what SEARCH on a
    header field and ENVELOPE need): Content-Type is not parsed, the body not cut."""
    header, body = _split_header(data)
    return Part(header, body, _fields(header))


def parse(data: bytes, *, _depth: int = 0,
          _default: tuple[str, str] = ("text", "plain")) -> Part:
    """The MIME tree of ``data``; never raises, whatever the octets."""
    header, body = _split_header(data)
    part = Part(header, body, _fields(header))
    _content_type(part, _default)
    if _depth >= MAX_DEPTH:
        return part
    if part.multipart:
        boundary = _param(part, "boundary")
        if not boundary:  # a multipart of one empty part, as Dovecot shows it
            part.children.append(parse(b"", _depth=_depth + 1))
            part.frames = [body, b""]
            return part
        child_default = ("message", "rfc822") if part.subtype.lower() == "digest" \
            else ("text", "plain")
        chunks, part.frames = _split_multipart(body, boundary.encode("utf-8",
                                                                     "surrogateescape"))
        for chunk in chunks:
            part.children.append(parse(chunk, _depth=_depth + 1, _default=child_default))
    elif (part.maintype.lower(), part.subtype.lower()) in (("message", "rfc822"),
                                                           ("message", "global")):
        part.message = parse(body, _depth=_depth + 1)
    return part


# ---------------------------------------------------------------------------- sections


def find_part(root: Part, numbers: tuple[int, ...]) -> Part | None:
    """The part ``1.2.3`` names (RFC 9051 §6.4.5), or None when there is none.

    A non-multipart message has one part, 1, its body; the parts of a message/rfc822
    part are those of the message it carries. Like Dovecot, part 1 of any other leaf is
    the leaf itself (``BODY[2.1]`` of an attachment is the attachment), but the body of a
    single-part message has no parts below it.
    """
    node = root
    candidates = root.children if root.multipart else [root]
    terminal = not root.multipart
    for n in numbers:
        if n < 1 or n > len(candidates):
            return None
        node = candidates[n - 1]
        if terminal:
            candidates = []
        elif node.multipart:
            candidates = node.children
        elif node.message is not None:
            inner = node.message
            candidates = inner.children if inner.multipart else [inner]
            terminal = not inner.multipart
        else:
            candidates = [node]
    return node


def _header_fields(part: Part, names: tuple[str, ...], negate: bool) -> bytes:
    wanted = {n.lower() for n in names}
    kept = [raw for name, raw in part.fields if (name in wanted) != negate]
    out = b"".join(kept)
    if out and not out.endswith(b"\n"):
        out += b"\r\n"
    ended = part.header.endswith(b"\n\n") or part.header.endswith(b"\n\r\n") \
        or part.header in (b"\r\n", b"\n")
    return out + b"\r\n" if ended else out  # no blank line where the header had none


def section_bytes(root: Part, section: Section, data: bytes) -> bytes | None:
    """The octets of ``BODY[section]`` (no partial), or None for a part that is not there."""
    if not section.part:
        target: Part | None = root
    else:
        node = find_part(root, section.part)
        if node is None:
            return None
        if section.text is None:
            return node.body
        if section.text == "MIME":
            return node.header
        target = node.message
        if target is None:
            return None
    if section.text is None:
        return data if target is root else target.header + target.body
    if section.text == "HEADER":
        return target.header
    if section.text == "TEXT":
        return target.body
    if section.text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        return _header_fields(target, section.fields, section.text.endswith(".NOT"))
    return None


def partial(octets: bytes | None, origin_count: tuple[int, int] | None) -> bytes | None:
    if octets is None or origin_count is None:
        return octets
    origin, count = origin_count
    return octets[origin:origin + count]


def _decode_cte(part: Part) -> bytes:
    cte = (part.get("content-transfer-encoding") or b"7bit").strip().lower()
    if cte in (b"7bit", b"8bit", b"binary", b""):
        return part.body
    if cte == b"base64":
        cleaned = bytes(c for c in part.body if c not in b" \t\r\n")
        try:
            return base64.b64decode(cleaned + b"=" * (-len(cleaned) % 4), validate=False)
        except (binascii.Error, ValueError) as exc:
            raise UnknownCTE("bad base64") from exc
    if cte == b"quoted-printable":
        return quopri.decodestring(part.body)
    raise UnknownCTE(cte.decode("ascii", "replace"))


def binary_bytes(root: Part, part_numbers: tuple[int, ...], data: bytes) -> bytes | None:
    """``BINARY[part]``: the part with its transfer encoding undone (RFC 3516).

    A multipart, a message/rfc822 part or the whole message (``BINARY[]``) comes back with
    every base64 or quoted-printable leaf inside decoded and labelled
    ``Content-Transfer-Encoding: binary``, as Dovecot does.
    """
    if not part_numbers:
        header, body = _binary(root)
        return header + body
    node = find_part(root, part_numbers)
    if node is None:
        return None
    if node.multipart or (node.message is not None and node is not root):
        return _binary(node)[1]
    return _decode_cte(node)


_IDENTITY = (b"7bit", b"8bit", b"binary", b"")


def _binary(part: Part) -> tuple[bytes, bytes]:
    """Header and body of ``part`` with the leaves inside decoded."""
    if part.multipart and part.children:
        out = [part.frames[0]]
        for child, frame in zip(part.children, part.frames[1:], strict=True):
            out += [*_binary(child), frame]
        return part.header, b"".join(out)
    if part.message is not None:
        return part.header, b"".join(_binary(part.message))
    cte = (part.get("content-transfer-encoding") or b"").strip().lower()
    if part.multipart or cte in _IDENTITY:
        return part.header, part.body
    body = _decode_cte(part)
    kept = b"".join(raw for name, raw in part.fields if name != "content-transfer-encoding")
    if kept and not kept.endswith(b"\n"):
        kept += b"\r\n"
    return kept + b"Content-Transfer-Encoding: binary\r\n\r\n", body


# ---------------------------------------------------------------------------- ENVELOPE


_TOKEN = re.compile(rb'[ \t\r\n]+|"((?:[^"\\]|\\.)*)"?|([<>,:;@])|(\()|([^ \t\r\n"(<>,:;@]+)',
                    re.DOTALL)  # a fixed pattern of ours, linear: no input reaches it as a regex
_UNESCAPE = re.compile(rb"\\(.)", re.DOTALL)


def _tokens(value: bytes) -> list[tuple[str, bytes]]:
    """Address-list tokens: ("q", quoted), ("a", atom), ("s", special); comments dropped."""
    out: list[tuple[str, bytes]] = []
    i, n = 0, len(value)
    while i < n:
        m = _TOKEN.match(value, i)
        if m is None:  # a lone backslash or ")": skip it
            i += 1
            continue
        quoted, special, comment, atom = m.groups()
        if quoted is not None:
            out.append(("q", _UNESCAPE.sub(rb"\1", quoted) if b"\\" in quoted else quoted))
        elif special is not None:
            out.append(("s", special))
        elif atom is not None:
            out.append(("a", atom))
        elif comment is not None:
            depth, j = 1, m.end()
            while j < n and depth:
                ch = value[j]
                if ch == 0x5C:  # backslash
                    j += 1
                elif ch == 0x28:
                    depth += 1
                elif ch == 0x29:
                    depth -= 1
                j += 1
            i = j
            continue
        i = m.end()
    return out


def _address(tokens: list[tuple[str, bytes]]) -> tuple | None:
    if not tokens:
        return None
    name: bytes | None = None
    spec = tokens
    if ("s", b"<") in tokens:
        k = tokens.index(("s", b"<"))
        words = [t[1] for t in tokens[:k]]
        name = b" ".join(words) if words else None
        spec = [t for t in tokens[k + 1:] if t != ("s", b">")]
    adl: bytes | None = None
    if ("s", b":") in spec:  # obsolete route: @a,@b:local@host
        k = spec.index(("s", b":"))
        adl = b"".join(t[1] for t in spec[:k]) or None
        spec = spec[k + 1:]
    at = max((i for i, t in enumerate(spec) if t == ("s", b"@")), default=-1)
    if at >= 0:
        local = b"".join(t[1] for t in spec[:at])
        host: bytes | None = b"".join(t[1] for t in spec[at + 1:]) or b"MISSING_DOMAIN"
    else:
        local, host = b"".join(t[1] for t in spec), b"MISSING_DOMAIN"
    return (name, adl, local or b"MISSING_MAILBOX", host)


def addresses(value: bytes | None) -> tuple | None:
    """An address list as ENVELOPE shows it, groups as (NIL NIL name NIL) … (NIL NIL NIL NIL)."""
    if value is None:
        return None
    out: list[tuple] = []
    seg: list[tuple[str, bytes]] = []
    in_group = angle = seg_addr = False  # seg_addr: "@" or "<" seen in this segment
    for tok in _tokens(value):
        if tok == ("s", b"<"):
            angle = seg_addr = True
        elif tok == ("s", b">"):
            angle = False
        elif tok == ("s", b"@"):
            seg_addr = True
        if tok == ("s", b":") and not angle and not in_group and not seg_addr:
            out.append((None, None, b" ".join(t[1] for t in seg), None))
            in_group, seg = True, []
            continue
        if tok in (("s", b","), ("s", b";")) and not angle:
            addr = _address(seg)
            if addr:
                out.append(addr)
            seg, seg_addr = [], False
            if tok == ("s", b";") and in_group:
                out.append((None, None, None, None))
                in_group = False
            continue
        seg.append(tok)
    addr = _address(seg)
    if addr:
        out.append(addr)
    if in_group:
        out.append((None, None, None, None))
    return tuple(out) or None


_ENVELOPE_FIELDS = frozenset({"date", "subject", "from", "sender", "reply-to", "to", "cc", "bcc",
                              "in-reply-to", "message-id"})
_MEMO_VALUE = 1024  # address values up to this long are memoised (they repeat in a mailbox)


@lru_cache(maxsize=4096)
def _addresses_memo(value: bytes) -> bytes:
    return encode(addresses(value))


def _addresses_wire(value: bytes | None) -> bytes:
    """``encode(addresses(value))``, memoised for short values: a mailbox holds the same
    From and To in message after message, and their parse is most of an ENVELOPE."""
    if value is not None and len(value) <= _MEMO_VALUE:
        return _addresses_memo(value)
    return encode(addresses(value))


def _nstring(value: bytes | None) -> bytes:
    return b"NIL" if value is None else _string(value)


def envelope_wire(part: Part) -> bytes:
    """``encode(envelope(part))``, octet for octet, in one pass over the fields."""
    first: dict[str, bytes] = {}
    for lname, raw in part.fields:
        if lname in _ENVELOPE_FIELDS and lname not in first:
            value = raw.split(b":", 1)[1] if b":" in raw else b""
            first[lname] = value.replace(b"\r\n", b"").replace(b"\n", b"").strip(b" \t")
    get = first.get
    frm = _addresses_wire(get("from"))
    sender = _addresses_wire(get("sender"))
    reply_to = _addresses_wire(get("reply-to"))
    return b"(" + b" ".join((
        _nstring(get("date")), _nstring(get("subject")), frm,
        frm if sender == b"NIL" else sender, frm if reply_to == b"NIL" else reply_to,
        _addresses_wire(get("to")), _addresses_wire(get("cc")), _addresses_wire(get("bcc")),
        _nstring(get("in-reply-to")), _nstring(get("message-id")))) + b")"


_ENVELOPE_NAMES = frozenset(n.encode() for n in _ENVELOPE_FIELDS)
_NIL = b"NIL"


def envelope_of_header(data: bytes) -> bytes:
    """``envelope_wire(parse_header(data))``, octet for octet, without the generic parse: the
    header's lines up to the first blank one (as ``_fields`` cuts them: ``splitlines``, a
    line starting with a space or tab continues the field before it), only the first of
    each ENVELOPE field kept, no other field's name decoded or kept. A cold ENVELOPE FETCH
    of thousands of messages spent most of its time in the generic parse (tested against
    it for any octets). One regex over the header measured slower than this loop."""
    first: dict[bytes, list[bytes]] = {}
    current: list[bytes] | None = None  # the lines of the field being read, if kept
    started = False  # a field has been seen (a leading space line continues nothing)
    for line in data.splitlines(keepends=True):
        if started and line[:1] in (b" ", b"\t"):
            if current is not None:
                current.append(line)
            continue
        if line == b"\r\n" or line == b"\n":
            break
        started = True
        colon = line.find(b":")
        if colon > 0:
            name = line[:colon].strip().lower()
            if name in _ENVELOPE_NAMES and name not in first:
                current = first[name] = [line]
                continue
        current = None
    values: dict[bytes, bytes] = {}
    for name, lines in first.items():
        if len(lines) == 1:  # one line: its only line end is its last octets
            line = lines[0]
            value = line[line.find(b":") + 1:]
            if value[-2:] == b"\r\n":
                value = value[:-2]
            elif value[-1:] == b"\n":
                value = value[:-1]
        else:
            value = b"".join(lines).split(b":", 1)[1].replace(b"\r\n", b"").replace(b"\n", b"")
        values[name] = value.strip(b" \t")
    get = values.get
    frm = _addresses_or_nil(get(b"from"))
    sender = _addresses_or_nil(get(b"sender"))
    reply_to = _addresses_or_nil(get(b"reply-to"))
    date, subject = get(b"date"), get(b"subject")
    in_reply_to, message_id = get(b"in-reply-to"), get(b"message-id")
    return b"(" + b" ".join((
        _NIL if date is None else _string(date), _NIL if subject is None else _string(subject),
        frm, frm if sender == _NIL else sender, frm if reply_to == _NIL else reply_to,
        _addresses_or_nil(get(b"to")), _addresses_or_nil(get(b"cc")),
        _addresses_or_nil(get(b"bcc")),
        _NIL if in_reply_to is None else _string(in_reply_to),
        _NIL if message_id is None else _string(message_id))) + b")"


def _addresses_or_nil(value: bytes | None) -> bytes:
    """``_addresses_wire`` with the absent field (most of an ENVELOPE's eight) answered
    at once."""
    if value is None:
        return _NIL
    if len(value) <= _MEMO_VALUE:
        return _addresses_memo(value)
    return encode(addresses(value))


def envelope(part: Part) -> tuple:
    """ENVELOPE (RFC 9051 §7.5.2) of a message: sender and reply-to default to from."""
    frm = addresses(part.get("from"))
    sender = addresses(part.get("sender")) or frm
    reply_to = addresses(part.get("reply-to")) or frm
    return (part.get("date"), part.get("subject"), frm, sender, reply_to,
            addresses(part.get("to")), addresses(part.get("cc")), addresses(part.get("bcc")),
            part.get("in-reply-to"), part.get("message-id"))


# ---------------------------------------------------------------------------- BODYSTRUCTURE


def _lines(body: bytes) -> int:
    """Line ends in the body: a last line without one (before a boundary) is not counted,
    as Dovecot counts."""
    return body.count(b"\n")


def _plist(params: list[tuple[str, str]]) -> tuple | None:
    flat: list[object] = []
    for key, value in params:
        flat += [key.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape")]
    return tuple(flat) or None


def _disposition(part: Part) -> tuple | None:
    raw = part.get("content-disposition")
    if raw is None:
        return None
    msg = email.message.Message()
    msg["Content-Disposition"] = raw.decode("utf-8", "surrogateescape")
    params = msg.get_params(header="content-disposition") or []
    if not params or not params[0][0]:
        return None
    rest = [_rfc2231(k, v) for k, v in params[1:]]
    return (params[0][0].encode("utf-8", "surrogateescape"), _plist(rest))


def _language(part: Part) -> tuple | None:
    raw = part.get("content-language")
    if raw is None:
        return None
    langs = tuple(x.strip() for x in raw.split(b",") if x.strip())
    return langs or None


def bodystructure(part: Part, extended: bool = True) -> tuple:
    """BODYSTRUCTURE (``extended``) or BODY of ``part``, as nested Python values."""
    ext: tuple = ()
    if part.multipart:
        if extended:
            ext = (_plist(part.params), _disposition(part), _language(part),
                   part.get("content-location"))
        return (Concat(bodystructure(c, extended) for c in part.children),
                part.subtype.encode("utf-8", "surrogateescape"), *ext)
    enc = part.get("content-transfer-encoding")
    basic = (part.maintype.encode("utf-8", "surrogateescape"),
             part.subtype.encode("utf-8", "surrogateescape"), _plist(part.params),
             part.get("content-id"), part.get("content-description"), enc or b"7bit",
             len(part.body))
    if part.message is not None:
        basic += (envelope(part.message), bodystructure(part.message, extended),
                  _lines(part.body))
    elif part.maintype.lower() == "text":
        basic += (_lines(part.body),)
    if extended:
        ext = (part.get("content-md5"), _disposition(part), _language(part),
               part.get("content-location"))
    return basic + ext


# ---------------------------------------------------------------------------- encoding


_UNQUOTABLE = re.compile(rb"[\x00\r\n\x80-\xff]")


def _quotable(s: bytes) -> bool:
    return len(s) <= QUOTED_MAX and _UNQUOTABLE.search(s) is None


_NOT_PLAIN = b'\x00\r\n"\\'  # with non-ASCII: what a quoted string cannot hold as it is


def _string(value: bytes) -> bytes:
    """A quoted string when it can hold ``value``, else a literal. The common case (ASCII,
    nothing to escape) is told by two C calls: 0.26 against 0.68 µs for the regex and two
    ``in`` tests, three times per ENVELOPE (date, subject, message-id)."""
    if len(value) <= QUOTED_MAX and value.isascii() and \
            len(value.translate(None, _NOT_PLAIN)) == len(value):
        return b'"' + value + b'"'
    if len(value) <= QUOTED_MAX and _UNQUOTABLE.search(value) is None:
        if b"\\" in value or b'"' in value:
            value = value.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
        return b'"' + value + b'"'
    return b"{%d}\r\n" % len(value) + value


def encode(value: object) -> bytes:
    """IMAP wire form: NIL, numbers, quoted strings when safe, literals otherwise, lists.

    Exact types are tested first: an ENVELOPE of 2,000 messages is some 60,000 values."""
    kind = type(value)
    if kind is bytes:
        return _string(value)  # type: ignore[arg-type]
    if value is None:
        return b"NIL"
    if kind is tuple:
        return b"(" + b" ".join([encode(v) for v in value]) + b")"  # type: ignore[attr-defined]
    if isinstance(value, bool):
        raise TypeError("bool is not an IMAP value")
    if isinstance(value, int):
        return str(value).encode("ascii")
    if isinstance(value, Literal8):
        return b"~{%d}\r\n" % len(value) + bytes(value)
    if isinstance(value, str):
        return _string(value.encode("utf-8", "surrogateescape"))
    if isinstance(value, bytes):
        return _string(bytes(value))
    if isinstance(value, Concat):
        return b"".join(encode(v) for v in value)
    if isinstance(value, tuple | list):
        return b"(" + b" ".join(encode(v) for v in value) + b")"
    raise TypeError(f"not an IMAP value: {type(value).__name__}")


def _section_spec(att: FetchAtt) -> bytes:
    sec = att.section or Section()
    spec = ".".join(str(n) for n in sec.part)
    if sec.text:
        spec = f"{spec}.{sec.text}" if spec else sec.text
        if sec.fields:
            spec += " (" + " ".join(f.upper() for f in sec.fields) + ")"
    return spec.encode("utf-8", "replace")


def fetch_item(att: FetchAtt, data: bytes, root: Part | None = None) -> bytes:
    """One ``name value`` pair of a FETCH response for a message-content item.

    Covers ENVELOPE, BODY, BODYSTRUCTURE, RFC822(.HEADER/.TEXT/.SIZE), BODY[…]<…>,
    BINARY[…]<…> and BINARY.SIZE[…]; FLAGS, UID, INTERNALDATE and MODSEQ are the
    engine's (they come from the store, not the octets). Raises ``UnknownCTE`` for
    BINARY on an encoding it cannot undo, ``ValueError`` for an item it does not serve.
    Given ``root``, ``data`` must be the wire octets it was parsed from (``to_wire``).
    """
    if root is None:
        data = to_wire(data)
        root = parse(data)
    name = att.name
    if name == "ENVELOPE":
        return b"ENVELOPE " + envelope_wire(root)
    if name in ("BODYSTRUCTURE", "BODY") and att.section is None:
        return name.encode() + b" " + encode(bodystructure(root, name == "BODYSTRUCTURE"))
    if name == "RFC822.SIZE":
        return b"RFC822.SIZE %d" % len(data)
    if name == "RFC822":
        return b"RFC822 " + encode(data)
    if name == "RFC822.HEADER":
        return b"RFC822.HEADER " + encode(root.header)
    if name == "RFC822.TEXT":
        return b"RFC822.TEXT " + encode(root.body)
    if name in ("BODY", "BODY.PEEK") and att.section is not None:
        octets = partial(section_bytes(root, att.section, data), att.partial)
        origin = b"<%d>" % att.partial[0] if att.partial else b""
        return b"BODY[" + _section_spec(att) + b"]" + origin + b" " + encode(octets)
    if name in ("BINARY", "BINARY.PEEK", "BINARY.SIZE") and att.section is not None:
        decoded = binary_bytes(root, att.section.part, data)
        spec = b"[" + _section_spec(att) + b"]"
        if name == "BINARY.SIZE":
            return b"BINARY.SIZE" + spec + b" " + (encode(None) if decoded is None
                                                   else b"%d" % len(decoded))
        decoded = partial(decoded, att.partial)
        origin = b"<%d>" % att.partial[0] if att.partial else b""
        value: object = None
        if decoded is not None:
            value = Literal8(decoded) if b"\x00" in decoded else decoded
        return b"BINARY" + spec + origin + b" " + encode(value)
    raise ValueError(f"not a message-content item: {name}")


# ---------------------------------------------------------------------------- SEARCH


def _decode_words(raw: bytes) -> str:
    """A header value with RFC 2047 words decoded; undecodable octets read as UTF-8."""
    text = raw.decode("utf-8", "replace")
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        return text


def _body_text(part: Part, budget: list[int], headers: bool = False) -> list[str]:
    """Decoded text of the text/* leaves (and of messages inside), within ``budget``; the
    headers of messages inside only for TEXT (BODY leaves them out, as Dovecot does)."""
    out: list[str] = []
    if budget[0] <= 0:
        return out
    if part.multipart:
        for child in part.children:
            out += _body_text(child, budget, headers)
    elif part.message is not None:
        if headers:
            out.append(header_text(part.message)[:budget[0]])
            budget[0] -= len(out[-1])
        out += _body_text(part.message, budget, headers)
    elif part.maintype.lower() == "text":
        try:
            raw = _decode_cte(part)
        except UnknownCTE:
            raw = part.body
        raw = raw[:budget[0]]
        budget[0] -= len(raw)
        charset = _param(part, "charset") or "utf-8"
        if charset.lower() in ("us-ascii", "ascii"):
            charset = "utf-8"  # a superset: undeclared 8-bit text is most often UTF-8
        try:
            out.append(raw.decode(charset, "replace"))
        except LookupError:
            out.append(raw.decode("utf-8", "replace"))
    return out


def header_text(part: Part) -> str:
    return "\n".join(_decode_words(raw) for _, raw in part.fields)


def _in_set(n: int, seqset: SequenceSet, star: int) -> bool:
    for lo, hi in seqset.ranges:
        a, b = (star if lo is None else lo), (star if hi is None else hi)
        if min(a, b) <= n <= max(a, b):
            return True
    return False


@dataclass
class SearchMessage:
    """One message as SEARCH sees it: its octets and the store's facts about it.

    ``tz`` is the server's zone for BEFORE/ON/SINCE (internal date, day granularity);
    ``last_seq``/``last_uid`` stand for ``*``; ``now`` is for OLDER/YOUNGER.
    """

    data: bytes
    flags: frozenset[str]
    uid: int
    seq: int
    size: int
    internal_date: int
    tz: datetime.tzinfo = datetime.UTC
    last_seq: int = 0
    last_uid: int = 0
    recent: bool = False
    modseq: int = 0
    now: int = 0

    @cached_property
    def root(self) -> Part:
        return parse(to_wire(self.data[:SEARCH_CAP]))

    @cached_property
    def lower_flags(self) -> frozenset[str]:
        return frozenset(f.lower() for f in self.flags)

    @cached_property
    def body(self) -> str:
        return "".join(_body_text(self.root, [SEARCH_CAP])).casefold()

    @cached_property
    def text(self) -> str:
        """What TEXT searches: the header, the body and the headers of messages inside."""
        head = header_text(self.root)[:SEARCH_CAP]
        rest = _body_text(self.root, [SEARCH_CAP - len(head)], headers=True)
        return "\n".join([head, *rest]).casefold()

    def field(self, name: str) -> list[str]:
        name = name.lower()
        return [_decode_words(raw.split(b":", 1)[1] if b":" in raw else b"")
                for lname, raw in self.root.fields if lname == name]

    def address_field(self, name: str) -> list[str]:
        """An address field as its envelope reads: ``name <mailbox@host>``, comments gone."""
        out = []
        for lname, raw in self.root.fields:
            if lname != name.lower():
                continue
            for dname, _adl, mailbox, host in addresses(raw.split(b":", 1)[1]) or ():
                words = [_decode_words(dname)] if dname else []
                if mailbox is not None:
                    at = b"@" + host if host is not None else b""
                    words.append("<" + (mailbox + at).decode("utf-8", "replace") + ">")
                out.append(" ".join(words))
        return out

    @cached_property
    def sent_date(self) -> datetime.date | None:
        raw = self.root.get("date")
        if raw is None:
            return None
        parsed = email.utils.parsedate_tz(raw.decode("ascii", "replace"))
        if parsed is None:
            return None
        try:
            return datetime.date(*parsed[:3])
        except ValueError:
            return None

    @cached_property
    def internal_day(self) -> datetime.date:
        return datetime.datetime.fromtimestamp(self.internal_date, self.tz).date()


# ---------------------------------------------------------------------------- SEARCH probe

# What a value of a parameter named charset may be for the octets to read as themselves
# (ASCII octets are the same characters in each of these).
_ASCII_SAFE = re.compile(rb'charset[ \t]*=[ \t]*"?(?:us-ascii|ascii|utf-8|utf8|iso-8859-[0-9]{1,2}'
                         rb'|windows-125[0-8]|cp125[0-8]|latin-?1|koi8-[ru])(?![-0-9a-z_])')
_CTE_PLAIN = re.compile(rb"content-transfer-encoding[ \t]*:[ \t]*(?:7bit|8bit|binary)[ \t]*\r?\n")


@dataclass(frozen=True, slots=True)
class Probe:
    """Needles every match must contain: ``(where, needle)``, ``where`` "header" (SUBJECT,
    HEADER), "body" (BODY) or "text" (TEXT); needles ASCII, case-folded, without CR or LF."""

    needles: tuple[tuple[str, bytes], ...]


def search_probe(key: SearchKey) -> Probe | None:
    """The needles a message must hold for ``key`` to match (from the key and the ``AND``
    under it; ``OR`` and ``NOT`` promise nothing), None when there are none."""
    found: list[tuple[str, bytes]] = []

    def walk(k: SearchKey) -> None:
        if k.name == "AND":
            for child in k.children:
                walk(child)
            return
        where = {"SUBJECT": "header", "HEADER": "header", "BODY": "body", "TEXT": "text"}.get(
            k.name)
        if where is None or not k.args:
            return
        text = _text(k.args[-1])
        if text and text.isascii() and "\r" not in text and "\n" not in text:
            found.append((where, text.encode("ascii")))

    walk(key)
    return Probe(tuple(found)) if found else None


def _reads_as_is(low: bytes) -> bool:
    """Whether the decoded text SEARCH sees of an ASCII message (lower-cased ``low``) is
    its octets as they are: no transfer encoding to undo, no charset that maps ASCII octets
    elsewhere, one body (BODY joins text parts without a separator, so a needle could
    span two of them). Conservative: any mention it cannot vouch for says no."""
    if b"multipart" in low:
        return False
    n = low.count(b"content-transfer-encoding")
    if n and len(_CTE_PLAIN.findall(low)) != n:
        return False
    n = low.count(b"charset")
    return not n or len(_ASCII_SAFE.findall(low)) == n


def excluded(probe: Probe, data: bytes, whole: bool) -> bool:
    """True when ``data`` (the message, or its header when not ``whole``) cannot match:
    some needle is not among its octets, and the octets are what SEARCH would compare
    (ASCII, whose case-folding is lower-casing, no RFC 2047 word, no decoding to do).
    False means "look properly": never a wrong answer, only a slower one."""
    if not data.isascii():
        return False  # decoding or case-folding could make text that is not in the octets
    low = data.lower()
    words: bool | None = None  # an RFC 2047 word somewhere (headers are decoded)
    plain: bool | None = None
    for where, needle in probe.needles:
        if needle in low or (where != "header" and not whole):
            continue
        if where != "body":
            if words is None:
                words = b"=?" in low
            if words:
                continue
        if where == "header":
            return True  # header values are the octets (ASCII, no encoded word)
        if plain is None:
            plain = _reads_as_is(low)
        if plain:
            return True
    return False


def header_candidates(probe: Probe, headers: list[bytes]) -> list[int] | None:
    """Indexes into ``headers`` (message headers, in order) that ``excluded`` would not pass
    over, found in one sweep of their joined octets (a repeated header SEARCH of 10,000
    cached headers is then a few ``bytes.find``, not 10,000 calls); None when the probe
    has a needle other than a header one (then message by message)."""
    if any(where != "header" or b"\0" in needle for where, needle in probe.needles):
        return None
    low = b"\0".join(headers).lower()  # no needle holds the separator: none spans two
    ends = list(itertools.accumulate(len(h) + 1 for h in headers))  # next one's start
    keep: set[int] | None = None
    for _, needle in probe.needles:
        hits: set[int] = set()
        pos = low.find(needle)
        while pos >= 0:
            i = bisect.bisect_right(ends, pos)
            hits.add(i)
            pos = low.find(needle, ends[i])
        keep = hits if keep is None else keep & hits
    # octets that decoding could turn into other text: always looked at properly
    murky = set() if low.isascii() else {i for i, h in enumerate(headers) if not h.isascii()}
    pos = low.find(b"=?")
    while pos >= 0:
        i = bisect.bisect_right(ends, pos)
        murky.add(i)
        pos = low.find(b"=?", ends[i])
    return sorted((keep or set()) | murky)


_FLAG_KEYS = {"ANSWERED": "\\answered", "DELETED": "\\deleted", "DRAFT": "\\draft",
              "FLAGGED": "\\flagged", "SEEN": "\\seen"}


def _text(arg: object) -> str:
    if isinstance(arg, bytes):
        return arg.decode("utf-8", "replace").casefold()
    return str(arg).casefold()


def matches(key: SearchKey, msg: SearchMessage) -> bool:
    """Whether ``msg`` satisfies ``key`` (RFC 9051 §6.4.4); substring keys are
    case-insensitive on decoded UTF-8 text. An unknown key matches nothing."""
    name = key.name
    if name == "ALL":
        return True
    if name == "AND":
        return all(matches(k, msg) for k in key.children)
    if name == "OR":
        return any(matches(k, msg) for k in key.children)
    if name == "NOT":
        return not matches(key.children[0], msg)
    if name in _FLAG_KEYS:
        return _FLAG_KEYS[name] in msg.lower_flags
    if name.startswith("UN") and name[2:] in _FLAG_KEYS:
        return _FLAG_KEYS[name[2:]] not in msg.lower_flags
    if name == "RECENT":
        return msg.recent
    if name == "OLD":
        return not msg.recent
    if name == "NEW":
        return msg.recent and "\\seen" not in msg.lower_flags
    if name == "KEYWORD":
        return str(key.args[0]).lower() in msg.lower_flags
    if name == "UNKEYWORD":
        return str(key.args[0]).lower() not in msg.lower_flags
    if name in ("FROM", "TO", "CC", "BCC"):
        needle = _text(key.args[0])
        return any(needle in v.casefold() for v in msg.address_field(name))
    if name == "SUBJECT":
        needle = _text(key.args[0])
        return any(needle in v.casefold() for v in msg.field(name))
    if name == "HEADER":
        values = msg.field(str(key.args[0]))
        needle = _text(key.args[1])
        return any(needle in v.casefold() for v in values)
    if name == "BODY":
        return _text(key.args[0]) in msg.body
    if name == "TEXT":
        needle = _text(key.args[0])
        return needle in msg.text
    if name in ("BEFORE", "ON", "SINCE"):
        return _date_cmp(name, msg.internal_day, key.args[0])
    if name in ("SENTBEFORE", "SENTON", "SENTSINCE"):
        # no or a bad Date: counts as 1 Jan 1970, as Dovecot does (SENTBEFORE finds it)
        sent = msg.sent_date or datetime.date(1970, 1, 1)
        return _date_cmp(name[4:], sent, key.args[0])
    if name == "LARGER":
        return msg.size > int(key.args[0])  # type: ignore[call-overload]
    if name == "SMALLER":
        return msg.size < int(key.args[0])  # type: ignore[call-overload]
    if name == "OLDER":
        return msg.now - msg.internal_date >= int(key.args[0])  # type: ignore[call-overload]
    if name == "YOUNGER":
        return msg.now - msg.internal_date <= int(key.args[0])  # type: ignore[call-overload]
    if name == "UID":
        return _in_set(msg.uid, key.args[0], msg.last_uid)  # type: ignore[arg-type]
    if name == "SEQSET":
        return _in_set(msg.seq, key.args[0], msg.last_seq)  # type: ignore[arg-type]
    if name == "MODSEQ":
        return msg.modseq >= int(key.args[-1])  # type: ignore[call-overload]
    return False


def _date_cmp(op: str, day: datetime.date, wanted: object) -> bool:
    if op == "BEFORE":
        return day < wanted  # type: ignore[operator]
    if op == "ON":
        return day == wanted
    return day >= wanted  # type: ignore[operator]
