"""DNS blocklists (RFC 5782): is a client address, or a domain, listed, and does it count?

A client is looked up in every configured zone at once (``4.3.2.1.zone`` for 1.2.3.4,
32 reversed nibbles for IPv6). Each zone that lists it adds its weight; the client is
refused when the sum reaches the threshold, so one aggressive list alone need not block
anybody. Only answers in 127.0.0.0/8 count, never 127.0.0.1 (RFC 5782 §5: the negative test
entry) nor 127.255.255.0/24 (the error codes some lists answer when they refuse a query),
and a zone may narrow them to its own listing codes. A DNS failure or a timeout never
lists anybody: it is logged and the mail goes on (fail open).

Answers are cached for their TTL (and a negative answer for a short fixed time), bounded in
size, so a client that reconnects does not cost new queries.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.resolver

from mailfort.policy import decisionlog
from mailfort.protocol.dnsbl_codes import LISTING_NET, parse_code_range

log = logging.getLogger("mailfort.dnsbl")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_ERROR_NET = ipaddress.ip_network("127.255.255.0/24")
_NEGATIVE_TEST = ipaddress.ip_address("127.0.0.1")
NEGATIVE_TTL = 60.0  # seconds a "not listed" answer is kept
MAX_TTL = 3600.0


def client_address(ip: str) -> IPAddress | None:
    """The address a client is looked up under: an IPv4-mapped IPv6 peer is its IPv4
    address (the client is an IPv4 host on a dual-stack socket). None if not an address."""
    try:
        addr = ipaddress.ip_address(ip.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def reverse_name(addr: IPAddress, zone: str) -> str:
    """The query name of RFC 5782 §2.1 (IPv4, reversed octets) and §2.4 (IPv6, reversed
    nibbles), taking the address exactly as given (``::ffff:7f00:2`` stays IPv6)."""
    if isinstance(addr, ipaddress.IPv4Address):
        labels = reversed(str(addr).split("."))
    else:
        labels = reversed(addr.exploded.replace(":", ""))
    return ".".join(labels) + "." + zone.strip(".").lower()


def domain_name(domain: str, zone: str) -> str | None:
    """The query name of a right-hand-side (domain) list, or None for what cannot be one
    (an address literal, an empty or over-long name)."""
    d = domain.strip().strip(".").lower()
    if not d or d.startswith("[") or " " in d:
        return None
    name = f"{d}.{zone.strip('.').lower()}"
    if len(name) > 253 or any(not 0 < len(label) <= 63 for label in name.split(".")):
        return None
    return name


class CodeFilter:
    """Which answers count as a listing for one zone: ranges like ``127.0.0.2-127.0.0.11``,
    single addresses or networks; empty means every 127.0.0.0/8 listing code."""

    def __init__(self, specs: Sequence[str] = ()) -> None:
        self.ranges: list[tuple[int, int]] = []
        for spec in specs:
            self.ranges.append(parse_code_range(spec))

    def counts(self, code: str) -> bool:
        try:
            addr = ipaddress.IPv4Address(code)
        except ValueError:
            return False
        if addr not in LISTING_NET or addr in _ERROR_NET or addr == _NEGATIVE_TEST:
            return False
        if not self.ranges:
            return True
        n = int(addr)
        return any(lo <= n <= hi for lo, hi in self.ranges)


@dataclass(frozen=True)
class Zone:
    name: str
    weight: int = 1
    codes: CodeFilter = field(default_factory=CodeFilter)


@dataclass(frozen=True)
class Hit:
    """One zone that lists the client (or domain), with the codes that counted."""

    zone: str
    weight: int
    codes: tuple[str, ...]


@dataclass(frozen=True)
class Verdict:
    """The result over every zone: listed when ``score`` reaches the threshold."""

    hits: tuple[Hit, ...] = ()
    score: int = 0
    listed: bool = False
    errors: tuple[str, ...] = ()  # zones that failed (fail open)

    @property
    def zone(self) -> str:
        """The zone named in the refusal: the heaviest hit."""
        return max(self.hits, key=lambda h: h.weight).zone if self.hits else ""


NOT_LISTED = Verdict()


class _Cache:
    """name -> (codes, expires), LRU-bounded; expiry on the injectable clock."""

    def __init__(self, size: int, clock: Callable[[], float]) -> None:
        self.size = size
        self.clock = clock
        self.data: OrderedDict[str, tuple[tuple[str, ...], float]] = OrderedDict()

    def get(self, name: str) -> tuple[str, ...] | None:
        entry = self.data.get(name)
        if entry is None:
            return None
        if entry[1] <= self.clock():
            del self.data[name]
            return None
        self.data.move_to_end(name)
        return entry[0]

    def put(self, name: str, codes: tuple[str, ...], ttl: float) -> None:
        if self.size <= 0 or ttl <= 0:
            return
        self.data[name] = (codes, self.clock() + min(ttl, MAX_TTL))
        self.data.move_to_end(name)
        while len(self.data) > self.size:
            self.data.popitem(last=False)


class DNSBLChecker:
    """Looks clients and domains up in their zones, in parallel, within ``timeout``."""

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        zones: Iterable[Zone],
        *,
        threshold: int = 1,
        timeout: float = 2.0,
        cache_size: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.resolver = resolver
        self.zones = tuple(zones)
        self.threshold = threshold
        self.timeout = timeout
        self.cache = _Cache(cache_size, clock)

    async def check_client(self, addr: IPAddress) -> Verdict:
        """The verdict for one client address over every zone."""
        names = [(z, reverse_name(addr, z.name)) for z in self.zones]
        verdict = await self._check(names)
        for hit in verdict.hits:
            decisionlog.dnsbl_listed(str(addr), hit.zone, hit.codes, hit.weight)
        return verdict

    async def check_domain(self, domain: str, zones: Iterable[Zone]) -> Verdict:
        """A right-hand-side list check of a domain (sender domain, HELO name): listed
        as soon as one of its zones lists it."""
        names = []
        for z in zones:
            name = domain_name(domain, z.name)
            if name is not None:
                names.append((z, name))
        return await self._check(names, threshold=1)

    async def _check(self, names: list[tuple[Zone, str]], threshold: int | None = None) -> Verdict:
        if not names:
            return NOT_LISTED
        # Cached answers first, without a task each: a returning client costs no DNS.
        results = [self.cache.get(name) for _, name in names]
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            found = await asyncio.gather(*(self._lookup(names[i][1]) for i in missing))
            for i, codes in zip(missing, found, strict=True):
                results[i] = codes
        hits, errors = [], []
        for (zone, _), codes in zip(names, results, strict=True):
            if codes is None:
                errors.append(zone.name)
                continue
            counted = tuple(c for c in codes if zone.codes.counts(c))
            if counted:
                hits.append(Hit(zone.name, zone.weight, counted))
            elif codes:
                log.info("dnsbl %s answered %s: not a listing code, ignored",
                         zone.name, ",".join(codes))
        score = sum(h.weight for h in hits)
        limit = self.threshold if threshold is None else threshold
        return Verdict(tuple(hits), score, score >= limit, tuple(errors))

    async def _lookup(self, name: str) -> tuple[str, ...] | None:
        """The A records at ``name`` (() when none), or None when DNS failed."""
        cached = self.cache.get(name)
        if cached is not None:
            return cached
        try:
            answer = await asyncio.wait_for(
                self.resolver.resolve(name, "A", search=False, lifetime=self.timeout),
                self.timeout + 0.5,
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            self.cache.put(name, (), NEGATIVE_TTL)
            return ()
        except (dns.exception.DNSException, TimeoutError, OSError) as exc:
            log.warning("dnsbl lookup %s failed (%s): not listed (fail open)",
                        name, type(exc).__name__)
            return None
        codes = tuple(sorted({r.address for r in answer}))
        ttl = answer.rrset.ttl if answer.rrset is not None else NEGATIVE_TTL
        self.cache.put(name, codes, float(ttl))
        return codes

