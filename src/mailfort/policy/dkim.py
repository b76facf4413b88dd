"""DKIM (RFC 6376, 8301, 8463): verify inbound signatures, sign what our users submit.

Verification and signing are dkimpy's; this module decides what counts (RFC 8301: no
rsa-sha1, RSA keys of 1024 bits at least; ed25519-sha256 of RFC 8463 accepted), turns a
DNS failure into ``temperror`` instead of ``fail``, refuses a pass to a signature whose
``l=`` leaves part of the body unsigned (anyone may append to such a body: ``policy``, as
large providers and M3AAWG advise), and keeps the signing keys:
``<data_dir>/dkim/<domain>/<selector>.pem`` (mode 0600, PKCS #8), RSA or Ed25519.
Synchronous (CPU and DNS): run it in a worker thread.

Signing hands the key to dkimpy as it is on disk (it reads PKCS #8 RSA keys; an Ed25519
key is a fixed 16-octet prefix and its seed, RFC 8410 §7), so the serving processes never
load the X.509 library, which only making a key and its DNS record need (tls.py says why).
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass
from pathlib import Path

import dkim as _dkim
from dkim.canonicalization import CanonicalizationPolicy

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
            tags[k.strip().lower()] = re.sub(r"\s+", "", v)
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


def verify(message: bytes, lookup: Lookup, timeout: float = 5.0) -> list[DKIMResult]:
    """One result per DKIM-Signature of ``message`` (the bytes as the client sent them)."""
    reasons = _Reasons()
    d = _dkim.DKIM(message, logger=reasons, minkey=1024, timeout=int(max(1, timeout)))
    sigs = [v for k, v in d.headers if k.lower() == b"dkim-signature"]
    out: list[DKIMResult] = []
    for idx, raw in enumerate(sigs):
        tags = _tags(raw)
        dom, sel, alg = tags.get("d", "").lower(), tags.get("s", ""), tags.get("a", "").lower()
        b8 = tags.get("b", "")[:8]
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
        try:
            ok = d.verify(idx=idx, dnsfunc=dnsfunc)
        except _dkim.DKIMException as exc:
            ok = False
            reasons.errors.append(str(exc))
        reason = reasons.errors[-1] if reasons.errors else "signature did not verify"
        unsigned = _unsigned_tail(d) if ok else 0
        if ok and unsigned:
            out.append(DKIMResult("policy", dom, sel, alg,
                                  f"l= leaves {unsigned} octets of the body unsigned", b8))
        elif ok:
            out.append(DKIMResult("pass", dom, sel, alg, "", b8))
        elif "temp" in key_lookup:
            out.append(DKIMResult("temperror", dom, sel, alg, "key lookup failed", b8))
        elif "missing" in key_lookup:
            out.append(DKIMResult("permerror", dom, sel, alg, "no key published", b8))
        else:
            out.append(DKIMResult("fail", dom, sel, alg, reason, b8))
    return out


def _unsigned_tail(d: _dkim.DKIM) -> int:
    """How many octets of the canonical body the signature just verified leaves out of
    its ``l=`` (RFC 6376 §3.5, §8.2); 0 when it signs the whole body."""
    sig = d.signature_fields
    if b"l" not in sig:
        return 0
    canon = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
    return max(0, len(canon.canonicalize_body(d.body)) - int(sig[b"l"]))


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
