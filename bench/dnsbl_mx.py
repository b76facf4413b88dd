"""MX throughput with the DNS blocklists on, beside the plain figure.

Starts the tests' DNS server (tests/dnsserver.py) on loopback with two blocklist zones that
do not list the client (the common case: most clients are not listed, so every lookup is a
full NXDOMAIN round trip), then a mailfort server three times: no DNSBL; two zones with the
answer cache (the client's answers are cached for their TTL after its first connection);
two zones without a cache (two lookups before every banner: the cost for a stream of
clients never seen before); then SPF, DKIM and DMARC on (the sender domain publishes SPF and
DMARC in the same DNS server; answers cached for their TTL), alone and with the cached
blocklists. Each message is its own connection (like ``smtp-source -c``).

    python bench/dnsbl_mx.py [--messages 2000] [--sessions 50] [--warmup 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import smtp_load  # noqa: E402
from mfproc import (  # noqa: E402
    MailfortServer,
    bench_tmpdir,
    wait_disk_quiet,
    wait_freed_inodes,
)

from tests.dnsserver import DNSServer  # noqa: E402

ZONES = ("one.bench.test", "two.bench.test")
SENDER_DOMAIN = "example.org"


def dnsbl_table(cache_size: int) -> str:
    zones = ", ".join(f'{{ zone = "{z}" }}' for z in ZONES)
    return f"[dnsbl]\nzones = [{zones}]\ncache_size = {cache_size}\n"


def publish_sender_policy(dns: DNSServer) -> None:
    """What the load's sender domain publishes: SPF lets 127.0.0.1 send, DMARC p=none. The
    messages carry no signature (dkim=none): the DKIM figure is the header scan only."""
    dns.add_txt(SENDER_DOMAIN, "v=spf1 ip4:127.0.0.1 -all")
    dns.add_txt(f"_dmarc.{SENDER_DOMAIN}", "v=DMARC1; p=none")


def measure(extra: str, args: argparse.Namespace, label: str, dns: DNSServer, data: str,
            sender_auth: bool = False) -> dict[str, float]:
    """One fresh server; its files stay in ``data`` until the benchmark ends
    (mfproc.FREED_INODE_WINDOW)."""
    tmp = tempfile.mkdtemp(prefix="mf-", dir=data)
    server = MailfortServer(Path(tmp), port_base=args.port_base, dns_port=dns.port,
                            sender_auth=sender_auth)
    with server.config.open("a") as f:
        f.write(extra)
    with server:
        load = argparse.Namespace(
            host="127.0.0.1", port=server.ports["mx"], size=1024, sessions=args.sessions,
            messages=args.warmup, sender=f"bench@{SENDER_DOMAIN}", rcpt="alice@example.test",
            starttls=False, user="", password="", keep_session=False)
        # warm-up: a fresh data directory's first few thousand messages run slower
        # (bench/RESULTS.md), which would swamp the differences measured here
        asyncio.run(smtp_load.run(load))
        wait_disk_quiet(server.data)
        load.messages = args.messages
        r = asyncio.run(smtp_load.run(load))
    print(f"{label:<40} {r['rate']:7.0f}/s  accepted={r['accepted']:.0f} "
          f"failed={r['failed']:.0f}", flush=True)
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5000, help="unmeasured messages first")
    p.add_argument("--port-base", type=int, default=14500)
    args = p.parse_args(argv)
    wait_freed_inodes()
    with DNSServer() as dns, bench_tmpdir("mailfort-dnsbl-") as data:
        publish_sender_policy(dns)
        plain = measure("", args, "MX 1 KB, no DNSBL", dns, data)
        cached = measure(dnsbl_table(10000), args, "MX 1 KB, 2 DNSBL zones, cache", dns, data)
        before = len(dns.queries)
        cold = measure(dnsbl_table(0), args, "MX 1 KB, 2 DNSBL zones, no cache", dns, data)
        asked = len(dns.queries) - before
        sa = measure("", args, "MX 1 KB, SPF+DKIM+DMARC", dns, data, sender_auth=True)
        both = measure(dnsbl_table(10000), args, "MX 1 KB, DNSBL (cache) + SPF/DKIM/DMARC",
                       dns, data, sender_auth=True)
    print(f"ratios: cached {cached['rate'] / plain['rate']:.2f}x, "
          f"uncached {cold['rate'] / plain['rate']:.2f}x, "
          f"SPF/DKIM/DMARC {sa['rate'] / plain['rate']:.2f}x, "
          f"DNSBL+SPF/DKIM/DMARC {both['rate'] / plain['rate']:.2f}x of plain; "
          f"{asked} DNS queries in the uncached DNSBL run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
