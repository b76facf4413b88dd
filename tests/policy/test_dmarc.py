"""DMARC (RFC 7489): records, the organisational domain, alignment and the policy."""

from __future__ import annotations

from mailfort.policy import dmarc
from mailfort.policy.dkim import DKIMResult
from mailfort.policy.dnslookup import Lookup
from mailfort.policy.spf import SPFResult
from tests.dnsserver import DNSServer


def test_organizational_domain_from_the_public_suffix_list() -> None:
    assert dmarc.organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert dmarc.organizational_domain("a.b.example.com") == "example.com"
    assert dmarc.organizational_domain("news.bbc.co.uk") == "bbc.co.uk"
    assert dmarc.organizational_domain("x.example.test") == "example.test"


def test_alignment() -> None:
    assert dmarc.aligned("mail.example.com", "example.com", "r")
    assert not dmarc.aligned("mail.example.com", "example.com", "s")
    assert dmarc.aligned("Example.COM.", "example.com", "s")
    # Two registrations under one public suffix are not aligned, even relaxed.
    assert not dmarc.aligned("attacker.co.uk", "bank.co.uk", "r")


def test_parse_record() -> None:
    r = dmarc.parse_record("v=DMARC1; p=reject; sp=none; adkim=s; pct=50; rua=mailto:x@y")
    assert r == dmarc.Record("reject", "none", "s", "r", 50)
    assert dmarc.parse_record("v=DMARC1; p=quarantine") == dmarc.Record("quarantine",
                                                                        "quarantine")
    assert dmarc.parse_record("p=reject; v=DMARC1") is None  # v= must come first
    assert dmarc.parse_record("v=DMARC1; p=bogus") is None
    assert dmarc.parse_record("v=DMARC1; p=bogus; rua=mailto:a@b").p == "none"


def _spf(domain: str, result: str = "pass") -> SPFResult:
    return SPFResult(result, "mailfrom", domain)


def _dkim(domain: str, result: str = "pass") -> DKIMResult:
    return DKIMResult(result, domain, "s", "rsa-sha256")


def test_evaluate(dns_server: DNSServer, lookup: Lookup) -> None:
    dns_server.add_txt("_dmarc.strict.test", "v=DMARC1; p=reject")
    dns_server.add_txt("_dmarc.q.test", "v=DMARC1; p=quarantine; sp=reject")
    dns_server.add_txt("_dmarc.aspf.test", "v=DMARC1; p=reject; aspf=s")

    def ev(frm: str, spf: SPFResult | None, dkims: list[DKIMResult]) -> dmarc.DMARCResult:
        return dmarc.evaluate(lookup, [frm], spf, dkims)

    ok = ev("strict.test", _spf("bounce.strict.test"), [])
    assert (ok.result, ok.disposition) == ("pass", "none")
    assert ev("strict.test", None, [_dkim("mail.strict.test")]).result == "pass"
    # Unaligned passes do not count.
    bad = ev("strict.test", _spf("other.test"), [_dkim("other.test")])
    assert (bad.result, bad.policy, bad.disposition) == ("fail", "reject", "reject")
    assert ev("strict.test", _spf("strict.test", "fail"), [_dkim("strict.test", "fail")]
              ).disposition == "reject"
    assert ev("q.test", None, []).disposition == "quarantine"
    # A subdomain without its own record: the organisational domain's sp= applies.
    sub = ev("news.q.test", None, [])
    assert (sub.result, sub.disposition) == ("fail", "reject")
    assert ev("aspf.test", _spf("mail.aspf.test"), []).result == "fail"
    assert ev("none.test", _spf("x.test", "fail"), []).result == "none"
    # A check that could not be made is not a failure.
    t = ev("strict.test", _spf("other.test"), [_dkim("strict.test", "temperror")])
    assert (t.result, t.disposition) == ("temperror", "none")


