"""REQUIRETLS and "TLS-Required: No" (RFC 8689) in delivery: the loopback DNS server, the
MTA-STS policy from the loopback HTTPS server, trustme-certified loopback receivers, and the
bounce the submitter gets when no verified path exists."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mailfort.config import Config
from mailfort.queue.store import Queue
from mailfort.queue.worker import DeliveryWorker
from tests.delivery.conftest import ConfigFactory, ReceiverFactory
from tests.delivery.worker_helpers import MSG, wait_for
from tests.dnsserver import DNSServer

OPTIONAL = MSG.replace(b"Subject: hello\r\n", b"Subject: hello\r\nTLS-Required: No\r\n")


class Bounces:
    """The local deliveries (DSNs) the worker makes, by user."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []

    async def __call__(self, user: str, message: bytes, key: str = "") -> None:
        self.got.append((user, message))


@pytest.fixture
async def run() -> AsyncIterator[Any]:
    started: list[DeliveryWorker] = []

    async def start(cfg: Config, port: int, bounces: Bounces | None = None) -> DeliveryWorker:
        w = DeliveryWorker(Queue(cfg.data_path / "queue"), cfg, bounces or Bounces(),
                           mx_port=port)
        await w.start()
        started.append(w)
        return w

    yield start
    for w in started:
        await w.stop()


def _send(w: DeliveryWorker, msg: bytes = MSG, *, requiretls: bool = True) -> str:
    ident = w.queue.enqueue_bytes(msg, "alice@example.test", ["bob@remote.test"],
                                  "alice@example.test", requiretls=requiretls)
    w.wake()
    return ident


async def test_requiretls_to_a_destination_without_policy_is_bounced(
    dns_server: DNSServer, outbound_config: ConfigFactory, receivers: ReceiverFactory,
    receiver_tls: ssl.SSLContext, run: Any,
) -> None:
    """Plain DNS names the MX: nothing vouches for it, so not even a verified certificate
    for that name would do. Bounced to the submitter with 5.7.30, never connected to."""
    dns_server.add_mx("remote.test", "mx.example.test")
    dns_server.add_a("mx.example.test", "127.0.0.1")
    cfg = outbound_config(delivery={"dane": False})
    rx = await receivers(ssl_context=receiver_tls, requiretls=True)
    bounces = Bounces()
    w = await run(cfg, rx.port, bounces)
    _send(w)
    await wait_for(lambda: len(bounces.got) == 1)
    user, dsn = bounces.got[0]
    assert user == "alice@example.test"
    assert b"Status: 5.7.30" in dsn and b"REQUIRETLS" in dsn
    assert b"no MTA-STS policy" in dsn
    assert rx.sessions == 0 and rx.messages == []
    assert w.queue.ids() == []  # failed and notified: gone


async def test_requiretls_with_enforce_policy_is_delivered_with_the_parameter(
    sts: Any, receivers: ReceiverFactory, receiver_tls: ssl.SSLContext, run: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "mailfort.queue")
    cfg = sts("enforce", "*.example.test")
    rx = await receivers(ssl_context=receiver_tls, requiretls=True)
    w = await run(cfg, rx.port)
    _send(w)
    await wait_for(lambda: len(rx.messages) == 1)
    m = rx.messages[0]
    assert m.tls and "REQUIRETLS" in m.mail.upper().split()
    # the delivery log names the hop's TLS and how it was verified
    await wait_for(lambda: "tls=verified(mta-sts)" in caplog.text)
    assert "relay=mx.example.test[127.0.0.1]:" in caplog.text


async def test_requiretls_with_testing_policy_still_needs_the_verified_path(
    sts: Any, receivers: ReceiverFactory, receiver_tls: ssl.SSLContext, run: Any,
) -> None:
    """A "testing" policy that matches, with a valid certificate, vouches for the MX."""
    cfg = sts("testing", "mx.example.test")
    rx = await receivers(ssl_context=receiver_tls, requiretls=True)
    w = await run(cfg, rx.port)
    _send(w)
    await wait_for(lambda: len(rx.messages) == 1)
    assert rx.messages[0].tls and "REQUIRETLS" in rx.messages[0].mail.upper()


async def test_requiretls_to_mx_that_does_not_offer_it_is_bounced(
    sts: Any, receivers: ReceiverFactory, receiver_tls: ssl.SSLContext, run: Any,
) -> None:
    cfg = sts("enforce", "mx.example.test")
    rx = await receivers(ssl_context=receiver_tls)  # verified TLS, but no REQUIRETLS
    bounces = Bounces()
    w = await run(cfg, rx.port, bounces)
    _send(w)
    await wait_for(lambda: len(bounces.got) == 1)
    dsn = bounces.got[0][1]
    assert b"Status: 5.7.30" in dsn
    assert b"does not offer REQUIRETLS" in dsn
    assert b"TLSv1." in dsn and b"verified by mta-sts" in dsn  # which TLS the hop had
    assert rx.tls_sessions == 1 and rx.mail_commands == []  # nothing was sent


