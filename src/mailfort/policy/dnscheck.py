"""Does the world's DNS say what this server needs it to? (``mailfort dns check DOMAIN``)

For one of our domains: the MX names this server, SPF lets this server's address send,
each DKIM key we sign with is published as we would publish it, DMARC has a policy,
this server's address is on none of the configured blocklists, and mail clients find
their servers (the RFC 6186 SRV records of [client_setup], and ``autoconfig.DOMAIN``
when the autoconfig file is served). Every problem is printed
with the exact record to publish, so an administrator does not have to work it out from
four RFCs. Lookups go through the configured resolver (``[dns]``), like the server's own.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from mailfort.config import Config
from mailfort.policy import clientsetup
from mailfort.policy.dkim import KeyStore
from mailfort.policy.dnsbl import reverse_name
from mailfort.policy.dnslookup import Lookup
from mailfort.policy.spf import check_mailfrom


@dataclass(frozen=True)
class Finding:
    ok: bool
    what: str  # "MX", "SPF", "DKIM s1", "DMARC", "DNSBL zone", "SRV _imaps._tcp"
    detail: str
    publish: str = ""  # the record to publish when it is missing or wrong


def _txt(lookup: Lookup, name: str, prefix: str) -> list[str]:
    return [t for t in lookup.txt(name) if t.lower().startswith(prefix)]


def check_mx(lookup: Lookup, domain: str, hostname: str) -> Finding:
    hosts = sorted((rr.preference, rr.exchange.to_text(True).lower())
                   for rr in lookup.query(domain, "MX"))
    publish = f"{domain}. 3600 IN MX 10 {hostname}."
    if not hosts:
        return Finding(False, "MX", "no MX record: mail for the domain goes nowhere", publish)
    names = ", ".join(f"{p} {h}" for p, h in hosts)
    if hostname.lower().rstrip(".") not in {h for _, h in hosts}:
        return Finding(False, "MX", f"{names}: none is this server ({hostname})", publish)
    return Finding(True, "MX", names)


def check_spf(lookup: Lookup, domain: str, addresses: list[str]) -> Finding:
    records = _txt(lookup, domain, "v=spf1")
    publish = f'{domain}. 3600 IN TXT "v=spf1 mx -all"'
    if not records:
        return Finding(False, "SPF", "no SPF record: anyone may claim to send as the domain",
                       publish)
    if len(records) > 1:
        return Finding(False, "SPF", f"{len(records)} SPF records (RFC 7208 §4.5: permerror); "
                       "keep one", publish)
    failing = []
    for ip in addresses:
        r = check_mailfrom(lookup, ip, f"postmaster@{domain}", domain, budget=10.0)
        if r.result != "pass":
            failing.append(f"{ip}: {r.result}")
    if failing:
        return Finding(False, "SPF", f"{records[0]!r} does not let this server send ("
                       + "; ".join(failing) + ")", publish)
    return Finding(True, "SPF", records[0])


def check_dkim(lookup: Lookup, domain: str, store: KeyStore) -> list[Finding]:
    keys = store.keys(domain)
    if not keys:
        return [Finding(False, "DKIM", "no signing key: mail from the domain is unsigned "
                        f"(create one: mailfort dkim keygen {domain})")]
    out = []
    for key in keys:
        want = "".join(key.dns_record().split())
        found = ["".join(t.split()) for t in _txt(lookup, key.dns_name, "v=dkim1")]
        label = f"DKIM {key.selector}"
        if want in found:
            out.append(Finding(True, label, f"{key.dns_name} publishes this key"))
        elif found:
            out.append(Finding(False, label, f"{key.dns_name} publishes another key",
                               key.zone_line()))
        else:
            out.append(Finding(False, label, f"{key.dns_name} is not published",
                               key.zone_line()))
    return out


def check_dmarc(lookup: Lookup, domain: str) -> Finding:
    name = f"_dmarc.{domain}"
    records = _txt(lookup, name, "v=dmarc1")
    publish = f'{name}. 3600 IN TXT "v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}"'
    if len(records) != 1:
        why = "no DMARC record" if not records else f"{len(records)} DMARC records"
        return Finding(False, "DMARC", f"{why}: receivers apply no policy to forgeries",
                       publish)
    tags = dict(t.strip().partition("=")[::2] for t in records[0].split(";") if "=" in t)
    policy = tags.get("p", "").strip().lower()
    if policy not in ("none", "quarantine", "reject"):
        return Finding(False, "DMARC", f"{records[0]!r}: no valid p= tag", publish)
    if policy == "none":
        return Finding(False, "DMARC", f"{records[0]!r}: p=none asks receivers to do "
                       "nothing with forgeries (fine while monitoring, not after)", publish)
    return Finding(True, "DMARC", records[0])


def check_dnsbl(lookup: Lookup, cfg: Config, addresses: list[str]) -> list[Finding]:
    out = []
    for zone in cfg.dnsbl.zones:
        listed = []
        for ip in addresses:
            codes = [rr.address for rr in lookup.query(
                reverse_name(ipaddress.ip_address(ip), zone.zone), "A")]
            if codes:
                listed.append(f"{ip} ({', '.join(codes)})")
        out.append(Finding(not listed, f"DNSBL {zone.zone}",
                           "listed: " + "; ".join(listed) if listed else "not listed"))
    return out


def _srv_text(rr: Any) -> str:
    return f"{rr.priority} {rr.weight} {rr.port} {rr.target.to_text(True).lower()}"


def check_srv(lookup: Lookup, cfg: Config, domain: str) -> list[Finding]:
    """One finding per RFC 6186 / RFC 8314 service: an offered one must name the public
    host and port of [client_setup]; one not offered must not send clients here (absent,
    or the RFC 6186 §4 target "." that says so). A STARTTLS service preferred over its
    implicit-TLS twin is a problem too (RFC 8314 §5.1: implicit TLS first)."""
    host = clientsetup.public_host(cfg)
    out: list[Finding] = []
    best: dict[str, int] = {}  # protocol -> priority of the implicit-TLS record found right
    for service in clientsetup.SERVICES:
        name = clientsetup.srv_name(service, domain)
        what = f"SRV _{service.name}._tcp"
        publish = clientsetup.srv_record(cfg, service, domain)
        want = clientsetup.port(cfg, service)
        records = lookup.query(name, "SRV")
        found = ", ".join(sorted(_srv_text(rr) for rr in records)) or "none"
        ours = [rr for rr in records
                if rr.target.to_text(True).lower() == host and rr.port == want]
        here = [rr for rr in records if rr.target.to_text(True).lower() == host]
        if not want:
            if here:
                out.append(Finding(False, what, f"{found}: sends clients to this server, "
                                   "which does not offer it", publish))
            else:
                out.append(Finding(True, what, f"{found} (not offered here)"))
        elif not records:
            out.append(Finding(False, what, f"no record: clients do not find {host}:{want}",
                               publish))
        elif not ours:
            out.append(Finding(False, what, f"{found}: not {host} port {want}", publish))
        elif service.socket == "STARTTLS" and service.protocol in best \
                and min(rr.priority for rr in ours) < best[service.protocol]:
            out.append(Finding(False, what, f"{found}: preferred to implicit TLS (RFC 8314 "
                               "§5.1: give it a larger priority number)", publish))
        else:
            if service.socket == "SSL":
                best[service.protocol] = min(rr.priority for rr in ours)
            out.append(Finding(True, what, found))
    return out


def check_autoconfig(lookup: Lookup, cfg: Config, domain: str,
                     addresses: list[str]) -> Finding:
    """``autoconfig.DOMAIN`` must reach the HTTPS listener that serves the file: an address
    of this server (directly or through a CNAME, which the resolver follows)."""
    name = f"autoconfig.{domain}"
    host = clientsetup.public_host(cfg)
    publish = f"{name}. 3600 IN CNAME {host}."
    if not (cfg.mta_sts.listen and cfg.client_setup.autoconfig):
        return Finding(True, "autoconfig", "not served here ([mta_sts] listen is empty or "
                       "client_setup.autoconfig is off): clients use the SRV records")
    found = server_addresses(lookup, name)
    mine = set(addresses) | set(server_addresses(lookup, host))
    if not found:
        return Finding(False, "autoconfig", f"{name} does not resolve: Thunderbird cannot "
                       "fetch its settings (the certificate must name it too)", publish)
    if not set(found) & mine:
        return Finding(False, "autoconfig", f"{name} is {', '.join(found)}, not this server "
                       f"({', '.join(sorted(mine)) or host})", publish)
    return Finding(True, "autoconfig", f"{name} is {', '.join(found)}")


def server_addresses(lookup: Lookup, hostname: str) -> list[str]:
    return [rr.address for rtype in ("A", "AAAA") for rr in lookup.query(hostname, rtype)]


def run_checks(cfg: Config, domain: str, addresses: list[str]) -> list[Finding]:
    lookup = Lookup(cfg.dns)
    hostname = cfg.server.hostname
    out = [check_mx(lookup, domain, hostname)]
    if not addresses:
        addresses = server_addresses(lookup, hostname)
    if addresses:
        out.append(check_spf(lookup, domain, addresses))
    else:
        out.append(Finding(False, "SPF", f"{hostname} has no address in DNS (give --address "
                           "to check SPF and the blocklists against this server's address)"))
    out += check_dkim(lookup, domain, KeyStore(cfg.data_path))
    out.append(check_dmarc(lookup, domain))
    out += check_dnsbl(lookup, cfg, addresses)
    out += check_srv(lookup, cfg, domain)
    out.append(check_autoconfig(lookup, cfg, domain, addresses))
    return out
