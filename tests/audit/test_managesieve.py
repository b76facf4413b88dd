"""The auditor over ManageSieve alone (4190): the careful weak server passes, its weak
variants fail the matching check, and mailfort itself is judged by its own listener."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.audit.conftest import FAST, run_audit
from tests.audit.weak_server import WeakServer

NO_OTHERS = ["--smtp-port", "0", "--submission-port", "0", "--submissions-port", "0",
             "--pop3-port", "0", "--pop3s-port", "0", "--imap-port", "0", "--imaps-port", "0"]
SIEVE_CHECKS = ["managesieve.plaintext-auth", "tls.injection-managesieve", "tls.starttls",
                "disclosure.banner"]


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


async def test_mailfort_with_the_loopback_exception_fails_plaintext_auth(
    tmp_path: Path, server_ssl_context: ssl.SSLContext, capsys: pytest.CaptureFixture[str],
) -> None:
    """mailfort's own listener with ``allow_plaintext_auth_on_loopback`` (the audit comes
    from 127.0.0.1): SASL PLAIN is offered in the clear, and the auditor says so; its
    IMPLEMENTATION names no software."""
    from mailfort.config import LimitsConfig, SieveConfig
    from mailfort.server.managesieve import ManageSieveServer
    from tests.server.test_pop3 import make_authenticator

    auth = make_authenticator(tmp_path)
    server = ManageSieveServer(ssl_context=server_ssl_context, authenticator=auth,
                               mail_dir=tmp_path / "mail", limits=LimitsConfig(),
                               sieve_config=SieveConfig(), allow_plaintext=True)
    await server.start("127.0.0.1", 0)
    try:
        argv = ["127.0.0.1", *NO_OTHERS, "--managesieve-port", str(server.ports[0]), *FAST,
                "--json", "--only", "managesieve.plaintext-auth", "disclosure.banner"]
        code, out, _ = await asyncio.to_thread(run_audit, capsys, argv)
    finally:
        await server.close()
        auth.close()
    status, result = _statuses(out)["managesieve.plaintext-auth"]
    assert status == "FAIL" and "SASL PLAIN offered before STARTTLS" in result
    assert "answered with a challenge" in result  # the "" challenge asks for the password
    banner = next(c for c in json.loads(out)["checks"] if c["id"] == "disclosure.banner")
    assert banner["status"] == "PASS"
    assert '< "IMPLEMENTATION" "ManageSieve"' in banner["evidence"]
    assert code == 1
