"""``mailfort tls show``: the certificate the server presents (subject, names, issuer,
expiry, fingerprint), described by the library in tlsinfo.py."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailfort import tlsinfo
from mailfort.cli.common import config_of, reads_only
from mailfort.cli.status import X509


def cmd_tls_show(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    path = tlsinfo.served_certificate_path(cfg)
    if not path.is_file():
        raise ValueError(f"no certificate at {path}: set tls.cert_file, or start mailfort "
                         "once to generate a self-signed one")
    info = tlsinfo.describe(Path(path))
    print(json.dumps(info, indent=2) if args.json else tlsinfo.format_description(info))
    return 0


def add_parser(sub: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    tls = sub.add_parser("tls", help="the served certificate", allow_abbrev=False)
    tls_sub = tls.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = reads_only(leaf(tls_sub, "show", cmd_tls_show,
                           "subject, names, issuer, expiry and SHA-256 fingerprint", X509))
    show.add_argument("--json", action="store_true", help="print JSON")
