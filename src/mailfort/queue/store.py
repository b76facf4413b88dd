"""Durable on-disk outbound queue.

Layout under the queue root (``<data_dir>/queue``)::

    msg/<id>        the full RFC 5322 message (CRLF), never modified once queued
    env/<id>.json   envelope and per-recipient delivery state, replaced atomically
    tmp/            files being written; anything here after a crash is garbage
    corrupt/        damaged entries set aside: <id>.json and/or <id>, as they were found

The commit point of an entry is the rename of its state file into ``env/``: the message
file is made durable (fsync of file and directory) *before* that rename, and the rename is
followed by an fsync of ``env/``. So after a ``kill -9`` at any instant an entry is either
completely present or absent (and then its submitter was never told 250). ``recover`` removes
tmp files. Every state change is a new file written in ``tmp/``, fsynced and renamed over the
old one, so a reader never sees half a state.

A state file is checked field by field whenever it is read (``parse_state``, one explicit
schema). One that is not a valid entry (a hand edit, a partial restore, a disk fault, a
bug), a state whose message file is gone, and a message file without a state are *damaged*:
moved whole into ``corrupt/`` (message first, each rename fsynced on both sides) with one log
line, so that they cost only themselves: the worker and the admin commands go on with the
rest. A damaged entry is kept, never delivered, expired or bounced (its recipients are not
known for sure); ``mailfort queue show`` says what could be read of it and what to do. A
message without a state is most often an enqueue cut short by a crash, whose client was not
told 250 and sent it again; it is kept all the same (the two cannot be told apart).

Blocking I/O throughout: the SMTP service calls ``enqueue`` from a thread, the worker wraps
calls in ``asyncio.to_thread``.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import logging
import math
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from mailfort.delivery import requiretls as rtls
from mailfort.delivery.message import MAX_HEADER_SCAN, Traits, scan_file
from mailfort.store.durable import fsync_dir, make_dirs

log = logging.getLogger("mailfort.queue")

RecipientState = Literal["pending", "deferred", "delivered", "failed"]
STATES: tuple[str, ...] = ("pending", "deferred", "delivered", "failed")
ACTIVE: tuple[str, ...] = ("pending", "deferred")

_ID_RE = re.compile(r"[0-9A-Za-z]{8,64}")  # with fullmatch: "$" would allow a final "\n"
_FORMAT = 1


class QueueError(Exception):
    """A queue operation failed (unknown id, bad id, entry vanished)."""


class DamagedEntry(QueueError):
    """The entry is damaged and set aside in ``corrupt/``: not delivered, not retried."""

    def __init__(self, ident: str, reason: str) -> None:
        super().__init__(f"{ident} is damaged ({reason}) and set aside, not delivered: "
                         f"see `mailfort queue show {ident}`")
        self.ident = ident
        self.reason = reason


class UnreadableEntry(QueueError):
    """The state file exists but cannot be read (EACCES, EIO): left in place, not moved
    (the disk may recover, or an operator may repair permissions), and reported."""


class StateError(ValueError):
    """A state file's content is not a valid entry; the text says which field and why."""


@dataclass
class Recipient:
    """One envelope recipient and where its delivery stands."""

    address: str
    state: RecipientState = "pending"
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: str = ""  # e.g. "550 5.1.1 <x@y>: no such user" or a local diagnostic
    status: str = ""  # RFC 3463 enhanced status of the last result, e.g. "4.4.1"
    remote_mta: str = ""  # host that gave last_reply, if any
    last_attempt: float = 0.0
    # For failed recipients: the bounce was sent (or none is due). Kept in the state so a
    # crash between marking "failed" and delivering the bounce sends it after restart.
    notified: bool = False
    # `queue retry` makes a recipient due now without touching its backoff: ``retry_at``
    # keeps the time it was scheduled for (0: no manual retry pending), to which a failed
    # early attempt returns; ``early`` counts such attempts, which backoff does not.
    retry_at: float = 0.0
    early: int = 0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()


