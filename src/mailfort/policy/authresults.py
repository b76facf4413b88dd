"""The Authentication-Results header field (RFC 8601): write ours, drop forgeries of it.

Formatted here rather than with a library: the field we write has a fixed, small shape
(method=result, a comment, property=value pairs), the values are domains, selectors and
addresses that only need quoting when they are not tokens, and the part a library would
add (parsing arbitrary fields) is needed only for the authserv-id of incoming fields,
which is the first word of the value.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mailfort.policy.dkim import DKIMResult
from mailfort.policy.dmarc import DMARCResult
from mailfort.policy.spf import SPFResult

FIELD = "Authentication-Results"
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`{|}~]+$")  # RFC 2045 token, minus tspecials
_ADDR = re.compile(r"^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.]*@[A-Za-z0-9.\-]+$")


def _value(v: str) -> str:
    """A property value: as is when it is a token or a simple address, else quoted."""
    if v and (_TOKEN.match(v) or _ADDR.match(v)):
        return v
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    text = re.sub(r"[\x00-\x1f\x7f]", " ", text)[:120]
    return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def format_field(
    authserv_id: str,
    spf: Sequence[SPFResult],
    dkim: Sequence[DKIMResult],
    dmarc: DMARCResult | None,
    sender: str,
) -> bytes:
    """The whole field, folded one result per line, CRLF-terminated."""
    parts: list[str] = []
    for r in spf:
        prop = f"smtp.mailfrom={_value(sender or 'postmaster@' + r.domain)}" \
            if r.identity == "mailfrom" else f"smtp.helo={_value(r.domain)}"
        note = f" {_comment(r.reason)}" if r.reason and r.result != "pass" else ""
        parts.append(f"spf={r.result}{note} {prop}")
    if not dkim:
        parts.append("dkim=none")
    for d in dkim:
        note = f" {_comment(d.reason)}" if d.reason else ""
        props = [f"header.d={_value(d.domain)}", f"header.s={_value(d.selector)}"]
        if d.algorithm:
            props.append(f"header.a={_value(d.algorithm)}")
        if d.header_b:
            props.append(f"header.b={_value(d.header_b)}")
        parts.append(f"dkim={d.result}{note} " + " ".join(props))
    if dmarc is not None:
        note = _comment(f"p={dmarc.policy} dis={dmarc.disposition}" if dmarc.result != "none"
                        else dmarc.reason)
        prop = f" header.from={_value(dmarc.domain)}" if dmarc.domain else ""
        parts.append(f"dmarc={dmarc.result} {note}{prop}")
    body = ";\r\n\t".join([authserv_id, *parts])
    return f"{FIELD}: {body}\r\n".encode("utf-8", "replace")


def authserv_id(value: bytes) -> str:
    """The authserv-id of a field's value: its first word, comments and folding removed."""
    text = value.decode("utf-8", "replace")
    depth, out = 0, []
    for ch in text:  # drop comments (they nest, RFC 5322 §3.2.2)
        if ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif not depth:
            out.append(ch)
    text = "".join(out).strip()
    if text.startswith('"'):
        end = text.find('"', 1)
        return text[1:end if end > 0 else None].lower()
    return re.split(r"[\s;]", text, maxsplit=1)[0].lower()


def strip_ours(header_block: bytes, hostname: str) -> tuple[bytes, int]:
    """The header block without Authentication-Results fields that claim ``hostname``
    (RFC 8601 §5: a forgery, since only we write fields with our authserv-id)."""
    ours = hostname.lower().rstrip(".")
    lines = header_block.split(b"\r\n")
    kept: list[bytes] = []
    removed = 0
    field: list[bytes] = []

    def flush() -> None:
        nonlocal removed
        if not field:
            return
        name, _, value = field[0].partition(b":")
        if name.strip().lower() == FIELD.lower().encode() and authserv_id(
            b" ".join([value, *field[1:]])
        ).rstrip(".") == ours:
            removed += 1
        else:
            kept.extend(field)
        field.clear()

    for line in lines:
        if line[:1] in (b" ", b"\t") and field:
            field.append(line)
        else:
            flush()
            field.append(line)
    flush()
    return b"\r\n".join(kept), removed
