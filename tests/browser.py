"""Checks of a report page as a reader gets it: one self-contained file, and what Debian's
headless Chromium makes of it.

Both reports (audit and lab) are built by one page helper (mailfort.report.page); their
tests hand their real page to these helpers. Rendering proves the page loads with no
console error and produces a real picture, which is kept for a person to look at when
``MAILFORT_TEST_ARTIFACTS`` names a directory (CI uploads it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest


def self_contained(text: str, data_id: str) -> Any:
    """Assert the page loads nothing from outside; return the JSON it carries."""
    embedded = re.search(rf'<script type="application/json" id="{data_id}">(.*?)</script>',
                         text, re.S)
    assert embedded, f"no embedded {data_id} data"
    # No external resource of any kind: only in-page anchors.
    assert not re.search(r'\b(?:src|href)="(?!#)', text)
    assert "<link" not in text and "@import" not in text and "url(" not in text
    assert text.count("<script") == 1  # the data, which never runs
    return json.loads(embedded.group(1))


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


def rendered_size(page: Path, shot: Path, *, width: int, height: int) -> tuple[int, int]:
    """The (width, height) of Chromium's picture of ``page`` (no console error allowed)."""
    return png_size(screenshot(page, shot, width=width, height=height))
