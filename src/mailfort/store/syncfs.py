"""``syncfs(2)``: flush one file system, found by a descriptor on it (glibc has it; Python's
``os`` does not). ``SYNCFS`` is None where the C library lacks it."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable


def _load() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


SYNCFS = _load()


def syncfs(fd: int) -> None:
    """Flush the file system of ``fd``; OSError on failure (``SYNCFS`` must exist)."""
    assert SYNCFS is not None
    if SYNCFS(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
