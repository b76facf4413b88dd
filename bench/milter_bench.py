"""MX 1 KB / 50 sessions with rspamd as a milter: mailfort against Postfix (issue 30).

    python bench/milter_bench.py                 # 3 alternating pairs of 2,000 messages
    python bench/milter_bench.py --pairs 5 --messages 2000 --rspamd-workers 2

One rspamd, started here from Debian's package with the tests' configuration
(tests/rspamdserver.py: the package's rules, a proxy worker in milter mode that scans itself,
no network maps), serves both servers, with two changes. Its DNS is the tests' loopback DNS
server (tests/dnsserver.py, in this process: NXDOMAIN to every name at once) instead of a
closed port, and its ``rbl`` module (RBL, DBL, SURBL, URIBL: lookups in DNS lists on the
network) is off: with it on, rspamd spent 3 to 5 s on each of Postfix's messages (6 lookups
that "timed out" without reaching the loopback stub) and none on mailfort's, so the row
measured a lookup timeout, not the servers. With one rspamd for both, the filter work per
message is the same by construction, and its CPU is read from /proc over each server's own
window (the servers are measured one at a time). Its proxy runs ``--rspamd-workers``
processes (default: one per CPU, as Debian's normal worker).

mailfort: ``bench/mfproc.MailfortServer`` with ``workers = 0`` (one per CPU: the shipped
default, mailfort as an administrator runs it; ``--workers 1`` for one process) with ``[[milter]]
address = "inet:127.0.0.1:PORT"`` and ``reuse = "always"`` (the README's rspamd set-up: its
connections are kept between messages), the defaults otherwise (on_error = "tempfail").

Postfix: not the shared reference itself (../shared is not to be changed) but a second
instance built here from its settings: a copy of its main.cf and master.cf in a temporary
``config_directory``, with its own queue_directory, data_directory, Maildir base and log,
started with ``postfix -c DIR``, and two smtpd listeners, one with ``smtpd_milters =
inet:127.0.0.1:PORT`` (``milter_protocol = 6``, ``milter_default_action = tempfail``), one
with ``-o smtpd_milters=`` (the "no milter" context row, the same instance otherwise).

Each row is measured in ``--pairs`` alternating pairs (Postfix first in even pairs), each
measurement on idle servers and a quiet disk, after an unmeasured warm-up. A measurement
counts the messages stored (new files in the recipient's Maildir, after Postfix's queue is
empty), the CPU of the server's process tree up to the end of its deliveries, rspamd's
process tree, and the whole machine (/proc/stat). rspamd's share is its CPU over the window
against all cores; rspamd bounds a row when its processes are saturated, or when the machine
is and rspamd takes the largest part.

Loopback only; every wait is bounded; every process and directory made here is removed.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from mfproc import (  # noqa: E402  (bench/ is not a package)
    BENCH_DIR,
    MailfortServer,
    bench_tmpdir,
    cpu_seconds,
    port_free,
    wait_disk_quiet,
    wait_freed_inodes,
    wait_port,
)

NCPU = os.cpu_count() or 1
LOAD_TIMEOUT = 600.0  # seconds for one load run
MF_MILTER_BASE, MF_PLAIN_BASE = 14500, 14600  # mailfort's port bases (mfproc.OFFSETS)
PF_MILTER_PORT, PF_PLAIN_PORT = 14825, 14826  # the bench Postfix's two smtpd listeners
# rspamd modules off here: DNS lists (rbl: RBL, DBL, SURBL, URIBL) are network lookups (see
# the module's docstring: they made a 3 to 5 s timeout per Postfix message).
DISABLED_MODULES = ("rbl",)
DNS: list[Any] = []  # the loopback DNS stub rspamd asks (tests/dnsserver.DNSServer), once started
ANCHORS = next((p for p in (HERE.parent.parent / "shared" / "anchors",
                            HERE.parent.parent.parent / "shared" / "anchors") if p.exists()),
               HERE.parent.parent / "shared" / "anchors")


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs so far (/proc/stat; idle and iowait are not busy)."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(f[:8])  # guest time is already in user
    return total - f[3] - f[4], total


def load(port: int, size: int, sessions: int, messages: int) -> float:
    """smtp-source (each message its own connection, as run_all.py) to 127.0.0.1:port;
    the seconds it took."""
    cmd = ["smtp-source", "-c", "-l", str(size), "-m", str(messages), "-s", str(sessions),
           "-f", "bench@example.org", "-t", "alice@example.test", f"127.0.0.1:{port}"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=LOAD_TIMEOUT)
    return time.perf_counter() - start


def count_new(path: Path) -> int:
    return sum(1 for _ in path.iterdir()) if path.exists() else 0


def wait_cpu_idle(pid: int, quiet: float = 0.5, timeout: float = 60.0) -> None:
    """Until the process tree of ``pid`` has used no CPU for ``quiet`` s (a tick of slack)."""
    start = time.monotonic()
    last, since = cpu_seconds(pid), start
    while time.monotonic() - start < timeout:
        time.sleep(0.1)
        now = cpu_seconds(pid)
        if now - last > 0.011:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


class Rspamd:
    """tests/rspamdserver.RspamdServer (the tests' configuration) with ``workers`` proxy
    processes."""

    def __init__(self, workers: int, dns_port: int) -> None:
        from tests.rspamdserver import RspamdServer  # imports pytest (for its skip)

        try:
            self.server = RspamdServer()
        except BaseException as exc:  # pytest's Skipped is a BaseException
            raise SystemExit(f"rspamd: {exc}") from None
        conf = self.server.dir / "rspamd.conf"
        text = conf.read_text().replace("count = 1;", f"count = {workers};")
        conf.write_text(text.replace('"127.0.0.1:9"', f'"127.0.0.1:{dns_port}"'))
        for module in DISABLED_MODULES:
            (self.server.dir / "local.d" / f"{module}.conf").write_text("enabled = false;\n")
        self.server.start()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def pid(self) -> int:
        assert self.server.proc is not None
        return self.server.proc.pid

    def cleanup(self) -> None:
        self.server.cleanup()


class BenchPostfix:
    """A second Postfix instance from the reference's main.cf and master.cf, in ``root``."""

    def __init__(self, root: Path, rspamd_port: int) -> None:
        self.root = root
        self.conf = root / "pf-etc"
        self.queue = root / "pf-queue"
        self.mail = root / "pf-mail"
        ref = subprocess.run(["postconf", "-h", "config_directory"], capture_output=True,
                             text=True, check=True).stdout.strip()
        ref_queue = subprocess.run(["postconf", "-h", "queue_directory"], capture_output=True,
                                   text=True, check=True).stdout.strip()
        self.conf.mkdir()
        shutil.copy(Path(ref, "main.cf"), self.conf / "main.cf")
        # the reference's smtpd on 10025 out, two of ours in (milter, and none)
        lines = [ln for ln in Path(ref, "master.cf").read_text().splitlines()
                 if not ln.startswith("127.0.0.1:")]
        lines.append(f"127.0.0.1:{PF_MILTER_PORT} inet n - n - - smtpd")
        lines.append(f"127.0.0.1:{PF_PLAIN_PORT} inet n - n - - smtpd -o smtpd_milters=")
        (self.conf / "master.cf").write_text("\n".join(lines) + "\n")
        # the chroot (cleanup, qmgr... run chrooted in the queue directory, as the
        # reference's): the same files Debian's configure-instance.sh put in the reference's
        self.queue.mkdir()
        for sub in ("etc", "lib", "usr"):  # not dev: device nodes (TLS is off)
            if Path(ref_queue, sub).is_dir():
                shutil.copytree(Path(ref_queue, sub), self.queue / sub, symlinks=True)
        (root / "pf-data").mkdir()
        shutil.chown(root / "pf-data", "postfix", "postfix")
        (self.mail / "example.test").mkdir(parents=True)
        for path in (self.mail, self.mail / "example.test"):
            os.chown(path, 5000, 5000)  # vmail, as the reference's virtual_uid_maps
        self.postconf(
            f"queue_directory = {self.queue}", f"data_directory = {root / 'pf-data'}",
            f"virtual_mailbox_base = {self.mail}", f"maillog_file = {root / 'pf.log'}",
            "syslog_name = postfix-milterbench",
            f"smtpd_milters = inet:127.0.0.1:{rspamd_port}", "non_smtpd_milters =",
            "milter_protocol = 6", "milter_default_action = tempfail")
        subprocess.run(["postfix", "-c", str(self.conf), "check"], check=True)

    def postconf(self, *settings: str) -> None:
        subprocess.run(["postconf", "-c", str(self.conf), "-e", *settings], check=True)

    def start(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "start"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in (PF_MILTER_PORT, PF_PLAIN_PORT):
            wait_port(port)

    def pid(self) -> int | None:
        try:
            pid = int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if Path(f"/proc/{pid}").exists() else None

    def settle(self, timeout: float = 120.0) -> None:
        """Until its queue is empty: Postfix delivers what it accepted after the 250."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["postqueue", "-c", str(self.conf), "-p"],
                                 capture_output=True, text=True, timeout=30).stdout
            if "Mail queue is empty" in out:
                return
            time.sleep(0.2)
        print("# Postfix's queue not empty after 120 s", flush=True)

    def maildir_new(self) -> Path:
        return self.mail / "example.test" / "alice" / "new"

    def stop(self) -> None:
        pid = self.pid()
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)
        deadline = time.monotonic() + 20
        while pid is not None and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid is not None and Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@dataclass
class Side:
    """One server on one listener: how to load it, whose CPU it is, where it stores."""

    name: str
    port: int
    pid: Callable[[], int | None]
    maildir_new: Path
    settle: Callable[[], None] | None = None  # work after the 250s (Postfix's deliveries)
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    rspamd_us: list[float] = field(default_factory=list)
    rspamd_share: list[float] = field(default_factory=list)
    server_share: list[float] = field(default_factory=list)
    machine_share: list[float] = field(default_factory=list)
    dns_us: list[float] = field(default_factory=list)  # the DNS stub (this process)
    dns_queries: list[float] = field(default_factory=list)
    stored_ok: bool = True

    def after(self) -> None:
        if self.settle is not None:
            self.settle()

    def idle(self, rspamd: Rspamd | None) -> None:
        self.after()
        pid = self.pid()
        if pid is not None:
            wait_cpu_idle(pid)
        if rspamd is not None:
            wait_cpu_idle(rspamd.pid)

    def measure(self, rspamd: Rspamd | None, size: int, sessions: int, n: int) -> str:
        pid = self.pid()
        queries0, me0 = len(DNS[0].queries) if DNS else 0, os.times()
        stored0 = count_new(self.maildir_new)
        cpu0 = cpu_seconds(pid) if pid else 0.0
        rs0 = cpu_seconds(rspamd.pid) if rspamd else 0.0
        busy0, total0 = machine_busy()
        t0 = time.monotonic()
        seconds = load(self.port, size, sessions, n)
        self.after()
        window = time.monotonic() - t0
        busy1, total1 = machine_busy()
        cpu = cpu_seconds(pid) - cpu0 if pid else 0.0
        rs = cpu_seconds(rspamd.pid) - rs0 if rspamd else 0.0
        me1 = os.times()
        self.dns_us.append((me1.user + me1.system - me0.user - me0.system) / n * 1e6)
        self.dns_queries.append(((len(DNS[0].queries) if DNS else 0) - queries0) / n)
        stored = count_new(self.maildir_new) - stored0
        self.stored_ok = self.stored_ok and stored == n
        self.rates.append(n / seconds)
        self.cpu_us.append(cpu / n * 1e6)
        self.server_share.append(cpu / (window * NCPU))
        self.machine_share.append((busy1 - busy0) / max(1, total1 - total0))
        if rspamd is not None:
            self.rspamd_us.append(rs / n * 1e6)
            self.rspamd_share.append(rs / (window * NCPU))
        rsp = (f", rspamd {rs / n * 1e6:.0f} µs/msg ({self.rspamd_share[-1]:.0%} of "
               f"{NCPU} cores), DNS {self.dns_queries[-1]:.1f} queries/msg "
               f"(stub {self.dns_us[-1]:.0f} µs/msg)" if rspamd else "")
        return (f"{self.name} {self.rates[-1]:.0f}/s stored {stored}/{n}, "
                f"{self.cpu_us[-1]:.0f} µs CPU/msg ({self.server_share[-1]:.0%}){rsp}, "
                f"machine {self.machine_share[-1]:.0%} busy")


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def row(label: str, ours: Side, ref: Side, rspamd: Rspamd | None, pairs: int,
        size: int, sessions: int, n: int, workers: int) -> list[str]:
    """``pairs`` alternating measurements of ``ref`` and ``ours``; the summary lines."""
    for pair in range(pairs):
        line = []
        for side in (ref, ours) if pair % 2 == 0 else (ours, ref):
            for s in (ref, ours):
                s.idle(rspamd)
            wait_disk_quiet(BENCH_DIR, timeout=60)
            line.append(side.measure(rspamd, size, sessions, n))
        print(f"# {label}, pair {pair + 1}: " + "; ".join(line)
              + f" ({ours.rates[-1] / ref.rates[-1]:.2f}×)", flush=True)
    ratios = sorted(o / r for o, r in zip(ours.rates, ref.rates, strict=True))
    out = [f"{label}: mailfort {med(ours.rates):.0f}/s (range {min(ours.rates):.0f}–"
           f"{max(ours.rates):.0f}), Postfix {med(ref.rates):.0f}/s (range "
           f"{min(ref.rates):.0f}–{max(ref.rates):.0f}); mailfort/Postfix median "
           f"{med(ratios):.2f}×, range {ratios[0]:.2f}–{ratios[-1]:.2f}× over {pairs} pairs; "
           + ("stored==sent in both" if ours.stored_ok and ref.stored_ok
              else f"**STORED != SENT** (mailfort ok={ours.stored_ok}, "
                   f"Postfix ok={ref.stored_ok})")]
    for s in (ours, ref):
        text = (f"  {s.name}: {med(s.cpu_us):.0f} µs CPU/msg, {med(s.server_share):.0%} of "
                f"{NCPU} cores; machine {med(s.machine_share):.0%} busy")
        if rspamd is not None:
            rs_cores = med(s.rspamd_share) * NCPU
            ceiling = NCPU / (med(s.rspamd_us) / 1e6) if med(s.rspamd_us) > 0 else 0.0
            saturated = rs_cores >= 0.85 * min(workers, NCPU)
            largest = med(s.rspamd_share) >= med(s.server_share)
            bound = saturated or (med(s.machine_share) >= 0.9 and largest)
            text += (f"; DNS {med(s.dns_queries):.1f} queries/msg (stub in this process "
                     f"{med(s.dns_us):.0f} µs CPU/msg)"
                     f"; rspamd {med(s.rspamd_us):.0f} µs CPU/msg, {med(s.rspamd_share):.0%} "
                     f"of {NCPU} cores ({rs_cores:.2f} of its {workers} workers' "
                     f"{min(workers, NCPU)} cores), rspamd alone would allow "
                     f"{ceiling:.0f}/s; rspamd "
                     + ("IS the bottleneck" if bound else "is not the bottleneck")
                     + (" (its processes saturated)" if saturated
                        else " (machine saturated, rspamd the largest user)" if bound else ""))
        out.append(text)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--messages", type=int, default=2000, help="per measurement")
    ap.add_argument("--warmup", type=int, default=2000, help="per server, unmeasured")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--rspamd-workers", type=int, default=NCPU)
    ap.add_argument("--workers", type=int, default=0,
                    help="mailfort's [server] workers (default 0: one per CPU, as shipped)")
    ap.add_argument("--no-plain", action="store_true", help="skip the no-milter pair")
    args = ap.parse_args()
    if not 1 <= args.pairs <= 20 or not 1 <= args.messages <= 100_000:
        ap.error("--pairs 1..20, --messages 1..100000")
    if os.geteuid() != 0:
        print("needs root (a Postfix instance, rspamd as _rspamd)", file=sys.stderr)
        return 2
    if shutil.which("rspamd") is None:
        print("rspamd not installed (apt-get install rspamd)", file=sys.stderr)
        return 2
    if shutil.which("smtp-source") is None or not Path("/etc/postfix/vmailbox").exists():
        subprocess.run(["bash", str(ANCHORS / "postfix-reference.sh"), "start"], check=True)
    busy = [p for p in (PF_MILTER_PORT, PF_PLAIN_PORT) if not port_free(p)]
    if busy:
        print(f"ports in use: {busy}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on a kill too
    load_start = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    print(f"# start {started}, load average {load_start[0]:.2f} {load_start[1]:.2f} "
          f"{load_start[2]:.2f}", flush=True)
    wait_freed_inodes()
    lines: list[str] = []
    with bench_tmpdir("mailfort-milterbench-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        os.chmod(root, 0o755)  # Postfix's users (postfix, vmail) work below it
        from tests.dnsserver import DNSServer

        DNS.append(stack.enter_context(DNSServer()))
        rspamd = Rspamd(args.rspamd_workers, DNS[0].port)
        stack.callback(rspamd.cleanup)
        (root / "mf-milter").mkdir()
        mf = MailfortServer(root / "mf-milter", port_base=MF_MILTER_BASE, workers=args.workers,
                            imap=True)  # its own IMAP ports: two servers side by side
        mf.config.write_text(mf.config.read_text()
                             + f'\n[[milter]]\naddress = "inet:127.0.0.1:{rspamd.port}"\n'
                             + 'reuse = "always"\n')  # as the README's rspamd set-up
        mf.start()
        stack.callback(mf.stop)
        plain = None
        if not args.no_plain:
            (root / "mf-plain").mkdir()
            plain = MailfortServer(root / "mf-plain", port_base=MF_PLAIN_BASE,
                                   workers=args.workers, imap=True)
            plain.start()
            stack.callback(plain.stop)
        pf = BenchPostfix(root, rspamd.port)
        pf.start()
        stack.callback(pf.stop)
        ours = Side("mailfort+rspamd", mf.ports["mx"], lambda: mf.pid,
                    mf.maildir("alice") / "new")
        ref = Side("Postfix+rspamd", PF_MILTER_PORT, pf.pid, pf.maildir_new(), pf.settle)
        sides = [ours, ref]
        if plain is not None:
            sides += [Side("mailfort", plain.ports["mx"], lambda: plain.pid,
                           plain.maildir("alice") / "new"),
                      Side("Postfix", PF_PLAIN_PORT, pf.pid, pf.maildir_new(), pf.settle)]
        for i, side in enumerate(sides):  # warm-up, unmeasured (rspamd's first scans too)
            side.idle(rspamd)
            wait_disk_quiet(BENCH_DIR, timeout=60)
            load(side.port, args.size, args.sessions, args.warmup)
            side.after()
            if i == 1:  # a spot check that rspamd saw them (both Postfix sides share a Maildir)
                for s in (ours, ref):
                    first = next(iter(s.maildir_new.iterdir()), None)
                    seen = first is not None and b"X-Spamd-Result" in first.read_bytes()[:8192]
                    print(f"# {s.name}: rspamd's X-Spamd-Result in a stored message: {seen}",
                          flush=True)
        label = f"MX {args.size // 1024} KB, {args.sessions} sessions"
        lines += row(f"{label}, rspamd milter", ours, ref, rspamd, args.pairs, args.size,
                     args.sessions, args.messages, args.rspamd_workers)
        if plain is not None:
            lines += row(f"{label}, no milter", sides[2], sides[3], None, args.pairs,
                         args.size, args.sessions, args.messages, args.rspamd_workers)
    load_end = os.getloadavg()
    version = subprocess.run(["rspamd", "--version"], capture_output=True,
                             text=True).stdout.strip().splitlines()
    pfv = subprocess.run(["postconf", "-h", "mail_version"], capture_output=True,
                         text=True).stdout.strip()
    print(f"machine: {NCPU} cores; {version[0] if version else 'rspamd ?'}; Postfix {pfv}; "
          f"rspamd proxy workers {args.rspamd_workers}, one rspamd for both servers; "
          f"mailfort workers {args.workers}; {args.messages} messages per measurement")
    print(f"load average at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, "
          f"at end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    for line in lines:
        print(line)
    ratios = [o / r for o, r in zip(ours.rates, ref.rates, strict=True)]
    need = 1.5
    print(f"target mailfort+rspamd ≥ {need}× Postfix+rspamd (median): "
          + ("met" if med(ratios) >= need else "NOT met") + f" ({med(ratios):.2f}×)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
