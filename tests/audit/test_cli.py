"""Exit status and bounds: 2 for bad usage or an unreachable host, 3 for a run that could
not tell, never a hang."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.audit.conftest import FAST, port_args, run_audit, statuses
from tests.audit.weak_server import WeakServer
from tests.dnsserver import free_port_unused

SRC = str(Path(__file__).resolve().parents[2] / "src")
NO_PORTS = ["--smtp-port", "0", "--submission-port", "0", "--submissions-port", "0",
            "--pop3-port", "0", "--pop3s-port", "0", "--imap-port", "0", "--imaps-port", "0",
            "--managesieve-port", "0"]


def test_closed_ports_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    closed = free_port_unused()
    code, out, err = run_audit(capsys, ["127.0.0.1", *NO_PORTS, "--smtp-port", str(closed),
                                        *FAST])
    assert code == 2
    assert "unreachable" in err and out == ""


@pytest.mark.parametrize("argv", [
    [],  # no host
    ["127.0.0.1", "--only", "no-such-check"],
    ["127.0.0.1", "--user", "alice"],  # --user without --domain
    ["127.0.0.1", "--auth-user", "alice@example.test"],  # no password file
])
def test_bad_usage_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_audit(capsys, argv)
    assert code == 2
    assert err.startswith("mailfort audit: ")


def test_unknown_option_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run_audit(capsys, ["127.0.0.1", "--no-such-option"])
    assert exc.value.code == 2


def test_list_names_every_check(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_audit(capsys, ["--list"])
    assert code == 0
    assert "relay.open" in out and "smuggling.end-of-data" in out


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts connections and never says a word (a wedged or tarpitting server)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except (TimeoutError, OSError):
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield listener.getsockname()[1]
    stop.set()
    t.join()
    for s in held:
        s.close()
    listener.close()


def test_silent_server_is_unreachable_not_a_hang(
    silent_server: int, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    code, _, err = run_audit(capsys, ["127.0.0.1", *NO_PORTS, "--smtp-port",
                                      str(silent_server), "--timeout", "0.5"])
    assert code == 2 and "unreachable" in err
    assert time.monotonic() - started < 3


def test_budget_ends_the_run(
    weak_factory: Callable[..., WeakServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = weak_factory()
    started = time.monotonic()
    code, out, _ = run_audit(capsys, ["127.0.0.1", *port_args(server.ports), *FAST,
                                      "--budget", "0.01", "--json"])
    got = statuses(out)
    assert time.monotonic() - started < 5
    assert code == 0
    assert set(got.values()) == {"SKIP"}  # every check: "the run's time budget was spent"


def test_terminal_output_is_plain_when_piped(
    weak_factory: Callable[..., WeakServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = weak_factory(banner_version=True)
    code, out, _ = run_audit(capsys, ["127.0.0.1", *port_args(server.ports), *FAST,
                                      "--only", "disclosure.banner"])
    assert code == 1
    assert "\x1b[" not in out
    lines = out.splitlines()
    assert lines[1].startswith("summary: 1 FAIL")  # the summary comes first
    assert any(ln.startswith("FAIL") and "disclosure.banner" in ln for ln in lines)
    assert "Exim 4.69" in out  # the evidence is shown for a FAIL


def test_schema_option_prints_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    from mailfort.audit.schema import SCHEMA

    code, out, _ = run_audit(capsys, ["--schema"])
    assert code == 0 and json.loads(out) == SCHEMA


def test_a_trickling_greeting_cannot_stretch_the_budget(
    weak_factory: Callable[..., WeakServer],
) -> None:
    """Port 25 sends ``220-x`` every 0.5 s forever: each reply ends at --timeout, the check
    running when --budget runs out is cut (INCONCLUSIVE), and the run ends near --budget."""
    server = weak_factory(trickle=0.5)
    budget, margin = 8.0, 2.5
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "mailfort", "audit", "127.0.0.1", *NO_PORTS,
         "--smtp-port", str(server.ports["smtp"]), "--timeout", "2",
         "--budget", str(budget), "--json"],
        env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True,
        timeout=budget * 4)
    took = time.monotonic() - started
    assert proc.returncode in (1, 3), proc.stderr  # a cut check is no "all fine"
    checks = json.loads(proc.stdout)["checks"]
    assert took < budget + margin, took
    assert not [c["id"] for c in checks if c["status"] == "PASS"]
    cut = [c for c in checks if c["note_key"] == "budget.cut"]
    assert len(cut) == 1 and cut[0]["status"] == "INCONCLUSIVE"


def _audit(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``mailfort audit`` as a cron job runs it: a process of its own, its exit status."""
    return subprocess.run([sys.executable, "-m", "mailfort", "audit", *argv],
                          env={**os.environ, "PYTHONPATH": SRC}, capture_output=True,
                          text=True, timeout=timeout)


