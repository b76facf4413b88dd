"""The IMAP view of a Maildir: mailboxes, UIDs, flags, MODSEQ, on the files MX and POP3 use.

Layout (Maildir++, one layout for everything): INBOX is the Maildir root; a mailbox
``A.B`` is the directory ``.A.B`` beside ``new/ cur/ tmp/`` (``.`` is the hierarchy
separator, so a name part cannot contain one). Names are Unicode in this API (IMAP4rev2 is
UTF-8; an IMAP4rev1 session converts at its edge) and modified UTF-7 on disk, as Courier and
Dovecot write them (``.Entw&APw-rfe``). ``INBOX`` is case-insensitive and has no children
here (``INBOX.x`` is refused): the namespace is flat under the root, as Dovecot's Maildir++.

What is true where:

* **The file name** holds the system flags (``:2,`` letters: \\Seen S, \\Answered R,
  \\Flagged F, \\Deleted T, \\Draft D; P is shown as the keyword ``$Forwarded``), so every
  Maildir tool, and POP3, agrees on them. Letters we do not know are kept as they are.
* **The UID map** (store/uidmap.py) holds UIDs, keywords, MODSEQ, size and INTERNALDATE,
  keyed by the Maildir unique name (before ``:2,``), which never changes with the flags.
* A ``scan`` reconciles the two: a file not in the map gets the next UID (ordered by
  delivery time, then name), a mapped file that is gone is an expunge (POP3 DELE, another
  tool), a file whose letters changed under us (POP3's S, another tool) gets a new MODSEQ.
  So every change made outside this module is seen, and a crash between a rename and its
  record is repaired the same way.
* **A message stays in new/** until its flags first change, when the rename that records
  them moves it to ``cur/`` with ``:2,<letters>``. Nothing in IMAP depends on new/ against
  cur/ (IMAP4rev2 has no \\Recent; a session's RECENT is what its scan numbered), so a scan
  moves nothing: a message read once costs one rename (new/ -> cur/ with S) where moving it
  at SELECT then marking it cost two, and a cold SELECT of 2,000 new messages is not 2,000
  renames (what Dovecot does, most of its time). A Maildir reader outside IMAP sees such a
  message as not yet seen by a mail client; POP3 moves what its session saw at its end.

Every change happens under the mailbox's lock (``flock`` on ``mailfort-imap.lock`` in its
directory, one descriptor per operation, so threads and processes exclude each other): the
map is refreshed from the log, the files changed, then the records appended and fsynced.
Two sessions can thus neither hand out one UID twice nor lose each other's flag change.

Renaming or unlinking files while a POP3 session holds the Maildir would stale its
snapshot (its DELE would miss a renamed file), so renames and unlinks in INBOX are done
only while holding POP3's lock too, taken without waiting: a flag change or expunge then
raises ``MailboxBusy`` (the engine answers ``NO [INUSE]``); a scan numbers files all the
same (it renames none).

A scan does not list a directory it need not (a warm SELECT of 10,000 messages would
otherwise spend most of its time in ``getdents``): listings of ``new/`` and ``cur/`` are
kept per mailbox and reused while the directory cannot have changed, under the rule (and
its reasons) in store/listing.py: unchanged (device, inode, mtime, ctime), and the listing
made more than a second after the directory's last change, which coarse timestamps need.

And when the files listed are those the last scan left (after its own moves) and the map
is where that scan left it, nothing can have changed: the scan answers at once.

Every method blocks (disk); the server calls them in a thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import itertools
import os
import re
import secrets
import shutil
import stat
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mailfort.protocol.dotstuff import SizeCounter
from mailfort.store import mutf7
from mailfort.store.durable import fsync_dir, make_dirs, rename_no_replace
from mailfort.store.listing import Listing, list_dir
from mailfort.store.maildir import unique_name
from mailfort.store.pop3_mailbox import LOCK_NAME as POP3_LOCK
from mailfort.store.pop3_mailbox import _delivery_time
from mailfort.store.uidmap import (
    Entry,
    MapLost,
    UidLog,
    _enc_name,
    next_uidvalidity,
    rec_assign,
    rec_expunge,
    rec_flags,
    rec_keywords,
)

LOCK_NAME = "mailfort-imap.lock"
INBOX = "INBOX"
SEP = "."
SPECIAL_USE = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Junk": "\\Junk", "Trash": "\\Trash",
               "Archive": "\\Archive"}
SYSTEM_FLAGS = {"\\seen": ("\\Seen", "S"), "\\answered": ("\\Answered", "R"),
                "\\flagged": ("\\Flagged", "F"), "\\deleted": ("\\Deleted", "T"),
                "\\draft": ("\\Draft", "D"), "$forwarded": ("$Forwarded", "P")}
_LETTER_FLAG = {letter: flag for flag, letter in SYSTEM_FLAGS.values()}
MAX_KEYWORDS = 64  # per message
MAX_NAME = 255  # octets of a mailbox name on disk
_ATOM = re.compile(r"[!#$&'+\-.0-9:;<=>?@A-Z^_`a-z|~]{1,100}")  # a keyword (IMAP atom)
_CHUNK = 64 * 1024


class MailboxError(Exception):
    """A mailbox operation that cannot be done as asked (the engine answers NO)."""


class NoSuchMailbox(MailboxError):
    pass


class MailboxExists(MailboxError):
    pass


class BadName(MailboxError):
    pass


class MailboxBusy(MailboxError):
    """A POP3 session holds the Maildir: files cannot be renamed now ([INUSE])."""


@dataclass(frozen=True, slots=True)
class MessageInfo:
    uid: int
    flags: frozenset[str]  # system flags and keywords, as IMAP spells them
    size: int  # RFC822.SIZE: wire octets (CRLF)
    internal_date: int  # seconds since the epoch
    modseq: int
    path: str  # where the file was at the last scan


@dataclass(frozen=True, slots=True)
class ScanResult:
    added: list[int]
    expunged: list[int]
    changed: list[int]  # flags changed outside this module
    highestmodseq: int = 0  # of the map after the scan: every change raises it
    uidvalidity: int = 0  # of the map: a new map (lost, recreated) starts its MODSEQs over
    generation: int = 0  # of this process's copy of the map: raised when it starts over
    uidnext: int = 0  # of the map after the scan


@dataclass(frozen=True, slots=True)
class StoreResult:
    changed: dict[int, tuple[frozenset[str], int]]  # uid -> (flags, modseq)
    modified: list[int]  # UNCHANGEDSINCE failed (CONDSTORE [MODIFIED])
    gone: tuple[int, ...] = ()  # expunged meanwhile (another session, POP3): not stored


def letters_to_flags(letters: str, keywords: Iterable[str] = ()) -> frozenset[str]:
    return frozenset([_LETTER_FLAG[c] for c in letters if c in _LETTER_FLAG] + list(keywords))


def split_flags(flags: Iterable[str]) -> tuple[str, tuple[str, ...]]:
    """IMAP flags as Maildir letters (sorted) and keywords; BadName-like ValueError for a
    flag that is neither a system flag nor an atom."""
    letters: set[str] = set()
    keywords: dict[str, str] = {}
    for flag in flags:
        known = SYSTEM_FLAGS.get(flag.lower())
        if known is not None:
            letters.add(known[1])
        elif flag.startswith("\\") or not _ATOM.fullmatch(flag):
            raise ValueError(f"not a storable flag: {flag!r}")
        else:
            keywords.setdefault(flag.lower(), flag)
    if len(keywords) > MAX_KEYWORDS:
        raise ValueError("too many keywords")
    return "".join(sorted(letters)), tuple(sorted(keywords.values(), key=str.lower))


def wire_size(data: bytes) -> int:
    """The POP3 wire size: a missing final line end adds two octets, a bare CR becomes
    CRLF, as POP3 sends the message (POP3 takes a name's ``W=`` for it: see ``append``)."""
    counter = SizeCounter()
    counter.feed(data)
    return counter.size()


def imap_size(data: bytes) -> int:
    """RFC822.SIZE: the octets of ``imap_message.to_wire(data)``, what BODY[] sends (bare LF
    as CRLF, nothing added at the end, as Dovecot counts): a name's ``W=``."""
    lf = data.count(b"\n")
    return len(data) + lf - data.count(b"\r\n") if lf else len(data)


def _file_facts(path: str) -> tuple[int, int]:
    """(``imap_size``, mtime in seconds) of a file, read in chunks; the mtime from the open
    descriptor (no second lookup of the path)."""
    total = lf = crlf = 0
    last = b""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)  # no file object: many
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(path)  # a directory or device in cur/: not a message
        mtime = int(st.st_mtime)
        # A file in new/ or cur/ is never written again: once st_size octets are read
        # there is no need to read on to the end (one read of a small message, not two).
        if st.st_size <= _CHUNK:  # most messages: one read, counted whole (no chunk seams)
            data = os.read(fd, st.st_size)
            lf = data.count(b"\n")
            crlf = data.count(b"\r\n") if lf and b"\r" in data else 0
            return (len(data) + lf - crlf), mtime
        while total < st.st_size and (chunk := os.read(fd, min(_CHUNK, st.st_size - total))):
            total += len(chunk)
            lf += chunk.count(b"\n")
            crlf += chunk.count(b"\r\n") + (last == b"\r" and chunk[:1] == b"\n")
            last = chunk[-1:]
    finally:
        os.close(fd)
    return (total + lf - crlf if lf else total), mtime


