"""Small pure pieces of the checks: software names, relay forms, DNSBL names, evidence."""

from __future__ import annotations

import pytest

from mailfort.audit.checks.disclosure import find_software
from mailfort.audit.checks.dnschecks import dnsbl_name
from mailfort.audit.checks.relay import relay_patterns
from mailfort.audit.client import trim
from mailfort.audit.engine import trim_evidence


@pytest.mark.parametrize(("text", "expected"), [
    ("mx.example.test ESMTP ready", (None, None)),
    ("2.1.0 Sender OK", (None, None)),  # an enhanced status code is not a version
    ("mx1.example.test [192.0.2.10] ESMTP", (None, None)),
    ("mailfort.localhost ESMTP ready", (None, None)),  # a host name, not software
    ("mx.exim.example ESMTP", (None, None)),
    ("mail.example.org ESMTP Postfix", ("Postfix", None)),
    ("mail.example.org ESMTP Postfix (Debian/GNU)", ("Postfix", None)),
    ("weak.test ESMTP Exim 4.69 ready", ("Exim", "4.69")),
    ("mx ESMTP Sendmail 8.12.8/8.12.8; Sat", ("Sendmail", "8.12.8")),
    ("Microsoft ESMTP MAIL Service, Version: 10.0.17763.1", ("Microsoft ESMTP", "10.0.17763.1")),
])
def test_find_software(text: str, expected: tuple[str | None, str | None]) -> None:
    assert find_software(text) == expected


def test_relay_patterns_cover_the_classic_forms() -> None:
    forms = [p for p, _ in relay_patterns("local.test", "foreign.test", "[192.0.2.1]")]
    u = "mailfort-audit"
    for expected in (f"<{u}%foreign.test@[192.0.2.1]>", f"<{u}%foreign.test@local.test>",
                     f'<"{u}@foreign.test">', f'<"{u}%foreign.test">',
                     f"<{u}@foreign.test@[192.0.2.1]>", f'<"{u}@foreign.test"@[192.0.2.1]>',
                     f"<@[192.0.2.1]:{u}@foreign.test>", f"<@local.test:{u}@foreign.test>",
                     f"<foreign.test!{u}>", f"<foreign.test!{u}@[192.0.2.1]>",
                     f"<{u}@FOREIGN.TEST>", f"<{u}@foreign.test.>",
                     f"<{u}%foreign.test@LOCAL.TEST>", f"<{u}%foreign.test@local.test.>"):
        assert expected in forms
    assert len(forms) == len(set(forms)) >= 16


def test_dnsbl_names() -> None:
    assert dnsbl_name("192.0.2.10", "bl.test") == "10.2.0.192.bl.test"
    assert dnsbl_name("2001:db8::1", "bl.test").startswith("1.0.0.0.0.0.0.0")
    assert dnsbl_name("2001:db8::1", "bl.test").endswith(".8.b.d.0.1.0.0.2.bl.test")


def test_transcript_lines_are_printable_and_short() -> None:
    assert trim(b"MAIL FROM:<a\x00b>") == "MAIL FROM:<a\\x00b>"
    long = trim(b"A" * 100_000)
    assert len(long) < 200 and "100000 chars" in long


def test_long_evidence_keeps_head_notes_and_tail() -> None:
    lines = [f"> L{i}" for i in range(200)]
    lines[100] = "  [reconnect]"
    out = trim_evidence(lines)
    assert out[:40] == lines[:40] and out[-10:] == lines[-10:]
    assert "  [reconnect]" in out and len(out) < 60
