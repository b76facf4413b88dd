"""The sender checks' DNS: answers and failures cached, so a dead domain costs one wait."""

from __future__ import annotations

import time

import pytest

from mailfort.policy.dnslookup import DNSTempError, Lookup
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
