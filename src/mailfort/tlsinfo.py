"""What certificate is served, for ``mailfort tls show`` and ``mailfort status``.

The generated certificate is described from its record (tls.py); a configured one is
parsed, which loads the X.509 library into the process that answers (for ``status``, the
primary worker, from the first request on).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import ssl
from pathlib import Path
from typing import Any

from mailfort.config import Config
from mailfort.tls import CERT_NAME, certificate_facts


def served_certificate_path(cfg: Config) -> Path:
    """The configured certificate, or the one generated in the data directory."""
    if cfg.tls.cert_file:
        return Path(cfg.tls.cert_file)
    if cfg.tls.acme:
        from mailfort.acmecert import paths

        return paths(cfg)[0]
    return cfg.data_path / "tls" / CERT_NAME


_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def fingerprint(path: Path) -> str:
    """SHA-256 of the first certificate's DER, as clients show it (``AB:CD:…``), so that a
    POP3/IMAP user can compare it before trusting a self-signed certificate."""
    block = _PEM.search(path.read_bytes())
    if block is None:
        raise ValueError(f"no certificate in {path}")
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(block.group().decode("ascii")))
    return ":".join(f"{b:02X}" for b in digest.digest())


def describe(path: Path, now: dt.datetime | None = None) -> dict[str, Any]:
    """Subject, SANs, issuer and expiry of the first certificate in a PEM file (the
    generated one from its record, see ``tls.certificate_facts``)."""
    facts = certificate_facts(path)
    now = dt.datetime.now(dt.UTC) if now is None else now
    after = dt.datetime.fromisoformat(facts["not_after"])
    return {
        "file": str(path),
        "subject": facts["subject"],
        "san": facts["dns_names"] + facts["ip_addresses"],
        "issuer": facts["issuer"],
        "not_before": facts["not_before"],
        "not_after": facts["not_after"],
        "days_left": (after - now).days,
        "self_signed": facts["self_signed"],
        "sha256": fingerprint(path),
    }


def format_description(info: dict[str, Any]) -> str:
    lines = [
        f"file:       {info['file']}",
        f"subject:    {info['subject']}",
        f"names:      {', '.join(info['san']) or '-'}",
        f"issuer:     {info['issuer']}{' (self-signed)' if info['self_signed'] else ''}",
        f"not before: {info['not_before']}",
        f"not after:  {info['not_after']} ({info['days_left']} days left)",
        f"sha256:     {info['sha256']}",
    ]
    if info["days_left"] < 0:
        lines.append("EXPIRED: clients that check certificates refuse it")
    elif info["days_left"] < 14:
        lines.append("expires soon: renew it")
    return "\n".join(lines)
