"""POP3 retrieval: mailfort against the reference Dovecot on an identical Maildir.

    python bench/pop3_bench.py                 # 2,000 x 1 KB, median of 3, then 50 MB RETR
    python bench/pop3_bench.py --messages 500 --reps 1 --big-mb 0

Both servers get the same files (same names, same bytes, LF line endings as Postfix
writes them) in alice's Maildir: mailfort's fresh data directory, and
/var/mail/vhosts/example.test/alice/ (owned by vmail, uid 5000) for Dovecot on
127.0.0.1:11110 (``../shared/anchors/dovecot-reference.sh start``). Both are cleared
first, Dovecot's index files included. One poplib client does, per session: login
(USER/PASS in plaintext on loopback: mailfort runs with
``server.allow_plaintext_auth_on_loopback = true``, like the Dovecot reference), STAT,
RETR of every message, QUIT. Each repetition refills both Maildirs, then runs a "cold"
session (messages in new/, no index) and a "warm" one (already in cur/) on each server.

``--pin`` puts the client on CPU 0 and every thread of both servers on CPU 1, as if they
were on two machines: otherwise the kernel sometimes runs client and server on one CPU
(a cheap hand-over, seen after an idle second) and sometimes on two (a cross-CPU wake-up
per reply, seen when sessions follow each other), which moves both servers' figures by up
to 40% between runs.

Then a 50 MB message is put in mailfort's bob Maildir and retrieved with RETR while the
server's peak RSS is measured (VmHWM after ``clear_refs``), target < 10 MB above idle.
Loopback only; every loop is bounded in count.
"""

from __future__ import annotations

import argparse
import base64
import os
import poplib
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mfproc import MailfortServer, PeakRSS, bench_tmpdir, wait_port

HERE = Path(__file__).resolve().parent
# ../shared/anchors beside the checkout (main), or one level up (a worktree under wt/)
ANCHORS = next((p for p in (HERE.parent.parent / "shared" / "anchors",
                            HERE.parent.parent.parent / "shared" / "anchors") if p.exists()),
               HERE.parent.parent / "shared" / "anchors")
DOVECOT_PORT = 11110
DOVECOT_ROOT = Path("/var/mail/vhosts/example.test")
VMAIL_UID = VMAIL_GID = 5000


def message(i: int, size: int) -> bytes:
    """A message of exactly ``size`` bytes (LF endings), with a dot-stuffing line."""
    head = (
        f"Return-Path: <bench@example.org>\nFrom: bench@example.org\n"
        f"To: alice@example.test\nSubject: pop3 bench {i}\n"
        f"Date: Thu, 27 Nov 2025 12:00:00 +0000\nMessage-ID: <pop3-{i}@bench.test>\n\n"
        ".leading dot line\n"
    ).encode()
    line = b"x" * 71 + b"\n"
    body = bytearray(head)
    while len(body) + len(line) <= size:
        body += line
    pad = size - len(body)
    if pad:
        body += b"y" * (pad - 1) + b"\n" if pad > 1 else b"\n"
    return bytes(body)


def clear_maildir(path: Path) -> None:
    """Empty new/, cur/, tmp/ and drop Dovecot's index files (the Maildir stays)."""
    for sub in ("new", "cur", "tmp"):
        d = path / sub
        for _ in range(10):  # a server may still be renaming new/ -> cur/ (Dovecot after
            try:             # QUIT, mailfort's flagger): a file gone meanwhile is no error
                shutil.rmtree(d)
            except FileNotFoundError:
                continue
            break
    if path.exists():
        for f in path.iterdir():
            if f.name.startswith("dovecot") and f.is_file():
                f.unlink()