_SIZES = re.compile(r",([SW])=(\d{1,15})")


def name_size(unique: str) -> int | None:
    """The ``,W=`` of a unique name: RFC822.SIZE, the octets with every bare LF counted as
    CRLF (Dovecot's "virtual size", which Dovecot writes and trusts); None without one.

    Trusted as Dovecot trusts it, so a SELECT of thousands of new files reads none of them:
    a wrong value misstates only the size shown to the mailbox's own user (BODY[] sends the
    octets with their true length), and every writer of this store writes it right
    (``maildir._target``, ``Mailbox.append``: only where it is POP3's size as well)."""
    at = unique.rfind(",W=")
    if at < 0:
        return None
    end = unique.find(",", at + 3)
    digits = unique[at + 3:] if end < 0 else unique[at + 3:end]
    return int(digits) if 0 < len(digits) <= 15 and digits.isascii() and digits.isdigit() \
        else None


def _info(name: str) -> tuple[str, str | None]:
    """(unique name, sorted ``:2,`` letters) of a file name; letters None for an info
    that is not ``2,`` (left alone: never renamed by us)."""
    unique, sep, info = name.partition(":")
    if not sep:
        return unique, ""
    if not info.startswith("2,"):
        return unique, None
    return unique, "".join(sorted(set(info[2:])))