@dataclass
class Entry:
    """A queued message's envelope and state (the JSON file in ``env/``)."""

    id: str
    sender: str  # envelope MAIL FROM, "" for the null sender
    submitted_by: str | None  # authenticated local user, None if not submitted by one
    recipients: list[Recipient]
    created: float
    warned: bool = False  # a delay warning was sent
    size: int = 0
    notify_after: float = 0.0  # when to retry a bounce whose local delivery failed
    # What the message's octets require of a receiver, found at enqueue (None: an entry
    # from a version that did not record it; delivery then scans the file).
    eight_bit: bool | None = None  # BODY=8BITMIME
    utf8_headers: bool | None = None  # with non-ASCII envelope addresses: SMTPUTF8
    # RFC 8689 (delivery/requiretls.py), decided at enqueue: REQUIRETLS was given with MAIL
    # (only verified TLS to a REQUIRETLS server, else a bounce), or the message says
    # "TLS-Required: No" (the destination's MTA-STS/DANE failures do not stop delivery).
    requiretls: bool = False
    tls_optional: bool = False
    # Forwarded mail (queue/forward.py): recipient -> the alias of ours it came through,
    # whose owner is told of a permanent failure; and the sender before SRS rewrote it.
    forwards: dict[str, str] = field(default_factory=dict)
    original_sender: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> list[Recipient]:
        return [r for r in self.recipients if r.active]

    @property
    def next_attempt(self) -> float | None:
        """Earliest time any recipient (or a pending bounce) is due; None when nothing is."""
        times = [r.next_attempt for r in self.recipients if r.active]
        if self.unnotified:
            times.append(self.notify_after)
        return min(times) if times else None

    @property
    def unnotified(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == "failed" and not r.notified]

    @property
    def finished(self) -> bool:
        """Nothing left to deliver and no bounce left to send: the entry can go."""
        return not self.active and not self.unnotified

    @property
    def traits(self) -> Traits | None:
        if self.eight_bit is None or self.utf8_headers is None:
            return None
        return Traits(self.eight_bit, self.utf8_headers)

    def is_due(self, now: float) -> bool:
        na = self.next_attempt
        return na is not None and na <= now

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = _FORMAT
        return d

    @classmethod
    def from_json(cls, d: object) -> Entry:
        """Every known field checked against ``ENTRY_SCHEMA`` (StateError says which is
        wrong); unknown keys are ignored, so an older mailfort still delivers a newer's
        entries."""
        _check("", d, ENTRY_SCHEMA)
        assert isinstance(d, dict)
        rcpts = []
        for i, r in enumerate(d["recipients"]):
            _check(f"recipients[{i}].", r, RECIPIENT_SCHEMA)
            rcpts.append(Recipient(**{k: v for k, v in r.items() if k in RECIPIENT_SCHEMA}))
        kw = {k: v for k, v in d.items() if k in ENTRY_SCHEMA and k != "recipients"}
        return cls(recipients=rcpts, **kw)


# --------------------------------------------------------------------- state schema
#
# Each field: (check, required). A field with a default in the dataclass may be absent
# (a state written by an older mailfort); when present, its type must be right. bool is
# not a number here, and numbers are finite (the JSON reader refuses NaN and Infinity).

Check = Any  # a callable (value) -> str | None: None when valid, else what is wrong


def _is_str(v: object) -> str | None:
    return None if isinstance(v, str) else "not a string"


def _is_bool(v: object) -> str | None:
    return None if isinstance(v, bool) else "not true/false"


def _is_opt_bool(v: object) -> str | None:
    return None if v is None or isinstance(v, bool) else "not true/false/null"


def _is_opt_str(v: object) -> str | None:
    return None if v is None or isinstance(v, str) else "not a string or null"


def _is_count(v: object) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0
    return None if ok else "not a whole number >= 0"


def _is_time(v: object) -> str | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
    return None if ok else "not a time (a number >= 0)"


