"""The mailbox side of a logged-in IMAP session (RFC 9051, RFC 3501 until ENABLE IMAP4rev2).

The engine (protocol/imap.py) answers what needs no mailbox; every command valid in the
AUTHENTICATED and SELECTED states comes here as an ``imap_parse.Command`` and goes back as
an ``Outcome``: untagged responses (lazily, for FETCH) and the tagged status. Blocking code
(disk): the driver runs ``execute`` and drains ``untagged`` in a worker thread.

Each session keeps its own *view* of the selected mailbox: the UIDs in sequence-number order
and the flags it last told the client. ``_sync`` rescans the mailbox (``Mailbox.scan``: new
files, POP3's DELE and flag renames, other sessions' changes through the UID map) and reports
the difference as EXPUNGE (or VANISHED under QRESYNC), FETCH FLAGS and EXISTS, in that
order, so the numbers the client holds stay right: expunges are reported highest first, each
before the view drops the message. During FETCH, STORE and SEARCH by sequence number no
expunge is reported (RFC 9051 §7.5.1): the expunged messages stay in the view until a
command that may report them.

After a command the rescan runs at once only when the command itself changed the selected
mailbox behind the view (EXPUNGE, APPEND or COPY into it, MOVE); otherwise at most every
``sync_interval``, since a client pipelining one STORE per message would pay a listing of
the mailbox for each. ``updates()`` (NOOP, IDLE, CHECK) always rescans; in IDLE the
rescan may be another session's of this process begun after the wake-up (``since``), so
the sessions woken by one delivery share one scan and one snapshot.

Cost per session: the sessions of one user in one process share one ``MailStore`` (a UID
map is replayed once) and, once caught up, one snapshot of the selected mailbox (copied
on write). Message headers and ENVELOPE/BODYSTRUCTURE answers are cached per process by
file name (``_Cache``): a Maildir file's octets never change under its name.

Where the RFCs leave a choice the answer is the reference Dovecot's (an empty or out of
range sequence set is BAD, INBOX rename moves the messages, STATUS of the selected mailbox
is allowed, MODSEQ only where asked or where flags changed). Bounds: SEARCH work
(messages x keys) is capped (``NO [LIMIT]``), FETCH reads one message at a time (only its
header when the items need no more), APPEND is held to ``append_limit`` (``[TOOBIG]``) and
the quota (``[OVERQUOTA]``), CREATE to ``max_mailboxes``.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import datetime
import errno
import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

from mailfort.protocol import imap_message as im
from mailfort.protocol.imap_parse import (
    Atom,
    Command,
    FetchAtt,
    LiteralBytes,
    Quoted,
    SearchKey,
    Section,
    SequenceSet,
)
from mailfort.store import mutf7
from mailfort.store.durable import fsync_dir
from mailfort.store.imap_mailbox import (
    INBOX,
    SEP,
    SPECIAL_USE,
    BadName,
    Mailbox,
    MailboxBusy,
    MailboxError,
    MailboxExists,
    MailStore,
    MessageInfo,
    NoSuchMailbox,
    ScanResult,
    _check_name,
    split_flags,
)
from mailfort.store.uidmap import uid_set

SUBSCRIPTIONS = "subscriptions"  # Maildir++ (Dovecot) name, one modified UTF-7 name a line
SPECIAL_FILE = "mailfort-imap.specialuse"  # CREATE (USE (...)) for names not built in
SYSTEM_ORDER = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
PERMANENT = b"(\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)"
USE_ATTRS = frozenset(SPECIAL_USE.values()) | {"\\All", "\\Flagged"}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_HEADER_PROBE = 64 * 1024  # read this much first (a whole message, most of the time)
_READ_CHUNK = 1024 * 1024  # then this much at a time
_CONTENT_KEYS = frozenset({"BODY", "TEXT"})
_HEADER_KEYS = frozenset({"FROM", "TO", "CC", "BCC", "SUBJECT", "HEADER", "SENTBEFORE",
                          "SENTON", "SENTSINCE"})
_HEADER_ITEMS = frozenset({"ENVELOPE", "RFC822.HEADER"})
_SIMPLE_ITEMS = frozenset({"UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "MODSEQ"})
_MACROS = {"ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
           "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
           "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY")}


@dataclass(slots=True)
class Outcome:
    """What one command answers: ``untagged`` (each a complete response with its CRLF,
    produced lazily), then ``tag status [code] text``; ``selected`` the new state, if any.

    A FETCH that meets a problem while streaming (``BINARY`` of an unknown transfer
    encoding) sets ``status``/``code``/``text`` as it goes: read them after ``untagged``
    is drained."""

    status: Literal["OK", "NO", "BAD"]
    text: str
    code: str | None = None
    untagged: Iterable[bytes] = ()
    selected: bool | None = None


@dataclass(frozen=True, slots=True)
class MailSessionSettings:
    """Limits of one session's mailbox side (the driver fills them from the config)."""

    append_limit: int = 50 * 1024 * 1024  # octets of one APPEND (APPENDLIMIT, [TOOBIG])
    quota_storage: int | None = None  # octets over all mailboxes (QUOTA STORAGE, KiB)
    quota_messages: int | None = None  # messages over all mailboxes (QUOTA MESSAGE)
    max_search_work: int = 4_000_000  # SEARCH: messages x keys, else NO [LIMIT]
    max_mailboxes: int = 10_000  # CREATE refused beyond ([LIMIT])
    tz: datetime.tzinfo | None = None  # INTERNALDATE and SEARCH dates; None: local time
    sync_interval: float = 1.0  # seconds between rescans after commands (updates(): always)


class _Bad(Exception):
    """The command is malformed in a way only this side can tell: tagged BAD."""

    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.text, self.code = text, code


class _No(Exception):
    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.text, self.code = text, code


# ------------------------------------------------------------------------------ formatting


