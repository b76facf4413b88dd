"""Record which files and directories ``os.fsync`` was called on, by their real paths.

Not a mock: every call still reaches the real ``os.fsync``; the wrapper only notes the path
behind the descriptor (``/proc/self/fd``), so a test can say which directory entries were
made durable.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

_real_fsync = os.fsync


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """The paths fsynced while the test runs, in order."""
    seen: list[Path] = []

    def recording_fsync(fd: int) -> None:
        _real_fsync(fd)
        seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    yield seen
