"""Run the whole comparison against the reference servers in one go and print the table.

    python bench/run_all.py            # everything (installs/starts the reference servers)
    python bench/run_all.py --quick    # 500 messages per case instead of 2000

Loopback only. mailfort runs from a fresh data directory under a temporary folder with the
same shape as the reference Postfix: domain example.test, users alice and bob.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ANCHORS = HERE.parent.parent / "shared" / "anchors"
PORTS = {"mx": 12525, "submission": 12587, "submissions": 12465, "pop3": 12110, "pop3s": 12995}


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def count_new(path: Path) -> int:
    return sum(1 for _ in path.iterdir()) if path.exists() else 0


class Mailfort:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.config = root / "mailfort.toml"
        listen = "\n".join(f'{k} = ["127.0.0.1:{v}"]' for k, v in PORTS.items())
        self.config.write_text(
            f'[server]\nhostname = "mx.bench.test"\ndata_dir = "{self.data}"\n'
            f"[listen]\n{listen}\n[limits]\nmax_message_size = 60000000\n"
            "max_connections_per_ip = 20000\nmax_connections = 20000\n"
            "[submission]\nmessages_per_hour = 1000000\n"
        )
        self.cli("domain", "add", "example.test")
        pw = root / "pw"
        for user in ("alice", "bob"):
            pw.write_text(f"{user}pw-bench\n")
            self.cli("user", "add", f"{user}@example.test", "--password-file", str(pw))
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "mailfort", *args, "--config", str(self.config)],
                       check=True, stdout=subprocess.DEVNULL)

    def start(self) -> None:
        with open(self.root / "serve.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mailfort", "serve", "--config", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=log,
            )
        wait_port(PORTS["mx"])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

    def maildir(self, user: str) -> Path:
        return self.data / "mail" / "example.test" / user / "new"

    def rss_kb(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0


def wait_postfix_idle(timeout: float = 120) -> None:
    """Postfix delivers what it accepted after the fact; let it finish before the next
    measurement, or its Maildir writes and fsyncs land in mailfort's time window."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["postqueue", "-p"], capture_output=True, text=True).stdout
        if "Mail queue is empty" in out:
            return
        time.sleep(0.2)


def smtp_source(port: int, size: int, sessions: int, messages: int) -> float:
    start = time.perf_counter()
    subprocess.run(
        ["smtp-source", "-c", "-l", str(size), "-m", str(messages), "-s", str(sessions),
         "-f", "bench@example.org", "-t", "alice@example.test", f"127.0.0.1:{port}"],
        check=True, stdout=subprocess.DEVNULL,
    )
    return messages / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()
    n = 500 if args.quick else 2000
    if not args.no_reference:
        subprocess.run(["bash", str(ANCHORS / "postfix-reference.sh"), "start"], check=True)
    if shutil.which("smtp-source") is None:
        print("smtp-source not found: run ../shared/anchors/postfix-reference.sh start")
        return 2
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="mailfort-bench-") as tmp:
        mf = Mailfort(Path(tmp))
        mf.start()
        try:
            for size, sessions, target in ((1024, 50, 2.0), (102400, 50, 1.5), (1024, 1, 1.0),
                                           (1024, 10, None)):
                ref = smtp_source(10025, size, sessions, n)
                wait_postfix_idle()
                before = count_new(mf.maildir("alice"))
                ours = smtp_source(PORTS["mx"], size, sessions, n)
                stored = count_new(mf.maildir("alice")) - before
                ok = "stored==accepted" if stored == n else f"STORED {stored} != {n}"
                name = f"MX {size // 1024} KB, {sessions} sessions"
                goal = f"≥ {target}×" if target else "—"
                rows.append((name, f"{ref:.0f}/s", f"{ours:.0f}/s ({ours / ref:.2f}×) {ok}", goal))
            mx_rate = float(rows[0][2].split("/s")[0])
            for label, extra in (("one connection + AUTH per session", ["--keep-session"]),
                                 ("new connection + AUTH per message", [])):
                out = subprocess.run(
                    [sys.executable, str(HERE / "smtp_load.py"), "--port",
                     str(PORTS["submission"]), "--starttls", "--user", "alice@example.test",
                     "--password", "alicepw-bench", "--sender", "alice@example.test",
                     "--rcpt", "bob@example.test", "--sessions", "50", "--messages", str(n),
                     *extra],
                    capture_output=True, text=True,
                ).stdout.strip()
                rate = float(out.split("rate=")[1].split("/s")[0]) if "rate=" in out else 0.0
                rows.append((f"submission STARTTLS+AUTH 1 KB, 50 sessions, {label}", "—",
                             f"{rate:.0f}/s ({rate / mx_rate:.2f}× MX) [{out}]", "≥ 0.5× MX"))
            rows.append(("mailfort RSS after the runs", "—", f"{mf.rss_kb() / 1024:.0f} MB", ""))
        finally:
            mf.stop()
    print(f"machine: {platform.node()} {os.cpu_count()} cores, {platform.python_version()}")
    print("| measure | Postfix | mailfort | target |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
