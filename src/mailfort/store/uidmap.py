"""The persistent IMAP state of one mailbox: UIDVALIDITY, UIDNEXT, UIDs, keywords, MODSEQ.

On disk (``mailfort-imap.uids`` in the mailbox's Maildir directory) it is an append-only
log of text records, one a line::

    <crc32 of payload, 8 hex> <payload>\\n

    H <uidvalidity> <uidnext> <highestmodseq>          first record (and after compaction)
    A <uid> <modseq> <letters> <size> <date> <name> <keywords>  a UID given to a file
    F <uid> <modseq> <letters>                          the file's Maildir flags changed
    K <uid> <modseq> <keywords>                         the message's keywords changed
    X <modseq> <uid set>                                messages expunged (``1:4,9``)

``name`` is the Maildir unique name (before ``:2,``), keywords are comma-separated; names,
letters and keywords are percent-encoded (any bytes a file name may hold), ``-`` stands for
an empty field. Why a log and not a rewritten file: a
STORE on one message of 10,000 then costs one short append and one fsync, not a rewrite of
the whole map. Compaction (rewrite to a temporary file, fsync, rename, fsync the directory)
runs when the log is several times larger than the live state.

Crash safety (a SIGKILL or power loss at any instant never reuses or renumbers a UID):

* A UID is returned to a caller only after the record naming it is fsynced, so a record
  lost in a crash names UIDs no one has seen; the next writer re-issues them to the files,
  which is not a renumbering (no client ever saw the first numbering).
* Replay stops at the first record whose checksum or syntax fails. Only the tail can be
  torn (appends are the only writes); the writer truncates it away before appending.
  A bad record *followed by* good ones is not a torn tail but damage to acknowledged state:
  the map is treated as lost (``MapLost``) rather than replayed with a hole in it.
* A lost map (missing, damaged, or a header that does not check out) is recreated with a
  new UIDVALIDITY, never with the old one: ``next_uidvalidity`` keeps the last value given
  per user at the Maildir root and always goes up, so a client's cached UIDs are dropped,
  never silently attached to other messages. Likewise after DELETE and CREATE of a name.
* UIDNEXT only grows: it is the maximum of the header's value and every assigned UID + 1,
  and compaction writes it into the new header.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

from mailfort.store.durable import fsync_dir

LOG_NAME = "mailfort-imap.uids"
VALIDITY_NAME = "mailfort-imap.validity"
VALIDITY_LOCK = "mailfort-imap.validity.lock"
COMPACT_MIN = 4096  # records appended before compaction is considered
MAX_EXPUNGE_GROUPS = 1000  # X records kept by compaction; older ones merge upwards
_SAFE = "!#$&'()*+-.;<=>?@[]^_`{|}~"  # kept as is in names (no space, comma, %, /)


class MapLost(Exception):
    """The log is damaged before its tail: its state cannot be trusted."""


@dataclass(slots=True)
class Entry:
    uid: int
    unique: str
    letters: str  # the Maildir info letters after ``:2,`` as last seen, sorted
    keywords: tuple[str, ...]
    modseq: int
    size: int  # wire octets (CRLF), RFC822.SIZE
    date: int  # INTERNALDATE, seconds since the epoch


@dataclass(slots=True)
class MapState:
    uidvalidity: int = 0
    uidnext: int = 1
    highestmodseq: int = 1
    entries: dict[int, Entry] = field(default_factory=dict)
    by_unique: dict[str, int] = field(default_factory=dict)
    expunged: dict[int, int] = field(default_factory=dict)  # uid -> modseq (QRESYNC)


# What ``quote`` leaves as it is: names made only of these (every name MX, APPEND and COPY
# make) skip it, which matters when a SELECT numbers 10,000 new files or replays their log.
_AS_IS = re.compile(r"[A-Za-z0-9_.~" + re.escape(_SAFE) + r"]+")


def _enc_name(name: str) -> str:
    """Percent-encoded (no space, comma or non-ASCII left); ``-`` only for the empty one."""
    if not name:
        return "-"
    if name != "-" and _AS_IS.fullmatch(name.replace(",", "")):
        return name.replace(",", "%2C")  # what quote makes of it (",S=...,W=..." names)
    text = quote(name.encode("utf-8", "surrogateescape"), safe=_SAFE)
    return "%2D" if text == "-" else text or "-"


def _dec_name(text: str) -> str:
    if text == "-":
        return ""
    if "%" not in text:
        return text  # ASCII (records are), nothing escaped
    return unquote_to_bytes(text).decode("utf-8", "surrogateescape")


def _enc_kw(keywords: tuple[str, ...]) -> str:
    return ",".join(_enc_name(k) for k in keywords) or "-"


def _dec_kw(text: str) -> tuple[str, ...]:
    return () if text == "-" else tuple(_dec_name(k) for k in text.split(","))


def uid_set(uids: list[int]) -> str:
    """Sorted UIDs as ``a:b,c``."""
    parts: list[str] = []
    s = sorted(uids)
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[j] + 1:
            j += 1
        parts.append(str(s[i]) if i == j else f"{s[i]}:{s[j]}")
        i = j + 1
    return ",".join(parts)


def _parse_set(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition(":")
        lo, hi = int(a), int(b or a)
        if not 0 < lo <= hi or hi - lo > 1 << 32:
            raise ValueError(part)
        out.extend(range(lo, hi + 1))
    return out


def record(*fields: object) -> bytes:
    payload = " ".join(str(f) for f in fields).encode("ascii")
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def rec_header(st: MapState) -> bytes:
    return record("H", st.uidvalidity, st.uidnext, st.highestmodseq)


def rec_assign(e: Entry) -> bytes:
    # ``record`` spelled out: one of these per new file at a SELECT, thousands at a time
    payload = (f"A {e.uid} {e.modseq} {_enc_name(e.letters)} {e.size} {e.date} "
               f"{_enc_name(e.unique)} {_enc_kw(e.keywords)}").encode("ascii")
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def rec_flags(uid: int, modseq: int, letters: str) -> bytes:
    return record("F", uid, modseq, _enc_name(letters))


def rec_keywords(uid: int, modseq: int, keywords: tuple[str, ...]) -> bytes:
    return record("K", uid, modseq, _enc_kw(keywords))


def rec_expunge(modseq: int, uids: list[int]) -> bytes:
    return record("X", modseq, uid_set(uids))


def _parse_line(line: bytes) -> list[str] | None:
    """The fields of one record, or None if it does not check out."""
    if len(line) < 11 or line[8:9] != b" ":
        return None
    payload = line[9:]
    try:
        if int(line[:8], 16) != zlib.crc32(payload):
            return None
        return payload.decode("ascii").split(" ")
    except ValueError:
        return None


def _add(st: MapState, e: Entry) -> bool:
    """An ``A`` record's entry into the state; False if its UID or name is taken."""
    if e.uid < 1 or e.unique in st.by_unique or e.uid in st.entries:
        return False
    st.entries[e.uid] = e
    st.by_unique[e.unique] = e.uid
    st.uidnext = max(st.uidnext, e.uid + 1)
    st.highestmodseq = max(st.highestmodseq, e.modseq)
    return True


