"""The one helper every durable write needs: a directory entry is durable once its
directory is fsynced (a file's own fsync does not cover the name that points to it)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
