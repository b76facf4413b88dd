"""MX resolution against a real DNS server on loopback."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mailfort.config import Config
from mailfort.delivery import mx
from tests.dnsserver import DNSServer


@pytest.fixture
def cfg(outbound_config: Callable[..., Config]) -> Config:
    return outbound_config()


async def test_mx_sorted_by_preference(dns_server: DNSServer, cfg: Config) -> None:
    dns_server.set_mx("remote.test", [(30, "c.remote.test"), (10, "a.remote.test"),
                                      (20, "b.remote.test")])
    for h in ("a", "b", "c"):
        dns_server.add_a(f"{h}.remote.test", "127.0.0.1")
    targets = await mx.resolve("remote.test", cfg, port=2525)
    assert [t.host for t in targets] == ["a.remote.test", "b.remote.test", "c.remote.test"]
    assert [t.preference for t in targets] == [10, 20, 30]
    assert all(t.port == 2525 and t.addresses == ("127.0.0.1",) for t in targets)
    assert ("remote.test", "MX") in dns_server.queries


async def test_mx_host_without_address_is_skipped(dns_server: DNSServer, cfg: Config) -> None:
    dns_server.set_mx("remote.test", [(10, "gone.remote.test"), (20, "ok.remote.test")])
    dns_server.add_a("ok.remote.test", "127.0.0.1")
    targets = await mx.resolve("remote.test", cfg)
    assert [t.host for t in targets] == ["ok.remote.test"]


async def test_no_mx_falls_back_to_address(dns_server: DNSServer, cfg: Config) -> None:
    dns_server.add_a("plain.test", "127.0.0.1")
    dns_server.add_txt("plain.test", "v=spf1 -all")  # the name exists, but has no MX
    (target,) = await mx.resolve("plain.test", cfg)
    assert target.host == "plain.test"
    assert target.addresses == ("127.0.0.1",)
    assert target.preference == 0


async def test_null_mx_is_permanent(dns_server: DNSServer, cfg: Config) -> None:
    dns_server.add_mx("nomail.test", ".", 0)
    dns_server.add_a("nomail.test", "127.0.0.1")  # must not be used as implicit MX
    with pytest.raises(mx.LookupFailure) as ei:
        await mx.resolve("nomail.test", cfg)
    assert ei.value.status == "5.1.10"
    assert ei.value.permanent


async def test_nxdomain_is_permanent(cfg: Config) -> None:
    with pytest.raises(mx.LookupFailure) as ei:
        await mx.resolve("does-not-exist.test", cfg)
    assert ei.value.permanent
    assert ei.value.status == "5.1.2"


async def test_no_mx_no_address_is_permanent(dns_server: DNSServer, cfg: Config) -> None:
    dns_server.add_txt("textonly.test", "hello")
    with pytest.raises(mx.LookupFailure) as ei:
        await mx.resolve("textonly.test", cfg)
    assert ei.value.permanent


async def test_servfail_is_temporary(dns_server: DNSServer, cfg: Config) -> None:
    dns_server.servfail("broken.test")
    with pytest.raises(mx.LookupFailure) as ei:
        await mx.resolve("broken.test", cfg)
    assert not ei.value.permanent
    assert ei.value.status.startswith("4.")


async def test_timeout_is_temporary(dns_server: DNSServer,
                                    outbound_config: Callable[..., Config]) -> None:
    cfg = outbound_config(dns={"timeout": 0.3})
    dns_server.timeout("slow.test")
    with pytest.raises(mx.LookupFailure) as ei:
        await mx.resolve("slow.test", cfg)
    assert not ei.value.permanent


async def test_route_overrides_mx(dns_server: DNSServer,
                                  outbound_config: Callable[..., Config]) -> None:
    dns_server.add_mx("remote.test", "mx.remote.test")
    dns_server.add_a("mx.remote.test", "127.0.0.9")
    dns_server.add_a("smarthost.test", "127.0.0.1")
    cfg = outbound_config(
        routes={"REMOTE.test": {"host": "127.0.0.1", "port": 2600, "require_tls": True},
                "*": {"host": "smarthost.test", "port": 2700}},
    )
    (t,) = await mx.resolve("remote.test", cfg)
    assert (t.addresses, t.port, t.require_tls) == (("127.0.0.1",), 2600, True)
    (t,) = await mx.resolve("other.test", cfg)  # the "*" route, its host resolved by DNS
    assert (t.host, t.addresses, t.port, t.require_tls) == (
        "smarthost.test", ("127.0.0.1",), 2700, False)
    assert ("other.test", "MX") not in dns_server.queries


def test_require_tls_domains(outbound_config: Callable[..., Config]) -> None:
    cfg = outbound_config(require_tls_domains=["Secure.test"])
    assert mx.requires_tls(cfg, "secure.test.")
    assert not mx.requires_tls(cfg, "other.test")