@contextlib.contextmanager
def _flock(path: Path, *, wait: bool = True) -> Iterator[bool]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # drops the lock


class Mailbox:
    """One mailbox (a Maildir directory) as IMAP sees it. Cheap to keep; holds no lock."""

    def __init__(self, path: Path, name: str, root: Path) -> None:
        self.path = path
        self.name = name
        self._root = root
        self._log = UidLog(path)
        self._paths: dict[int, str] = {}  # uid -> file path at the last look
        self._letters: dict[str, str | None] = {}  # file name -> _info letters, last scan
        self._dirs: dict[str, Listing] = {}  # "new", "cur" -> the last listing
        self._files: dict[str, tuple[str, str]] = {}  # _list_files of those two listings
        # (map key, files) when the last scan left the map and the files agreeing
        self._settled: tuple[tuple[int, ...], dict[str, tuple[str, str]]] | None = None
        self._guard = threading.Lock()  # one operation of this object at a time
        # (time.monotonic() before the last scan began, its result without what it added)
        self._fresh: tuple[float, ScanResult] | None = None
        self.scans = 0  # scans that took the locks and listed (tests, bench)

    # -- locking and the map -------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._guard, self._map_locked():
            yield

    @contextlib.contextmanager
    def _map_locked(self) -> Iterator[None]:
        """The map's file lock and the map read forward (``_guard`` held by the caller)."""
        with _flock(self.path / LOCK_NAME):
            try:
                self._load()
                yield
                self._log.settle()  # a map made by _load that nothing was appended to
            except BaseException:
                self._log.reset()  # memory may be ahead of the file: replay it all next time
                raise

    def _load(self) -> None:
        try:
            if self._log.refresh():
                return
        except MapLost:  # kept aside for a post-mortem, never read again
            with contextlib.suppress(OSError):
                os.rename(self._log.path, f"{self._log.path}.damaged-{int(time.time())}")
        # No usable map: start over with a new UIDVALIDITY (never the old one). Files keep
        # their names; the scan that follows gives them new UIDs under the new validity.
        # Written with the first records (a cold SELECT's UIDs) or at the end of the
        # operation (``_locked``), under this lock: one fsync and a directory's fewer.
        self._log.reset()
        self._log.create(next_uidvalidity(self._root), defer=True)
        self._paths.clear()

    @contextlib.contextmanager
    def _renaming(self) -> Iterator[bool]:
        """POP3's lock (INBOX only, other folders are not POP3's), without waiting."""
        if self.name != INBOX:
            yield True
            return
        with _flock(self.path / POP3_LOCK, wait=False) as got:
            yield got

    @property
    def uidvalidity(self) -> int:
        with self._locked():
            return self._log.state.uidvalidity

    def status(self) -> dict[str, int]:
        """UIDVALIDITY, UIDNEXT, MESSAGES, HIGHESTMODSEQ, SIZE as of the map (no scan)."""
        with self._locked():
            st = self._log.state
            return {"UIDVALIDITY": st.uidvalidity, "UIDNEXT": st.uidnext,
                    "MESSAGES": len(st.entries), "HIGHESTMODSEQ": st.highestmodseq,
                    "SIZE": sum(e.size for e in st.entries.values()),
                    "UNSEEN": sum(1 for e in st.entries.values() if "S" not in e.letters)}

    # -- scan ----------------------------------------------------------------------------

    def _listing(self, sub: str) -> tuple[frozenset[str], bool]:
        """The names in ``sub`` (dot files too), and True when they are the last listing's
        (reused under store/listing.py's rule, or listed again and found equal)."""
        listing, same = list_dir(f"{self.path}/{sub}", self._dirs.get(sub))
        self._dirs[sub] = listing
        return listing.names, same

    def _list_files(self) -> dict[str, tuple[str, str]]:
        """unique -> (sub, file name) in new/ and cur/ (cur/ wins a duplicate). Entries
        are not told apart by type here: a name not in the map is checked when it is
        numbered (``_scan_quiet``, ``lstat``), the others were regular files then. Not to
        be changed: the dict is kept for the next call."""
        new, same_new = self._listing("new")
        cur, same_cur = self._listing("cur")
        if same_new and same_cur and self._files:
            return self._files
        found: dict[str, tuple[str, str]] = {}
        for sub, names in (("new", new), ("cur", cur)):
            for name in names:
                if name[0] != ".":
                    found[name.partition(":")[0]] = (sub, name)
        self._files = found
        return found

    def _map_key(self) -> tuple[int, ...]:
        """Changes whenever the map does (every record raises HIGHESTMODSEQ)."""
        st = self._log.state
        return (self._log.generation, st.uidvalidity, st.highestmodseq, st.uidnext,
                len(st.entries))

    def scan(self, since: float | None = None) -> ScanResult:
        """Reconcile the map with the files (see the module docstring); renames nothing.

        ``since``: a ``time.monotonic()`` after the changes the caller must see (when its
        IDLE was woken). A scan of this object that began at or after it saw them all, so
        its result is answered again without a look at the disk: the sessions of a worker
        woken by one delivery make one scan between them, not one each. What that scan
        added is not repeated (\\Recent goes to one session, RFC 3501 §2.3.2)."""
        with self._guard:
            fresh = self._fresh
            if since is not None and fresh is not None and fresh[0] >= since:
                return fresh[1]
            began = time.monotonic()  # before the lock and the listings: errs towards looking
            self._fresh = None
            with self._map_locked():
                self.scans += 1
                result = self._scan()
            self._fresh = (began, dataclasses.replace(result, added=[], expunged=[],
                                                      changed=[]))
            return result

    def _scan(self, skip: frozenset[str] = frozenset()) -> ScanResult:
        with self._renaming() as quiet:
            return self._scan_quiet(skip, quiet)

    def _scan_quiet(self, skip: frozenset[str], quiet: bool) -> ScanResult:
        """The scan proper. ``quiet``: no POP3 session is running, whose renames in cur/
        could hide a file from one listing (readdir may miss a file renamed meanwhile)."""
        st = self._log.state
        files = self._list_files()
        settled = self._settled
        if settled is not None and (settled[1] is files or settled[1] == files) \
                and settled[0] == self._map_key():
            return ScanResult([], [], [], st.highestmodseq, st.uidvalidity,
                              self._log.generation, st.uidnext)
        self._settled = None
        records: list[bytes] = []
        modseq = st.highestmodseq + 1
        gone: list[int] = []
        if quiet:  # else left for a scan after the POP3 session, which deletes only at QUIT
            gone = [uid for unique, uid in st.by_unique.items() if unique not in files]
        doubted = False
        if gone:  # confirmed by a second listing: a tool renaming without a lock is missed
            again = self._list_files()  # by one listing at most, not by two
            sure = [uid for uid in gone if st.entries[uid].unique not in again]
            doubted, gone = len(sure) < len(gone), sure
        changed: list[int] = []
        fresh: list[tuple[tuple[int, int], str, str, str]] = []
        prefix = {"new": f"{self.path}/new/", "cur": f"{self.path}/cur/"}
        paths, by_unique, entries = self._paths, st.by_unique, st.entries
        # The letters of each name, from the last scan where the name was seen: a mailbox
        # of 10,000 messages is listed at every SELECT, and names rarely change between.
        known, self._letters = self._letters, {}
        for unique, (sub, name) in files.items():
            uid = by_unique.get(unique)
            if uid is None:
                if unique in skip:
                    continue  # being placed by append or copy, which numbers it
                fresh.append((_delivery_time(unique), unique, sub, name))
                continue
            paths[uid] = prefix[sub] + name
            letters = known[name] if name in known else _info(name)[1]
            self._letters[name] = letters
            if letters is not None and letters != entries[uid].letters:
                records.append(rec_flags(uid, modseq, letters))
                changed.append(uid)
        if gone:
            records.append(rec_expunge(modseq, gone))
            for uid in gone:
                self._paths.pop(uid, None)
        fresh.sort()
        added: list[int] = []
        assigned: list[Entry] = []
        uid = st.uidnext
        loose = bool(skip) or not quiet or doubted  # no settled state then
        crc32, lstat, is_reg = zlib.crc32, os.lstat, stat.S_ISREG
        for _, unique, sub, name in fresh:
            path = prefix[sub] + name
            try:
                size = name_size(unique)
                if size is None:
                    size, date = _file_facts(path)
                else:  # the listing does not say what an entry is: files only
                    st_file = lstat(path)
                    if not is_reg(st_file.st_mode):
                        raise IsADirectoryError(path)
                    date = int(st_file.st_mtime)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                loose = True
                continue  # gone meanwhile (POP3), or not a file: never numbered
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                loose = True
                continue  # a symbolic link: not a message
            found = _info(name)[1] if ":" in name else ""
            letters = found or ""
            assigned.append(Entry(uid, unique, letters, (), modseq, size, date))
            # uidmap.rec_assign(entry) spelled out (no keywords yet): thousands at a time
            payload = (f"A {uid} {modseq} {_enc_name(letters)} {size} {date} "
                       f"{_enc_name(unique)} -").encode("ascii")
            records.append(b"%08x %s\n" % (crc32(payload), payload))
            paths[uid] = path
            added.append(uid)
            uid += 1
        self._log.append(records, assigned)  # durable before anyone is told of these UIDs
        if not loose:
            self._settled = (self._map_key(), files)
        return ScanResult(added, sorted(gone), sorted(changed), st.highestmodseq,
                          st.uidvalidity, self._log.generation, st.uidnext)

    def messages(self) -> list[MessageInfo]:
        """Every message in the map, by UID (call ``scan`` first to see new files)."""
        with self._locked():
            st = self._log.state
            if any(uid not in self._paths for uid in st.entries):  # another session's
                for unique, (sub, name) in self._list_files().items():
                    uid = st.by_unique.get(unique)
                    if uid is not None:
                        self._paths[uid] = f"{self.path}/{sub}/{name}"
            flags: dict[tuple[str, tuple[str, ...]], frozenset[str]] = {}  # a few sets
            out: list[MessageInfo] = []
            path_of = self._paths.get
            entries = st.entries
            uids = list(entries)
            if any(a > b for a, b in itertools.pairwise(uids)):  # UID order as a rule
                uids.sort()
            for uid in uids:
                e = entries[uid]
                key = (e.letters, e.keywords)
                f = flags.get(key)
                if f is None:
                    f = flags[key] = letters_to_flags(e.letters, e.keywords)
                out.append(MessageInfo(uid, f, e.size, e.date, e.modseq, path_of(uid, "")))
            return out

    def expunged_since(self, modseq: int) -> list[int]:
        """UIDs expunged after ``modseq`` that the map still remembers (QRESYNC VANISHED)."""
        with self._locked():
            return sorted(u for u, m in self._log.state.expunged.items() if m > modseq)

    # -- flags ---------------------------------------------------------------------------

    def _find(self, uid: int) -> str | None:
        """The file of a UID now (another session may have renamed it): on a miss, one
        listing refreshes every path, so a STORE over many stale paths lists once."""
        e = self._log.state.entries.get(uid)
        if e is None:
            return None
        path = self._paths.get(uid)
        if path is not None and os.path.lexists(path):
            return path
        by_unique = self._log.state.by_unique
        for unique, (sub, name) in self._list_files().items():
            known = by_unique.get(unique)
            if known is not None:
                self._paths[known] = f"{self.path}/{sub}/{name}"
        path = self._paths.get(uid)
        return path if path is not None and os.path.lexists(path) else None

    def locate(self, uid: int) -> str | None:
        """The file of ``uid`` now, or None once it is expunged (a reader whose path a
        flag change made stale: a rename keeps the unique name)."""
        with self._locked():
            return self._find(uid)

    def store(self, uids: Iterable[int], *, add: Iterable[str] = (), remove: Iterable[str] = (),
              replace: Iterable[str] | None = None,
              unchanged_since: int | None = None) -> StoreResult:
        """STORE: set, add or remove flags; system flags by renaming the file, keywords in
        the map. Messages whose MODSEQ is above ``unchanged_since`` are left and reported."""
        add_l, add_k = split_flags(add)
        rem_l, rem_k = split_flags(remove)
        rep = split_flags(replace) if replace is not None else None
        with self._locked():
            st = self._log.state
            modseq = st.highestmodseq + 1
            records: list[bytes] = []
            modified: list[int] = []
            changed: dict[int, tuple[frozenset[str], int]] = {}
            gone: list[int] = []
            renamed = False
            with self._renaming() as may:
                if not may and (add_l or rem_l or rep is not None):
                    raise MailboxBusy(self.name)
                for uid in sorted(set(uids)):
                    e = st.entries.get(uid)
                    if e is None:
                        gone.append(uid)
                        continue
                    if unchanged_since is not None and e.modseq > unchanged_since:
                        modified.append(uid)
                        continue
                    path = self._find(uid)
                    if path is None:
                        gone.append(uid)
                        continue  # gone: the next scan expunges it
                    unique, on_file = _info(os.path.basename(path))
                    letters = on_file if on_file is not None else e.letters
                    known = "".join(c for c in letters if c not in "DFPRST")
                    if rep is not None:
                        new_l = set(rep[0]) | set(known)
                        kws = {k.lower(): k for k in rep[1]}
                    else:
                        new_l = (set(letters) | set(add_l)) - set(rem_l)
                        kws = {k.lower(): k for k in e.keywords}
                        for k in add_k:  # a keyword keeps the spelling it has
                            kws.setdefault(k.lower(), k)
                        for k in rem_k:
                            kws.pop(k.lower(), None)
                    new_letters = letters if on_file is None else "".join(sorted(new_l))
                    new_kw = tuple(sorted(kws.values(), key=str.lower))
                    if len(new_kw) > MAX_KEYWORDS:
                        raise MailboxError("too many keywords")
                    if new_letters != letters:
                        target = f"{self.path}/cur/{unique}:2,{new_letters}"
                        rename_no_replace(path, target)
                        self._paths[uid] = target
                        renamed = True
                    if new_letters != e.letters:
                        records.append(rec_flags(uid, modseq, new_letters))
                    if new_kw != e.keywords:
                        records.append(rec_keywords(uid, modseq, new_kw))
                    if new_letters != e.letters or new_kw != e.keywords:
                        changed[uid] = (letters_to_flags(new_letters, new_kw), modseq)
                if renamed:
                    fsync_dir(self.path / "cur")
                    fsync_dir(self.path / "new")
            self._log.append(records)
            return StoreResult(changed, modified, tuple(gone))

    # -- expunge -------------------------------------------------------------------------

    def expunge(self, uids: Iterable[int] | None = None) -> list[int]:
        """EXPUNGE (or UID EXPUNGE with ``uids``): remove the messages flagged \\Deleted."""
        with self._locked():
            st = self._log.state
            chosen = st.entries.keys() if uids is None else set(uids) & st.entries.keys()
            doomed = [u for u in chosen if "T" in st.entries[u].letters]
            return self._expunge(doomed)

    def _expunge(self, uids: list[int], *, held: bool = False) -> list[int]:
        """Unlink, then record; ``held``: the caller holds POP3's lock already."""
        if not uids:
            return []
        with contextlib.nullcontext(True) if held else self._renaming() as may:
            if not may:
                raise MailboxBusy(self.name)
            for uid in uids:
                path = self._find(uid)
                if path is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            fsync_dir(self.path / "cur")
            fsync_dir(self.path / "new")
        st = self._log.state
        self._log.append([rec_expunge(st.highestmodseq + 1, uids)])
        for uid in uids:
            self._paths.pop(uid, None)
        return sorted(uids)

    # -- append and copy -----------------------------------------------------------------

    def append(self, data: bytes, flags: Iterable[str] = (),
               internal_date: int | None = None) -> tuple[int, int]:
        """APPEND: the message lands in cur/ whole, with its flags; (UIDVALIDITY, UID) for
        APPENDUID. tmp/ first and fsynced, so a crash leaves at most a file in tmp/."""
        letters, keywords = split_flags(flags)
        unique = unique_name()
        size = imap_size(data)
        date = int(time.time()) if internal_date is None else internal_date
        tmp = self.path / "tmp" / unique
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.utime(fd, (date, date))
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        # W= is RFC822.SIZE (name_size); written only where it is POP3's size too (a
        # final line end, no bare CR), so that POP3, which trusts it, lists what RETR sends
        wire = wire_size(data)
        full = f"{unique},S={len(data)},W={wire}" if wire == size else f"{unique},S={len(data)}"
        try:
            with self._locked():
                target = f"{self.path}/cur/{full}:2,{letters}"
                rename_no_replace(str(tmp), target)
                fsync_dir(self.path / "cur")
                uid = self._assign([(full, letters, keywords, size, date, target)])[0]
                return self._log.state.uidvalidity, uid
        finally:
            tmp.unlink(missing_ok=True)

    def _assign(self, items: list[tuple[str, str, tuple[str, ...], int, int, str]]) -> list[int]:
        """UIDs for files already in place (under the lock), after a scan so that files
        that came earlier keep the order they arrived in."""
        self._scan(frozenset(item[0] for item in items))
        st = self._log.state
        modseq = st.highestmodseq + 1
        uids: list[int] = []
        records: list[bytes] = []
        assigned: list[Entry] = []
        for unique, letters, keywords, size, date, path in items:
            uid = st.by_unique.get(unique)  # the scan may have numbered it: keep that UID
            if uid is None:
                uid = st.uidnext + len(assigned)
                entry = Entry(uid, unique, letters, keywords, modseq, size, date)
                records.append(rec_assign(entry))
                assigned.append(entry)
            elif keywords:
                records.append(rec_keywords(uid, modseq, keywords))
            self._paths[uid] = path
            uids.append(uid)
        self._log.append(records, assigned)
        return uids

    @contextlib.contextmanager
    def _with(self, target: Mailbox) -> Iterator[None]:
        """Both mailboxes locked, in the order of their paths (two opposite COPYs in two
        sessions would otherwise wait for each other forever)."""
        first, second = sorted((self, target), key=lambda box: str(box.path))
        with first._locked(), second._locked():
            yield

    def copy_to(self, uids: Iterable[int], target: Mailbox) -> tuple[int, list[int], list[int]]:
        """COPY: hard links (a copy across file systems) into the target's cur/ with new
        unique names and UIDs; (target UIDVALIDITY, source UIDs, target UIDs) for COPYUID.
        Messages already gone are skipped."""
        if target.path == self.path:
            raise MailboxError("copy into the same mailbox")
        with self._with(target):
            return self._copy(uids, target)

    def _copy(self, uids: Iterable[int], target: Mailbox) -> tuple[int, list[int], list[int]]:
        st = self._log.state
        placed: list[tuple[int, tuple[str, str, tuple[str, ...], int, int, str]]] = []
        for uid in sorted(set(uids)):
            path = self._find(uid)
            if path is None:
                continue  # expunged meanwhile
            e = st.entries[uid]
            letters = _info(os.path.basename(path))[1]
            letters = e.letters if letters is None else letters
            full = _copy_name(os.path.basename(path), e.size)
            dest = f"{target.path}/cur/{full}:2,{letters}"
            try:
                _link_or_copy(path, dest, target.path / "tmp" / full)
            except FileNotFoundError:
                continue  # removed by a tool that takes no lock
            placed.append((uid, (full, letters, e.keywords, e.size, e.date, dest)))
        if placed:
            fsync_dir(target.path / "cur")
        new_uids = target._assign([p[1] for p in placed])
        return target._log.state.uidvalidity, [p[0] for p in placed], new_uids

    def move_to(self, uids: Iterable[int], target: Mailbox) -> tuple[int, list[int], list[int]]:
        """MOVE: copy, then expunge the originals, both mailboxes locked throughout (a crash
        between leaves the message in both, never in neither)."""
        if target.path == self.path:
            raise MailboxError("move into the same mailbox")
        with self._with(target), self._renaming() as may:
            if not may:  # refused before anything is copied
                raise MailboxBusy(self.name)
            validity, src, dst = self._copy(uids, target)
            self._expunge(src, held=True)
        return validity, src, dst


