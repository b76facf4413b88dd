"""systemd integration: sd_notify readiness over a real unix socket, and the shipped unit."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mailfort.server.sdnotify import Notifier
from tests.conftest import refusing_dns_port
from tests.server.production import serving, world_dir, write_config

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "mailfort.service"


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_says_ready_once_listening_reloading_at_sighup_and_stopping_at_sigterm(
        tmp_path: Path, workers: int) -> None:
    """With workers = 2 the supervisor speaks for the node (the workers have no socket):
    READY=1 once every worker serves."""
    root = world_dir()
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(20)
        config = write_config(root, refusing_dns_port(), server={"workers": workers})
        with serving(config, root / "data", ready=False,
                     NOTIFY_SOCKET=str(sock_path)) as server:
            ready = sock.recv(4096).decode()
            assert "READY=1" in ready.splitlines()
            assert f"MAINPID={server.pid}" in ready.splitlines()
            # Ready means ready: the control socket answers already.
            server.wait_ready(timeout=1)
            server.proc.send_signal(signal.SIGHUP)
            reloading = sock.recv(4096).decode().splitlines()
            assert "RELOADING=1" in reloading
            assert any(line.startswith("MONOTONIC_USEC=") for line in reloading)
            assert "READY=1" in sock.recv(4096).decode().splitlines()
            server.proc.send_signal(signal.SIGTERM)
            assert "STOPPING=1" in sock.recv(4096).decode().splitlines()
            server.proc.wait(20)
    shutil.rmtree(root, ignore_errors=True)


def test_abstract_namespace_socket(tmp_path: Path) -> None:
    name = f"mailfort-test-{tmp_path.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.notify(READY="1", STATUS="x")
        assert sock.recv(100) == b"READY=1\nSTATUS=x"
        notifier.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    assert Notifier({}).notify(READY="1") is False


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed")
def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    text = UNIT.read_text()
    for key in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "RestrictAddressFamilies=",
                "SystemCallFilter=@system-service", "Type=notify",
                "ReadWritePaths=/var/lib/mailfort"):
        assert key in text
    # The unit names /usr/bin/mailfort, which a test machine need not have.
    unit = tmp_path / "mailfort.service"
    unit.write_text(text.replace("/usr/bin/mailfort", sys.executable))
    sock = tmp_path / "mailfort.socket"
    sock.write_text((UNIT.parent / "mailfort.socket").read_text())
    r = subprocess.run(["systemd-analyze", "verify", str(unit), str(sock)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # A bad value is only a warning (exit 0): none may name our units.
    assert "mailfort.s" not in r.stderr + r.stdout, r.stderr


def test_grafana_dashboard_queries_only_metrics_that_exist() -> None:
    import json
    import re

    from mailfort import metrics

    dash = json.loads((UNIT.parent / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"mailfort_\w+", e)}
    known = {"mailfort_sessions_open", "mailfort_queue_length", "mailfort_queue_oldest_seconds"}
    for family in metrics.REGISTRY.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
        known |= {family.name + x for x in suffixes.get(family.type, [""])}
    assert used and used <= known, used - known
