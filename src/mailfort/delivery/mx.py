"""Where to deliver a domain's mail: configured route, else MX (RFC 5321 §5.1, RFC 7505).

Host names are resolved to addresses with the same resolver as the MX records (dnspython,
pointed at ``cfg.dns`` when set), never the system resolver, so that tests and the lab see
one consistent DNS. The outcome is a list of ``Target`` in the order to try them, or a
``LookupFailure`` that says whether retrying could help.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from mailfort.config import Config, Route

SMTP_PORT = 25


@dataclass(frozen=True)
class Target:
    """One host to try: a name (for TLS SNI and messages), its addresses, a port."""

    host: str
    addresses: tuple[str, ...]
    port: int
    preference: int = 0
    require_tls: bool = False


class LookupFailure(Exception):
    """No target for the domain; ``permanent`` means bounce, otherwise retry later."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message

    @property
    def permanent(self) -> bool:
        return self.status.startswith("5")


def make_resolver(cfg: Config) -> dns.asyncresolver.Resolver:
    """The configured resolver; the system one when no nameservers are configured."""
    if cfg.dns.nameservers:
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = list(cfg.dns.nameservers)
        r.port = cfg.dns.port
    else:
        r = dns.asyncresolver.Resolver()
    r.timeout = cfg.dns.timeout
    r.lifetime = cfg.dns.timeout
    return r


def route_for(cfg: Config, domain: str) -> Route | None:
    """The configured route: exact domain first, then the "*" default."""
    d = domain.lower().rstrip(".")
    for key, route in cfg.routes.items():
        if key.lower().rstrip(".") == d:
            return route
    return cfg.routes.get("*")


def requires_tls(cfg: Config, domain: str, route: Route | None = None) -> bool:
    d = domain.lower().rstrip(".")
    listed = any(x.lower().rstrip(".") == d for x in cfg.require_tls_domains)
    return listed or bool(route and route.require_tls)


# IPv6 prefixes whose last 32 bits are an IPv4 address the packet really goes to: NAT64
# well-known (RFC 6052), IPv4-translated (RFC 2765, "::ffff:0:a.b.c.d"), IPv4-compatible
# (RFC 4291 §2.5.5.1, deprecated "::a.b.c.d"; :: and ::1 themselves are judged as IPv6).
_EMBEDS_IPV4_LAST32 = tuple(ipaddress.IPv6Network(n) for n in
                            ("64:ff9b::/96", "::ffff:0:0:0/96", "::/96"))
# Never a destination on the Internet: NAT64 local-use (RFC 8215, its IPv4 may sit at any
# of the RFC 6052 offsets, so it is not unwrapped) and the deprecated site-local fec0::/10
# (RFC 3879), which Python's ``is_global`` still counts as global.
_NOT_PUBLIC_V6 = tuple(ipaddress.IPv6Network(n) for n in ("64:ff9b:1::/48", "fec0::/10"))


