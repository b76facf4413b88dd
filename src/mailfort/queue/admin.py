"""Backend of ``mailfort queue list | show ID | retry [ID] | delete ID``.

Each function takes the queue directory (``queue_root(cfg)``) and returns the text to
print; errors (unknown or malformed id) raise ``QueueError`` with a message fit for the
user. They work on the files directly, so they work whether or not the server runs; a
running worker notices ``retry`` at its next rescan (within a minute). A damaged entry
(queue/store.py) is listed apart, shown with what could be read of it and what to do, and
deleted like any other; it is never retried.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path

from mailfort.config import Config
from mailfort.queue.dsn import original_headers
from mailfort.queue.store import Damaged, DamagedEntry, Entry, Queue, QueueError

__all__ = ["DamagedEntry", "Queue", "QueueError", "damaged_note", "queue_delete", "queue_list",
           "queue_retry", "queue_root", "queue_show"]


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


def format_list(entries: list[Entry], now: float | None = None,
                damaged: list[Damaged] | None = None) -> str:
    """One line per entry: id, age, size, sender, remaining/total recipients, next try;
    then the damaged entries, one line each with the reason."""
    now = time.time() if now is None else now
    damaged = damaged or []
    if not entries and not damaged:
        return "queue is empty"
    if not entries:
        return "\n".join(_format_damaged(damaged, now))
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
    if damaged:
        lines += ["", *_format_damaged(damaged, now)]
    return "\n".join(lines)


def _format_damaged(damaged: list[Damaged], now: float) -> list[str]:
    lines = [f"{len(damaged)} DAMAGED entr{'y' if len(damaged) == 1 else 'ies'}, set aside "
             "(not delivered; `mailfort queue show ID` says what to do):"]
    width = max(len(d.id) for d in damaged)
    for d in damaged:
        lines.append(f"{d.id.ljust(width)}  {_age(now - d.set_aside)}  DAMAGED: {d.reason}")
    return lines


def _shown(text: str) -> str:
    """Text read from a damaged file, with control characters escaped (the terminal)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:998])


def format_damaged(d: Damaged, headers: bytes = b"") -> str:
    """A damaged entry: why, what is kept, what its state still says, what to do."""
    lines = [
        f"id:           {d.id}",
        "state:        DAMAGED, set aside (not delivered, not expired, not bounced)",
        f"why:          {d.reason}",
        f"set aside:    {_when(d.set_aside)}",
        f"state file:   {d.state_path or '- (none)'}",
        f"message:      {f'{d.message_path} ({d.size} octets)' if d.message_path else '- (lost)'}",
    ]
    source = "from its state" if d.valid_state else "read from the damaged state, unverified"
    if d.sender is not None:
        lines.append(f"sender:       <{_shown(d.sender)}> ({source})")
    if d.recipients:
        known = ")" if d.valid_state else "; which were delivered to is not known)"
        lines.append(f"recipients:   ({source}{known}")
        lines += [f"  {_shown(a)}" for a in d.recipients]
    lines.append("what to do:")
    if d.message_path is None:
        lines += ["  The message is lost: tell its sender and recipients if you know them,",
                  f"  then `mailfort queue delete {d.id}`."]
    else:
        lines += ["  To send it, submit the message file again (e.g. on the submission port,",
                  "  as its sender) to the recipients that still need it, then",
                  f"  `mailfort queue delete {d.id}`. To give it up: only the delete."]
    if headers:
        lines.append("headers:")
        text = headers.decode("utf-8", "replace").replace("\r\n", "\n").rstrip("\n")
        lines += [f"  {x}" for x in text.split("\n")]
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
    q = Queue(root)
    entries = q.list()  # sets aside what it finds damaged: listed below, then
    return format_list(entries, damaged=q.damaged())


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(64 * 1024)
    except FileNotFoundError:
        return b""


def _related(q: Queue, ident: str) -> list[str]:
    """The other entries of message ``ident``: one per further envelope sender, named
    ``ident`` + ``S1``, ``S2``… (queue/forward.py)."""
    pattern = re.compile(re.escape(ident) + r"S\d+")
    return [i for i in q.ids() if pattern.fullmatch(i)]


def queue_show(root: Path, ident: str) -> str:
    q = Queue(root)
    try:
        entry = q.get(ident)
    except DamagedEntry:
        found = q.damaged_entry(ident)
        if found is None:  # deleted meanwhile
            raise QueueError(f"no such queue entry: {ident}") from None
        head = _head(found.message_path) if found.message_path else b""
        return format_damaged(found, original_headers(head) if head else b"")
    except QueueError:
        others = _related(q, ident)
        if not others:
            raise QueueError(f"no such queue entry: {ident} (not in the queue: delivered, "
                             f"bounced, deleted, or never queued; the log lines "
                             f"\"queue {ident}:\" say which)") from None
        return "\n\n".join(queue_show(root, i) for i in others)
    text = format_entry(entry, original_headers(_head(q.message_path(ident))))
    others = _related(q, ident)
    if others:
        text += "\nother entries of this message (one per envelope sender): " + \
            ", ".join(others)
    return text


def damaged_note(root: Path) -> str:
    """"; N damaged entries not retried (...)", or "" when there are none."""
    n = len(Queue(root).damaged())
    return (f"; {n} damaged entr{'y' if n == 1 else 'ies'} set aside, not retried "
            "(see `mailfort queue list`)") if n else ""


def queue_retry(root: Path, ident: str | None = None) -> str:
    n = Queue(root).retry(ident)
    if ident is not None:
        return f"{ident}: scheduled for immediate retry" if n else f"{ident}: nothing to retry"
    return f"{n} message(s) scheduled for immediate retry{damaged_note(root)}"


def queue_delete(root: Path, ident: str) -> str:
    """Delete without a bounce: the operator decided, nobody is told."""
    q = Queue(root)
    damaged = not (q.env_dir / f"{q.check_id(ident)}.json").exists()
    q.delete(ident)
    return f"{ident}: deleted" + (" (a damaged entry, with what was kept of it)"
                                  if damaged else "")
