"""DANE (RFC 7672) end to end: TLSA records from the loopback DNS server with the AD bit set
(or not), a loopback receiver whose trustme certificate matches them (or not)."""

from __future__ import annotations

import hashlib
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mailfort.delivery import dane
from mailfort.queue.worker import DeliveryWorker
from tests.delivery.conftest import ConfigFactory, ReceiverFactory
from tests.delivery.worker_helpers import MSG, make_worker, wait_for
from tests.dnsserver import DNSServer

TLSA_NAME = "_25._tcp.mx.example.test"


class Server:
    """A certificate for ``host`` from ``ca``, served with the CA certificate in the chain
    (as RFC 7672 §3.2.1 asks of a DANE-TA server)."""

    def __init__(self, ca: trustme.CA, tmp: Path, host: str = "mx.example.test") -> None:
        leaf = ca.issue_cert(host)
        self.leaf_der = x509.load_pem_x509_certificate(
            leaf.cert_chain_pems[0].bytes()).public_bytes(serialization.Encoding.DER)
        self.ca_der = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).public_bytes(
            serialization.Encoding.DER)
        chain, key = tmp / f"{host}.chain.pem", tmp / f"{host}.key.pem"
        chain.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems)
                          + ca.cert_pem.bytes())
        leaf.private_key_pem.write_to_path(str(key))
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(chain), str(key))

    def spki(self) -> bytes:
        return x509.load_der_x509_certificate(self.leaf_der).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def server(tls_ca: trustme.CA, tmp_path: Path) -> Server:
    return Server(tls_ca, tmp_path)


@pytest.fixture
async def run(dns_server: DNSServer, outbound_config: ConfigFactory) -> AsyncIterator[Any]:
    dns_server.add_mx("remote.test", "mx.example.test")
    dns_server.add_a("mx.example.test", "127.0.0.1")
    started: list[DeliveryWorker] = []

    async def start(port: int, **delivery: Any) -> DeliveryWorker:
        cfg = outbound_config(delivery={"mta_sts": False, **delivery})
        w = make_worker(cfg, mx_port=port)
        await w.start()
        started.append(w)
        return w

    yield start
    for w in started:
        await w.stop()


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


def _events(w: DeliveryWorker) -> list[dict[str, Any]]:
    out = []
    for f in sorted((w.cfg.data_path / "tlsrpt").glob("*.jsonl")):
        out.extend(json.loads(x) for x in f.read_text().splitlines())
    return out


async def test_dane_ee_spki_sha256_match_delivers(
    server: Server, dns_server: DNSServer, receivers: ReceiverFactory, run: Any,
) -> None:
    dns_server.add_tlsa(TLSA_NAME, 3, 1, 1, hashlib.sha256(server.spki()).digest())
    rx = await receivers(ssl_context=server.ctx)
    w = await run(rx.port)  # no CA configured: DANE alone authenticates
    await _send(w)
    await wait_for(lambda: len(rx.messages) == 1)
    assert rx.messages[0].tls
    await wait_for(lambda: bool(_events(w)))
    assert (_events(w)[0]["result"], _events(w)[0]["policy_type"]) == ("success", "tlsa")


async def test_dane_ee_mismatch_defers(
    server: Server, dns_server: DNSServer, receivers: ReceiverFactory, run: Any,
) -> None:
    dns_server.add_tlsa(TLSA_NAME, 3, 1, 1, hashlib.sha256(b"another key").digest())
    rx = await receivers(ssl_context=server.ctx)
    w = await run(rx.port)
    r = await _deferred(w, await _send(w))
    assert r.status == "4.7.5" and rx.mail_commands == [] and rx.messages == []
    assert _events(w)[0]["result"] == "validation-failure"


async def test_tlsa_without_ad_is_ignored(
    server: Server, dns_server: DNSServer, receivers: ReceiverFactory, run: Any,
) -> None:
    dns_server.add_tlsa(TLSA_NAME, 3, 1, 1, hashlib.sha256(b"forged").digest(),
                        authentic=False)
    rx = await receivers(ssl_context=server.ctx)
    w = await run(rx.port)
    await _send(w)
    await wait_for(lambda: len(rx.messages) == 1)  # as without DANE: opportunistic
    assert rx.messages[0].tls  # STARTTLS as offered, but no DANE policy applied to it
    assert not [e for e in _events(w) if e.get("policy_type") == "tlsa"]


