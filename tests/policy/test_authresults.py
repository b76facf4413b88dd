"""The Authentication-Results field (RFC 8601): ours, and forgeries of ours removed."""

from __future__ import annotations

from mailfort.policy import authresults
from mailfort.policy.dkim import DKIMResult
from mailfort.policy.dmarc import DMARCResult
from mailfort.policy.spf import SPFResult


def test_format() -> None:
    field = authresults.format_field(
        "mx.example.test",
        [SPFResult("none", "helo", "client.test", "no record"),
         SPFResult("pass", "mailfrom", "s.test")],
        [DKIMResult("fail", "s.test", "sel", "rsa-sha256", "body hash (mismatch)", "AbCdEfGh")],
        DMARCResult("fail", "s.test", "reject", "reject"),
        "a b@s.test",
    ).decode()
    assert field.startswith("Authentication-Results: mx.example.test;\r\n\t")
    assert field.endswith("\r\n") and "\n\r\n" not in field
    assert "spf=none (no record) smtp.helo=client.test" in field
    assert 'spf=pass smtp.mailfrom="a b@s.test"' in field
    assert ("dkim=fail (body hash \\(mismatch\\)) header.d=s.test header.s=sel "
            "header.a=rsa-sha256 header.b=AbCdEfGh") in field
    assert "dmarc=fail (p=reject dis=reject) header.from=s.test" in field
    unsigned = authresults.format_field("mx.example.test", [], [], None, "").decode()
    assert "dkim=none" in unsigned


def test_authserv_id() -> None:
    assert authresults.authserv_id(b" MX.Example.Test; spf=pass") == "mx.example.test"
    assert authresults.authserv_id(b" (a (nested) comment) mx.example.test 1; none") == \
        "mx.example.test"
    assert authresults.authserv_id(b' "mx.example.test"; none') == "mx.example.test"


def test_strip_ours_keeps_others_and_folding() -> None:
    block = (b"Received: from x\r\n"
             b"Authentication-Results: mx.example.test; dkim=pass header.d=bank.test\r\n"
             b"authentication-results:\r\n\t(forged) MX.EXAMPLE.TEST.;\r\n\tdmarc=pass\r\n"
             b"Authentication-Results: mx.other.test; spf=pass\r\n"
             b"Subject: hi\r\n")
    out, removed = authresults.strip_ours(block, "mx.example.test")
    assert removed == 2
    assert out == (b"Received: from x\r\nAuthentication-Results: mx.other.test; spf=pass\r\n"
                   b"Subject: hi\r\n")
    assert authresults.strip_ours(b"Subject: x\r\n", "mx.example.test") == (b"Subject: x\r\n", 0)


def test_authserv_id_reads_comments_with_quoted_pairs() -> None:
    """RFC 5322 §3.2.2: ``\\(`` inside a comment does not open another (issue 24 #5b)."""
    assert authresults.authserv_id(rb" (\() mx.example.test; dkim=pass") == "mx.example.test"
    assert authresults.authserv_id(rb" (a (b \) c) d) mx.example.test; x") == "mx.example.test"
    assert authresults.authserv_id(rb" (\) mx.example.test; ) other.test; x") == "other.test"
    assert authresults.authserv_id(b" (a\r\n\t(b)) Folded.Test\r\n\t; x") == "folded.test"
    for doubtful in (b" (unterminated mx.example.test; x", b' "mx.example.test; x', b"",
                     b" ; spf=pass", b' mx.example.test"x"; none', b" (only a comment)"):
        assert authresults.authserv_id(doubtful) is None, doubtful


def test_claims_when_any_reader_could_see_our_host() -> None:
    host = "mx.example.test"
    for value in (rb" (\() mx.example.test; dkim=pass",  # a correct reader
                  rb" (\) mx.example.test; ) other.test; dmarc=pass",  # a naive one
                  b" (unterminated; dmarc=pass",  # nobody can tell
                  b" MX.EXAMPLE.TEST.; dmarc=pass", b' "mx.example.test" 1; none'):
        assert authresults.claims(value, host), value
    for value in (b" mx.elsewhere.test; spf=pass",
                  b" other.test; spf=pass smtp.helo=" + host.encode(),
                  b" mx.example.test.evil; dmarc=pass", b" evil-mx.example.test; dkim=pass"):
        assert not authresults.claims(value, host), value


def test_strip_ours_removes_forgeries_anywhere_and_obsolete_names() -> None:
    pad = b"".join(b"X-Pad: %d\r\n" % i for i in range(5000))
    block = (b"Subject: hi\r\n" + pad
             + b"Authentication-Results : mx.example.test; dmarc=pass\r\n"
             + b"Authentication-Results: (\\() mx.example.test;\r\n dkim=pass\r\n"
             + b"X-Last: 1\r\n")
    out, removed = authresults.strip_ours(block, "mx.example.test")
    assert removed == 2 and out == b"Subject: hi\r\n" + pad + b"X-Last: 1\r\n"


def test_strip_ours_reads_field_names_as_the_shared_reader_does() -> None:
    block = (b"Authentication-Results\x00 : mx.example.test; dmarc=pass\r\n"
             b"X-Authentication-Results: mx.example.test; kept\r\n")
    out, removed = authresults.strip_ours(block, "mx.example.test")
    assert removed == 1 and out == b"X-Authentication-Results: mx.example.test; kept\r\n"


def test_strip_ours_finds_names_broken_up_by_ignored_bytes() -> None:
    """The quick test for "no such field here" must not miss a name that the field reader
    takes for Authentication-Results once it drops control bytes and white space."""
    for name in (b"Authentication-Results", b"AUTHENTICATION-RESULTS",
                 b"Authentication\x00-Res\x7fults", b"A\tuthentication-Results \x1f",
                 b"\x01Authentication-Results\x00\x00"):
        block = b"Subject: hi\r\n" + name + b": mx.example.test; dmarc=pass\r\nX: 1\r\n"
        assert authresults.strip_ours(block, "mx.example.test") == (
            b"Subject: hi\r\nX: 1\r\n", 1), name
    plain = b"Subject: hi\r\nX-Authentication: mx.example.test\r\n\tfolded\r\n"
    assert authresults.strip_ours(plain, "mx.example.test") == (plain, 0)
