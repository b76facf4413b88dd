"""``mailfort dns check DOMAIN``: the findings of policy/dnscheck.py, one line each, with
the record to publish under every problem. Exit status 0 all fine, 1 something to fix,
2 DNS did not answer."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Callable
from typing import Any

import dns.rdata

from mailfort.cli import dkim
from mailfort.cli.common import config_of
from mailfort.policy.dnscheck import run_checks
from mailfort.policy.dnslookup import DNSTempError


def cmd_check(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    try:
        findings = run_checks(cfg, args.domain.lower().rstrip("."), list(args.address))
    except DNSTempError as exc:
        print(f"DNS did not answer ({exc}); nothing can be said yet")
        return 2
    for f in findings:
        print(f"{'ok ' if f.ok else 'FIX'}  {f.what:<22} {f.detail}")
        if f.publish:
            print(f"     publish: {f.publish}")
    return 0 if all(f.ok for f in findings) else 1


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def add_parser(sub: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    dn = sub.add_parser("dns", help="our domains' DNS records", allow_abbrev=False)
    dn_sub = dn.add_subparsers(dest="action", required=True, metavar="ACTION")
    # dnspython loads a record type's module at its first answer; DKIM records are
    # compared by key: both before a switch to the service user.
    ck = leaf(dn_sub, "check", cmd_check,
              "check MX, SPF, DKIM, DMARC and blocklists for a domain; print what to publish",
              (dns.rdata.load_all_types, *dkim.NEEDS))
    ck.add_argument("domain")
    ck.add_argument("--address", action="append", default=[], metavar="IP", type=_address,
                    help="this server's public address (default: server.hostname's A/AAAA)")
