"""How much TLS one destination's mail gets: the per-domain level and how it is decided.

Levels, weakest first: ``may`` (STARTTLS when offered, unverified: an attacker on the path
can strip it), ``encrypt`` (no TLS, no delivery: defer with 4.7.x, never send in clear),
``verify`` (the certificate must chain to a trusted CA and name the MX host, else defer).

The level of a domain is the strongest of: the global floor (``delivery.tls_floor``), the
domain's entry in ``delivery.tls_policy``, ``require_tls_domains`` (encrypt), a route's
``tls`` = "starttls" or "implicit" (verify, against the route's host and ``cafile``), and
the domain's published policy: MTA-STS in enforce mode (verify, and only MX hosts its
patterns allow). DANE (RFC 7672), when an MX host has usable
TLSA records, replaces name-and-CA checking for that host (and takes precedence over
MTA-STS, RFC 8461 §2): see ``HostPlan``.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from mailfort.config import Config, Route
from mailfort.delivery.dane import INDETERMINATE, TLSA

Level = Literal["may", "encrypt", "verify"]
Mode = Literal["may", "encrypt", "verify", "dane"]
_RANK = {"may": 0, "encrypt": 1, "verify": 2}


@dataclass(frozen=True)
class TLSEvent:
    """One TLS outcome for TLS-RPT (RFC 8460 §4.3): ``result`` "success" or a result-type."""

    result: str
    policy_type: str  # "sts", "tlsa" or "no-policy-found"
    policy_domain: str
    mx_host: str = ""
    address: str = ""
    detail: str = ""


Reporter = Callable[[TLSEvent], None]


@dataclass(frozen=True)
class TLSPolicy:
    """The TLS requirement for one destination domain (the same for all its hosts)."""

    level: Level = "may"
    source: str = "default"  # "floor", "config", "route", "mta-sts"
    domain: str = ""
    mx_patterns: tuple[str, ...] = ()  # MTA-STS: the MX hosts the domain allows
    testing: bool = False  # MTA-STS "testing": check and report, deliver anyway
    sts_id: str = ""
    tlsa: dict[str, tuple[TLSA, ...]] = field(default_factory=dict)  # DANE, per MX host
    ca_file: str = ""
    floor: Level = "may"  # the configured level, kept when an MTA-STS test fails
    pinned: bool = False  # a configured route: the host name comes from us, not from DNS
    lookup_error: str = ""  # the MTA-STS policy could not be fetched (and none is cached)

    @property
    def policy_type(self) -> str:
        if self.tlsa:
            return "tlsa"
        if self.source == "mta-sts":
            return "sts"
        return "no-policy-found"

    def plan(self, host: str) -> HostPlan:
        """What the client must check for one MX host."""
        records = self.tlsa.get(host.lower().rstrip("."), ())
        if records and records[0].usage == INDETERMINATE:
            # The TLSA lookup failed (for a validating resolver: bogus DNSSEC): whether
            # DANE applies is unknown, so this host is not used for now (RFC 7672 §2.2).
            return HostPlan("dane", records, allowed=False, ca_file=self.ca_file,
                            refusal=f"TLSA lookup for {host} failed; not delivering there "
                            "until it succeeds", refusal_result="dnssec-invalid")
        if records:
            return HostPlan("dane", records, allowed=True, ca_file=self.ca_file,
                            authenticated_name=True, verify_label="dane")
        allowed = not self.mx_patterns or any(mx_matches(p, host) for p in self.mx_patterns)
        sts = self.source == "mta-sts" and bool(self.mx_patterns)
        return HostPlan(self.level, (), allowed=allowed, testing=self.testing,
                        ca_file=self.ca_file, fallback=self.floor,
                        authenticated_name=self.pinned or (sts and allowed),
                        verify_label="mta-sts" if sts else "policy verify")


@dataclass(frozen=True)
class HostPlan:
    mode: Mode
    tlsa: tuple[TLSA, ...] = ()
    allowed: bool = True  # False: an MTA-STS policy does not list this MX
    testing: bool = False
    ca_file: str = ""
    fallback: Level = "may"  # what an MTA-STS "testing" failure falls back to
    refusal: str = ""  # why a host that is not ``allowed`` is skipped (default: MTA-STS)
    refusal_result: str = "validation-failure"
    # The host name itself is vouched for (RFC 8689 §4.2.1: a DNSSEC-signed TLSA set, an
    # MTA-STS policy that lists it, or a configured route), not just taken from plain DNS.
    authenticated_name: bool = False
    verify_label: str = "policy verify"  # how a verified peer is named in logs and DSNs

    @property
    def requires_tls(self) -> bool:
        return self.mode != "may"

    def context(self, opportunistic: ssl.SSLContext) -> ssl.SSLContext:
        # DANE checks the certificate against TLSA after the handshake, not against a CA.
        return verifying_context(self.ca_file) if self.mode == "verify" else opportunistic


def stronger(a: Level, b: Level) -> Level:
    return a if _RANK[a] >= _RANK[b] else b


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: exact, or ``*.example.com`` matching exactly one leftmost label."""
    p = pattern.lower().rstrip(".")
    h = host.lower().rstrip(".")
    if p.startswith("*."):
        first, dot, rest = h.partition(".")
        return bool(first) and bool(dot) and rest == p[2:]
    return p == h


def static_policy(cfg: Config, domain: str, route: Route | None) -> TLSPolicy:
    """The level from configuration alone (floor, per-domain table, require_tls)."""
    d = domain.lower().rstrip(".")
    dc = cfg.delivery
    level: Level = dc.tls_floor  # type: ignore[assignment]
    source = "floor"
    for key, value in dc.tls_policy.items():
        if key.lower().rstrip(".") == d and _RANK[value] > _RANK[level]:
            level, source = value, "config"  # type: ignore[assignment]
    listed = any(x.lower().rstrip(".") == d for x in cfg.require_tls_domains)
    if listed and level == "may":
        level, source = "encrypt", "config"
    ca_file = dc.ca_file
    if route is not None and route.verified:
        # tls = "starttls" | "implicit" (or the older require_tls): the route names its
        # host itself, so its certificate is checked against that name.
        level, source, ca_file = "verify", "route", route.cafile or dc.ca_file
    return TLSPolicy(level, source, d, ca_file=ca_file, floor=level,
                     pinned=route is not None)


@functools.cache
def verifying_context(ca_file: str = "") -> ssl.SSLContext:
    """Chain to a trusted CA (``ca_file``, else the system store) and match the host name."""
    ctx = ssl.create_default_context(cafile=ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def failure_type(exc: BaseException) -> str:
    """The RFC 8460 §4.3 result-type of a failed verifying handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        msg = (exc.verify_message or str(exc)).lower()
        if "hostname" in msg or "ip address mismatch" in msg:
            return "certificate-host-mismatch"
        if "expired" in msg or "not yet valid" in msg:
            return "certificate-expired"
        return "certificate-not-trusted"
    return "validation-failure"