async def test_requiretls_with_stripped_starttls_is_bounced_not_sent_in_clear(
    sts: Any, receivers: ReceiverFactory, run: Any,
) -> None:
    cfg = sts("testing", "mx.example.test")  # testing would fall back to the clear
    rx = await receivers(requiretls=True)  # STARTTLS stripped
    bounces = Bounces()
    w = await run(cfg, rx.port, bounces)
    _send(w)
    await wait_for(lambda: len(bounces.got) == 1)
    assert b"Status: 5.7.10" in bounces.got[0][1]
    assert rx.mail_commands == [] and rx.messages == []


async def test_tls_required_no_is_delivered_despite_enforce_failure(
    sts: Any, receivers: ReceiverFactory, run: Any,
) -> None:
    """RFC 8689 §4.2.2: the sender waives MTA-STS; STARTTLS stripped, delivered anyway
    (the same message without the header is deferred: test_mtasts)."""
    cfg = sts("enforce", "mx.example.test")
    rx = await receivers()  # no STARTTLS: the enforce policy fails
    w = await run(cfg, rx.port)
    ident = _send(w, OPTIONAL, requiretls=False)
    await wait_for(lambda: len(rx.messages) == 1)
    assert rx.messages[0].tls is False
    assert b"TLS-Required: No" in rx.messages[0].data
    assert ident not in w.queue.ids()


async def test_without_tls_required_no_the_enforce_failure_defers(
    sts: Any, receivers: ReceiverFactory, run: Any,
) -> None:
    cfg = sts("enforce", "mx.example.test")
    rx = await receivers()
    w = await run(cfg, rx.port)
    ident = _send(w, MSG.replace(b"hello", b"TLS-Required: Yes"), requiretls=False)
    await wait_for(lambda: w.queue.get(ident).recipients[0].attempts >= 1)
    assert w.queue.get(ident).recipients[0].state == "deferred" and rx.messages == []


async def test_requiretls_wins_over_tls_required_no(
    dns_server: DNSServer, outbound_config: ConfigFactory, receivers: ReceiverFactory,
    receiver_tls: ssl.SSLContext, run: Any,
) -> None:
    dns_server.add_mx("remote.test", "mx.example.test")
    dns_server.add_a("mx.example.test", "127.0.0.1")
    cfg = outbound_config(delivery={"dane": False})
    rx = await receivers(ssl_context=receiver_tls, requiretls=True)
    bounces = Bounces()
    w = await run(cfg, rx.port, bounces)
    ident = _send(w, OPTIONAL, requiretls=True)
    entry = w.queue.get(ident)
    assert entry.requiretls and not entry.tls_optional
    await wait_for(lambda: len(bounces.got) == 1)
    assert b"Status: 5.7.30" in bounces.got[0][1] and rx.sessions == 0


async def test_requiretls_over_dane_is_delivered(
    dns_server: DNSServer, outbound_config: ConfigFactory, receivers: ReceiverFactory,
    run: Any, tls_ca: Any, tmp_path: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    """No MTA-STS, but DNSSEC-authenticated TLSA records for the MX that match: enough."""
    import hashlib

    from tests.delivery.test_dane import TLSA_NAME, Server

    caplog.set_level(logging.INFO, "mailfort.queue")
    server = Server(tls_ca, tmp_path)
    dns_server.add_mx("remote.test", "mx.example.test")
    dns_server.add_a("mx.example.test", "127.0.0.1")
    dns_server.add_tlsa(TLSA_NAME, 3, 1, 1, hashlib.sha256(server.spki()).digest())
    cfg = outbound_config(delivery={"mta_sts": False})
    rx = await receivers(ssl_context=server.ctx, requiretls=True)
    w = await run(cfg, rx.port)
    _send(w)
    await wait_for(lambda: len(rx.messages) == 1)
    assert "REQUIRETLS" in rx.messages[0].mail.upper().split()
    await wait_for(lambda: "tls=verified(dane)" in caplog.text)


@pytest.mark.parametrize("level", ["verify", "encrypt"])
async def test_requiretls_through_a_configured_route_needs_verify(
    dns_server: DNSServer, outbound_config: ConfigFactory, receivers: ReceiverFactory,
    receiver_tls: ssl.SSLContext, run: Any, ca_file: str, level: str,
) -> None:
    """A route names its host itself (no DNS to forge): verified TLS to it is enough."""
    dns_server.add_a("mx.example.test", "127.0.0.1")
    rx = await receivers(ssl_context=receiver_tls, requiretls=True)
    cfg = outbound_config(routes={"remote.test": {"host": "mx.example.test", "port": rx.port}},
                          delivery={"ca_file": ca_file, "tls_policy": {"remote.test": level}})
    bounces = Bounces()
    w = await run(cfg, rx.port, bounces)
    _send(w)
    if level == "verify":
        await wait_for(lambda: len(rx.messages) == 1)
        assert "REQUIRETLS" in rx.messages[0].mail.upper().split()
    else:
        await wait_for(lambda: len(bounces.got) == 1)
        assert b"Status: 5.7.30" in bounces.got[0][1] and rx.sessions == 0