def test_a_server_without_the_domain_is_inconclusive_exit_3(tmp_path: Path) -> None:
    """The README's first audit run too early: a real ``mailfort serve`` with no domain yet.
    Relay, backscatter and smuggling cannot tell (the control recipient is refused): exit 3,
    not the 0 a cron job reads as "all fine"."""
    from tests.dnsserver import DNSServer
    from tests.server.production import serving, world_dir, write_config

    root = world_dir()
    try:
        with DNSServer() as dns:
            config = write_config(root, dns.port)
            with serving(config, root / "data") as server:
                del server
                text = config.read_text()
                ports = {name: text.split(f"{name} = [\"127.0.0.1:", 1)[1].split("\"", 1)[0]
                         for name in ("mx", "submission", "submissions", "pop3", "pop3s")}
                proc = _audit("127.0.0.1", "--smtp-port", ports["mx"],
                              "--submission-port", ports["submission"],
                              "--submissions-port", ports["submissions"],
                              "--pop3-port", ports["pop3"], "--pop3s-port", ports["pop3s"],
                              "--domain", "example.test", "--user", "alice", *FAST, "--json",
                              "--only", "relay.open", "backscatter.unknown-user",
                              "smuggling.end-of-data")
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    report = json.loads(proc.stdout)
    got = {c["id"]: c["status"] for c in report["checks"]}
    assert "FAIL" not in got.values() and "INCONCLUSIVE" in got.values(), got
    assert proc.returncode == 3 == report["exit_status"], proc.stderr


def test_help_documents_every_exit_status() -> None:
    proc = _audit("--help")
    text = " ".join(proc.stdout.split())
    for said in ("0 every check PASS, WARN or SKIP", "1 something FAILs", "2 bad usage",
                 "3 nothing FAILs but something is INCONCLUSIVE"):
        assert said in text, said


@pytest.mark.parametrize("where", ["no-such-dir/report.html", "."])
def test_unwritable_html_fails_before_the_run(
    weak_factory: Callable[..., WeakServer], tmp_path: Path, where: str,
) -> None:
    """One line and exit 2 at once, not a traceback after a full run."""
    server = weak_factory()
    html = tmp_path / where
    started = time.monotonic()
    proc = _audit("127.0.0.1", *port_args(server.ports), *FAST, "--html", str(html))
    assert proc.returncode == 2
    assert proc.stdout == "" and server.accepted == 0
    assert proc.stderr.startswith(f"mailfort audit: --html {html}")
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert time.monotonic() - started < 5


def test_readme_audits_after_the_domain_and_user_exist() -> None:
    """The first audit a newcomer runs comes after ``domain add`` and ``user add``: before,
    it can only say INCONCLUSIVE."""
    readme = (Path(SRC).parent / "README.md").read_text(encoding="utf-8")
    first_audit = readme.index("mailfort audit 127.0.0.1")
    assert readme.index("mailfort domain add example.test") < first_audit
    assert readme.index("mailfort user add alice@example.test") < first_audit
    assert "3 nothing FAILs but something is INCONCLUSIVE" in readme
