"""Does the one-session MX row slow down as mail piles up? Batch after batch, one server.

    python bench/one_session_trend.py [--batches 6] [--messages 3000] [--prefill 0]
                                      [--source SRC] [--steps] [--syscalls]

Starts ``mailfort serve`` as shipped (bench/mfproc.py ``as_shipped``, the sender's SPF and
DMARC on the loopback DNS server, as ``run_all.py --default-config``) and sends ``--batches``
consecutive batches of ``--messages`` 1 KB messages, one connection per message, one at a
time (smtp-source ``-s 1`` as run_all.py's one-session row, or with ``--steps``
bench/session_steps.py's client, which also times each step). Per batch it prints the rate,
the server's CPU per message (user and system), the messages in alice's ``new/``, and with
``--steps`` the median time of each step; with ``--syscalls`` the system calls per message
of each batch (perf stat). A rate moves with the machine's other load; CPU per message,
per-step medians and counts of calls are what to compare between batches.
``--prefill N`` first puts N messages into ``new/`` (plain files, not through SMTP) to tell
a growing Maildir from a growing server; ``--preload`` first sends run_all.py's earlier rows.
``--base SRC`` runs a second server from another source tree, the two alternating batch by
batch; ``--free N`` has N files created and deleted beside them before each batch (what
another process's clean-up does to file creation on ext4 without a journal); ``--postfix``
sends each batch to the reference Postfix first, as run_all.py alternates; ``--trace``
and ``--perf`` show where each batch's time went (perf trace / perf record).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from cpu_per_message import count_syscalls, wait_cpu_idle  # noqa: E402
from mfproc import MailfortServer, bench_tmpdir, cpu_times, proc_status  # noqa: E402
from session_steps import CLOSE, STEPS, one  # noqa: E402

from tests.dnsserver import DNSServer  # noqa: E402


def batch(mf: MailfortServer, n: int, steps: dict[str, list[float]] | None) -> float:
    """Send ``n`` messages one connection at a time; the seconds it took."""
    t0 = time.perf_counter()
    if steps is not None:
        for _ in range(n):
            one(mf.ports["mx"], "alice@example.test", steps)
    elif shutil.which("smtp-source"):
        subprocess.run(["smtp-source", "-c", "-l", "1024", "-m", str(n), "-s", "1",
                        "-f", "bench@example.org", "-t", "alice@example.test",
                        f"127.0.0.1:{mf.ports['mx']}"], check=True, stdout=subprocess.DEVNULL)
    else:
        for _ in range(n):
            one(mf.ports["mx"], "alice@example.test", {s: [] for s in STEPS})
    return time.perf_counter() - t0


TRACED = "syncfs,fsync,fdatasync,openat,link,linkat,unlink,unlinkat,rename,ftruncate,write,flock"


def _trace_totals(text: str) -> dict[str, tuple[int, float]]:
    """Summed over threads: syscall -> (calls, total ms), from ``perf trace -s``."""
    totals: dict[str, tuple[int, float]] = {}
    for row in text.splitlines():
        f = row.split()
        if len(f) >= 5 and f[0].isidentifier() and f[1].isdigit():
            c, ms = totals.get(f[0], (0, 0.0))
            totals[f[0]] = (c + int(f[1]), ms + float(f[3]))
    return totals


def prefill(new: Path, n: int) -> None:
    body = b"From: <x@example.org>\r\n\r\n" + b"x" * 1000 + b"\r\n"
    for i in range(n):
        (new / f"{1700000000 + i}.P1Q{i}.prefill,S={len(body)}").write_bytes(body)


def churn(where: Path, rate: float, stop: threading.Event) -> None:
    """Create and delete ``rate`` small files a second under ``where`` until ``stop``: what
    other processes on the same file system do (Postfix's queue files, other tests)."""
    where.mkdir(exist_ok=True)
    i = 0
    while not stop.wait(1.0 / rate):
        p = where / f"c{i}"
        p.write_bytes(b"x")
        p.unlink()
        i += 1


def measure(mf: MailfortServer, args: argparse.Namespace, tag: str) -> str:
    """One batch to ``mf``; its line."""
    wait_cpu_idle(mf.pid)
    steps = {s: [] for s in (*STEPS, CLOSE)} if args.steps else None
    u0, s0 = cpu_times(mf.pid)
    counts: dict[str, int] = {}
    out = Path("/dev/shm") / f"trend-{os.getpid()}"
    perf = None
    if args.syscalls:
        secs = 0.0

        def go() -> None:
            nonlocal secs
            secs = batch(mf, args.messages, steps)
        counts = count_syscalls(mf.pid, go)
    else:
        if args.trace or args.perf:
            cmd = (["perf", "trace", "-s", "-o", str(out), "-e", TRACED] if args.trace else
                   ["perf", "record", "-q", "-e", "cpu-clock", "-o", str(out)])
            perf = subprocess.Popen([*cmd, "-p", ",".join(str(p) for p in mf.pids)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        secs = batch(mf, args.messages, steps)
        if perf is not None:
            perf.send_signal(signal.SIGINT)
            perf.wait(30)
    u1, s1 = cpu_times(mf.pid)
    n = args.messages
    new = mf.maildir("alice") / "new"
    line = (f"{tag}: {n / secs:6.0f}/s  CPU {(u1 - u0 + s1 - s0) / n * 1e6:5.0f} "
            f"µs/msg (user {(u1 - u0) / n * 1e6:4.0f}, sys {(s1 - s0) / n * 1e6:4.0f})"
            f"  new/ {len(os.listdir(new))}  RSS "
            + "+".join(f"{proc_status(p).get('VmRSS', 0) // 1024}" for p in mf.pids) + " MB")
    if steps is not None:
        line += "\n  steps µs: " + ", ".join(
            f"{k} {statistics.median(v) * 1e6:.0f}" for k, v in steps.items())
    if counts:
        line += "\n  calls/msg " + ", ".join(f"{c} {k / n:.2f}" for c, k in counts.items() if k)
    if args.trace:
        totals = _trace_totals(out.read_text())
        line += "\n  syscalls µs/msg (calls/msg): " + ", ".join(
            f"{k} {ms * 1e3 / n:.0f} ({c / n:.2f})"
            for k, (c, ms) in sorted(totals.items(), key=lambda kv: -kv[1][1]))
    if args.perf:
        rep = subprocess.run(["perf", "report", "-i", str(out), "--no-children", "--sort",
                              "sym", "--stdio", "-q"], capture_output=True, text=True).stdout
        line += "\n  " + "\n  ".join(r.strip() for r in rep.splitlines()[:12])
    out.unlink(missing_ok=True)
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--prefill", type=int, default=0)
    ap.add_argument("--preload", default="",
                    help="first send these loads through SMTP, as run_all.py's earlier rows "
                         "do: SIZExSESSIONSxMESSAGES comma-separated, e.g. "
                         "1024x50x5000,1024x50x6000,102400x50x6000")
    ap.add_argument("--source", default=None, help="run mailfort from this src directory")
    ap.add_argument("--base", default=None,
                    help="a second src directory: its server alternates with this one")
    ap.add_argument("--churn", type=float, default=0.0,
                    help="meanwhile create and delete this many files a second beside the "
                         "servers' data (other processes' deletions on the file system)")
    ap.add_argument("--free", type=int, default=0,
                    help="before each batch, create and delete this many files beside the "
                         "servers' data (another benchmark's clean-up, a test suite's)")
    ap.add_argument("--port-base", type=int, default=13900)
    ap.add_argument("--steps", action="store_true", help="time each step (Python client)")
    ap.add_argument("--syscalls", action="store_true", help="count system calls per batch")
    ap.add_argument("--trace", action="store_true",
                    help="perf trace each batch: time spent in the file system calls")
    ap.add_argument("--postfix", action="store_true",
                    help="before each batch, the same batch to the reference Postfix on "
                         "127.0.0.1:10025 and a wait for its queue, as run_all.py alternates")
    ap.add_argument("--perf", action="store_true",
                    help="perf record each batch; print its top kernel and user symbols")
    args = ap.parse_args()
    with bench_tmpdir("mailfort-trend-") as tmp, contextlib.ExitStack() as stack:
        dns = stack.enter_context(DNSServer())
        dns.add_txt("example.org", "v=spf1 ip4:127.0.0.1 -all")
        dns.add_txt("_dmarc.example.org", "v=DMARC1; p=none")
        sources = {"this": args.source or str(HERE.parent / "src")}
        if args.base:
            sources["base"] = args.base
        servers = {}
        for i, (name, src) in enumerate(sources.items()):
            (Path(tmp) / name).mkdir()
            mf = MailfortServer(Path(tmp) / name, port_base=args.port_base + 100 * i,
                                dns_port=dns.port, as_shipped=True, source=src)
            mf.start()
            stack.callback(mf.stop)
            servers[name] = mf
            batch(mf, 20, None)  # warm up: imports, the SPF cache, the Maildir exists
            for load in filter(None, args.preload.split(",")):
                size, sessions, count = load.split("x")
                t0 = time.perf_counter()
                subprocess.run(["smtp-source", "-c", "-l", size, "-m", count, "-s", sessions,
                                "-f", "bench@example.org", "-t", "alice@example.test",
                                f"127.0.0.1:{mf.ports['mx']}"], check=True,
                               stdout=subprocess.DEVNULL)
                print(f"# {name} preload {load}: "
                      f"{int(count) / (time.perf_counter() - t0):.0f}/s", flush=True)
            if args.prefill:
                prefill(mf.maildir("alice") / "new", args.prefill)
        if args.churn:
            stop = threading.Event()
            t = threading.Thread(target=churn, args=(Path(tmp) / "churn", args.churn, stop),
                                 daemon=True)
            t.start()
            stack.callback(t.join)
            stack.callback(stop.set)
        print(f"# {args.batches} batches of {args.messages}: "
              + ", ".join(f"{k} {v}" for k, v in sources.items()), flush=True)
        for b in range(args.batches):
            if args.postfix:
                t0 = time.perf_counter()
                subprocess.run(["smtp-source", "-c", "-l", "1024", "-m", str(args.messages),
                                "-s", "1", "-f", "bench@example.org", "-t",
                                "alice@example.test", "127.0.0.1:10025"], check=True,
                               stdout=subprocess.DEVNULL)
                pf = args.messages / (time.perf_counter() - t0)
                while "Mail queue is empty" not in subprocess.run(
                        ["postqueue", "-p"], capture_output=True, text=True).stdout:
                    time.sleep(0.2)
                print(f"  Postfix {pf:.0f}/s", flush=True)
            order = list(servers) if b % 2 == 0 else list(servers)[::-1]
            for name in order:
                if args.free:
                    freed = Path(tmp) / "freed"
                    freed.mkdir(exist_ok=True)
                    for i in range(args.free):
                        (freed / f"f{i}").write_bytes(b"x")
                    shutil.rmtree(freed)
                    time.sleep(1.1)  # the kernel skips an inode freed before this second
                print(measure(servers[name], args, f"batch {b} {name:4s}"), flush=True)


if __name__ == "__main__":
    main()