def _quote(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogateescape")
    if b"\r" in raw or b"\n" in raw or b"\0" in raw:
        return b"{%d}\r\n" % len(raw) + raw
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


_FLAG_LISTS: dict[tuple[frozenset[str], bool], bytes] = {}  # a mailbox has few flag sets


def _flag_list(flags: Iterable[str], recent: bool = False) -> bytes:
    if isinstance(flags, frozenset):
        found = _FLAG_LISTS.get((flags, recent))
        if found is None:
            if len(_FLAG_LISTS) > 4096:
                _FLAG_LISTS.clear()
            found = _FLAG_LISTS[(flags, recent)] = _format_flags(flags, recent)
        return found
    return _format_flags(flags, recent)


def _format_flags(flags: Iterable[str], recent: bool) -> bytes:
    flags = set(flags)
    ordered = [f for f in SYSTEM_ORDER if f in flags]
    ordered += sorted((f for f in flags if f not in SYSTEM_ORDER), key=str.lower)
    if recent:
        ordered.append("\\Recent")
    return ("(" + " ".join(ordered) + ")").encode("utf-8", "surrogateescape")


def _date_time(ts: int, tz: datetime.tzinfo | None) -> bytes:
    dt = datetime.datetime.fromtimestamp(ts, tz or datetime.UTC)
    if tz is None:
        dt = dt.astimezone()
    off = int(dt.utcoffset().total_seconds()) // 60  # type: ignore[union-attr]
    sign = "+" if off >= 0 else "-"
    return (f'"{dt.day:02d}-{_MONTHS[dt.month - 1]}-{dt.year:04d} {dt:%H:%M:%S} '
            f'{sign}{abs(off) // 60:02d}{abs(off) % 60:02d}"').encode("ascii")


def _atom(value: object) -> str:
    if isinstance(value, Atom):
        return value.value
    if isinstance(value, Quoted):
        return value.value.decode("utf-8", "replace")
    if isinstance(value, LiteralBytes):
        return value.data.decode("utf-8", "replace")
    raise _Bad("expected an atom")


def _number(value: object, what: str) -> int:
    text = _atom(value)
    if not text.isdigit() or len(text) > 19:
        raise _Bad(f"bad {what}")
    return int(text)


def _parse_uid_text(text: str) -> list[tuple[int, int]]:
    """A sequence set written as text (QRESYNC known UIDs): ranges, ``*`` as the top."""
    out = []
    for part in text.split(","):
        a, _, b = part.partition(":")
        try:
            lo = 2**32 if a == "*" else int(a)
            hi = lo if not b else (2**32 if b == "*" else int(b))
        except ValueError:
            raise _Bad("bad sequence set") from None
        out.append((min(lo, hi), max(lo, hi)))
    if len(out) > 2000:
        raise _Bad("too many ranges", "LIMIT")
    return out


def _in_ranges(n: int, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= n <= hi for lo, hi in ranges)


def _count_keys(key: SearchKey) -> int:
    return 1 + sum(_count_keys(k) for k in key.children)


def _key_needs(key: SearchKey) -> int:
    """0: flags and store facts only; 1: the header; 2: the body too."""
    if key.name in _CONTENT_KEYS:
        return 2
    need = 1 if key.name in _HEADER_KEYS else 0
    for child in key.children:
        need = max(need, _key_needs(child))
    return need


def _has_modseq(key: SearchKey) -> bool:
    return key.name == "MODSEQ" or any(_has_modseq(k) for k in key.children)


def _read(path: str, header_only: bool) -> bytes:
    """The file, or (``header_only``) its start up to the blank line after the header.

    Descriptor-level reads (no buffered file object): a FETCH or SEARCH opens thousands of
    small files, and one ``os.read`` of a Maildir file (never written once in new/ or cur/)
    that returns less than asked for has reached its end. Never through a symlink, as
    FETCH's reads (``O_NOFOLLOW``: ELOOP, an OSError the callers take as "gone")."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        head = os.read(fd, _HEADER_PROBE)
        if header_only:
            for sep in (b"\r\n\r\n", b"\n\n"):
                i = head.find(sep)
                if i >= 0:
                    return head[:i + len(sep)]
            if head.startswith((b"\r\n", b"\n")):
                return head[:2] if head.startswith(b"\r\n") else head[:1]
        if len(head) < _HEADER_PROBE:
            return head
        chunks = [head]
        while chunk := os.read(fd, _READ_CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class _Headers:
    """Message headers by file path, per process, for SEARCH and header-only FETCH: a
    Maildir file's octets never change under its name (a flag change renames it: a miss,
    never a stale answer). Bounded in octets; the oldest half goes when full. A plain dict
    read without a lock (one lookup per message of a 10,000-message SEARCH)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: dict[str, bytes] = {}
        self._size = 0
        self._lock = threading.Lock()
        self.get: Callable[[str], bytes | None] = self._items.get

    def add(self, path: str, header: bytes) -> None:
        cost = len(header) + len(path) + 100
        if cost > self.limit // 64:
            return
        with self._lock:
            if path in self._items:
                return
            if self._size + cost > self.limit:
                drop = list(self._items)[:len(self._items) // 2 + 1]
                for k in drop:
                    self._size -= len(self._items.pop(k)) + len(k) + 100
            self._items[path] = header
            self._size += cost

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._size = 0


def _const(data: bytes) -> Callable[[], bytes]:
    return lambda: data


class _LazySearch(im.SearchMessage):
    """A SearchMessage that reads its file only when a key looks at the content."""

    loader: Callable[[], bytes] = staticmethod(lambda: b"")  # type: ignore[assignment]
    header_only: bool = False

    @cached_property
    def root(self) -> im.Part:  # type: ignore[override]
        data = im.to_wire(self.loader()[:im.SEARCH_CAP])
        return im.parse_header(data) if self.header_only else im.parse(data)


CACHE_BYTES = 16 * 1024 * 1024  # per process


class _Cache:
    """Headers and ENVELOPE/BODYSTRUCTURE/BODY answers of message files, per process, by
    (mailbox directory, Maildir unique name): a delivered file's octets never change, so an
    entry is never stale. Clients ask for envelopes at every resync and a header SEARCH
    would otherwise open every file; bounded in octets, least recently used out first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[tuple[str, str], dict[str, bytes]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> dict[str, bytes]:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                return {}
            self._items.move_to_end(key)
            return dict(found)

    def add(self, key: tuple[str, str], name: str, value: bytes) -> None:
        cost = len(value) + len(key[1]) + 100
        if cost > self.limit // 64:
            return  # one huge header or structure would push out hundreds of others
        with self._lock:
            entry = self._items.setdefault(key, {})
            if name in entry:
                return
            entry[name] = value
            self._items.move_to_end(key)
            self._size += cost
            while self._size > self.limit and self._items:
                _, gone = self._items.popitem(last=False)
                self._size -= sum(len(v) + len(key[1]) + 100 for v in gone.values())

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._size = 0


_CACHE = _Cache(CACHE_BYTES)
_HEADERS = _Headers(CACHE_BYTES)


def _cache_name(att: FetchAtt) -> str | None:
    """The cache slot of a FETCH item that depends on the octets alone, without options."""
    if att.name in ("ENVELOPE", "BODYSTRUCTURE") or (att.name == "BODY" and att.section is None):
        return att.name
    return None


_STORES: weakref.WeakValueDictionary[str, MailStore] = weakref.WeakValueDictionary()
_STORES_LOCK = threading.Lock()


_SNAPSHOTS: weakref.WeakKeyDictionary[
    Mailbox, tuple[tuple[int, int, int], list[int], dict[int, MessageInfo]]] \
    = weakref.WeakKeyDictionary()


def _snapshot(box: Mailbox, scan: ScanResult) -> tuple[list[int], dict[int, MessageInfo]]:
    """The messages of ``box`` (UIDs ascending, and by UID) as of at least the scan's
    HIGHESTMODSEQ, one copy for every session of the process that asks at the same
    HIGHESTMODSEQ of the same map: a map made anew counts its MODSEQs from the start again,
    and may even get the old UIDVALIDITY (its record lost too, within the same second), so
    the key also holds the generation of the process's copy, raised at each new start.
    Never to be changed in place (views copy first: ``MailSession._own``)."""
    version = (scan.generation, scan.uidvalidity, scan.highestmodseq)
    with _STORES_LOCK:
        found = _SNAPSHOTS.get(box)
    if found is not None and found[0] == version:
        return found[1], found[2]
    infos = box.messages()
    snap = (version, [m.uid for m in infos], {m.uid: m for m in infos})
    with _STORES_LOCK:
        _SNAPSHOTS[box] = snap
    return snap[1], snap[2]


_DIFFERENCES: weakref.WeakKeyDictionary[
    Mailbox, tuple[dict[int, MessageInfo], dict[int, MessageInfo], list[int], list[int],
                   list[int]]] = weakref.WeakKeyDictionary()


def _difference(box: Mailbox, old: dict[int, MessageInfo], new: dict[int, MessageInfo],
                ) -> tuple[list[int], list[int], list[int]]:
    """UIDs (ascending) of ``old`` not in ``new``, of those whose flags changed, and of
    those whose flags or MODSEQ changed, between two snapshots of ``box``: worked out once
    for all the sessions of the process whose views were ``old`` (200 sessions woken on a
    mailbox of 2,000 messages would otherwise compare 400,000 entries)."""
    with _STORES_LOCK:
        found = _DIFFERENCES.get(box)
    if found is not None and found[0] is old and found[1] is new:
        return found[2], found[3], found[4]
    gone = [u for u in old if u not in new]
    flagged: list[int] = []
    modded: list[int] = []
    for u, m in new.items():
        was = old.get(u)
        if was is None or was is m:
            continue
        if m.flags != was.flags:
            flagged.append(u)
            modded.append(u)
        elif m.modseq != was.modseq:
            modded.append(u)
    with _STORES_LOCK:
        _DIFFERENCES[box] = (old, new, gone, flagged, modded)
    return gone, flagged, modded


KEEP_STORES = 4  # the stores of the users who logged in last, kept after their sessions
_KEPT: OrderedDict[str, MailStore] = OrderedDict()


def _store_for(maildir: Path) -> MailStore:
    """One MailStore per Maildir per process, shared by that user's sessions: a mailbox's
    UID map is then replayed once, not at every SELECT (Mailbox serialises its callers).
    The last few users' stores outlive their sessions, so a client that logs in again
    (most connect for each check) finds its maps and snapshots in memory: a map is only
    read forward from where it was, never trusted beyond what its file says."""
    key = os.path.abspath(maildir)
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            store = _STORES[key] = MailStore(maildir)
        _KEPT[key] = store
        _KEPT.move_to_end(key)
        while len(_KEPT) > KEEP_STORES:
            _KEPT.popitem(last=False)
        return store


def _silent_view(old: frozenset[str], new: frozenset[str], action: str,
                 asked: Iterable[str]) -> frozenset[str]:
    """The flags a client believes a message has after ``STORE ... .SILENT``: those it knew
    with the change it asked for (spelled as stored). A change another session made
    meanwhile is in ``new`` only, so the view must not take ``new`` whole: the next sync
    would then find nothing to report and the client would never hear of that change."""
    spelled = {f.lower(): f for f in new}
    want = {spelled.get(f.lower(), f) for f in asked}
    if action == "FLAGS":
        return frozenset(want)
    lower = {f.lower() for f in want}
    kept = {f for f in old if f.lower() not in lower}
    return frozenset(kept | want) if action == "+FLAGS" else frozenset(kept)


# ------------------------------------------------------------------------------ the session


@dataclass(slots=True)
class _View:
    """The selected mailbox as this session's client knows it."""

    box: Mailbox
    name: str
    readonly: bool
    uids: list[int] = field(default_factory=list)  # sequence number - 1 -> UID, ascending
    info: dict[int, MessageInfo] = field(default_factory=dict)
    recent: set[int] = field(default_factory=set)
    top: int = 0  # highest UID the client was told of
    keywords: frozenset[str] = frozenset()
    modseq: int = 0  # the mailbox's HIGHESTMODSEQ when the view was last brought up to date
    shared: bool = False  # uids and info are the mailbox's snapshot: copy before a change


class MailSession:
    """One logged-in user's mailbox side of one IMAP session. One call at a time."""

    def __init__(self, maildir: Path, *, user: str, settings: MailSessionSettings) -> None:
        self.maildir = maildir
        self.user = user
        self.settings = settings
        self.store = _store_for(maildir)
        self.store.ensure_special()
        self.rev2 = False
        self.utf8 = False
        self.condstore = False
        self.qresync = False
        self.view: _View | None = None
        self.saved: list[int] = []  # SEARCHRES ``$``, as UIDs
        self._changed: list[Path] = []
        self._rescanned = False  # a stale path was refreshed during this command
        self._dirty = False  # this command changed the selected mailbox behind the view
        self._synced = 0.0  # time.monotonic() of the last rescan
        self._updated = 0.0  # time.monotonic() when the last ``updates`` ended

    # -- the contract ---------------------------------------------------------------------

    @property
    def watched(self) -> Path | None:
        return self.view.box.path if self.view is not None else None

    def changed(self) -> Path | None:
        """The directory the last command changed (the first of them), once."""
        dirs = self.changed_dirs()
        return dirs[0] if dirs else None

    def changed_dirs(self) -> list[Path]:
        """Every directory the last command changed (MOVE: target and source), once."""
        out, self._changed = self._changed, []
        return list(dict.fromkeys(out))

    def close(self) -> None:
        self.view = None

    def updates(self, since: float | None = None) -> list[bytes]:
        """EXPUNGE/VANISHED, FETCH FLAGS and EXISTS since the last report (NOOP, IDLE).
        ``since``: IDLE's wake-up time; a scan of the mailbox begun after it, by any
        session of this process, serves (``Mailbox.scan``). None (NOOP, IDLE's first
        look after the commands before it): a scan of its own.

        The scan must also have begun after this session's previous ``updates`` ended:
        that call may have taken in a snapshot made after a later change (another
        session's snapshot), and an older scan's snapshot next to it would look like
        messages expunged, flags going back. Only ``updates`` changes the view between
        two calls with a ``since`` (IDLE runs no command)."""
        if self.view is None:
            return []
        self._dirty = False
        self._synced = time.monotonic()
        if since is not None:
            since = max(since, self._updated)
        try:
            return self._sync(expunge_ok=True, since=since)
        finally:
            self._updated = time.monotonic()

    def execute(self, cmd: Command) -> Outcome:
        handler = getattr(self, "_cmd_" + cmd.name.lower(), None)
        if handler is None or (cmd.name == "LSUB" and self.rev2):
            return Outcome("BAD", "unknown command")
        self._changed = []
        self._rescanned = False
        was = self.view is not None
        outcome = self._guarded(handler, cmd)
        if was and self.view is None and outcome.selected is None:
            outcome.selected = False  # a failed SELECT (or a vanished mailbox) deselected
        return outcome

    def _guarded(self, handler: Callable[[Command], Outcome], cmd: Command) -> Outcome:
        """The handler's outcome, or the refusal its exception means."""
        try:
            return handler(cmd)
        except _Bad as exc:
            return Outcome("BAD", exc.text, exc.code)
        except _No as exc:
            return Outcome("NO", exc.text, exc.code)
        except MailboxBusy:
            return Outcome("NO", "mailbox in use by a POP3 session, try again", "INUSE")
        except NoSuchMailbox:
            return Outcome("NO", "no such mailbox", "NONEXISTENT")
        except MailboxExists:
            return Outcome("NO", "mailbox already exists", "ALREADYEXISTS")
        except (BadName, MailboxError) as exc:
            return Outcome("NO", str(exc) or "cannot do that", "CANNOT")
        except OSError as exc:
            if exc.errno in (errno.EDQUOT, errno.ENOSPC):
                return Outcome("NO", "no room to store", "OVERQUOTA")
            return Outcome("NO", "storage failure", "SERVERBUG")

    # -- names ---------------------------------------------------------------------------

    def _name_in(self, name: str) -> str:
        """A mailbox name from the wire (modified UTF-7 in IMAP4rev1) as the store's."""
        if name == INBOX or self.utf8 or not name.isascii():
            return name
        try:
            return mutf7.decode(name)
        except ValueError:
            raise _No("mailbox name is not modified UTF-7", "CANNOT") from None

    def _name_out(self, name: str) -> bytes:
        return _quote(name if self.utf8 else mutf7.encode(name))

    def _wire_name(self, name: str) -> str:
        return name if self.utf8 else mutf7.encode(name)

    # -- the view and its updates ----------------------------------------------------------

    def _need_view(self) -> _View:
        if self.view is None:
            raise _Bad("no mailbox selected")
        return self.view

    @staticmethod
    def _own(v: _View) -> None:
        """Copy the view's lists before changing them, if it shares the mailbox's snapshot
        (sessions that have caught up share one, so idle sessions cost little each)."""
        if v.shared:
            v.uids, v.info, v.shared = list(v.uids), dict(v.info), False

    def _fetch_line(self, seq: int, info: MessageInfo, uid: bool) -> bytes:
        v = self.view
        assert v is not None
        recent = not self.rev2 and info.uid in v.recent
        parts = [b"FLAGS " + _flag_list(info.flags, recent)]
        if uid or self.qresync:
            parts.insert(0, b"UID %d" % info.uid)
        if self.condstore:
            parts.append(b"MODSEQ (%d)" % info.modseq)
        return b"* %d FETCH (%s)\r\n" % (seq, b" ".join(parts))

    def _flags_response(self, keywords: frozenset[str]) -> list[bytes]:
        v = self.view
        assert v is not None
        flags = set(SYSTEM_ORDER) | keywords
        out = [b"* FLAGS " + _flag_list(flags) + b"\r\n"]
        if not v.readonly:
            kw = b" ".join(k.encode("utf-8", "surrogateescape")
                           for k in sorted(keywords, key=str.lower))
            perm = PERMANENT[:-3] + (kw + b" " if kw else b"") + b"\\*)"
            out.append(b"* OK [PERMANENTFLAGS " + perm + b"] flags that stay\r\n")
        else:
            out.append(b"* OK [PERMANENTFLAGS ()] read-only\r\n")
        return out

    def _note_keywords(self, flags: Iterable[frozenset[str]]) -> list[bytes]:
        v = self.view
        assert v is not None
        kws = {k.lower(): k for k in v.keywords}
        grown = False
        for fl in flags:
            for f in fl:
                if not f.startswith("\\") and f.lower() not in kws:
                    kws[f.lower()] = f
                    grown = True
        if not grown:
            return []
        v.keywords = frozenset(kws.values())
        return self._flags_response(v.keywords)

    def _sync(self, expunge_ok: bool, since: float | None = None) -> list[bytes]:
        """Rescan and report what changed since the client last heard (module docstring)."""
        v = self.view
        if v is None:
            return []
        box = v.box
        try:
            scan = box.scan(since)
        except (MailboxError, OSError):
            return []  # the mailbox went away (DELETE elsewhere): nothing to say now
        v.recent.update(scan.added)
        if scan.highestmodseq == v.modseq and not scan.added:
            return []  # no change of any kind since the last look (each one raises it)
        try:
            snap_uids, current = _snapshot(box, scan)
        except (MailboxError, OSError):
            return []
        v.modseq = scan.highestmodseq
        out: list[bytes] = []
        changed: list[tuple[int, MessageInfo]] = []
        new_from = bisect.bisect_right(snap_uids, v.top)
        if v.shared:  # the view is an older snapshot: its difference is worked out once
            gone, flagged, modded = _difference(box, v.info, current)
            if not gone and len(v.uids) + len(snap_uids) - new_from == len(snap_uids):
                for u in modded if self.condstore else flagged:
                    changed.append((bisect.bisect_left(v.uids, u) + 1, current[u]))
                return self._report(out, changed, snap_uids, current, new_from, False)
        self._own(v)
        gone = [u for u in v.uids if u not in current]
        deferred = bool(gone) and not expunge_ok
        if deferred:
            v.modseq = -1  # expunges still to report: the next sync must not skip
        elif gone:
            if self.qresync:
                out.append(b"* VANISHED %s\r\n" % uid_set(gone).encode())
                keep = set(gone)
                v.uids = [u for u in v.uids if u not in keep]
            else:
                for u in reversed(gone):
                    i = bisect.bisect_left(v.uids, u)
                    out.append(b"* %d EXPUNGE\r\n" % (i + 1))
                    del v.uids[i]
            for u in gone:
                v.info.pop(u, None)
                v.recent.discard(u)
        for i, u in enumerate(v.uids):
            m = current.get(u)
            if m is None:
                continue
            old = v.info[u]
            if m.flags != old.flags or (self.condstore and m.modseq != old.modseq):
                changed.append((i + 1, m))
            v.info[u] = m  # the path too, which a flag change elsewhere renamed
        return self._report(out, changed, snap_uids, current, new_from, deferred)

    def _report(self, out: list[bytes], changed: list[tuple[int, MessageInfo]],
                snap_uids: list[int], current: dict[int, MessageInfo], new_from: int,
                deferred: bool) -> list[bytes]:
        """``_sync``'s end: FETCH FLAGS of ``changed``, the messages after the view's top,
        EXISTS; the view takes the snapshot when it has caught up with it."""
        v = self.view
        assert v is not None
        out += self._note_keywords(m.flags for _, m in changed)
        out += [self._fetch_line(seq, m, False) for seq, m in changed]
        new = [current[u] for u in snap_uids[new_from:]]
        if not deferred and len(v.uids) + len(new) == len(snap_uids):
            v.uids, v.info, v.shared = snap_uids, current, True  # caught up: share it
        if new:
            out += self._note_keywords(m.flags for m in new)
            if not v.shared:
                for m in new:
                    v.uids.append(m.uid)
                    v.info[m.uid] = m
            v.top = new[-1].uid
            out.append(b"* %d EXISTS\r\n" % len(v.uids))
            if not self.rev2:
                out.append(b"* %d RECENT\r\n" % len(v.recent))
        return out

    def _due(self, expunge_ok: bool) -> list[bytes]:
        """The updates after a command: at once when this command changed the mailbox in a
        way the view does not yet show (EXPUNGE, APPEND, COPY into it, MOVE), else at most
        every ``sync_interval`` (RFC 9051 §7: updates may come with any later command), so
        a burst of pipelined STOREs costs no rescan of the mailbox each."""
        if self.view is None:
            return []
        now = time.monotonic()
        if not self._dirty and now - self._synced < self.settings.sync_interval:
            return []
        self._dirty = False
        self._synced = now
        return self._sync(expunge_ok)

    def _after(self, main: Iterable[bytes], expunge_ok: bool = True) -> Iterator[bytes]:
        """``main``, then the updates due after it (computed when ``main`` is drained)."""
        yield from main
        yield from self._due(expunge_ok)

    def _done(self, text: str = "done", code: str | None = None,
              untagged: Iterable[bytes] = (), expunge_ok: bool = True) -> Outcome:
        if self.view is None:
            return Outcome("OK", text, code, list(untagged))
        return Outcome("OK", text, code, [*untagged, *self._due(expunge_ok)])

    def _resolve(self, seqset: SequenceSet, uid: bool) -> list[int]:
        """Indexes into the view (ascending, no duplicates) that ``seqset`` names.

        By sequence number, a number beyond the view is BAD (as Dovecot); by UID, UIDs
        that are not there are simply not named, and ``n:*`` always names the last one.
        """
        v = self._need_view()
        uids = v.uids
        if seqset.saved:
            keep = set(self.saved)
            return [i for i, u in enumerate(uids) if u in keep]
        spans: list[tuple[int, int]] = []
        if uid:
            star = uids[-1] if uids else 0
            for lo, hi in seqset.ranges:
                a, b = (star if lo is None else lo), (star if hi is None else hi)
                a, b = min(a, b), max(a, b)
                i, j = bisect.bisect_left(uids, a), bisect.bisect_right(uids, b)
                if i < j:
                    spans.append((i, j))
        else:
            star = len(uids)
            for lo, hi in seqset.ranges:
                a, b = (star if lo is None else lo), (star if hi is None else hi)
                a, b = min(a, b), max(a, b)
                if a < 1 or b > star:
                    raise _Bad("invalid message sequence number")
                spans.append((a - 1, b))
        spans.sort()
        out: list[int] = []
        end = 0
        for i, j in spans:
            i = max(i, end)
            if i < j:
                out.extend(range(i, j))
                end = j
        return out

    def _cache_key(self, info: MessageInfo, box: str = "") -> tuple[str, str]:
        """(mailbox directory, unique name); ``box``: the directory as text, if known."""
        v = self.view
        assert v is not None
        return box or str(v.box.path), info.path.rpartition("/")[2].partition(":")[0]

    def _read_message(self, uid: int, header_only: bool) -> bytes | None:
        """The message (or its header), None when it is gone. A path made stale by
        another session's flag change is refreshed by one rescan per command (many stale
        paths cost one listing); a file renamed again after that is looked up alone."""
        v = self.view
        assert v is not None
        info = v.info.get(uid)
        if info is None:
            return None
        if header_only:
            cached = _HEADERS.get(info.path)
            if cached is not None:
                return cached
        for attempt in range(4):
            try:
                path = v.info[uid].path
                data = _read(path, header_only)
                if header_only:
                    _HEADERS.add(path, data)
                return data
            except FileNotFoundError:
                pass
            self._own(v)
            if not self._rescanned:
                self._rescanned = True
                v.box.scan()
                for m in v.box.messages():
                    if m.uid in v.info:
                        v.info[m.uid] = dataclasses.replace(v.info[m.uid], path=m.path)
            elif attempt < 3:
                path = v.box.locate(uid)  # renamed since (flags) under us, or gone
                if path is None:
                    break
                v.info[uid] = dataclasses.replace(v.info[uid], path=path)
        return None  # expunged elsewhere: a later sync reports it

    def _enable_condstore(self) -> None:
        self.condstore = True

    # -- ENABLE NAMESPACE CHECK ------------------------------------------------------------

    def _cmd_enable(self, cmd: Command) -> Outcome:
        """ENABLE of what is announced; others ignored (RFC 5161 §3.1). UTF8=ACCEPT is not
        announced: its APPEND form (RFC 6855 §4) is not implemented, and IMAP4rev2 already
        gives UTF-8 mailbox names to the clients that ask for it."""
        done: list[str] = []
        for cap in cmd.args:
            cap = str(cap).upper()
            if cap == "IMAP4REV2" and not self.rev2:
                self.rev2 = self.utf8 = True
                done.append("IMAP4rev2")
            elif cap == "CONDSTORE" and not self.condstore:
                self.condstore = True
                done.append("CONDSTORE")
            elif cap == "QRESYNC" and not self.qresync:
                self.qresync = self.condstore = True
                done.append("QRESYNC")
        line = b"* ENABLED" + b"".join(b" " + c.encode() for c in done) + b"\r\n"
        return self._done("enabled", untagged=[line])

    def _cmd_namespace(self, cmd: Command) -> Outcome:
        return self._done("namespaces", untagged=[b'* NAMESPACE (("" ".")) NIL NIL\r\n'])

    def _cmd_check(self, cmd: Command) -> Outcome:
        self._need_view()
        return Outcome("OK", "check done", untagged=self.updates())

    # -- SELECT EXAMINE CLOSE UNSELECT -------------------------------------------------------

    def _cmd_select(self, cmd: Command) -> Outcome:
        return self._select(cmd, readonly=False)

    def _cmd_examine(self, cmd: Command) -> Outcome:
        return self._select(cmd, readonly=True)

    def _select(self, cmd: Command, readonly: bool) -> Outcome:
        name, params = cmd.args  # type: ignore[misc]
        out: list[bytes] = []
        was = self.view is not None
        if was and (self.rev2 or self.qresync):
            out.append(b"* OK [CLOSED] previous mailbox closed\r\n")
        self.view = None
        qresync: tuple[int, int, list[tuple[int, int]] | None] | None = None
        params = list(params)
        while params:
            p = _atom(params.pop(0)).upper()
            if p == "CONDSTORE":
                self._enable_condstore()
            elif p == "QRESYNC":
                if not self.qresync:
                    return Outcome("BAD", "ENABLE QRESYNC first", selected=False if was else None)
                if not params or not isinstance(params[0], tuple) or len(params[0]) < 2:
                    return Outcome("BAD", "bad QRESYNC parameter",
                                   selected=False if was else None)
                q = params.pop(0)
                known = _parse_uid_text(_atom(q[2])) if len(q) > 2 and not isinstance(
                    q[2], tuple) else None
                qresync = (_number(q[0], "UIDVALIDITY"), _number(q[1], "MODSEQ"), known)
            else:
                return Outcome("BAD", "unknown SELECT parameter", selected=False if was else None)
        try:
            box = self.store.mailbox(self._name_in(name))
            scan = box.scan()  # UIDVALIDITY and UIDNEXT too (no status(): it sums sizes)
            uids, info = _snapshot(box, scan)  # as of scan.highestmodseq or later
        except (NoSuchMailbox, BadName, _No):
            return Outcome("NO", "no such mailbox", "NONEXISTENT", out,
                           selected=False if was else None)
        v = _View(box, box.name, readonly, uids, info, shared=True)
        v.recent = set(scan.added)
        v.top = v.uids[-1] if v.uids else 0
        v.modseq = scan.highestmodseq
        infos = [info[u] for u in uids]
        v.keywords = frozenset(f for f in set().union(*(m.flags for m in infos))
                               if not f.startswith("\\"))
        self.view = v
        self._synced = time.monotonic()
        uidnext = max(scan.uidnext, v.top + 1)
        out += self._flags_response(v.keywords)
        out.append(b"* %d EXISTS\r\n" % len(v.uids))
        if not self.rev2:
            out.append(b"* %d RECENT\r\n" % len(v.recent))
            unseen = next((i + 1 for i, m in enumerate(infos) if "\\Seen" not in m.flags), 0)
            if unseen:
                out.append(b"* OK [UNSEEN %d] first unseen\r\n" % unseen)
        out.append(b"* OK [UIDVALIDITY %d] UIDs valid\r\n" % scan.uidvalidity)
        out.append(b"* OK [UIDNEXT %d] predicted next UID\r\n" % uidnext)
        out.append(b"* OK [HIGHESTMODSEQ %d] highest\r\n" % scan.highestmodseq)
        if self.rev2:
            attrs = self._attrs_of(box.name)
            out.append(b"* LIST (" + " ".join(sorted(attrs)).encode() + b') "." '
                       + self._name_out(box.name) + b"\r\n")
        if qresync is not None and qresync[0] == scan.uidvalidity:
            out += self._qresync(qresync[1], qresync[2])
        return Outcome("OK", "selected", "READ-ONLY" if readonly else "READ-WRITE", out,
                       selected=True)

    def _qresync(self, modseq: int, known: list[tuple[int, int]] | None) -> list[bytes]:
        """VANISHED (EARLIER) and FETCH for what changed since ``modseq`` (RFC 7162 §3.2.5)."""
        v = self.view
        assert v is not None
        out: list[bytes] = []
        gone = v.box.expunged_since(modseq)
        if known is not None:
            gone = [u for u in gone if _in_ranges(u, known)]
        if gone:
            out.append(b"* VANISHED (EARLIER) %s\r\n" % uid_set(gone).encode())
        for i, u in enumerate(v.uids):
            m = v.info[u]
            if m.modseq > modseq:
                out.append(self._fetch_line(i + 1, m, True))
        return out

    def _cmd_close(self, cmd: Command) -> Outcome:
        v = self._need_view()
        if not v.readonly:
            with contextlib.suppress(MailboxBusy):
                if v.box.expunge(v.uids):
                    self._changed.append(v.box.path)
        self.view = None
        return Outcome("OK", "closed", selected=False)

    def _cmd_unselect(self, cmd: Command) -> Outcome:
        self._need_view()
        self.view = None
        return Outcome("OK", "unselected", selected=False)

    # -- mailboxes -------------------------------------------------------------------------

    def _special(self) -> dict[str, str]:
        """Special-use attributes: the built-in names, then those CREATE (USE) gave."""
        out = dict(SPECIAL_USE)
        try:
            text = (self.maildir / SPECIAL_FILE).read_text("utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            return out
        for line in text.splitlines():
            name, _, attr = line.partition("\t")
            if attr in USE_ATTRS:
                with contextlib.suppress(ValueError):
                    out[mutf7.decode(name)] = attr
        return out

    def _write_lines(self, file: str, lines: list[str]) -> None:
        path = self.maildir / file
        tmp = self.maildir / f"{file}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.maildir)

    def _set_special(self, name: str, attr: str | None) -> None:
        table = {k: v for k, v in self._special().items() if SPECIAL_USE.get(k) != v}
        table.pop(name, None)
        if attr is not None:
            table[name] = attr
        self._write_lines(SPECIAL_FILE, [f"{mutf7.encode(k)}\t{v}" for k, v in
                                         sorted(table.items())])

    def _subscriptions(self) -> list[str]:
        try:
            text = (self.maildir / SUBSCRIPTIONS).read_text("utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            return []
        out = []
        for line in text.splitlines():
            if not line or line.startswith("V\t"):
                continue  # Dovecot's version line; its names separate levels with a tab
            with contextlib.suppress(ValueError):
                name = mutf7.decode(line.replace("\t", SEP))
                out.append(INBOX if name.upper() == INBOX else name)
        return list(dict.fromkeys(out))

    def _attrs_of(self, name: str) -> set[str]:
        names = self.store.names()
        attrs = {"\\HasChildren" if any(n.startswith(name + SEP) for n in names)
                 else "\\HasNoChildren"}
        use = self._special().get(name)
        if use:
            attrs.add(use)
        return attrs

    def _cmd_create(self, cmd: Command) -> Outcome:
        name, params = cmd.args  # type: ignore[misc]
        name = self._name_in(name)
        if name.endswith(SEP):
            name = name[:-1]  # "a trailing separator: inferiors to come" (RFC 9051 §6.3.4)
        use: str | None = None
        params = list(params)
        while params:
            p = _atom(params.pop(0)).upper()
            if p != "USE" or not params or not isinstance(params[0], tuple):
                raise _Bad("unknown CREATE parameter")
            attrs = [_atom(a) for a in params.pop(0)]
            known = {a.lower(): a for a in USE_ATTRS}
            for a in attrs:
                if a.lower() not in known:
                    raise _No(f"special use {a} not supported", "USEATTR")
            if len(attrs) > 1:
                raise _No("one special use per mailbox", "USEATTR")
            use = known[attrs[0].lower()] if attrs else None
        if len(self.store.names()) >= self.settings.max_mailboxes:
            raise _No("too many mailboxes", "LIMIT")
        self.store.create(name)
        if use is not None and SPECIAL_USE.get(name) != use:
            self._set_special(name, use)
        return self._done("created")

    def _cmd_delete(self, cmd: Command) -> Outcome:
        name = self._name_in(cmd.args[0])  # type: ignore[arg-type]
        if name == INBOX:
            raise _No("INBOX cannot be deleted", "CANNOT")
        if self.view is not None and self.view.name == _check_name(name):
            raise _No("the selected mailbox cannot be deleted; UNSELECT first", "INUSE")
        self.store.delete(name)
        if name in self._special() and name not in SPECIAL_USE:
            self._set_special(name, None)
        return self._done("deleted")

    def _cmd_rename(self, cmd: Command) -> Outcome:
        old, new = (self._name_in(n) for n in cmd.args)  # type: ignore[union-attr]
        if new.endswith(SEP):
            new = new[:-1]
        if old == INBOX:  # RFC 9051 §6.3.6: the messages move, INBOX stays, empty
            if new == INBOX:
                raise _No("cannot rename INBOX to itself", "CANNOT")
            inbox = self.store.mailbox(INBOX)
            target = self.store.create(new)
            inbox.scan()
            uids = [m.uid for m in inbox.messages()]
            if uids:
                inbox.move_to(uids, target)
                self._changed += [inbox.path, target.path]
                self._dirty = True
            return self._done("INBOX renamed")
        special = self._special()
        self.store.rename(old, new)
        for name, attr in special.items():
            if name not in SPECIAL_USE and (name == old or name.startswith(old + SEP)):
                self._set_special(name, None)
                self._set_special(new + name[len(old):], attr)
        v = self.view
        if v is not None and (v.name == old or v.name.startswith(old + SEP)):
            v.name = new + v.name[len(old):]
            v.box = self.store.mailbox(v.name)  # same map: UIDs and validity stay
        return self._done("renamed")

    def _cmd_subscribe(self, cmd: Command) -> Outcome:
        name = _check_name(self._name_in(cmd.args[0]))  # type: ignore[arg-type]
        subs = self._subscriptions()
        if name not in subs:
            self._write_lines(SUBSCRIPTIONS, [mutf7.encode(n) for n in [*subs, name]])
        return self._done("subscribed")

    def _cmd_unsubscribe(self, cmd: Command) -> Outcome:
        name = self._name_in(cmd.args[0])  # type: ignore[arg-type]
        subs = self._subscriptions()
        if name not in subs:
            raise _No("not subscribed", "NONEXISTENT")
        self._write_lines(SUBSCRIPTIONS, [mutf7.encode(n) for n in subs if n != name])
        return self._done("unsubscribed")

    # -- LIST LSUB ---------------------------------------------------------------------------

    @staticmethod
    def _pattern(pattern: str) -> re.Pattern[str]:
        rx = "".join(".*" if c == "*" else "[^.]*" if c == "%" else re.escape(c)
                     for c in pattern)
        return re.compile(rx, re.DOTALL)

    def _matcher(self, ref: str, patterns: Iterable[str]) -> Callable[[str], bool]:
        """Whether a store name matches one of the patterns (wire form: modified UTF-7 in
        IMAP4rev1); INBOX in any case."""
        rxs = []
        for p in patterns:
            full = ref + p
            rxs.append(self._pattern(full))
            if full[:5].upper() == INBOX and (len(full) == 5 or full[5] in "*%"):
                rxs.append(self._pattern(INBOX + full[5:]))

        def match(name: str) -> bool:
            wire = self._wire_name(name)
            return any(rx.fullmatch(wire) for rx in rxs)
        return match

    def _cmd_list(self, cmd: Command) -> Outcome:
        select, ref, patterns, ret = cmd.args  # type: ignore[misc]
        select = {str(s).upper() for s in select}
        if select - {"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"}:
            raise _Bad("unknown LIST selection option")
        if "RECURSIVEMATCH" in select and not select & {"SUBSCRIBED", "SPECIAL-USE"}:
            raise _Bad("RECURSIVEMATCH needs another selection option")
        want: set[str] = set()
        status_items: tuple[str, ...] = ()
        ret = list(ret)
        while ret:
            r = _atom(ret.pop(0)).upper()
            if r == "STATUS":
                if not ret or not isinstance(ret[0], tuple):
                    raise _Bad("STATUS needs a list of items")
                status_items = tuple(_atom(x).upper() for x in ret.pop(0))
                self._check_status_items(status_items)
            elif r in ("SUBSCRIBED", "CHILDREN", "SPECIAL-USE"):
                want.add(r)
            else:
                raise _Bad("unknown LIST return option")
        ref_s = ref
        if not select and not ret and len(patterns) == 1 and patterns[0] == "":
            root = b'""' if not ref_s else _quote(ref_s.split(SEP)[0])
            return self._done("listed", untagged=[b'* LIST (\\Noselect) "." ' + root + b"\r\n"])
        return self._done("listed", untagged=self._list_lines(
            select, ref_s, patterns, want, status_items, lsub=False))

    def _list_lines(self, select: set[str], ref: str, patterns: Iterable[str], want: set[str],
                    status_items: tuple[str, ...], lsub: bool) -> list[bytes]:
        match = self._matcher(ref, patterns)
        names = self.store.names()
        existing = set(names)
        special = self._special()
        subs = set(self._subscriptions()) if (select | want) & {"SUBSCRIBED"} or lsub else set()
        everything = set(names)
        for n in names:  # parents that exist only through their children (Maildir++)
            parts = n.split(SEP)
            for k in range(1, len(parts)):
                everything.add(SEP.join(parts[:k]))
        if "SUBSCRIBED" in select or lsub:
            everything |= subs
        kids: dict[str, set[str]] = {}
        for n in everything:
            if SEP in n:
                kids.setdefault(n.rsplit(SEP, 1)[0], set()).add(n)
        out: list[bytes] = []
        for name in sorted(everything, key=lambda n: (n != INBOX, n)):
            attrs: list[str] = []
            extra = b""
            exists = name in existing
            children = kids.get(name, set())
            if ("SUBSCRIBED" in select or lsub) and name not in subs:
                sub_kids = [c for c in subs if c.startswith(name + SEP)]
                if "RECURSIVEMATCH" in select and sub_kids and match(name):
                    extra = b' ("CHILDINFO" ("SUBSCRIBED"))'
                elif lsub and sub_kids and match(name) and not any(map(match, sub_kids)):
                    attrs.append("\\Noselect")  # "%" hid the subscribed children
                else:
                    continue
            if "SPECIAL-USE" in select and name not in special:
                continue
            if not match(name):
                continue
            if not exists:
                attrs.append("\\NonExistent" if self.rev2 or select or want else "\\Noselect")
            if not lsub:
                attrs.append("\\HasChildren" if children else "\\HasNoChildren")
            if exists and name in special:
                attrs.append(special[name])
            if name in subs and ((select | want) & {"SUBSCRIBED"}):
                attrs.append("\\Subscribed")
            word = b"LSUB" if lsub else b"LIST"
            attr_b = " ".join(dict.fromkeys(attrs)).encode()
            out.append(b"* " + word + b" (" + attr_b + b') "." ' + self._name_out(name)
                       + extra + b"\r\n")
            if status_items and exists:
                with contextlib.suppress(MailboxError, OSError):
                    out.append(self._status_line(name, status_items))
        return out

    def _cmd_lsub(self, cmd: Command) -> Outcome:
        ref, pattern = cmd.args  # type: ignore[misc]
        if pattern == "":
            return self._done("listed", untagged=[b'* LSUB (\\Noselect) "." ""\r\n'])
        return self._done("listed", untagged=self._list_lines(set(), ref, [pattern], set(), (),
                                                              lsub=True))

    # -- STATUS ----------------------------------------------------------------------------

    def _check_status_items(self, items: Iterable[str]) -> None:
        for item in items:
            if item not in ("MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "DELETED", "SIZE",
                            "HIGHESTMODSEQ", "RECENT", "APPENDLIMIT"):
                raise _Bad(f"status item {item} not supported")

    def _status_line(self, name: str, items: tuple[str, ...]) -> bytes:
        box = self.store.mailbox(name)
        scan = box.scan()
        st = box.status()
        infos = box.messages() if {"UNSEEN", "DELETED"} & set(items) else []
        values = {
            "MESSAGES": st["MESSAGES"], "UIDNEXT": st["UIDNEXT"],
            "UIDVALIDITY": st["UIDVALIDITY"], "SIZE": st["SIZE"],
            "HIGHESTMODSEQ": st["HIGHESTMODSEQ"], "APPENDLIMIT": self.settings.append_limit,
            "UNSEEN": sum(1 for m in infos if "\\Seen" not in m.flags),
            "DELETED": sum(1 for m in infos if "\\Deleted" in m.flags),
            "RECENT": len(self.view.recent) if self.view is not None
            and self.view.box.path == box.path else len(scan.added),
        }
        if "HIGHESTMODSEQ" in items:
            self._enable_condstore()
        body = " ".join(f"{item} {values[item]}" for item in items)
        return b"* STATUS " + self._name_out(box.name) + b" (" + body.encode() + b")\r\n"

    def _cmd_status(self, cmd: Command) -> Outcome:
        name, items = cmd.args  # type: ignore[misc]
        self._check_status_items(items)
        line = self._status_line(self._name_in(name), tuple(items))
        return self._done("status", untagged=[line])

    # -- quota -----------------------------------------------------------------------------

    def _usage(self) -> tuple[int, int]:
        """(octets, messages) over every mailbox of the user."""
        octets = count = 0
        for name in self.store.names():
            with contextlib.suppress(MailboxError, OSError):
                box = self.store.mailbox(name)
                if name == INBOX:
                    box.scan()  # deliveries waiting in new/ count too
                st = box.status()
                octets += st["SIZE"]
                count += st["MESSAGES"]
        return octets, count

    def _has_quota(self) -> bool:
        return self.settings.quota_storage is not None or self.settings.quota_messages is not None

    def _quota_line(self) -> bytes:
        octets, count = self._usage()
        res = []
        if self.settings.quota_storage is not None:
            res.append(f"STORAGE {(octets + 1023) // 1024} {self.settings.quota_storage // 1024}")
        if self.settings.quota_messages is not None:
            res.append(f"MESSAGE {count} {self.settings.quota_messages}")
        return b'* QUOTA "" (' + " ".join(res).encode() + b")\r\n"

    def _check_quota(self, octets: int, messages: int) -> None:
        if not self._has_quota():
            return
        used, count = self._usage()
        s = self.settings
        if (s.quota_storage is not None and used + octets > s.quota_storage) or \
                (s.quota_messages is not None and count + messages > s.quota_messages):
            raise _No("quota exceeded", "OVERQUOTA")

    def _cmd_getquota(self, cmd: Command) -> Outcome:
        root = cmd.args[0]
        if root not in (b"", "") or not self._has_quota():
            raise _No("no such quota root", "NONEXISTENT")
        return self._done("quota", untagged=[self._quota_line()])

    def _cmd_getquotaroot(self, cmd: Command) -> Outcome:
        name = self._name_in(cmd.args[0])  # type: ignore[arg-type]
        box = self.store.mailbox(name)
        if not self._has_quota():
            return self._done("no quota", untagged=[b"* QUOTAROOT " + self._name_out(box.name)
                                                    + b"\r\n"])
        return self._done("quota", untagged=[
            b"* QUOTAROOT " + self._name_out(box.name) + b' ""\r\n', self._quota_line()])

    # -- APPEND ----------------------------------------------------------------------------

    def _cmd_append(self, cmd: Command) -> Outcome:
        name, flags, when, literal = cmd.args  # type: ignore[misc]
        data = literal.data
        if len(data) > self.settings.append_limit:
            raise _No(f"message over the limit of {self.settings.append_limit} octets", "TOOBIG")
        if not data:
            raise _No("an empty message cannot be stored", "CANNOT")
        flags = [f for f in flags if f.lower() != "\\recent"]
        try:
            split_flags(flags)
        except ValueError as exc:
            raise _Bad(str(exc)) from None
        try:
            box = self.store.mailbox(self._name_in(name))
        except NoSuchMailbox:
            raise _No("no such mailbox", "TRYCREATE") from None
        self._check_quota(len(data), 1)
        date = int(when.timestamp()) if when is not None else None
        validity, uid = box.append(data, flags, date)
        self._changed.append(box.path)
        self._dirty = self.view is not None and self.view.box.path == box.path
        return self._done("appended", f"APPENDUID {validity} {uid}")

    # -- EXPUNGE ---------------------------------------------------------------------------

    def _cmd_expunge(self, cmd: Command) -> Outcome:
        v = self._need_view()
        if v.readonly:
            raise _No("mailbox is read-only", "READ-ONLY")
        uids = v.uids
        if cmd.uid:
            uids = [v.uids[i] for i in self._resolve(cmd.args[0], True)]  # type: ignore[arg-type]
        if v.box.expunge(uids):
            self._changed.append(v.box.path)
            self._dirty = True
        return self._done("expunged")

    # -- SEARCH ----------------------------------------------------------------------------

    def _subst_saved(self, key: SearchKey) -> SearchKey:
        """``$`` in a SEARCH key becomes the saved UIDs (RFC 5182)."""
        if key.name in ("SEQSET", "UID") and isinstance(key.args[0], SequenceSet) \
                and key.args[0].saved:
            ranges = tuple((u, u) for u in self.saved) or ((0, 0),)
            return SearchKey("UID", (SequenceSet(ranges),))
        if key.children:
            return dataclasses.replace(key, children=tuple(self._subst_saved(k)
                                                           for k in key.children))
        return key

    def _cmd_search(self, cmd: Command) -> Outcome:
        v = self._need_view()
        ret, charset, key = cmd.args  # type: ignore[misc]
        key = self._subst_saved(key)  # the $ of before this SEARCH
        if ret and "SAVE" in ret:
            self.saved = []  # RFC 5182 §2.1: a SEARCH that fails leaves $ empty
        if charset is not None and charset not in ("UTF-8", "US-ASCII"):
            raise _No("charset not supported", "BADCHARSET (UTF-8 US-ASCII)")
        work = _count_keys(key) * max(1, len(v.uids))
        if work > self.settings.max_search_work:
            raise _No("search too complex for this mailbox", "LIMIT")
        if _has_modseq(key):
            self._enable_condstore()
        need = _key_needs(key)
        now = int(time.time())
        tz = self.settings.tz or datetime.datetime.now().astimezone().tzinfo
        last_uid = v.uids[-1] if v.uids else 0
        found: list[tuple[int, int, int]] = []  # (seq, uid, modseq)
        header_only = need == 1
        # Needles every match holds: a message whose octets lack one is passed over without
        # a MIME parse (im.excluded says when the octets are what SEARCH compares).
        probe = im.search_probe(key) if need else None
        known = _HEADERS.get
        order: Iterable[int] = range(len(v.uids))
        if probe is not None and header_only:
            heads = [known(v.info[u].path) or self._header_or_none(u) for u in v.uids]
            picked = im.header_candidates(probe, [h or b"" for h in heads])
            if picked is not None:
                order = [i for i in picked if heads[i] is not None]
        for i in order:
            u = v.uids[i]
            m = v.info[u]
            data: bytes | None = None
            if probe is not None:
                try:
                    data = (header_only and known(m.path)) or self._read_message(u, header_only)
                except OSError:
                    continue
                if data is None:
                    continue  # the file went away meanwhile: the next sync expunges it
                if im.excluded(probe, data, not header_only):
                    continue
            msg = _LazySearch(b"", m.flags, u, i + 1, m.size, m.internal_date, tz,
                              len(v.uids), last_uid, u in v.recent, m.modseq, now)
            if need:
                msg.loader = self._loader(u, header_only) if data is None else _const(data)
                msg.header_only = header_only
            try:
                if im.matches(key, msg):
                    found.append((i + 1, u, m.modseq))
            except OSError:
                continue  # the file went away meanwhile: the next sync expunges it
        numbers = [f[1] if cmd.uid else f[0] for f in found]
        modseq = max((f[2] for f in found), default=0) if _has_modseq(key) else None
        out: list[bytes] = []
        if ret is None and not self.rev2:
            line = b"* SEARCH" + b"".join(b" %d" % n for n in numbers)
            if modseq:
                line += b" (MODSEQ %d)" % modseq
            out.append(line + b"\r\n")
        else:
            opts = set(ret or ()) or {"ALL"}
            if "SAVE" in opts:
                if opts & {"ALL", "COUNT"} or not opts & {"MIN", "MAX"}:
                    self.saved = [f[1] for f in found]
                else:
                    pick = []
                    if found and "MIN" in opts:
                        pick.append(found[0][1])
                    if found and "MAX" in opts:
                        pick.append(found[-1][1])
                    self.saved = sorted(set(pick))
            if opts != {"SAVE"}:
                line = b'* ESEARCH (TAG ' + _quote(cmd.tag) + b")"
                if cmd.uid:
                    line += b" UID"
                if numbers and "MIN" in opts:
                    line += b" MIN %d" % numbers[0]
                if numbers and "MAX" in opts:
                    line += b" MAX %d" % numbers[-1]
                if "COUNT" in opts:
                    line += b" COUNT %d" % len(numbers)
                if numbers and "ALL" in opts:
                    line += b" ALL " + uid_set(numbers).encode()
                if modseq:
                    line += b" MODSEQ %d" % modseq
                out.append(line + b"\r\n")
        return self._done("searched", untagged=out, expunge_ok=cmd.uid)

    def _header_or_none(self, uid: int) -> bytes | None:
        try:
            return self._read_message(uid, header_only=True)
        except OSError:
            return None

    def _loader(self, uid: int, header_only: bool) -> Callable[[], bytes]:
        def load() -> bytes:
            data = self._read_message(uid, header_only)
            if data is None:
                raise FileNotFoundError(uid)
            return data
        return load

    # -- FETCH -----------------------------------------------------------------------------

    def _cmd_fetch(self, cmd: Command) -> Outcome:
        v = self._need_view()
        seqset, atts, mods = cmd.args  # type: ignore[misc]
        changedsince: int | None = None
        vanished = False
        mods = list(mods)
        while mods:
            m = _atom(mods.pop(0)).upper()
            if m == "CHANGEDSINCE" and mods:
                changedsince = _number(mods.pop(0), "CHANGEDSINCE")
                self._enable_condstore()
            elif m == "VANISHED":
                vanished = True
            else:
                raise _Bad("unknown FETCH modifier")
        if vanished and (not cmd.uid or not self.qresync or changedsince is None):
            raise _Bad("VANISHED needs UID FETCH, QRESYNC and CHANGEDSINCE")
        items: list[FetchAtt] = []
        for att in atts:
            if att.name in _MACROS:
                items += [FetchAtt(n) for n in _MACROS[att.name]]
            elif att.name in ("EMAILID", "THREADID", "SAVEDATE", "X-GM-MSGID"):
                raise _Bad(f"{att.name} not supported")
            else:
                items.append(att)
        names = [a.name for a in items]
        if cmd.uid and "UID" not in names:
            items.insert(0, FetchAtt("UID"))
        if changedsince is not None and "MODSEQ" not in names:
            items.append(FetchAtt("MODSEQ"))
        if "MODSEQ" in names:
            self._enable_condstore()
        indexes = self._resolve(seqset, cmd.uid)
        out: list[bytes] = []
        if vanished:
            lo_hi = [(lo or 1, hi or 2**32) for lo, hi in seqset.ranges]
            gone = [u for u in v.box.expunged_since(changedsince or 0)
                    if seqset.saved or _in_ranges(u, [(min(a, b), max(a, b)) for a, b in lo_hi])]
            if gone:
                out.append(b"* VANISHED (EARLIER) %s\r\n" % uid_set(gone).encode())
        marks: set[int] = set()
        sets_seen = any(a.name in ("RFC822", "RFC822.TEXT", "BINARY") or
                        (a.name == "BODY" and a.section is not None) for a in items)
        if sets_seen and not v.readonly:
            unseen = [v.uids[i] for i in indexes if "\\Seen" not in v.info[v.uids[i]].flags]
            if unseen:
                with contextlib.suppress(MailboxBusy):
                    res = v.box.store(unseen, add=("\\Seen",))
                    self._own(v)
                    for u, (flags, modseq) in res.changed.items():
                        v.info[u] = dataclasses.replace(v.info[u], flags=flags, modseq=modseq)
                        marks.add(u)
                    if res.changed:
                        self._changed.append(v.box.path)
        outcome = Outcome("OK", "fetched")
        outcome.untagged = self._after(
            self._fetch_stream(out, indexes, items, changedsince, marks, outcome),
            expunge_ok=cmd.uid)
        return outcome

    def _fetch_stream(self, head: list[bytes], indexes: list[int], items: list[FetchAtt],
                      changedsince: int | None, marks: set[int],
                      outcome: Outcome) -> Iterator[bytes]:
        v = self.view
        assert v is not None
        yield from head
        need = 0
        for a in items:
            if a.name in _SIMPLE_ITEMS:
                continue
            header_only = a.name in _HEADER_ITEMS or (
                a.name in ("BODY", "BODY.PEEK") and a.section is not None
                and not a.section.part and a.section.text is not None
                and a.section.text.startswith("HEADER"))
            need = max(need, 1 if header_only else 2)
        tz = self.settings.tz
        # Items answered from the octets alone (ENVELOPE, BODYSTRUCTURE) are cached; with
        # none of them asked for (BODY[] alone, say) the cache is not looked at.
        slots = any(_cache_name(a) is not None for a in items)
        content_slots = [_cache_name(a) for a in items if a.name not in _SIMPLE_ITEMS]
        parse = im.parse_header if need == 1 else im.parse  # the header is all there is
        cached: dict[str, bytes] = {}
        key = ("", "")
        names = {a.name for a in items}
        whole = Section()
        box_dir = str(v.box.path)  # once, not per message
        # each item with the name it is dispatched on ("BODY[]": the whole message)
        named = [(a, "BODY[]" if a.name in ("BODY", "BODY.PEEK") and a.section == whole
                  else a.name) for a in items]
        for i in indexes:
            uid = v.uids[i]
            info = v.info.get(uid)
            if info is None:
                continue
            if changedsince is not None and info.modseq <= changedsince:
                continue
            wire = b""
            root: im.Part | None = None
            if slots:
                key = self._cache_key(info, box_dir)
                cached = _CACHE.get(key)
            if slots and all(slot in cached for slot in content_slots):
                pass  # every content item is known: the file need not be read
            elif need:
                try:
                    # The path as the view knows it first (one call: the common case);
                    # _read_message refreshes a path another session's rename made stale.
                    data = _read(info.path, False) if need == 2 else None
                except FileNotFoundError:
                    data = None
                except OSError:
                    continue
                if data is None:
                    try:
                        data = self._read_message(uid, header_only=need == 1)
                    except OSError:
                        data = None
                    if data is None:
                        continue  # expunged elsewhere: reported by a later sync
                    info = v.info.get(uid, info)  # its path refreshed
                wire = im.to_wire(data)
            parts: list[bytes] = []
            for a, name in named:
                if name == "UID":
                    parts.append(b"UID %d" % uid)
                elif name == "FLAGS":
                    parts.append(b"FLAGS " + _flag_list(
                        info.flags, not self.rev2 and uid in v.recent))
                elif name == "INTERNALDATE":
                    parts.append(b"INTERNALDATE " + _date_time(info.internal_date, tz))
                elif name == "RFC822.SIZE":
                    parts.append(b"RFC822.SIZE %d" % info.size)
                elif name == "MODSEQ":
                    parts.append(b"MODSEQ (%d)" % info.modseq)
                elif name == "BODY[]":
                    if a.partial is None and len(wire) > im.QUOTED_MAX:
                        parts.append(b"BODY[] {%d}\r\n%s" % (len(wire), wire))  # a literal
                        continue
                    octets = im.partial(wire, a.partial)
                    origin = b"<%d>" % a.partial[0] if a.partial else b""
                    parts.append(b"BODY[]" + origin + b" " + im.encode(octets))
                elif name == "RFC822":
                    parts.append(b"RFC822 " + im.encode(wire))
                else:
                    slot = _cache_name(a) if slots else None
                    if slot is not None and slot in cached:
                        parts.append(cached[slot])
                        continue
                    if name == "ENVELOPE" and root is None:  # the fields alone, one pass
                        parts.append(b"ENVELOPE " + im.envelope_of_header(wire))
                        if slot is not None:
                            _CACHE.add(key, slot, parts[-1])
                        continue
                    if root is None:
                        root = parse(wire)
                    try:
                        parts.append(im.fetch_item(a, wire, root))
                        if slot is not None:
                            _CACHE.add(key, slot, parts[-1])
                    except im.UnknownCTE:
                        outcome.status, outcome.code = "NO", "UNKNOWN-CTE"
                        outcome.text = "a part has a transfer encoding that cannot be undone"
                    except ValueError:
                        continue
            if uid in marks:
                if "FLAGS" not in names:
                    parts.append(b"FLAGS " + _flag_list(info.flags,
                                                        not self.rev2 and uid in v.recent))
                if self.condstore and "MODSEQ" not in names:
                    parts.append(b"MODSEQ (%d)" % info.modseq)
            if self.qresync and "UID" not in names:
                parts.insert(0, b"UID %d" % uid)
            yield b"* %d FETCH (" % (i + 1) + b" ".join(parts) + b")\r\n"

    # -- STORE -----------------------------------------------------------------------------

    def _cmd_store(self, cmd: Command) -> Outcome:
        v = self._need_view()
        seqset, mods, action, silent, flags = cmd.args  # type: ignore[misc]
        unchanged: int | None = None
        mods = list(mods)
        while mods:
            m = _atom(mods.pop(0)).upper()
            if m == "UNCHANGEDSINCE" and mods:
                unchanged = _number(mods.pop(0), "UNCHANGEDSINCE")
                self._enable_condstore()
            else:
                raise _Bad("unknown STORE modifier")
        if v.readonly:
            raise _No("mailbox is read-only", "READ-ONLY")
        flags = [f for f in flags if f.lower() != "\\recent"]
        try:
            split_flags(flags)
        except ValueError as exc:
            raise _Bad(str(exc)) from None
        indexes = self._resolve(seqset, cmd.uid)
        uids = [v.uids[i] for i in indexes if v.uids[i] in v.info]
        kw: dict[str, object] = {"unchanged_since": unchanged}
        if action == "FLAGS":
            kw["replace"] = flags
        elif action == "+FLAGS":
            kw["add"] = flags
        else:
            kw["remove"] = flags
        res = v.box.store(uids, **kw)  # type: ignore[arg-type]
        if res.changed:
            self._changed.append(v.box.path)
        self._own(v)
        for u, (fl, modseq) in res.changed.items():
            if silent:  # the client knows only what it asked for: the rest at the next sync
                fl = _silent_view(v.info[u].flags, fl, action, flags)
            v.info[u] = dataclasses.replace(v.info[u], flags=fl, modseq=modseq)
        out = self._note_keywords(fl for fl, _ in res.changed.values())
        modified, gone = set(res.modified), set(res.gone)
        if gone:  # expunged elsewhere: no FETCH of flags it does not have; the EXPUNGE
            self._dirty = True  # comes as soon as RFC 9051 §7.5.1 allows (UID STORE: now)
        for i in indexes:
            u = v.uids[i]
            info = v.info.get(u)
            if info is None or u in modified or u in gone:
                continue
            if silent:
                if self.condstore and u in res.changed:
                    parts = [b"UID %d" % u] if cmd.uid or self.qresync else []
                    parts.append(b"MODSEQ (%d)" % info.modseq)
                    out.append(b"* %d FETCH (%s)\r\n" % (i + 1, b" ".join(parts)))
                continue
            out.append(self._fetch_line(i + 1, info, cmd.uid))
        code = None
        if modified:
            nums = [u if cmd.uid else bisect.bisect_left(v.uids, u) + 1 for u in modified]
            code = "MODIFIED " + uid_set(nums)
        return self._done("stored", code, out, expunge_ok=cmd.uid)

    # -- COPY MOVE -------------------------------------------------------------------------

    def _target(self, name: str) -> Mailbox:
        try:
            return self.store.mailbox(self._name_in(name))
        except NoSuchMailbox:
            raise _No("no such mailbox", "TRYCREATE") from None

    def _cmd_copy(self, cmd: Command) -> Outcome:
        v = self._need_view()
        seqset, name = cmd.args  # type: ignore[misc]
        indexes = self._resolve(seqset, cmd.uid)
        target = self._target(name)
        uids = [v.uids[i] for i in indexes if v.uids[i] in v.info]
        self._check_quota(sum(v.info[u].size for u in uids), len(uids))
        if target.path == v.box.path:
            src, dst = [], []
            for u in uids:
                data = self._read_message(u, header_only=False)
                if data is None:
                    continue
                info = v.info[u]
                validity, new = target.append(data, info.flags, info.internal_date)
                src.append(u)
                dst.append(new)
        else:
            validity, src, dst = v.box.copy_to(uids, target)
        if not src:
            return self._done("nothing copied")
        self._changed.append(target.path)
        self._dirty = target.path == v.box.path
        return self._done("copied", f"COPYUID {validity} {uid_set(src)} {uid_set(dst)}")

    def _cmd_move(self, cmd: Command) -> Outcome:
        v = self._need_view()
        seqset, name = cmd.args  # type: ignore[misc]
        if v.readonly:
            raise _No("mailbox is read-only", "READ-ONLY")
        indexes = self._resolve(seqset, cmd.uid)
        target = self._target(name)
        if target.path == v.box.path:
            raise _No("cannot move into the same mailbox", "CANNOT")
        uids = [v.uids[i] for i in indexes if v.uids[i] in v.info]
        validity, src, dst = v.box.move_to(uids, target)
        out: list[bytes] = []
        if src:
            self._changed += [target.path, v.box.path]
            self._dirty = True
            out.append(b"* OK [COPYUID %d %s %s] moved\r\n" % (
                validity, uid_set(src).encode(), uid_set(dst).encode()))
        return self._done("moved", untagged=out)
