"""DNS: MX, SPF and DMARC of the local domain, and the server's addresses on DNSBLs.

The resolver is configurable (``--resolver IP:PORT``) so that tests point it at their
own DNS server; every query has the run's timeout.
"""

from __future__ import annotations

import ipaddress
import socket

import dns.exception
import dns.resolver

from mailfort.audit.client import BudgetSpent
from mailfort.audit.context import Context
from mailfort.audit.registry import FAIL, INCONCLUSIVE, PASS, WARN, Stop, Verdict, check, skip


def resolver(ctx: Context) -> dns.resolver.Resolver:
    t = ctx.target
    if t.resolver:
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [t.resolver[0]]
        r.port = t.resolver[1]
    else:
        r = dns.resolver.Resolver()
    left = ctx.remaining()
    if left <= 0:
        raise BudgetSpent("the run's time budget ran out")
    r.timeout = r.lifetime = min(t.timeout, 5.0, left)
    return r


def txt(ctx: Context, name: str) -> list[str] | None:
    """TXT strings at ``name``; [] when none; None when the name does not exist."""
    try:
        answer = resolver(ctx).resolve(name, "TXT")
    except dns.resolver.NXDOMAIN:
        return None
    except dns.resolver.NoAnswer:
        return []
    out = ["".join(part.decode("utf-8", "replace") for part in r.strings) for r in answer]
    ctx.note(f"TXT {name}: " + " | ".join(out)[:150])
    return out


# RFC 6761 / RFC 2606 top-level names that the public DNS never holds: asking the system's
# resolver about them only sends a query off the machine for nothing (the README's example
# audits example.test). With --resolver, the operator's own server may well hold them.
SPECIAL_USE = frozenset({"test", "example", "invalid", "localhost"})


def _domain(ctx: Context) -> str:
    """The local domain when it exists in DNS, else SKIP (looked up once per run)."""
    d = ctx.target.domain
    if not d:
        raise skip("need.domain")
    if not ctx.target.resolver and d.rstrip(".").rpartition(".")[2].lower() in SPECIAL_USE:
        raise skip("dns.special-use", domain=d)
    known = ctx.cache.get("dns.domain")
    if isinstance(known, Stop):
        raise known
    if known:
        return d
    try:
        _lookup_domain(ctx, d)
    except Stop as stop:
        ctx.cache["dns.domain"] = stop
        raise
    ctx.cache["dns.domain"] = True
    return d


def _lookup_domain(ctx: Context, d: str) -> None:
    try:
        resolver(ctx).resolve(d, "SOA")
    except dns.resolver.NXDOMAIN as exc:
        raise skip("dns.no-domain", domain=d) from exc
    except dns.resolver.NoAnswer:
        pass  # the name exists (it has other records)
    except dns.exception.DNSException as exc:
        raise skip("dns.error", domain=d, error=type(exc).__name__) from exc


@check("dns.mx", "7", order=80)
def mx(ctx: Context) -> Verdict:
    d = _domain(ctx)
    try:
        answer = resolver(ctx).resolve(d, "MX")
    except dns.resolver.NoAnswer:
        return Verdict(WARN, "mx.none", {"domain": d})
    hosts = sorted((r.preference, str(r.exchange)) for r in answer)
    ctx.note("MX " + ", ".join(f"{p} {h}" for p, h in hosts))
    if hosts == [(0, ".")]:
        return Verdict(WARN, "mx.null", {"domain": d})
    return Verdict(PASS, "mx.ok", {"hosts": ", ".join(h for _, h in hosts)})


@check("dns.spf", "7", order=81)
def spf(ctx: Context) -> Verdict:
    d = _domain(ctx)
    records = [r for r in (txt(ctx, d) or []) if r.lower().startswith("v=spf1")]
    if not records:
        return Verdict(WARN, "spf.none", {"domain": d})
    if len(records) > 1:
        return Verdict(WARN, "spf.many", {"n": len(records)})
    terms = records[0].lower().split()
    if "+all" in terms or "all" in terms:
        return Verdict(FAIL, "spf.pass-all", {"record": records[0]})
    if "?all" in terms or not any(t.endswith("all") or t.startswith("redirect=")
                                  for t in terms):
        return Verdict(WARN, "spf.neutral", {"record": records[0]})
    return Verdict(PASS, "spf.ok", {"record": records[0]})


@check("dns.dmarc", "7", order=82)
def dmarc(ctx: Context) -> Verdict:
    d = _domain(ctx)
    records = [r for r in (txt(ctx, f"_dmarc.{d}") or []) if r.startswith("v=DMARC1")]
    if len(records) != 1:
        return Verdict(WARN, "dmarc.none" if not records else "dmarc.many", {"domain": d})
    tags = dict(part.strip().partition("=")[::2] for part in records[0].split(";")
                if "=" in part)
    policy = tags.get("p", "").strip().lower()
    if policy not in ("quarantine", "reject"):
        return Verdict(WARN, "dmarc.weak", {"policy": policy or "-"})
    return Verdict(PASS, "dmarc.ok", {"policy": policy})


def dnsbl_name(ip: str, zone: str) -> str:
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return ".".join(reversed(ip.split("."))) + "." + zone
    return ".".join(reversed(addr.exploded.replace(":", ""))) + "." + zone


@check("dns.dnsbl", "7", order=83)
def dnsbl(ctx: Context) -> Verdict:
    _domain(ctx)
    try:
        ips = sorted({ai[4][0] for ai in socket.getaddrinfo(ctx.target.host, None,
                                                            type=socket.SOCK_STREAM)})
    except OSError as exc:
        raise skip("dns.error", domain=ctx.target.host, error=str(exc)) from exc
    listed, errors, asked = [], [], 0
    for ip in ips:
        for zone in ctx.target.dnsbls:
            asked += 1
            name = dnsbl_name(ip, zone)
            try:
                answer = resolver(ctx).resolve(name, "A")
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                ctx.note(f"{name}: not listed")
                continue
            except dns.exception.DNSException as exc:
                if ctx.remaining() <= 0:  # cut by the budget, not the zone's error
                    raise BudgetSpent("the run's time budget ran out") from exc
                errors.append(f"{zone}: {type(exc).__name__}")
                continue
            codes = [r.address for r in answer]
            if all(c.startswith("127.255.255.") for c in codes):
                errors.append(f"{zone}: refused the query ({codes[0]})")  # DNSBL error code
                continue
            listed.append(f"{ip} on {zone} ({', '.join(codes)})")
    if listed:
        return Verdict(FAIL, "dnsbl.listed", {"what": "; ".join(listed)})
    if errors and len(errors) == asked:
        return Verdict(INCONCLUSIVE, "dnsbl.errors", {"what": "; ".join(errors)})
    return Verdict(PASS, "dnsbl.clean", {"ips": ", ".join(ips),
                                         "zones": ", ".join(ctx.target.dnsbls)})