def _copy_name(source: str, size: int) -> str:
    """A new unique name for a copy, with the source's ``S=`` (else ``size``) and its
    ``W=`` when it has one (the same octets: the same sizes; a file without ``W=`` is not
    given one, which for an LF file would be no size at all)."""
    found = dict(_SIZES.findall(source.partition(":")[0]))
    raw = found.get("S", str(size))
    w = found.get("W")
    return f"{unique_name()},S={raw}" + (f",W={w}" if w is not None else "")


def _link_or_copy(src: str, dest: str, tmp: Path) -> None:
    """A hard link (else a copy) of a message file; FileNotFoundError for one that is not a
    regular file (a symlink planted in its place: link(2) would link the symlink)."""
    if not stat.S_ISREG(os.lstat(src).st_mode):
        raise FileNotFoundError(src)
    try:
        os.link(src, dest)
        return
    except OSError as exc:
        if exc.errno != 18:  # EXDEV: another file system
            raise
    src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)  # as FETCH reads
    with open(src_fd, "rb") as fin, open(tmp, "xb") as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)
        fout.flush()
        os.fsync(fout.fileno())
    rename_no_replace(str(tmp), dest)


# -- the mailboxes of one user ---------------------------------------------------------------


def _check_name(name: str) -> str:
    """The canonical name (``INBOX`` upper case) or BadName."""
    if name.upper() == INBOX:
        return INBOX
    parts = name.split(SEP)
    if parts[0].upper() == INBOX:
        raise BadName("INBOX has no children here")
    for part in parts:
        if not part or part.strip() != part or any(c in part for c in "/\\%*") \
                or any(ord(c) < 0x20 or ord(c) == 0x7F for c in part):
            raise BadName(f"not a mailbox name: {name!r}")
    if len(folder_dir(name)) > MAX_NAME:
        raise BadName("mailbox name too long")
    return name


