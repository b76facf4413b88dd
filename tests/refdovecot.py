"""The reference Dovecot of ../shared/anchors (IMAP on 127.0.0.1:11143, plaintext LOGIN
allowed: a benchmark box) for differential tests: used when it already runs, started for the
run when root and Debian's Dovecot packages are here (the script would otherwise install
them), and stopped afterwards if the run started it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

IMAP_PORT = 11143
SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "anchors" / "dovecot-reference.sh"


def greets(port: int = IMAP_PORT) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(2)
            return s.recv(512).startswith(b"* OK")
    except OSError:
        return False


def start() -> tuple[bool, str | None]:
    """(started by us, why it cannot serve or None)."""
    if greets():
        return False, None
    if os.geteuid() != 0:
        return False, "the reference Dovecot needs root to start"
    if not SCRIPT.exists() or shutil.which("dovecot") is None \
            or not Path("/usr/lib/dovecot/imap").exists():  # else the script would apt-get
        return False, "the reference Dovecot (../shared/anchors script or Debian packages) " \
                      "is not installed"
    try:
        subprocess.run(["bash", str(SCRIPT), "start"], timeout=60, check=True,
                       capture_output=True)
    except (subprocess.SubprocessError, OSError) as exc:
        return False, f"the reference Dovecot did not start within a minute: {exc}"
    return True, None if greets() else "the reference Dovecot does not listen on 11143"


def stop() -> None:
    subprocess.run(["bash", str(SCRIPT), "stop"], timeout=60, capture_output=True, check=False)
