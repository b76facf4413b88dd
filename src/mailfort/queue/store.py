"""Durable on-disk outbound queue.

Layout under the queue root (``<data_dir>/queue``)::

    msg/<id>        the full RFC 5322 message (CRLF), never modified once queued
    env/<id>.json   envelope and per-recipient delivery state, replaced atomically
    tmp/            files being written; anything here after a crash is garbage

The commit point of an entry is the rename of its state file into ``env/``: the message
file is made durable (fsync of file and directory) *before* that rename, and the rename is
followed by an fsync of ``env/``. So after a ``kill -9`` at any instant an entry is either
completely present or absent (and then its submitter was never told 250). ``recover`` removes
tmp files and message files that never got a state file. Every state change is a new file
written in ``tmp/``, fsynced and renamed over the old one, so a reader never sees half a state.

Blocking I/O throughout: the SMTP service calls ``enqueue`` from a thread, the worker wraps
calls in ``asyncio.to_thread``.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from mailfort.delivery import requiretls as rtls
from mailfort.delivery.message import MAX_HEADER_SCAN, Traits, scan_file
from mailfort.store.durable import fsync_dir, make_dirs

RecipientState = Literal["pending", "deferred", "delivered", "failed"]
ACTIVE: tuple[str, ...] = ("pending", "deferred")

_ID_RE = re.compile(r"[0-9A-Za-z]{8,64}")  # with fullmatch: "$" would allow a final "\n"
_FORMAT = 1


class QueueError(Exception):
    """A queue operation failed (unknown id, bad id, entry vanished)."""


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
    def from_json(cls, d: dict[str, Any]) -> Entry:
        """Unknown keys are ignored, so an older mailfort still delivers a newer's entries."""
        rnames = {f.name for f in fields(Recipient)}
        enames = {f.name for f in fields(cls)} - {"recipients"}
        rcpts = [Recipient(**{k: v for k, v in r.items() if k in rnames})
                 for r in d["recipients"]]
        return cls(recipients=rcpts, **{k: v for k, v in d.items() if k in enames})



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
    """Sortable by creation time (hex seconds) and unguessable (random suffix)."""
    return f"{int(time.time()):09X}{secrets.token_hex(6).upper()}"


class Queue:
    """The outbound queue directory. Safe to use from several threads of one process."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.msg_dir = self.root / "msg"
        self.env_dir = self.root / "env"
        self.tmp_dir = self.root / "tmp"
        for d in (self.msg_dir, self.env_dir, self.tmp_dir):
            make_dirs(d)  # durable: the fsyncs of msg/ and env/ rely on their own names
        self._lock = threading.Lock()  # serialises read-modify-write of state files

    # ------------------------------------------------------------------ recovery

    def recover(self, grace: float = 0.0) -> int:
        """Remove what a crash left half-written; returns how many files were removed.

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
                p.unlink(missing_ok=True)
                removed += 1
        for ident in known:
            if not (self.msg_dir / ident).exists():  # cannot happen by construction; be safe
                (self.env_dir / f"{ident}.json").unlink(missing_ok=True)
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
    ) -> str:
        """Queue the message in ``message_path`` (hard link, copy across filesystems).

        Returns the new id once the entry is durable. The caller still owns
        ``message_path`` and may unlink it afterwards.
        """
        if not recipients:
            raise QueueError("no recipients")
        ident = new_id()
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
    ) -> str:
        """Queue a message held in memory (bounces from elsewhere, tests, tools)."""
        if not recipients:
            raise QueueError("no recipients")
        ident = new_id()
        tmp = self.tmp_dir / f"{ident}.msg"
        with open(tmp, "wb") as f:
            f.write(message)
        target = self.msg_dir / ident
        os.rename(tmp, target)
        return self._commit(ident, target, sender, recipients, submitted_by, requiretls,
                            forwards, original_sender)

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
        path = self.env_dir / f"{self.check_id(ident)}.json"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise QueueError(f"no such queue entry: {ident}") from None
        return Entry.from_json(json.loads(raw))

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
        """Every entry, oldest first (ids sort by creation time)."""
        out = []
        for ident in self.ids():
            with contextlib.suppress(QueueError, ValueError, TypeError):
                out.append(self.get(ident))
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
        """Remove an entry: state file first (the commit point), then the message."""
        with self._lock:
            env = self.env_dir / f"{self.check_id(ident)}.json"
            try:
                env.unlink()
            except FileNotFoundError:
                raise QueueError(f"no such queue entry: {ident}") from None
            fsync_dir(self.env_dir)
            (self.msg_dir / ident).unlink(missing_ok=True)

    def retry(self, ident: str | None = None, now: float | None = None) -> int:
        """Make the active recipients of one entry (or of all) due now; returns entries touched."""
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
                    r.next_attempt = now
                self._write_state(entry)
                n += 1
        return n
