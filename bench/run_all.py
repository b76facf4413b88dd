"""Run the whole comparison against the reference servers in one go and print the table.

    python bench/run_all.py            # everything (installs/starts the reference servers)
    python bench/run_all.py --quick    # 500 messages per case, POP3 once, 1,000 idle sessions
    python bench/run_all.py --smtp-only    # only the MX and submission rows
    python bench/run_all.py --quick --smtp-only --no-reference --pairs 2   # a dry run
    python bench/run_all.py --default-config --smtp-only --rows 1024x50   # as shipped

``--default-config`` runs ``mailfort serve`` as a user gets it (the README's defaults: SPF,
DKIM and DMARC on, one worker per CPU, the default connection limits; ``--workers`` is
ignored), with its resolver on the tests' loopback DNS server (tests/dnsserver.py), where
the load's sender domain example.org publishes SPF (``ip4:127.0.0.1 -all``) and DMARC
(``p=none``): the checks do their DNS work and pass, as for a real sender.

Each MX row is measured in ``--pairs`` (default 5) pairs, the two servers alternating
(Postfix first in even pairs, mailfort first in odd ones), after an unmeasured warm-up of
both, and each measurement starts only once both servers are idle: Postfix's queue empty,
neither server using CPU, the disk quiet. A row reports the median rates, the median
mailfort/Postfix ratio over the pairs and its range (worst and best pair), and the CPU
time each server spent per message, from /proc: mailfort's process tree, and Postfix's
master with every child (smtpd, cleanup, qmgr, virtual...) up to the end of its
deliveries, since mailfort's figure includes its own. The targets are judged on the
median and, where the issue sets one, on the worst pair.

Besides its own MX and submission rows it runs ``senderauth_bench.py`` (DKIM-signed mail
from a domain with SPF, DKIM and DMARC records, mailfort as shipped against Postfix with
policyd-spf, opendkim and opendmarc, and against bare Postfix; skipped with
``--no-reference``, or when ``--rows`` does not name ``senderauth``), ``pop3_bench.py`` (vs
Dovecot), ``idle_sessions.py`` and ``big_message.py`` and puts their rows in the same table.

Loopback only. mailfort runs from a fresh data directory under a temporary folder with the
same shape as the reference Postfix: domain example.test, users alice and bob.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from mfproc import (  # noqa: E402  (bench/ is not a package)
    BENCH_DIR,
    MailfortServer,
    bench_tmpdir,
    cpu_seconds,
    proc_status,
    wait_disk_quiet,
    wait_freed_inodes,
)

# ../shared/anchors beside the checkout (main), or one level up (a worktree under wt/)
ANCHORS = next((p for p in (HERE.parent.parent / "shared" / "anchors",
                            HERE.parent.parent.parent / "shared" / "anchors") if p.exists()),
               HERE.parent.parent / "shared" / "anchors")
PORT_BASE = 12500  # mailfort's listeners: see bench/mfproc.py OFFSETS
# (size, sessions, (median target, worst-pair target) or None) of the MX rows
MX_ROWS = ((1024, 50, (2.0, 1.6)), (102400, 50, (1.5, None)), (1024, 1, (1.2, None)),
           (1024, 10, None))


def count_new(path: Path) -> int:
    return sum(1 for _ in path.iterdir()) if path.exists() else 0


def wait_postfix_idle(timeout: float = 120) -> None:
    """Postfix delivers what it accepted after the fact; let it finish before the next
    measurement, or its Maildir writes and fsyncs land in mailfort's time window."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["postqueue", "-p"], capture_output=True, text=True).stdout
        if "Mail queue is empty" in out:
            return
        time.sleep(0.2)