def apply(st: MapState, f: list[str]) -> bool:
    """Apply one checked record; False if it is malformed."""
    try:
        kind = f[0]
        if kind == "H" and len(f) == 4:
            st.uidvalidity = int(f[1])
            st.uidnext = max(st.uidnext, int(f[2]))
            st.highestmodseq = max(st.highestmodseq, int(f[3]))
        elif kind == "A" and len(f) == 8:
            return _add(st, Entry(int(f[1]), _dec_name(f[6]), _dec_name(f[3]), _dec_kw(f[7]),
                                  int(f[2]), int(f[4]), int(f[5])))
        elif kind in ("F", "K") and len(f) == 4:
            e2 = st.entries.get(int(f[1]))
            modseq = int(f[2])
            st.highestmodseq = max(st.highestmodseq, modseq)
            if e2 is not None:
                if kind == "F":
                    e2.letters = _dec_name(f[3])
                else:
                    e2.keywords = _dec_kw(f[3])
                e2.modseq = max(e2.modseq, modseq)
        elif kind == "X" and len(f) == 3:
            modseq = int(f[1])
            st.highestmodseq = max(st.highestmodseq, modseq)
            for uid in _parse_set(f[2]):
                gone = st.entries.pop(uid, None)
                if gone is not None:
                    del st.by_unique[gone.unique]
                st.expunged[uid] = modseq
                st.uidnext = max(st.uidnext, uid + 1)
        else:
            return False
    except (ValueError, IndexError):
        return False
    return True


