"""The auditor over ManageSieve alone (4190): the careful weak server passes, its weak
variants fail the matching check, and mailfort itself is judged by its own listener."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.audit.conftest import FAST, run_audit
from tests.audit.weak_server import WeakServer

NO_OTHERS = ["--smtp-port", "0", "--submission-port", "0", "--submissions-port", "0",
             "--pop3-port", "0", "--pop3s-port", "0", "--imap-port", "0", "--imaps-port", "0"]
SIEVE_CHECKS = ["managesieve.plaintext-auth", "tls.injection-managesieve", "tls.starttls"]


def _argv(server: WeakServer, *only: str) -> list[str]:
    return ["127.0.0.1", *NO_OTHERS, "--managesieve-port", str(server.ports["managesieve"]),
            *FAST, "--json", "--only", *only]


def _statuses(out: str) -> dict[str, tuple[str, str]]:
    return {c["id"]: (c["status"], c["result"]) for c in json.loads(out)["checks"]}


def test_careful_managesieve_passes(
    weak_factory: Callable[..., WeakServer], capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_audit(capsys, _argv(weak_factory(), *SIEVE_CHECKS))
    got = _statuses(out)
    assert {k: s for k, (s, _) in got.items()} == dict.fromkeys(SIEVE_CHECKS, "PASS"), got
    assert "managesieve" in got["tls.starttls"][1]
    assert code == 0


def test_sasl_before_tls_fails_plaintext_auth(
    weak_factory: Callable[..., WeakServer], capsys: pytest.CaptureFixture[str],
) -> None:
    server = weak_factory(sieve_plaintext_auth=True)
    code, out, _ = run_audit(capsys, _argv(server, "managesieve.plaintext-auth"))
    status, result = _statuses(out)["managesieve.plaintext-auth"]
    assert status == "FAIL" and "SASL PLAIN offered before STARTTLS" in result
    assert "answered with a challenge" in result
    assert code == 1


def test_pipelined_plaintext_kept_across_starttls_fails_injection(
    weak_factory: Callable[..., WeakServer], capsys: pytest.CaptureFixture[str],
) -> None:
    server = weak_factory(sieve_injection=True)
    code, out, _ = run_audit(capsys, _argv(server, "tls.injection-managesieve"))
    status, result = _statuses(out)["tls.injection-managesieve"]
    assert status == "FAIL" and "managesieve" in result
    assert code == 1
