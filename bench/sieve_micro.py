"""In-process CPU cost of one run of sieve_bench's 50-rule script on its 1 KB message, as
``server/sieve_delivery.evaluate`` does it (``SieveMessage.from_bytes`` per recipient, then
``Script.run``), in microseconds per run: the median of several repetitions.

    python bench/sieve_micro.py                  # 7 repetitions of 2,000 runs
    python bench/sieve_micro.py --runs 5000 --reps 9 --profile

No network, no disk. ``--profile`` prints cProfile's top functions for one repetition.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
from sieve_bench import ALICE, fifty_rules  # noqa: E402
from smtp_load import make_body  # noqa: E402

from mailfort.protocol import sieve  # noqa: E402

SENDER = "sender@remote.example"


def message() -> tuple[bytes, bytes]:
    """The bench's message as stored: a Received line on top, then smtp_load's 1 KB."""
    raw = (b"Received: from client.remote.example (client.remote.example [127.0.0.1])\r\n"
           b"\tby mx.example.test with ESMTP id 4Xq7Fz0abc; Mon, 7 Dec 2026 22:00:00 +0000\r\n"
           + make_body(1024, SENDER, ALICE))
    head, sep, body = raw.partition(b"\r\n\r\n")
    return head + sep, body


def one_rep(script: sieve.Script, env: sieve.SieveEnvironment, head: bytes, body: bytes,
            runs: int) -> float:
    """Microseconds per (from_bytes + run)."""
    size = len(head) + len(body)
    t0 = time.thread_time()  # CPU of this thread: other load on the machine is not counted
    for _ in range(runs):
        view = sieve.SieveMessage.from_bytes(head, lambda: body, size=size,
                                             envelope_from=SENDER, envelope_to=ALICE)
        result = script.run(view, env)
    took = time.thread_time() - t0
    assert result.error is None and result.actions == [sieve.Keep()], result
    return took / runs * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    script = sieve.compile_script(fifty_rules())
    env = sieve.SieveEnvironment(now=datetime.now(UTC), hostname="mx.example.test",
                                 mailbox_exists=lambda name: False)
    head, body = message()
    one_rep(script, env, head, body, 200)  # warm-up
    if args.profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.runcall(one_rep, script, env, head, body, args.runs)
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    times = [one_rep(script, env, head, body, args.runs) for _ in range(args.reps)]
    print(f"{statistics.median(times):.1f} us per message (median of {args.reps} x "
          f"{args.runs}; min {min(times):.1f}, max {max(times):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
