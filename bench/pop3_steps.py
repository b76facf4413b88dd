"""POP3 session steps timed from the client: cold, warm (right after) and settled (1 s after).

    python bench/pop3_steps.py --reps 5            # mailfort only, one worker
    python bench/pop3_steps.py --reps 5 --dovecot  # the reference too
    python bench/pop3_steps.py --reps 5 --base /tmp/old/src  # A/B: another tree, alternating
    python bench/pop3_steps.py --pipeline 10   # a client pipelining 10 RETRs at a time

Why: the warm row of pop3_bench.py (a session right after the previous one) ran slower
than the settled one (1 s later), so some work of the previous session competed with the
next. This prints each step's median (connect+greeting, USER, PASS, STAT, the RETRs,
QUIT) per state, so the step that pays shows, and the server's CPU per message (user and
system, from /proc: on a busy machine a steadier figure than the wall clock). Loopback
only; counts are bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import poplib
import statistics
import sys
import time
from pathlib import Path

from mfproc import MailfortServer, bench_tmpdir, cpu_times
from pop3_bench import DOVECOT_PORT, DOVECOT_ROOT, SETTLE, VMAIL_GID, VMAIL_UID, fill_maildir

STEPS = ("connect", "USER", "PASS", "STAT", "RETR", "QUIT", "total")
COLUMNS = (*STEPS, "user", "sys")


def retr_pipelined(pop: poplib.POP3, count: int, depth: int) -> None:
    """RETR 1..count sent ``depth`` at a time (RFC 2449 PIPELINING's way), each batch's
    replies read before the next is sent."""
    for first in range(1, count + 1, depth):
        batch = range(first, min(first + depth, count + 1))
        pop.sock.sendall(b"".join(b"RETR %d\r\n" % n for n in batch))
        for n in batch:
            if not pop.file.readline().startswith(b"+OK"):
                raise RuntimeError(f"RETR {n} refused")
            while pop.file.readline() != b".\r\n":
                pass


def session(port: int, password: str, pid: int | None = None,
            pipeline: int = 1) -> dict[str, float]:
    """One session, each step's seconds; with ``pid``, the server's CPU seconds (user,
    system) per message over the RETRs alone (the login's hash would swamp them)."""
    t: dict[str, float] = {}
    t0 = last = time.perf_counter()
    idle = 0.0  # reading /proc takes milliseconds: counted in no step

    def mark(step: str) -> None:
        nonlocal last
        now = time.perf_counter()
        t[step] = now - last
        last = now

    def cpu() -> tuple[float, float]:
        nonlocal last, idle
        if not pid:
            return 0.0, 0.0
        got = cpu_times(pid)
        now = time.perf_counter()
        idle += now - last
        last = now
        return got

    pop = poplib.POP3("127.0.0.1", port, timeout=60)
    mark("connect")
    pop.user("alice@example.test")
    mark("USER")
    pop.pass_(password)
    mark("PASS")
    count, _ = pop.stat()
    mark("STAT")
    cpu0 = cpu()
    if pipeline > 1:
        retr_pipelined(pop, count, pipeline)
    else:
        for n in range(1, count + 1):
            pop.retr(n)
    mark("RETR")
    cpu1 = cpu()
    t["user"], t["sys"] = ((b - a) / max(count, 1) for a, b in zip(cpu0, cpu1, strict=True))
    pop.quit()
    mark("QUIT")
    t["total"] = time.perf_counter() - t0 - idle
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--port-base", type=int, default=17500)
    ap.add_argument("--dovecot", action="store_true")
    ap.add_argument("--base", help="a second mailfort src directory, run alternately")
    ap.add_argument("--pipeline", type=int, default=1,
                    help="RETRs sent this many at a time (poplib sends one, waits)")
    args = ap.parse_args()
    if not 1 <= args.messages <= 100_000 or not 1 <= args.reps <= 20:
        ap.error("--messages 1..100000, --reps 1..20")
    if not 1 <= args.pipeline <= 100:
        ap.error("--pipeline 1..100")
    res: dict[str, list[dict[str, float]]] = {}
    with contextlib.ExitStack() as stack:
        servers = []
        for label, source in (("mailfort", None), ("base", args.base)):
            if label == "base" and not source:
                continue
            tmp = stack.enter_context(bench_tmpdir("mailfort-pop3-steps-"))
            port_base = args.port_base + (100 if source else 0)
            mf = stack.enter_context(MailfortServer(Path(tmp), port_base=port_base,
                                                    plaintext_pop3=True, source=source,
                                                    imap=True))  # own IMAP ports: two can run
            servers.append((label, mf.ports["pop3"], mf.maildir("alice"), None,
                            mf.passwords["alice@example.test"], mf.pid))
        if args.dovecot:
            servers.append(("Dovecot", DOVECOT_PORT, DOVECOT_ROOT / "alice",
                            (VMAIL_UID, VMAIL_GID), "alicepw", None))
        for _ in range(args.reps):
            for name, port, path, owner, password, pid in servers:
                fill_maildir(path, args.messages, 1024, owner)
                for phase in ("cold", "warm", "settled"):
                    if phase == "settled":
                        time.sleep(SETTLE)
                    t = session(port, password, pid, args.pipeline)
                    res.setdefault(f"{name} {phase}", []).append(t)
    print(f"# median of {args.reps}; steps in ms; server CPU (user, sys) in us per message "
          "over the RETRs (clock ticks of 10 ms: ~5 us steps with 2,000 messages)")
    print("| server state | " + " | ".join(COLUMNS) + " | msg/s |")
    print("|---|" + "---|" * (len(COLUMNS) + 1))
    for key, runs in res.items():
        med = {s: statistics.median(r[s] for r in runs) for s in COLUMNS}
        cells = " | ".join(f"{med[s] * 1000:.1f}" for s in STEPS)
        cells += " | " + " | ".join(f"{med[s] * 1e6:.0f}" for s in ("user", "sys"))
        print(f"| {key} | {cells} | {args.messages / med['total']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