class UidLog:
    """The log file of one mailbox, read and written only under the mailbox lock."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOG_NAME
        self.state = MapState()
        self._ino: int | None = None  # the log file we replayed
        self._head = b""  # its first record (a file at a reused inode number lacks it)
        self._good = 0  # bytes of it that checked out
        self._records = 0
        self.generation = 0  # raised whenever ``state`` is started over (a cache key)
        self._pending = False  # created in memory, not yet on disk (``create(defer=True)``)

    def refresh(self, fresh_validity: int | None = None) -> bool:
        """Bring ``state`` up to the file (others may have appended or compacted).

        Returns False when there is no usable map: the caller then calls ``create``.
        ``MapLost`` if the file is damaged before its tail.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_ino != self._ino or st.st_size < self._good or (
                    self._good and os.pread(fd, len(self._head), 0) != self._head):
                self.state, self._ino, self._good, self._records = MapState(), st.st_ino, 0, 0
                self.generation += 1
            f.seek(self._good)
            data = f.read()
        pos = 0
        while True:
            nl = data.find(b"\n", pos)
            if nl < 0:
                break  # a torn tail (or nothing more): ignored, truncated by the next append
            fields = _parse_line(data[pos:nl])
            first = self._good == 0 and pos == 0
            if fields is None or (first and fields[0] != "H") or not apply(self.state, fields):
                if data.find(b"\n", nl + 1) >= 0 or self._good + pos == 0:
                    raise MapLost(str(self.path))  # good records after a bad one
                break  # only the last line is bad: a torn tail
            if first:
                self._head = data[:nl + 1]
            pos = nl + 1
            self._records += 1
        self._good += pos
        return self._good > 0

    def reset(self) -> None:
        """Forget what was replayed (after a failed write): the next refresh reads it all."""
        self.state, self._ino, self._good, self._records = MapState(), None, 0, 0
        self._pending = False
        self.generation += 1

    def create(self, uidvalidity: int, uidnext: int = 1, highestmodseq: int = 1, *,
               defer: bool = False) -> None:
        """A new map with a fresh UIDVALIDITY (temp + fsync + rename + fsync dir).

        ``defer``: made in memory only; the file is written whole by the first ``append``
        (its header and those records in one temporary file: one file fsync and one
        directory fsync, where create-then-append took three), or by ``settle``. The caller
        holds the mailbox lock until one of them has run. Crash safety is the same as for
        create-then-append: the map's name appears only by the rename of a complete,
        fsynced file, and ``append`` returns (so a UID is given out) only after the
        directory fsync made the name durable. A crash before that leaves no map (at most
        a temporary file, removed by the next rewrite) and no UID anyone has seen; the next
        operation makes a map with a newer UIDVALIDITY, as for a map lost any other way."""
        self.state = MapState(uidvalidity, uidnext, highestmodseq)
        self.generation += 1
        self._pending = defer
        if not defer:
            self._rewrite([])

    def settle(self) -> None:
        """Write a map ``create(defer=True)`` made that nothing has appended to."""
        if self._pending:
            self._rewrite([])

    def append(self, records: list[bytes], assigned: Sequence[Entry] = ()) -> None:
        """Append records durably (fsync) after cutting any torn tail. ``assigned``: the
        entries of the ``A`` records among them, put into the state as they are rather
        than parsed back from their records (a SELECT that numbers 10,000 new files)."""
        if not records:
            return
        st = self.state
        live = len(st.entries) + min(len(st.expunged), MAX_EXPUNGE_GROUPS)
        if self._pending:  # a deferred create: header and records, one new file
            head = rec_header(st)
            data = b"".join([head, *records])
            self._replace(data)
            self._pending = False
            self._good, self._records, self._head = len(data), 1 + len(records), head
        elif self._records > COMPACT_MIN + 2 * live:  # a rewrite per >= COMPACT_MIN + live
            self._rewrite(records)
            return
        else:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                if os.fstat(fd).st_size != self._good:
                    os.ftruncate(fd, self._good)
                os.lseek(fd, self._good, os.SEEK_SET)
                data = b"".join(records)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            self._good += len(data)
            self._records += len(records)
        # State follows the records, the single source of truth (applied outside any
        # assert: ``python -O`` drops asserts, and the state with them).
        direct = len(assigned) == sum(1 for r in records if r[9:10] == b"A")
        for r in records:
            if direct and r[9:10] == b"A":
                continue
            fields = _parse_line(r[:-1])
            applied = fields is not None and apply(st, fields)
            assert applied, r
        if direct:
            for e in assigned:  # fresh Entry objects of the caller's, in no other state
                added = _add(st, e)
                assert added, e

    def _rewrite(self, extra: list[bytes]) -> None:
        st = self.state
        for r in extra:
            fields = _parse_line(r[:-1])
            applied = fields is not None and apply(st, fields)
            assert applied, r
        lines = [rec_header(st)]
        lines += [rec_assign(e) for e in sorted(st.entries.values(), key=lambda e: e.uid)]
        by_modseq: dict[int, list[int]] = {}
        for uid, modseq in st.expunged.items():
            by_modseq.setdefault(modseq, []).append(uid)
        groups = sorted(by_modseq.items())
        if len(groups) > MAX_EXPUNGE_GROUPS:
            # Older expunges merge into one record at the newest merged MODSEQ: a QRESYNC
            # client may then hear of a UID as VANISHED twice, which RFC 7162 allows; it
            # never misses one. The UIDs stay remembered, so UIDNEXT cannot fall back.
            cut = len(groups) - MAX_EXPUNGE_GROUPS + 1
            merged = [u for _, us in groups[:cut] for u in us]
            groups = [(groups[cut - 1][0], merged), *groups[cut:]]
            for u in merged:
                st.expunged[u] = groups[0][0]
        lines += [rec_expunge(m, u) for m, u in groups]
        data = b"".join(lines)
        self._replace(data)
        self._pending = False
        self._good, self._records, self._head = len(data), len(lines), lines[0]

    def _replace(self, data: bytes) -> None:
        """The log file replaced by ``data``, durably: temp + fsync + rename + fsync dir."""
        for stale in self.path.parent.glob(f"{LOG_NAME}.*.tmp"):  # a compaction killed
            stale.unlink(missing_ok=True)  # midway (none runs now: we hold the lock)
        tmp = self.path.with_name(f"{LOG_NAME}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            self._ino = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        os.rename(tmp, self.path)
        fsync_dir(self.path.parent)


def next_uidvalidity(root: Path) -> int:
    """A UIDVALIDITY never given before under this Maildir root: max(now, last + 1).

    The last value lives in ``VALIDITY_NAME`` at the root (temp + fsync + rename), under a
    lock of its own; were it lost too, the clock still makes the next value new unless it
    went back in time.
    """
    lock = os.open(root / VALIDITY_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = root / VALIDITY_NAME
        try:
            last = int(path.read_text("ascii").strip() or 0)
        except (FileNotFoundError, ValueError):
            last = 0
        value = max(int(time.time()), last + 1)
        if value > 0xFFFFFFFF:
            raise OSError(errno.EOVERFLOW, "UIDVALIDITY space exhausted", str(path))
        tmp = root / f"{VALIDITY_NAME}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"%d\n" % value)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        fsync_dir(root)
        return value
    finally:
        os.close(lock)
