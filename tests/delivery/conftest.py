"""Fixtures for outbound delivery tests: recording SMTP receivers (the test DNS server is
the root conftest's ``dns_server``).

Other test packages reuse them with ``from tests.delivery.conftest import receivers`` in
their own conftest.py.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailfort import config as config_mod
from mailfort.config import Config
from tests.delivery.policyserver import PolicyServer, policy_text
from tests.delivery.receiver import Receiver
from tests.dnsserver import DNSServer

ReceiverFactory = Callable[..., Awaitable[Receiver]]
ConfigFactory = Callable[..., Config]

FAST_QUEUE = {
    "initial_retry": 0.05,
    "max_retry": 0.2,
    "max_lifetime": 60.0,
    "delay_warning_after": 3600.0,
    "connect_timeout": 2.0,
    "workers": 4,
}


@pytest.fixture
def outbound_config(tmp_path: Path, dns_server: DNSServer) -> ConfigFactory:
    """A config using the test DNS server and fast retries; keyword args override keys.

    ``outbound_config(queue={"max_lifetime": 1}, routes={...}, require_tls_domains=[...])``
    """

    def factory(**overrides: Any) -> Config:
        raw: dict[str, Any] = {
            "server": {"hostname": "mailfort.example.test", "data_dir": str(tmp_path / "data")},
            "dns": dns_server.config(timeout=1.0),
            "queue": dict(FAST_QUEUE),
            # The test MXs listen on 127.0.0.1, named by the test DNS: opt in to that.
            "delivery": {"allow_private_destinations": True},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(raw.get(key), dict):
                raw[key].update(value)
            else:
                raw[key] = value
        return config_mod.from_dict(raw)

    return factory



@pytest.fixture
async def receivers() -> AsyncIterator[ReceiverFactory]:
    """``await receivers(ssl_context=..., rcpt_replies=...)`` starts one; all stop at the end."""
    started: list[Receiver] = []

    async def factory(**kwargs: Any) -> Receiver:
        r = await Receiver(**kwargs).start()
        started.append(r)
        return r

    yield factory
    for r in started:
        await r.stop()


@pytest.fixture
def receiver_tls(server_ssl_context: ssl.SSLContext) -> ssl.SSLContext:
    """The server context of tests/conftest.py (trustme cert for mx.example.test)."""
    return server_ssl_context


# ------------------------------------------------------------------ MTA-STS


@pytest.fixture
def ca_file(tls_ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def https(tls_ca: trustme.CA) -> Iterator[PolicyServer]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls_ca.issue_cert("mta-sts.remote.test").configure_cert(ctx)
    server = PolicyServer(ctx).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sts(dns_server: DNSServer, https: PolicyServer, outbound_config: ConfigFactory,
        ca_file: str) -> Any:
    """Publish a policy for remote.test (MX mx.example.test -> 127.0.0.1); returns a
    config factory pointed at the DNS, HTTPS and CA of the test."""
    dns_server.add_mx("remote.test", "mx.example.test")
    dns_server.add_a("mx.example.test", "127.0.0.1")
    dns_server.add_a("mta-sts.remote.test", "127.0.0.1")

    def publish_(mode: str, *mx: str, sts_id: str = "id1", **overrides: Any) -> Any:
        dns_server.remove("_mta-sts.remote.test")
        dns_server.add_txt("_mta-sts.remote.test", f"v=STSv1; id={sts_id}")
        https.body = policy_text(mode, *mx)
        delivery = {"ca_file": ca_file, "mta_sts_port": https.port, "dane": False}
        delivery.update(overrides)
        return outbound_config(delivery=delivery)

    return publish_
