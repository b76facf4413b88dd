"""The hardened mailfort, started by the test, passes every check of the audit: SMTP, POP3
and IMAP (143 with STARTTLS, 993 with implicit TLS) alike. One WARN is its due: mailfort
judges no content itself, and without a ``[[milter]]`` it takes GTUBE (content.gtube; with a
filter it PASSes, tests/audit/test_content.py)."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from mailfort.audit.schema import validate
from mailfort.config import Config
from tests.audit.conftest import port_args, run_audit
from tests.conftest import seed_directory
from tests.dnsserver import DNSServer

SERVICES = {"smtp": "mx", "submission": "submission", "submissions": "submissions",
            "pop3": "pop3", "pop3s": "pop3s", "imap": "imap", "imaps": "imaps",
            "managesieve": "managesieve"}
# The checks that speak IMAP only; tls.*, disclosure.banner and limits.liveness speak it
# among the others.
IMAP_CHECKS = {"imap.plaintext-auth", "tls.injection-imap", "limits.imap-literal",
               "limits.imap-line"}
# mailfort's IMAP greeting on 143 (before TLS) and on 993 (inside TLS).
GREETING_143 = "< * OK [CAPABILITY IMAP4rev1 IMAP4rev2 STARTTLS LOGINDISABLED "
GREETING_993 = "< * OK [CAPABILITY IMAP4rev1 IMAP4rev2 AUTH=PLAIN "


async def test_hardened_mailfort_passes_every_check(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext,
    tls_ca: trustme.CA, dns: DNSServer, password_file: Callable[[str], str],
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from mailfort.server.app import Node

    dns.add_mx("example.test", "mx.example.test")
    dns.add_txt("example.test", "v=spf1 mx -all")
    dns.add_txt("_dmarc.example.test", "v=DMARC1; p=reject")
    cafile = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(cafile))
    # A small SIZE keeps the over-size probe fast; a session ends after 5 errors (slowed
    # down after 3, by a little), before the auditor's own fresh start after 8, so the relay
    # probes must reconnect; the rest is the default.
    cfg = config_factory(limits={"max_message_size": 100_000, "max_errors": 5,
                                 "soft_errors": 3, "error_delay": 0.01})
    seed_directory(cfg)
    html = tmp_path / "report.html"
    async with Node(cfg, ssl_context=server_ssl_context) as node:
        ports = {s: node.port(name) for s, name in SERVICES.items()}
        argv = ["127.0.0.1", *port_args(ports), "--domain", "example.test",
                "--user", "alice",
                "--auth-user", "alice@example.test",
                "--auth-password-file", password_file("alice-pw"),
                "--timeout", "3", "--settle", "0.25", "--idle-connections", "10",
                "--resolver", f"127.0.0.1:{dns.port}", "--dnsbl", "bl.test",
                "--cafile", str(cafile), "--json", "--html", str(html)]
        code, out, _ = await asyncio.to_thread(run_audit, capsys, argv)
    report = json.loads(out)
    assert validate(report) == []
    checks = {c["id"]: c for c in report["checks"]}
    not_passed = {k: (c["status"], c["result"]) for k, c in checks.items()
                  if c["status"] != "PASS"}
    assert {k: status for k, (status, _) in not_passed.items()} == \
        {"content.gtube": "WARN"}, not_passed
    assert "no content filter refused it" in not_passed["content.gtube"][1]
    assert code == 0 and report["exit_status"] == 0
    assert len(report["checks"]) >= 26
    # Each IMAP check spoke to mailfort's own IMAP (not a SKIP, not another port's PASS).
    for cid in IMAP_CHECKS:
        assert any(e.startswith(GREETING_143) for e in checks[cid]["evidence"]), cid
    for tag in ("L", "P"):  # LOGIN and AUTHENTICATE, refused before any password
        assert f"< {tag} NO [PRIVACYREQUIRED] Use STARTTLS before logging in" in \
            checks["imap.plaintext-auth"]["evidence"]
    assert "imap, imaps" in checks["tls.starttls"]["result"]
    assert "imap, imaps" in checks["limits.liveness"]["result"]
    assert any(e.startswith(GREETING_993) for e in checks["limits.liveness"]["evidence"])
    assert "< * ID NIL" in checks["disclosure.banner"]["evidence"]
    # ManageSieve (4190): SASL empty and AUTHENTICATE refused before TLS, nothing injected.
    assert '< NO (ENCRYPT-NEEDED) "Use STARTTLS before AUTHENTICATE"' in \
        checks["managesieve.plaintext-auth"]["evidence"]
    assert "managesieve" in checks["tls.injection-managesieve"]["result"]
    assert "managesieve" in checks["tls.starttls"]["result"]
    # The server dropped the session after 5 errors: the relay probes reconnected, went on.
    relay = next(c for c in report["checks"] if c["id"] == "relay.open")
    assert any("reconnect: the server ended the session (< 421" in e
               for e in relay["evidence"])
    # Once: the later sessions end before the limit the server showed (4 senders × 21 forms).
    assert "(1 reconnections)" in relay["result"], "\n".join(relay["evidence"])
    page = html.read_text(encoding="utf-8")
    assert page.count('class="badge PASS"') == 2 * (len(report["checks"]) - 1)
    assert page.count('class="badge WARN"') == 2
