"""CPU time mailfort spends per MX message: user + system CPU of its process (every thread,
every child) from /proc over N messages, divided by N.

    python bench/cpu_per_message.py                      # 1 KB, 50 sessions, 3 x 2,000
    python bench/cpu_per_message.py --reps 5 --messages 4000
    python bench/cpu_per_message.py --profile prof.txt   # and py-spy on one more run
    python bench/profile_phases.py prof.txt --main-us M --other-us O   # per phase

Unlike a rate, CPU time per message hardly moves when other work shares the machine: it
is what the server spent, however long it waited for a CPU or the disk. The load is
Postfix's ``smtp-source -c`` (a connection per message, as in run_all.py's MX rows), or
``bench/smtp_load.py`` where smtp-source is not installed. Loopback only; the data
directory is fresh, under BENCH_DIR, and warmed up (see mfproc.py) before measuring.
The figure is split into the event loop's thread ("main") and the others (the committer's
writes, links and flushes; executor threads), from /proc/<pid>/task.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from mfproc import (  # noqa: E402  (bench/ is not a package)
    MailfortServer,
    bench_tmpdir,
    cpu_times,
    thread_cpu_seconds,
    wait_disk_quiet,
)


def send(port: int, size: int, sessions: int, messages: int) -> float:
    """Send ``messages`` MX messages of ``size`` bytes to 127.0.0.1:port; the wall seconds."""
    start = time.perf_counter()
    if shutil.which("smtp-source"):
        cmd = ["smtp-source", "-c", "-l", str(size), "-m", str(messages), "-s", str(sessions),
               "-f", "bench@example.org", "-t", "alice@example.test", f"127.0.0.1:{port}"]
    else:
        cmd = [sys.executable, str(HERE / "smtp_load.py"), "--port", str(port), "--size",
               str(size), "--sessions", str(sessions), "--messages", str(messages)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(pid: int, port: int, size: int, sessions: int, messages: int,
            data: Path) -> dict[str, float]:
    """CPU microseconds per message (total, system, main thread, other threads) and the
    rate of one run."""
    waited = wait_disk_quiet(data, timeout=5.0)  # CPU time hardly depends on it
    if waited >= 5:
        print("#   the disk did not go quiet within 5 s (other work on the machine)", flush=True)
    (u0, s0), (m0, o0) = cpu_times(pid), thread_cpu_seconds(pid)
    wall = send(port, size, sessions, messages)
    (u1, s1), (m1, o1) = cpu_times(pid), thread_cpu_seconds(pid)
    per = 1e6 / messages
    return {"cpu": (u1 - u0 + s1 - s0) * per, "sys": (s1 - s0) * per,
            "main": (m1 - m0) * per, "other": (o1 - o0) * per, "rate": messages / wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2000)
    ap.add_argument("--port-base", type=int, default=14600)
    ap.add_argument("--profile", metavar="FILE",
                    help="then one more run under py-spy (raw format: collapsed stacks)")
    args = ap.parse_args()
    with bench_tmpdir("mailfort-cpu-") as tmp:
        mf = MailfortServer(Path(tmp), port_base=args.port_base)
        with mf:
            port = mf.ports["mx"]
            if args.warmup:
                send(port, args.size, args.sessions, args.warmup)
            runs = []
            for _ in range(args.reps):
                r = measure(mf.pid, port, args.size, args.sessions, args.messages, mf.data)
                runs.append(r)
                print(f"# run: {r['cpu']:.0f} us CPU/message (system {r['sys']:.0f}; event loop "
                      f"thread {r['main']:.0f}, other threads {r['other']:.0f}), "
                      f"{r['rate']:.0f}/s", flush=True)
            if args.profile:
                spy = subprocess.Popen(
                    ["py-spy", "record", "--pid", str(mf.pid), "--format", "raw",
                     "--rate", "500", "--threads", "--output", args.profile],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.5)
                send(port, args.size, args.sessions, args.messages)
                spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                spy.wait(60)
            stored = sum(1 for _ in (mf.maildir("alice") / "new").iterdir())

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    cpu = [r["cpu"] for r in runs]
    print(f"mailfort MX {args.size} B, {args.sessions} sessions: median {med('cpu'):.0f} us "
          f"CPU/message (range {min(cpu):.0f}-{max(cpu):.0f}, {args.reps} x {args.messages}; "
          f"event loop thread {med('main'):.0f}, other threads {med('other'):.0f}), "
          f"{med('rate'):.0f}/s; stored {stored}")
    if args.profile:
        print(f"per phase: python bench/profile_phases.py {args.profile} "
              f"--main-us {med('main'):.0f} --other-us {med('other'):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
