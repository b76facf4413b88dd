"""A route with TLS and AUTH (smarthost), against a recording receiver on loopback that
offers AUTH even in clear, as a careless provider would: the password goes only over TLS
verified against the route's host, and a refused login defers with the provider's reply.
The full path through a second mailfort as the provider is tests/server/test_smarthost.py.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailfort.config import ConfigError
from mailfort.queue.worker import DeliveryWorker
from tests.delivery.conftest import ConfigFactory, ReceiverFactory
from tests.delivery.worker_helpers import MSG, make_worker, wait_for
from tests.dnsserver import DNSServer

PASSWORD = "s3cret-relay-pw"
HOST = "mx.example.test"  # the name the receiver's trustme certificate carries


@pytest.fixture
def ca_file(tls_ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def pw_file(tmp_path: Path) -> str:
    path = tmp_path / "relay.pw"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
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


def route(dns: DNSServer, port: int, pw_file: str, **extra: Any) -> dict[str, Any]:
    dns.add_a(HOST, "127.0.0.1")
    return {"*": {"host": HOST, "port": port, "auth_user": "me@provider.test",
                  "auth_password_file": pw_file, **extra}}


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


@pytest.mark.parametrize("mech", ["PLAIN LOGIN", "LOGIN"])
async def test_login_over_verified_starttls_then_delivery(
    outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
    receiver_tls: ssl.SSLContext, run: Any, ca_file: str, pw_file: str, mech: str,
) -> None:
    rx = await receivers(ssl_context=receiver_tls, auth=mech)
    w = await run(outbound_config(routes=route(dns_server, rx.port, pw_file, tls="starttls",
                                               cafile=ca_file)))
    await _send(w)
    await wait_for(lambda: len(rx.messages) == 1)
    assert rx.logins == [(mech.split()[0], "me@provider.test", PASSWORD, True)]
    assert rx.messages[0].tls
    # The route's host and port, not the MX of remote.test.
    assert ("remote.test", "MX") not in dns_server.queries


async def test_no_auth_in_clear_when_starttls_is_stripped(
    outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
    run: Any, ca_file: str, pw_file: str,
) -> None:
    rx = await receivers(auth="PLAIN LOGIN")  # AUTH offered, STARTTLS not
    w = await run(outbound_config(routes=route(dns_server, rx.port, pw_file, cafile=ca_file)))
    r = await _deferred(w, await _send(w))
    assert r.status.startswith("4.7."), r.last_reply
    assert rx.logins == [] and not any(c.upper().startswith("AUTH") for c in rx.commands)
    assert rx.mail_commands == []


@pytest.mark.parametrize("why", ["untrusted", "wrong name"])
async def test_certificate_that_does_not_verify_gets_no_password(
    outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
    receiver_tls: ssl.SSLContext, run: Any, ca_file: str, pw_file: str, why: str,
) -> None:
    rx = await receivers(ssl_context=receiver_tls, auth="PLAIN LOGIN")
    routes = route(dns_server, rx.port, pw_file, tls="starttls")
    if why == "untrusted":  # the test CA is in no system trust store
        routes["*"].pop("cafile", None)
    else:  # trusted CA, but the certificate names mx.example.test
        dns_server.add_a("relay.example.test", "127.0.0.1")
        routes["*"] |= {"host": "relay.example.test", "cafile": ca_file}
    w = await run(outbound_config(routes=routes))
    r = await _deferred(w, await _send(w))
    assert r.status == "4.7.5", r.last_reply
    assert "certificate" in r.last_reply.lower() or "CERTIFICATE" in r.last_reply
    assert rx.logins == [] and not any(c.upper().startswith("AUTH") for c in rx.commands)
    assert rx.messages == []


async def test_refused_login_defers_with_the_providers_reply_never_the_password(
    outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
    receiver_tls: ssl.SSLContext, run: Any, ca_file: str, pw_file: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    rx = await receivers(ssl_context=receiver_tls, auth="PLAIN",
                         auth_reply="535 5.7.8 Authentication credentials invalid")
    w = await run(outbound_config(routes=route(dns_server, rx.port, pw_file, tls="starttls",
                                               cafile=ca_file)))
    r = await _deferred(w, await _send(w))
    assert r.status == "4.7.8"
    assert "535 5.7.8 Authentication credentials invalid" in r.last_reply
    assert "me@provider.test" in r.last_reply
    assert rx.mail_commands == []
    assert PASSWORD not in caplog.text and PASSWORD not in r.last_reply


async def test_world_readable_password_file_is_not_used(
    outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
    receiver_tls: ssl.SSLContext, run: Any, ca_file: str, pw_file: str,
) -> None:
    Path(pw_file).chmod(0o644)
    rx = await receivers(ssl_context=receiver_tls, auth="PLAIN")
    w = await run(outbound_config(routes=route(dns_server, rx.port, pw_file, tls="starttls",
                                               cafile=ca_file)))
    r = await _deferred(w, await _send(w))
    assert r.status == "4.3.5" and "readable by every user" in r.last_reply
    assert rx.logins == []


# ------------------------------------------------------------------- configuration


@pytest.mark.parametrize(("route_keys", "expected"), [
    ({"tls": "none", "auth_user": "u", "auth_password_file": "/p"}, "auth_user"),
    ({"tls": "may", "auth_user": "u", "auth_password_file": "/p"}, "auth_user"),
    ({"tls": "ssl"}, "routes.*.tls"),
    ({"auth_user": "u"}, "auth_password_file"),
    ({"auth_password_file": "/p"}, "auth_user"),
    ({"require_tls": True, "tls": "may"}, "require_tls"),
    ({"cafile": "/ca.pem"}, "cafile"),
    ({"tls": "implicit"}, "port 587 speaks STARTTLS"),
    ({"tls": "starttls", "port": 465}, "port 465 speaks implicit TLS"),
])
def test_config_refuses_a_route_that_could_leak_or_contradict(
    outbound_config: ConfigFactory, route_keys: dict[str, Any], expected: str,
) -> None:
    with pytest.raises(ConfigError, match=expected.replace("*", r"\*")):
        outbound_config(routes={"*": {"host": "smtp.provider.test", "port": 587,
                                      **route_keys}})


@pytest.mark.parametrize(("route_keys", "mode"), [
    ({}, "may"),  # a route as it was before these keys: unchanged
    ({"require_tls": True}, "starttls"),
    ({"auth_user": "u", "auth_password_file": "/p"}, "starttls"),
    ({"tls": "implicit", "port": 465}, "implicit"),
])
def test_route_tls_defaults(outbound_config: ConfigFactory, route_keys: dict[str, Any],
                            mode: str) -> None:
    cfg = outbound_config(routes={"*": {"host": "smtp.provider.test", **route_keys}})
    assert cfg.routes["*"].tls_mode == mode
