"""MTA-STS (RFC 8461) end to end: the _mta-sts TXT from the loopback DNS server, the policy
from a loopback HTTPS server with a trustme certificate, delivery to a loopback receiver."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailfort.delivery.mtasts import MTASTS, PolicyError, parse_policy, parse_txt, publish
from mailfort.delivery.mx import make_resolver
from mailfort.delivery.tlspolicy import mx_matches
from mailfort.queue.worker import DeliveryWorker
from tests.delivery.conftest import ReceiverFactory
from tests.delivery.policyserver import PolicyServer, policy_text
from tests.delivery.worker_helpers import MSG, make_worker, wait_for
from tests.dnsserver import DNSServer


@pytest.fixture
async def run() -> AsyncIterator[Any]:
    started: list[DeliveryWorker] = []

    async def start(cfg: Any, port: int) -> DeliveryWorker:
        w = make_worker(cfg, mx_port=port)
        await w.start()
        started.append(w)
        return w

    yield start
    for w in started:
        await w.stop()


def events(cfg: Any) -> list[dict[str, Any]]:
    out = []
    for f in sorted((cfg.data_path / "tlsrpt").glob("*.jsonl")):
        out.extend(json.loads(x) for x in f.read_text().splitlines())
    return out


async def _send(w: DeliveryWorker) -> str:
    ident = w.queue.enqueue_bytes(MSG, "alice@example.test", ["bob@remote.test"],
                                  "alice@example.test")
    w.wake()
    return ident


async def test_enforce_delivers_to_matching_mx_with_valid_certificate(
    sts: Any, receivers: ReceiverFactory, receiver_tls: ssl.SSLContext, run: Any,
    https: PolicyServer,
) -> None:
    cfg = sts("enforce", "*.example.test")
    rx = await receivers(ssl_context=receiver_tls)
    w = await run(cfg, rx.port)
    await _send(w)
    await wait_for(lambda: len(rx.messages) == 1)
    assert rx.messages[0].tls and https.requests == 1
    # The success is recorded once the receiver's 250 is in, which the receiver sends after
    # it holds the message: wait for the record too.
    await wait_for(lambda: len(events(cfg)) >= 1)
    (ev,) = events(cfg)
    assert (ev["result"], ev["policy_type"], ev["domain"]) == ("success", "sts", "remote.test")


async def test_enforce_defers_when_starttls_is_stripped(
    sts: Any, receivers: ReceiverFactory, run: Any,
) -> None:
    cfg = sts("enforce", "mx.example.test")
    rx = await receivers()  # no STARTTLS
    w = await run(cfg, rx.port)
    ident = await _send(w)
    await wait_for(lambda: w.queue.get(ident).recipients[0].attempts >= 1)
    r = w.queue.get(ident).recipients[0]
    assert r.state == "deferred" and r.status.startswith("4.7.")
    assert rx.mail_commands == []
    assert events(cfg)[0]["result"] == "starttls-not-supported"


async def test_testing_delivers_and_records_the_failure(
    sts: Any, receivers: ReceiverFactory, run: Any,
) -> None:
    cfg = sts("testing", "mx.example.test")
    rx = await receivers()  # no STARTTLS
    w = await run(cfg, rx.port)
    await _send(w)
    await wait_for(lambda: len(rx.messages) == 1)
    assert rx.messages[0].tls is False
    ev = events(cfg)[0]
    assert (ev["result"], ev["policy_type"], ev["mx"]) == (
        "starttls-not-supported", "sts", "mx.example.test")


async def test_enforce_defers_mx_not_in_policy(
    sts: Any, receivers: ReceiverFactory, receiver_tls: ssl.SSLContext, run: Any,
) -> None:
    cfg = sts("enforce", "mx.elsewhere.test")  # as if the MX answer had been forged
    rx = await receivers(ssl_context=receiver_tls)
    w = await run(cfg, rx.port)
    ident = await _send(w)
    await wait_for(lambda: w.queue.get(ident).recipients[0].attempts >= 1)
    assert w.queue.get(ident).recipients[0].status == "4.7.5"
    assert rx.sessions == 0


async def test_enforce_with_wrong_name_certificate_defers(
    sts: Any, dns_server: DNSServer, receivers: ReceiverFactory,
    receiver_tls: ssl.SSLContext, run: Any,
) -> None:
    dns_server.set_mx("remote.test", [(10, "mx2.example.test")])
    dns_server.add_a("mx2.example.test", "127.0.0.1")
    cfg = sts("enforce", "*.example.test")
    rx = await receivers(ssl_context=receiver_tls)  # certificate for mx.example.test only
    w = await run(cfg, rx.port)
    ident = await _send(w)
    await wait_for(lambda: w.queue.get(ident).recipients[0].attempts >= 1)
    assert w.queue.get(ident).recipients[0].status == "4.7.5" and rx.messages == []
    assert events(cfg)[0]["result"] == "certificate-host-mismatch"


async def test_cache_is_kept_until_the_id_changes(sts: Any, https: PolicyServer) -> None:
    cfg = sts("enforce", "mx.example.test")
    m = MTASTS(cfg, make_resolver(cfg))
    p1, err = await m.get("remote.test")
    assert err is None and p1 is not None and p1.mode == "enforce"
    await m.get("remote.test")
    assert https.requests == 1  # same id: cached
    sts("testing", "mx.example.test", sts_id="id2")
    p2, _ = await m.get("remote.test")
    assert https.requests == 2 and p2 is not None and p2.mode == "testing"
    https.status = 404  # a failed fetch keeps the cached, unexpired policy
    sts("none", sts_id="id3")
    https.status = 404
    p3, err = await m.get("remote.test")
    assert p3 == p2 and err is not None and err.result == "sts-policy-fetch-error"
    # a new instance (restart) finds it on disk
    p4, _ = await MTASTS(cfg, make_resolver(cfg)).get("remote.test")
    assert p4 is not None and p4.id == "id2"


async def test_policy_from_untrusted_certificate_is_no_policy(
    sts: Any, tmp_path: Path,
) -> None:
    other = trustme.CA()
    path = tmp_path / "other.pem"
    other.cert_pem.write_to_path(str(path))
    cfg = sts("enforce", "mx.example.test", mta_sts_ca_file=str(path))
    policy, err = await MTASTS(cfg, make_resolver(cfg)).get("remote.test")
    assert policy is None and err is not None and err.result == "sts-webpki-invalid"


def test_parsing_and_patterns() -> None:
    assert parse_txt(["v=STSv1; id=20260101"]) == "20260101"
    assert parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # ambiguous
    p = parse_policy(policy_text("enforce", "mx.a.test", "*.b.test", max_age=600))
    assert p.mx == ("mx.a.test", "*.b.test") and p.max_age == 600
    with pytest.raises(PolicyError):
        parse_policy("version: STSv1\nmode: enforce\nmax_age: 10\n")  # no mx
    with pytest.raises(PolicyError):
        parse_policy("version: STSv2\nmode: none\nmax_age: 10\n")
    assert mx_matches("*.b.test", "mx.b.test")
    assert not mx_matches("*.b.test", "a.mx.b.test")  # one label only
    assert not mx_matches("*.b.test", "b.test")
    assert mx_matches("MX.A.test.", "mx.a.test")


def test_publish_prints_txt_and_policy() -> None:
    txt, policy = publish("example.test", ["mx.example.test"])
    assert txt.startswith('_mta-sts.example.test. IN TXT "v=STSv1; id=')
    assert parse_txt([txt.split('"')[1]]) is not None
    assert parse_policy(policy).mx == ("mx.example.test",)


def test_cli_prints_what_to_publish(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mailfort.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\nhostname = "mx.example.test"\ndata_dir = "{tmp_path}/d"\n')
    assert main(["domain", "add", "example.test", "--config", str(cfg)]) == 0  # ours only
    assert main(["mta-sts", "policy", "example.test", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert '_mta-sts.example.test. IN TXT "v=STSv1; id=' in out
    assert "mode: enforce\r\nmx: mx.example.test\r\nmax_age: 604800" in out


async def test_testing_with_wrong_name_delivers_on_a_fresh_connection(
    sts: Any, dns_server: DNSServer, receivers: ReceiverFactory,
    receiver_tls: ssl.SSLContext, run: Any,
) -> None:
    dns_server.set_mx("remote.test", [(10, "mx2.example.test")])
    dns_server.add_a("mx2.example.test", "127.0.0.1")
    cfg = sts("testing", "*.example.test")
    rx = await receivers(ssl_context=receiver_tls)  # names mx.example.test only
    w = await run(cfg, rx.port)
    await _send(w)
    await wait_for(lambda: len(rx.messages) == 1)
    assert rx.messages[0].tls  # still encrypted, just not verified
    assert rx.sessions == 2  # the failed verification, then the delivery
    assert events(cfg)[0]["result"] == "certificate-host-mismatch"


async def test_policy_host_resolving_inward_is_not_fetched(
    sts: Any, dns_server: DNSServer, https: PolicyServer,
) -> None:
    """The policy fetch follows the same rule as delivery: no HTTPS to internal addresses."""
    cfg = sts("enforce", "mx.example.test", allow_private_destinations=False)
    policy, err = await MTASTS(cfg, make_resolver(cfg)).get("remote.test")
    assert policy is None and err is not None and "non-public 127.0.0.1" in str(err)
    assert https.requests == 0
