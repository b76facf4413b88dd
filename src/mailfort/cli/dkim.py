"""``mailfort dkim keygen|list``: the DKIM signing keys of our domains and their records.

A key is written once (never overwritten: its record may already be published), mode
0600 under ``<data_dir>/dkim``; the command prints the exact TXT record to publish.
Submitted mail is signed with every key of its From: domain (see policy/msa.py).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from mailfort.cli.common import config_of, reads_only, require_local_domain
from mailfort.policy.dkim import KeyStore, SigningKey

# What making and showing a key loads, imported before a switch to the service user.
NEEDS = ("cryptography.hazmat.primitives.serialization",
         "cryptography.hazmat.primitives.asymmetric.ed25519",
         "cryptography.hazmat.primitives.asymmetric.rsa")


def _store(args: argparse.Namespace) -> KeyStore:
    return KeyStore(config_of(args).data_path)


def _show(key: SigningKey) -> str:
    return (f"name:   {key.dns_name}\n"
            f"type:   TXT\n"
            f"value:  {key.dns_record()}\n"
            f"zone:   {key.zone_line()}")


def cmd_keygen(args: argparse.Namespace) -> int:
    selector = args.selector or time.strftime("%Y%m") + ("r" if args.algorithm == "rsa" else "e")
    domain = require_local_domain(config_of(args), args.domain)
    try:
        key = _store(args).generate(domain, selector, args.algorithm)
    except FileExistsError:
        raise ValueError(f"a key for selector {selector} of {args.domain} exists already; "
                         "choose another --selector") from None
    print(f"{key.algorithm} key for {key.domain}, selector {key.selector}: {key.path} (0600)")
    print("Publish this DNS record, then mail submitted from this domain is signed:")
    print(_show(key))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    keys = _store(args).keys(args.domain)
    if not keys:
        print("no DKIM keys (create one: mailfort dkim keygen DOMAIN)")
    for key in keys:
        print(f"{key.domain}\t{key.selector}\t{key.algorithm}\t{key.path}")
        if args.records:
            print(_show(key))
    return 0


def add_parser(sub: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    dk = sub.add_parser("dkim", help="DKIM signing keys", allow_abbrev=False)
    dk_sub = dk.add_subparsers(dest="action", required=True, metavar="ACTION")
    gen = leaf(dk_sub, "keygen", cmd_keygen, "create a signing key, print its DNS record",
               NEEDS)
    gen.add_argument("domain")
    gen.add_argument("--selector", help="default: YYYYMM and r (RSA) or e (Ed25519)")
    gen.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa",
                     help="rsa (2048 bits, the default: every verifier knows it) or ed25519")
    ls = reads_only(leaf(dk_sub, "list", cmd_list, "list the signing keys", NEEDS))
    ls.add_argument("domain", nargs="?")
    ls.add_argument("--records", action="store_true", help="print each key's DNS record too")
