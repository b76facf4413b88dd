"""DKIM (RFC 6376, 8301, 8463): verify inbound signatures, sign what our users submit.

Signing, key records and the verification's steps are dkimpy's; the body hash is computed
here as the body streams past (``BodyCanonicalizer``), so that a message of any size is
verified, in bounded memory and linear time; an RSA signature is checked by ``cryptography``
(OpenSSL), not dkimpy's pure-Python RSA (``_HashedBody._verify_header_hash`` says why). The
message parse, tag lists, field checks and header canonicalisation on the verifying path
are our equivalents of dkimpy's (the same results and errors, tested against dkimpy's on
any octets): dkimpy's cost ~130 µs more on each signed message the MX takes (RESULTS.md).
This module decides what counts (RFC 8301: no rsa-sha1, RSA keys of 1024 bits at least;
ed25519-sha256 of RFC 8463), turns a DNS failure into ``temperror`` instead of ``fail``,
refuses a pass to a signature whose ``l=`` leaves part of the body unsigned (anyone may
append to such a body: ``policy``, as large providers and M3AAWG advise), and keeps the
signing keys: ``<data_dir>/dkim/<domain>/<selector>.pem`` (mode 0600, PKCS #8), RSA or
Ed25519.
Synchronous (CPU and DNS): run it in a worker thread.

Signing hands the key to dkimpy as it is on disk (it reads PKCS #8 RSA keys; an Ed25519
key is a fixed 16-octet prefix and its seed, RFC 8410 §7), so the serving processes never
load the X.509 library, which only making a key and its DNS record need (tls.py says why).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim as _dkim
import nacl.exceptions
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import DuplicateTag, InvalidTagSpec

from mailfort.policy.dnslookup import DNSTempError, Lookup

RSA_BITS = 2048
# Signed by default (RFC 6376 §5.4.1); From is signed twice so that none can be added.
SIGNED_HEADERS = (
    b"from", b"from", b"reply-to", b"subject", b"date", b"message-id", b"to", b"cc",
    b"mime-version", b"content-type", b"content-transfer-encoding", b"in-reply-to",
    b"references",
)
_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62})(?:\.[a-z0-9](?:[a-z0-9-]{0,62}))*$")
# RFC 8410 §7: an Ed25519 private key in PKCS #8 (DER) is this prefix, then the 32-octet seed.
_ED25519_PKCS8 = bytes.fromhex("302e020100300506032b657004220420")


@dataclass(frozen=True)
class DKIMResult:
    result: str  # pass, fail, neutral, policy, temperror, permerror
    domain: str  # d=
    selector: str  # s=
    algorithm: str  # a=
    reason: str = ""
    header_b: str = ""  # the first 8 characters of b= (RFC 6008), to tell signatures apart


def _tags(value: bytes) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in value.decode("ascii", "replace").split(";"):
        k, sep, v = part.partition("=")
        if sep:
            tags[k.strip().lower()] = "".join(v.split())  # \s removed, as re would
    return tags


class _Reasons:
    """Takes dkimpy's log messages: its ``verify`` answers only True/False, the reason
    why it failed is what it logs."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def debug(self, *args: object, **kw: object) -> None:
        pass

    info = warning = debug

    def error(self, msg: object, *args: object, **kw: object) -> None:
        self.errors.append(str(msg) % args if args else str(msg))


# Each signature costs a key lookup and a hash of up to the whole header section: a sender
# that adds a thousand of them must not buy a thousand. Real mail carries one to three (the
# author's domain, its provider, a list); the first ones are checked, the rest are "policy".
MAX_SIGNATURES = 8


def verify(message: bytes, lookup: Lookup, timeout: float = 5.0) -> list[DKIMResult]:
    """One result per DKIM-Signature of ``message`` (the bytes as the client sent them)."""
    end = message.find(b"\r\n\r\n")
    if b"dkim-signature" not in (message if end < 0 else message[:end]).lower():
        return []  # no field of that name: dkimpy's parse of the message would find none
    reasons = _Reasons()
    d = _HashedBody(message, logger=reasons, minkey=1024, timeout=int(max(1, timeout)))
    d.hash_body([d.body])  # header and body as dkimpy splits them
    return _results(d, reasons, lookup)


def verify_streamed(headers: bytes, body: Iterable[bytes], lookup: Lookup,
                    timeout: float = 5.0) -> list[DKIMResult]:
    """As :func:`verify`, for a message too large to hold in memory: ``headers`` is its
    header section (without the empty line), ``body`` its body in pieces, read once.

    A large message is verified as a small one is, so DMARC can judge it: leaving it
    unverified was a DMARC bypass (a forged From: padded past the size limit)."""
    reasons = _Reasons()
    d = _HashedBody(headers + b"\r\n", logger=reasons, minkey=1024,
                    timeout=int(max(1, timeout)))
    d.hash_body(body)
    return _results(d, reasons, lookup)