def fill_maildir(path: Path, count: int, size: int, owner: tuple[int, int] | None) -> None:
    """``count`` messages of ``size`` bytes into new/, with the same names every time."""
    clear_maildir(path)
    for sub in ("new", "cur", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    base = 1764244800
    for i in range(count):
        data = message(i, size)
        wire = len(data) + data.count(b"\n") - data.count(b"\r\n")
        # Maildir++ sizes in the name (S= file, W= wire), as mailfort's and Postfix's
        # deliveries to Dovecot write them; both servers read the same names.
        f = path / "new" / f"{base + i}.M{i:06d}P4242.bench.test,S={len(data)},W={wire}"
        f.write_bytes(data)
        if owner:
            os.chown(f, *owner)
    if owner:
        for d in (path, path / "new", path / "cur", path / "tmp"):
            os.chown(d, *owner)


# cold: fresh messages in new/; warm: right after the cold session (back to back);
# settled: the same, SETTLE seconds later, once each server's end-of-session work is done.
PHASES = {
    "cold": "messages in new/, no index",
    "warm": "in cur/, right after the previous session",
    "settled": "in cur/, 1 s after the previous session",
}
SETTLE = 1.0
TARGET = 1.1  # issue 29: mailfort/Dovecot in each state, login included


@dataclass
class Session:
    rate: float  # messages per second over the whole session
    seconds: float
    login_s: float
    count: int
    octets: int
    client_cpu: float  # client CPU seconds / wall seconds


def pop3_session(port: int, user: str, password: str, expect: int) -> Session:
    """login, STAT, RETR 1..n, QUIT with poplib; returns the timings."""
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    pop = poplib.POP3("127.0.0.1", port, timeout=60)
    pop.user(user)
    pop.pass_(password)
    t_login = time.perf_counter() - t0
    count, octets = pop.stat()
    if count != expect:
        pop.quit()
        raise RuntimeError(f"127.0.0.1:{port} STAT says {count} messages, {expect} expected "
                           "(is something else delivering to this mailbox?)")
    for n in range(1, count + 1):
        pop.retr(n)
    pop.quit()
    wall = time.perf_counter() - t0
    return Session(count / wall, wall, t_login, count, octets,
                   (time.process_time() - cpu0) / wall)


def retr_raw(pop: poplib.POP3, n: int) -> int:
    """RETR n, reading the reply in big chunks (no per-line client work); octets read."""
    pop._putcmd(f"RETR {n}")  # poplib has no streaming RETR
    first = pop.file.readline()
    if not first.startswith(b"+OK"):
        raise RuntimeError(f"RETR {n}: {first!r}")
    total, tail = 0, b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        chunk = pop.file.read1(1 << 20)
        if not chunk:
            raise RuntimeError("connection closed during RETR")
        total += len(chunk)
        tail = (tail + chunk)[-5:]
        if tail == b"\r\n.\r\n":
            return total
    raise RuntimeError("RETR did not finish in 300 s")


def big_retr(mf: MailfortServer, megabytes: int) -> str:
    """Peak server RSS while one ``megabytes`` MB message is retrieved."""
    path = mf.maildir("bob")
    clear_maildir(path)
    for sub in ("new", "cur", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    head = (b"From: bench@example.org\nTo: bob@example.test\nSubject: big\n"
            b"Message-ID: <big@bench.test>\n\n")
    raw = os.urandom(megabytes * 1024 * 1024 * 3 // 4)
    body = base64.encodebytes(raw)  # 76-character lines, LF
    msg = path / "new" / "1764244800.M000000P4242.big.bench.test"
    msg.write_bytes(head + body)
    size = msg.stat().st_size
    del raw, body
    pop = poplib.POP3("127.0.0.1", mf.ports["pop3"], timeout=60)
    pop.user("bob@example.test")
    pop.pass_(mf.passwords["bob@example.test"])
    pop.stat()
    pop.noop()
    time.sleep(0.5)  # let the login work settle before "idle" is read
    t0 = time.perf_counter()
    with PeakRSS(mf.pid) as peak:
        got = retr_raw(pop, 1)
    secs = time.perf_counter() - t0
    pop.quit()
    above = peak.above_idle_kb / 1024
    verdict = "OK" if above < 10 else "OVER TARGET"
    print(f"#   big RETR: {size} bytes on disk, {got} octets on the wire, {secs:.2f} s "
          f"({got / secs / 1e6:.0f} MB/s); {peak.describe()}")
    return (f"| POP3 RETR one {megabytes} MB message, server peak RSS above idle | — | "
            f"{above:.1f} MB | < 10 MB {verdict} |")


def pin(server_pids: list[int]) -> None:
    """This process on CPU 0, every thread of the servers (and their future children) on 1."""
    os.sched_setaffinity(0, {0})
    for pid in server_pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), {1})


def dovecot_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "dovecot"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--big-mb", type=int, default=50, help="0 to skip the large message")
    ap.add_argument("--port-base", type=int, default=13500)
    ap.add_argument("--no-reference", action="store_true", help="skip Dovecot")
    ap.add_argument("--pin", action="store_true",
                    help="client on CPU 0, servers on CPU 1 (needs 2 CPUs)")
    args = ap.parse_args()
    if not 1 <= args.messages <= 100_000 or not 1 <= args.reps <= 20:
        ap.error("--messages 1..100000, --reps 1..20")

    if not args.no_reference:
        try:
            wait_port(DOVECOT_PORT, 1)
        except RuntimeError:
            subprocess.run(["bash", str(ANCHORS / "dovecot-reference.sh"), "start"], check=True)
    results: dict[str, list[Session]] = {}
    rows: list[str] = []
    with bench_tmpdir("mailfort-pop3-bench-") as tmp:
        mf = MailfortServer(Path(tmp), port_base=args.port_base, plaintext_pop3=True)
        with mf:
            servers = [("mailfort", mf.ports["pop3"], mf.maildir("alice"), None,
                        mf.passwords["alice@example.test"])]
            if not args.no_reference:
                servers.append(("Dovecot", DOVECOT_PORT, DOVECOT_ROOT / "alice",
                                (VMAIL_UID, VMAIL_GID), "alicepw"))
            if args.pin:
                pin([mf.pid] + ([] if args.no_reference else dovecot_pids()))
            for rep in range(args.reps):
                for name, port, path, owner, password in servers:
                    fill_maildir(path, args.messages, args.size, owner)
                    for phase in PHASES:
                        if phase == "settled":
                            time.sleep(SETTLE)  # the previous session's tail work is done
                        s = pop3_session(port, "alice@example.test", password, args.messages)
                        results.setdefault(f"{name} {phase}", []).append(s)
                        print(f"#   rep {rep + 1} {name} {phase}: {s.rate:.0f} msg/s, "
                              f"{s.seconds:.3f} s, login {s.login_s * 1000:.0f} ms "
                              f"(without it {s.count / (s.seconds - s.login_s):.0f} msg/s), "
                              f"STAT {s.count} msgs {s.octets} octets, "
                              f"client CPU {s.client_cpu:.0%}", flush=True)
            kb = args.size // 1024 or 1
            for phase in PHASES:
                ours = statistics.median(s.rate for s in results[f"mailfort {phase}"])
                what = (f"POP3 RETR {args.messages} x {kb} KB, one session, {phase} "
                        f"({PHASES[phase]})")
                if args.no_reference:
                    rows.append(f"| {what} | — | {ours:.0f} msg/s | — |")
                    continue
                ref = statistics.median(s.rate for s in results[f"Dovecot {phase}"])
                verdict = "OK" if ours >= TARGET * ref else "BELOW TARGET"
                rows.append(f"| {what} | Dovecot {ref:.0f} msg/s | mailfort {ours:.0f} msg/s "
                            f"({ours / ref:.2f}×) | ≥ {TARGET}× {verdict} |")
                ours_nl, ref_nl = (statistics.median(s.count / (s.seconds - s.login_s)
                                                     for s in results[f"{n} {phase}"])
                                   for n in ("mailfort", "Dovecot"))
                rows.append(f"| same, {phase}, login (USER/PASS + snapshot) left out | "
                            f"Dovecot {ref_nl:.0f} msg/s | mailfort {ours_nl:.0f} msg/s "
                            f"({ours_nl / ref_nl:.2f}×) | (diagnostic) |")
            if args.big_mb > 0:
                rows.append(big_retr(mf, args.big_mb))
        if not args.no_reference:
            clear_maildir(DOVECOT_ROOT / "alice")
            for sub in ("new", "cur", "tmp"):
                (DOVECOT_ROOT / "alice" / sub).mkdir(exist_ok=True)
                os.chown(DOVECOT_ROOT / "alice" / sub, VMAIL_UID, VMAIL_GID)
    if args.pin and not args.no_reference:  # the reference outlives this run: unpin it
        for pid in dovecot_pids():
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), set(range(os.cpu_count() or 1)))
    pinned = "client on CPU 0, servers on CPU 1; " if args.pin else ""
    print(f"# {pinned}median of {args.reps}; same poplib client, USER/PASS in plaintext on "
          "loopback (mailfort: server.allow_plaintext_auth_on_loopback = true; "
          "Dovecot reference: ssl=no)")
    print("| measure | reference | mailfort | target |\n|---|---|---|---|")
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
