"""workers = 2 against workers = 1 on the MX 1 KB / 50 sessions row, alternating.

Each round starts a fresh mailfort per setting (bench/mfproc.py), warms it up, waits for
the disk to be quiet, then sends with Postfix's ``smtp-source -c`` (a connection per
message, as in run_all.py) and reads the CPU that mailfort used (supervisor + workers, from
/proc) to report CPU microseconds per message. Loopback only.

    python bench/workers_bench.py --rounds 3 --messages 3000
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mfproc import (
    BENCH_DIR,
    MailfortServer,
    bench_tmpdir,
    wait_disk_quiet,
    wait_freed_inodes,
)

PORT_BASE = 14500


def smtp_source(port: int, size: int, sessions: int, messages: int) -> float:
    start = time.perf_counter()
    subprocess.run(
        ["smtp-source", "-c", "-l", str(size), "-m", str(messages), "-s", str(sessions),
         "-f", "bench@example.org", "-t", "alice@example.test", f"127.0.0.1:{port}"],
        check=True, stdout=subprocess.DEVNULL)
    return messages / (time.perf_counter() - start)


def one(workers: int, args: argparse.Namespace, root: Path) -> tuple[float, float]:
    """(messages per second, CPU microseconds per message) of one fresh server, whose data
    stays in ``root`` until the end of the benchmark (see ``bench_tmpdir``)."""
    tmp = tempfile.mkdtemp(prefix=f"w{workers}-", dir=root)
    mf = MailfortServer(Path(tmp), port_base=args.port_base, workers=workers)
    with mf:
        time.sleep(1.0)  # every worker is listening
        smtp_source(mf.ports["mx"], args.size, args.sessions, args.warmup)
        wait_disk_quiet(BENCH_DIR)
        cpu0 = mf.cpu_seconds()
        rate = smtp_source(mf.ports["mx"], args.size, args.sessions, args.messages)
        cpu = mf.cpu_seconds() - cpu0
        stored = len(os.listdir(mf.maildir("alice") / "new"))
        if stored != args.warmup + args.messages:
            raise SystemExit(f"stored {stored} != accepted {args.warmup + args.messages}")
    return rate, cpu / args.messages * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--port-base", type=int, default=PORT_BASE,
                    help="first of the loopback ports the servers listen on")
    args = ap.parse_args()
    if shutil.which("smtp-source") is None:
        print("smtp-source not found: run ../shared/anchors/postfix-reference.sh start")
        return 2
    results: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    wait_freed_inodes()  # mfproc.FREED_INODE_WINDOW
    with bench_tmpdir("mf-workers-") as root:
        for r in range(args.rounds):
            for w in (1, 2) if r % 2 == 0 else (2, 1):
                rate, us = one(w, args, Path(root))
                results[w].append((rate, us))
                print(f"# round {r + 1} workers={w}: {rate:.0f}/s, {us:.0f} us CPU/message",
                      flush=True)
    ratios = [b[0] / a[0] for a, b in zip(results[1], results[2], strict=True)]
    for w, rows in results.items():
        rates = [x[0] for x in rows]
        print(f"workers={w}: median {statistics.median(rates):.0f}/s "
              f"(range {min(rates):.0f}-{max(rates):.0f}), median CPU "
              f"{statistics.median(x[1] for x in rows):.0f} us/message")
    print(f"workers=2 / workers=1: median {statistics.median(ratios):.2f}x "
          f"(range {min(ratios):.2f}-{max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
