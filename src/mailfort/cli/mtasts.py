"""``mailfort mta-sts policy DOMAIN``: what to publish so that others deliver to us only over
verified TLS (RFC 8461 §3): the ``_mta-sts`` TXT record and the policy file to serve at
``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from mailfort import config as config_mod
from mailfort.delivery.mtasts import MAX_AGE_LIMIT, publish


def cmd_policy(args: argparse.Namespace) -> int:
    cfg = config_mod.load(getattr(args, "config", None))
    # Defaults from [mta_sts], so that the TXT id matches the file mailfort serves.
    m = cfg.mta_sts
    mx = args.mx or m.mx or [cfg.server.hostname]
    max_age = m.max_age if args.max_age is None else args.max_age
    if not 0 < max_age <= MAX_AGE_LIMIT:
        raise SystemExit("mailfort: --max-age must be 1-31557600 seconds")
    txt, policy = publish(args.domain.lower().rstrip("."), mx, mode=args.mode or m.mode,
                          max_age=max_age)
    print("# DNS record:")
    print(txt)
    print(f"# https://mta-sts.{args.domain}/.well-known/mta-sts.txt (text/plain):")
    print(policy, end="")
    return 0


def add_parser(sub: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    p = sub.add_parser("mta-sts", help="MTA-STS policy for our own domains",
                       allow_abbrev=False)
    p_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    pol = leaf(p_sub, "policy", cmd_policy, "print the TXT record and policy file to publish")
    pol.add_argument("domain")
    pol.add_argument("--mx", action="append", metavar="HOST",
                     help="an MX host name or *.pattern (repeat; default: mta_sts.mx, "
                     "else server.hostname)")
    pol.add_argument("--mode", choices=("enforce", "testing", "none"),
                     help="default: mta_sts.mode (enforce)")
    pol.add_argument("--max-age", type=int, help="seconds (default: mta_sts.max_age, a week)")
