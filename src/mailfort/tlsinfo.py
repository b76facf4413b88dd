"""What certificate is served, for ``mailfort tls show`` and ``mailfort status``."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from cryptography import x509

from mailfort.config import Config
from mailfort.tls import CERT_NAME


def served_certificate_path(cfg: Config) -> Path:
    """The configured certificate, or the one generated in the data directory."""
    if cfg.tls.cert_file:
        return Path(cfg.tls.cert_file)
    if cfg.tls.acme:
        from mailfort.acmecert import paths

        return paths(cfg)[0]
    return cfg.data_path / "tls" / CERT_NAME


def describe(path: Path, now: dt.datetime | None = None) -> dict[str, Any]:
    """Subject, SANs, issuer and expiry of the first certificate in a PEM file."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    now = dt.datetime.now(dt.UTC) if now is None else now
    after = cert.not_valid_after_utc
    return {
        "file": str(path),
        "subject": cert.subject.rfc4514_string(),
        "san": names,
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": after.isoformat(),
        "days_left": (after - now).days,
        "self_signed": cert.issuer == cert.subject,
    }


def format_description(info: dict[str, Any]) -> str:
    lines = [
        f"file:       {info['file']}",
        f"subject:    {info['subject']}",
        f"names:      {', '.join(info['san']) or '-'}",
        f"issuer:     {info['issuer']}{' (self-signed)' if info['self_signed'] else ''}",
        f"not before: {info['not_before']}",
        f"not after:  {info['not_after']} ({info['days_left']} days left)",
    ]
    if info["days_left"] < 0:
        lines.append("EXPIRED: clients that check certificates refuse it")
    elif info["days_left"] < 14:
        lines.append("expires soon: renew it")
    return "\n".join(lines)
