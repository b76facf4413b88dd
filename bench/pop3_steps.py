"""POP3 session steps timed from the client: cold, warm (right after) and settled (1 s after).

    python bench/pop3_steps.py --reps 5            # mailfort only, one worker
    python bench/pop3_steps.py --reps 5 --dovecot  # the reference too

Why: the warm row of pop3_bench.py (a session right after the previous one) ran slower
than the settled one (1 s later), so some work of the previous session competed with the
next. This prints each step's median (connect+greeting, USER, PASS, STAT, the RETRs,
QUIT) per state, so the step that pays shows. Loopback only; counts are bounded.
"""

from __future__ import annotations

import argparse
import poplib
import statistics
import sys
import time
from pathlib import Path

from mfproc import MailfortServer, bench_tmpdir
from pop3_bench import DOVECOT_PORT, DOVECOT_ROOT, SETTLE, VMAIL_GID, VMAIL_UID, fill_maildir

STEPS = ("connect", "USER", "PASS", "STAT", "RETR", "QUIT", "total")


def session(port: int, password: str) -> dict[str, float]:
    """One session, each step's seconds."""
    t: dict[str, float] = {}
    t0 = last = time.perf_counter()

    def mark(step: str) -> None:
        nonlocal last
        now = time.perf_counter()
        t[step] = now - last
        last = now

    pop = poplib.POP3("127.0.0.1", port, timeout=60)
    mark("connect")
    pop.user("alice@example.test")
    mark("USER")
    pop.pass_(password)
    mark("PASS")
    count, _ = pop.stat()
    mark("STAT")
    for n in range(1, count + 1):
        pop.retr(n)
    mark("RETR")
    pop.quit()
    mark("QUIT")
    t["total"] = time.perf_counter() - t0
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--port-base", type=int, default=17500)
    ap.add_argument("--dovecot", action="store_true")
    args = ap.parse_args()
    if not 1 <= args.messages <= 100_000 or not 1 <= args.reps <= 20:
        ap.error("--messages 1..100000, --reps 1..20")
    res: dict[str, list[dict[str, float]]] = {}
    with bench_tmpdir("mailfort-pop3-steps-") as tmp:
        mf = MailfortServer(Path(tmp), port_base=args.port_base, plaintext_pop3=True)
        with mf:
            servers = [("mailfort", mf.ports["pop3"], mf.maildir("alice"), None,
                        mf.passwords["alice@example.test"])]
            if args.dovecot:
                servers.append(("Dovecot", DOVECOT_PORT, DOVECOT_ROOT / "alice",
                                (VMAIL_UID, VMAIL_GID), "alicepw"))
            for _ in range(args.reps):
                for name, port, path, owner, password in servers:
                    fill_maildir(path, args.messages, 1024, owner)
                    for phase in ("cold", "warm", "settled"):
                        if phase == "settled":
                            time.sleep(SETTLE)
                        res.setdefault(f"{name} {phase}", []).append(session(port, password))
    print("| server state | " + " | ".join(f"{s} ms" for s in STEPS) + " | msg/s |")
    print("|---|" + "---|" * (len(STEPS) + 1))
    for key, runs in res.items():
        med = {s: statistics.median(r[s] for r in runs) for s in STEPS}
        cells = " | ".join(f"{med[s] * 1000:.1f}" for s in STEPS)
        print(f"| {key} | {cells} | {args.messages / med['total']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
