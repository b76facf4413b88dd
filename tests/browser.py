"""Render an HTML report in Debian's headless Chromium, as a reader's browser would.

Both reports (audit and lab) are single self-contained pages; rendering them proves the
page loads with no console error and produces a real picture, which is kept for a person
to look at when ``MAILFORT_TEST_ARTIFACTS`` names a directory (CI uploads it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def screenshot(page: Path, shot: Path, *, width: int, height: int) -> bytes:
    """Render ``page`` into ``shot`` (PNG) and return its bytes; skip without Chromium."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (run-tests installs it as root)")
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--no-first-run", "--disable-extensions", f"--window-size={width},{height}",
         "--enable-logging=stderr", "--v=0", f"--user-data-dir={shot.parent / 'profile'}",
         f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=60, check=False,
    )
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]
    assert console == []
    assert proc.returncode == 0, proc.stderr[-500:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    artefacts = os.environ.get("MAILFORT_TEST_ARTIFACTS")
    if artefacts:
        Path(artefacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artefacts) / shot.name)
    return data
