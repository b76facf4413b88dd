"""Per-destination TLS policy and the global floor, end to end: queue -> worker -> a
loopback receiver that offers STARTTLS or not, with a trustme certificate that names the
route's host or not. Nothing may ever be sent in clear where TLS is required."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailfort.queue.worker import DeliveryWorker
from tests.delivery.conftest import ConfigFactory, ReceiverFactory
from tests.delivery.worker_helpers import MSG, make_worker, wait_for
from tests.dnsserver import DNSServer


@pytest.fixture
def ca_file(tls_ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def run() -> AsyncIterator[Any]:
    started: list[DeliveryWorker] = []

    async def start(cfg: Any) -> DeliveryWorker:
        w = make_worker(cfg)
        await w.start()
        started.append(w)
        return w

    yield start
    for w in started:
        await w.stop()


def routed(dns: DNSServer, port: int, host: str = "mx.example.test") -> dict[str, Any]:
    """A route for remote.test to the receiver, by a host name the test DNS resolves."""
    dns.add_a(host, "127.0.0.1")
    return {"remote.test": {"host": host, "port": port}}


async def _send(w: DeliveryWorker) -> str:
    ident = w.queue.enqueue_bytes(MSG, "alice@example.test", ["bob@remote.test"],
                                  "alice@example.test")
    w.wake()
    return ident


async def _deferred(w: DeliveryWorker, ident: str) -> Any:
    await wait_for(lambda: w.queue.get(ident).recipients[0].attempts >= 1)
    r = w.queue.get(ident).recipients[0]
    assert r.state == "deferred", (r.state, r.last_reply)
    return r


@pytest.mark.parametrize("how", [{"delivery": {"tls_policy": {"remote.test": "encrypt"}}},
                                 {"delivery": {"tls_floor": "encrypt"}}])
async def test_stripped_starttls_is_deferred_under_encrypt(
    outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
    run: Any, how: dict[str, Any],
) -> None:
    rx = await receivers()  # STARTTLS stripped: not advertised
    w = await run(outbound_config(routes=routed(dns_server, rx.port), **how))
    r = await _deferred(w, await _send(w))
    assert r.status.startswith("4.7.")
    assert rx.mail_commands == [] and rx.messages == []  # never in clear


async def test_stripped_starttls_is_delivered_under_may(
    outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
    run: Any,
) -> None:
    rx = await receivers()
    w = await run(outbound_config(routes=routed(dns_server, rx.port),
                                  delivery={"tls_policy": {"remote.test": "may"}}))
    await _send(w)
    await wait_for(lambda: len(rx.messages) == 1)
    assert rx.messages[0].tls is False


async def test_refused_starttls_is_not_followed_by_plaintext_under_encrypt(
    outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
    receiver_tls: ssl.SSLContext, run: Any,
) -> None:
    rx = await receivers(ssl_context=receiver_tls, starttls_reply="454 4.7.0 TLS not available")
    w = await run(outbound_config(routes=routed(dns_server, rx.port),
                                  delivery={"tls_floor": "encrypt"}))
    r = await _deferred(w, await _send(w))
    assert r.status == "4.7.5"
    assert "STARTTLS" in rx.commands
    assert rx.mail_commands == []  # no MAIL in clear after the refusal


async def test_verify_delivers_with_matching_trusted_certificate(
    outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
    receiver_tls: ssl.SSLContext, run: Any, ca_file: str,
) -> None:
    rx = await receivers(ssl_context=receiver_tls)  # certificate for mx.example.test
    w = await run(outbound_config(routes=routed(dns_server, rx.port),
                                  delivery={"tls_policy": {"remote.test": "verify"},
                                            "ca_file": ca_file}))
    await _send(w)
    await wait_for(lambda: len(rx.messages) == 1)
    assert rx.messages[0].tls is True


async def test_verify_defers_wrong_name_certificate(
    outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
    receiver_tls: ssl.SSLContext, run: Any, ca_file: str,
) -> None:
    rx = await receivers(ssl_context=receiver_tls)  # names mx.example.test, not the route
    w = await run(outbound_config(routes=routed(dns_server, rx.port, "other.example.test"),
                                  delivery={"tls_policy": {"remote.test": "verify"},
                                            "ca_file": ca_file}))
    r = await _deferred(w, await _send(w))
    assert r.status == "4.7.5"
    assert rx.tls_sessions == 0 and rx.mail_commands == [] and rx.messages == []


async def test_verify_defers_untrusted_certificate(
    outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
    receiver_tls: ssl.SSLContext, run: Any,
) -> None:
    rx = await receivers(ssl_context=receiver_tls)  # the test CA is not in the system store
    w = await run(outbound_config(routes=routed(dns_server, rx.port),
                                  delivery={"tls_floor": "verify"}))
    r = await _deferred(w, await _send(w))
    assert r.status == "4.7.5" and rx.messages == []


def test_config_refuses_unknown_levels(outbound_config: ConfigFactory) -> None:
    from mailfort.config import ConfigError

    with pytest.raises(ConfigError, match=r"delivery\.tls_floor"):
        outbound_config(delivery={"tls_floor": "sometimes"})
    with pytest.raises(ConfigError, match=r"delivery\.tls_policy\.x\.test"):
        outbound_config(delivery={"tls_policy": {"x.test": "must"}})
    with pytest.raises(ConfigError, match="only loopback"):
        outbound_config(delivery={"mta_sts_addresses": {"mta-sts.x.test": "192.0.2.1"}})
