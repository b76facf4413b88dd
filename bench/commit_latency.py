"""How long a lone message waits in ``Committer.commit`` (store/maildir.py): the store's
share of the one-session MX row, without the network and the checks around it.

    PYTHONPATH=src python bench/commit_latency.py [--messages 400] [--gap-ms 2]

One message of 1.4 KB at a time into one Maildir, as shipped (syncfs, the node's shared
flush), with ``--gap-ms`` between the 250 and the next commit (the rest of a session).
``--free N``: first create and delete N files beside it, as another process's clean-up
does (on ext4 without a journal each file creation of the next minute then scans past
those inodes: bench/RESULTS.md).
Prints the median and quartiles of the commit's wall time and the process's CPU per
message. Run it with two source trees on ``PYTHONPATH`` in turn to compare them.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from mailfort.store.maildir import Committer, maildir_for

BODY = b"Return-Path: <bench@example.org>\r\n" + (b"x" * 98 + b"\r\n") * 14


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime  # kernel included: the flush is mostly kernel work


async def run(committer: Committer, maildir: Path, n: int, gap: float) -> list[float]:
    times = []
    for _ in range(n):
        spool = committer.new_spool()
        spool.write(BODY)
        t = time.perf_counter()
        await committer.commit(spool, [maildir])
        times.append(time.perf_counter() - t)
        await asyncio.sleep(gap)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=400)
    ap.add_argument("--gap-ms", type=float, default=2.0)
    ap.add_argument("--free", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="mailfort-commit-") as tmp:
        data = Path(tmp)
        committer = Committer(data, shared_flush=True)
        maildir = maildir_for(data / "mail", "alice@example.test")
        try:
            asyncio.run(run(committer, maildir, 50, args.gap_ms / 1000))  # warm up
            if args.free:
                freed = data / "freed"
                freed.mkdir()
                for i in range(args.free):
                    (freed / str(i)).write_bytes(b"x")
                shutil.rmtree(freed)
                time.sleep(1.1)  # the kernel skips only inodes freed before this second
            cpu0 = _cpu()
            times = asyncio.run(run(committer, maildir, args.messages, args.gap_ms / 1000))
            cpu = (_cpu() - cpu0) / args.messages * 1e6
        finally:
            committer.stop()
    q = statistics.quantiles(times, n=4)
    print(f"commit: median {statistics.median(times) * 1e6:.0f} µs "
          f"(quartiles {q[0] * 1e6:.0f}–{q[2] * 1e6:.0f}), CPU {cpu:.0f} µs/msg "
          f"(the gap's sleep included), {committer.batches} batches")


if __name__ == "__main__":
    main()
