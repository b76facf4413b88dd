"""``mailfort mta-sts policy DOMAIN``: what to publish so that others deliver to us only over
verified TLS (RFC 8461 §3): the ``_mta-sts`` TXT record and the policy file to serve at
``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from mailfort.cli.common import CLIError, config_of, reads_only, require_local_domain
from mailfort.delivery.mtasts import MAX_AGE_LIMIT, publish


def cmd_policy(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    domain = require_local_domain(cfg, args.domain)
    # Defaults from [mta_sts], so that the TXT id matches the file mailfort serves.
    m = cfg.mta_sts
    mx = args.mx or m.mx or [cfg.server.hostname]
    for name in mx:
        # A sending server matches the MX host it found in DNS, always a full name: a
        # policy naming "vm" would make every one of them refuse to deliver (enforce).
        if "." not in name.removeprefix("*.").rstrip("."):
            raise CLIError(f"mx {name!r} is not a fully qualified host name (no dot): give "
                           "--mx mail.example.org, or set mta_sts.mx or server.hostname")
    max_age = m.max_age if args.max_age is None else args.max_age
    if not 0 < max_age <= MAX_AGE_LIMIT:
        raise SystemExit("mailfort: --max-age must be 1-31557600 seconds")
    txt, policy = publish(domain, mx, mode=args.mode or m.mode,
                          max_age=max_age)
    print("# DNS record:")
    print(txt)
    print(f"# https://mta-sts.{domain}/.well-known/mta-sts.txt (text/plain):")
    print(policy, end="")
    return 0


def add_parser(sub: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    p = sub.add_parser("mta-sts", help="MTA-STS policy for our own domains",
                       allow_abbrev=False)
    p_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    pol = reads_only(leaf(p_sub, "policy", cmd_policy,
                          "print the TXT record and policy file to publish"), "directory")
    pol.add_argument("domain")
    pol.add_argument("--mx", action="append", metavar="HOST",
                     help="an MX host name or *.pattern (repeat; default: mta_sts.mx, "
                     "else server.hostname)")
    pol.add_argument("--mode", choices=("enforce", "testing", "none"),
                     help="default: mta_sts.mode (enforce)")
    pol.add_argument("--max-age", type=int, help="seconds (default: mta_sts.max_age, a week)")
