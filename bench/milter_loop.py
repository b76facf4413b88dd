"""The CPU mailfort's milter path costs per message, in-process, against a real rspamd.

    python bench/milter_loop.py                          # 3 runs of 2,000 messages
    python bench/milter_loop.py --baseline /other/src    # and another checkout, alternating

What it measures: ``server.milters.Milters.run`` (the client: packets, macros, headers,
body, the reply; then rspamd's header changes written into a new spool), called in a loop
over one 1 KB message as the MX spools it (Return-Path and our Received on top), with
``--concurrency`` messages in flight (so that, as under the bench's 50 sessions, several
kept connections are in use). The figure is this process's CPU time (user + system) per
message: no SMTP, no storage, no load generator, so a saving in the milter path is seen
whole, and the machine's load hardly moves it (rspamd's time is its own process's);
``--calls`` counts the Python function calls per message instead (cProfile), which no load
moves at all.
One rspamd from the tests' configuration, as in milter_bench.py (rbl off, DNS on the
loopback stub). Loopback only; everything started here is stopped and removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

BODY_LINE = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\r\n"


def message(size: int) -> tuple[bytes, bytes]:
    """(trace, message): as the MX spools smtp-source's 1 KB message."""
    trace = (b"Return-Path: <sender@example.org>\r\n"
             b"Received: from client.example.org ([127.0.0.1])\r\n"
             b"\tby mx.example.test (mailfort) with ESMTP id 0123456789ABCDEF\r\n"
             b"\tfor <alice@example.test>; Mon, 7 Dec 2026 23:00:00 +0000\r\n")
    head = (b"From: <sender@example.org>\r\nTo: <alice@example.test>\r\n"
            b"Date: Mon, 7 Dec 2026 23:00:00 +0000\r\n"
            b"Message-Id: <20261207230000.1@example.org>\r\nSubject: test\r\n\r\n")
    body = (BODY_LINE * (size // len(BODY_LINE) + 1))[:max(0, size - len(head))]
    return trace, trace + head + body


async def measure(port: int, n: int, concurrency: int, size: int, tmp: Path,
                  calls: bool = False) -> dict[str, float]:
    """Run ``n`` messages; CPU µs per message of this process, and what rspamd changed
    (``calls``: Python function calls per message instead, under cProfile: a count the
    machine's load does not move)."""
    import dataclasses

    from mailfort import config as config_mod
    from mailfort.config import MilterConfig
    from mailfort.server.milters import FilterContext, Milters
    from mailfort.store.maildir import Committer

    cfg = config_mod.from_dict({"server": {"hostname": "mx.example.test",
                                           "data_dir": str(tmp)}})
    cfg = config_mod.validate(dataclasses.replace(cfg, milter=[MilterConfig(
        address=f"inet:127.0.0.1:{port}", reuse="always")]))
    milters = Milters(cfg)
    committer = Committer(tmp, use_syncfs=False)
    trace, raw = message(size)
    ctx = FilterContext("mx", "mx.example.test", "127.0.0.1", 40000, "client.example.org",
                        "0123456789ABCDEF")
    changed = 0

    async def one() -> None:
        nonlocal changed
        spool = committer.new_spool()
        spool.write(raw)
        out = await milters.run(ctx, committer, spool, trace, "sender@example.org",
                                ["alice@example.test"])
        if out.refusal is not None:
            raise SystemExit(f"rspamd refused the message: {out.refusal}")
        changed += out.spool is not spool
        out.spool.discard()
        if out.spool is not spool:
            spool.discard()

    async def worker(count: int) -> None:
        for _ in range(count):
            await one()

    async def batch(total: int) -> None:
        share = [total // concurrency + (i < total % concurrency) for i in range(concurrency)]
        await asyncio.gather(*(worker(k) for k in share))

    for _ in range(40):  # rspamd's proxy processes may still be starting
        spool = committer.new_spool()
        spool.write(raw)
        out = await milters.run(ctx, committer, spool, trace, "sender@example.org",
                                ["alice@example.test"])
        spool.discard()
        out.spool.discard()
        if out.refusal is None:
            break
        await asyncio.sleep(0.5)
    await batch(min(n, 500))  # warm-up: connections opened, caches filled
    changed = 0
    profile = cProfile.Profile() if calls else None
    cpu0, wall0 = time.process_time(), time.monotonic()
    if profile is not None:
        profile.enable()
    await batch(n)
    if profile is not None:
        profile.disable()
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    await milters.close()
    committer.stop()
    result = {"us_per_msg": cpu / n * 1e6, "rate": n / wall, "rewritten": changed / n}
    if profile is not None:
        stats = pstats.Stats(profile)
        result["calls_per_msg"] = stats.total_calls / n  # type: ignore[attr-defined]
    return result


def child(args: argparse.Namespace) -> int:
    """One measurement, in this process (run with the checkout's src on PYTHONPATH)."""
    with tempfile.TemporaryDirectory(prefix="mailfort-milterloop-") as tmp:
        result = asyncio.run(measure(args.port, args.messages, args.concurrency, args.size,
                                     Path(tmp), args.calls))
    print(json.dumps(result))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rspamd-workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--baseline", help="another checkout's src directory, measured in turn")
    ap.add_argument("--calls", action="store_true",
                    help="count Python function calls per message (cProfile) instead of CPU")
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)  # child: rspamd's port
    args = ap.parse_args()
    if args.port:
        return child(args)
    if shutil.which("rspamd") is None:
        print("needs rspamd (apt-get install rspamd)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    from milter_bench import DNS, Rspamd

    from tests.dnsserver import DNSServer

    sources = {"this": str(HERE.parent / "src")}
    if args.baseline:
        sources["baseline"] = str(Path(args.baseline).resolve())
    results: dict[str, list[dict[str, float]]] = {name: [] for name in sources}
    with contextlib.ExitStack() as stack:
        DNS.append(stack.enter_context(DNSServer()))
        rspamd = Rspamd(args.rspamd_workers, DNS[0].port)
        stack.callback(rspamd.cleanup)
        for i in range(args.runs):
            order = list(sources) if i % 2 == 0 else list(reversed(sources))
            for name in order:
                env = {**os.environ, "PYTHONPATH": f"{sources[name]}:{HERE.parent}"}
                out = subprocess.run(
                    [sys.executable, __file__, "--port", str(rspamd.port), "--messages",
                     str(args.messages), "--size", str(args.size), "--concurrency",
                     str(args.concurrency)] + (["--calls"] if args.calls else []),
                    env=env, capture_output=True, text=True,
                    timeout=600)
                if out.returncode != 0:
                    print(out.stderr, file=sys.stderr)
                    return 1
                result = json.loads(out.stdout.splitlines()[-1])
                results[name].append(result)
                calls = (f", {result['calls_per_msg']:.0f} Python calls/msg"
                         if "calls_per_msg" in result else "")
                print(f"# run {i + 1} {name}: {result['us_per_msg']:.0f} µs CPU/msg, "
                      f"{result['rate']:.0f}/s, rewritten {result['rewritten']:.0%}{calls}",
                      flush=True)
    for name, rows in results.items():
        us = [r["us_per_msg"] for r in rows]
        print(f"{name}: {statistics.median(us):.0f} µs CPU/msg in the milter path "
              f"(range {min(us):.0f}–{max(us):.0f}, {args.runs} runs of {args.messages})"
              + (" under cProfile" if args.calls else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
