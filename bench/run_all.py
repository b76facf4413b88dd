"""Run the whole comparison against the reference servers in one go and print the table.

    python bench/run_all.py            # everything (installs/starts the reference servers)
    python bench/run_all.py --quick    # 500 messages per case, POP3 once, 1,000 idle sessions
    python bench/run_all.py --smtp-only    # only the MX and submission rows

Besides its own MX and submission rows it runs ``pop3_bench.py`` (vs Dovecot),
``idle_sessions.py`` and ``big_message.py`` and puts their rows in the same table.

Loopback only. mailfort runs from a fresh data directory under a temporary folder with the
same shape as the reference Postfix: domain example.test, users alice and bob.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from mfproc import BENCH_DIR, MailfortServer, bench_tmpdir, proc_status, wait_disk_quiet  # noqa: E402  (bench/ is not a package)

ANCHORS = HERE.parent.parent / "shared" / "anchors"
PORT_BASE = 12500  # mailfort's listeners: see bench/mfproc.py OFFSETS


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


def smtp_source(port: int, size: int, sessions: int, messages: int) -> float:
    # Both servers flush to disk per message (fsync, syncfs): neither may pay for the other's
    # writes, deletions or discards in its own window.
    waited = wait_disk_quiet(BENCH_DIR)
    if waited > 2:
        print(f"#   waited {waited:.1f} s for the disk to go quiet", flush=True)
    start = time.perf_counter()
    subprocess.run(
        ["smtp-source", "-c", "-l", str(size), "-m", str(messages), "-s", str(sessions),
         "-f", "bench@example.org", "-t", "alice@example.test", f"127.0.0.1:{port}"],
        check=True, stdout=subprocess.DEVNULL,
    )
    return messages / (time.perf_counter() - start)


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
    args = ap.parse_args()
    n = 500 if args.quick else 2000
    if not args.no_reference:
        subprocess.run(["bash", str(ANCHORS / "postfix-reference.sh"), "start"], check=True)
    if shutil.which("smtp-source") is None:
        print("smtp-source not found: run ../shared/anchors/postfix-reference.sh start")
        return 2
    rows: list[tuple[str, str, str, str]] = []
    with bench_tmpdir("mailfort-bench-") as tmp:
        mf = MailfortServer(Path(tmp), port_base=PORT_BASE)
        mf.start()
        try:
            # Warm both up first, unmeasured, so that both are measured in their steady
            # state: Postfix's first burst after a start was seen at half its later rate,
            # and mailfort's first ~4,000 messages into a fresh data directory at ~1,000/s
            # against ~2,200/s after them (old and new code alike; Postfix's queue
            # directories have long been in use).
            for port in ((10025,) if not args.no_reference else ()) + (mf.ports["mx"],):
                smtp_source(port, 1024, 50, 500 if args.quick else 5000)
            if not args.no_reference:
                wait_postfix_idle()
            for size, sessions, target in ((1024, 50, 2.0), (102400, 50, 1.5), (1024, 1, 1.0),
                                           (1024, 10, None)):
                ref = None
                if not args.no_reference:
                    ref = smtp_source(10025, size, sessions, n)
                    wait_postfix_idle()
                before = count_new(mf.maildir("alice") / "new")
                ours = smtp_source(mf.ports["mx"], size, sessions, n)
                stored = count_new(mf.maildir("alice") / "new") - before
                ok = "stored==accepted" if stored == n else f"STORED {stored} != {n}"
                name = f"MX {size // 1024} KB, {sessions} sessions"
                goal = f"≥ {target}×" if target else "—"
                ratio = f" ({ours / ref:.2f}×)" if ref else ""
                rows.append((name, f"Postfix {ref:.0f}/s" if ref else "—",
                             f"{ours:.0f}/s{ratio} {ok}", goal))
            mx_rate = float(rows[0][2].split("/s")[0])
            for label, extra in (("one connection + AUTH per session", ["--keep-session"]),
                                 ("new connection + AUTH per message", [])):
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
            rss = proc_status(mf.pid).get("VmRSS", 0)
            rows.append(("mailfort RSS after the runs", "—", f"{rss / 1024:.0f} MB", ""))
        finally:
            mf.stop()
    if not args.smtp_only:
        pop3 = ["--reps", "1" if args.quick else "5"]
        rows += other_rows("pop3_bench.py", *pop3, *(["--no-reference"] if args.no_reference
                                                      else []))
        rows += other_rows("idle_sessions.py", "--sessions", "1000" if args.quick else "10000")
        rows += other_rows("big_message.py")
    print(f"machine: {platform.node()} {os.cpu_count()} cores, {platform.python_version()}")
    print("| measure | reference | mailfort | target |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
