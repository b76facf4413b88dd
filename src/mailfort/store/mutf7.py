"""Modified UTF-7 (RFC 3501 §5.1.3), the mailbox name encoding of IMAP4rev1.

The Maildir++ folder names on disk are kept in it (``.Entw&APw-rfe``), as Courier and
Dovecot write them, so that other Maildir tools show the same names; the store's API takes
and gives Unicode (IMAP4rev2 is UTF-8), and an IMAP4rev1 session converts at its edge.
"""

from __future__ import annotations

import base64


def encode(name: str) -> str:
    """Unicode to modified UTF-7: printable ASCII stays (``&`` as ``&-``), the rest as
    base64 of UTF-16BE with ``,`` for ``/`` and no padding."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            raw = "".join(run).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            run.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    flush()
    return "".join(out)


def decode(text: str) -> str:
    """Modified UTF-7 to Unicode; ValueError for anything not in canonical form."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if not 0x20 <= ord(ch) <= 0x7E:
            raise ValueError("not modified UTF-7: raw non-ASCII")
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        end = text.find("-", i + 1)
        if end < 0:
            raise ValueError("not modified UTF-7: unterminated shift")
        chunk = text[i + 1:end]
        i = end + 1
        if not chunk:
            out.append("&")
            continue
        b64 = chunk.replace(",", "/")
        try:
            raw = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
            decoded = raw.decode("utf-16-be")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError("not modified UTF-7: bad base64 run") from exc
        if encode(decoded) != "&" + chunk + "-":
            raise ValueError("not modified UTF-7: not canonical")
        out.append(decoded)
    return "".join(out)
