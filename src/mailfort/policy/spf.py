"""SPF (RFC 7208): may this client IP send for the MAIL FROM (or HELO) domain?

The evaluation is pyspf's, the reference implementation of the RFC (macros, include and
redirect, the limits of §4.6.4: 10 mechanisms that query DNS, 2 void lookups), with its
DNS answered by our cached ``Lookup`` on the configured resolver instead of the global
default one. It is synchronous: call it from a worker thread, never from the event loop.
"""

from __future__ import annotations

import ipaddress
import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import spf as _pyspf

from mailfort.policy.dnslookup import DNSTempError, Lookup

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")


@dataclass(frozen=True)
class SPFResult:
    result: str  # one of RESULTS
    identity: str  # "mailfrom" or "helo"
    domain: str  # the domain checked ("" when there was none to check)
    reason: str = ""


# pyspf calls a module-level ``DNSLookup(name, qtype, strict, timeout)``; route it to the
# Lookup of the calling thread so each node uses its own resolver (tests: their own DNS).
_local = threading.local()
_library_lookup = _pyspf.DNSLookup


def _dns_lookup(name: str, qtype: str, strict: Any = True, timeout: float = 20) -> list[Any]:
    lookup: Lookup | None = getattr(_local, "lookup", None)
    if lookup is None:
        return list(_library_lookup(name, qtype, strict, timeout))
    try:
        rdatas = lookup.query(name, qtype, timeout)
    except DNSTempError as exc:
        raise _pyspf.TempError(f"DNS {exc}") from None
    out: list[Any] = []
    for rr in rdatas:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), rr.address))
        elif qtype == "MX":
            out.append(((name, qtype), (rr.preference, rr.exchange.to_text(True))))
        elif qtype == "PTR":
            out.append(((name, qtype), rr.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), tuple(rr.strings)))
            if any(_TIME_MACRO.search(s) for s in rr.strings):
                _local.timed = True
    return out


# RFC 7208 §7.2: the "t" macro expands to the current time, the only input of a result
# besides the client's IP, HELO, sender and DNS answers: a record that uses it is never
# answered from ``ResultCache``.
_TIME_MACRO = re.compile(rb"%\{t", re.IGNORECASE)


_pyspf.DNSLookup = _dns_lookup


def _is_domain(name: str) -> bool:
    if not name or "." not in name.strip(".") or name.startswith("["):
        return False
    if ":" not in name and not name.replace(".", "").isdigit():
        return True  # neither IPv6 nor dotted digits: no address (spares a ValueError)
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return True
    return False


# Results worth keeping: those that follow from the DNS answers alone. A temperror may
# come from the time budget, a permerror from a library defect: evaluated again each time.
_KEPT = frozenset(("pass", "fail", "softfail", "neutral", "none"))


class ResultCache:
    """SPF results by (client IP, identity, sender, HELO), each until the first of the DNS
    answers it was computed from expires: the same client sending for the same sender
    again (a sender's every message) is answered without evaluating the records again
    (pyspf's parse and walk: most of the time of a cached check, on the event loop)."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._results: OrderedDict[tuple[str, ...], tuple[float, SPFResult]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, ...]) -> SPFResult | None:
        with self._lock:
            hit = self._results.get(key)
            if hit is None:
                return None
            if hit[0] <= time.monotonic():
                del self._results[key]
                return None
            self._results.move_to_end(key)
            return hit[1]

    def put(self, key: tuple[str, ...], until: float, result: SPFResult) -> None:
        with self._lock:
            self._results[key] = (until, result)
            self._results.move_to_end(key)
            while len(self._results) > self.size:
                self._results.popitem(last=False)


def check(
    lookup: Lookup, ip: str, identity: str, domain: str, sender: str, helo: str,
    budget: float = 20.0, cache: ResultCache | None = None,
) -> SPFResult:
    """Evaluate one identity; ``budget`` bounds the seconds spent in DNS for it.
    ``cache``: answer from it when it can, keep the result in it when it may."""
    if not _is_domain(domain):
        return SPFResult("none", identity, domain, "no domain to check")
    key = (ip, identity, sender, helo)
    if cache is not None and (kept := cache.get(key)) is not None:
        return kept
    _local.lookup, _local.timed = lookup, False
    try:
        with lookup.expiry() as until:
            q = _pyspf.query(i=ip, s=sender, h=helo, timeout=budget, querytime=budget)
            result, _code, explanation = q.check()
    except Exception as exc:  # a library defect must not cost a message: say so, go on
        return SPFResult("temperror", identity, domain, f"evaluation failed: {exc}")
    finally:
        _local.lookup = None
    result = str(result).lower()
    if result not in RESULTS:
        result = "permerror"
    out = SPFResult(result, identity, domain.lower(), str(explanation))
    if cache is not None and result in _KEPT and not _local.timed and until[0] < math.inf:
        cache.put(key, until[0], out)
    return out


def check_helo(lookup: Lookup, ip: str, helo: str, budget: float = 20.0,
               cache: ResultCache | None = None) -> SPFResult:
    """RFC 7208 §2.3: the HELO identity, as ``postmaster@<helo>``."""
    return check(lookup, ip, "helo", helo, f"postmaster@{helo}", helo, budget, cache)


def check_mailfrom(
    lookup: Lookup, ip: str, sender: str, helo: str, budget: float = 20.0,
    cache: ResultCache | None = None,
) -> SPFResult:
    """RFC 7208 §2.4: the MAIL FROM identity; the null sender is checked as the HELO."""
    if not sender:
        r = check_helo(lookup, ip, helo, budget, cache)
        return SPFResult(r.result, "mailfrom", r.domain, r.reason)
    domain = sender.rpartition("@")[2]
    return check(lookup, ip, "mailfrom", domain, sender, helo, budget, cache)
