"""Our MTA-STS policy served over HTTPS ([mta_sts] listen), fetched by real HTTPS clients:
the MTA-STS client of the delivery side (http.client, certificate and name checked) and
raw TLS sockets for what a careless or hostile client sends."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailfort.config import Config
from mailfort.delivery.mtasts import MTASTS, _fetch_sync, parse_policy, parse_txt, publish
from mailfort.delivery.mx import make_resolver
from mailfort.server.app import Node
from mailfort.server.mtasts_http import MAX_HEAD, respond
from tests.conftest import seed_directory
from tests.dnsserver import DNSServer

HOST = "mta-sts.example.test"


@pytest.fixture
def node_ctx(tls_ca: trustme.CA) -> ssl.SSLContext:
    """The [tls] certificate, naming the MX and mta-sts.example.test."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls_ca.issue_cert("mx.example.test", HOST).configure_cert(ctx)
    return ctx


@pytest.fixture
def ca_file(tls_ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def node(config_factory: Callable[..., Config],
               node_ctx: ssl.SSLContext) -> AsyncIterator[Node]:
    cfg = config_factory(mta_sts={"listen": "127.0.0.1:0", "mx": ["mx.example.test"],
                                  "max_age": 86400})
    seed_directory(cfg)
    async with Node(cfg, ssl_context=node_ctx) as n:
        yield n


def client_ctx(ca_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def test_policy_is_fetched_by_the_mta_sts_client(node: Node, ca_file: str) -> None:
    text = await asyncio.to_thread(_fetch_sync, HOST, "127.0.0.1", node.mta_sts_port,
                                   client_ctx(ca_file), 5.0)
    p = parse_policy(text)
    assert (p.mode, p.mx, p.max_age) == ("enforce", ("mx.example.test",), 86400)
    _, expected = publish("example.test", ["mx.example.test"], max_age=86400)
    assert text == expected  # what `mailfort mta-sts policy` prints, byte for byte


async def test_end_to_end_a_sender_gets_our_policy(
    node: Node, ca_file: str, dns_server: DNSServer, config_factory: Callable[..., Config],
) -> None:
    """A sender (our own delivery code) looks up the TXT record we would publish and
    fetches the policy from the listener: it gets it, with the id of the TXT record."""
    txt, _ = publish("example.test", ["mx.example.test"], max_age=86400)
    record = txt.split('"')[1]
    dns_server.add_txt("_mta-sts.example.test", record)
    sender = config_factory(
        dns=dns_server.config(timeout=1.0),
        delivery={"ca_file": ca_file, "mta_sts_port": node.mta_sts_port,
                  "mta_sts_addresses": {HOST: "127.0.0.1"}},
        server={"data_dir": str(node.cfg.data_path.parent / "sender")},
    )
    policy, err = await MTASTS(sender, make_resolver(sender)).get("example.test")
    assert err is None and policy is not None
    assert policy.mode == "enforce" and policy.id == parse_txt([record])


def _raw(port: int, ca_file: str, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock, \
            client_ctx(ca_file).wrap_socket(sock, server_hostname=HOST) as tls:
        tls.sendall(request)
        out = b""
        while chunk := tls.recv(65536):
            out += chunk
        return out


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: mta-sts.example.test\r\n\r\n", b"200"),
    (b"HEAD /.well-known/mta-sts.txt HTTP/1.1\r\nHost: mta-sts.example.test\r\n\r\n", b"200"),
    (b"GET /etc/passwd HTTP/1.1\r\nHost: mta-sts.example.test\r\n\r\n", b"404"),
    (b"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: intranet.example.test\r\n\r\n", b"404"),
    (b"POST /.well-known/mta-sts.txt HTTP/1.1\r\nHost: mta-sts.example.test\r\n\r\n", b"405"),
    (b"GET /.well-known/mta-sts.txt HTTP/1.1\r\n\r\n", b"400"),  # HTTP/1.1 needs Host
    (b"BREW\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD + 10) + b"\r\n\r\n", b"431"),
])
async def test_raw_requests_get_bounded_answers(node: Node, ca_file: str,
                                                request_bytes: bytes, status: bytes) -> None:
    out = await asyncio.to_thread(_raw, node.mta_sts_port, ca_file, request_bytes)
    assert out.startswith(b"HTTP/1.1 " + status), out[:80]
    if request_bytes.startswith(b"HEAD"):
        assert out.endswith(b"\r\n\r\n")  # headers only
    # the server goes on serving
    ok = await asyncio.to_thread(_raw, node.mta_sts_port, ca_file, b"GET /.well-known/"
                                 b"mta-sts.txt HTTP/1.0\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200") and b"Content-Type: text/plain\r\n" in ok


def test_respond_never_raises_on_noise() -> None:
    for head in (b"", b"\xff\xfe", b"GET", b"GET  HTTP/1.1", b"GET / HTTP/1.1\r\nHost",
                 b"GET / HTTP/1.1\r\nHost: [::1]", b"\r\n\r\n"):
        assert respond(head, "p").startswith(b"HTTP/1.1 4")


@pytest.mark.parametrize("table", [{"listen": "mta-sts.example.test:443"},
                                   {"mode": "strict"}, {"max_age": 0}, {"mx": ["a b"]}])
def test_bad_mta_sts_config_is_refused(config_factory: Callable[..., Config],
                                       table: dict[str, Any]) -> None:
    from mailfort.config import ConfigError

    with pytest.raises(ConfigError, match="mta_sts"):
        config_factory(mta_sts=table)


def test_cli_txt_matches_what_is_served(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from mailfort.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\nhostname = "mx.example.test"\ndata_dir = "{tmp_path}/d"\n'
                   '[mta_sts]\nmx = ["mx.example.test"]\nmax_age = 86400\nmode = "testing"\n')
    assert main(["domain", "add", "example.test", "--config", str(cfg)]) == 0  # ours only
    assert main(["mta-sts", "policy", "example.test", "--config", str(cfg)]) == 0
    txt, policy = publish("example.test", ["mx.example.test"], mode="testing", max_age=86400)
    out = capsys.readouterr().out
    assert txt in out and policy in out


def test_with_two_workers_the_policy_is_served_once_per_node(
        tmp_path: Path, tls_ca: trustme.CA, ca_file: str) -> None:
    """``workers = 2``: the supervisor binds the listener (before any privilege drop) and
    only the first worker serves it; the others would otherwise fail to bind the port."""
    import subprocess
    import sys
    import time

    cert = tls_ca.issue_cert("mx.example.test", HOST)
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "mailfort.toml"
    config.write_text(
        f'[server]\nhostname = "mx.example.test"\ndata_dir = "{tmp_path / "data"}"\n'
        "workers = 2\n"
        f'[tls]\ncert_file = "{tmp_path / "cert.pem"}"\nkey_file = "{tmp_path / "key.pem"}"\n'
        '[listen]\nmx = ["127.0.0.1:0"]\nsubmission = []\nsubmissions = []\npop3 = []\n'
        "pop3s = []\nimap = []\nimaps = []\nmanagesieve = []\n"
        f'[mta_sts]\nlisten = "127.0.0.1:{port}"\nmx = ["mx.example.test"]\n')
    log = tmp_path / "serve.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "mailfort", "serve", "--config",
                                 str(config)], stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 20
        while log.read_text().count(" serving") < 2:
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        text = _fetch_sync(HOST, "127.0.0.1", port, client_ctx(ca_file), 5.0)
        assert parse_policy(text).mx == ("mx.example.test",)
        assert log.read_text().count("MTA-STS policy on https://127.0.0.1") == 1
        assert "Traceback" not in log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
