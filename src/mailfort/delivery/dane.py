"""DANE for SMTP (RFC 7672): TLSA records of an MX host and matching a server's certificates.

DNSSEC is not validated here: the answer is trusted only when the configured resolver (a
validating one) sets the AD flag, and that resolver must be reached over a path nobody
else can write to (loopback). Without AD the records are ignored, as if there were none.

Usable records (RFC 7672 §3.1.3, RFC 7218 names): DANE-TA(2) and DANE-EE(3), selector
Cert(0) or SPKI(1), matching Full(0), SHA2-256(1) or SHA2-512(2). PKIX-TA(0)/PKIX-EE(1) and
unknown parameters are unusable; a TLSA RRset with only unusable records is treated as
"TLS required, nothing to authenticate with" (encrypt), per RFC 7672 §2.2.

The X.509 library is imported by the functions that look into certificates, not with the
module: only a delivery to a host with usable TLSA records needs it (tls.py says why).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.resolver

if TYPE_CHECKING:
    from cryptography import x509

DANE_TA = 2
DANE_EE = 3
INDETERMINATE = 256  # not a real usage: marks a host whose TLSA lookup failed


@dataclass(frozen=True)
class TLSA:
    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        return self.usage in (DANE_TA, DANE_EE) and self.selector in (0, 1) \
            and self.mtype in (0, 1, 2)


class DANELookupError(Exception):
    """The TLSA lookup failed (not "no records"): delivery to this host must wait."""


async def tlsa_for(resolver: dns.asyncresolver.Resolver, host: str,
                   port: int = 25) -> tuple[TLSA, ...]:
    """Authenticated (AD) TLSA records of ``_PORT._tcp.HOST``; () when none or unsigned."""
    name = f"_{port}._tcp.{host.rstrip('.')}"
    try:
        answer = await resolver.resolve(name, "TLSA", search=False, raise_on_no_answer=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return ()
    except dns.exception.DNSException as exc:  # SERVFAIL, timeout, malformed answer
        raise DANELookupError(f"TLSA lookup of {name} failed: {exc}") from None
    if answer.rrset is None or not answer.response.flags & dns.flags.AD:
        return ()
    return tuple(TLSA(int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert))
                 for r in answer.rrset)


def _selected(der: bytes, selector: int) -> bytes:
    if selector == 0:
        return der
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_der_x509_certificate(der)
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def matches(record: TLSA, der: bytes) -> bool:
    """Whether one certificate (DER) matches one record's selector and matching type."""
    try:
        return _digest(_selected(der, record.selector), record.mtype) == record.data
    except ValueError:
        return False


def _names(cert: x509.Certificate) -> list[str]:
    from cryptography import x509

    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return [n.lower() for n in ext.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        return [a.value.lower() for a in  # type: ignore[union-attr]
                cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]


def name_ok(cert: x509.Certificate, host: str) -> bool:
    """RFC 7672 §3.2.3: the MX host name among the DNS names (wildcard in one label)."""
    h = host.lower().rstrip(".")
    for n in _names(cert):
        n = n.rstrip(".")
        if n == h:
            return True
        if n.startswith("*.") and "." in h and h.split(".", 1)[1] == n[2:]:
            return True
    return False


def authenticate(records: tuple[TLSA, ...], chain: list[bytes], host: str) -> str | None:
    """None when ``chain`` (leaf first, DER, as presented) satisfies a usable record,
    else the reason. DANE-EE: the leaf matches, no name or expiry check (§3.1.1).
    DANE-TA: a presented certificate matches, every certificate below it is signed by
    the next one, and the leaf names ``host`` (§3.1.2, §3.2.3)."""
    usable = [r for r in records if r.usable]
    if not usable:
        return "no usable TLSA records"
    if not chain:
        return "no certificate presented"
    for r in usable:
        if r.usage == DANE_EE and matches(r, chain[0]):
            return None
    from cryptography import x509

    certs = [x509.load_der_x509_certificate(d) for d in chain]
    for r in usable:
        if r.usage != DANE_TA:
            continue
        for i, der in enumerate(chain):
            if not matches(r, der):
                continue
            try:
                for j in range(i):
                    certs[j].verify_directly_issued_by(certs[j + 1])
            except (ValueError, TypeError, Exception):  # signature or algorithm mismatch
                continue
            if name_ok(certs[0], host):
                return None
            return f"certificate does not name {host}"
    return "no TLSA record matches the certificate chain"


def presented_chain(ssl_object: object) -> list[bytes]:
    """The chain the server sent (leaf first), DER; just the leaf where unavailable."""
    import ssl

    inner = getattr(ssl_object, "_sslobj", None)
    getter = getattr(ssl_object, "get_unverified_chain", None) or \
        getattr(inner, "get_unverified_chain", None)
    if getter is not None:
        try:
            certs = getter() or []
            out = []
            for c in certs:
                if isinstance(c, bytes):
                    out.append(c)
                else:
                    out.append(c.public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore[attr-defined]
            if out:
                return out
        except (ValueError, AttributeError, ssl.SSLError):
            pass
    leaf = ssl_object.getpeercert(binary_form=True)  # type: ignore[attr-defined]
    return [leaf] if leaf else []
