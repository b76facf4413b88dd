"""Fixtures for outbound delivery tests: recording SMTP receivers (the test DNS server is
the root conftest's ``dns_server``).

Other test packages reuse them with ``from tests.delivery.conftest import receivers`` in
their own conftest.py.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from mailfort import config as config_mod
from mailfort.config import Config
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
