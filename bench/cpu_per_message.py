"""CPU time mailfort spends per MX message: user + system CPU of its process (every thread,
every child) from /proc over N messages, divided by N.

    python bench/cpu_per_message.py                      # 1 KB, 50 sessions, 3 x 2,000
    python bench/cpu_per_message.py --reps 5 --messages 4000
    python bench/cpu_per_message.py --profile prof.txt   # and py-spy on one more run
    python bench/profile_phases.py prof.txt --main-us M --other-us O   # per phase
    python bench/cpu_per_message.py --baseline /path/to/other/src  # two versions, alternating
    python bench/cpu_per_message.py --as-shipped         # the README's defaults (see below)
    python bench/cpu_per_message.py --syscalls           # and system calls per message

Unlike a rate, CPU time per message hardly moves when other work shares the machine: it
is what the server spent, however long it waited for a CPU or the disk. The load is
Postfix's ``smtp-source -c`` (a connection per message, as in run_all.py's MX rows), or
``bench/smtp_load.py`` where smtp-source is not installed. Loopback only; the data
directory is fresh, under BENCH_DIR, and warmed up (see mfproc.py) before measuring.
The figure is split into the event loop's thread ("main") and the others (the committer's
writes, links and flushes; executor threads), from /proc/<pid>/task. The kernel's share
(system time: socket sends, file creation) does grow when other work loads the machine,
so compare two versions with ``--baseline``: both servers run at once and are measured
in turn, run by run, in the same conditions.

``--as-shipped``: ``mailfort serve`` as a user gets it (one worker per CPU, SPF, DKIM and
DMARC on), its resolver on the tests' loopback DNS server where the load's sender domain
publishes SPF and DMARC, as run_all.py's ``--default-config`` row; "main" is then the
event loop threads of the supervisor and every worker, "other" their other threads.

``--syscalls``: one more run of each server with ``perf stat`` counting the system calls
of its processes (kernel tracepoints: nothing slows down), printed per message.
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
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from mfproc import (  # noqa: E402  (bench/ is not a package)
    MailfortServer,
    bench_tmpdir,
    cpu_times,
    process_tree,
    thread_cpu_seconds,
    wait_disk_quiet,
    wait_freed_inodes,
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
    (u0, s0), (m0, o0) = cpu_times(pid), tree_thread_cpu_seconds(pid)
    wall = send(port, size, sessions, messages)
    wait_cpu_idle(pid)  # the workers' last batches and log lines count too
    (u1, s1), (m1, o1) = cpu_times(pid), tree_thread_cpu_seconds(pid)
    per = 1e6 / messages
    return {"cpu": (u1 - u0 + s1 - s0) * per, "sys": (s1 - s0) * per,
            "main": (m1 - m0) * per, "other": (o1 - o0) * per, "rate": messages / wall}


def tree_thread_cpu_seconds(root: int) -> tuple[float, float]:
    """``thread_cpu_seconds`` summed over ``root`` and its workers (a worker that exits
    meanwhile is missing from the split, not from ``cpu_times``)."""
    main = other = 0.0
    for pid in process_tree(root):
        try:
            m, o = thread_cpu_seconds(pid)
        except OSError:
            continue
        main += m
        other += o
    return main, other


def wait_cpu_idle(pid: int, timeout: float = 10.0) -> None:
    """Until the server's process tree used no CPU for 0.2 s (or ``timeout``)."""
    end = time.monotonic() + timeout
    last = sum(cpu_times(pid))
    while time.monotonic() < end:
        time.sleep(0.2)
        now = sum(cpu_times(pid))
        if now == last:
            return
        last = now


SYSCALLS = ("write", "sendto", "recvfrom", "read", "futex", "openat", "close", "linkat",
            "unlink", "unlinkat", "syncfs", "fdatasync", "flock", "epoll_wait", "epoll_ctl",
            "accept4", "getpid", "newfstatat", "lseek", "getsockname", "setsockopt")