def _results(d: _HashedBody, reasons: _Reasons, lookup: Lookup) -> list[DKIMResult]:
    sigs = [v for k, v in d.headers if k.lower() == b"dkim-signature"]
    out: list[DKIMResult] = []
    for idx, raw in enumerate(sigs):
        tags = _tags(raw)
        dom, sel, alg = tags.get("d", "").lower(), tags.get("s", ""), tags.get("a", "").lower()
        b8 = tags.get("b", "")[:8]
        if idx >= MAX_SIGNATURES:
            out.append(DKIMResult("policy", dom, sel, alg,
                                  f"not verified: more than {MAX_SIGNATURES} signatures", b8))
            continue
        if alg == "rsa-sha1":
            out.append(DKIMResult("policy", dom, sel, alg, "rsa-sha1 is not accepted (RFC 8301)",
                                  b8))
            continue
        key_lookup: list[str] = []  # "temp" or "missing", from the DNS callback

        def dnsfunc(name: bytes, timeout: int = 5, _k: list[str] = key_lookup) -> bytes | None:
            try:
                texts = lookup.txt(name.decode("ascii", "replace"), float(timeout))
            except DNSTempError:
                _k.append("temp")
                return None
            if not texts:
                _k.append("missing")
                return None
            return texts[0].encode()

        reasons.errors.clear()
        d.body_checked = False
        try:
            # A pass only through our body hash check: were a later dkimpy to stop calling
            # verify_sig_process, it would be a failure, not a pass without our l= rule.
            ok = d.verify(idx=idx, dnsfunc=dnsfunc) and d.body_checked
        except _PartOfBody as exc:
            out.append(DKIMResult("policy", dom, sel, alg, str(exc), b8))
            continue
        except _dkim.DKIMException as exc:
            ok = False
            reasons.errors.append(str(exc))
        reason = reasons.errors[-1] if reasons.errors else "signature did not verify"
        if ok:
            out.append(DKIMResult("pass", dom, sel, alg, "", b8))
        elif "temp" in key_lookup:
            out.append(DKIMResult("temperror", dom, sel, alg, "key lookup failed", b8))
        elif "missing" in key_lookup:
            out.append(DKIMResult("permerror", dom, sel, alg, "no key published", b8))
        else:
            out.append(DKIMResult("fail", dom, sel, alg, reason, b8))
    return out


class _PartOfBody(_dkim.DKIMException):
    """A signature's ``l=`` stops short of the (streamed) body: never a pass."""

    def __init__(self, octets: int) -> None:
        super().__init__(f"l= leaves {octets} octets of the body unsigned")
        self.octets = octets


def _tag_value_list(value: bytes) -> dict[bytes, bytes]:
    """RFC 6376 §3.2 tag=value list as dkimpy's ``parse_tag_value`` reads it (the same
    dict; InvalidTagSpec for a part without "=" or whose name does not start with an ASCII
    letter, DuplicateTag for a name given twice; a last ";" allowed), without a regular
    expression per tag (~10 µs a signature field)."""
    tags: dict[bytes, bytes] = {}
    parts = value.strip().split(b";")
    if not parts[-1]:
        parts.pop()
    for part in parts:
        name, eq, text = part.partition(b"=")
        name = name.strip()
        if not eq or not name[:1].isalpha():  # bytes.isalpha: ASCII letters only
            raise InvalidTagSpec(part)
        if name in tags:
            raise DuplicateTag(name)
        tags[name] = text.strip()
    return tags


_MANDATORY = (b"v", b"a", b"b", b"bh", b"d", b"h", b"s")
_BASE64ISH = re.compile(rb"[\s0-9A-Za-z+/]+[\s=]*$")
_D_SPECIALS = re.compile(rb"[\(\)<>\[\]:;@\\,]")
_DECIMAL = re.compile(rb"\d+$")
_LENGTH = re.compile(rb"\d{,76}$")
_SLOP = 36000  # dkimpy's leeway for clocks (10 hours)


