"""Server TLS: a certificate that always exists, and a context with only modern settings.

Without a configured certificate mailfort makes a self-signed one on first start, so TLS
is never "off because nobody set it up"; it is kept (and reused) in ``<data_dir>/tls/``,
and made again only when it expires soon or no longer names ``server.hostname``.

What the node needs to know of that certificate (its names and expiry, at every start and
reload; a description for ``mailfort status``) is parsed once, when it is made, and kept
beside it in ``cert.pem.json`` with the certificate's SHA-256: a serving process reads the
record and never loads the X.509 parser (cryptography adds ~15 MB to a process, counted in
every node's memory). A record that does not match the file is ignored and the file parsed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
import ssl
from pathlib import Path
from typing import Any

from mailfort.config import Config, ConfigError

log = logging.getLogger("mailfort")

CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"
VALIDITY_DAYS = 825
RENEW_BEFORE = dt.timedelta(days=30)
# TLS 1.2 suites: forward secret AEAD only. TLS 1.3 suites are all good and fixed by OpenSSL.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!SHA1"


def _names(cfg: Config) -> list[str]:
    names = [cfg.server.hostname, "localhost"]
    return list(dict.fromkeys(n.lower() for n in names))


def _usable(cert_path: Path, key_path: Path, cfg: Config) -> bool:
    """The generated certificate exists, is valid for a while and names our host."""
    if not cert_path.is_file() or not key_path.is_file():
        return False
    try:
        facts = certificate_facts(cert_path, record=True)
        after = dt.datetime.fromisoformat(facts["not_after"])
        names = set(facts["dns_names"])
    except (OSError, ValueError, KeyError, TypeError, ImportError):
        return False  # no certificate, a bad record, or none and no X.509 library to read it
    return after - RENEW_BEFORE >= dt.datetime.now(dt.UTC) and set(_names(cfg)) <= names


def acme_paths(cfg: Config) -> tuple[Path, Path]:
    """(certificate chain, key) that acmecert.py obtains into ``<data_dir>/acme/``: named
    here, below acmecert, because loading a certificate must not need the ACME client."""
    d = cfg.data_path / "acme"
    return d / CERT_NAME, d / KEY_NAME


def record_path(cert_path: Path) -> Path:
    return cert_path.with_name(cert_path.name + ".json")


def certificate_facts(path: Path, *, record: bool = False) -> dict[str, Any]:
    """Subject, names, issuer and validity of the first certificate in a PEM file.

    From the record beside the file when its digest is the file's; otherwise parsed
    (ValueError if there is no certificate) and, with ``record``, recorded for next time.
    """
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    rec = record_path(path)
    with contextlib.suppress(OSError, ValueError):
        facts = json.loads(rec.read_bytes())
        if isinstance(facts, dict) and facts.get("sha256") == digest:
            return facts
    facts = _parse_certificate(data)
    facts["sha256"] = digest
    if record:
        with contextlib.suppress(OSError):  # then parsed again next time; nothing worse
            _write_private(rec, json.dumps(facts, indent=1).encode(), 0o644)
    return facts


def _parse_certificate(pem: bytes) -> dict[str, Any]:
    # Imported here, not with the module: see the module's docstring.
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        ips = [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        dns_names, ips = [], []
    return {
        "subject": cert.subject.rfc4514_string(),
        "dns_names": dns_names,
        "ip_addresses": ips,
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "self_signed": cert.issuer == cert.subject,
    }


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write atomically (tmp + fsync + rename) with ``mode`` from the first byte."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# A self-signed certificate made in memory: (key PEM, certificate PEM, its facts).
Made = tuple[bytes, bytes, dict[str, Any]]


def make_self_signed(cfg: Config) -> Made:
    """An EC P-256 self-signed certificate for hostname, localhost and 127.0.0.1, made in
    memory (no file is touched: a process about to drop privileges makes it as root, where
    the X.509 library can still be read, and writes it after the drop)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cfg.server.hostname)])
    now = dt.datetime.now(dt.UTC)
    san = x509.SubjectAlternativeName(
        [x509.DNSName(n) for n in _names(cfg)]
        + [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
           x509.IPAddress(ipaddress.ip_address("::1"))]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALIDITY_DAYS))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    return key_pem, cert_pem, _parse_certificate(cert_pem)


def generate_self_signed(cfg: Config, cert_path: Path, key_path: Path,
                         made: Made | None = None) -> None:
    """Write a self-signed certificate (``made``, or one made now) and the record of it."""
    key_pem, cert_pem, facts = made if made is not None else make_self_signed(cfg)
    # Key first: a cert on disk always has its key beside it.
    _write_private(key_path, key_pem, 0o600)
    _write_private(cert_path, cert_pem, 0o644)
    record = dict(facts, sha256=hashlib.sha256(cert_pem).hexdigest())
    with contextlib.suppress(OSError):  # then parsed again next time; nothing worse
        _write_private(record_path(cert_path), json.dumps(record, indent=1).encode(), 0o644)


def ensure_certificate(cfg: Config, made: Made | None = None) -> tuple[Path, Path]:
    """(cert, key) paths: the configured ones, or a self-signed pair written if needed
    (``made``: the one to write then, made beforehand by ``make_self_signed``)."""
    if cfg.tls.acme:  # obtained at start, before the node (server/operations.py)
        cert, key = acme_paths(cfg)
        if not cert.is_file() or not key.is_file():
            raise ConfigError(f"tls.acme: no certificate in {cert.parent} yet")
        return cert, key
    if cfg.tls.cert_file:
        cert, key = Path(cfg.tls.cert_file), Path(cfg.tls.key_file)
        for k, p in (("tls.cert_file", cert), ("tls.key_file", key)):
            if not p.is_file():
                raise ConfigError(f"{k}: {p} does not exist")
        return cert, key
    tls_dir = cfg.data_path / "tls"
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert, key = tls_dir / CERT_NAME, tls_dir / KEY_NAME
    if not _usable(cert, key, cfg):
        generate_self_signed(cfg, cert, key, made)
    return cert, key


def server_context(cfg: Config) -> ssl.SSLContext:
    """A server context: TLS >= tls.min_version, AEAD+PFS ciphers, no compression,
    no renegotiation, no session tickets (stateless tickets weaken forward secrecy)."""
    cert, key = ensure_certificate(cfg)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if cfg.tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.set_ciphers(CIPHERS)
    ctx.options |= (
        ssl.OP_NO_COMPRESSION
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_SINGLE_ECDH_USE
        | ssl.OP_SINGLE_DH_USE
        | ssl.OP_NO_RENEGOTIATION
        | ssl.OP_NO_TICKET
    )
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"tls.cert_file / tls.key_file: cannot load {cert} / {key}: {exc}")\
            from None
    return ctx


def reload_certificate(ctx: ssl.SSLContext, cfg: Config) -> bool:
    """Load the configured (or generated) certificate and key again into ``ctx`` (SIGHUP).

    The context is changed in place: the listeners with implicit TLS hold it, and
    STARTTLS reads it per session, so every new handshake presents the new certificate,
    while each open session keeps the one it negotiated. A bad pair is logged and the old
    one stays in force (a reload must never stop the server). True if loaded.
    """
    try:
        cert, key = ensure_certificate(cfg)
        ctx.load_cert_chain(cert, key)
    except Exception as exc:
        log.error("certificate reload failed, keeping the current one: %s", exc)
        return False
    log.info("certificate reloaded from %s", cert)
    return True
