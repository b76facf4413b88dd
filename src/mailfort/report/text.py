"""Terminal text by display width: a CJK character takes two columns, so that Japanese
reports line up in the same columns as English ones."""

from __future__ import annotations

import textwrap
import unicodedata


def char_width(ch: str) -> int:
    return 2 if unicodedata.east_asian_width(ch) in "WF" else 1


def width(text: str) -> int:
    return sum(char_width(ch) for ch in text)


def pad(text: str, columns: int) -> str:
    """``text`` followed by spaces up to ``columns`` (never cut)."""
    return text + " " * max(0, columns - width(text))


def cut(text: str, columns: int) -> str:
    """``text`` in exactly ``columns``: padded, or cut with an ellipsis."""
    out, w = [], 0
    for ch in text:
        cw = char_width(ch)
        if w + cw > columns:
            return "".join(out[:-1]) + "…"
        out.append(ch)
        w += cw
    return "".join(out) + " " * (columns - w)


def wrap(text: str, columns: int) -> list[str]:
    """Lines of at most ``columns``: by words for narrow text, by characters for CJK."""
    if all(char_width(c) == 1 for c in text):
        return textwrap.wrap(text, columns)
    lines, cur = [], ""
    for ch in text:
        if width(cur + ch) > columns:
            lines.append(cur)
            cur = ""
        cur += ch
    return lines + ([cur] if cur else [])
