#!/usr/bin/env python3
"""In-process cost of mailfort's DKIM + DMARC verification of one signed 1 KB message.

Builds the message senderauth_bench.py sends (RSA-2048 and Ed25519 signatures of
example.org, SPF, DKIM and DMARC records on the project's loopback DNS server), warms the
Lookup cache once, then runs ``SenderAuth.check_message`` N times with the cache only (as
the MX does for a sender whose records are cached): no DNS time counts. Prints µs of CPU
per message and a cProfile top 20.

    PYTHONPATH=src python3 bench/dkim_micro.py [-n 2000] [--distinct 50] [--inbound]

``--inbound``: the MX's whole path instead (server/senderauth.py ``inbound``: the spooled
message with our trace fields read back, the checks, the new spool with
Authentication-Results, the log line), on an event loop, with a real spool.

``--parts``: the pieces of ``check_message`` alone (least of 7 × 500 calls each, CPU), and
SPF at MAIL FROM (HELO ``bench.client`` as smtp_load.py sends it), to say where it goes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
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
from mailfort.server import senderauth  # noqa: E402
from mailfort.store.maildir import Committer  # noqa: E402
from tests.dnsserver import DNSServer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000, help="verifications timed")
    ap.add_argument("--distinct", type=int, default=50, help="distinct signed messages")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--inbound", action="store_true", help="server/senderauth.py's inbound")
    ap.add_argument("--parts", action="store_true", help="the pieces of check_message")
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

        if args.inbound:
            committer = Committer(Path(tmp) / "data", use_syncfs=False)
            trace = (b"Return-Path: <bench@example.org>\r\nReceived: from bench.client "
                     b"([127.0.0.1]) by mx.bench.local with ESMTP id X\r\n"
                     b"\tfor <alice@example.test>; Mon, 7 Dec 2026 00:00:00 +0000\r\n")
            logging.getLogger("mailfort.senderauth").setLevel(logging.INFO)
            logging.getLogger("mailfort.senderauth").addHandler(
                logging.StreamHandler(open(os.devnull, "w")))  # noqa: SIM115

            async def inbound_loop(n: int) -> None:
                for i in range(n):
                    spool = committer.new_spool()
                    spool.write(trace + messages[i % len(messages)])
                    out = await senderauth.inbound(auth, committer, spool, trace, spf, sender,
                                                   "127.0.0.1")
                    if out.refusal is not None or len(out.dkim_pass) != 2:
                        raise SystemExit("not a double pass")
                    out.spool.discard()

            def run(n: int) -> None:
                asyncio.run(inbound_loop(n))

        v = auth.check_message(messages[0], spf, sender)  # warms the DNS cache
        print(f"# {v.summary}")
        if args.parts:
            parts(auth, messages[0], spf, sender)
            auth.close()
            return 0
        run(min(200, args.n))  # warm-up
        batches = []  # CPU of batches of 100: the least is the figure a busy machine moves least
        for _ in range(max(1, args.n // 100)):
            t0 = time.process_time()
            run(100)
            batches.append((time.process_time() - t0) / 100)
        print(f"{sum(batches) / len(batches) * 1e6:.0f} µs CPU per message, least batch "
              f"{min(batches) * 1e6:.0f} µs{' (inbound)' * args.inbound} (n={args.n}, "
              f"{len(messages[0])} bytes, 2 signatures, DMARC)")
        if not args.no_profile:
            prof = cProfile.Profile()
            prof.runcall(run, min(args.n, 1000))
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        auth.close()
    return 0


def parts(auth: SenderAuth, message: bytes, spf: list[SPFResult], sender: str) -> None:
    """µs of CPU of each piece of ``check_message`` on ``message`` (cached DNS)."""
    import timeit

    from mailfort.policy import authresults, dkim, dmarc
    from mailfort.policy.senderauth import header_block

    auth.check_mail("127.0.0.1", "bench.client", sender)  # caches the HELO's answers
    lookup = auth.lookup
    block = header_block(message)
    results = dkim.verify(message, lookup, 2.0)
    author = dmarc.author_domain(block) or ""
    verdict = dmarc.evaluate(lookup, [author], spf[1], results)

    def body_hashed() -> dkim._HashedBody:
        d = dkim._HashedBody(message, logger=dkim._Reasons(), minkey=1024, timeout=2)
        d.hash_body([d.body])
        return d

    d = body_hashed()

    def one(idx: int) -> None:  # a signature of a message parsed and body-hashed already
        d.body_checked = False
        d.verify(idx, dnsfunc=lambda n, timeout=5: lookup.txt(n.decode(), 2.0)[0].encode())

    pieces = {
        "check_message (DKIM + DMARC + Authentication-Results)":
            lambda: auth.check_message(message, spf, sender),
        "  dkim.verify (both signatures)": lambda: dkim.verify(message, lookup, 2.0),
        "    message parse (_HashedBody)":
            lambda: dkim._HashedBody(message, logger=dkim._Reasons(), minkey=1024, timeout=2),
        "    parse + tags + body hash": body_hashed,
        "    Ed25519 signature (tags, key, header hash, libsodium)": lambda: one(0),
        "    RSA-2048 signature (tags, key, header hash, OpenSSL)": lambda: one(1),
        "  dmarc.author_domain (From:)": lambda: dmarc.author_domain(block),
        "  dmarc.evaluate": lambda: dmarc.evaluate(lookup, [author], spf[1], results),
        "  authresults.format_field":
            lambda: authresults.format_field("mx.bench.local", spf, results, verdict, sender),
        "SPF at MAIL FROM (HELO + MAIL FROM)":
            lambda: auth.check_mail("127.0.0.1", "bench.client", sender),
    }
    with lookup.cache_only():
        for name, fn in pieces.items():
            best = min(timeit.repeat(fn, number=500, repeat=7, timer=time.process_time)) / 500
            print(f"{best * 1e6:8.1f} µs  {name}")


if __name__ == "__main__":
    sys.exit(main())