def _is_state(v: object) -> str | None:
    return None if v in STATES else f"not one of {', '.join(STATES)}"


def _is_recipients(v: object) -> str | None:
    if not isinstance(v, list) or not v:
        return "not a non-empty list"
    return None if all(isinstance(r, dict) for r in v) else "not a list of objects"


def _is_str_map(v: object) -> str | None:
    ok = isinstance(v, dict) and all(isinstance(x, str) for x in v.values())
    return None if ok else "not an object of strings"


def _is_extra(v: object) -> str | None:
    if not isinstance(v, dict):
        return "not an object"
    return None if "dsns" not in v else _is_count(v["dsns"])


def _is_format(v: object) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) else "not a whole number"


RECIPIENT_SCHEMA: dict[str, tuple[Check, bool]] = {
    "address": (_is_str, True),
    "state": (_is_state, False),
    "attempts": (_is_count, False),
    "next_attempt": (_is_time, False),
    "last_reply": (_is_str, False),
    "status": (_is_str, False),
    "remote_mta": (_is_str, False),
    "last_attempt": (_is_time, False),
    "notified": (_is_bool, False),
    "retry_at": (_is_time, False),
    "early": (_is_count, False),
}

ENTRY_SCHEMA: dict[str, tuple[Check, bool]] = {
    "id": (_is_str, True),
    "sender": (_is_str, True),
    "submitted_by": (_is_opt_str, True),
    "recipients": (_is_recipients, True),
    "created": (_is_time, True),
    "warned": (_is_bool, False),
    "size": (_is_count, False),
    "notify_after": (_is_time, False),
    "eight_bit": (_is_opt_bool, False),
    "utf8_headers": (_is_opt_bool, False),
    "requiretls": (_is_bool, False),
    "tls_optional": (_is_bool, False),
    "forwards": (_is_str_map, False),
    "original_sender": (_is_str, False),
    "extra": (_is_extra, False),
}
_TOP_ONLY = {"format": (_is_format, False)}  # written by to_json, not an Entry field


def _check(where: str, d: object, schema: dict[str, tuple[Check, bool]]) -> None:
    if not isinstance(d, dict):
        raise StateError(f"{where.rstrip('.') or 'state'} is not a JSON object")
    extra_checks = _TOP_ONLY if not where else {}
    for name, (check, required) in (schema | extra_checks).items():
        if name not in d:
            if required:
                raise StateError(f"field {where}{name} is missing")
            continue
        why = check(d[name])
        if why is not None:
            raise StateError(f"field {where}{name} is {why}")


def _no_constant(name: str) -> Any:
    raise StateError(f"not JSON: {name} is not a number")


