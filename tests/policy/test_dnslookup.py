"""The sender checks' DNS: answers and failures cached, so a dead domain costs one wait."""

from __future__ import annotations

import threading
import time

import pytest

from mailfort.policy.dnslookup import DNSTempError, Lookup, NotCached
from tests.dnsserver import DNSServer


def test_timeout_is_paid_once_then_cached(dns_server: DNSServer, lookup: Lookup) -> None:
    dns_server.timeout("slow.test")
    t0 = time.monotonic()
    with pytest.raises(DNSTempError):
        lookup.txt("slow.test")
    assert time.monotonic() - t0 >= 0.4  # the configured 0.5 s
    t1 = time.monotonic()
    with pytest.raises(DNSTempError):
        lookup.txt("slow.test")
    assert time.monotonic() - t1 < 0.1
    assert dns_server.queries.count(("slow.test", "TXT")) >= 1


def test_answers_cached_nxdomain_empty_servfail_temp(dns_server: DNSServer,
                                                     lookup: Lookup) -> None:
    dns_server.add_txt("a.test", "v=spf1 -all")
    dns_server.add_txt("long.test", "x" * 300)  # two strings, joined
    dns_server.servfail("broken.test")
    assert lookup.txt("A.test.") == ["v=spf1 -all"]
    assert lookup.txt("a.test") == ["v=spf1 -all"]
    assert dns_server.queries.count(("a.test", "TXT")) == 1
    assert lookup.txt("long.test") == ["x" * 300]
    assert lookup.txt("missing.test") == []
    assert lookup.txt("a" * 70 + ".test") == []  # not a name DNS can hold
    with pytest.raises(DNSTempError):
        lookup.txt("broken.test")


def test_answer_is_served_within_its_ttl_and_asked_again_after(dns_server: DNSServer,
                                                                lookup: Lookup) -> None:
    dns_server.add_txt("ttl.test", "v=spf1 -all", ttl=1)
    assert lookup.txt("ttl.test") == ["v=spf1 -all"]
    dns_server.remove("ttl.test").add_txt("ttl.test", "v=spf1 +all", ttl=1)
    assert lookup.txt("ttl.test") == ["v=spf1 -all"]  # within its TTL: the cached one
    assert dns_server.queries.count(("ttl.test", "TXT")) == 1
    time.sleep(1.1)
    assert lookup.txt("ttl.test") == ["v=spf1 +all"]  # never past it
    assert dns_server.queries.count(("ttl.test", "TXT")) == 2


@pytest.mark.parametrize("kind", ["nxdomain", "nodata"])
def test_negative_answer_is_kept_no_longer_than_its_soa_says(
        dns_server: DNSServer, lookup: Lookup, kind: str) -> None:
    """RFC 2308: a negative answer lives as long as its SOA's TTL and MINIMUM (it was a
    fixed minute); a domain that publishes a record is seen once that has passed."""
    dns_server.set_negative_ttl("neg.test", 1)
    if kind == "nodata":
        dns_server.add_a("_dmarc.neg.test", "192.0.2.1")
    assert lookup.txt("_dmarc.neg.test") == []
    dns_server.add_txt("_dmarc.neg.test", "v=DMARC1; p=reject")
    assert lookup.txt("_dmarc.neg.test") == []  # cached
    time.sleep(1.1)
    assert lookup.txt("_dmarc.neg.test") == ["v=DMARC1; p=reject"]


def test_cache_only_serves_fresh_answers_and_raises_for_the_rest(
        dns_server: DNSServer, lookup: Lookup) -> None:
    """What lets a check run on the event loop: only fresh cached answers, never a wait;
    a miss or an expired entry is NotCached (a BaseException, which no check turns into a
    result), and other threads sharing the Lookup still ask DNS meanwhile."""
    dns_server.add_txt("c.test", "v=spf1 -all", ttl=1)
    with lookup.cache_only(), pytest.raises(NotCached):
        lookup.txt("c.test")
    assert dns_server.queries.count(("c.test", "TXT")) == 0
    assert not issubclass(NotCached, Exception)
    assert lookup.txt("c.test") == ["v=spf1 -all"]
    with lookup.cache_only():
        assert lookup.txt("c.test") == ["v=spf1 -all"]
        other: list[list[str]] = []
        t = threading.Thread(target=lambda: other.append(lookup.txt("d.test")))
        t.start()
        t.join()
        assert other == [[]]  # asked DNS: the other thread is not cache-only
    time.sleep(1.1)
    with lookup.cache_only(), pytest.raises(NotCached):
        lookup.txt("c.test")  # expired: never served
    assert lookup.txt("c.test") == ["v=spf1 -all"]
    assert dns_server.queries.count(("c.test", "TXT")) == 2
