"""DNS blocklist decisions (RFC 5782) against the tests' real DNS server on loopback."""

from __future__ import annotations

import ipaddress
import logging
import time

import pytest

from mailfort import config as config_mod
from mailfort.delivery.mx import make_resolver
from mailfort.policy.dnsbl import (
    CodeFilter,
    DNSBLChecker,
    Zone,
    client_address,
    domain_name,
    parse_code_range,
    reverse_name,
)
from tests.dnsserver import DNSServer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def checker(dns_server: DNSServer, zones: list[Zone], *, threshold: int = 1, timeout: float = 1.0,
            clock: Clock | None = None) -> DNSBLChecker:
    cfg = config_mod.from_dict({"dns": dns_server.config(timeout=timeout)})
    return DNSBLChecker(make_resolver(cfg), zones, threshold=threshold, timeout=timeout,
                        clock=clock or time.monotonic)


def v4(ip: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(ip)


# ------------------------------------------------------------------ names and codes


def test_query_names_ipv4_and_ipv6_nibbles() -> None:
    assert reverse_name(v4("192.0.2.99"), "bl.test") == "99.2.0.192.bl.test"
    # RFC 5782 §5: the IPv6 test entry ::FFFF:7F00:2, as 32 reversed nibbles.
    name = reverse_name(ipaddress.IPv6Address("::FFFF:7F00:2"), "BL.test.")
    assert name == "2.0.0.0.0.0.f.7.f.f.f.f." + "0." * 20 + "bl.test"
    assert len(name.split(".")) == 32 + 2
    assert name == DNSServer.dnsbl_name("::ffff:7f00:2", "bl.test")


def test_client_address_maps_ipv4_in_ipv6_and_rejects_junk() -> None:
    assert client_address("::ffff:192.0.2.1") == v4("192.0.2.1")
    assert client_address("2001:db8::1%eth0") == ipaddress.IPv6Address("2001:db8::1")
    assert client_address("?") is None


def test_domain_names_for_right_hand_side_lists() -> None:
    assert domain_name("Spam.Example.", "dbl.test") == "spam.example.dbl.test"
    assert domain_name("[192.0.2.1]", "dbl.test") is None
    assert domain_name("a" * 64 + ".example", "dbl.test") is None
    assert domain_name("", "dbl.test") is None


def test_code_filter() -> None:
    default = CodeFilter()
    assert default.counts("127.0.0.2") and default.counts("127.0.1.4")
    # 127.0.0.1 is the negative test entry, 127.255.255.x are the lists' error codes,
    # anything outside 127/8 is a broken or expired zone: none of them is a listing.
    for code in ("127.0.0.1", "127.255.255.254", "192.0.2.1", "junk"):
        assert not default.counts(code), code
    narrow = CodeFilter(["127.0.0.2-127.0.0.11", "127.0.0.64/30"])
    assert narrow.counts("127.0.0.11") and narrow.counts("127.0.0.66")
    assert not narrow.counts("127.0.0.12") and not narrow.counts("127.0.0.10\x00")
    for bad in ("10.0.0.1", "127.0.0.9-127.0.0.2", "127.0.0.x", "127.0.0.0/7"):
        with pytest.raises(ValueError):
            parse_code_range(bad)


# ------------------------------------------------------------------ lookups


async def test_rfc5782_test_entries(dns_server: DNSServer,
                                    caplog: pytest.LogCaptureFixture) -> None:
    dns_server.rfc5782_test_entries("bl.test")
    c = checker(dns_server, [Zone("bl.test")])
    caplog.set_level(logging.INFO, "mailfort.decision")
    listed = await c.check_client(v4("127.0.0.2"))
    assert listed.listed and listed.zone == "bl.test" and listed.hits[0].codes == ("127.0.0.2",)
    assert "dnsbl [127.0.0.2] listed in bl.test (127.0.0.2) weight=1" in caplog.text
    assert not (await c.check_client(v4("127.0.0.1"))).listed
    six = await c.check_client(ipaddress.IPv6Address("::ffff:7f00:2"))
    assert six.listed
    assert (DNSServer.dnsbl_name("::ffff:7f00:2", "bl.test"), "A") in dns_server.queries
    assert not (await c.check_client(ipaddress.IPv6Address("::ffff:7f00:1"))).listed


async def test_weights_and_threshold(dns_server: DNSServer) -> None:
    dns_server.list_ip("one.test", "192.0.2.1").list_ip("two.test", "192.0.2.1")
    dns_server.list_ip("one.test", "192.0.2.7")
    zones = [Zone("one.test", 1), Zone("two.test", 2), Zone("three.test", 1)]
    c = checker(dns_server, zones, threshold=3)
    both = await c.check_client(v4("192.0.2.1"))
    assert both.listed and both.score == 3 and both.zone == "two.test"
    one = await c.check_client(v4("192.0.2.7"))
    assert not one.listed and one.score == 1  # found, but under the threshold
    # every zone is asked, side by side
    asked = {n for n, _ in dns_server.queries}
    assert {"1.2.0.192.one.test", "1.2.0.192.two.test", "1.2.0.192.three.test"} <= asked


async def test_per_zone_return_code_filter(dns_server: DNSServer) -> None:
    dns_server.list_ip("bl.test", "192.0.2.1", code="127.0.0.2")
    dns_server.list_ip("bl.test", "192.0.2.2", code="127.0.0.20")  # e.g. a "policy" listing
    dns_server.list_ip("bl.test", "192.0.2.3", code="127.255.255.254")  # "query refused"
    c = checker(dns_server, [Zone("bl.test", codes=CodeFilter(["127.0.0.2-127.0.0.11"]))])
    assert (await c.check_client(v4("192.0.2.1"))).listed
    assert not (await c.check_client(v4("192.0.2.2"))).listed
    assert not (await c.check_client(v4("192.0.2.3"))).listed


async def test_timeout_fails_open_quickly(dns_server: DNSServer,
                                          caplog: pytest.LogCaptureFixture) -> None:
    name = DNSServer.dnsbl_name("192.0.2.1", "slow.test")
    dns_server.timeout(name)
    dns_server.timeout(DNSServer.dnsbl_name("192.0.2.1", "slow2.test"))
    dns_server.list_ip("fast.test", "192.0.2.9")
    c = checker(dns_server, [Zone("slow.test"), Zone("slow2.test"), Zone("fast.test")], timeout=0.5)
    start = time.monotonic()
    verdict = await c.check_client(v4("192.0.2.1"))
    # two zones timing out at 0.5 s each, side by side: well under their 1 s in a row
    assert 0.45 < time.monotonic() - start < 0.95
    assert not verdict.listed and verdict.errors == ("slow.test", "slow2.test")
    assert f"dnsbl lookup {name} failed" in caplog.text and "fail open" in caplog.text


async def test_servfail_fails_open(dns_server: DNSServer) -> None:
    dns_server.servfail(DNSServer.dnsbl_name("192.0.2.1", "bl.test"))
    verdict = await checker(dns_server, [Zone("bl.test")]).check_client(v4("192.0.2.1"))
    assert not verdict.listed and verdict.errors == ("bl.test",)


async def test_cache_honours_ttl(dns_server: DNSServer) -> None:
    clock = Clock()
    dns_server.list_ip("bl.test", "192.0.2.1", ttl=30)
    c = checker(dns_server, [Zone("bl.test")], clock=clock)
    name = DNSServer.dnsbl_name("192.0.2.1", "bl.test")

    def asked() -> int:
        return sum(1 for n, t in dns_server.queries if n == name and t == "A")

    assert (await c.check_client(v4("192.0.2.1"))).listed
    clock.now += 29
    assert (await c.check_client(v4("192.0.2.1"))).listed
    assert asked() == 1  # from the cache
    dns_server.remove(name)  # delisted
    clock.now += 2  # past the TTL
    assert not (await c.check_client(v4("192.0.2.1"))).listed
    assert asked() == 2


async def test_failures_are_not_cached(dns_server: DNSServer) -> None:
    name = DNSServer.dnsbl_name("192.0.2.1", "bl.test")
    dns_server.servfail(name)
    c = checker(dns_server, [Zone("bl.test")])
    assert not (await c.check_client(v4("192.0.2.1"))).listed
    dns_server.remove(name)
    dns_server.list_ip("bl.test", "192.0.2.1")
    assert (await c.check_client(v4("192.0.2.1"))).listed


async def test_right_hand_side_list(dns_server: DNSServer) -> None:
    dns_server.rfc5782_test_entries("dbl.test")
    c = checker(dns_server, [])
    zones = [Zone("dbl.test")]
    assert (await c.check_domain("TEST", zones)).listed
    assert not (await c.check_domain("invalid", zones)).listed
    assert not (await c.check_domain("[127.0.0.2]", zones)).listed
