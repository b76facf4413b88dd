"""The DNS lookups of sender authentication (SPF, DKIM keys, DMARC records), cached.

Synchronous on purpose: SPF, DKIM and DMARC run in a worker thread, never on the event
loop, and the libraries they use (pyspf, dkimpy) call DNS synchronously. The resolver is
the configured one (``[dns]``), the system one when no nameservers are set. Answers are
cached for their TTL (capped) and failures for a short while, so that a domain whose DNS
is down costs one timeout, not one per message.

``cache_only()`` lets a caller run a check on a thread that must not wait (the event loop):
every lookup is answered from the cache, and the first one that is not (a miss, or an entry
past its TTL) raises ``NotCached``, so the caller runs the whole check again in a worker
thread, where the lookup is made. Nothing expired is ever served.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from mailfort.config import DNSConfig

_MAX_TTL = 3600.0
_FAILURE_TTL = 30.0  # a SERVFAIL or timeout is remembered this long
_MAX_ENTRIES = 10_000
_MAX_NEGATIVE_TTL = 60.0  # a negative answer is kept at most this long
_NO_SOA_TTL = 5.0  # one without an SOA (RFC 2308 §5: should not be cached): a burst's worth


def _negative_ttl(exc: dns.resolver.NXDOMAIN | dns.resolver.NoAnswer) -> float:
    """RFC 2308 §5: a negative answer may be cached for the lesser of its SOA's TTL and
    MINIMUM, here at most ``_MAX_NEGATIVE_TTL``; the SOA is in the authority section."""
    if isinstance(exc, dns.resolver.NXDOMAIN):
        responses = list(exc.responses().values())
    else:
        response = exc.response()
        responses = [response] if response is not None else []
    ttls = [min(rrset.ttl, rrset[0].minimum) for r in responses for rrset in r.authority
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset)]
    return min(min(ttls), _MAX_NEGATIVE_TTL) if ttls else _NO_SOA_TTL


class DNSTempError(Exception):
    """The lookup failed in a way that may not last (timeout, SERVFAIL, no server)."""


class NotCached(BaseException):
    """In ``Lookup.cache_only``: the answer is not in the cache (or has expired). A
    BaseException, so that no check (pyspf, dkimpy, ours) that turns ``Exception`` into a
    temperror or a permerror can make it a result: it always reaches the caller."""


class Lookup:
    """``query(name, type)`` -> rdata list ([] for NXDOMAIN / no data), or DNSTempError."""

    def __init__(self, cfg: DNSConfig) -> None:
        self.cfg = cfg
        if cfg.nameservers:
            r = dns.resolver.Resolver(configure=False)
            r.nameservers = list(cfg.nameservers)
            r.port = cfg.port
        else:
            r = dns.resolver.Resolver()
        r.timeout = cfg.timeout
        r.lifetime = cfg.timeout
        self.resolver = r
        self._cache: OrderedDict[tuple[str, str], tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._local = threading.local()  # .cache_only: this thread may not wait for DNS

    @contextmanager
    def cache_only(self) -> Iterator[None]:
        """Within: answers come from the cache only; a miss raises ``NotCached``. Per
        thread: the worker threads that share this Lookup still query DNS."""
        self._local.cache_only = True
        try:
            yield
        finally:
            self._local.cache_only = False

    @contextmanager
    def expiry(self) -> Iterator[list[float]]:
        """Within: ``[t]``, the monotonic time at which the first of the answers this
        thread was given expires (``inf`` while none was). What was computed from those
        answers alone is valid until then (SPF's results, ``spf.ResultCache``)."""
        earliest = [math.inf]
        self._local.expiry = earliest
        try:
            yield earliest
        finally:
            self._local.expiry = None

    def query(self, name: str, rdtype: str, timeout: float | None = None) -> list[Any]:
        key = (name.lower().rstrip("."), rdtype)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                earliest = getattr(self._local, "expiry", None)
                if earliest is not None and hit[0] < earliest[0]:
                    earliest[0] = hit[0]
                if isinstance(hit[1], DNSTempError):
                    raise hit[1]
                return list(hit[1])
        if getattr(self._local, "cache_only", False):
            raise NotCached(key)
        # ``timeout``: what the caller has left of its own budget; never more than ours.
        lifetime = self.resolver.lifetime if timeout is None else min(timeout,
                                                                      self.resolver.lifetime)
        try:
            answer = self.resolver.resolve(
                dns.name.from_text(key[0]), rdtype, search=False,
                lifetime=max(lifetime, 0.05),
            )
            value: Any = list(answer)
            ttl = min(float(answer.rrset.ttl if answer.rrset is not None else 0), _MAX_TTL)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer) as exc:
            value, ttl = [], _negative_ttl(exc)  # no such name, or no record of the type
        except (dns.exception.SyntaxError, dns.name.LabelTooLong, dns.name.EmptyLabel,
                dns.name.NameTooLong):
            value, ttl = [], _MAX_NEGATIVE_TTL  # a name DNS could not hold: never will
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.YXDOMAIN) as exc:
            value, ttl = DNSTempError(f"{key[0]} {rdtype}: {type(exc).__name__}"), _FAILURE_TTL
        earliest = getattr(self._local, "expiry", None)
        if earliest is not None and now + ttl < earliest[0]:
            earliest[0] = now + ttl
        with self._lock:
            self._cache[key] = (now + ttl, value)
            self._cache.move_to_end(key)
            while len(self._cache) > _MAX_ENTRIES:
                self._cache.popitem(last=False)
        if isinstance(value, DNSTempError):
            raise value
        return list(value)

    def txt(self, name: str, timeout: float | None = None) -> list[str]:
        """Each TXT record's strings joined (RFC 7208 §3.3, RFC 6376 §3.6.2.2)."""
        return [
            b"".join(rr.strings).decode("utf-8", "replace")
            for rr in self.query(name, "TXT", timeout)
        ]
