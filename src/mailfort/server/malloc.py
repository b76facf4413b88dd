"""Large freed blocks go back to the kernel instead of staying with the process.

glibc serves a request above its mmap threshold with a mapping of its own, unmapped at
free; below it, from an arena, where a freed block stays with the process. The threshold
starts at 128 KiB but moves: each mapped block freed raises it to that block's size (up
to 32 MiB). A login's argon2 hash takes 19 MiB (``passwords.DEFAULT_HASHER``), so after the
first login every later hash comes from the arena of the authenticator thread that runs
it, and each of those arenas keeps 19 MiB for the life of the worker. Setting the
threshold once turns that adjustment off (mallopt(3)): the hash's block is mapped and
given back at every login. With 10,000 IMAP sessions held by one worker this is the
difference between 154 MB and about 100 MB (bench/imap_idle_sessions.py, RESULTS.md).

The threshold chosen is above what mailfort itself allocates per message (reads of
1 MiB, IMAP batches of 256 KiB: those stay in the arena, where reuse is cheap) and far
below a hash. Set before the supervisor forks: workers inherit it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # <malloc.h>
THRESHOLD = 4 << 20


def fix_mmap_threshold(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold; False where there is no mallopt (not glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