def postfix_master() -> int | None:
    """The pid of the running Postfix master (its process tree is Postfix), or None."""
    queue = subprocess.run(["postconf", "-h", "queue_directory"], capture_output=True,
                           text=True).stdout.strip() or "/var/spool/postfix"
    try:
        pid = int(Path(queue, "pid", "master.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def wait_cpu_idle(pid: int, quiet: float = 0.5, timeout: float = 60.0) -> float:
    """Wait until the process tree of ``pid`` has used no CPU for ``quiet`` seconds (one
    clock tick of slack); returns the seconds waited."""
    start = time.monotonic()
    last, since = cpu_seconds(pid), start
    while time.monotonic() - start < timeout:
        time.sleep(0.1)
        now = cpu_seconds(pid)
        if now - last > 0.011:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return time.monotonic() - start


def load(port: int, size: int, sessions: int, messages: int) -> float:
    """Send the messages (a connection each) to 127.0.0.1:port; the seconds it took.
    Postfix's smtp-source when installed, else bench/smtp_load.py with its parameters."""
    if shutil.which("smtp-source"):
        cmd = ["smtp-source", "-c", "-l", str(size), "-m", str(messages), "-s", str(sessions),
               "-f", "bench@example.org", "-t", "alice@example.test", f"127.0.0.1:{port}"]
    else:
        cmd = [sys.executable, str(HERE / "smtp_load.py"), "--port", str(port), "--size",
               str(size), "--sessions", str(sessions), "--messages", str(messages)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _no_after_work() -> None:
    """mailfort has nothing left to do once the load has its 250s (they mean stored)."""


@dataclass
class Server:
    """One side of the comparison: how to load it, whose CPU it is, how to wait for it."""

    name: str
    port: int
    pid: Callable[[], int | None]
    settle: Callable[[], None] = _no_after_work  # work the server does after its 250s
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)

    def idle(self) -> None:
        self.settle()
        pid = self.pid()
        if pid is not None and wait_cpu_idle(pid) > 5:
            print(f"#   waited for {self.name} to stop using CPU", flush=True)

    def measure(self, size: int, sessions: int, messages: int) -> float:
        """One measurement; its rate (messages/s). The CPU counts up to the end of the
        server's own after-work (Postfix's deliveries), not just the load's window."""
        pid = self.pid()
        before = cpu_seconds(pid) if pid is not None else 0.0
        seconds = load(self.port, size, sessions, messages)
        self.settle()
        if pid is not None:
            self.cpu_us.append((cpu_seconds(pid) - before) / messages * 1e6)
        self.rates.append(messages / seconds)
        return self.rates[-1]


IDLE_TIMEOUT = [60.0]  # seconds to wait for the disk to go quiet (--idle-timeout)


def both_idle(servers: list[Server]) -> None:
    """Before each measurement: neither server at work, and the disk quiet (both servers
    flush to disk per message; neither may pay for the other's writes or discards)."""
    for server in servers:
        server.idle()
    waited = wait_disk_quiet(BENCH_DIR, timeout=IDLE_TIMEOUT[0])
    if waited > 2:
        print(f"#   waited {waited:.1f} s for the disk to go quiet", flush=True)


def median_cpu(server: Server) -> str:
    return f"{statistics.median(server.cpu_us):.0f} µs CPU/msg" if server.cpu_us else "CPU ?"


def mx_row(servers: list[Server], ours: Server, ref: Server | None, mf: MailfortServer,
           size: int, sessions: int, target: tuple[float, float | None] | None,
           pairs: int, n: int) -> tuple[str, str, str, str]:
    """One MX row: ``pairs`` alternating measurements of each server."""
    for server in servers:
        server.rates.clear()
        server.cpu_us.clear()
    name = f"MX {size // 1024} KB, {sessions} sessions"
    stored_ok = True
    for pair in range(pairs):
        for server in servers if pair % 2 == 0 else servers[::-1]:
            both_idle(servers)
            before = count_new(mf.maildir("alice") / "new")
            server.measure(size, sessions, n)
            if server is ours:
                stored_ok = stored_ok and count_new(mf.maildir("alice") / "new") - before == n
        line = ", ".join(f"{s.name} {s.rates[-1]:.0f}/s {s.cpu_us[-1]:.0f} µs CPU/msg"
                         for s in servers if s.cpu_us)
        ratio = f" ({ours.rates[-1] / ref.rates[-1]:.2f}×)" if ref else ""
        print(f"# {name}, pair {pair + 1}: {line}{ratio}", flush=True)
    ok = "stored==accepted" if stored_ok else "**STORED != ACCEPTED**"
    rate = f"{statistics.median(ours.rates):.0f}/s"
    if ref is None:
        goal = f"median ≥ {target[0]}× (no reference run)" if target else "—"
        return name, "—", f"{rate}, {median_cpu(ours)}, {ok}", goal
    ratios = sorted(o / r for o, r in zip(ours.rates, ref.rates, strict=True))
    med, worst, best = statistics.median(ratios), ratios[0], ratios[-1]
    mine = (f"{rate} (median {med:.2f}×, range {worst:.2f}–{best:.2f}× over {len(ratios)} "
            f"pairs), {median_cpu(ours)}, {ok}")
    reference = f"Postfix {statistics.median(ref.rates):.0f}/s, {median_cpu(ref)}"
    goal = "—"
    if target is not None:
        need, floor = target
        met = med >= need and (floor is None or worst >= floor)
        goal = (f"median ≥ {need}×" + (f", worst ≥ {floor}×" if floor else "")
                + (" met" if met else " **not met**"))
    return name, reference, mine, goal


def other_rows(script: str, *args: str) -> list[tuple[str, str, str, str]]:
    """Run another benchmark of this folder; its table rows as (measure, reference,
    mailfort, target). Its progress lines are passed through."""
    proc = subprocess.run([sys.executable, str(HERE / script), *args],
                          capture_output=True, text=True, timeout=1800)
    rows: list[tuple[str, str, str, str]] = []
    header: list[str] = []
    for line in proc.stdout.splitlines():
        if not line.startswith("| "):
            if line.startswith("#"):
                print(line, flush=True)
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if cells[0] == "measure":
            header = cells
        elif header and len(cells) == len(header):
            row = dict(zip(header, cells, strict=True))
            target = " ".join(filter(None, (row.get("target", ""), row.get("verdict", ""))))
            rows.append((row["measure"], row.get("reference", "—"), row["mailfort"], target))
    if proc.returncode != 0 or not rows:
        rows.append((f"{script} {' '.join(args)}", "—", f"FAILED (exit {proc.returncode})",
                     proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--smtp-only", action="store_true", help="skip POP3, idle and 50 MB rows")
    ap.add_argument("--pairs", type=int, default=5,
                    help="alternating measurements of each server per MX row (default 5)")
    ap.add_argument("--workers", type=int, default=1,
                    help="mailfort's [server] workers for the MX and submission rows "
                         "(default 1; 0: one per CPU, the server's own default)")
    ap.add_argument("--default-config", action="store_true",
                    help="mailfort as shipped: sender authentication on, README defaults")
    ap.add_argument("--source", default=None, metavar="SRC",
                    help="run mailfort from this src directory (another checkout: before/after)")
    ap.add_argument("--rows", default="",
                    help="only these MX rows, SIZExSESSIONS comma-separated (e.g. 1024x50), "
                         "and 'senderauth' for the sender-authentication rows")
    ap.add_argument("--idle-timeout", type=float, default=60.0,
                    help="longest wait for a quiet disk before a measurement (seconds)")
    args = ap.parse_args()
    IDLE_TIMEOUT[0] = args.idle_timeout
    n = 500 if args.quick else 2000
    if not args.no_reference:
        subprocess.run(["bash", str(ANCHORS / "postfix-reference.sh"), "start"], check=True)
        if shutil.which("smtp-source") is None:
            print("smtp-source not found: run ../shared/anchors/postfix-reference.sh start")
            return 2
    rows: list[tuple[str, str, str, str]] = []
    wait_freed_inodes()  # mfproc.FREED_INODE_WINDOW
    names = [r for r in args.rows.split(",") if r]
    wanted = {tuple(int(x) for x in r.split("x")) for r in names if r != "senderauth"}
    mx_rows = [r for r in MX_ROWS if not names or (r[0], r[1]) in wanted]
    with bench_tmpdir("mailfort-bench-") as tmp, contextlib.ExitStack() as stack:
        if args.default_config:
            sys.path.insert(0, str(HERE.parent))
            from tests.dnsserver import DNSServer
            dns = stack.enter_context(DNSServer())
            dns.add_txt("example.org", "v=spf1 ip4:127.0.0.1 -all")
            dns.add_txt("_dmarc.example.org", "v=DMARC1; p=none")
            mf = MailfortServer(Path(tmp), port_base=PORT_BASE, dns_port=dns.port,
                                as_shipped=True, source=args.source)
        else:
            mf = MailfortServer(Path(tmp), port_base=PORT_BASE, workers=args.workers,
                                source=args.source)
        mf.start()
        try:
            ours = Server("mailfort", mf.ports["mx"], lambda: mf.pid)
            ref = None
            if not args.no_reference:
                ref = Server("Postfix", 10025, postfix_master, settle=wait_postfix_idle)
                if postfix_master() is None:
                    print("# Postfix master pid not found: its CPU per message is not shown")
            servers = [s for s in (ref, ours) if s is not None]
            # Warm both up first, unmeasured, so that both are measured in their steady
            # state: Postfix's first burst after a start was seen at half its later rate,
            # and mailfort's first ~4,000 messages into a fresh data directory at ~1,000/s
            # against ~2,200/s after them (old and new code alike; Postfix's queue
            # directories have long been in use).
            for server in servers:
                both_idle(servers)
                load(server.port, 1024, 50, 500 if args.quick else 5000)
            for size, sessions, target in mx_rows:
                rows.append(mx_row(servers, ours, ref, mf, size, sessions, target,
                                   args.pairs, n))
            rates = [float(r[2].split("/s")[0]) for r in rows]
            mx_rate = rates[0] if rates else 1.0
            submission = () if args.rows else (
                ("one connection + AUTH per session", ["--keep-session"]),
                ("new connection + AUTH per message", []))
            for label, extra in submission:
                out = subprocess.run(
                    [sys.executable, str(HERE / "smtp_load.py"), "--port",
                     str(mf.ports["submission"]), "--starttls", "--user", "alice@example.test",
                     "--password", mf.passwords["alice@example.test"],
                     "--sender", "alice@example.test",
                     "--rcpt", "bob@example.test", "--sessions", "50", "--messages", str(n),
                     *extra],
                    capture_output=True, text=True,
                ).stdout.strip()
                rate = float(out.split("rate=")[1].split("/s")[0]) if "rate=" in out else 0.0
                rows.append((f"submission STARTTLS+AUTH 1 KB, 50 sessions, {label}", "—",
                             f"{rate:.0f}/s ({rate / mx_rate:.2f}× MX) [{out}]", "≥ 0.5× MX"))
            rss = sum(proc_status(pid).get("VmRSS", 0) for pid in mf.pids)
            rows.append((f"mailfort RSS after the runs ({len(mf.pids)} processes)", "—",
                         f"{rss / 1024:.0f} MB", ""))
        finally:
            mf.stop()
    if not args.no_reference and (not names or "senderauth" in names):
        rows += other_rows("senderauth_bench.py", "--pairs", str(args.pairs),
                           "--messages", str(n), "--warmup", str(n),
                           *(["--source", args.source] if args.source else []))
    if not args.smtp_only:
        pop3 = ["--reps", "1" if args.quick else "5"]
        rows += other_rows("pop3_bench.py", *pop3, *(["--no-reference"] if args.no_reference
                                                      else []))
        rows += other_rows("idle_sessions.py", "--sessions", "1000" if args.quick else "10000")
        rows += other_rows("big_message.py")
    shipped = "as shipped (one per CPU), sender authentication on"
    print(f"machine: {platform.node()} {os.cpu_count()} cores, {platform.python_version()}; "
          f"mailfort workers = {shipped if args.default_config else args.workers}")
    print("| measure | reference | mailfort | target |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
