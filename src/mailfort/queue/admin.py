"""Backend of ``mailfort queue list | show ID | retry [ID] | delete ID``.

Each function takes the queue directory (``queue_root(cfg)``) and returns the text to
print; errors (unknown or malformed id) raise ``QueueError`` with a message fit for the
user. They work on the files directly, so they work whether or not the server runs; a
running worker notices ``retry`` at its next rescan (within a minute).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from mailfort.config import Config
from mailfort.queue.dsn import original_headers
from mailfort.queue.store import Entry, Queue, QueueError

__all__ = ["QueueError", "queue_delete", "queue_list", "queue_retry", "queue_root",
           "queue_show"]


def queue_root(cfg: Config) -> Path:
    return cfg.data_path / "queue"


def _when(t: float | None) -> str:
    if not t:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _age(seconds: float) -> str:
    s = int(max(seconds, 0))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _sender(entry: Entry) -> str:
    return f"<{entry.sender}>"


def format_list(entries: list[Entry], now: float | None = None) -> str:
    """One line per entry: id, age, size, sender, remaining/total recipients, next try."""
    now = time.time() if now is None else now
    if not entries:
        return "queue is empty"
    rows = [("ID", "AGE", "SIZE", "SENDER", "RCPTS", "NEXT ATTEMPT")]
    for e in entries:
        left = len(e.active)
        rows.append((
            e.id,
            _age(now - e.created),
            str(e.size),
            _sender(e),
            f"{left}/{len(e.recipients)}",
            _when(e.next_attempt),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
             for r in rows]
    lines.append(f"{len(entries)} message(s), "
                 f"{sum(len(e.active) for e in entries)} recipient(s) pending")
    return "\n".join(lines)


def format_entry(entry: Entry, headers: bytes = b"") -> str:
    """Everything about one entry, then the message headers."""
    lines = [
        f"id:           {entry.id}",
        f"created:      {_when(entry.created)}",
        f"sender:       {_sender(entry)}",
        *([f"rewritten from: <{entry.original_sender}> (SRS)"] if entry.original_sender else []),
        f"submitted by: {entry.submitted_by or '- (no bounce will be sent)'}",
        f"size:         {entry.size}",
        f"warned:       {'yes' if entry.warned else 'no'}",
        "recipients:",
    ]
    for r in entry.recipients:
        lines.append(f"  {r.address}: {r.state}, {r.attempts} attempt(s)")
        if r.address in entry.forwards:
            lines.append(f"    forwarded by: {entry.forwards[r.address]} (a failure is told "
                         "to its domain's postmaster)")
        if r.active:
            lines.append(f"    next attempt: {_when(r.next_attempt)}")
        if r.last_reply:
            lines.append(f"    last reply:   {r.last_reply}")
    if headers:
        lines.append("headers:")
        text = headers.decode("utf-8", "replace").replace("\r\n", "\n").rstrip("\n")
        lines += [f"  {x}" for x in text.split("\n")]
    return "\n".join(lines)


def queue_list(root: Path) -> str:
    return format_list(Queue(root).list())


def queue_show(root: Path, ident: str) -> str:
    q = Queue(root)
    entry = q.get(ident)
    try:
        with open(q.message_path(ident), "rb") as f:
            head = f.read(64 * 1024)
    except FileNotFoundError:
        head = b""
    return format_entry(entry, original_headers(head))


def queue_retry(root: Path, ident: str | None = None) -> str:
    n = Queue(root).retry(ident)
    if ident is not None:
        return f"{ident}: scheduled for immediate retry" if n else f"{ident}: nothing to retry"
    return f"{n} message(s) scheduled for immediate retry"


def queue_delete(root: Path, ident: str) -> str:
    """Delete without a bounce: the operator decided, nobody is told."""
    Queue(root).delete(ident)
    return f"{ident}: deleted"