def folder_dir(name: str) -> str:
    """The Maildir++ directory name of a mailbox other than INBOX."""
    return SEP + SEP.join(mutf7.encode(p) for p in name.split(SEP))


class MailStore:
    """The mailboxes of one user: INBOX at ``root``, the others as Maildir++ folders."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._boxes: dict[str, Mailbox] = {}
        self._lock = threading.Lock()

    def _path(self, name: str) -> Path:
        return self.root if name == INBOX else self.root / folder_dir(name)

    def mailbox(self, name: str) -> Mailbox:
        """An existing mailbox (NoSuchMailbox otherwise); one object per name per store."""
        name = _check_name(name)
        path = self._path(name)
        if name == INBOX:
            for sub in ("tmp", "new", "cur"):
                make_dirs(path / sub)
        elif not (path / "cur").is_dir():
            raise NoSuchMailbox(name)
        with self._lock:
            box = self._boxes.get(name)
            if box is None or box.path != path:
                box = self._boxes[name] = Mailbox(path, name, self.root)
            return box

    def create(self, name: str) -> Mailbox:
        """CREATE: the folder with new/ cur/ tmp/ and a map with a never-used UIDVALIDITY."""
        name = _check_name(name)
        if name == INBOX:
            raise MailboxExists(name)
        path = self._path(name)
        make_dirs(self.root)
        try:
            path.mkdir()
        except FileExistsError:
            if (path / "cur").is_dir():
                raise MailboxExists(name) from None
            # a CREATE that crashed before cur/ (or a race with one still running): finish it
        for sub in ("tmp", "new", "cur"):
            (path / sub).mkdir(exist_ok=True)
        # maildirfolder marks a Maildir++ folder for Courier's and Dovecot's tools
        (path / "maildirfolder").touch()
        for sub in ("tmp", "new", "cur"):
            fsync_dir(path / sub)
        fsync_dir(path)
        fsync_dir(self.root)
        box = self.mailbox(name)
        box.status()  # writes the map, with its UIDVALIDITY
        return box

    def ensure_special(self) -> None:
        """The special-use set (Sent, Drafts, Junk, Trash, Archive), made where missing."""
        for name in SPECIAL_USE:
            with contextlib.suppress(MailboxExists):
                self.create(name)

    def delete(self, name: str) -> None:
        """DELETE: the folder vanishes at once (a rename into tmp/), then is removed.
        Its children stay. Its UIDVALIDITY is never given again (next_uidvalidity)."""
        name = _check_name(name)
        if name == INBOX:
            raise MailboxError("INBOX cannot be deleted")
        path = self._path(name)
        if not (path / "cur").is_dir():
            raise NoSuchMailbox(name)
        make_dirs(self.root / "tmp")
        grave = self.root / "tmp" / f".deleted-{secrets.token_hex(8)}"
        os.rename(path, grave)
        fsync_dir(self.root)
        with self._lock:
            self._boxes.pop(name, None)
        shutil.rmtree(grave, ignore_errors=True)

    def rename(self, old: str, new: str) -> None:
        """RENAME with its children (``A`` -> ``B`` also moves ``A.x`` to ``B.x``). The
        messages keep their UIDs and UIDVALIDITY. Renaming INBOX is not done here yet."""
        old, new = _check_name(old), _check_name(new)
        if INBOX in (old, new):
            raise MailboxError("renaming INBOX is not supported")
        if not (self._path(old) / "cur").is_dir():
            raise NoSuchMailbox(old)
        if self._path(new).exists():
            raise MailboxExists(new)
        moves = [(old, new)] + [(n, new + n[len(old):]) for n in self.names()
                                if n.startswith(old + SEP)]
        for a, b in moves:
            os.rename(self._path(a), self._path(b))
        fsync_dir(self.root)
        with self._lock:
            self._boxes.clear()

    def names(self) -> list[str]:
        """Every mailbox, INBOX first, then by name (undecodable folder names skipped)."""
        out: list[str] = []
        with os.scandir(self.root) as it:
            for entry in it:
                n = entry.name
                if len(n) < 2 or n[0] != SEP or n[1] == SEP or not entry.is_dir():
                    continue
                try:
                    name = SEP.join(mutf7.decode(p) for p in n[1:].split(SEP))
                    _check_name(name)
                except (ValueError, BadName):
                    continue
                if (Path(entry.path) / "cur").is_dir():
                    out.append(name)
        return [INBOX, *sorted(out)]

    def list(self) -> list[tuple[str, frozenset[str]]]:
        """LIST: each mailbox with its attributes (special use, children)."""
        names = self.names()
        result: list[tuple[str, frozenset[str]]] = []
        for name in names:
            attrs = set()
            if name in SPECIAL_USE:
                attrs.add(SPECIAL_USE[name])
            kids = any(n.startswith(name + SEP) for n in names)
            attrs.add("\\HasChildren" if kids else "\\HasNoChildren")
            result.append((name, frozenset(attrs)))
        return result
