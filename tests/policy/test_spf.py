"""SPF (RFC 7208) against the real loopback DNS server: results and the lookup limits."""

from __future__ import annotations

import time
from typing import Any

import pytest

from mailfort.policy import spf
from mailfort.policy.dnslookup import Lookup
from tests.dnsserver import DNSServer

IP = "192.0.2.10"


def mailfrom(lookup: Lookup, sender: str = "a@s.test", ip: str = IP) -> spf.SPFResult:
    return spf.check_mailfrom(lookup, ip, sender, "client.s.test", budget=5)


def test_pass_fail_softfail_neutral_none(dns_server: DNSServer, lookup: Lookup) -> None:
    dns_server.add_txt("s.test", "v=spf1 ip4:192.0.2.0/24 -all")
    dns_server.add_txt("soft.test", "v=spf1 ip4:198.51.100.1 ~all")
    dns_server.add_txt("neutral.test", "v=spf1 ?all")
    dns_server.add_a("none.test", "192.0.2.1")  # a name, but no SPF record
    assert mailfrom(lookup).result == "pass"
    assert mailfrom(lookup, ip="203.0.113.5").result == "fail"
    assert mailfrom(lookup, "a@soft.test").result == "softfail"
    assert mailfrom(lookup, "a@neutral.test").result == "neutral"
    assert mailfrom(lookup, "a@none.test").result == "none"


def test_mechanisms_that_query_dns(dns_server: DNSServer, lookup: Lookup) -> None:
    dns_server.add_txt("s.test", "v=spf1 a mx include:other.test -all")
    dns_server.add_a("s.test", "198.51.100.1")
    dns_server.add_mx("s.test", "mx.s.test")
    dns_server.add_a("mx.s.test", "198.51.100.2")
    dns_server.add_txt("other.test", "v=spf1 ip6:2001:db8::/32 -all")
    for ip in ("198.51.100.1", "198.51.100.2", "2001:db8::25"):
        assert mailfrom(lookup, ip=ip).result == "pass", ip
    assert mailfrom(lookup, ip="198.51.100.3").result == "fail"


def test_more_than_ten_dns_mechanisms_is_permerror(dns_server: DNSServer,
                                                   lookup: Lookup) -> None:
    # RFC 7208 §4.6.4: include, a, mx, ptr, exists and redirect count; at most 10.
    chain = " ".join(f"include:i{n}.s.test" for n in range(11))
    dns_server.add_txt("s.test", f"v=spf1 {chain} ip4:{IP} -all")
    for n in range(11):
        dns_server.add_txt(f"i{n}.s.test", "v=spf1 -all")  # no match: go on to the next
    r = mailfrom(lookup)
    assert r.result == "permerror" and "lookups" in r.reason, r
    # Ten are allowed: the same record with one include fewer passes.
    dns_server.remove("s.test")
    chain10 = " ".join(f"include:i{n}.s.test" for n in range(10))
    dns_server.add_txt("s.test", f"v=spf1 {chain10} ip4:{IP} -all")
    fresh = Lookup(lookup.cfg)  # a new cache
    assert mailfrom(fresh).result == "pass"


def test_more_than_two_void_lookups_is_permerror(dns_server: DNSServer,
                                                 lookup: Lookup) -> None:
    dns_server.add_txt("s.test", "v=spf1 a:v1.s.test a:v2.s.test a:v3.s.test ip4:192.0.2.10 -all")
    r = mailfrom(lookup)
    assert r.result == "permerror" and "void" in r.reason.lower(), r


def test_syntax_error_is_permerror(dns_server: DNSServer, lookup: Lookup) -> None:
    dns_server.add_txt("s.test", "v=spf1 ip4:192.0.2.x -all")
    assert mailfrom(lookup).result == "permerror"


def test_dns_failure_is_temperror(dns_server: DNSServer, lookup: Lookup) -> None:
    dns_server.servfail("s.test")
    assert mailfrom(lookup).result == "temperror"
    dns_server.servfail("slow.test")
    assert mailfrom(lookup, "a@slow.test").result == "temperror"


def test_helo_identity_and_null_sender(dns_server: DNSServer, lookup: Lookup) -> None:
    dns_server.add_txt("client.s.test", f"v=spf1 ip4:{IP} -all")
    helo = spf.check_helo(lookup, IP, "client.s.test")
    assert (helo.result, helo.identity, helo.domain) == ("pass", "helo", "client.s.test")
    assert spf.check_helo(lookup, "203.0.113.1", "client.s.test").result == "fail"
    null = mailfrom(lookup, "")  # RFC 7208 §2.4: postmaster@HELO
    assert (null.result, null.identity, null.domain) == ("pass", "mailfrom", "client.s.test")
    assert spf.check_helo(lookup, IP, "[192.0.2.10]").result == "none"



def _counting_queries(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The senders pyspf evaluates records for (each a full evaluation)."""
    evaluated: list[str] = []
    real = spf._pyspf.query.check

    def check(self: Any, *args: Any, **kw: Any) -> Any:
        evaluated.append(self.s)
        return real(self, *args, **kw)

    monkeypatch.setattr(spf._pyspf.query, "check", check)
    return evaluated


def test_a_result_is_kept_until_the_first_of_its_answers_expires(
        dns_server: DNSServer, lookup: Lookup, monkeypatch: pytest.MonkeyPatch) -> None:
    dns_server.add_txt("s.test", "v=spf1 include:i.s.test -all", ttl=60)
    dns_server.add_txt("i.s.test", f"v=spf1 ip4:{IP} -all", ttl=1)  # expires first
    evaluated = _counting_queries(monkeypatch)
    cache = spf.ResultCache()

    def check(sender: str = "a@s.test") -> str:
        return spf.check_mailfrom(lookup, IP, sender, "client.s.test", 5, cache).result

    assert check() == "pass"
    assert check() == "pass" and evaluated == ["a@s.test"]  # the second from the cache
    # Another sender (a macro may name the local part), another IP: evaluated.
    assert check("b@s.test") == "pass" and len(evaluated) == 2
    assert spf.check_mailfrom(lookup, "203.0.113.5", "a@s.test", "client.s.test", 5,
                              cache).result == "fail"
    # The included record changes; once its TTL is over the result follows it.
    dns_server.remove("i.s.test").add_txt("i.s.test", "v=spf1 -all", ttl=60)
    time.sleep(1.1)
    assert check() == "fail" and len(evaluated) == 4


def test_time_macros_and_temperrors_are_never_kept(
        dns_server: DNSServer, lookup: Lookup, monkeypatch: pytest.MonkeyPatch) -> None:
    # RFC 7208 §7.2-7.3: %{t}, the time, may appear in the explanation of a fail.
    dns_server.add_txt("s.test", "v=spf1 ip4:198.51.100.0/24 -all exp=why.s.test")
    dns_server.add_txt("why.s.test", "refused at %{t}")
    dns_server.add_txt("down.test", "v=spf1 include:slow.test -all")
    dns_server.servfail("slow.test")
    evaluated = _counting_queries(monkeypatch)
    cache = spf.ResultCache()
    for _ in range(2):
        r = spf.check_mailfrom(lookup, IP, "a@s.test", "h.test", 5, cache)
        assert r.result == "fail" and "refused at 1" in r.reason, r
        assert spf.check_mailfrom(lookup, IP, "a@down.test", "h.test", 5,
                                  cache).result == "temperror"
    assert evaluated == ["a@s.test", "a@down.test"] * 2