def count_syscalls(pid: int, run: Callable[[], object]) -> dict[str, int]:
    """How many of each of ``SYSCALLS`` the server's processes made during ``run()``."""
    out = Path("/dev/shm") / f"perf-{os.getpid()}.txt"
    events = ",".join(f"syscalls:sys_enter_{c}" for c in SYSCALLS)
    perf = subprocess.Popen(["perf", "stat", "-x,", "-o", str(out), "-e", events, "-p",
                             ",".join(str(p) for p in process_tree(pid))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    run()
    wait_cpu_idle(pid)
    perf.send_signal(signal.SIGINT)
    perf.wait(30)
    counts = {c: 0 for c in SYSCALLS}
    for line in out.read_text().splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[2].startswith("syscalls:sys_enter_"):
            with contextlib.suppress(ValueError):
                counts[parts[2].removeprefix("syscalls:sys_enter_")] += int(parts[0])
    out.unlink()
    return counts


def summary(label: str, runs: list[dict[str, float]]) -> str:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    cpu = [r["cpu"] for r in runs]
    return (f"{label}: median {med('cpu'):.0f} us CPU/message (range {min(cpu):.0f}-"
            f"{max(cpu):.0f} over {len(runs)} runs; event loop thread {med('main'):.0f}, "
            f"other threads {med('other'):.0f}; system {med('sys'):.0f}), {med('rate'):.0f}/s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2000)
    ap.add_argument("--port-base", type=int, default=14600)
    ap.add_argument("--flush", choices=("syncfs", "fsync"), default="syncfs",
                    help="[store] flush of the server under test")
    ap.add_argument("--baseline", metavar="SRC",
                    help="also run mailfort from this src directory (e.g. an export of main), "
                         "alternating with this one run by run, and print both")
    ap.add_argument("--as-shipped", action="store_true",
                    help="the README's defaults (workers per CPU, sender authentication on)")
    ap.add_argument("--sender-auth-off", action="store_true",
                    help="with --as-shipped: sender authentication off (what the checks cost)")
    ap.add_argument("--syscalls", action="store_true",
                    help="then one more run counting system calls per message (perf stat)")
    ap.add_argument("--profile", metavar="FILE",
                    help="then one more run under py-spy (raw format: collapsed stacks)")
    args = ap.parse_args()
    label = (f"mailfort MX {args.size} B, {args.sessions} sessions, "
             + ("as shipped" if args.as_shipped else args.flush)
             + (", sender authentication off" if args.sender_auth_off else ""))
    wait_freed_inodes()  # mfproc.FREED_INODE_WINDOW
    with bench_tmpdir("mailfort-cpu-") as tmp, contextlib.ExitStack() as stack:
        for sub in ("this", "baseline"):
            (Path(tmp) / sub).mkdir()
        shipped: dict[str, object] = {}
        if args.as_shipped:
            sys.path.insert(0, str(HERE.parent))
            from tests.dnsserver import DNSServer
            dns = stack.enter_context(DNSServer())
            dns.add_txt("example.org", "v=spf1 ip4:127.0.0.1 -all")
            dns.add_txt("_dmarc.example.org", "v=DMARC1; p=none")
            shipped = {"as_shipped": True, "dns_port": dns.port}
        servers = {"this": MailfortServer(Path(tmp) / "this", port_base=args.port_base,
                                          store_flush=args.flush, **shipped)}
        if args.baseline:
            servers["baseline"] = MailfortServer(
                Path(tmp) / "baseline", port_base=args.port_base + 100,
                store_flush=args.flush, source=str(Path(args.baseline).resolve()), **shipped)
        for mf in servers.values():
            if args.sender_auth_off:
                with mf.config.open("a") as f:
                    f.write("[sender_auth]\nenabled = false\n")
            mf.start()
        try:
            for mf in servers.values():
                if args.warmup:
                    send(mf.ports["mx"], args.size, args.sessions, args.warmup)
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
            order = list(servers)
            for rep in range(args.reps):
                for name in order if rep % 2 == 0 else order[::-1]:
                    mf = servers[name]
                    r = measure(mf.pid, mf.ports["mx"], args.size, args.sessions,
                                args.messages, mf.data)
                    runs[name].append(r)
                    print(f"# {name}: {r['cpu']:.0f} us CPU/message (system {r['sys']:.0f}; "
                          f"event loop thread {r['main']:.0f}, other threads "
                          f"{r['other']:.0f}), {r['rate']:.0f}/s", flush=True)
            for name, mf in servers.items() if args.syscalls else ():
                counts = count_syscalls(mf.pid, lambda mf=mf: send(
                    mf.ports["mx"], args.size, args.sessions, args.messages))
                print(f"# {name}: system calls per message: " + ", ".join(
                    f"{call} {n / args.messages:.2f}" for call, n in counts.items() if n))
            for name, mf in servers.items() if args.profile else ():
                spy = subprocess.Popen(
                    ["py-spy", "record", "--pid", str(mf.pid), "--subprocesses", "--format", "raw",
                     "--rate", "500", "--threads", "--output", profile_file(args.profile, name)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.5)
                send(mf.ports["mx"], args.size, args.sessions, args.messages)
                spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                spy.wait(60)
            stored = {name: sum(1 for _ in (m.maildir("alice") / "new").iterdir())
                      for name, m in servers.items()}
        finally:
            for m in servers.values():
                m.stop()
    for name in servers:
        print(summary(f"{label} [{name}]" if args.baseline else label, runs[name])
              + f"; stored {stored[name]}")
    for name in servers if args.profile else ():
        print(f"per phase [{name}]: python bench/profile_phases.py "
              f"{profile_file(args.profile, name)} --main-us "
              f"{statistics.median(r['main'] for r in runs[name]):.0f} --other-us "
              f"{statistics.median(r['other'] for r in runs[name]):.0f}")
    return 0


def profile_file(path: str, name: str) -> str:
    """Where the profile of one server goes: ``path`` itself for this tree."""
    return path if name == "this" else f"{path}.{name}"


if __name__ == "__main__":
    sys.exit(main())
