"""Self-signed certificate on first start, reuse, and the server context with a real client."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import stat
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from mailfort import config as config_mod
from mailfort.config import Config, ConfigError
from mailfort.tls import ensure_certificate, record_path, server_context


def cfg_for(tmp_path: Path, **tls: str) -> Config:
    return config_mod.from_dict({
        "server": {"hostname": "mx.example.test", "data_dir": str(tmp_path / "data")},
        "tls": tls,
    })


def test_generates_private_key_and_cert_with_sans(tmp_path: Path) -> None:
    cert_path, key_path = ensure_certificate(cfg_for(tmp_path))
    assert cert_path.parent == tmp_path / "data" / "tls"
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cert_path.parent).st_mode) == 0o700
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"mx.example.test", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def test_reused_then_regenerated_when_hostname_changes(tmp_path: Path) -> None:
    cert_path, _ = ensure_certificate(cfg_for(tmp_path))
    first = cert_path.read_bytes()
    assert ensure_certificate(cfg_for(tmp_path))[0].read_bytes() == first
    other = config_mod.from_dict({"server": {"hostname": "mail.other.test",
                                             "data_dir": str(tmp_path / "data")}})
    assert ensure_certificate(other)[0].read_bytes() != first


def test_generated_certificate_is_recorded_and_the_record_read_back(tmp_path: Path) -> None:
    """What the node checks at each start (names, expiry) comes from the record made with
    the certificate, so a serving process never parses X.509; a record that no longer
    matches the file (another certificate, or an edited record) is not believed."""
    cert_path, _ = ensure_certificate(cfg_for(tmp_path))
    record = json.loads(record_path(cert_path).read_text())
    assert {"mx.example.test", "localhost"} <= set(record["dns_names"])
    assert "127.0.0.1" in record["ip_addresses"] and record["self_signed"]
    first = cert_path.read_bytes()
    # The record is what is read: one that no longer names the host makes a new certificate.
    record_path(cert_path).write_text(json.dumps({**record, "dns_names": ["localhost"]}))
    second = ensure_certificate(cfg_for(tmp_path))[0].read_bytes()
    assert second != first
    # A record whose digest is not the file's is ignored: the file is parsed, still
    # usable, kept, and recorded again.
    fresh = json.loads(record_path(cert_path).read_text())
    record_path(cert_path).write_text(json.dumps({**fresh, "sha256": "0" * 64,
                                                  "not_after": "2000-01-01T00:00:00+00:00"}))
    assert ensure_certificate(cfg_for(tmp_path))[0].read_bytes() == second
    assert json.loads(record_path(cert_path).read_text()) == fresh


def test_a_certificate_made_in_memory_is_written_only_when_needed(tmp_path: Path) -> None:
    """Issue 24: root makes the certificate in memory (no file touched), the service user
    writes it into the data directory, only if the one there will not do."""
    from mailfort.tls import make_self_signed

    cfg = cfg_for(tmp_path)
    made = make_self_signed(cfg)
    assert not (tmp_path / "data").exists()
    cert_path, key_path = ensure_certificate(cfg, made)
    assert cert_path.read_bytes() == made[1] and key_path.read_bytes() == made[0]
    assert json.loads(record_path(cert_path).read_text())["not_after"] == made[2]["not_after"]
    assert ensure_certificate(cfg, make_self_signed(cfg))[0].read_bytes() == made[1]


def test_configured_files_used_and_missing_reported(tmp_path: Path) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("mx.example.test")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    cfg = cfg_for(tmp_path, cert_file=str(cert), key_file=str(key))
    assert ensure_certificate(cfg) == (cert, key)
    assert not (tmp_path / "data" / "tls").exists()
    assert isinstance(server_context(cfg), ssl.SSLContext)
    bad = cfg_for(tmp_path, cert_file=str(tmp_path / "nope.pem"), key_file=str(key))
    with pytest.raises(ConfigError, match=r"tls\.cert_file"):
        ensure_certificate(bad)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a cert")
    with pytest.raises(ConfigError, match="cannot load"):
        server_context(cfg_for(tmp_path, cert_file=str(garbage), key_file=str(key)))


def test_context_settings(tmp_path: Path) -> None:
    ctx = server_context(cfg_for(tmp_path))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(c["aead"] and c["kea"] in ("kx-ecdhe", "kx-dhe") for c in tls12)
    ctx13 = server_context(cfg_for(tmp_path, min_version="TLSv1.3"))
    assert ctx13.minimum_version == ssl.TLSVersion.TLSv1_3


async def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> str:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello\n")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server)
    port = srv.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="mx.example.test"
        )
        line = await reader.readline()
        version = writer.get_extra_info("ssl_object").version()
        writer.close()
        assert line == b"hello\n"
        return str(version)
    finally:
        srv.close()
        await srv.wait_closed()


async def test_real_client_verifies_generated_cert_and_min_version(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path)
    cert_path, _ = ensure_certificate(cfg)
    client = ssl.create_default_context(cafile=str(cert_path))
    assert await _handshake(server_context(cfg), client) == "TLSv1.3"
    tls12_client = ssl.create_default_context(cafile=str(cert_path))
    tls12_client.maximum_version = ssl.TLSVersion.TLSv1_2
    assert await _handshake(server_context(cfg), tls12_client) == "TLSv1.2"
    only13 = server_context(cfg_for(tmp_path, min_version="TLSv1.3"))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _handshake(only13, tls12_client)
