"""IMAP FETCH rows over the wire, mailfort against mailfort: two source trees alternately.

    PYTHONPATH=bench python3 bench/imap_wire_ab.py --a /tmp/base/src --b src --reps 6

One ``mailfort serve`` per tree (one worker, plaintext LOGIN on loopback), each repetition
refills both Maildirs with names of their own (no cache by file name answers a later
"cold" session), then a cold session (SELECT, UID FETCH ENVELOPE, UID FETCH BODY.PEEK[])
and a warm one, the trees in alternating order. Per command: the client's wall time and
the serving process's CPU time (user + system from /proc: steadier on a busy machine).
No Dovecot: this answers "did a change move mailfort's figure", not "how far from Dovecot".
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from imap_bench import FETCH_BODY, FETCH_META, Client, clear_maildir, fill_maildir
from mfproc import MailfortServer, bench_tmpdir


class FirstByteClient(Client):
    """``Client`` that notes when the first line of an answer arrived (``mark`` first)."""

    first = 0.0

    def mark(self) -> None:
        self.first = 0.0

    def line(self) -> bytes:
        out = super().line()
        if not self.first:
            self.first = time.perf_counter()
        return out


def session(mf: MailfortServer, count: int, phase: str, name: str,
            wall: dict[str, list[float]], cpu: dict[str, list[float]]) -> None:
    c = FirstByteClient(mf.ports["imap"], "alice@example.test", mf.passwords["alice@example.test"],
               starttls=False)
    try:
        for key, command in (("select", "SELECT INBOX"), ("meta", FETCH_META),
                             ("body", FETCH_BODY)):
            c0 = mf.cpu_seconds()
            c.mark()
            t0 = time.perf_counter()
            t, got = c.timed(command)
            wall.setdefault(f"{name} {key} {phase} first", []).append(c.first - t0)
            c1 = mf.cpu_seconds()
            if key != "select" and len(got) < count:
                raise RuntimeError(f"{name}: {command} gave {len(got)} responses")
            wall.setdefault(f"{name} {key} {phase}", []).append(t)
            cpu.setdefault(f"{name} {key} {phase}", []).append(c1 - c0)
    finally:
        c.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True, help="src directory of tree A")
    ap.add_argument("--b", required=True, help="src directory of tree B")
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--port-base", type=int, default=15900)
    args = ap.parse_args()
    if not 1 <= args.messages <= 100_000 or not 1 <= args.reps <= 40:
        ap.error("--messages 1..100000, --reps 1..40")
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    with bench_tmpdir("mailfort-imap-ab-") as tmp:
        servers = {}
        for i, (name, src) in enumerate((("A", args.a), ("B", args.b))):
            root = Path(tmp) / name
            root.mkdir()
            mf = MailfortServer(root, port_base=args.port_base + 20 * i, plaintext_pop3=True,
                                imap=True, source=str(Path(src).resolve()))
            mf.start()
            servers[name] = mf
        try:
            for rep in range(args.reps):
                order = ["A", "B"] if rep % 2 == 0 else ["B", "A"]
                for name in order:
                    mf = servers[name]
                    clear_maildir(mf.maildir("alice"))
                    fill_maildir(mf.maildir("alice"), args.messages, args.size, None, rep=rep)
                    time.sleep(0.2)
                    for phase in ("cold", "warm"):
                        session(mf, args.messages, phase, name, wall, cpu)
        finally:
            for mf in servers.values():
                mf.stop()
    print(f"A = {args.a}, B = {args.b}; {args.messages} x {args.size} B, {args.reps} reps, "
          "median (range); CPU = the server process, µs per message; 'first': the time to "
          "the answer's first line")
    print("| row | A wall ms | B wall ms | A CPU µs/msg | B CPU µs/msg |\n|---|---|---|---|---|")
    for key in ("select cold", "meta cold", "body cold", "select warm", "meta warm",
                "body warm", "meta cold first", "body cold first", "meta warm first",
                "body warm first"):
        row = []
        for data, scale in ((wall, 1e3), (cpu, 1e6 / args.messages)):
            for name in ("A", "B"):
                if f"{name} {key}" not in data:
                    row.append("")
                    continue
                v = [x * scale for x in data[f"{name} {key}"]]
                row.append(f"{statistics.median(v):.1f} ({min(v):.1f}–{max(v):.1f})")
        print(f"| {key} | " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
