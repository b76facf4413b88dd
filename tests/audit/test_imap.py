"""The auditor over IMAP alone (143 and 993): the careful weak server passes, TLS on 993
is judged like any other port, and the reference Dovecot's plaintext LOGIN is found."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.audit.conftest import FAST, run_audit, statuses
from tests.audit.weak_server import WeakServer

NO_SMTP_POP3 = ["--smtp-port", "0", "--submission-port", "0", "--submissions-port", "0",
                "--pop3-port", "0", "--pop3s-port", "0"]
IMAP_CHECKS = ["imap", "tls.starttls", "tls.versions", "tls.ciphers", "tls.injection-imap",
               "limits.imap-literal", "limits.imap-line", "disclosure.banner",
               "limits.liveness"]


def _imap_argv(server: WeakServer, *only: str) -> list[str]:
    return ["127.0.0.1", *NO_SMTP_POP3, "--imap-port", str(server.ports["imap"]),
            "--imaps-port", str(server.ports["imaps"]), *FAST, "--json", "--only", *only]


def test_careful_imap_passes_every_imap_check(
    weak_factory: Callable[..., WeakServer], capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_audit(capsys, _imap_argv(weak_factory(), *IMAP_CHECKS))
    by_id = {c["id"]: c for c in json.loads(out)["checks"]}
    assert {k: c["status"] for k, c in by_id.items()} == dict.fromkeys(by_id, "PASS")
    assert set(by_id) >= {"imap.plaintext-auth", "tls.injection-imap", "limits.imap-literal",
                          "limits.imap-line"}
    assert any("D ID NIL" in e for e in by_id["disclosure.banner"]["evidence"])
    assert "imap, imaps" in by_id["tls.starttls"]["result"]
    assert code == 0


def test_weak_ciphers_on_993_fail_tls_ciphers(
    weak_factory: Callable[..., WeakServer], capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_audit(capsys, _imap_argv(weak_factory(weak_ciphers=True), "tls.ciphers"))
    check = json.loads(out)["checks"][0]
    assert check["status"] == "FAIL" and "imaps: " in check["result"], check["result"]
    assert code == 1


def test_old_tls_on_993_fails_tls_versions(
    weak_factory: Callable[..., WeakServer], capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_audit(capsys, _imap_argv(weak_factory(old_tls=True), "tls.versions"))
    check = json.loads(out)["checks"][0]
    assert check["status"] == "FAIL" and "imaps: TLSv1" in check["result"]
    assert code == 1



def test_reference_dovecot_allows_plaintext_login(
        capsys: pytest.CaptureFixture[str], reference_dovecot: int) -> None:
    """The benchmark box allows plaintext LOGIN on purpose: the audit must say so."""
    _, out, _ = run_audit(capsys, ["127.0.0.1", *NO_SMTP_POP3, "--imap-port",
                                   str(reference_dovecot), "--imaps-port", "0", "--timeout", "5",
                                   "--json", "--only", *IMAP_CHECKS])
    got = statuses(out)
    # AUTH=PLAIN and no LOGINDISABLED before TLS: a FAIL even when its failed-login delay
    # (which grows with each run's made-up LOGIN) outlasts --timeout
    assert got["imap.plaintext-auth"] == "FAIL"
    assert got["tls.starttls"] == "FAIL"  # ssl = no
    assert got["limits.imap-literal"] == "PASS"  # BYE on a literal too large
    assert got["limits.imap-line"] == "PASS"  # closed ("* BYE Input buffer full") past 64 KiB
    assert got["disclosure.banner"] == "WARN"  # "Dovecot ready", ID ("name" "Dovecot")
    banner = next(c for c in json.loads(out)["checks"] if c["id"] == "disclosure.banner")
    assert '< * ID ("name" "Dovecot")' in banner["evidence"]
    assert got["limits.liveness"] == "PASS"
