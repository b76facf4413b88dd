#!/usr/bin/env python3
"""In-process cost of mailfort's DKIM + DMARC verification of one signed 1 KB message.

Builds the message senderauth_bench.py sends (RSA-2048 and Ed25519 signatures of
example.org, SPF, DKIM and DMARC records on the project's loopback DNS server), warms the
Lookup cache once, then runs ``SenderAuth.check_message`` N times with the cache only (as
the MX does for a sender whose records are cached): no DNS time counts. Prints µs of CPU
per message and a cProfile top 20.

    PYTHONPATH=src python3 bench/dkim_micro.py [-n 2000] [--distinct 50]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # mailfort itself: from PYTHONPATH

from senderauth_bench import DOMAIN, make_keys, publish, signed_messages  # noqa: E402

from mailfort.config import from_dict  # noqa: E402
from mailfort.policy.senderauth import SenderAuth  # noqa: E402
from mailfort.policy.spf import SPFResult  # noqa: E402
from tests.dnsserver import DNSServer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000, help="verifications timed")
    ap.add_argument("--distinct", type=int, default=50, help="distinct signed messages")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    rsa_pem, ed_seed, records = make_keys()
    with tempfile.TemporaryDirectory() as tmp, DNSServer().start() as dns:
        publish(dns, records)
        folder = Path(tmp) / "msgs"
        signed_messages(folder, args.distinct, args.size, rsa_pem, ed_seed)
        messages = [p.read_bytes() for p in sorted(folder.iterdir())]
        cfg = from_dict({"server": {"hostname": "mx.bench.local", "data_dir": tmp},
                         "dns": {"nameservers": ["127.0.0.1"], "port": dns.port,
                                 "timeout": 2.0}})
        auth = SenderAuth(cfg)
        spf = [SPFResult("none", "helo", "client.example.net", ""),
               SPFResult("pass", "mailfrom", DOMAIN, "")]
        sender = f"bench@{DOMAIN}"

        def run(n: int) -> None:
            with auth.lookup.cache_only():
                for i in range(n):
                    v = auth.check_message(messages[i % len(messages)], spf, sender)
                    if "dmarc=pass" not in v.summary or v.summary.count("pass:") != 2:
                        raise SystemExit(f"not a double pass: {v.summary}")

        v = auth.check_message(messages[0], spf, sender)  # warms the DNS cache
        print(f"# {v.summary}")
        run(min(200, args.n))  # warm-up
        t0 = time.process_time()
        run(args.n)
        cpu = time.process_time() - t0
        print(f"{cpu / args.n * 1e6:.0f} µs CPU per message (n={args.n}, "
              f"{len(messages[0])} bytes, 2 signatures, DMARC)")
        if not args.no_profile:
            prof = cProfile.Profile()
            prof.runcall(run, min(args.n, 1000))
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        auth.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
