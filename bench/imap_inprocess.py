"""IMAP mailbox side in-process: SELECT and UID FETCHes through ``MailSession`` alone.

    PYTHONPATH=src python3 bench/imap_inprocess.py                 # 2,000 x 1 KB, 7 reps
    PYTHONPATH=/tmp/old/src python3 bench/imap_inprocess.py        # another tree's code
    PYTHONPATH=src python3 bench/imap_inprocess.py --profile select-cold

No socket, no TLS, no event loop: the commands as the driver hands them over (parsed by
the real ``CommandReader``), every untagged response drained (as the driver's thread does).
The same files as bench/imap_bench.py writes (LF endings, S=/W= in the names, in new/), in
a fresh Maildir per repetition (new names each time, as there). Per repetition: a "cold"
session (SELECT assigns the UIDs; the files stay in new/), then a "warm" one in the same
process (the server's sessions of one user share its MailStore), each timing SELECT, the
ENVELOPE FETCH and ``UID FETCH 1:* BODY.PEEK[]`` twice. Figures: median (and range) of
microseconds per message (``--cpu``: the thread's CPU time). On a busy machine a figure
moves; the profile and the ratio of two trees run alternately are what to trust
(``--profile ROW``: cProfile of that row).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from imap_bench import FETCH_BODY, FETCH_META, fill_maildir
from mfproc import BENCH_DIR

from mailfort.protocol.imap_parse import Command, CommandReader, ContinuationRequest
from mailfort.server.imap_commands import MailSession, MailSessionSettings

ROWS = ("select-cold", "meta-cold", "body-cold", "body-cold-2",
        "select-warm", "meta-warm", "body-warm", "body-warm-2")


def parse(line: str) -> Command:
    reader = CommandReader()
    reader.feed(line.encode() + b"\r\n")
    while True:
        event = reader.next_event()
        if isinstance(event, Command):
            return event
        assert isinstance(event, ContinuationRequest), event


def run(session: MailSession, line: str, profile: cProfile.Profile | None,
        clock: Callable[[], float]) -> float:
    cmd = parse(line)
    if profile is not None:
        profile.enable()
    t0 = clock()
    outcome = session.execute(cmd)
    n = sum(len(x) for x in outcome.untagged)
    took = clock() - t0
    if profile is not None:
        profile.disable()
    if outcome.status != "OK" or n == 0:
        raise RuntimeError(f"{line}: {outcome}")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--profile", choices=ROWS, help="cProfile this row (all repetitions)")
    ap.add_argument("--cpu", action="store_true",
                    help="the thread's CPU time (user + system), not wall time: steadier "
                         "on a busy machine, blind to waits on the disk")
    args = ap.parse_args()
    if not 1 <= args.messages <= 100_000 or not 1 <= args.reps <= 50:
        ap.error("--messages 1..100000, --reps 1..50")
    settings = MailSessionSettings()
    samples: dict[str, list[float]] = {r: [] for r in ROWS}
    profile = cProfile.Profile() if args.profile else None
    clock = time.thread_time if args.cpu else time.perf_counter
    with tempfile.TemporaryDirectory(prefix="mailfort-imap-inproc-", dir=BENCH_DIR) as tmp:
        for rep in range(args.reps):
            maildir = Path(tmp) / f"r{rep}"
            fill_maildir(maildir, args.messages, args.size, None, rep=rep)
            for phase in ("cold", "warm"):
                s = MailSession(maildir, user="alice", settings=settings)
                for row, line in ((f"select-{phase}", "a SELECT INBOX"),
                                  (f"meta-{phase}", "b " + FETCH_META),
                                  (f"body-{phase}", "c " + FETCH_BODY),
                                  (f"body-{phase}-2", "d " + FETCH_BODY)):
                    prof = profile if row == args.profile else None
                    samples[row].append(run(s, line, prof, clock) * 1e6 / args.messages)
                s.close()
    mod = sys.modules[MailSession.__module__].__file__
    print(f"# {args.messages} x {args.size} B, {args.reps} reps, "
          f"{'CPU' if args.cpu else 'wall'} time, code from {mod}")
    for row in ROWS:
        v = samples[row]
        print(f"{row:13s} {statistics.median(v):8.2f} us/msg  ({min(v):.2f}-{max(v):.2f})")
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
