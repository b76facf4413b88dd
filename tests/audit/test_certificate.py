"""Certificates: trusted and current PASS; untrusted or expired WARN (never FAIL)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import trustme

from tests.audit.conftest import FAST, port_args, run_audit
from tests.audit.weak_server import WeakServer


def _cert_check(server: WeakServer, capsys: pytest.CaptureFixture[str],
                *extra: str) -> dict:
    _, out, _ = run_audit(capsys, ["127.0.0.1", *port_args(server.ports), *FAST, "--json",
                                   "--only", "tls.certificate", *extra])
    return json.loads(out)["checks"][0]


def test_trusted_certificate_passes(tls_ca: trustme.CA, weak_cert: object, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    cafile = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(cafile))
    with WeakServer(weak_cert) as server:
        result = _cert_check(server, capsys, "--cafile", str(cafile))
        untrusted = _cert_check(server, capsys)
    assert result["status"] == "PASS"
    assert untrusted["status"] == "WARN" and "local issuer" in untrusted["result"]


def test_expired_certificate_warns(tls_ca: trustme.CA, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    now = dt.datetime.now(dt.UTC)
    old = tls_ca.issue_cert("localhost", "127.0.0.1", not_before=now - dt.timedelta(days=60),
                            not_after=now - dt.timedelta(days=1))
    cafile = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(cafile))
    with WeakServer(old) as server:
        result = _cert_check(server, capsys, "--cafile", str(cafile))
    assert result["status"] == "WARN"
    assert result["note_key"] == "cert.expired"
    assert f"{(now - dt.timedelta(days=1)):%Y-%m-%d}" in result["result"]
