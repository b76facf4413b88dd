"""Soak: a steady mixed load for a long time; does anything grow?

    python bench/soak.py                      # one hour, samples every minute
    python bench/soak.py --minutes 10 --rate 4

Against one mailfort server (bench/soak_server.py: ``mailfort serve`` that also reports
its asyncio task count), at ``--rate`` operations a second, in turn: a message to the MX
(alice or bob), a message through submission (AUTH PLAIN, plaintext allowed on loopback
for the bench) to a local user, and every tenth operation a POP3 session that reads and
deletes everything in a mailbox. Every ``--sample`` seconds: the server's RSS, open
descriptors, asyncio tasks, queue entries and the Maildir sizes. At the end, for each
series, the least-squares slope per hour over the samples after the first (warm-up), so
a leak shows as a steady positive slope, not as start-up growth. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import poplib
import smtplib
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from mfproc import MailfortServer, bench_tmpdir, open_fds, proc_status, wait_port

HERE = Path(__file__).resolve().parent


class SoakServer(MailfortServer):
    """The bench server, run through soak_server.py so that its task count is visible."""

    def start(self) -> None:
        self.stats = self.root / "tasks"
        with open(self.root / "serve.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "soak_server.py"), str(self.config),
                 str(self.stats)], stdout=subprocess.DEVNULL, stderr=log)
        wait_port(self.ports["mx"])
        wait_port(self.ports["pop3"])

    def tasks(self) -> int:
        try:
            return int(self.stats.read_text())
        except (OSError, ValueError):
            return -1


def mx_message(port: int, n: int) -> None:
    rcpt = "alice@example.test" if n % 2 else "bob@example.test"
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail("soak@elsewhere.test", [rcpt],
                   f"From: soak@elsewhere.test\r\nSubject: mx {n}\r\n\r\nsoak {n}\r\n")


def submission(port: int, n: int, password: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("soak.test")
        s.login("bob@example.test", password)
        s.sendmail("bob@example.test", ["alice@example.test"],
                   f"From: bob@example.test\r\nTo: alice@example.test\r\nSubject: sub {n}\r\n"
                   f"\r\nsoak {n}\r\n")


def pop3_drain(port: int, user: str, password: str) -> int:
    box = poplib.POP3("127.0.0.1", port, timeout=30)
    try:
        box.user(user)
        box.pass_(password)
        count = len(box.list()[1])
        for i in range(1, count + 1):
            box.retr(i)
            box.dele(i)
    finally:
        box.quit()
    return count


def slope_per_hour(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (seconds), per hour."""
    if len(xs) < 2:
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else 3600 * sum((x - mx) * (y - my)
                                           for x, y in zip(xs, ys, strict=True)) / var


async def run(mf: SoakServer, minutes: float, rate: float, sample: float) -> None:
    ports, pw = mf.ports, mf.passwords
    ops: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    rows: list[tuple[float, int, int, int, int, int]] = []
    t0 = time.monotonic()
    next_sample = t0
    n = 0
    while (now := time.monotonic()) - t0 < minutes * 60:
        if now >= next_sample:
            st = proc_status(mf.pid)
            env = mf.data / "queue" / "env"  # one state file per queue entry
            queue = len(list(env.glob("*.json"))) if env.exists() else 0
            boxes = sum(len(list((mf.maildir(u) / "new").glob("*"))) for u in ("alice", "bob")
                        if (mf.maildir(u) / "new").exists())
            rows.append((now - t0, st["VmRSS"], open_fds(mf.pid), mf.tasks(), queue, boxes))
            print(f"# t={(now - t0) / 60:5.1f} min RSS {st['VmRSS'] / 1024:6.1f} MB fds "
                  f"{rows[-1][2]:4d} tasks {rows[-1][3]:4d} queue entries {queue:4d} "
                  f"mail in new/ {boxes:4d} ops {sum(ops.values())} errors "
                  f"{sum(errors.values())}", flush=True)
            next_sample += sample
        n += 1
        try:
            if n % 10 == 0:
                user = "alice@example.test" if n % 20 else "bob@example.test"
                await asyncio.to_thread(pop3_drain, ports["pop3"], user, pw[user])
                ops["pop3"] += 1
            elif n % 2:
                await asyncio.to_thread(mx_message, ports["mx"], n)
                ops["mx"] += 1
            else:
                await asyncio.to_thread(submission, ports["submission"], n,
                                        pw["bob@example.test"])
                ops["submission"] += 1
        except (OSError, smtplib.SMTPException, poplib.error_proto) as exc:
            errors[f"{type(exc).__name__}: {str(exc)[:50]}"] += 1
        await asyncio.sleep(max(0.0, t0 + n / rate - time.monotonic()))
    print(f"# operations {dict(ops)}; errors {dict(errors) or 'none'}")
    steady = rows[1:] if len(rows) > 2 else rows
    xs = [r[0] for r in steady]
    for i, name in ((1, "RSS kB"), (2, "fds"), (3, "tasks"), (4, "queue entries")):
        ys = [float(r[i]) for r in steady]
        print(f"# {name:12s} start {rows[0][i]:>8} end {rows[-1][i]:>8} "
              f"slope after warm-up {slope_per_hour(xs, ys):+.1f}/h")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=5.0, help="operations per second")
    ap.add_argument("--sample", type=float, default=60.0, help="seconds between samples")
    ap.add_argument("--port-base", type=int, default=13900)
    args = ap.parse_args()
    if not 0.5 <= args.minutes <= 24 * 60 or not 0.1 <= args.rate <= 200:
        ap.error("--minutes 0.5..1440, --rate 0.1..200")
    with bench_tmpdir("mailfort-soak-") as tmp:
        mf = SoakServer(Path(tmp), port_base=args.port_base, plaintext_pop3=True,
                        max_connections=5000, max_connections_per_ip=50)
        with mf:
            asyncio.run(run(mf, args.minutes, args.rate, args.sample))
            if mf.proc is not None and mf.proc.poll() is not None:
                print(f"# server died:\n{mf.log_tail()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
