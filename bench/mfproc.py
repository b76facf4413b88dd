"""A throwaway mailfort server for one benchmark, and /proc memory readings of it.

Shaped like ``Mailfort`` in ``run_all.py`` (domain example.test, users alice and bob with the
passwords in ``passwords``, fresh data directory), but on a port base of its own so that it
can run while ``run_all.py`` holds 12525..., and with the config knobs the benchmarks need.
Loopback only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

OFFSETS = {"mx": 25, "submission": 87, "submissions": 65, "pop3": 10, "pop3s": 95,
           "managesieve": 190}
IMAP_OFFSETS = {"imap": 43, "imaps": 93}  # only with imap=True (bench/imap_bench.py)

# Where benchmark data directories go. Not /tmp: on the test machine, creating a file in a
# new directory under /tmp became 60 times slower over a day of test runs (about 900 us
# against 14 us anywhere else on the same filesystem), which alone cut mailfort's MX rate
# by two thirds, while the reference servers write under /var. /var/tmp is like them.
BENCH_DIR = os.environ.get("MAILFORT_BENCH_DIR", "/var/tmp")


def wait_disk_quiet(path: str | Path, quiet: float = 0.5, timeout: float = 60.0) -> float:
    """Flush, then wait until the disk under ``path`` has had no write, discard or request
    in flight for ``quiet`` seconds; returns the seconds waited.

    Both mailfort and the reference servers flush to disk per message, so each must start
    its measurement on an idle disk: deleting files (the previous run's clean-up, Postfix's
    queue files) makes the kernel send discards to the virtual disk (mounted with
    ``discard`` here) for seconds afterwards, and a flush issued meanwhile can queue behind
    them, in whichever server's window it falls.
    """
    os.sync()
    dev = os.stat(path).st_dev
    stat = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    if not stat.exists():
        return 0.0
    start = time.monotonic()
    last: list[str] = []
    still_since = start
    while time.monotonic() - start < timeout:
        f = stat.read_text().split()
        # writes completed, in flight, discards completed (Documentation/block/stat.rst)
        now = [f[4], f[8]] + (f[11:12] if len(f) > 11 else [])
        if now != last or f[8] != "0":
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            break
        time.sleep(0.05)
    return time.monotonic() - start


# On ext4 without a journal (this project's VMs: /sys/fs/ext4/vda/journal_task reads
# "<none>") the kernel will not reuse an inode freed in the last minute, six while its inode
# table block is still dirty, and to create a file it scans past every such inode of the
# block group. A server started within minutes of a benchmark's clean-up (thousands of files
# deleted) creates its files at half speed or less: bench/RESULTS.md, "The slow mode".
FREED_INODE_WINDOW = 360.0  # seconds
_CLEANED = Path(BENCH_DIR) / ".mailfort-bench-cleaned"


@contextlib.contextmanager
def bench_tmpdir(prefix: str) -> Iterator[str]:
    """A fresh directory for one benchmark's data, removed afterwards (the time of the
    removal is noted for ``wait_freed_inodes``).

    A benchmark that starts several servers makes each one a subdirectory of one such
    directory, removed only at the end, never between measurements.
    """
    path = tempfile.mkdtemp(prefix=prefix, dir=BENCH_DIR)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            _CLEANED.write_text(f"{time.time()}\n")


def _without_journal(path: str | Path) -> bool:
    dev = os.stat(path).st_dev
    block = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    try:
        journal = Path(f"/sys/fs/ext4/{block.resolve().name}/journal_task").read_text()
    except OSError:
        return False  # not ext4, or not a block device we can name: nothing to wait for
    return journal.strip() == "<none>"


def wait_freed_inodes() -> float:
    """Before measuring how fast files are created: wait until the inodes that the last
    benchmark's clean-up freed may be reused (see ``FREED_INODE_WINDOW``); returns the
    seconds waited. Nothing to wait for on a file system with a journal, or with
    ``MAILFORT_BENCH_NO_WAIT=1``."""
    if os.environ.get("MAILFORT_BENCH_NO_WAIT") == "1" or not _without_journal(BENCH_DIR):
        return 0.0
    try:
        cleaned = float(_CLEANED.read_text())
    except (OSError, ValueError):
        return 0.0
    left = cleaned + FREED_INODE_WINDOW - time.time()
    if left <= 0:
        return 0.0
    print(f"# waiting {left:.0f} s: a benchmark deleted its data {time.time() - cleaned:.0f} s "
          "ago, and this ext4 has no journal, so files are slow to create for minutes after "
          "many were freed (MAILFORT_BENCH_NO_WAIT=1 skips the wait)", flush=True)
    time.sleep(left)
    return left


def wait_port(port: int, timeout: float = 30.0) -> None:
    """Wait until something accepts on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def port_free(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:port."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def proc_status(pid: int) -> dict[str, int]:
    """The Vm* lines of /proc/<pid>/status, in kB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key.startswith("Vm") and rest.strip().endswith("kB"):
            out[key] = int(rest.split()[0])
    return out


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces):
    index 0 is field 3 (state), 1 is the parent pid, 11..14 are utime, stime, cutime, cstime."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()


def process_tree(root: int) -> list[int]:
    """``root`` and every live process below it (from the parent pids in /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_times(root: int) -> tuple[float, float]:
    """(user, system) CPU seconds used so far by ``root`` and its process tree, all threads.

    Each process counts its own time and that of its children it has already reaped
    (cutime, cstime), so a child that exits during a measurement (a Postfix smtpd after
    its ``max_use`` sessions, a mailfort worker) still counts, once: before, in its own
    entry; after, in its parent's. Immune to a busy machine in a way a rate is not: it is
    what the server spent, however long it waited for a CPU.
    """
    user = system = 0
    for pid in process_tree(root):
        try:
            f = _stat_fields(pid)
        except OSError:  # exited meanwhile: its parent has (or will have) its time
            continue
        user += int(f[11]) + int(f[13])
        system += int(f[12]) + int(f[14])
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def thread_cpu_seconds(pid: int) -> tuple[float, float]:
    """(main thread, every other thread) user + system CPU seconds of one process: for
    mailfort, its event loop against the committer (and executor) threads."""
    main = other = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            f = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        f_ = f[f.rindex(")") + 2:].split()
        ticks = int(f_[11]) + int(f_[12])
        if int(tid) == pid:
            main += ticks
        else:
            other += ticks
    return main / CLOCK_TICKS, other / CLOCK_TICKS


def cpu_seconds(root: int) -> float:
    """User + system CPU seconds of ``root``'s process tree (see ``cpu_times``)."""
    return sum(cpu_times(root))


def open_fds(pid: int) -> int:
    """How many file descriptors the process has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def soft_nofile(pid: int) -> tuple[str, str]:
    """The process's (soft, hard) 'Max open files' from /proc/<pid>/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            parts = line.split()
            return parts[3], parts[4]
    return "?", "?"


class PeakRSS:
    """Peak RSS of a process during a ``with`` block, in kB above its RSS at entry.

    Uses the kernel high-water mark (VmHWM, reset by ``echo 5 > clear_refs``) when it can
    be reset, and in any case samples VmRSS every few ms as a cross-check.
    """

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pid = pid
        self.interval = interval
        self.idle_kb = 0
        self.sampled_peak_kb = 0
        self.hwm_peak_kb: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                rss = proc_status(self.pid)["VmRSS"]
            except (OSError, KeyError):
                return
            self.sampled_peak_kb = max(self.sampled_peak_kb, rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.idle_kb = proc_status(self.pid)["VmRSS"]
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.sampled_peak_kb = self.idle_kb
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        if self.hwm_reset:
            self.hwm_peak_kb = proc_status(self.pid)["VmHWM"]

    @property
    def peak_kb(self) -> int:
        """The best peak figure: the reset high-water mark, else the sampled maximum."""
        return max(self.hwm_peak_kb or 0, self.sampled_peak_kb)

    @property
    def above_idle_kb(self) -> int:
        return self.peak_kb - self.idle_kb

    def describe(self) -> str:
        how = "VmHWM reset via clear_refs" if self.hwm_reset else "VmRSS sampled every 5 ms"
        return (f"idle {self.idle_kb / 1024:.1f} MB, peak {self.peak_kb / 1024:.1f} MB "
                f"({how}; sampled max {self.sampled_peak_kb / 1024:.1f} MB)")


class MailfortServer:
    """``python -m mailfort serve`` from a fresh data directory under ``root``."""

    def __init__(self, root: Path, *, port_base: int = 13500, plaintext_pop3: bool = False,
                 max_connections: int = 20000, max_message_size: int = 60_000_000,
                 max_connections_per_ip: int | None = None, extra_limits: str = "",
                 dns_port: int = 9, sender_auth: bool = False,
                 store_flush: str = "syncfs", source: str | None = None,
                 mail_dir: Path | None = None, workers: int = 1, imap: bool = False,
                 as_shipped: bool = False) -> None:
        """``max_connections_per_ip`` None: the same as ``max_connections``;
        ``extra_limits``: more ``[limits]`` lines (TOML) for the benchmark at hand.
        ``dns_port``: the loopback DNS server the node asks (never the system resolver:
        a benchmark sends nothing off the machine; on the default, a port where nothing
        answers, lookups fail). ``sender_auth``: SPF/DKIM/DMARC at the MX, off by default
        so the MX rows measure what the reference Postfix does (it checks none of them).
        ``store_flush``: ``[store] flush``, "syncfs" (the default) or "fsync".
        ``source``: run mailfort from this ``src`` directory (another checkout) instead
        of the one Python finds, to compare two versions side by side.
        ``mail_dir``: the Maildir root ([server] mail_dir), default ``data/mail``.
        ``workers``: [server] workers. 1 by default, so that the memory rows (which read
        ``pid``) measure the one process that serves; above 1, ``pids`` lists them all.
        ``as_shipped``: the README's defaults, as a user runs ``mailfort serve``: the
        configuration names only where things are (host name, directories, listeners, the
        loopback DNS server on ``dns_port``); every other setting is the shipped one
        (sender authentication on, one worker per CPU, the default connection limits, no
        plaintext login), and the other knobs given here are ignored, but for one: the
        per-user submission quotas (``[submission] messages_per_hour`` and
        ``recipients_per_hour``, 200 and 500 as shipped) are lifted, since the submission
        rows send thousands of messages as one user to measure throughput (the MX rows do
        not meet them)."""
        self.env = dict(os.environ)
        if source is not None:
            self.env["PYTHONPATH"] = source
        self.root = root
        self.data = root / "data"
        self.mail = mail_dir or self.data / "mail"
        self.config = root / "mailfort.toml"
        offsets = OFFSETS | (IMAP_OFFSETS if imap or as_shipped else {})
        self.ports = {k: port_base + v for k, v in offsets.items()}
        busy = [p for p in self.ports.values() if not port_free(p)]
        if busy:
            raise RuntimeError(f"ports already in use: {busy} (pick another --port-base)")
        listen = "\n".join(f'{k} = ["127.0.0.1:{v}"]' for k, v in self.ports.items())
        plain = "true" if plaintext_pop3 else "false"
        if as_shipped:
            self.config.write_text(
                f'[server]\nhostname = "mx.bench.test"\ndata_dir = "{self.data}"\n'
                f'mail_dir = "{self.mail}"\n[listen]\n{listen}\n'
                "[submission]\nmessages_per_hour = 1000000\nrecipients_per_hour = 1000000\n"
                f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns_port}\n')
        else:
            self.config.write_text(
                f'[server]\nhostname = "mx.bench.test"\ndata_dir = "{self.data}"\n'
                f'mail_dir = "{self.mail}"\n'
                f"allow_plaintext_auth_on_loopback = {plain}\nworkers = {workers}\n"
                f"[listen]\n{listen}\n"
                f"[limits]\nmax_message_size = {max_message_size}\n"
                f"max_connections_per_ip = {max_connections_per_ip or max_connections}\n"
                f"max_connections = {max_connections}\n{extra_limits}"
                "[submission]\nmessages_per_hour = 1000000\nrecipients_per_hour = 1000000\n"
                f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns_port}\ntimeout = 2.0\n'
                f"[sender_auth]\nenabled = {'true' if sender_auth else 'false'}\n"
                f'[store]\nflush = "{store_flush}"\n'
            )
        self.cli("domain", "add", "example.test", quiet=imap)
        # The CLI wants >= 8 characters, so not the reference servers' "alicepw".
        self.passwords = {f"{u}@example.test": f"{u}pw-bench" for u in ("alice", "bob")}
        pw = root / "pw"
        for user, password in self.passwords.items():
            pw.write_text(f"{password}\n")
            self.cli("user", "add", user, "--password-file", str(pw))
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, quiet: bool = False) -> None:
        subprocess.run([sys.executable, "-m", "mailfort", *args, "--config", str(self.config)],
                       check=True, stdout=subprocess.DEVNULL, env=self.env,
                       stderr=subprocess.DEVNULL if quiet else None)

    def start(self) -> None:
        with open(self.root / "serve.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mailfort", "serve", "--config", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=log, env=self.env,
            )
        try:
            for name in ("mx", "pop3", "imap"):
                if name in self.ports:
                    wait_port(self.ports[name])
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"mailfort did not start:\n{self.log_tail()}") from None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def pids(self) -> list[int]:
        """The serve process and its children (the workers, when there are several)."""
        return process_tree(self.pid)

    def cpu_seconds(self) -> float:
        """User + system CPU of the serve process and its workers so far."""
        return cpu_seconds(self.pid)

    def maildir(self, user: str) -> Path:
        """The user's Maildir (with new/, cur/, tmp/ below it)."""
        return self.mail / "example.test" / user

    def log_tail(self, lines: int = 20) -> str:
        path = self.root / "serve.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> MailfortServer:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
