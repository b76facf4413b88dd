"""Fixtures for the auditor's tests: the weak server, a test DNS server, a CLI runner."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailfort import cli
from tests.audit.weak_server import Weakness, WeakServer
from tests.dnsserver import DNSServer

# Small bounds keep the suite fast; the defaults (10 s, 20 idle connections) are for
# real servers.
FAST = ["--timeout", "2", "--settle", "0.25", "--idle-connections", "5"]


@pytest.fixture(scope="session")
def weak_cert(tls_ca: trustme.CA) -> Any:
    return tls_ca.issue_cert("localhost", "127.0.0.1")


@pytest.fixture
def weak_factory(weak_cert: Any) -> Iterator[Callable[..., WeakServer]]:
    servers: list[WeakServer] = []

    def make(banner: str = "weak.test ESMTP ready", slow: dict[str, float] | None = None,
             trickle: float = 0.0, greeting: str | None = None, broken_tls: bool = False,
             refuse_data: bool = False, **flags: bool) -> WeakServer:
        s = WeakServer(weak_cert, Weakness(**flags), banner=banner, slow=slow,
                       trickle=trickle, greeting=greeting, broken_tls=broken_tls,
                       refuse_data=refuse_data).start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def _dns_server() -> Iterator[DNSServer]:
    with DNSServer() as server:
        yield server


@pytest.fixture
def dns(_dns_server: DNSServer) -> DNSServer:
    """The session's test DNS server, emptied for each test (stopping one takes ~1 s)."""
    _dns_server.clear()
    return _dns_server


def port_args(ports: dict[str, int]) -> list[str]:
    out: list[str] = []
    for service, port in ports.items():
        out += [f"--{service}-port", str(port)]
    return out


@pytest.fixture
def password_file(tmp_path: Path) -> Callable[[str], str]:
    def write(password: str) -> str:
        p = tmp_path / "auth-password"
        p.write_text(password + "\n")
        return str(p)

    return write


def run_audit(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    """``mailfort audit …`` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main(["audit", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def statuses(stdout: str) -> dict[str, str]:
    """check id -> status, from ``--json`` output."""
    return {c["id"]: c["status"] for c in json.loads(stdout)["checks"]}


async def audit_content(node: Any, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """``--only content.gtube`` against a mailfort node's MX (the other ports closed), with
    alice@example.test as the known user: that check's JSON."""
    argv = ["127.0.0.1", "--smtp-port", str(node.port("mx")), "--submission-port", "0",
            "--submissions-port", "0", "--pop3-port", "0", "--pop3s-port", "0",
            "--imap-port", "0", "--imaps-port", "0", "--managesieve-port", "0",
            "--domain", "example.test", "--user", "alice", *FAST, "--json",
            "--only", "content.gtube"]
    _, out, _ = await asyncio.to_thread(run_audit, capsys, argv)
    (got,) = json.loads(out)["checks"]
    return dict(got)