def _validate_fields(sig: dict[bytes, bytes]) -> None:
    """dkimpy 1.1's ``validate_signature_fields`` for a DKIM-Signature: the same checks in
    the same order, the same ValidationError texts (and the same IndexError for an i= no
    longer than d=), with its expressions compiled once (~10 µs a signature before)."""
    bad = _dkim.ValidationError
    for tag in _MANDATORY:
        if tag not in sig:
            raise bad(f"missing {tag!s}=")
    a, b, d = sig[b"a"], sig[b"b"], sig[b"d"]
    if a not in _dkim.HASH_ALGORITHMS:
        raise bad(f"unknown signature algorithm: {a!s}")
    # bytes.split() splits at the six octets \s stands for in a bytes expression
    if _BASE64ISH.match(b) is None or len(b"".join(b.split())) % 4:
        raise bad(f"b= value is not valid base64 ({b!s})")
    if len(b"".join(sig[b"bh"].split())) % 4:  # (dkimpy matches b= again here: it passed)
        raise bad(f"bh= value is not valid base64 ({sig[b'bh']!s})")
    cv = sig.get(b"cv")
    if cv is not None and cv not in (b"pass", b"fail", b"none"):
        raise bad(f"cv= value is not valid ({cv!s})")
    if d.isascii() and _D_SPECIALS.search(d):
        raise bad(f"d= value is not valid ({d!s})")
    i = sig.get(b"i")
    if i is not None and (not i.lower().endswith(d.lower()) or i[-len(d) - 1] not in (64, 46)):
        raise bad(f"i= domain is not a subdomain of d= (i={i!s} d={d!s})")
    length = sig.get(b"l")
    if length is not None and _LENGTH.match(length) is None:
        raise bad(f"l= value is not a decimal integer ({length!s})")
    q = sig.get(b"q")
    if q is not None and q != b"dns/txt":
        raise bad(f"q= value is not dns/txt ({q!s})")
    t = sig.get(b"t")
    t_sign = None
    if t is not None:
        if _DECIMAL.match(t) is None:
            raise bad(f"t= value is not a decimal integer ({t!s})")
        t_sign = int(t)
        if t_sign > int(time.time()) + _SLOP:
            raise bad(f"t= value is in the future ({t!s})")
    if sig[b"v"] != b"1":
        raise bad(f"v= value is not 1 ({sig[b'v']!s})")
    x = sig.get(b"x")
    if x is not None:
        if _DECIMAL.match(x) is None:
            raise bad(f"x= value is not a decimal integer ({x!s})")
        x_sign = int(x)
        if x_sign < int(time.time()) - _SLOP:
            raise bad(f"x= value is past ({x!s})")
        if t_sign and x_sign < t_sign:
            raise bad(f"x= value is less than t= value (x={x!s} t={t!s})")


_WSP_RUN = re.compile(rb"[ \t]+")
_BARE_EOL = re.compile(rb"\r?\n")
_CRLF_PAIRS_REVERSED = re.compile(rb"(?:\n\r)*")
_H_SEPARATOR = re.compile(rb"\s*:\s*")  # dkimpy's split of h=


class BodyCanonicalizer:
    """RFC 6376 §3.4.3 ("simple") or §3.4.4 ("relaxed") body canonicalisation of a body
    fed in pieces, into hash objects, in bounded memory and linear time.

    Lines end at LF with an optional CR before it, as dkimpy reads them, so that a body
    gives the same digest streamed or whole. What a piece cannot settle yet is held back:
    a CR that may start a CRLF, a run of white space that may end its line (relaxed; held
    as one space), and blank lines, counted, that may turn out to end the body. Pieces are
    worked on with regular expressions and bytes methods, not line by line in Python: a
    body of millions of short lines must cost no more than one of long lines."""

    def __init__(self, relaxed: bool, hashers: Sequence[Any]) -> None:
        self.relaxed = relaxed
        self.hashers = list(hashers)
        self.length = 0  # octets of canonical body so far
        self._held = b""
        self._blank = 0  # blank lines not yet known to be followed by content
        self._in_line = False  # part of the current line is already out
        self._out = False  # anything at all is out

    def feed(self, piece: bytes) -> None:
        data = self._held + piece
        self._held = b""
        nl = data.rfind(b"\n")
        if nl >= 0:
            self._lines(data[: nl + 1])
            data = data[nl + 1:]
        self._partial(data)

    def finish(self) -> None:
        """The end of the body: a last line without CRLF gets one, its white space kept
        (as dkimpy reads it; SMTP always ends a body with CRLF); a simple body that is
        empty is one CRLF, a relaxed one is empty."""
        last, self._held = self._held, b""
        if last or self._in_line:
            self._emit(last + b"\r\n")
        self._in_line = False
        self._blank = 0  # trailing blank lines are no body content
        if not self._out and not self.relaxed:
            self._update(b"\r\n")

    def _lines(self, text: bytes) -> None:
        """Whole lines (``text`` ends with LF)."""
        if text.count(b"\n") != text.count(b"\r\n"):
            text = _BARE_EOL.sub(b"\r\n", text)
        if self.relaxed:  # compress first: each run is matched once (linear time)
            text = _WSP_RUN.sub(b" ", text).replace(b" \r\n", b"\r\n")
        if self._in_line:  # the first line ends the one already begun
            end = text.index(b"\r\n") + 2
            self._emit(text[:end])
            self._in_line = False
            text = text[end:]
        if not text:
            return
        trailing = _trailing_blank_lines(text)
        if len(text) > 2 * trailing:
            self._emit(text[: len(text) - 2 * trailing])
        self._blank += trailing

    def _partial(self, part: bytes) -> None:
        """The beginning of a line whose end has not come yet."""
        if not part:
            return
        if self.relaxed:
            part = _WSP_RUN.sub(b" ", part)
            hold = 2 if part.endswith(b" \r") else 1 if part.endswith((b" ", b"\r")) else 0
        else:
            hold = 1 if part.endswith(b"\r") else 0
        self._held = part[len(part) - hold:] if hold else b""
        if len(part) > hold:
            self._emit(part[: len(part) - hold])
            self._in_line = True

    def _emit(self, data: bytes) -> None:
        while self._blank:  # blank lines followed by content are content
            n = min(self._blank, 1 << 16)
            self._update(b"\r\n" * n)
            self._blank -= n
        self._update(data)

    def _update(self, data: bytes) -> None:
        for h in self.hashers:
            h.update(data)
        self.length += len(data)
        self._out = True


