"""The inline POP3 RETR path in process: µs per RETR, no socket, no other process.

    python bench/pop3_retr_micro.py                      # this tree
    python bench/pop3_retr_micro.py --base /tmp/old/src --pairs 5   # A/B, alternating
    python bench/pop3_retr_micro.py --profile            # cProfile of the loop

Why: a RETR of a 1 KB message costs mailfort's worker ~15 µs more Python than Dovecot's C,
and on a busy machine the wall clock of a real session moves by more than that. This feeds
``RETR n`` lines to a ``POP3Session`` (``data_received``, read-ahead included) over a real
Maildir of 2,000 bench messages (pop3_bench.py's), with a transport that only counts what
is written; each run is the minimum of ``--reps`` passes over the mailbox, in a fresh
interpreter per tree so the trees alternate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def _child(count: int, reps: int, profile: bool) -> tuple[float, float]:
    """One tree (already on sys.path): the min µs per RETR over ``reps`` passes, in all
    and up to the reply's write (the latency the client waits for; what follows the
    write, the read-ahead, overlaps the client's reading when each has a core)."""
    import asyncio
    import cProfile
    import pstats
    from time import perf_counter

    from pop3_bench import fill_maildir

    from mailfort.config import LimitsConfig
    from mailfort.server.pop3 import POP3Server, POP3Session
    from mailfort.store.pop3_mailbox import POP3Mailbox

    class Transport(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.octets = 0
            self.written_at = 0.0

        def write(self, data: bytes) -> None:  # type: ignore[override]
            self.octets += len(data)
            self.written_at = perf_counter()

        def get_extra_info(self, name: str, default: object = None) -> object:
            return ("127.0.0.1", 1) if name == "peername" else default

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

        def get_write_buffer_size(self) -> int:
            return 0

        def close(self) -> None:
            pass

    async def main() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            maildir = Path(tmp) / "mail"
            fill_maildir(maildir, count, 1024, None)
            server = POP3Server(ssl_context=None, authenticator=None,  # type: ignore[arg-type]
                                mail_dir=Path(tmp), limits=LimitsConfig(),
                                implicit_tls=False, allow_plaintext=True)
            best = best_latency = float("inf")
            prof = cProfile.Profile() if profile else None
            for _ in range(reps):
                session = POP3Session(server)
                transport = Transport()
                session.connection_made(transport)
                engine = session.engine
                assert engine is not None
                mailbox = POP3Mailbox.open(maildir)
                engine._wait = engine._wait.__class__.MAILBOX  # as after a good PASS
                engine.mailbox_opened(mailbox.listing)
                session.mailbox = mailbox
                engine.take_output()
                lines = [b"RETR %d\r\n" % n for n in range(1, count + 1)]
                receive = session.data_received
                if prof is not None:
                    prof.enable()
                to_write = 0.0
                t0 = perf_counter()
                for line in lines:
                    start = perf_counter()
                    receive(line)
                    to_write += transport.written_at - start
                elapsed = perf_counter() - t0
                if prof is not None:
                    prof.disable()
                best = min(best, elapsed)
                best_latency = min(best_latency, to_write)
                assert transport.octets > count * 1024, transport.octets
                session.connection_lost(None)
                await asyncio.sleep(0.05)  # the close in a thread
                mailbox._flags_settled()
            if prof is not None:
                order = os.environ.get("SORT", "tottime")
                pstats.Stats(prof, stream=sys.stderr).sort_stats(order).print_stats(60)
            return best / count * 1e6, best_latency / count * 1e6

    return asyncio.run(main())


def run_tree(src: Path, count: int, reps: int, profile: bool = False) -> tuple[float, float]:
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{HERE}")
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--count", str(count), "--reps", str(reps)]
        + (["--profile"] if profile else []),
        env=env, check=True, capture_output=not profile, text=True, cwd=HERE)
    if profile:
        return 0.0, 0.0
    total, latency = json.loads(out.stdout.strip().splitlines()[-1])
    return float(total), float(latency)


def _summary(name: str, values: list[float]) -> str:
    return f"{name} median {statistics.median(values):+.2f} ({min(values):+.2f} to " \
        f"{max(values):+.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--base", type=Path, help="another tree's src/, run alternately")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.count, args.reps, args.profile)))
        return
    if args.profile:
        run_tree(SRC, args.count, args.reps, profile=True)
        return
    ours: list[tuple[float, float]] = []
    base: list[tuple[float, float]] = []
    for i in range(args.pairs):
        trees = [(SRC, ours)] + ([(args.base, base)] if args.base else [])
        if i % 2:
            trees.reverse()
        for src, into in trees:
            into.append(run_tree(src, args.count, args.reps))
        line = f"pair {i + 1}: this {ours[-1][0]:.2f} µs/RETR, {ours[-1][1]:.2f} to the write"
        if args.base:
            line += f"; base {base[-1][0]:.2f}, {base[-1][1]:.2f}"
        print(line, flush=True)
    for k, what in enumerate(("µs per RETR", "µs to the write")):
        print(what + ": " + _summary("this", [r[k] for r in ours]), end="")
        if args.base:
            print("; " + _summary("base", [r[k] for r in base]) + "; " + _summary(
                "this - base per pair",
                [a[k] - b[k] for a, b in zip(ours, base, strict=True)]), end="")
        print()


if __name__ == "__main__":
    main()
