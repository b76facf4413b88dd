"""SPF (RFC 7208): may this client IP send for the MAIL FROM (or HELO) domain?

The evaluation is pyspf's, the reference implementation of the RFC (macros, include and
redirect, the limits of §4.6.4: 10 mechanisms that query DNS, 2 void lookups), with its
DNS answered by our cached ``Lookup`` on the configured resolver instead of the global
default one. It is synchronous: call it from a worker thread, never from the event loop.
"""

from __future__ import annotations

import ipaddress
import threading
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
    return out


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


def check(
    lookup: Lookup, ip: str, identity: str, domain: str, sender: str, helo: str,
    budget: float = 20.0,
) -> SPFResult:
    """Evaluate one identity; ``budget`` bounds the seconds spent in DNS for it."""
    if not _is_domain(domain):
        return SPFResult("none", identity, domain, "no domain to check")
    _local.lookup = lookup
    try:
        q = _pyspf.query(i=ip, s=sender, h=helo, timeout=budget, querytime=budget)
        result, _code, explanation = q.check()
    except Exception as exc:  # a library defect must not cost a message: say so, go on
        return SPFResult("temperror", identity, domain, f"evaluation failed: {exc}")
    finally:
        _local.lookup = None
    result = str(result).lower()
    if result not in RESULTS:
        result = "permerror"
    return SPFResult(result, identity, domain.lower(), str(explanation))


def check_helo(lookup: Lookup, ip: str, helo: str, budget: float = 20.0) -> SPFResult:
    """RFC 7208 §2.3: the HELO identity, as ``postmaster@<helo>``."""
    return check(lookup, ip, "helo", helo, f"postmaster@{helo}", helo, budget)


def check_mailfrom(
    lookup: Lookup, ip: str, sender: str, helo: str, budget: float = 20.0
) -> SPFResult:
    """RFC 7208 §2.4: the MAIL FROM identity; the null sender is checked as the HELO."""
    if not sender:
        r = check_helo(lookup, ip, helo, budget)
        return SPFResult(r.result, "mailfrom", r.domain, r.reason)
    domain = sender.rpartition("@")[2]
    return check(lookup, ip, "mailfrom", domain, sender, helo, budget)
