"""Where mailfort's CPU goes with rspamd as a milter, and what each side spends per message.

    python bench/milter_profile.py                        # 3 runs of 2,000 MX messages
    python bench/milter_profile.py --baseline /other/src  # and another checkout, alternating
    python bench/milter_profile.py --strace               # + syscalls per message (one run)
    python bench/milter_profile.py --py-spy prof.txt      # + a py-spy profile (one run)

The same set-up as milter_bench.py's mailfort side (one rspamd from the tests'
configuration, rbl off, DNS on the loopback stub; mailfort ``workers = 1`` with one
``[[milter]]``), without Postfix: CPU per message (/proc, user + system, of mailfort's
process and of rspamd's processes) hardly moves with the machine's load, unlike a rate, so
it is the figure to compare two versions by on a shared machine. ``--strace`` counts the
system calls of mailfort's process (``strace -f -c``) over one more run: writes, reads and
connects per message show how many packets and round trips the milter client costs.
Loopback only; everything started here is stopped and removed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from mfproc import (  # noqa: E402  (bench/ is not a package)
    BENCH_DIR,
    MailfortServer,
    bench_tmpdir,
    cpu_seconds,
    wait_disk_quiet,
    wait_freed_inodes,
)
from milter_bench import DNS, Rspamd, load, wait_cpu_idle  # noqa: E402

PORT_BASES = (14700, 14800)


def run(mf: MailfortServer, rspamd: Rspamd, args: argparse.Namespace) -> tuple[float, float,
                                                                                 float]:
    """One measured load: (mailfort µs/msg, rspamd µs/msg, messages/s)."""
    wait_cpu_idle(mf.pid)
    wait_cpu_idle(rspamd.pid)
    wait_disk_quiet(BENCH_DIR, timeout=60)
    mf0, rs0 = cpu_seconds(mf.pid), cpu_seconds(rspamd.pid)
    seconds = load(mf.ports["mx"], args.size, args.sessions, args.messages)
    wait_cpu_idle(mf.pid)
    n = args.messages
    return ((cpu_seconds(mf.pid) - mf0) / n * 1e6, (cpu_seconds(rspamd.pid) - rs0) / n * 1e6,
            n / seconds)


def strace_counts(mf: MailfortServer, args: argparse.Namespace, out: Path) -> dict[str, int]:
    """System calls of mailfort's process tree over one load (strace -f -c)."""
    proc = subprocess.Popen(["strace", "-f", "-c", "-o", str(out), "-p", str(mf.pid)],
                            stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached to every thread
    load(mf.ports["mx"], args.size, args.sessions, args.messages)
    wait_cpu_idle(mf.pid)
    proc.send_signal(signal.SIGINT)
    proc.wait(30)
    counts: dict[str, int] = {}
    for line in out.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and re.fullmatch(r"[\d.]+", fields[0]) and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3])
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--rspamd-workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--baseline", help="another checkout's src directory, measured in turn")
    ap.add_argument("--strace", action="store_true", help="count mailfort's system calls")
    ap.add_argument("--py-spy", dest="pyspy", help="write a py-spy raw profile here")
    ap.add_argument("--reuse", default="always", choices=("always", "continue", "never"),
                    help="[[milter]] reuse of this checkout (not given to --baseline)")
    args = ap.parse_args()
    if os.geteuid() != 0 or shutil.which("rspamd") is None or not shutil.which("smtp-source"):
        print("needs root, rspamd and smtp-source (see milter_bench.py)", file=sys.stderr)
        return 2
    wait_freed_inodes()
    with bench_tmpdir("mailfort-milterprof-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        from tests.dnsserver import DNSServer

        DNS.append(stack.enter_context(DNSServer()))
        rspamd = Rspamd(args.rspamd_workers, DNS[0].port)
        stack.callback(rspamd.cleanup)
        sources = {"this": None, "baseline": args.baseline} if args.baseline else {"this": None}
        servers = {}
        for (name, source), base in zip(sources.items(), PORT_BASES, strict=False):
            (root / name).mkdir()
            mf = MailfortServer(root / name, port_base=base, source=source, imap=True)
            reuse = f'reuse = "{args.reuse}"\n' if source is None else ""
            mf.config.write_text(mf.config.read_text()
                                 + f'\n[[milter]]\naddress = "inet:127.0.0.1:{rspamd.port}"\n'
                                 + reuse)
            mf.start()
            stack.callback(mf.stop)
            load(mf.ports["mx"], args.size, args.sessions, args.messages)  # warm-up
            servers[name] = mf
        results: dict[str, list[tuple[float, float, float]]] = {n: [] for n in servers}
        for i in range(args.runs):
            order = list(servers) if i % 2 == 0 else list(reversed(servers))
            for name in order:
                mf_us, rs_us, rate = run(servers[name], rspamd, args)
                results[name].append((mf_us, rs_us, rate))
                print(f"# run {i + 1} {name}: mailfort {mf_us:.0f} µs/msg, rspamd {rs_us:.0f} "
                      f"µs/msg, {rate:.0f}/s", flush=True)
        for name, rows in results.items():
            print(f"{name}: mailfort {statistics.median(r[0] for r in rows):.0f} µs CPU/msg "
                  f"(range {min(r[0] for r in rows):.0f}–{max(r[0] for r in rows):.0f}), "
                  f"rspamd {statistics.median(r[1] for r in rows):.0f} µs CPU/msg, "
                  f"{statistics.median(r[2] for r in rows):.0f}/s over {args.runs} runs of "
                  f"{args.messages}")
        mf = servers["this"]
        if args.strace:
            counts = strace_counts(mf, args, root / "strace.txt")
            per = {k: v / args.messages for k, v in counts.items()}
            top = sorted(per.items(), key=lambda kv: -kv[1])[:12]
            print("syscalls per message: " + ", ".join(f"{k} {v:.1f}" for k, v in top))
        if args.pyspy:
            spy = subprocess.Popen(["py-spy", "record", "-r", "200", "-f", "raw", "-o",
                                    args.pyspy, "-p", str(mf.pid), "--threads", "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
            load(mf.ports["mx"], args.size, args.sessions, args.messages)
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
            print(f"py-spy profile in {args.pyspy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
