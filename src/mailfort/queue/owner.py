"""Which process owns a queue directory: an ``flock`` on ``<queue>/owner.lock``.

A node holds it for as long as it runs (and the kernel drops it when the process dies,
however it dies), with ``pid host`` written inside for the message. ``mailfort queue
adopt`` takes the same lock before it moves anything, so it refuses a queue whose node is
still running, and two adopts of one directory cannot interleave. The lock is advisory
and local: on a network file system a holder on another host may not be seen, which is
why adopt is for a node that is gone for good (its admin says so by running it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

LOCK_NAME = "owner.lock"


class QueueBusy(Exception):
    """Another live process holds the queue; the message names it."""


def hold(root: Path) -> int:
    """Take the queue's owner lock for this process; the descriptor (keep it open).
    QueueBusy when a live process holds it."""
    path = root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd)
        os.close(fd)
        raise QueueBusy(f"{root} is in use by a running mailfort ({holder or 'unknown pid'})"
                        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def release(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)  # closing the last descriptor drops the flock


def _read(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    return ""
