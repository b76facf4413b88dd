"""The answer codes of a DNS list (RFC 5782 §2.3): addresses in 127.0.0.0/8.

Here, below config, because ``[[policy.dnsbl_zones]] codes`` is checked when the
configuration is read (config.py) and used when a list answers (policy/dnsbl.py): one
parser for both, and config imports nothing above it.
"""

from __future__ import annotations

import ipaddress

LISTING_NET = ipaddress.ip_network("127.0.0.0/8")


def parse_code_range(spec: str) -> tuple[int, int]:
    """``127.0.0.2``, ``127.0.0.2-127.0.0.11`` or ``127.0.0.0/29`` as (first, last);
    ValueError for anything else or anything outside 127.0.0.0/8."""
    spec = spec.strip()
    if "-" in spec:
        first, _, last = spec.partition("-")
        lo, hi = ipaddress.IPv4Address(first.strip()), ipaddress.IPv4Address(last.strip())
    elif "/" in spec:
        net = ipaddress.IPv4Network(spec, strict=False)
        lo, hi = net.network_address, net.broadcast_address
    else:
        lo = hi = ipaddress.IPv4Address(spec)
    if lo > hi or lo not in LISTING_NET or hi not in LISTING_NET:
        raise ValueError(f"{spec!r} is not a range of addresses in 127.0.0.0/8")
    return int(lo), int(hi)