def parse_state(raw: bytes, ident: str) -> Entry:
    """The entry in a state file's bytes, for the entry ``ident``; StateError with the
    reason otherwise (the only way a state file is read)."""
    if not raw.strip():
        raise StateError("empty file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise StateError("not UTF-8") from None
    try:
        d = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        rest = text[exc.pos:].rstrip()  # a literal cut short ("fal") is a truncation too
        ends = not rest or exc.msg.startswith("Unterminated") or \
            any(lit.startswith(rest) for lit in ("true", "false", "null"))
        cut = " (truncated?)" if ends else ""
        raise StateError(f"not JSON{cut}: {exc.msg} (character {exc.pos})") from None
    except RecursionError:
        raise StateError("not JSON: nested too deeply") from None
    entry = Entry.from_json(d)
    if entry.id != ident:
        raise StateError(f"field id is {entry.id[:64]!r}, not the file's name")
    return entry


@dataclass
class Damaged:
    """A damaged entry in ``corrupt/``, as far as it can be read."""

    id: str
    reason: str
    set_aside: float  # when it was moved there (the newest of its files' ctime)
    state_path: Path | None  # the state file as it was found, if there was one
    message_path: Path | None  # the message, kept, if there was one
    size: int  # of the message, 0 without one
    sender: str | None  # what the state file says, unverified (None: unreadable)
    recipients: list[str]  # idem; active or not
    valid_state: bool = False  # the state itself is valid: recipients are "address (state)"


_FIELD_RE = re.compile(rb'"(sender|address)"\s*:\s*"((?:[^"\\]|\\.){0,998})"')


def _salvage(raw: bytes) -> tuple[str | None, list[str]]:
    """Sender and recipient addresses that can still be read from a damaged state file
    (also a truncated one): help for the operator, never acted upon."""
    sender: str | None = None
    rcpts: list[str] = []
    for m in _FIELD_RE.finditer(raw):
        try:
            value = json.loads(b'"' + m.group(2) + b'"')
        except ValueError:
            continue
        if m.group(1) == b"sender":
            if sender is None:
                sender = value
        elif value not in rcpts:
            rcpts.append(value)
    return sender, rcpts



def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _header_block(path: Path, limit: int = MAX_HEADER_SCAN) -> bytes:
    """The message's header lines (up to the first empty line, at most ``limit`` octets)."""
    out = bytearray()
    with open(path, "rb") as f:
        while len(out) < limit:
            line = f.readline(limit - len(out))
            if not line or line in (b"\r\n", b"\n"):
                break
            out += line
    return bytes(out)


def new_id() -> str:
    """Sortable by creation time (hex seconds) and unguessable (random suffix).

    One id per message: the SMTP service makes it at the start of DATA, writes it in the
    ``Received:`` field and the 250 ("queued as ID"), and the queue entry takes it; where a
    message needs several entries (one per envelope sender, queue/forward.py) the others
    are ``ID`` + ``S1``, ``S2``…; a DSN about it is ``B`` + ``ID`` + ``N0``, ``N1``…
    """
    return f"{int(time.time()):09X}{secrets.token_hex(6).upper()}"


class Queue:
    """The outbound queue directory. Safe to use from several threads of one process."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.msg_dir = self.root / "msg"
        self.env_dir = self.root / "env"
        self.tmp_dir = self.root / "tmp"
        self.corrupt_dir = self.root / "corrupt"
        for d in (self.msg_dir, self.env_dir, self.tmp_dir, self.corrupt_dir):
            make_dirs(d)  # durable: the fsyncs of msg/ and env/ rely on their own names
        # Serialises read-modify-write of state files; re-entrant: a read under it may set
        # a damaged entry aside, which takes it too.
        self._lock = threading.RLock()
        self._reported_unreadable: set[str] = set()

    # ------------------------------------------------------------------ recovery

    def recover(self, grace: float = 0.0) -> int:
        """Remove what a crash left half-written and set aside what lost its other half
        (a message without a state file, a state file without its message); returns how
        many files were removed or set aside.

        Files changed less than ``grace`` seconds ago are left alone, so that recovery may
        run while the SMTP services are already enqueueing (an enqueue in progress has a
        message file and no state file yet for a moment). ``ctime`` is used: the hard link
        that puts a spool file into ``msg/`` updates it.
        """
        cutoff = time.time() - grace

        def old(p: Path) -> bool:
            try:
                return grace <= 0 or p.stat().st_ctime < cutoff
            except FileNotFoundError:
                return False

        removed = 0
        for p in self.tmp_dir.iterdir():
            if old(p):
                p.unlink(missing_ok=True)
                removed += 1
        known = {p.name[:-5] for p in self.env_dir.glob("*.json")}
        for p in self.msg_dir.iterdir():
            if p.name not in known and old(p):
                if _ID_RE.fullmatch(p.name):  # ours: an enqueue cut short, or a lost state
                    self.set_aside(p.name, "state file missing")
                else:
                    p.unlink(missing_ok=True)
                removed += 1
        for ident in known:
            if not _ID_RE.fullmatch(ident):
                continue  # not a name this queue writes: never read, left alone
            if not (self.msg_dir / ident).exists():  # cannot happen by construction
                self.set_aside(ident, "message file missing")
                removed += 1
        if removed:
            fsync_dir(self.msg_dir)
            fsync_dir(self.env_dir)
        return removed

    # ------------------------------------------------------------------ enqueue

    def enqueue(
        self,
        message_path: Path,
        sender: str,
        recipients: list[str],
        submitted_by: str | None,
        *,
        requiretls: bool = False,
        forwards: dict[str, str] | None = None,
        original_sender: str = "",
        ident: str | None = None,
    ) -> str:
        """Queue the message in ``message_path`` (hard link, copy across filesystems).

        Returns the id (``ident``, the message's, or a new one) once the entry is durable.
        The caller still owns ``message_path`` and may unlink it afterwards.
        """
        if not recipients:
            raise QueueError("no recipients")
        ident = self._fresh(ident)
        target = self.msg_dir / ident
        try:
            os.link(message_path, target)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            tmp = self.tmp_dir / f"{ident}.msg"
            shutil.copyfile(message_path, tmp)
            os.rename(tmp, target)
        return self._commit(ident, target, sender, recipients, submitted_by, requiretls,
                            forwards, original_sender)

    def enqueue_bytes(
        self,
        message: bytes,
        sender: str,
        recipients: list[str],
        submitted_by: str | None,
        *,
        requiretls: bool = False,
        forwards: dict[str, str] | None = None,
        original_sender: str = "",
        ident: str | None = None,
    ) -> str:
        """Queue a message held in memory (bounces from elsewhere, tests, tools)."""
        if not recipients:
            raise QueueError("no recipients")
        ident = self._fresh(ident)
        tmp = self.tmp_dir / f"{ident}.msg"
        with open(tmp, "wb") as f:
            f.write(message)
        target = self.msg_dir / ident
        os.rename(tmp, target)
        return self._commit(ident, target, sender, recipients, submitted_by, requiretls,
                            forwards, original_sender)

    def _fresh(self, ident: str | None) -> str:
        """``ident`` if no entry has it (nor a damaged one), else QueueError; or a new id.
        (Two entries cannot take one id: the message file's link fails on the second.)"""
        if ident is None:
            return new_id()
        self.check_id(ident)
        if any(p.exists() for p in (self.msg_dir / ident, self.env_dir / f"{ident}.json",
                                    self.corrupt_dir / ident)):
            raise QueueError(f"queue id {ident} is taken")
        return ident

    def _commit(
        self,
        ident: str,
        msg_path: Path,
        sender: str,
        recipients: list[str],
        submitted_by: str | None,
        requiretls: bool = False,
        forwards: dict[str, str] | None = None,
        original_sender: str = "",
    ) -> str:
        try:
            _fsync_file(msg_path)
            fsync_dir(self.msg_dir)
            traits = scan_file(msg_path)
            required, optional = rtls.tags(requiretls, _header_block(msg_path))
            now = time.time()
            rcpts = [Recipient(address=a, next_attempt=now) for a in dict.fromkeys(recipients)]
            entry = Entry(
                id=ident,
                sender=sender,
                submitted_by=submitted_by,
                recipients=rcpts,
                created=now,
                size=msg_path.stat().st_size,
                eight_bit=traits.eight_bit,
                utf8_headers=traits.utf8_headers,
                requiretls=required,
                tls_optional=optional,
                forwards={a: f for a, f in (forwards or {}).items() if a in recipients},
                original_sender=original_sender,
            )
            self._write_state(entry)
        except BaseException:
            msg_path.unlink(missing_ok=True)
            raise
        return ident

    # ------------------------------------------------------------------ state files

    def _write_state(self, entry: Entry) -> None:
        data = json.dumps(entry.to_json(), ensure_ascii=False, separators=(",", ":"))
        tmp = self.tmp_dir / f"{entry.id}.{secrets.token_hex(4)}.json"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                # os.write may write less than asked (a nearly full disk): loop, or the
                # rename below would commit a truncated state, i.e. lose the entry.
                view = memoryview(data.encode("utf-8"))
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.env_dir / f"{entry.id}.json")
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk must not also leak files in tmp/
            raise
        fsync_dir(self.env_dir)

    @staticmethod
    def check_id(ident: str) -> str:
        """Ids come from the command line too: refuse anything that is not one."""
        if not isinstance(ident, str) or not _ID_RE.fullmatch(ident):
            raise QueueError(f"not a queue id: {ident!r}")
        return ident

    def get(self, ident: str) -> Entry:
        """The entry, checked; a damaged one is set aside and DamagedEntry raised."""
        path = self.env_dir / f"{self.check_id(ident)}.json"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            found = self.damaged_entry(ident)
            if found is not None:
                raise DamagedEntry(ident, found.reason) from None
            raise QueueError(f"no such queue entry: {ident}") from None
        except OSError as exc:  # unreadable (EACCES, EIO): skipped, not moved
            raise UnreadableEntry(f"queue entry {ident} cannot be read: {exc}") from None
        try:
            entry = parse_state(raw, ident)
        except StateError as exc:
            reason = str(exc)
        else:
            if (self.msg_dir / ident).exists():
                return entry
            reason = "message file missing"
        if not self.set_aside(ident, reason):
            raise QueueError(f"no such queue entry: {ident}")  # deleted meanwhile
        raise DamagedEntry(ident, reason)

    # ------------------------------------------------------------------ damaged entries

    def set_aside(self, ident: str, reason: str) -> bool:
        """Move a damaged entry's files into ``corrupt/`` and log why; False if there was
        nothing left to move (deleted or set aside meanwhile, e.g. by another process).

        The message goes first: a crash in between leaves a state without its message,
        which the next read sets aside too. Each rename is fsynced in both directories."""
        moved = False
        with self._lock:
            for src, dst in ((self.msg_dir / ident, self.corrupt_dir / ident),
                             (self.env_dir / f"{ident}.json",
                              self.corrupt_dir / f"{ident}.json")):
                try:
                    os.rename(src, dst)
                except FileNotFoundError:
                    continue
                fsync_dir(self.corrupt_dir)
                fsync_dir(src.parent)
                moved = True
        if moved:
            log.error("queue %s: damaged entry set aside in %s: %s; %s", ident,
                      self.corrupt_dir, reason, _consequence(reason, ident))
        return moved

    def damaged_entry(self, ident: str) -> Damaged | None:
        """The damaged entry ``ident`` in ``corrupt/``, or None."""
        state = self.corrupt_dir / f"{self.check_id(ident)}.json"
        msg = self.corrupt_dir / ident
        times, raw, size = [], None, 0
        with contextlib.suppress(OSError):  # absent, or not a file this queue wrote
            raw = state.read_bytes()
            times.append(state.stat().st_ctime)
        with contextlib.suppress(OSError):
            st = msg.stat()
            times.append(st.st_ctime)
            size = st.st_size
        if not times:
            return None
        valid = False
        if raw is None:
            reason, sender, rcpts = "state file missing", None, []
        else:
            try:
                entry = parse_state(raw, ident)
            except StateError as exc:
                reason = str(exc)
                sender, rcpts = _salvage(raw)
            else:
                reason = ("message file missing" if not msg.exists() else
                          "set aside, though state and message look complete now")
                sender, valid = entry.sender, True
                rcpts = [f"{r.address} ({r.state})" for r in entry.recipients]
        return Damaged(ident, reason, max(times), state if raw is not None else None,
                       msg if msg.exists() else None, size, sender, rcpts, valid)

    def damaged(self) -> builtins.list[Damaged]:
        """Every damaged entry in ``corrupt/``, oldest id first."""
        names = {p.name.removesuffix(".json") for p in self.corrupt_dir.iterdir()}
        out = []
        for ident in sorted(n for n in names if _ID_RE.fullmatch(n)):
            found = self.damaged_entry(ident)
            if found is not None:
                out.append(found)
        return out

    def message_path(self, ident: str) -> Path:
        return self.msg_dir / self.check_id(ident)

    def read_message(self, ident: str) -> bytes:
        try:
            return self.message_path(ident).read_bytes()
        except FileNotFoundError:
            raise QueueError(f"no such queue entry: {ident}") from None

    def read_headers(self, ident: str, limit: int = MAX_HEADER_SCAN) -> bytes:
        """The start of the message up to its first empty line (at most ``limit`` octets):
        enough for a bounce, without reading the whole message into memory."""
        try:
            return _header_block(self.message_path(ident), limit)
        except FileNotFoundError:
            raise QueueError(f"no such queue entry: {ident}") from None

    def ids(self) -> builtins.list[str]:
        return sorted(p.name[:-5] for p in self.env_dir.glob("*.json"))

    def list(self) -> builtins.list[Entry]:
        """Every valid entry, oldest first (ids sort by creation time); damaged ones are
        set aside on the way (``damaged`` lists them)."""
        out = []
        for ident in self.ids():
            try:
                out.append(self.get(ident))
            except UnreadableEntry as exc:
                # Every scan meets it again: said once per process, not at every scan.
                if ident not in self._reported_unreadable:
                    self._reported_unreadable.add(ident)
                    log.error("%s; it is not delivered until it can be read", exc)
            except QueueError:
                pass
        return out

    def due(self, now: float) -> builtins.list[Entry]:
        return [e for e in self.list() if e.is_due(now)]

    def update(self, entry: Entry) -> None:
        """Replace the entry's state atomically; QueueError if it was deleted meanwhile."""
        with self._lock:
            if not (self.env_dir / f"{self.check_id(entry.id)}.json").exists():
                raise QueueError(f"no such queue entry: {entry.id}")
            self._write_state(entry)

    def delete(self, ident: str) -> None:
        """Remove an entry: state file first (the commit point), then the message. A
        damaged entry is removed from ``corrupt/`` the same way."""
        with self._lock:
            env = self.env_dir / f"{self.check_id(ident)}.json"
            try:
                env.unlink()
            except FileNotFoundError:
                pass
            else:
                fsync_dir(self.env_dir)
                (self.msg_dir / ident).unlink(missing_ok=True)
                return
            state, msg = self.corrupt_dir / f"{ident}.json", self.corrupt_dir / ident
            if not state.exists() and not msg.exists():
                raise QueueError(f"no such queue entry: {ident}")
            state.unlink(missing_ok=True)
            msg.unlink(missing_ok=True)
            fsync_dir(self.corrupt_dir)

    def retry(self, ident: str | None = None, now: float | None = None) -> int:
        """Make the active recipients of one entry (or of all) due now; returns entries
        touched. Damaged entries are skipped (DamagedEntry when it is the one asked for)."""
        now = time.time() if now is None else now
        targets: Iterable[str] = [ident] if ident is not None else self.ids()
        n = 0
        for i in targets:
            with self._lock:
                try:
                    entry = self.get(i)
                except QueueError:
                    if ident is not None:
                        raise
                    continue
                if not entry.active:
                    continue
                for r in entry.active:
                    if r.next_attempt > now:  # keep the schedule (see Recipient.retry_at)
                        r.retry_at = max(r.retry_at, r.next_attempt)
                        r.next_attempt = now
                self._write_state(entry)
                n += 1
        return n


def _consequence(reason: str, ident: str) -> str:
    """What a damaged entry means for its mail, in the log line and ``queue show``."""
    if reason == "message file missing":
        return ("the message is lost, nothing can be delivered; its state is kept to say "
                f"for whom it was (`mailfort queue show {ident}`)")
    return ("the message is kept, not delivered, not expired and not bounced: see "
            f"`mailfort queue show {ident}`")
