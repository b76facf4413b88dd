"""DNS checks against the tests' own DNS server (never the system resolver)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.audit.conftest import FAST, port_args, run_audit, statuses
from tests.audit.weak_server import WeakServer
from tests.dnsserver import DNSServer


def _good(dns: DNSServer) -> None:
    dns.add_mx("weak.test", "mx.weak.test")
    dns.add_txt("weak.test", "v=spf1 mx -all")
    dns.add_txt("_dmarc.weak.test", "v=DMARC1; p=quarantine; rua=mailto:d@weak.test")


def _audit(weak_factory: Callable[..., WeakServer], dns: DNSServer,
           capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, str]]:
    server = weak_factory()
    code, out, _ = run_audit(capsys, ["127.0.0.1", *port_args(server.ports), "--domain",
                                      "weak.test", *FAST, "--only", "dns", "--json",
                                      "--resolver", f"127.0.0.1:{dns.port}",
                                      "--dnsbl", "bl.test", "--dnsbl", "rbl.test"])
    return code, statuses(out)


def test_sane_records_pass(weak_factory: Callable[..., WeakServer], dns: DNSServer,
                           capsys: pytest.CaptureFixture[str]) -> None:
    _good(dns)
    code, got = _audit(weak_factory, dns, capsys)
    assert got == {"dns.mx": "PASS", "dns.spf": "PASS", "dns.dmarc": "PASS",
                   "dns.dnsbl": "PASS"}
    assert code == 0
    # The DNSBL was asked about the server's address, reversed, in each zone.
    assert ("1.0.0.127.bl.test", "A") in dns.queries
    assert ("1.0.0.127.rbl.test", "A") in dns.queries


def test_listed_on_a_dnsbl_fails(weak_factory: Callable[..., WeakServer], dns: DNSServer,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    _good(dns)
    dns.add_a("1.0.0.127.rbl.test", "127.0.0.2")
    code, got = _audit(weak_factory, dns, capsys)
    assert got["dns.dnsbl"] == "FAIL" and code == 1


def test_spf_that_allows_everyone_fails(weak_factory: Callable[..., WeakServer],
                                        dns: DNSServer,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    dns.add_mx("weak.test", "mx.weak.test")
    dns.add_txt("weak.test", "v=spf1 +all")
    code, got = _audit(weak_factory, dns, capsys)
    assert got["dns.spf"] == "FAIL" and code == 1
    assert got["dns.dmarc"] == "WARN"  # missing: worth a warning, not a failure


def test_missing_records_warn(weak_factory: Callable[..., WeakServer], dns: DNSServer,
                              capsys: pytest.CaptureFixture[str]) -> None:
    dns.add_a("weak.test", "127.0.0.1")  # the name exists, with no mail records
    dns.add_txt("_dmarc.weak.test", "v=DMARC1; p=none")
    code, got = _audit(weak_factory, dns, capsys)
    assert got == {"dns.mx": "WARN", "dns.spf": "WARN", "dns.dmarc": "WARN",
                   "dns.dnsbl": "PASS"}
    assert code == 0


def test_domain_that_does_not_resolve_is_skipped(
        weak_factory: Callable[..., WeakServer], dns: DNSServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    code, got = _audit(weak_factory, dns, capsys)
    assert set(got.values()) == {"SKIP"} and code == 0
    # Looked up once for all four checks, not once each.
    assert sum(1 for name, _ in dns.queries if name == "weak.test") == 1


def test_dnsbl_error_codes_are_not_listings(
        weak_factory: Callable[..., WeakServer], dns: DNSServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    _good(dns)
    for zone in ("bl.test", "rbl.test"):  # "query refused" codes of a DNSBL
        dns.add_a(f"1.0.0.127.{zone}", "127.255.255.254")
    code, got = _audit(weak_factory, dns, capsys)
    assert got["dns.dnsbl"] == "INCONCLUSIVE" and code == 3


def test_a_special_use_domain_is_not_asked_of_the_systems_resolver(
        weak_factory: Callable[..., WeakServer], capsys: pytest.CaptureFixture[str]) -> None:
    """The README audits example.test: without --resolver no query leaves for the public
    DNS, which never holds .test, .example, .invalid or .localhost names."""
    server = weak_factory()
    code, out, _ = run_audit(capsys, ["127.0.0.1", *port_args(server.ports), "--domain",
                                      "weak.test", *FAST, "--only", "dns", "--json"])
    checks = json.loads(out)["checks"]
    assert {c["id"]: c["status"] for c in checks} == {
        "dns.mx": "SKIP", "dns.spf": "SKIP", "dns.dmarc": "SKIP", "dns.dnsbl": "SKIP"}
    assert all("special-use name" in c["result"] for c in checks), checks
    assert code == 0