def _trailing_blank_lines(text: bytes) -> int:
    """How many empty lines end ``text`` (CRLF-terminated lines, the first at a line
    start). Read from the end in C: a CRLF is an empty line only when an LF (or the start
    of ``text``) comes before it; else it ends a line with content (a CR is content too)."""
    content = len(text.rstrip(b"\r\n"))
    tail = text[content:][::-1]
    pairs = _CRLF_PAIRS_REVERSED.match(tail).end()  # type: ignore[union-attr]
    before = tail[pairs:pairs + 1] or (text[content - 1:content] if content else b"")
    return pairs // 2 - (1 if before and before != b"\n" else 0)


class _HashedBody(_dkim.DKIM):
    """dkimpy's DKIM object, but the body hashes are ours: computed beforehand, from a
    stream, in linear time; a signature whose ``l=`` is short of the body is ``policy``.

    Why: dkimpy canonicalises the whole body in memory (``self.body``), and its relaxed
    form strips trailing white space with a regular expression that is quadratic in the
    length of a run (10 MiB of lines of 998 spaces and an "x" took 13 s of CPU, holding
    the GIL). Why a subclass and not a copy of dkimpy's verifier: in dkimpy 1.1
    ``DomainSigner.verify_sig_process`` checks ``bh=`` only when the tag dict has ``bh``,
    then hashes the header fields and checks ``b=``. This class checks ``bh=`` against
    its digest and hands dkimpy the tags without ``bh``: the header hash is computed from
    the raw DKIM-Signature field (``hash_headers`` takes ``sig_header``, not the dict), so
    the ``bh=`` checked here is the one ``b=`` signs. Should a later dkimpy hash
    ``self.body`` regardless, that is a second check (the whole body) or fails (streamed:
    empty); should it stop calling this method, ``body_checked`` stays False and
    ``_results`` fails the signature: never a false pass (tests/policy/test_dkim.py also
    compares with dkimpy alone)."""

    def __init__(self, message: bytes, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.body_hashes: dict[tuple[bytes, str], tuple[bytes, int]] = {}
        self.body_checked = False  # bh= of the signature being verified matched ours
        # (header canonicalisation, field index) -> the canonical field: only the fields a
        # signature's h= selects are canonicalised, each once per message (the signatures
        # of one message name mostly the same fields; the DKIM-Signature fields themselves,
        # the longest, are seldom named in h=)
        self._canonical_fields: dict[tuple[bytes, int], tuple[bytes, bytes]] = {}
        self._lower_names = [name.lower() for name, _ in self.headers]
        # DKIM-Signature value -> its tags (or the error), parsed once for the body hashes
        # and the verification (dkimpy parsed each signature again: ~30 µs each)
        self._parsed_tags: dict[bytes, dict[bytes, bytes] | Exception] = {}

    def set_message(self, message: bytes | None) -> None:
        """dkimpy's ``set_message`` with :func:`_rfc822_parse` (the same header fields and
        body, the same errors) in place of its ``rfc822_parse``."""
        super().set_message(None)  # the attributes dkimpy resets for a new message
        if message:
            self.headers, self.body = _rfc822_parse(message)

    def _tag_list(self, value: bytes) -> dict[bytes, bytes]:
        """:func:`_tag_value_list` of ``value``, parsed once (a fresh dict; its errors)."""
        parsed = self._parsed_tags.get(value)
        if parsed is None:
            try:
                parsed = _tag_value_list(value)
            except Exception as exc:
                parsed = exc
            self._parsed_tags[value] = parsed
        if isinstance(parsed, Exception):
            raise parsed
        return dict(parsed)

    def verify_headerprep(self, idx: int = 0) -> Any:
        """dkimpy 1.1's ``verify_headerprep`` (the same checks, in the same order), with
        the signature's tags parsed once per message (``_tag_list``) and checked by
        ``_validate_fields``."""
        sigheaders = [(x, y) for x, y in self.headers if x.lower() == b"dkim-signature"]
        if len(sigheaders) <= idx:
            return False
        try:
            sig = self._tag_list(sigheaders[idx][1])
            self.signature_fields = sig
        except _dkim.InvalidTagValueList as exc:
            raise _dkim.MessageFormatError(exc) from exc
        _validate_fields(sig)
        self.domain = sig[b"d"]
        self.selector = sig[b"s"]
        include_headers = [x.lower() for x in _H_SEPARATOR.split(sig[b"h"])]
        self.include_headers = tuple(include_headers)
        return sig, include_headers, sigheaders

    def hash_body(self, body: Iterable[bytes]) -> None:
        """Canonicalise and hash ``body`` once for every (body canonicalisation, hash)
        that a signature asks for: at most two canonical forms, each hashed once."""
        wanted: dict[bytes, dict[str, Any]] = {}
        for name, value in self.headers:
            if name.lower() != b"dkim-signature":
                continue
            try:
                tags = self._tag_list(value)
                canon = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
                hasher = _dkim.HASH_ALGORITHMS[tags[b"a"]]()
            except Exception:  # dkimpy reports the same fault when it verifies
                continue
            wanted.setdefault(canon.body_algorithm.name, {}).setdefault(hasher.name, hasher)
        canons = [(c, BodyCanonicalizer(c == b"relaxed", list(h.values())), h)
                  for c, h in wanted.items()]
        if not canons:
            return
        for piece in body:
            for _c, canonicalizer, _h in canons:
                canonicalizer.feed(piece)
        for c, canonicalizer, hashers in canons:
            canonicalizer.finish()
            for name, h in hashers.items():
                self.body_hashes[(c, name)] = (h.digest(), canonicalizer.length)

    def verify_sig(self, sig: dict[bytes, bytes], include_headers: list[bytes],
                   sig_header: tuple[bytes, bytes], dnsfunc: Any) -> bool:
        """dkimpy 1.1's ``verify_sig`` (the key record, its errors as dkimpy reports them),
        but the parsed key is kept per (name, record text): dkimpy parsed it again for
        every signature of every message (its ASN.1 reader is Python). The record text
        comes from the Lookup each time, so a changed or expired record is a new entry."""
        name = sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."
        try:
            self.pk, self.keysize, self.ktag, self.seqtlsrpt = _public_key(
                name, dnsfunc(name, timeout=self.timeout))
        except (_dkim.KeyFormatError, binascii.Error) as exc:
            self.logger.error("%s", exc)
            return False
        except _dkim.DnsTimeoutError as exc:
            self.logger.error("DnsTimeoutError: %s", exc)
            return False
        return bool(self.verify_sig_process(sig, include_headers, sig_header, dnsfunc))

    def verify_sig_process(self, sig: dict[bytes, bytes], include_headers: list[bytes],
                           sig_header: tuple[bytes, bytes], dnsfunc: Any) -> bool:
        try:
            canon = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
            digest, length = self.body_hashes[
                (canon.body_algorithm.name, _dkim.HASH_ALGORITHMS[sig[b"a"]]().name)]
            signed = int(sig[b"l"]) if b"l" in sig else length
            bh = base64.b64decode(b"".join(sig[b"bh"].split()), validate=True)
        except (InvalidCanonicalizationPolicyError, KeyError, ValueError) as exc:
            raise _dkim.MessageFormatError(f"signature not usable: {exc!r}") from exc
        if signed < length:
            raise _PartOfBody(length - signed)
        if bh != digest:
            raise _dkim.ValidationError("body hash mismatch")
        self.body_checked = True
        if self.tlsrpt or self.ktag not in (b"rsa", b"ed25519"):
            without_bh = {k: v for k, v in sig.items() if k != b"bh"}
            return bool(super().verify_sig_process(without_bh, include_headers, sig_header,
                                                   dnsfunc))
        return self._verify_header_hash(sig, canon, include_headers, sig_header)

    def _verify_header_hash(self, sig: dict[bytes, bytes], canon: CanonicalizationPolicy,
                            include_headers: list[bytes], sig_header: tuple[bytes, bytes],
                            ) -> bool:
        """dkimpy 1.1's own steps after the body hash (the same hash_headers, the same
        checks, in the same order), with two changes. Why: measured by bench/dkim_micro.py,
        dkimpy's RSA verification is pure Python (``pow`` and a byte-by-byte ``int2str``:
        ~450 µs of the ~900 µs a twice-signed 1 KB message cost), where ``cryptography``
        (OpenSSL) takes ~40 µs; and it canonicalised the whole header section again for
        every signature. So: RSA through ``cryptography``, the public key object kept per
        (modulus, exponent); only the fields ``h=`` selects canonicalised, each once for
        the message (``_canonical_field``). Ed25519 is dkimpy's own call (``nacl``)."""
        if self.seqtlsrpt:  # dkimpy: a tlsrpt-only key does not sign ordinary mail
            raise _dkim.ValidationError("Message is not tlsrpt and Service Type is tlsrpt")
        if b"from" in include_headers:  # dkimpy: an added From: breaks the signature
            include_headers.append(b"from")
        h = _dkim.HASH_ALGORITHMS[sig[b"a"]]()
        relaxed = canon.header_algorithm.name == b"relaxed"  # else simple (c= has no other)
        signed = [self._canonical_field(relaxed, i)
                  for i in _selected(self._lower_names, include_headers)]
        self.signed_headers = _hash_headers(h, relaxed, signed, sig_header)
        signature = base64.b64decode(b"".join(sig[b"b"].split()))
        if self.ktag == b"ed25519":
            try:
                self.pk.verify(h.digest(), signature)
            except nacl.exceptions.BadSignatureError:
                return False
            return True
        ok = _rsa_verify(self.pk, signature, h)
        if ok and self.keysize < self.minkey:
            raise _dkim.KeyFormatError(f"public key too small: {self.keysize}")
        return ok


    def _canonical_field(self, relaxed: bool, i: int) -> tuple[bytes, bytes]:
        """Header field ``i`` in the simple (as received) or relaxed form, kept."""
        if not relaxed:
            return self.headers[i]  # type: ignore[no-any-return]
        hit = self._canonical_fields.get((b"relaxed", i))
        if hit is None:
            name, value = self.headers[i]
            hit = self._canonical_fields[(b"relaxed", i)] = _relaxed_field(name, value)
        return hit

# dkimpy's RE_BTAG, which finds the b= value to blank in the DKIM-Signature field being
# hashed: "b", FWS, "=", then (FWS, a base64 character) repeated, then a final line end.
# Its FWS, (?:(?:\s*\r?\n)?\s+)?, matches exactly the strings \s* does, so the repeated part
# is the longest run of white space and base64 characters that ends in a base64 character:
# the same matches (tests/policy/test_dkim.py compares the two), without trying two nested
# optional groups at each character, which cost ~160 µs on an RSA-2048 field (~18 µs now).
# The match starts at the "b" and looks behind it for the ";" or white space dkimpy's match
# starts with: the engine then scans for a literal (4.4 -> 2.5 µs on an RSA field). That
# character is left in place instead of put back, and no match can have taken it: a match
# ends in "=", a base64 character or the field's last line end.
_B_VALUE = re.compile(rb"b(?<=[;\s]b)(\s*=)(?:[\sa-zA-Z0-9+/=]*[a-zA-Z0-9+/=])?(?:\r?\n\Z)?")


def _blank_b(value: bytes) -> bytes:
    """``value`` (a DKIM-Signature field's) with its b= value removed, as dkimpy's
    ``RE_BTAG.sub(rb"\1", value)`` removes it."""
    return _B_VALUE.sub(rb"b\1", value)


def _hash_headers(hasher: Any, relaxed: bool, signed: list[tuple[bytes, bytes]],
                  sig_header: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    """RFC 6376 §3.7 as dkimpy 1.1's ``hash_headers`` does it: the ``signed`` fields
    (canonical, in the order ``h=`` selected them), then the DKIM-Signature field with an
    empty b= (``_blank_b``) and without its final CRLF, canonicalised as they are; each
    field as name, ":", value. One ``update`` of the joined octets: the same digest."""
    name, value = sig_header[0], _blank_b(sig_header[1])
    if relaxed:
        name, value = _relaxed_field(name, value)
    parts = []
    for n, v in signed:
        parts += (n, b":", v)
    parts += (name, b":", value.rstrip())
    hasher.update(b"".join(parts))
    return signed


def _selected(names: Sequence[bytes], include_headers: Sequence[bytes]) -> list[int]:
    """Which header fields ``h=`` selects (RFC 6376 §5.4.2), as indexes: for each name in
    turn, the last field of that name above the one it selected before (dkimpy's
    ``select_headers``); a name with none left selects nothing. ``names`` lower-case."""
    out: list[int] = []
    last: dict[bytes, int] = {}
    for h in include_headers:
        i = last.get(h, len(names))
        while i > 0:
            i -= 1
            if names[i] == h:
                out.append(i)
                break
        last[h] = i
    return out


_FOLD = re.compile(rb"\r?\n")


def _relaxed_field(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    """RFC 6376 §3.4.2 relaxed canonicalisation of one header field, octet for octet as
    dkimpy's ``Relaxed.canonicalize_headers`` (line ends, an LF with the CR before it if
    any, dropped; runs of space and tab made one space; bytes.strip(); CRLF added); the
    run expression only on a value that has a run to shorten."""
    if b"\n" in value:
        value = value.replace(b"\r\n", b"").replace(b"\n", b"")
    if b"\t" in value or b"  " in value:
        value = _WSP_RUN.sub(b" ", value)
    return name.lower().rstrip(), value.strip() + b"\r\n"


_FIELD_START = re.compile(rb"([\x21-\x7e]+?):")
_EMPTY_LINE_BELOW = re.compile(rb"\n(\r?\n)")  # a line end, then an empty line


def _lines(text: bytes) -> list[bytes]:
    """``re.split(rb"\r?\n", text)`` without the expression (~20 µs on 2 KB: no literal
    to scan for). A separator is an LF with the one CR before it, if any."""
    if text.count(b"\n") == text.count(b"\r\n"):
        return text.split(b"\r\n")
    pieces = text.split(b"\n")
    return [p[:-1] if p.endswith(b"\r") else p for p in pieces[:-1]] + pieces[-1:]


def _rfc822_parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """dkimpy's ``rfc822_parse`` (header fields as [name, value + CRLF], lines ending in
    LF with or without CR; the body after the first empty line, its line ends made CRLF;
    the same MessageFormatError, or IndexError for a continuation line with no field
    above it), without splitting the body into lines or scanning for ``\r?\n`` with a
    regular expression. Why: it ran on every signed message (~30 µs of a 2 KB one)."""
    if message.startswith((b"\n", b"\r\n")):
        head, body = b"", message[message.index(b"\n") + 1:]
    else:
        empty = _EMPTY_LINE_BELOW.search(message)
        head = message if empty is None else message[:empty.start(1)]
        body = b"" if empty is None else message[empty.end(1):]
    if body.count(b"\n") != body.count(b"\r\n"):
        body = _FOLD.sub(b"\r\n", body)
    headers: list[list[bytes]] = []
    for line in _lines(head):
        if not line:
            break
        if line[0] in (0x09, 0x20):
            headers[-1][1] += line + b"\r\n"
            continue
        m = _FIELD_START.match(line)
        if m is not None:
            headers.append([m.group(1), line[m.end():] + b"\r\n"])
        elif not line.startswith(b"From "):
            raise _dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {line!r}")
    return headers, body


# (key name, record text) -> dkimpy's parsed key; bounded, as _RSA_KEYS below.
_PUBLIC_KEYS: OrderedDict[tuple[bytes, bytes], tuple[Any, int, bytes, bool]] = OrderedDict()


def _public_key(name: bytes, record: bytes | str | None) -> tuple[Any, int, bytes, bool]:
    """dkimpy's ``evaluate_pk`` of ``record`` (its errors too), kept per record text."""
    text = record.encode("ascii", "replace") if isinstance(record, str) else record
    if not text:
        return _dkim.evaluate_pk(name, text)  # type: ignore[no-any-return]  # raises
    key = (name.lower(), text)
    with _RSA_KEYS_LOCK:
        hit = _PUBLIC_KEYS.get(key)
        if hit is not None:
            _PUBLIC_KEYS.move_to_end(key)
            return hit
    parsed = tuple(_dkim.evaluate_pk(name, text))
    with _RSA_KEYS_LOCK:
        _PUBLIC_KEYS[key] = parsed  # type: ignore[assignment]
        while len(_PUBLIC_KEYS) > _RSA_KEYS_MAX:
            _PUBLIC_KEYS.popitem(last=False)
    return parsed  # type: ignore[return-value]


# (modulus, exponent) -> the public key object; bounded (a sender may use many keys).
_RSA_KEYS: OrderedDict[tuple[int, int], Any] = OrderedDict()
_RSA_KEYS_MAX = 1024
_RSA_KEYS_LOCK = threading.Lock()


def _rsa_verify(pk: dict[str, int], signature: bytes, h: Any) -> bool:
    """RSASSA-PKCS1-v1_5 (RFC 8017 §8.2.2) of digest ``h`` with dkimpy's parsed key, by
    OpenSSL. The signature is read as dkimpy reads it (an integer; RFC 8017's I2OSP to
    the modulus length); one not below the modulus is invalid (RFC 8017 §5.2.2)."""
    invalid, prehashed, pkcs1, rsa = _openssl()
    n, e = pk["modulus"], pk["publicExponent"]
    algorithm = prehashed.get(h.name)
    s = int.from_bytes(signature, "big")
    if algorithm is None or s >= n:
        return False
    with _RSA_KEYS_LOCK:
        key = _RSA_KEYS.get((n, e))
        if key is not None:
            _RSA_KEYS.move_to_end((n, e))
    if key is None:
        try:
            key = rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError:  # not a usable RSA key (an even modulus, e < 3...)
            return False
        with _RSA_KEYS_LOCK:
            _RSA_KEYS[(n, e)] = key
            while len(_RSA_KEYS) > _RSA_KEYS_MAX:
                _RSA_KEYS.popitem(last=False)
    try:
        key.verify(s.to_bytes((n.bit_length() + 7) // 8, "big"), h.digest(), pkcs1, algorithm)
    except (invalid, ValueError):
        return False
    return True


_OPENSSL_PARTS: tuple[Any, dict[str, Any], Any, Any] | None = None


def _openssl() -> tuple[Any, dict[str, Any], Any, Any]:
    """(InvalidSignature, digest name -> Prehashed algorithm, PKCS #1 v1.5 padding, the rsa
    module) of ``cryptography``, imported at the first RSA signature and kept: the
    imports and the (immutable) parameter objects cost ~4 µs a signature when made each
    time."""
    global _OPENSSL_PARTS
    if _OPENSSL_PARTS is None:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

        _OPENSSL_PARTS = (InvalidSignature, {"sha256": utils.Prehashed(hashes.SHA256()),
                                             "sha1": utils.Prehashed(hashes.SHA1())},
                          padding.PKCS1v15(), rsa)
    return _OPENSSL_PARTS


# ------------------------------------------------------------------ keys and signing


@dataclass(frozen=True)
class SigningKey:
    domain: str
    selector: str
    algorithm: str  # "rsa" or "ed25519"
    path: Path

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def zone_line(self) -> str:
        """The record in zone-file syntax, split into strings of at most 255 octets."""
        rec = self.dns_record()
        parts = " ".join(f'"{rec[i:i + 255]}"' for i in range(0, len(rec), 255))
        return f"{self.dns_name}. 3600 IN TXT {parts}"

    def dns_record(self) -> str:
        """The TXT record to publish at ``dns_name`` (RFC 6376 §3.6.1, RFC 8463 §4.2)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        pub = serialization.load_pem_private_key(self.path.read_bytes(), None).public_key()
        if isinstance(pub, ed25519.Ed25519PublicKey):
            raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
        der = pub.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"

    def sign(self, message: bytes) -> bytes:
        """The DKIM-Signature header line(s), CRLF-terminated, for ``message``."""
        pem = self.path.read_bytes()
        seed = ed25519_seed(pem)
        if seed is not None:
            material, alg = base64.b64encode(seed), b"ed25519-sha256"
        else:
            material, alg = pem, b"rsa-sha256"
        sig = _dkim.sign(
            message, self.selector.encode(), self.domain.encode(), material,
            canonicalize=(b"relaxed", b"relaxed"), signature_algorithm=alg,
            include_headers=list(SIGNED_HEADERS), linesep=b"\r\n",
        )
        return bytes(sig)


def ed25519_seed(pem: bytes) -> bytes | None:
    """The seed of an Ed25519 private key in PKCS #8 PEM; None for any other key."""
    body = b"".join(line.strip() for line in pem.splitlines()
                    if line.strip() and not line.startswith(b"-----"))
    try:
        der = base64.b64decode(body, validate=True)
    except ValueError:
        return None
    if len(der) == len(_ED25519_PKCS8) + 32 and der.startswith(_ED25519_PKCS8):
        return der[len(_ED25519_PKCS8):]
    return None


class KeyStore:
    """The signing keys under ``<data_dir>/dkim``."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "dkim"

    def generate(self, domain: str, selector: str, algorithm: str) -> SigningKey:
        domain, selector = domain.lower().rstrip("."), selector.lower()
        if not _NAME.match(domain) or "." not in domain:
            raise ValueError(f"not a domain name: {domain!r}")
        if not _NAME.match(selector):
            raise ValueError(f"not a selector (letters, digits, '-', '.'): {selector!r}")
        if algorithm not in ("rsa", "ed25519"):
            raise ValueError("algorithm: rsa or ed25519")
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

        key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = (
            rsa.generate_private_key(65537, RSA_BITS) if algorithm == "rsa"
            else ed25519.Ed25519PrivateKey.generate()
        )
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        self.root.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.mkdir(mode=0o700, exist_ok=True)
        folder = self.root / domain
        folder.mkdir(mode=0o700, exist_ok=True)
        path = folder / f"{selector}.pem"
        # O_EXCL: never overwrite a key whose record may be published; 0600 from the start.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        return SigningKey(domain, selector, algorithm, path)

    def has_keys(self, domain: str) -> bool:
        """Whether ``domain`` has a key, without reading any (one directory listing)."""
        try:
            with os.scandir(self.root / domain.lower().rstrip(".")) as entries:
                return any(e.name.endswith(".pem") for e in entries)
        except OSError:  # no folder (or no key store): no key
            return False

    def keys(self, domain: str | None = None) -> list[SigningKey]:
        if not self.root.is_dir():
            return []
        folders = [self.root / domain.lower().rstrip(".")] if domain else sorted(
            self.root.iterdir())
        out = []
        for folder in folders:
            if not folder.is_dir():
                continue
            for path in sorted(folder.glob("*.pem")):
                alg = "rsa" if ed25519_seed(path.read_bytes()) is None else "ed25519"
                out.append(SigningKey(folder.name, path.stem, alg, path))
        return out