def test_dns_failure_and_pct(dns_server: DNSServer, lookup: Lookup) -> None:
    dns_server.servfail("_dmarc.broken.test")
    r = dmarc.evaluate(lookup, ["broken.test"], None, [])
    assert (r.result, r.disposition) == ("temperror", "none")
    dns_server.add_txt("_dmarc.half.test", "v=DMARC1; p=reject; pct=50")
    inside = dmarc.evaluate(lookup, ["half.test"], None, [], rand=lambda: 0.1)
    outside = dmarc.evaluate(lookup, ["half.test"], None, [], rand=lambda: 0.9)
    assert (inside.disposition, outside.disposition) == ("reject", "quarantine")


def test_several_from_domains_take_the_strictest(dns_server: DNSServer,
                                                 lookup: Lookup) -> None:
    dns_server.add_txt("_dmarc.strict.test", "v=DMARC1; p=reject")
    frm = dmarc.from_domains(b"From: a@open.test, b@strict.test\r\nTo: x@y.test\r\n")
    assert frm == ["open.test", "strict.test"]
    assert dmarc.evaluate(lookup, frm, _spf("open.test"), []).disposition == "reject"
    assert dmarc.from_domains(b"From: a@x.test\r\nFrom: b@y.test\r\n") is None
    assert dmarc.from_domains(b"To: a@x.test\r\n") is None
    assert dmarc.from_domains(b"From: \"Folded\"\r\n <a@Folded.TEST>\r\n") == ["folded.test"]


def test_only_aligned_temporary_errors_count(dns_server: DNSServer, lookup: Lookup) -> None:
    """RFC 7489 §4.2: an identifier not aligned with From: does not count, whatever its
    result; issue 24 #3 (a junk signature of evil.test whose key lookup fails)."""
    dns_server.add_txt("_dmarc.bank.test", "v=DMARC1; p=reject; adkim=s")

    def ev(spf: SPFResult | None, dkims: list[DKIMResult]) -> dmarc.DMARCResult:
        return dmarc.evaluate(lookup, ["bank.test"], spf, dkims)

    for spf, dkims in ((None, [_dkim("evil.test", "temperror")]),
                       (_spf("evil2.test", "temperror"), []),
                       (None, [_dkim("mail.bank.test", "temperror")])):  # adkim=s
        r = ev(spf, dkims)
        assert (r.result, r.disposition) == ("fail", "reject"), (spf, dkims)
    for spf, dkims in ((None, [_dkim("bank.test", "temperror"), _dkim("evil.test", "pass")]),
                       (_spf("mail.bank.test", "temperror"), [])):  # aspf=r
        r = ev(spf, dkims)
        assert (r.result, r.policy, r.disposition) == ("temperror", "reject", "none")
    # An aligned pass wins over an aligned temporary error.
    assert ev(_spf("bank.test"), [_dkim("bank.test", "temperror")]).result == "pass"


def test_from_fields_read_as_every_reader_reads_them() -> None:
    """The DMARC domain comes from the shared tolerant reader: ``From :`` counts."""
    assert dmarc.from_domains(b"From : ceo@bank.test\r\nFrom: a@x.test\r\n") is None
    assert dmarc.author_domain(b"From : CEO <ceo@Bank.Test.>\r\n") == "bank.test"
    for block in (b"From: <ceo@bank.test>, undisclosed:;\r\n", b"From: a@x.test, b@y.test\r\n",
                  b"From: undisclosed:;\r\n", b"To: a@x.test\r\n", b"From: Bob\r\n",
                  b"From: a@x.test\r\nfrom\t: b@y.test\r\n"):
        assert dmarc.author_domain(block) is None, block
    assert dmarc.has_from(b"From: Bob\r\n") and not dmarc.has_from(b"To: a@x.test\r\n")
    assert dmarc.author_domain(b'From: "ceo@bank.test" <e@Evil.test>\r\n') == "evil.test"
