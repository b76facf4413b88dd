"""``mailfort tls show`` prints the fingerprint a POP3/IMAP user compares before trusting
the self-signed certificate: the one ``openssl x509 -fingerprint -sha256`` prints."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import trustme

from mailfort import tlsinfo


@pytest.fixture
def self_signed(tmp_path: Path) -> Path:
    """A certificate that is its own issuer, with a key and a chain after it in the file."""
    ca = trustme.CA()
    path = tmp_path / "cert.pem"
    path.write_bytes(ca.cert_pem.bytes() + ca.private_key_pem.bytes())
    return path


def test_fingerprint_is_the_certificates_sha256(self_signed: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate(self_signed.read_bytes())
    want = ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))
    assert tlsinfo.fingerprint(self_signed) == want
    text = tlsinfo.format_description(tlsinfo.describe(self_signed))
    assert f"sha256:     {want}" in text.splitlines()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_fingerprint_matches_openssl(self_signed: Path) -> None:
    out = subprocess.run(["openssl", "x509", "-in", str(self_signed), "-noout",
                          "-fingerprint", "-sha256"], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().split("=", 1)[1] == tlsinfo.fingerprint(self_signed)


def test_readme_says_where_the_certificate_is_and_how_to_check_it() -> None:
    """The README's path is the one mailfort writes, and it names the fingerprint line."""
    from mailfort.config import Config
    from mailfort.tls import CERT_NAME, _names

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert f"mailfort-data/tls/{CERT_NAME}" in readme and "<data_dir>/tls/cert.pem" in readme
    assert "`mailfort tls show` prints those names and its SHA-256 fingerprint" in readme
    assert "`server.hostname`, `localhost`, `127.0.0.1` and `::1`" in readme
    assert "localhost" in _names(Config())  # the name the README tells local clients
