"""The mail clients' autoconfig file ([client_setup], policy/clientsetup.py) served by the
HTTPS listener of [mta_sts] listen, fetched over real TLS with http.client as Thunderbird
fetches it, and read back with an XML parser."""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailfort.config import Config
from mailfort.policy import clientsetup
from mailfort.server.app import Node
from tests.conftest import seed_directory

NAMES = ("mx.example.test", "mta-sts.example.test", "autoconfig.example.test", "example.test",
         "autoconfig.other.test", "other.test")


@pytest.fixture
def node_ctx(tls_ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls_ca.issue_cert(*NAMES).configure_cert(ctx)
    return ctx


@pytest.fixture
def client_ctx(tls_ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    tls_ca.configure_trust(ctx)
    return ctx


async def _node(cfg: Config, ctx: ssl.SSLContext) -> AsyncIterator[Node]:
    seed_directory(cfg)
    async with Node(cfg, ssl_context=ctx) as n:
        yield n


@pytest.fixture
async def node(config_factory: Callable[..., Config],
               node_ctx: ssl.SSLContext) -> AsyncIterator[Node]:
    cfg = config_factory(mta_sts={"listen": "127.0.0.1:0"},
                         client_setup={"hostname": "mail.example.test", "pop3": 0,
                                       "submissions": 10465})
    async for n in _node(cfg, node_ctx):
        yield n


class _Loopback(http.client.HTTPSConnection):
    """An HTTPS connection to ``host`` (SNI, certificate name and Host header) that goes
    to 127.0.0.1: the test names stand for public ones."""

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def fetch(port: int, ctx: ssl.SSLContext, host: str, target: str,
          method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = _Loopback(host, port, context=ctx, timeout=5)
    try:
        conn.request(method, target)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def servers(body: bytes) -> list[tuple[str, str, str, int, str, str]]:
    """(element, type, hostname, port, socketType, username) of each server, in order."""
    root = ET.fromstring(body)
    assert root.tag == "clientConfig" and root.get("version") == "1.1"
    provider = root.find("emailProvider")
    assert provider is not None
    out = []
    for el in provider:
        if el.tag in ("incomingServer", "outgoingServer"):
            out.append((el.tag, el.get("type", ""), el.findtext("hostname", ""),
                        int(el.findtext("port", "0")), el.findtext("socketType", ""),
                        el.findtext("username", "")))
    return out


async def get(node: Node, ctx: ssl.SSLContext, host: str, target: str,
              method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(fetch, node.mta_sts_port, ctx, host, target, method)


@pytest.mark.parametrize(("host", "target"), [
    ("autoconfig.example.test", "/mail/config-v1.1.xml?emailaddress=alice%40example.test"),
    ("autoconfig.example.test", "/mail/config-v1.1.xml"),
    ("example.test", "/.well-known/autoconfig/mail/config-v1.1.xml?emailaddress="
                     "alice@example.test"),
    ("example.test", "/.well-known/autoconfig/mail/config-v1.1.xml"),
])
async def test_thunderbird_gets_the_public_servers_of_a_local_domain(
        node: Node, client_ctx: ssl.SSLContext, host: str, target: str) -> None:
    status, headers, body = await get(node, client_ctx, host, target)
    assert status == 200, body
    assert headers["content-type"] == "text/xml; charset=utf-8"
    provider = ET.fromstring(body).find("emailProvider")
    assert provider is not None and provider.get("id") == "example.test"
    assert provider.findtext("domain") == "example.test"
    got = servers(body)
    # The public name and ports of [client_setup], not the loopback listeners; POP3 on 110
    # is set to 0 there (not told); implicit TLS before STARTTLS.
    want_in = [("incomingServer", "pop3", "mail.example.test", 995, "SSL", "%EMAILADDRESS%")]
    if getattr(node.cfg.listen, "imap", None):  # served once the IMAP listeners exist
        want_in = [("incomingServer", "imap", "mail.example.test", 993, "SSL",
                    "%EMAILADDRESS%"),
                   ("incomingServer", "imap", "mail.example.test", 143, "STARTTLS",
                    "%EMAILADDRESS%"), *want_in]
    assert got == [*want_in,
                   ("outgoingServer", "smtp", "mail.example.test", 10465, "SSL",
                    "%EMAILADDRESS%"),
                   ("outgoingServer", "smtp", "mail.example.test", 587, "STARTTLS",
                    "%EMAILADDRESS%")]
    assert body == clientsetup.config_xml(node.cfg, "example.test")


@pytest.mark.parametrize(("host", "target"), [
    # not a domain of ours, however it is asked
    ("autoconfig.other.test", "/mail/config-v1.1.xml"),
    ("other.test", "/.well-known/autoconfig/mail/config-v1.1.xml"),
    ("autoconfig.example.test", "/mail/config-v1.1.xml?emailaddress=eve@other.test"),
    # the autoconfig host's path on another name
    ("mta-sts.example.test", "/mail/config-v1.1.xml"),
    # no domain at all in what was asked
    ("autoconfig.example.test", "/mail/config-v1.1.xml?emailaddress=alice@"),
    ("autoconfig.example.test", "/mail/config-v1.1.xml?emailaddress=a@exa%3Cmple.test"),
    ("autoconfig.example.test", "/mail/config-v1.1.xml?" + "&".join(["a=1"] * 20)),
    ("autoconfig.example.test", "/mail/config-v1.1.xml/../../etc/passwd"),
])
async def test_other_domains_and_paths_get_a_plain_404(
        node: Node, client_ctx: ssl.SSLContext, host: str, target: str) -> None:
    status, _, body = await get(node, client_ctx, host, target)
    assert (status, body) == (404, b"not found\n")


async def test_head_and_other_methods(node: Node, client_ctx: ssl.SSLContext) -> None:
    target = "/mail/config-v1.1.xml"
    status, headers, body = await get(node, client_ctx, "autoconfig.example.test", target,
                                      "HEAD")
    assert status == 200 and body == b""
    assert int(headers["content-length"]) == len(clientsetup.config_xml(node.cfg,
                                                                        "example.test"))
    status, headers, _ = await get(node, client_ctx, "autoconfig.example.test", target,
                                   "POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    # the MTA-STS policy is still served beside it
    status, _, body = await get(node, client_ctx, "mta-sts.example.test",
                                "/.well-known/mta-sts.txt")
    assert status == 200 and body.startswith(b"version: STSv1")


async def test_what_the_client_sends_never_reaches_the_xml(
        node: Node, client_ctx: ssl.SSLContext) -> None:
    """The address is only read for its domain; the file says %EMAILADDRESS%, which the
    client fills in itself."""
    status, _, body = await get(node, client_ctx, "autoconfig.example.test",
                                "/mail/config-v1.1.xml?emailaddress=%22%3E%3Cx%3E"
                                "%26amp;@example.test")
    assert status == 200
    assert body == clientsetup.config_xml(node.cfg, "example.test")
    assert b"<x>" not in body and b"amp;" not in body


async def test_autoconfig_off_serves_only_the_policy(
        config_factory: Callable[..., Config], node_ctx: ssl.SSLContext,
        client_ctx: ssl.SSLContext) -> None:
    cfg = config_factory(mta_sts={"listen": "127.0.0.1:0"},
                         client_setup={"autoconfig": False})
    async for n in _node(cfg, node_ctx):
        status, _, _ = await get(n, client_ctx, "autoconfig.example.test",
                                 "/mail/config-v1.1.xml")
        assert status == 404
        status, _, _ = await get(n, client_ctx, "mta-sts.example.test",
                                 "/.well-known/mta-sts.txt")
        assert status == 200


@pytest.mark.parametrize("table", [{"imaps": 70000}, {"submission": -1},
                                   {"hostname": "mail example"}, {"hostname": "a/b"}])
def test_bad_client_setup_is_refused(config_factory: Callable[..., Config],
                                     table: dict[str, Any]) -> None:
    from mailfort.config import ConfigError

    with pytest.raises(ConfigError, match="client_setup"):
        config_factory(client_setup=table)


def test_a_domain_added_later_is_served_without_a_restart(tmp_path: Path) -> None:
    """The directory is asked at each request (the embedded one sees other processes'
    commits at once), so `mailfort domain add` is enough."""
    from mailfort.directory.sqlite import SQLiteDirectory
    from mailfort.server.mtasts_http import PolicyServer

    cfg = Config()
    d = SQLiteDirectory(tmp_path / "d.sqlite3")
    server = PolicyServer(cfg, ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), d)
    assert server.autoconfig is not None
    assert server.autoconfig("late.test") is None
    d.add_domain("late.test")
    assert server.autoconfig("late.test") == clientsetup.config_xml(cfg, "late.test")


async def test_a_directory_that_fails_gets_a_503_and_the_listener_serves_on(
        config_factory: Callable[..., Config], node_ctx: ssl.SSLContext,
        client_ctx: ssl.SSLContext) -> None:
    """A lookup that raises (a shared directory's database down) is a 503, not a dropped
    connection with a traceback; the policy is still served."""
    cfg = config_factory(mta_sts={"listen": "127.0.0.1:0"})
    async for n in _node(cfg, node_ctx):
        assert n.mta_sts is not None

        def broken(domain: str) -> bytes | None:
            raise OSError("connection refused")

        n.mta_sts.autoconfig = broken
        status, _, body = await get(n, client_ctx, "autoconfig.example.test",
                                    "/mail/config-v1.1.xml")
        assert (status, body) == (503, b"try again later\n")
        status, _, _ = await get(n, client_ctx, "mta-sts.example.test",
                                 "/.well-known/mta-sts.txt")
        assert status == 200