def is_public(address: str) -> bool:
    """A globally routable unicast address: not loopback, private (RFC 1918, unique-local),
    link-local, shared (RFC 6598), multicast, reserved, documentation or unspecified.

    An IPv6 address that carries an IPv4 address the traffic ends at (IPv4-mapped, NAT64,
    6to4, IPv4-compatible or -translated, Teredo's client) is judged by that IPv4 address:
    ``64:ff9b::127.0.0.1`` reaches this host's loopback through a NAT64 gateway.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in net for net in _NOT_PUBLIC_V6):
            return False
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            ip = embedded
    return ip.is_global and not ip.is_multicast


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # the client's address (Teredo itself is not global anyway)
    if int(ip) > 1 and any(ip in net for net in _EMBEDS_IPV4_LAST32):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _inward(domain: str, refused: list[str]) -> LookupFailure:
    shown = ", ".join(refused[:4]) + (", ..." if len(refused) > 4 else "")
    return LookupFailure("5.4.4", f"{domain} resolves only to non-public address {shown}; "
                         "not delivering inward (configure a route to allow it)")


def _ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        return None


async def _addresses(resolver: dns.asyncresolver.Resolver, host: str) -> tuple[str, ...]:
    """A and AAAA of a host. NXDOMAIN/no data give (); SERVFAIL/timeout raise LookupFailure."""
    out: list[str] = []
    errors = 0
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(host, rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.YXDOMAIN):
            errors += 1
            continue
        out.extend(str(rr.address) for rr in answer)
    if not out and errors:
        raise LookupFailure("4.4.3", f"DNS lookup of {host} failed (server failure or timeout)")
    return tuple(out)


async def resolve(
    domain: str,
    cfg: Config,
    *,
    port: int = SMTP_PORT,
    resolver: dns.asyncresolver.Resolver | None = None,
) -> list[Target]:
    """Targets for ``domain`` in the order to try them; raises LookupFailure.

    ``port`` is the SMTP port of MX hosts (25; the tests and the lab use another one).
    """
    resolver = resolver or make_resolver(cfg)
    domain = domain.rstrip(".")
    route = route_for(cfg, domain)
    tls = requires_tls(cfg, domain, route)
    if route is not None:
        ip = _ip(route.host)
        addrs = (ip,) if ip else await _addresses(resolver, route.host)
        if not addrs:
            raise LookupFailure("4.4.4", f"route host {route.host} has no address")
        return [Target(route.host, addrs, route.port, 0, tls)]

    # Past here the addresses come from the destination (its DNS, or the address itself):
    # only public ones, unless the operator allows otherwise (a route, or the test opt-in).
    inward_ok = cfg.delivery.allow_private_destinations
    refused: list[str] = []

    def public(addrs: tuple[str, ...]) -> tuple[str, ...]:
        if inward_ok:
            return addrs
        refused.extend(a for a in addrs if not is_public(a))
        return tuple(a for a in addrs if is_public(a))

    literal = domain.startswith("[") and domain.endswith("]")
    if literal:  # user@[192.0.2.1]: RFC 5321 address literal, no DNS
        ip = _ip(domain.removeprefix("[").removesuffix("]").removeprefix("IPv6:"))
        if ip is None:
            raise LookupFailure("5.1.2", f"bad address literal {domain}")
        if not public((ip,)):
            raise _inward(domain, refused)
        return [Target(ip, (ip,), port, 0, tls)]

    try:
        answer = await resolver.resolve(domain, "MX", search=False)
        mxs = [(int(rr.preference), rr.exchange) for rr in answer]
    except dns.resolver.NXDOMAIN:
        raise LookupFailure("5.1.2", f"domain {domain} does not exist") from None
    except dns.resolver.NoAnswer:
        mxs = []
    except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.YXDOMAIN):
        raise LookupFailure("4.4.3", f"DNS lookup of MX for {domain} failed") from None

    if len(mxs) == 1 and mxs[0][1] == dns.name.root:
        raise LookupFailure("5.1.10", f"domain {domain} accepts no mail (null MX, RFC 7505)")
    mxs = [(p, n) for p, n in mxs if n != dns.name.root]

    if not mxs:  # RFC 5321 §5.1: the domain itself is the implicit MX, preference 0
        addrs = await _addresses(resolver, domain)
        if not addrs:
            raise LookupFailure("5.1.2", f"domain {domain} has no MX and no address")
        addrs = public(addrs)
        if not addrs:
            raise _inward(domain, refused)
        return [Target(domain, addrs, port, 0, tls)]

    # Sort by preference; equal preferences in random order (RFC 5321 §5.1 SHOULD).
    random.shuffle(mxs)
    mxs.sort(key=lambda pn: pn[0])
    targets: list[Target] = []
    failure: LookupFailure | None = None
    for pref, name in mxs:
        host = name.to_text(omit_final_dot=True)
        try:
            addrs = await _addresses(resolver, host)
        except LookupFailure as exc:
            failure = exc
            continue
        addrs = public(addrs)
        if addrs:
            targets.append(Target(host, addrs, port, pref, tls))
    if not targets and refused and failure is None:
        raise _inward(domain, refused)
    if not targets:
        raise failure or LookupFailure("4.4.4", f"no MX host of {domain} has an address")
    return targets
