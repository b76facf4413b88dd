"""A real rspamd (Debian's ``rspamd`` package) as a milter on loopback, for the milter tests.

Its own configuration in a temporary directory: the package's rules (``$CONFDIR`` stays
/etc/rspamd), one proxy worker in milter mode that scans itself (``self_scan``: no separate
normal worker to wait for), DNS pointed at a closed loopback port (no network, maps fail fast),
``milter_headers`` on so that a clean message gets rspamd's header. ``stop`` takes it away
(for the error verdict).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

SKIP_REASON = ("rspamd not installed (Debian package rspamd; run-tests installs it when run "
               "as root): the milter client is tested against a real rspamd")

CONFIG = """\
.include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    dns {{ nameserver = ["127.0.0.1:9"]; timeout = 0.1s; retransmits = 1; }}
    control_socket = "$DBDIR/rspamd.sock mode=0600";
}}
logging {{ type = "file"; filename = "$LOGDIR/rspamd.log"; level = "notice"; }}
worker "rspamd_proxy" {{
    bind_socket = "127.0.0.1:{port}";
    milter = yes;
    timeout = 30s;
    count = 1;
    upstream "local" {{ default = yes; self_scan = yes; }}
}}
"""

MILTER_HEADERS = """\
use = ["x-spamd-result"];
skip_local = false;
skip_authenticated = false;
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RspamdServer:
    def __init__(self, milter_headers: str = MILTER_HEADERS) -> None:
        exe = shutil.which("rspamd")
        if exe is None or not Path("/etc/rspamd/common.conf").exists():
            pytest.skip(SKIP_REASON)
        self.exe = exe
        self.dir = Path(tempfile.mkdtemp(prefix="mailfort-rspamd-"))
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        for sub in ("local.d", "run", "db"):
            (self.dir / sub).mkdir()
        (self.dir / "rspamd.conf").write_text(CONFIG.format(port=self.port))
        (self.dir / "local.d" / "milter_headers.conf").write_text(milter_headers)

    @property
    def address(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> RspamdServer:
        args = [self.exe, "-f", "-c", str(self.dir / "rspamd.conf"),
                f"--var=LOCAL_CONFDIR={self.dir}", f"--var=RUNDIR={self.dir / 'run'}",
                f"--var=DBDIR={self.dir / 'db'}", f"--var=LOGDIR={self.dir}"]
        if os.geteuid() == 0:  # rspamd will not run its workers as root
            shutil.chown(self.dir, "_rspamd", "_rspamd")
            for path in self.dir.rglob("*"):
                shutil.chown(path, "_rspamd", "_rspamd")
            args += ["-u", "_rspamd", "-g", "_rspamd"]
        self.proc = subprocess.Popen(args, stdout=(self.dir / "out").open("ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        log = self.dir / "rspamd.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        self.stop()
        raise RuntimeError(f"rspamd did not start: {tail}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the main process and its workers
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
