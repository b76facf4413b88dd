"""Sieve comparators (RFC 4790: i;octet, i;ascii-casemap, i;ascii-numeric), match types
(RFC 5228 :is/:contains/:matches, RFC 5231 :count/:value) and date parts (RFC 5260).

``:matches`` is not handed to ``re``: a pattern with many ``*`` over a long header makes a
backtracking engine take time polynomial in the star count. ``glob`` places each literal run
at its earliest position (which is always a match when any exists), so a test costs
O(value x pattern) at worst, and the wildcards' captures are the shortest from the left
(what Pigeonhole gives ``${1}``). The caller passes ``tick`` to keep its CPU budget.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime, parsedate_to_datetime

_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

COMPARATORS = frozenset({"i;octet", "i;ascii-casemap", "i;ascii-numeric"})
RELATIONS: dict[str, Callable[[int, int], bool]] = {
    "gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le,
    "eq": operator.eq, "ne": operator.ne,
}
_DIGITS = re.compile(r"[0-9]+")


def fold(text: str) -> str:
    """i;ascii-casemap: A-Z to a-z, nothing else (so lengths and indices are kept)."""
    return text.lower() if text.isascii() else text.translate(_LOWER)


def numeric(text: str) -> int | None:
    """i;ascii-numeric: the leading digits' value; None (positive infinity) without any."""
    m = _DIGITS.match(text)
    return int(m.group()) if m else None


def order(comparator: str, a: str, b: str) -> int:
    """-1, 0 or 1: a against b under the comparator."""
    if comparator == "i;ascii-numeric":
        x, y = numeric(a), numeric(b)
        if x == y:
            return 0
        if x is None:
            return 1
        if y is None:
            return -1
        return -1 if x < y else 1
    if comparator == "i;ascii-casemap":
        a, b = fold(a), fold(b)
    return (a > b) - (a < b)


# ------------------------------------------------------------------------- :matches

Segment = tuple[str | None, ...]  # literal runs, None for one "?"


def compile_glob(pattern: str, casemap: bool) -> list[Segment]:
    """The pattern split at its "*" into segments of literal runs and "?"; backslash
    escapes the next character."""
    segments: list[Segment] = []
    current: list[str | None] = []
    literal: list[str] = []

    def end_literal() -> None:
        if literal:
            text = "".join(literal)
            current.append(fold(text) if casemap else text)
            literal.clear()

    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            literal.append(pattern[i + 1])
            i += 2
            continue
        if c == "*":
            end_literal()
            segments.append(tuple(current))
            current = []
        elif c == "?":
            end_literal()
            current.append(None)
        else:
            literal.append(c)
        i += 1
    end_literal()
    segments.append(tuple(current))
    return segments


def _seg_len(seg: Segment) -> int:
    return sum(1 if p is None else len(p) for p in seg)


def _seg_at(text: str, i: int, seg: Segment) -> bool:
    for piece in seg:
        if piece is None:
            if i >= len(text):
                return False
            i += 1
        else:
            if not text.startswith(piece, i):
                return False
            i += len(piece)
    return True


def _seg_caps(value: str, i: int, seg: Segment, caps: list[str]) -> None:
    for piece in seg:
        if piece is None:
            caps.append(value[i])
            i += 1
        else:
            i += len(piece)


def _seg_find(text: str, start: int, seg: Segment, tick: Callable[[], None]) -> int:
    length = _seg_len(seg)
    if len(seg) == 1 and seg[0] is not None:
        return text.find(seg[0], start)
    last = len(text) - length
    anchor_offset, anchor = 0, None
    for piece in seg:
        if piece is not None:
            anchor = piece
            break
        anchor_offset += 1
    i = start
    count = 0
    while i <= last:
        if anchor is not None:
            found = text.find(anchor, i + anchor_offset)
            if found < 0:
                return -1
            i = found - anchor_offset
            if i > last:
                return -1
        if _seg_at(text, i, seg):
            return i
        i += 1
        count += 1
        if count & 255 == 0:
            tick()
    return -1


def glob(value: str, segments: list[Segment], casemap: bool,
         tick: Callable[[], None]) -> list[str] | None:
    """The wildcards' captures (in pattern order) when the value matches, else None."""
    text = fold(value) if casemap else value
    caps: list[str] = []
    first = segments[0]
    if len(segments) == 1:
        if _seg_len(first) != len(text) or not _seg_at(text, 0, first):
            return None
        _seg_caps(value, 0, first, caps)
        return caps
    if not _seg_at(text, 0, first):
        return None
    _seg_caps(value, 0, first, caps)
    pos = _seg_len(first)
    for seg in segments[1:-1]:
        found = _seg_find(text, pos, seg, tick)
        if found < 0:
            return None
        caps.append(value[pos:found])
        _seg_caps(value, found, seg, caps)
        pos = found + _seg_len(seg)
    last = segments[-1]
    start = len(text) - _seg_len(last)
    if start < pos or not _seg_at(text, start, last):
        return None
    caps.append(value[pos:start])
    _seg_caps(value, start, last, caps)
    return caps


# ------------------------------------------------------------------------- dates

DATE_PARTS = frozenset({"year", "month", "day", "date", "julian", "hour", "minute", "second",
                        "time", "iso8601", "std11", "zone", "weekday"})
_ZONE = re.compile(r"^([+-])([0-9]{2})([0-9]{2})$")
_MJD_EPOCH = datetime(1858, 11, 17).date()


def parse_zone(text: str) -> timezone | None:
    m = _ZONE.match(text)
    if not m or int(m.group(2)) > 23 or int(m.group(3)) > 59:  # "+5000": no such zone
        return None
    delta = timedelta(hours=int(m.group(2)), minutes=int(m.group(3)))
    return timezone(-delta if m.group(1) == "-" else delta)


def parse_date(value: str) -> datetime | None:
    """An RFC 5322 date-time (the part after the last ';' for a Received field's value is
    the caller's); None when it is not one."""
    try:
        dt = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def date_part(dt: datetime, part: str) -> str:
    if part == "year":
        return f"{dt.year:04d}"
    if part == "month":
        return f"{dt.month:02d}"
    if part == "day":
        return f"{dt.day:02d}"
    if part == "date":
        return f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}"
    if part == "julian":
        return str((dt.date() - _MJD_EPOCH).days)
    if part == "hour":
        return f"{dt.hour:02d}"
    if part == "minute":
        return f"{dt.minute:02d}"
    if part == "second":
        return f"{dt.second:02d}"
    if part == "time":
        return f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
    if part == "iso8601":
        return dt.replace(microsecond=0).isoformat()
    if part == "std11":
        return format_datetime(dt)
    if part == "zone":
        return dt.strftime("%z") or "+0000"
    return str(dt.isoweekday() % 7)  # weekday: 0 is Sunday
