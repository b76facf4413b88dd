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


# ------------------------------------------------- delivery does not follow the network inward


@pytest.fixture
def strict(outbound_config: Callable[..., Config]) -> Config:
    """The default: no private destinations (the test fixture otherwise allows loopback)."""
    return outbound_config(delivery={"allow_private_destinations": False})


@pytest.mark.parametrize("ip", ["127.0.0.1", "10.1.2.3", "192.168.0.1", "172.16.0.1",
                                "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1"])
async def test_mx_pointing_inward_is_refused(dns_server: DNSServer, strict: Config,
                                             ip: str) -> None:
    dns_server.add_mx("remote.test", "mx.remote.test")
    dns_server.add_a("mx.remote.test", ip)
    with pytest.raises(mx.LookupFailure) as ei:
        await mx.resolve("remote.test", strict)
    assert ei.value.status == "5.4.4" and ei.value.permanent
    assert ip in ei.value.message and "non-public" in ei.value.message


@pytest.mark.parametrize("ip", ["::1", "fe80::1", "fd00::1", "ff02::1", "::ffff:7f00:1"])
async def test_implicit_mx_with_inward_ipv6_is_refused(dns_server: DNSServer, strict: Config,
                                                       ip: str) -> None:
    dns_server.add_aaaa("plain.test", ip)
    dns_server.add_txt("plain.test", "v=spf1 -all")
    with pytest.raises(mx.LookupFailure) as ei:
        await mx.resolve("plain.test", strict)
    assert ei.value.status == "5.4.4"


async def test_only_the_public_addresses_are_kept(dns_server: DNSServer, strict: Config) -> None:
    dns_server.set_mx("remote.test", [(10, "a.remote.test"), (20, "b.remote.test")])
    dns_server.add_a("a.remote.test", "10.0.0.5")  # inward: dropped with its MX
    dns_server.add_a("b.remote.test", "127.0.0.1")
    dns_server.add_a("b.remote.test", "203.0.114.7")  # not resolved to connect: data only
    (t,) = await mx.resolve("remote.test", strict)
    assert (t.host, t.addresses) == ("b.remote.test", ("203.0.114.7",))


async def test_address_literal_inward_is_refused(strict: Config) -> None:
    with pytest.raises(mx.LookupFailure) as ei:
        await mx.resolve("[10.9.8.7]", strict)
    assert ei.value.status == "5.4.4"


async def test_a_configured_route_may_point_inward(dns_server: DNSServer,
                                                   outbound_config: Callable[..., Config]
                                                   ) -> None:
    dns_server.add_a("smarthost.test", "127.0.0.1")
    cfg = outbound_config(delivery={"allow_private_destinations": False},
                          routes={"*": {"host": "smarthost.test", "port": 2700}})
    (t,) = await mx.resolve("remote.test", cfg)
    assert t.addresses == ("127.0.0.1",)


async def test_opt_in_allows_loopback_for_tests(dns_server: DNSServer, cfg: Config) -> None:
    assert cfg.delivery.allow_private_destinations  # what the delivery test fixture sets
    dns_server.add_mx("remote.test", "mx.remote.test")
    dns_server.add_a("mx.remote.test", "127.0.0.1")
    (t,) = await mx.resolve("remote.test", cfg)
    assert t.addresses == ("127.0.0.1",)


# An IPv6 address that carries an IPv4 one is judged by the IPv4 one (issue 24, "Also"):
# ``64:ff9b::127.0.0.1`` reaches this host's loopback through a NAT64 gateway.
@pytest.mark.parametrize("ip", [
    "64:ff9b::127.0.0.1",  # NAT64 well-known prefix (RFC 6052)
    "64:ff9b::10.1.2.3",
    "64:ff9b:1::808:808",  # NAT64 local-use (RFC 8215): never the Internet
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
    "::127.0.0.1",  # IPv4-compatible (deprecated)
    "::10.0.0.1",
    "::ffff:0:127.0.0.1",  # IPv4-translated (RFC 2765)
    "::ffff:0:169.254.1.1",
    "::ffff:10.0.0.1",  # IPv4-mapped
    "fec0::1",  # site-local (deprecated, RFC 3879)
    "fefe::1",
])
def test_embedded_or_site_local_inward_address_is_not_public(ip: str) -> None:
    assert not mx.is_public(ip)


@pytest.mark.parametrize("ip", [
    "64:ff9b::8.8.8.8", "2002:808:808::1", "::8.8.8.8", "::ffff:0:8.8.8.8",
    "::ffff:8.8.8.8", "2607:f8b0:4004::1", "8.8.8.8",
])
def test_embedded_public_address_is_public(ip: str) -> None:
    assert mx.is_public(ip)


async def test_mx_with_nat64_loopback_address_is_refused(dns_server: DNSServer,
                                                         strict: Config) -> None:
    dns_server.add_mx("remote.test", "mx.remote.test")
    dns_server.add_aaaa("mx.remote.test", "64:ff9b::7f00:1")
    with pytest.raises(mx.LookupFailure) as ei:
        await mx.resolve("remote.test", strict)
    assert ei.value.status == "5.4.4"
