"""Certificates: trusted and current PASS; untrusted or expired WARN (never FAIL)."""

from __future__ import annotations

import datetime as dt
import json
import re
import ssl
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
    assert untrusted["status"] == "WARN"
    assert "smtp: issued by a CA this client does not trust" in untrusted["result"]


class _SelfSigned:
    """A certificate that is its own issuer, as ``mailfort serve`` makes on first start."""

    def __init__(self, tmp_path: Path) -> None:
        ca = trustme.CA()
        self.cert, self.key = tmp_path / "self.pem", tmp_path / "self.key"
        ca.cert_pem.write_to_path(str(self.cert))
        ca.private_key_pem.write_to_path(str(self.key))

    def configure_cert(self, ctx: ssl.SSLContext) -> None:
        ctx.load_cert_chain(str(self.cert), str(self.key))


_ENGLISH = re.compile(r"[a-z]+[ -][a-z]+")  # two English words in a row: not Japanese


def test_self_signed_warns_in_the_reports_language(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The WARN every fresh mailfort shows: its words come from the catalogue, not from
    OpenSSL (``--lang ja`` said "smtp: self-signed certificate; ...")."""
    with WeakServer(_SelfSigned(tmp_path)) as server:
        en = _cert_check(server, capsys)
        ja = _cert_check(server, capsys, "--lang", "ja")
    assert en["status"] == ja["status"] == "WARN"
    assert en["result"].startswith("the certificate does not verify: smtp: self-signed "
                                   "certificate; submission: self-signed certificate")
    assert ja["result"].startswith("証明書を検証できない: smtp: 自己署名証明書、"
                                   "submission: 自己署名証明書")
    assert not _ENGLISH.search(ja["result"]), ja["result"]


def test_untrusted_and_expiring_warn_in_japanese(
    tls_ca: trustme.CA, weak_cert: object, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    now = dt.datetime.now(dt.UTC)
    soon = tls_ca.issue_cert("localhost", "127.0.0.1", not_after=now + dt.timedelta(days=5))
    cafile = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(cafile))
    with WeakServer(weak_cert) as server:
        untrusted = _cert_check(server, capsys, "--lang", "ja")
    with WeakServer(soon) as server:
        expiring = _cert_check(server, capsys, "--lang", "ja", "--cafile", str(cafile))
    assert "smtp: このクライアントが信頼しない認証局(CA)の発行" in untrusted["result"]
    assert "smtp: あと 4 日で期限切れ" in expiring["result"] or \
        "smtp: あと 5 日で期限切れ" in expiring["result"], expiring["result"]
    for result in (untrusted["result"], expiring["result"]):
        assert not _ENGLISH.search(result), result


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
