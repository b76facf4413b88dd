"""DKIM signing and verification (RFC 6376, 8301, 8463) with keys from our key store and
their records served by the real loopback DNS server."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from mailfort.policy import dkim
from mailfort.policy.dnslookup import Lookup
from tests.dnsserver import DNSServer

MESSAGE = (b"From: Alice <alice@sign.test>\r\nTo: bob@elsewhere.test\r\n"
           b"Subject: hello\r\nDate: Sat, 28 Nov 2026 12:00:00 +0000\r\n"
           b"Message-ID: <1@sign.test>\r\n\r\nhello there\r\n")


def publish(dns_server: DNSServer, key: dkim.SigningKey) -> None:
    dns_server.add_txt(key.dns_name, key.dns_record())


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_signed_message_verifies_and_tampered_body_fails(
    tmp_path: Path, dns_server: DNSServer, lookup: Lookup, algorithm: str
) -> None:
    key = dkim.KeyStore(tmp_path).generate("sign.test", "s1", algorithm)
    assert stat.S_IMODE(key.path.stat().st_mode) == 0o600
    publish(dns_server, key)
    signed = key.sign(MESSAGE) + MESSAGE
    (r,) = dkim.verify(signed, lookup)
    assert (r.result, r.domain, r.selector) == ("pass", "sign.test", "s1"), r
    assert r.algorithm == ("rsa-sha256" if algorithm == "rsa" else "ed25519-sha256")
    # dkimpy on its own, with the record we told the administrator to publish:
    rec = key.dns_record().encode()
    assert dkimpy.verify(signed, dnsfunc=lambda name, timeout=5: rec)
    tampered = signed.replace(b"hello there", b"hello THERE")
    (bad,) = dkim.verify(tampered, lookup)
    assert bad.result == "fail"


def test_keys_placed_by_the_administrator_sign_as_they_are(
    tmp_path: Path, dns_server: DNSServer, lookup: Lookup
) -> None:
    """Signing hands the file to dkimpy without parsing it here: a PKCS #1 RSA key (as
    older tools write them) signs too, and an Ed25519 key is recognised by its PKCS #8
    form alone."""
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    folder = tmp_path / "dkim" / "sign.test"
    folder.mkdir(parents=True)
    rsa_key = rsa.generate_private_key(65537, 2048)
    (folder / "old.pem").write_bytes(rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ed_pem = ed_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    (folder / "ed.pem").write_bytes(ed_pem)
    seed = ed_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    assert dkim.ed25519_seed(ed_pem) == seed
    assert dkim.ed25519_seed((folder / "old.pem").read_bytes()) is None
    assert dkim.ed25519_seed(b"-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END") is None
    keys = {k.selector: k for k in dkim.KeyStore(tmp_path).keys("sign.test")}
    assert {s: k.algorithm for s, k in keys.items()} == {"old": "rsa", "ed": "ed25519"}
    for key in keys.values():
        publish(dns_server, key)
        (r,) = dkim.verify(key.sign(MESSAGE) + MESSAGE, lookup)
        assert (r.result, r.selector) == ("pass", key.selector), r


def test_rsa_sha1_is_not_accepted(tmp_path: Path, dns_server: DNSServer,
                                  lookup: Lookup) -> None:
    key = dkim.KeyStore(tmp_path).generate("sign.test", "old", "rsa")
    publish(dns_server, key)
    pem = serialization.load_pem_private_key(key.path.read_bytes(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption())
    sig = dkimpy.sign(MESSAGE, b"old", b"sign.test", pem, signature_algorithm=b"rsa-sha1")
    (r,) = dkim.verify(sig + MESSAGE, lookup)
    assert r.result == "policy" and "8301" in r.reason


def test_missing_key_and_dns_failure(tmp_path: Path, dns_server: DNSServer,
                                     lookup: Lookup) -> None:
    key = dkim.KeyStore(tmp_path).generate("sign.test", "s1", "ed25519")
    signed = key.sign(MESSAGE) + MESSAGE
    (r,) = dkim.verify(signed, lookup)  # nothing published
    assert r.result == "permerror"
    dns_server.servfail(key.dns_name)
    (t,) = dkim.verify(signed, Lookup(lookup.cfg))
    assert t.result == "temperror"


def test_unsigned_message_has_no_result(lookup: Lookup) -> None:
    assert dkim.verify(MESSAGE, lookup) == []


def test_key_store_lists_and_never_overwrites(tmp_path: Path) -> None:
    store = dkim.KeyStore(tmp_path)
    a = store.generate("Sign.Test.", "s1", "rsa")
    store.generate("sign.test", "s2", "ed25519")
    store.generate("other.test", "x", "ed25519")
    assert [(k.domain, k.selector, k.algorithm) for k in store.keys("sign.test")] == [
        ("sign.test", "s1", "rsa"), ("sign.test", "s2", "ed25519")]
    assert len(store.keys()) == 3
    with pytest.raises(FileExistsError):
        store.generate("sign.test", "s1", "ed25519")
    assert store.keys("sign.test")[0].dns_record() == a.dns_record()
    assert stat.S_IMODE((tmp_path / "dkim").stat().st_mode) == 0o700
    with pytest.raises(ValueError):
        store.generate("../etc", "s", "rsa")
    with pytest.raises(ValueError):
        store.generate("sign.test", "a/b", "rsa")


def test_a_signature_short_of_the_body_is_not_a_pass(
    tmp_path: Path, dns_server: DNSServer, lookup: Lookup
) -> None:
    """l= (RFC 6376 §3.5) leaves what follows it unsigned: anyone may append there. Such a
    signature is ``policy``, never ``pass`` (issue 24 #6); one that covers the whole body
    (l= present, nothing appended) still passes."""
    key = dkim.KeyStore(tmp_path).generate("sign.test", "s1", "ed25519")
    publish(dns_server, key)
    seed = dkim.ed25519_seed(key.path.read_bytes())
    assert seed is not None
    for canon in (b"relaxed", b"simple"):
        sig = dkimpy.sign(MESSAGE, b"s1", b"sign.test", base64.b64encode(seed),
                          canonicalize=(canon, canon), signature_algorithm=b"ed25519-sha256",
                          length=True, linesep=b"\r\n")
        (whole,) = dkim.verify(sig + MESSAGE, lookup)
        assert whole.result == "pass", whole
        (short,) = dkim.verify(sig + MESSAGE + b"Click here: http://phish.test/\r\n", lookup)
        assert short.result == "policy" and "l=" in short.reason, short
        # Trailing empty lines are not body content to either canonicalization.
        (blank,) = dkim.verify(sig + MESSAGE + b"\r\n\r\n", lookup)
        assert blank.result == "pass", blank


def test_streamed_body_canonicalization_is_dkimpys(lookup: Lookup) -> None:
    """The body hash is ours (fed in pieces, linear time); it must equal what dkimpy's
    canonicalisation gives for the same body, however the pieces fall: white space runs,
    tabs, empty lines inside and at the end, bare CR and LF, a last line without CRLF."""
    import hashlib
    import random

    from dkim.canonicalization import Relaxed, Simple

    rng = random.Random(6376)
    parts = [b" ", b"\t", b"  ", b"\r\n", b"\r\n", b"\r\n\r\n", b"a", b"bc", b"\r", b"\n"]
    for _ in range(3000):
        body = b"".join(rng.choice(parts) for _ in range(rng.randrange(0, 40)))
        whole = dkimpy.rfc822_parse(b"A: b\r\n\r\n" + body)[1]
        for relaxed, theirs in ((False, Simple), (True, Relaxed)):
            want = theirs.canonicalize_body(whole)
            h = hashlib.sha256()
            ours = dkim.BodyCanonicalizer(relaxed, [h])
            at = 0
            while at < len(body):
                step = rng.randrange(1, 7)
                ours.feed(body[at:at + step])
                at += step
            ours.finish()
            assert (h.digest(), ours.length) == (hashlib.sha256(want).digest(), len(want)), (
                relaxed, body)


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("canon", [b"relaxed", b"simple"])
def test_streamed_verification_agrees_with_dkimpy(
    tmp_path: Path, dns_server: DNSServer, lookup: Lookup, canon: bytes
) -> None:
    """verify_streamed (large messages: header section and body pieces) and verify (the
    whole message) give dkimpy's verdict: pass as signed, fail when altered; and l=
    short of the body is policy either way. Also checks our subclass of dkimpy against a
    dkimpy that would change how it checks bh= (see _HashedBody)."""

    rsa_key = dkim.KeyStore(tmp_path).generate("sign.test", "r1", "rsa")
    ed_key = dkim.KeyStore(tmp_path).generate("sign.test", "e1", "ed25519")
    publish(dns_server, rsa_key)
    publish(dns_server, ed_key)
    seed = dkim.ed25519_seed(ed_key.path.read_bytes())
    assert seed is not None
    header, body = MESSAGE.split(b"\r\n\r\n", 1)
    body = (b"a  line\twith  white space \t\r\n\r\n  \r\n" * 300) + body + b"\r\n\r\n"
    message = header + b"\r\n\r\n" + body

    def sign(msg: bytes, length: bool = False) -> bytes:
        return (dkimpy.sign(msg, b"r1", b"sign.test", rsa_key.path.read_bytes(),
                            canonicalize=(canon, canon), length=length)
                + dkimpy.sign(msg, b"e1", b"sign.test", base64.b64encode(seed),
                              signature_algorithm=b"ed25519-sha256", length=length,
                              canonicalize=(canon, canon)))

    def both(sigs: bytes, hdr: bytes, bdy: bytes) -> list[list[str]]:
        whole = [r.result for r in dkim.verify(sigs + hdr + b"\r\n\r\n" + bdy, lookup)]
        for size in (1, 7, 1000, 1 << 20):
            streamed = dkim.verify_streamed(sigs + hdr + b"\r\n", pieces(bdy, size), lookup)
            assert [r.result for r in streamed] == whole, size
        return [whole]

    def theirs(data: bytes) -> bool:
        """dkimpy alone: both signatures verify."""
        records = {k.dns_name: k.dns_record().encode() for k in (rsa_key, ed_key)}
        d = dkimpy.DKIM(data)
        try:
            return all(d.verify(idx=i, dnsfunc=lambda n, timeout=5:
                                records.get(n.decode().rstrip(".")))
                       for i in range(2))
        except dkimpy.DKIMException:
            return False

    sigs = sign(message)
    assert theirs(sigs + message)
    assert both(sigs, header, body) == [["pass", "pass"]]
    altered = body.replace(b"a  line", b"a  lime", 1)
    assert not theirs(sigs + header + b"\r\n\r\n" + altered)
    assert both(sigs, header, altered) == [["fail", "fail"]]
    short = sign(message, length=True)
    assert both(short, header, body) == [["pass", "pass"]]
    assert both(short, header, body + b"appended\r\n") == [["policy", "policy"]]
    # A signature that dkimpy cannot use (l= not a number) fails alone, not the others.
    junk = short.replace(b" l=", b" l=x", 1)
    assert both(junk + sigs, header, body) == [["fail", "pass", "pass", "pass"]]


def test_relaxed_body_hash_takes_linear_time(tmp_path: Path, dns_server: DNSServer,
                                            lookup: Lookup) -> None:
    """dkimpy's relaxed body canonicalisation is quadratic in a run of white space
    (2 MiB of lines of 996 spaces took seconds of CPU, holding the GIL): ours is not."""
    import time

    key = dkim.KeyStore(tmp_path).generate("sign.test", "e1", "ed25519")
    publish(dns_server, key)
    header = MESSAGE.split(b"\r\n\r\n", 1)[0]
    body = (b" " * 996 + b"x\r\n") * 2000
    seed = dkim.ed25519_seed(key.path.read_bytes())
    assert seed is not None
    sig = dkimpy.sign(header + b"\r\n\r\nx\r\n", b"e1", b"sign.test", base64.b64encode(seed),
                      signature_algorithm=b"ed25519-sha256",
                      canonicalize=(b"relaxed", b"relaxed"))
    t0 = time.monotonic()
    (r,) = dkim.verify(sig + header + b"\r\n\r\n" + body, lookup)
    assert r.result == "fail" and "body hash" in r.reason, r
    assert time.monotonic() - t0 < 1.0


def test_signatures_past_the_bound_are_not_verified(
    tmp_path: Path, dns_server: DNSServer, lookup: Lookup
) -> None:
    """A sender cannot make the server check a thousand signatures: past
    ``MAX_SIGNATURES`` each is ``policy``, with no key lookup."""
    key = dkim.KeyStore(tmp_path).generate("sign.test", "s1", "ed25519")
    publish(dns_server, key)
    sig = key.sign(MESSAGE)
    results = dkim.verify(sig * (dkim.MAX_SIGNATURES + 3) + MESSAGE, lookup)
    assert [r.result for r in results] == (
        ["pass"] * dkim.MAX_SIGNATURES + ["policy"] * 3)
    assert "more than 8 signatures" in results[-1].reason


def test_a_signature_field_in_any_case_is_still_verified(
        tmp_path: Path, dns_server: DNSServer, lookup: Lookup) -> None:
    """Unsigned mail skips dkimpy (no DKIM-Signature field: nothing to verify); a field
    name in other letter cases is the same field (RFC 5322 §1.2.2) and is verified."""
    key = dkim.KeyStore(tmp_path).generate("sign.test", "s1", "ed25519")
    publish(dns_server, key)
    signed = key.sign(MESSAGE) + MESSAGE
    assert signed.startswith(b"DKIM-Signature:")
    (r,) = dkim.verify(b"dKiM-sIgNaTuRe:" + signed[len(b"DKIM-Signature:"):], lookup)
    assert r.result == "pass", r
    body_only = MESSAGE.replace(b"hello there", b"DKIM-Signature: in the body, not a field")
    assert dkim.verify(body_only, lookup) == []


_KEYS: dict[str, tuple[bytes, bytes, bytes]] = {}  # alg -> (signing material, record, name)


def _keys() -> dict[str, tuple[bytes, bytes, bytes]]:
    """One RSA-2048 and one Ed25519 key for the cross-check (made once: RSA is slow)."""
    if not _KEYS:
        from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

        r = rsa.generate_private_key(65537, 2048)
        pem = r.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
        der = r.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
        e = ed25519.Ed25519PrivateKey.generate()
        seed = e.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                               serialization.NoEncryption())
        raw = e.public_key().public_bytes(serialization.Encoding.Raw,
                                          serialization.PublicFormat.Raw)
        _KEYS["rsa"] = (pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(der), b"r1")
        _KEYS["ed25519"] = (base64.b64encode(seed),
                            b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw), b"e1")
    return _KEYS


_FIELD_TEXT = st.text(st.sampled_from("aZ \t09;:<>@.-"), max_size=20)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(canon=st.sampled_from([b"simple", b"relaxed"]), hcanon=st.sampled_from([b"simple",
       b"relaxed"]), subject=_FIELD_TEXT, edit=st.integers(0, 9), where=st.integers(0, 10**6),
       text=_FIELD_TEXT)
def test_verification_agrees_with_dkimpy_alone(canon: bytes, hcanon: bytes, subject: str,
                                               edit: int, where: int, text: str) -> None:
    """Our header-hash and RSA steps (cryptography, keys kept; policy/dkim.py says why)
    give dkimpy's own verdict, signature by signature, on signed messages edited in many
    ways: header values, added or removed fields, folding, b= and bh= altered."""
    keys = _keys()
    msg = (b"From: Alice <alice@sign.test>\r\nTo: bob@elsewhere.test\r\n"
           b"Subject: " + subject.encode() + b"\r\nDate: Sat, 28 Nov 2026 12:00:00 +0000\r\n"
           b"\r\nhello  there \r\n")
    sigs = b""
    for alg, (material, _rec, sel) in keys.items():
        sigs += dkimpy.sign(msg, sel, b"sign.test", material, canonicalize=(hcanon, canon),
                            signature_algorithm=b"rsa-sha256" if alg == "rsa"
                            else b"ed25519-sha256", linesep=b"\r\n")
    data = sigs + msg
    t = text.encode()
    if edit == 1:  # a changed octet anywhere
        i = where % len(data)
        data = data[:i] + (t[:1] or b"x") + data[i + 1:]
    elif edit == 2:  # a field added on top or below the others
        data = b"Subject: " + t + b"\r\n" + data if where % 2 else data.replace(
            b"\r\n\r\n", b"\r\nFrom: " + t + b"\r\n\r\n", 1)
    elif edit == 3:  # refolded or re-spaced header
        data = data.replace(b"Subject: ", b"Subject:\r\n " + t.replace(b"\t", b" ") + b" ", 1)
    elif edit == 4:  # a character of a b= changed
        i = data.find(b" b=", where % max(1, len(sigs) - 8)) + 3 + where % 7
        if 3 <= i < len(sigs):
            data = data[:i] + (b"A" if data[i:i + 1] != b"A" else b"B") + data[i + 1:]
    elif edit == 5:  # a field removed
        data = data.replace(b"To: bob@elsewhere.test\r\n", b"", 1)
    elif edit == 6:  # more body
        data += t + b"\r\n"
    elif edit == 7:  # white space, folding or text in a signature's b= (blanked when hashed)
        i = data.find(b" b=", where % max(1, len(sigs) - 8)) + 3 + where % 40
        fold = (b"\r\n\t", b" ", b"\t", b"\r\n ", b"")[where % 5]
        if 3 <= i < len(sigs):
            data = data[:i] + fold + t + data[i:]
    elif edit == 8:  # a signature's tag list altered (a tag doubled, emptied, misspelt)
        tag = (b" h=", b" d=", b" s=", b" bh=", b" a=")[where % 5]
        data = data.replace(tag, (b";" + t + tag, tag + t, tag + b";" + tag)[where % 3], 1)
    records = {f"{sel.decode()}._domainkey.sign.test": rec for _m, rec, sel in keys.values()}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name.decode().rstrip("."))

    class _Lookup:
        def txt(self, name: str, timeout: float | None = None) -> list[str]:
            rec = records.get(name.rstrip("."))
            return [rec.decode()] if rec else []

    try:  # a header section dkimpy cannot parse: the same error both ways (a permerror)
        d = dkimpy.DKIM(data)
    except Exception as exc:
        with pytest.raises(type(exc)):
            dkim.verify(data, _Lookup())  # type: ignore[arg-type]
        return
    ours = [r.result == "pass" for r in dkim.verify(data, _Lookup())]  # type: ignore[arg-type]
    theirs = []
    for i in range(len(ours)):
        try:
            theirs.append(bool(d.verify(idx=i, dnsfunc=dnsfunc)))
        except dkimpy.DKIMException:
            theirs.append(False)
    assert ours == theirs


@settings(max_examples=3000, deadline=None, derandomize=True)
@given(value=st.lists(st.sampled_from([b"b", b"=", b";", b" ", b"\t", b"\r", b"\n", b"\x0b",
                                        b"A", b"z", b"0", b"+", b"/", b"h", b"-"]),
                      max_size=24).map(b"".join))
def test_b_value_is_blanked_as_dkimpy_does(value: bytes) -> None:
    """The regular expression that blanks b= before the header hash (policy/dkim.py's
    ``_blank_b``, linear) removes what dkimpy's RE_BTAG removes, on any field text."""
    assert dkim._blank_b(value) == dkimpy.RE_BTAG.sub(rb"\1", value)


def test_b_value_of_a_real_signature_field_is_blanked_as_dkimpy_does() -> None:
    keys = _keys()
    for alg, (material, _rec, sel) in keys.items():
        sig = dkimpy.sign(MESSAGE, sel, b"sign.test", material, linesep=b"\r\n",
                          signature_algorithm=b"rsa-sha256" if alg == "rsa"
                          else b"ed25519-sha256")
        value = sig.partition(b":")[2]
        for variant in (value, value.replace(b"b=", b"b =\r\n\t"), value.rstrip(b"\r\n")):
            assert dkim._blank_b(variant) == dkimpy.RE_BTAG.sub(rb"\1", variant)


_OCTETS = st.lists(st.sampled_from([b"A", b"b", b":", b" ", b"\t", b"\r", b"\n", b"\r\n",
                                    b"From ", b"\x00", b"~", b"\x7f", b"\xe9", b";", b"  "]),
                   max_size=40).map(b"".join)


def _outcome(fn: object, *args: object) -> object:
    """What ``fn(*args)`` returns, or the type and text of what it raises."""
    try:
        return fn(*args)  # type: ignore[operator]
    except Exception as exc:
        return (type(exc), str(exc))


@settings(max_examples=4000, deadline=None, derandomize=True)
@given(message=_OCTETS)
def test_message_parse_is_dkimpys(message: bytes) -> None:
    """``_rfc822_parse`` (header section only, no line-end expression) gives dkimpy's
    ``rfc822_parse`` header fields and body, and its errors, on any octets: bare CR and LF,
    CR CR LF, continuation lines first, "From " lines, an empty line first or none."""
    want = _outcome(dkimpy.rfc822_parse, message)
    got = _outcome(dkim._rfc822_parse, message)
    assert (tuple(got) if isinstance(got, tuple) and isinstance(got[0], list) else got) == (
        tuple(want) if isinstance(want, tuple) and isinstance(want[0], list) else want)
    import re

    assert dkim._lines(message) == re.split(rb"\r?\n", message)


@settings(max_examples=4000, deadline=None, derandomize=True)
@given(name=_OCTETS, value=_OCTETS)
def test_relaxed_field_is_dkimpys(name: bytes, value: bytes) -> None:
    """One field's relaxed canonical form (``_relaxed_field``, the expressions only when
    needed) is dkimpy's, octet for octet, whatever white space and line ends it holds."""
    from dkim.canonicalization import Relaxed

    assert dkim._relaxed_field(name, value) == Relaxed.canonicalize_headers([(name, value)])[0]


@settings(max_examples=2000, deadline=None, derandomize=True)
@given(names=st.lists(st.sampled_from([b"from", b"From", b"to", b"subject", b"x"]),
                      max_size=8),
       wanted=st.lists(st.sampled_from([b"from", b"to", b"subject", b"cc"]), max_size=8))
def test_selected_fields_are_dkimpys(names: list[bytes], wanted: list[bytes]) -> None:
    """h= selects the fields dkimpy's ``select_headers`` selects (bottom-up, a repeated
    name the next field above, a missing one nothing), in its order."""
    headers = [(n, b"v%d" % i) for i, n in enumerate(names)]
    picked = [headers[i] for i in dkim._selected([n.lower() for n in names], wanted)]
    assert picked == dkimpy.select_headers(headers, wanted)


@settings(max_examples=4000, deadline=None, derandomize=True)
@given(value=st.lists(st.sampled_from([b"a", b"Z", b"b", b"h", b"1", b"_", b"=", b";", b" ",
                                       b"\t", b"\r\n", b"\x0b", b"\xe9", b"b=", b"; "]),
                      max_size=30).map(b"".join))
def test_tag_list_is_read_as_dkimpy_reads_it(value: bytes) -> None:
    """``_tag_value_list`` (no expression per tag) gives dkimpy's ``parse_tag_value``
    dict, or the same error with the same arguments, on any tag list."""
    from dkim.util import parse_tag_value

    def outcome(fn: object) -> object:
        try:
            return fn(value)  # type: ignore[operator]
        except Exception as exc:
            return (type(exc), exc.args)

    assert outcome(dkim._tag_value_list) == outcome(parse_tag_value)


_TAG_VALUES = {
    b"v": [b"1", b"2", b""], b"a": [b"rsa-sha256", b"ed25519-sha256", b"rsa-sha1", b"x"],
    b"b": [b"QUJD", b"QUJDRA==", b"QU JD", b"QUJ", b"Q=U", b"", b"@@@@", b"QUJD\n",
           b"QU\x0bJD", b"QUJ\x0c", b"QUJD\x1c"],
    b"bh": [b"QUJD", b"QUJ", b"", b"QU\tJD", b"QUJ\x0b", b"QUJ\x85"],
    b"d": [b"example.org", b"EXAMPLE.org", b"a;b", b"", b"\xe9x.org", b"org", b"[x]"],
    b"h": [b"from"], b"s": [b"sel"], b"cv": [b"pass", b"x"],
    b"i": [b"@example.org", b"x.example.org", b"example.org", b"a@sub.example.org",
           b"xexample.org", b"", b"@EXAMPLE.ORG"],
    b"l": [b"0", b"12", b"1" * 77, b"x", b"", b"12\n"], b"q": [b"dns/txt", b"dns"],
    b"t": [b"0", b"1700000000", b"99999999999", b"x", b"", b"5\n"],
    b"x": [b"0", b"1", b"99999999999", b"x", b"99999999998"],
}


@settings(max_examples=3000, deadline=None, derandomize=True)
@given(sig=st.fixed_dictionaries({}, optional={k: st.sampled_from(v)
                                               for k, v in _TAG_VALUES.items()}))
def test_signature_fields_are_checked_as_dkimpy_checks_them(sig: dict[bytes, bytes]) -> None:
    """``_validate_fields`` (expressions compiled once) accepts what dkimpy's
    ``validate_signature_fields`` accepts and refuses the rest with the same error and
    text (times far from now on either side, so both read the same clock alike)."""

    def outcome(fn: object) -> object:
        try:
            return fn(dict(sig))  # type: ignore[operator]
        except Exception as exc:
            return (type(exc), str(exc))

    assert outcome(dkim._validate_fields) == outcome(dkimpy.validate_signature_fields)