async def test_dane_without_starttls_is_not_delivered(
    server: Server, dns_server: DNSServer, receivers: ReceiverFactory, run: Any,
) -> None:
    dns_server.add_tlsa(TLSA_NAME, 3, 1, 1, hashlib.sha256(server.spki()).digest())
    rx = await receivers()  # STARTTLS stripped
    w = await run(rx.port)
    r = await _deferred(w, await _send(w))
    assert r.status.startswith("4.7.") and rx.mail_commands == []


async def test_dane_ta_full_certificate_delivers(
    server: Server, dns_server: DNSServer, receivers: ReceiverFactory, run: Any,
) -> None:
    dns_server.add_tlsa(TLSA_NAME, 2, 0, 2, hashlib.sha512(server.ca_der).digest())
    rx = await receivers(ssl_context=server.ctx)
    w = await run(rx.port)
    await _send(w)
    await wait_for(lambda: len(rx.messages) == 1)
    assert rx.messages[0].tls
    await wait_for(lambda: bool(_events(w)))
    assert (_events(w)[0]["result"], _events(w)[0]["policy_type"]) == ("success", "tlsa")


async def test_dane_ta_with_wrong_host_name_defers(
    tls_ca: trustme.CA, tmp_path: Path, dns_server: DNSServer, receivers: ReceiverFactory,
    run: Any,
) -> None:
    other = Server(tls_ca, tmp_path, host="elsewhere.test")
    dns_server.add_tlsa(TLSA_NAME, 2, 0, 1, hashlib.sha256(other.ca_der).digest())
    rx = await receivers(ssl_context=other.ctx)
    w = await run(rx.port)
    r = await _deferred(w, await _send(w))
    assert r.status == "4.7.5" and rx.messages == []


async def test_dane_replaces_the_ca_check_of_a_verify_floor(
    server: Server, dns_server: DNSServer, receivers: ReceiverFactory, run: Any,
) -> None:
    """A DANE-authenticated host is used even where no CA would vouch for it (verify)."""
    dns_server.add_tlsa(TLSA_NAME, 3, 0, 0, server.leaf_der)
    rx = await receivers(ssl_context=server.ctx)
    w = await run(rx.port, tls_floor="verify")  # the system store knows no test CA
    await _send(w)
    await wait_for(lambda: len(rx.messages) == 1)


def test_matching_variants(server: Server) -> None:
    chain = [server.leaf_der, server.ca_der]
    h = "mx.example.test"
    ok = [
        dane.TLSA(3, 0, 0, server.leaf_der),
        dane.TLSA(3, 0, 1, hashlib.sha256(server.leaf_der).digest()),
        dane.TLSA(3, 1, 2, hashlib.sha512(server.spki()).digest()),
        dane.TLSA(2, 0, 1, hashlib.sha256(server.ca_der).digest()),
    ]
    for r in ok:
        assert dane.authenticate((r,), chain, h) is None, r
    # DANE-EE checks no name (RFC 7672 §3.1.1); DANE-TA does (§3.2.3)
    assert dane.authenticate((ok[0],), chain, "other.test") is None
    assert dane.authenticate((ok[3],), chain, "other.test") is not None
    # TA record matching the leaf of another chain does not vouch: the leaf must chain to it
    assert dane.authenticate((dane.TLSA(2, 0, 0, b"x"),), chain, h) is not None
    # PKIX-EE(1) is not usable for SMTP
    assert dane.authenticate((dane.TLSA(1, 0, 0, server.leaf_der),), chain, h) is not None


async def test_failed_tlsa_lookup_defers_that_host(
    server: Server, dns_server: DNSServer, receivers: ReceiverFactory, run: Any,
) -> None:
    """SERVFAIL (what a validating resolver answers for bogus DNSSEC): not delivered."""
    dns_server.servfail(TLSA_NAME)
    rx = await receivers(ssl_context=server.ctx)
    w = await run(rx.port)
    r = await _deferred(w, await _send(w))
    assert r.status == "4.7.5" and rx.sessions == 0
    assert _events(w)[0]["result"] == "dnssec-invalid"
