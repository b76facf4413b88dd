"""A Maildir as one POP3 session sees it: a locked snapshot taken at login.

Why each rule:

* **Snapshot.** RFC 1939 numbers messages for the whole session, so the listing is fixed at
  login (``new/`` and ``cur/``); mail delivered meanwhile waits for the next session.
* **Stable UIDLs.** The UID is the Maildir unique name (the part before ``:``), which never
  changes when flags do; a name that is not a valid RFC 1939 unique-id (1-70 printable
  characters) is replaced by a digest of itself, which is just as stable.
* **new → cur, and S.** A message retrieved whole moves to ``cur/`` with the ``S`` flag,
  renamed in batches by a background thread while the session goes on (so neither the
  client nor the next session waits for thousands of renames at QUIT); the rest of the new
  messages move to ``cur/`` with ``:2,`` when the session ends. A rename racing a read is
  resolved under ``_paths``: the path is only ever changed together with the file's name.
* **Deletion only at QUIT.** ``delete`` is called from the UPDATE state and nowhere else;
  a dropped connection just ``close``s, so nothing marked with DELE is lost.
* **Close waits for the deletions.** ``close`` renames new/ -> cur/ and drops the lock; run
  while ``delete`` is still unlinking, a rename would move a doomed file away from the path
  ``delete`` unlinks (so it survived), and a next session could list what is being deleted.
  So the two never overlap, and a closed mailbox refuses to ``delete`` (``MailboxClosed``).
* **One session per mailbox.** An in-process set plus ``flock`` on a lock file, so that two
  sessions, in one process or in two, never hand out the same numbering; the second one
  gets ``MailboxInUse`` (``-ERR [IN-USE]``).
* **Sizes and bodies in CRLF.** Sizes are counted in wire octets (``SizeCounter``) and
  bodies are read in bounded chunks through ``MessageEncoder``, so a 50 MB message never
  sits in memory.

Every method here blocks (disk); the server calls them in a thread or in bounded pieces.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mailfort.protocol.dotstuff import SizeCounter, encode_whole
from mailfort.protocol.pop3 import MessageEncoder
from mailfort.store.durable import fsync_dir, rename_no_replace

CHUNK = 64 * 1024
LOCK_NAME = "mailfort-pop3.lock"
_UID_OK = re.compile(r"[\x21-\x7e]{1,70}")
_MICRO = re.compile(r"M([0-9]{1,6})(?![0-9])")
_W_FIELD = re.compile(r",W=([0-9]{1,20})(?=,|$)")
# What a unique name says (its time, UIDL and ",W=" size) depends on the name alone and a
# name outlives its session (the S flag changes only what follows ":"), so a login parses
# only names it has not met before. Bounded: emptied when full.
_PARSED: dict[str, tuple[tuple[int, int], str, int | None]] = {}
PARSED_MAX = 20_000
FLAG_BATCH = 64  # retrieved messages renamed (S flag) per background job

_held: set[str] = set()  # maildirs locked by sessions of this process
_closing: dict[str, threading.Event] = {}  # maildirs whose session is finishing its close
_CLOSE_WAIT = 10.0  # seconds a new session waits for the previous one's close
_held_guard = threading.Lock()


class MailboxInUse(Exception):
    """Another POP3 session (this process or another) holds the mailbox."""


class MailboxClosed(Exception):
    """``delete`` after ``close``: the lock is gone, so deleting now could race a new session."""


def uid_for(name: str) -> str:
    """The UIDL of a Maildir file name: its unique part, or a digest if that is unfit."""
    unique = name.partition(":")[0]
    if _UID_OK.fullmatch(unique):  # printable ASCII only: a surrogate escape never matches
        return unique
    return "h" + hashlib.sha256(unique.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def _delivery_time(unique: str) -> tuple[int, int]:
    """The seconds and microseconds at the start of a Maildir unique name
    (``<seconds>.M<microseconds>...``), 0 where it has none (sorts first). The microseconds
    are compared as numbers: as text, ``M120456`` would sort before ``M95123``."""
    head, _, rest = unique.partition(".")
    seconds = int(head) if head.isascii() and head.isdigit() and len(head) <= 20 else 0
    micro = _MICRO.match(rest)
    return seconds, int(micro[1]) if micro is not None else 0


_flag_pool: ThreadPoolExecutor | None = None


def _flagger() -> ThreadPoolExecutor:
    """Threads that rename retrieved messages while sessions go on (created on first use)."""
    global _flag_pool
    with _held_guard:
        if _flag_pool is None:
            _flag_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="maildir-flags")
        return _flag_pool


@dataclass(slots=True)
class StoredMessage:
    uid: str
    path: str  # where the file is now (a plain string: a login makes thousands of these)
    size: int  # wire octets (CRLF), as LIST reports and RETR sends before stuffing
    seen: bool = False  # retrieved whole in this session: gets the S flag
    deleted: bool = False  # removed in the UPDATE state
    in_cur: bool = False  # in cur/ with an info part: needs no move
    marked: bool = False  # has S, or an info we leave alone: needs no flag either

    @property
    def to_file(self) -> bool:
        """Whether its file name is behind what this session knows of it."""
        return not self.deleted and (not self.in_cur or (self.seen and not self.marked))


class MessageReader:
    """A message being sent: bounded reads, encoded for the wire, terminator at the end."""

    __slots__ = ("_enc", "_file", "done")

    def __init__(self, file: BinaryIO, top_lines: int | None) -> None:
        self._file = file
        self._enc = MessageEncoder(top_lines)
        self.done = False

    def read(self) -> bytes:
        """The next piece of wire bytes (at most about 2 × CHUNK); ``done`` after the last."""
        if self.done:
            return b""
        while True:
            data = b"" if self._enc.done else self._file.read(CHUNK)
            if not data:
                self.done = True
                self.close()
                return self._enc.finish()
            out = self._enc.feed(data)
            if out:
                return out

    def close(self) -> None:
        self._file.close()


def size_from_name(name: str) -> int | None:
    """The ``,W=<octets>`` wire (CRLF) size that Maildir++ writers put in the name.

    ``,S=`` is the file size, which differs from the wire size for LF files: not used.
    """
    found = _W_FIELD.search(name.partition(":")[0])
    return int(found[1]) if found else None


_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW


def _count_size(path: str) -> int:
    """Wire octets of a message whose name does not carry them: read it once."""
    counter = SizeCounter()
    with open(os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW), "rb") as f:
        while chunk := f.read(CHUNK):
            counter.feed(chunk)
    return counter.size()


def _open_lock(path: Path) -> int:
    """The lock file's descriptor.

    On a read-only file system the lock file is opened read-only (flock needs no write
    access), or, when it was never made, the Maildir itself is locked: nothing can be
    deleted there anyway, and what is stored can still be read.
    """
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


class POP3Mailbox:
    """One session's locked snapshot of a Maildir. ``open`` it; always ``close`` it."""

    def __init__(self, maildir: Path, messages: list[StoredMessage], lock_fd: int,
                 key: str) -> None:
        self.maildir = maildir
        self.messages = messages
        self._lock_fd: int | None = lock_fd
        self._key = key
        self._paths = threading.Lock()  # a message's path changes only with its file name
        self._ending = threading.Lock()  # delete and close never overlap
        self._to_flag: list[StoredMessage] = []  # retrieved, not yet handed to the flagger
        self._flagging: list[Future[None]] = []  # batches handed to it

    @classmethod
    def open(cls, maildir: Path) -> POP3Mailbox:
        """Lock the Maildir (creating it if needed) and take the snapshot."""
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        key = str(maildir.resolve())
        with _held_guard:
            closing = _closing.get(key)
        if closing is not None:
            closing.wait(_CLOSE_WAIT)
        with _held_guard:
            if key in _held:
                raise MailboxInUse(key)
            _held.add(key)
        fd = -1
        try:
            fd = _open_lock(maildir / LOCK_NAME)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise MailboxInUse(key) from None
            messages = cls._snapshot(str(maildir))
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with _held_guard:
                _held.discard(key)
            raise
        return cls(maildir, messages, fd, key)

    @staticmethod
    def _snapshot(maildir: str) -> list[StoredMessage]:
        """new/ and cur/ as they are now, oldest first by the time in the unique name.

        Nothing is renamed here, so a login costs a directory listing, not a rename per
        message. A login lists thousands of names, hence plain strings, one pass, and the
        parse of each name remembered (``_PARSED``).
        """
        # ((seconds, microseconds), unique, name, folder, uid, size or None)
        found: list[tuple[tuple[int, int], str, str, str, str, int | None]] = []
        known = _PARSED.get
        for sub in ("new", "cur"):
            folder = f"{maildir}/{sub}"
            with os.scandir(folder) as it:
                for entry in it:
                    name = entry.name
                    if name[0] == "." or not entry.is_file(follow_symlinks=False):
                        continue
                    unique = name.partition(":")[0]
                    parsed = known(unique)
                    if parsed is None:
                        uid = unique if _UID_OK.fullmatch(unique) else uid_for(unique)
                        parsed = (_delivery_time(unique), uid, size_from_name(unique))
                        if len(_PARSED) >= PARSED_MAX:
                            _PARSED.clear()
                        _PARSED[unique] = parsed
                    found.append((parsed[0], unique, name, folder, parsed[1], parsed[2]))
        found.sort()
        messages: list[StoredMessage] = []
        seen_uids: set[str] = set()
        for _, unique, name, folder, uid, size in found:
            if uid in seen_uids:  # the same unique name twice (new/ and cur/): show one
                continue
            path = f"{folder}/{name}"
            if size is None:
                try:
                    size = _count_size(path)
                except FileNotFoundError:
                    continue
            seen_uids.add(uid)
            msg = StoredMessage(uid, path, size)
            if folder[-4:] == "/cur" and len(name) > len(unique):
                msg.in_cur = True
                info = name[len(unique) + 1:]
                msg.marked = not info.startswith("2,") or "S" in info
            messages.append(msg)
        return messages

    @property
    def listing(self) -> list[tuple[str, int]]:
        return [(m.uid, m.size) for m in self.messages]

    def _open_file(self, msg: StoredMessage) -> int:
        """A file descriptor for the message, even if the flagger just renamed it.

        Never through a symlink (ELOOP, an OSError: "gone"): the snapshot took regular
        files only, and a name swapped for a link since must not serve the file it points
        to, which the service user may be able to read and the mailbox's owner not."""
        try:
            return os.open(msg.path, _READ_FLAGS)
        except FileNotFoundError:
            with self._paths:  # a rename in flight has finished once we hold this
                return os.open(msg.path, _READ_FLAGS)

    def reader(self, index: int, top_lines: int | None) -> MessageReader:
        """Open one message for RETR (``top_lines`` None) or TOP; OSError if it is gone."""
        fd = self._open_file(self.messages[index])
        try:  # unbuffered: the reader asks for CHUNK-sized pieces, one read(2) each
            return MessageReader(open(fd, "rb", buffering=0), top_lines)
        except BaseException:
            os.close(fd)
            raise

    def read_whole(self, index: int, top_lines: int | None) -> bytes | None:
        """A small message encoded for the wire, terminator included, in one read.

        None if the file holds more than CHUNK octets after all (its name said less): the
        caller streams it instead, so memory stays bounded. OSError if it is gone.
        """
        msg = self.messages[index]
        try:  # ``_open_file`` spelled out: a session reads thousands of these
            fd = os.open(msg.path, _READ_FLAGS)
        except FileNotFoundError:
            fd = self._open_file(msg)
        try:
            data = os.read(fd, CHUNK + 1)
        finally:
            os.close(fd)
        if len(data) > CHUNK:
            return None
        if top_lines is None:
            return encode_whole(data)
        enc = MessageEncoder(top_lines)
        return enc.feed(data) + enc.finish()

    def retrieved(self, index: int) -> None:
        """The message went out whole (RETR): it gets the S flag, in the background."""
        msg = self.messages[index]
        if msg.seen:
            return
        msg.seen = True
        if not msg.to_file:
            return
        self._to_flag.append(msg)
        if len(self._to_flag) >= FLAG_BATCH:
            batch, self._to_flag = self._to_flag, []
            self._flagging.append(_flagger().submit(self._file_all, batch))

    def _file_all(self, batch: list[StoredMessage]) -> None:
        for msg in batch:
            if msg.to_file:
                self._file_in_cur(msg)

    def _flags_settled(self) -> None:
        """Wait for the background renames, so every path is final (blocks)."""
        wait_all(self._flagging)
        self._flagging.clear()

    def delete(self, indexes: list[int]) -> int:
        """UPDATE state: remove these messages durably; returns how many could not be."""
        with self._ending:
            if self._lock_fd is None:
                raise MailboxClosed(self._key)
            self._flags_settled()
            failures = 0
            dirs: set[str] = set()
            for i in indexes:
                msg = self.messages[i]
                try:
                    os.unlink(msg.path)
                except FileNotFoundError:
                    pass  # already gone (nothing renames it meanwhile): the goal is reached
                except OSError:
                    failures += 1
                    continue
                msg.deleted = True
                dirs.add(os.path.dirname(msg.path))
            for d in dirs:
                try:
                    fsync_dir(d)
                except OSError:
                    failures += 1
            return failures

    def announce_close(self) -> None:
        """Say, before ``close`` runs in a thread, that it will: a login of this mailbox that
        comes meanwhile waits for it (see ``open``) instead of being told it is in use."""
        if self._lock_fd is not None:
            with _held_guard:
                _closing.setdefault(self._key, threading.Event())

    def close(self) -> None:
        """End of session (QUIT or dropped): file messages in cur/ with their flags, unlock.

        A ``delete`` still running finishes first, with the lock held. Another session of
        this process that wants the mailbox meanwhile waits for the close to finish (see
        ``open``) instead of being told it is in use.
        """
        with self._ending:
            with _held_guard:
                done = _closing.setdefault(self._key, threading.Event())
            if self._lock_fd is None:  # closed before: only a late announcement to clear
                with _held_guard:
                    if _closing.get(self._key) is done:
                        del _closing[self._key]
                done.set()
                return
            try:
                self._flags_settled()
                self._to_flag.clear()  # they are in self.messages with seen set: filed below
                self._file_all(self.messages)
            finally:
                fd, self._lock_fd = self._lock_fd, None
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                with _held_guard:
                    _held.discard(self._key)
                    _closing.pop(self._key, None)
                done.set()

    def _file_in_cur(self, msg: StoredMessage) -> None:
        """new/ -> cur/ (seen by a reader), adding the S flag if it was retrieved."""
        folder, name = os.path.split(msg.path)
        in_new = os.path.basename(folder) == "new"
        unique, sep, info = name.partition(":")
        if sep and info.startswith("2,"):
            flags = info[2:]
        elif not sep:
            flags = ""
        else:  # an info we do not understand: leave it alone
            msg.in_cur = msg.marked = True
            return
        if msg.seen and "S" not in flags:
            flags = "".join(sorted(flags + "S"))
        elif not in_new and sep:
            msg.in_cur = True  # already in cur/ with nothing to add
            return
        target = os.path.join(os.path.dirname(folder), "cur", f"{unique}:2,{flags}")
        with self._paths:
            try:
                rename_no_replace(msg.path, target)
            except FileExistsError:  # another file with this unique name: keep both
                msg.in_cur = msg.marked = True
                return
            except OSError:
                return  # gone, or the disk refuses: the name stays behind, nothing is lost
            msg.path = target
            msg.in_cur, msg.marked = True, "S" in flags
