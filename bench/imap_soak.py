"""IMAP multi-session consistency soak: the rounds of tests/server/test_imap_consistency.py
for minutes, with SIGKILLs of workers between rounds.

    python bench/imap_soak.py                         # 10 minutes, one node with 2 workers
    python bench/imap_soak.py --minutes 30 --sessions 8 --kill-every 5
    python bench/imap_soak.py --kill-mid              # the SIGKILL in the middle of a round
    python bench/imap_soak.py --nodes                 # two nodes sharing mail_dir and Redis

Each round: every session STOREs the keyword and system flag it owns (by UID and by
sequence number, .SILENT or not), FETCHes and SEARCHes by sequence number, one session
EXPUNGEs and MOVEs, MX deliveries arrive over SMTP and a POP3 session RETRs and DELEs.
After each round every session NOOPs and all must agree, and a QRESYNC client away since
the last checkpoint must catch up to the same state (tests/server/imapcheck.py lists what
else is checked on every response). Every ``--kill-every`` rounds (workers mode) a
random worker is SIGKILLed, the supervisor restarts it, new sessions log in, and the
UIDs every session was ever told must still name the same messages; with ``--kill-mid``
the SIGKILL comes during a round, and the sessions it did not cut off must still agree.
Exits 1 at the first inconsistency, with the checker's findings. Loopback only; the seed
makes the choices repeatable (not the timing).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

_TREE = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_TREE / "src"), str(_TREE)]  # this checkout's mailfort and tests

from tests.server.imapcheck import Checked, Resync, UidRegistry  # noqa: E402
from tests.server.test_imap_consistency import (  # noqa: E402
    Expectation,
    Served,
    imap_session,
    mx_deliver,
    on_both_workers,
    run_rounds,
    start_node,
    stop_node,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--sessions", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10, help="commands per session per round")
    ap.add_argument("--kill-every", type=int, default=10, help="rounds; 0: never")
    ap.add_argument("--kill-mid", action="store_true",
                    help="kill during a round (sessions cut off are dropped), not between")
    ap.add_argument("--nodes", action="store_true", help="two nodes (needs redis-server)")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mailfort-imap-soak-"))
    root.chmod(0o711)
    redis = None
    nodes: list[Served] = []
    try:
        if args.nodes:
            from tests.redisserver import RedisServer

            redis = RedisServer().start()
            nodes = [start_node(root / n, mail_dir=root / "mail", redis_url=redis.url,
                                per_user=100) for n in ("a", "b")]
        else:
            nodes = [start_node(root / "node", workers=2, per_user=100)]
        return soak(args, nodes)
    finally:
        for n in nodes:
            log = stop_node(n)
            if "Traceback" in log:
                print(log[-3000:], file=sys.stderr)
        if redis is not None:
            redis.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def sessions_for(nodes: list[Served], count: int) -> list[Checked]:
    if len(nodes) == 1:
        return on_both_workers(nodes[0], count)
    return [imap_session(nodes[i % 2].ports["imap"], f"n{i}", condstore=i % 3 == 1,
                         qresync=i % 3 == 2) for i in range(count)]


def kill_one(node: Served, rng: random.Random) -> None:
    os.kill(rng.choice(node.workers()), signal.SIGKILL)


def soak(args: argparse.Namespace, nodes: list[Served]) -> int:
    rng = random.Random(args.seed)
    mx = [n.ports["mx"] for n in nodes]
    pop3 = [n.ports["pop3"] for n in nodes]
    mx_deliver(mx[0], 20, "seed")
    exp, registry = Expectation(), UidRegistry()
    totals = {"rounds": 0, "mx_sessions": 0, "expunged": 0, "pop3_dele": 0, "kills": 0}
    end = time.monotonic() + args.minutes * 60
    print(f"seed {args.seed}, {args.sessions} sessions, "
          f"{'two nodes' if len(nodes) == 2 else 'two workers'}", flush=True)
    while time.monotonic() < end:
        sessions = sessions_for(nodes, args.sessions)
        away = imap_session(nodes[-1].ports["imap"], "q", qresync=True, select=False)
        try:
            batch = args.kill_every if args.kill_every and len(nodes) == 1 else 5
            killing = args.kill_mid and args.kill_every and len(nodes) == 1
            figures = run_rounds(sessions, mx, pop3, batch, args.steps, rng.randrange(1 << 30),
                                 exp, registry, Resync(away),
                                 kill=(lambda: kill_one(nodes[0], rng)) if killing else None)
        except AssertionError as exc:
            print(f"INCONSISTENT after {totals['rounds']} rounds (seed {args.seed}):\n{exc}")
            return 1
        finally:
            for s in [*sessions, away]:
                s.close()
        for k in ("rounds", "mx_sessions", "expunged", "pop3_dele"):
            totals[k] += figures[k]
        if args.kill_every and len(nodes) == 1:
            if not args.kill_mid:
                kill_one(nodes[0], rng)
            totals["kills"] += 1
            deadline = time.monotonic() + 60
            # (the supervisor's back-off grows with restarts in a row: up to 30 s)
            while nodes[0].log.read_text().count(" serving") < 2 + totals["kills"]:
                if time.monotonic() > deadline:
                    print("the supervisor did not restart the worker")
                    return 1
                time.sleep(0.05)
        print(" ".join(f"{k} {v}" for k, v in totals.items()), flush=True)
    print(f"consistent: {' '.join(f'{k} {v}' for k, v in totals.items())}, "
          f"UIDs tracked {len(registry.seen)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
