"""Each check can FAIL: switch one weakness on in the weak server and exactly the matching
check FAILs, with the others of its family still passing; with none on, nothing FAILs."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.audit.conftest import FAST, port_args, run_audit, statuses
from tests.audit.weak_server import Weakness, WeakServer
from tests.dnsserver import DNSServer

RELAY = ["relay", "backscatter"]
SUBMISSION = ["submission"]
DISCLOSURE = ["disclosure"]
TLS = ["tls", "pop3"]
LIMITS = ["limits.long-line", "limits.size", "limits.recipients", "limits.nul"]

CASES: dict[str, tuple[str, list[str]]] = {
    "open_relay": ("relay.open", RELAY),
    "accept_unknown": ("backscatter.unknown-user", RELAY),
    "submission_no_auth": ("submission.no-auth", SUBMISSION),
    "auth_before_tls": ("submission.auth-before-tls", SUBMISSION),
    "sender_forgery": ("submission.sender-forgery", SUBMISSION),
    "vrfy_confirms": ("disclosure.vrfy-expn", DISCLOSURE),
    "banner_version": ("disclosure.banner", DISCLOSURE),
    "no_starttls": ("tls.starttls", TLS),
    "no_stls": ("tls.pop3-stls", TLS),
    "pop3_user_before_stls": ("pop3.plaintext-auth", TLS),
    "old_tls": ("tls.versions", TLS),
    "weak_ciphers": ("tls.ciphers", TLS),
    "starttls_injection": ("tls.injection-smtp", TLS),
    "stls_injection": ("tls.injection-pop3", TLS),
    "smuggle_lf": ("smuggling.end-of-data", ["smuggling", "limits.size"]),
    "no_line_limit": ("limits.long-line", LIMITS),
    "no_size_limit": ("limits.size", LIMITS),
    "no_rcpt_limit": ("limits.recipients", LIMITS),
    "accept_nul": ("limits.nul", LIMITS),
    "exhaustible": ("limits.idle-connections", ["limits.idle-connections", "limits.liveness"]),
}


def test_every_weakness_has_a_case() -> None:
    assert set(CASES) == set(Weakness.names())


def _argv(server: WeakServer, password_file: Callable[[str], str]) -> list[str]:
    return ["127.0.0.1", *port_args(server.ports), "--domain", "weak.test", "--user", "alice",
            "--auth-user", "alice@weak.test", "--auth-password-file",
            password_file("alice-pw"), *FAST, "--json"]


def test_careful_server_nothing_fails(
    weak_factory: Callable[..., WeakServer], password_file: Callable[[str], str],
    dns: DNSServer, capsys: pytest.CaptureFixture[str],
) -> None:
    dns.add_mx("weak.test", "mx.weak.test")
    dns.add_txt("weak.test", "v=spf1 mx -all")
    dns.add_txt("_dmarc.weak.test", "v=DMARC1; p=reject")
    server = weak_factory()
    code, out, _ = run_audit(capsys, [*_argv(server, password_file),
                                      "--resolver", f"127.0.0.1:{dns.port}",
                                      "--dnsbl", "bl.test"])
    got = statuses(out)
    assert code == 0
    # The certificate is not trusted (WARN); every other check passes, none is skipped.
    assert {k: v for k, v in got.items() if v != "PASS"} == {"tls.certificate": "WARN"}


@pytest.mark.parametrize("weakness", sorted(CASES))
def test_one_weakness_fails_exactly_its_check(
    weakness: str, weak_factory: Callable[..., WeakServer],
    password_file: Callable[[str], str], capsys: pytest.CaptureFixture[str],
) -> None:
    expected, family = CASES[weakness]
    server = weak_factory(**{weakness: True})
    code, out, _ = run_audit(capsys, [*_argv(server, password_file), "--only", *family])
    got = statuses(out)
    assert expected in got
    assert [k for k, v in got.items() if v == "FAIL"] == [expected]
    assert not [k for k, v in got.items() if v == "INCONCLUSIVE"]
    assert code == 1
