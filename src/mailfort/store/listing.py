"""Listings of Maildir directories kept between looks, and what a Maildir holds from them.

A listing of ``new/`` or ``cur/`` of 10,000 messages costs milliseconds of ``getdents``;
most looks find nothing changed. A listing is kept with the directory's (device, inode,
mtime, ctime) taken *before* it and reused while those are unchanged, but only if it
began more than ``SYNC_MARGIN`` whole seconds after the directory last changed (Dovecot's
rule for its cached Maildir listings: ``check_time > mtime + 1``). Why the margin: a
directory's timestamps come from a coarse clock (a kernel tick; whole seconds on some file
systems; the server's clock over NFS), so a file renamed in just after a listing can leave
them exactly as they were. A change made after a listing that began at second
``t >= changed + 2`` is stamped ``t - 1`` or later even by a clock a second behind ours,
which is after ``changed``: it shows. A listing made sooner after a change stands for its
own look only. ctime is compared as well as mtime because ``utime`` can set an mtime back,
never a ctime.

``MaildirUsage``: the octets and messages of a user's Maildir over all its folders, for
the SMTP quota check at RCPT (server/smtp.py), from the sizes in the file names (``W=``,
else ``S=``, the way Maildir++ counts; a file named without either is looked at), each
folder's ``new/`` and ``cur/`` listed again only when they changed under the rule above.
So a check costs a few ``stat`` calls per folder, and is right within the next look after
any delivery, IMAP expunge or POP3 deletion: no count kept by the writers can drift.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SYNC_MARGIN = 1  # seconds: a listing is reused only if made more than this after a change
_wall = time.time  # the clock a listing's age is judged by (tests move it on)


@dataclass(frozen=True, slots=True)
class Listing:
    """The names in a directory (dot files too) and whether they may stand for the next
    look (see the module docstring)."""

    stamp: tuple[int, int, int, int]  # st_dev, st_ino, st_mtime_ns, st_ctime_ns, before it
    names: frozenset[str]
    reusable: bool


def list_dir(path: str, last: Listing | None) -> tuple[Listing, bool]:
    """The directory's listing, ``last`` itself when it may be reused, and True when the
    names are the last listing's (reused, or listed again and found equal)."""
    now = int(_wall())  # before the stat: errs towards listing again
    st = os.stat(path)
    stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    if last is not None and last.reusable and last.stamp == stamp:
        return last, True
    names = frozenset(os.listdir(path))
    changed = max(st.st_mtime_ns, st.st_ctime_ns) // 1_000_000_000
    listing = Listing(stamp, names, now > changed + SYNC_MARGIN)
    return listing, last is not None and last.names == names


_SIZE = re.compile(r",([SW])=(\d{1,15})")


def _octets(directory: str, name: str) -> int:
    """A message's size from its name (``W=``, else ``S=``), else from the file."""
    sizes = dict(_SIZE.findall(name.partition(":")[0]))
    found = sizes.get("W") or sizes.get("S")
    if found is not None:
        return int(found)
    try:
        st = os.lstat(f"{directory}/{name}")
    except FileNotFoundError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


@dataclass(frozen=True, slots=True)
class _Counted:
    listing: Listing
    octets: int
    messages: int


class MaildirUsage:
    """Per process: (octets, messages) of Maildirs, from listings kept per directory."""

    def __init__(self, max_dirs: int = 50_000) -> None:
        self._max = max_dirs
        self._dirs: dict[str, _Counted] = {}
        self._roots: dict[str, Listing] = {}
        self._lock = threading.Lock()

    def usage(self, root: Path) -> tuple[int, int]:
        """(octets, messages) in ``new/`` and ``cur/`` of INBOX and every Maildir++ folder
        of the Maildir at ``root``; (0, 0) for one not made yet. Blocking (disk)."""
        top = str(root)
        try:
            listing, _ = list_dir(top, self._roots.get(top))
        except FileNotFoundError:
            return 0, 0
        folders = [top] + [f"{top}/{n}" for n in listing.names
                           if len(n) > 1 and n[0] == "." and n[1] != "."]
        octets = messages = 0
        for folder in folders:
            for sub in ("new", "cur"):
                got = self._count(f"{folder}/{sub}")
                octets += got[0]
                messages += got[1]
        with self._lock:
            self._roots[top] = listing
        return octets, messages

    def _count(self, directory: str) -> tuple[int, int]:
        last = self._dirs.get(directory)
        try:
            listing, same = list_dir(directory, last.listing if last is not None else None)
        except (FileNotFoundError, NotADirectoryError):
            return 0, 0  # a plain file named like a folder, or a folder half made
        if same and last is not None:
            counted = _Counted(listing, last.octets, last.messages)
        else:
            names = [n for n in listing.names if n[:1] != "."]
            counted = _Counted(listing, sum(_octets(directory, n) for n in names), len(names))
        with self._lock:
            if directory not in self._dirs and len(self._dirs) >= self._max:
                self._dirs.clear()  # bounded: forgetting costs a listing, never a wrong answer
                self._roots.clear()
            self._dirs[directory] = counted
        return counted.octets, counted.messages
