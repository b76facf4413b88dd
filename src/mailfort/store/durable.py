"""File-system steps that must not lose mail.

* A directory entry is durable once its directory is fsynced (a file's own fsync does not
  cover the name that points to it).
* So is a new directory: ``make_dirs`` fsyncs the parent of each directory it creates.
* Moving a message must never replace another file: ``os.rename`` silently overwrites its
  target, so a Maildir holding two files with one unique name (another program's doing)
  would lose one of them. ``rename_no_replace`` refuses instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys
from collections.abc import Callable
from pathlib import Path

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str | Path) -> list[Path]:
    """``mkdir -p`` whose result survives a crash; returns the directories it created.

    Each new directory's name lives in its parent, so every parent that gained an entry is
    fsynced (deepest first) before this returns. Nothing is synced when nothing was created.
    """
    path = Path(path)
    missing: list[Path] = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    created: list[Path] = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            if not d.is_dir():
                raise
            continue  # made meanwhile by another thread or process; it syncs its own
        created.append(d)
    for d in reversed(created):
        fsync_dir(d.parent)
    return created


def _load_renameat2() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _load_renameat2()
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


def _fsencode(path: str) -> bytes:
    """``os.fsencode`` for the common str (a quarter of its cost: a cold IMAP SELECT moves
    thousands of files, two paths each)."""
    return path.encode(_FS_ENCODING, _FS_ERRORS) if type(path) is str else os.fsencode(path)


def rename_no_replace(src: str, dst: str) -> None:
    """Move ``src`` to ``dst`` in one step; FileExistsError if ``dst`` exists.

    renameat2(RENAME_NOREPLACE) where the kernel and file system have it; otherwise a hard
    link then an unlink (a crash in between leaves two names for one file, never a loss).
    """
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, _fsencode(src), _AT_FDCWD, _fsencode(dst),
                      _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), src, None, dst)
    os.link(src, dst)
    os.unlink(src)
