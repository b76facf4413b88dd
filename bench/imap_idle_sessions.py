"""Many IMAP sessions in IDLE on one mailfort node: are they all held, at what memory?

    python bench/imap_idle_sessions.py                        # 10,000 sessions, 10 users
    python bench/imap_idle_sessions.py --sessions 1000 --users 4 --hold 5
    python bench/imap_idle_sessions.py --sessions 10000 --users 50 --mx-load  # issue 28

Each session connects to 127.0.0.1 (plain IMAP, LOGIN in the clear on loopback as the
bench config allows), logs in as one of ``--users`` users in turn, SELECTs INBOX, sends
IDLE and waits in it. The client is one asyncio process holding one socket per session and
nothing else (a descriptor each; it raises its own RLIMIT_NOFILE to the hard limit). Once
all are idling (or the setup deadline passed) it waits ``--hold`` seconds, reads the
server's memory (RSS and PSS summed over the supervisor and its workers, as
bench/idle_sessions.py does for SMTP), delivers one message to each user over SMTP and
times the ``EXISTS`` each session is told (up to 30 s), then ends IDLE everywhere: a
session counts as held only if its DONE is answered OK. Logins cost an argon2id hash
each (19 MiB, t=2): setting up 10,000 takes minutes on two cores. Target (issue 28):
10,000 IDLE sessions < 150 MB in all; a delivery reaches an IDLE client in < 100 ms
median, < 1 s worst, while the MX runs its 50-session load: ``--mx-load`` runs that load
(1 KB messages, a connection each, 50 at a time: smtp-source as bench/run_all.py does when
installed, else bench/smtp_load.py with its parameters) to another local user,
``mxload@example.test``, from a second before the deliveries until every session was told
or the wait ended; the wake-up of each session is timed from the start of its own user's
delivery. Loopback only; every step bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import smtplib
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from idle_sessions import node_memory, raise_nofile
from mfproc import MailfortServer, bench_tmpdir, soft_nofile

SETUP_CONCURRENCY = 100  # sessions logging in at once (argon2 runs in the server's threads)
STEP_TIMEOUT = 120.0  # a login may wait behind many others' hashing
WAKE_TIMEOUT = 30.0  # how long the sessions are watched for EXISTS after the deliveries
HERE = Path(__file__).resolve().parent
LOAD_USER = "mxload@example.test"  # the MX load's recipient: no IDLE session is its
LOAD_WARMUP = 1.0  # seconds of load before the deliveries


def start_mx_load(port: int) -> subprocess.Popen[bytes]:
    """The MX's 50-session 1 KB load (bench/run_all.py's ``load``) to ``LOAD_USER``, more
    messages than the measurement takes: stopped by ``stop_mx_load``."""
    messages = 1_000_000
    if shutil.which("smtp-source"):
        cmd = ["smtp-source", "-c", "-l", "1024", "-m", str(messages), "-s", "50",
               "-f", "bench@example.org", "-t", LOAD_USER, f"127.0.0.1:{port}"]
    else:
        cmd = [sys.executable, str(HERE / "smtp_load.py"), "--port", str(port), "--size",
               "1024", "--sessions", "50", "--messages", str(messages), "--rcpt", LOAD_USER]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_mx_load(proc: subprocess.Popen[bytes]) -> str:
    """Stop the load; what it said of itself if it ended on its own before."""
    ended = proc.poll()
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    return "" if ended is None else f" (the load had ended by itself, status {ended})"


def count_files(maildir: Path) -> int:
    return sum(len(list((maildir / sub).iterdir())) for sub in ("new", "cur")
               if (maildir / sub).is_dir())


class Session:
    """One IMAP session, driven to IDLE."""

    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user, password
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def line(self) -> bytes:
        assert self.reader is not None
        got = await asyncio.wait_for(self.reader.readline(), STEP_TIMEOUT)
        if not got:
            raise ConnectionError("closed by server")
        return got

    async def command(self, tag: bytes, text: bytes) -> bytes:
        assert self.writer is not None
        self.writer.write(tag + b" " + text + b"\r\n")
        for _ in range(10_000):  # SELECT answers a dozen lines; bounded all the same
            got = await self.line()
            if got.startswith(tag + b" "):
                if not got.startswith(tag + b" OK"):
                    raise ConnectionError(f"{text[:12]!r}: {got[:80]!r}")
                return got
        raise ConnectionError("answer too long")

    async def open(self, port: int) -> None:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), STEP_TIMEOUT)
        await self.line()  # greeting
        await self.command(b"a", b'LOGIN "%s" "%s"' % (self.user.encode(),
                                                       self.password.encode()))
        await self.command(b"b", b"SELECT INBOX")
        self.writer.write(b"c IDLE\r\n")
        got = await self.line()
        if not got.startswith(b"+"):
            raise ConnectionError(f"IDLE {got[:60]!r}")

    async def wait_exists(self, timeout: float) -> float | None:
        """The monotonic time an untagged EXISTS arrived, None if not within ``timeout``."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            assert self.reader is not None
            try:
                got = await asyncio.wait_for(self.reader.readline(), left)
            except TimeoutError:
                return None
            if not got:
                return None
            if got.endswith(b" EXISTS\r\n"):
                return time.monotonic()
        return None

    async def done(self) -> None:
        assert self.writer is not None
        self.writer.write(b"DONE\r\n")
        for _ in range(1000):
            got = await self.line()
            if got.startswith(b"c "):
                if not got.startswith(b"c OK"):
                    raise ConnectionError(f"DONE {got[:60]!r}")
                return
        raise ConnectionError("no answer to DONE")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def kind(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:60]}"


def deliver(port: int, users: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """One message to each user, over SMTP to the MX; user -> monotonic time its
    transaction began (MAIL FROM sent), and user -> when its 250 after DATA came (stored;
    the file is in new/ a little before it)."""
    began: dict[str, float] = {}
    took: dict[str, float] = {}
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("client.bench.test")
        for user in users:
            began[user] = time.monotonic()
            smtp.sendmail("sender@bench.test", [user],
                          b"Subject: idle bench\r\n\r\nwake up\r\n")
            took[user] = time.monotonic()
    return began, took


async def run(mf: MailfortServer, count: int, users: dict[str, str], hold: float,
              deadline_s: float, mx_load: bool = False) -> list[str]:
    idle_rss, idle_pss, idle_fds = node_memory(mf.pid)
    names = sorted(users)
    sessions = [Session(names[i % len(names)], users[names[i % len(names)]])
                for i in range(count)]
    errors: Counter[str] = Counter()
    gate = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def open_one(s: Session) -> bool:
        async with gate:
            try:
                await s.open(mf.ports["imap"])
                return True
            except (OSError, ConnectionError, TimeoutError) as exc:
                errors[kind(exc)] += 1
                s.close()
                return False

    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(open_one(s)) for s in sessions]
    done, pending = await asyncio.wait(tasks, timeout=deadline_s)
    for t in pending:
        t.cancel()
    setup = time.perf_counter() - t0
    idling = [s for s, t in zip(sessions, tasks, strict=True) if t in done and t.result()]
    if pending:
        errors["setup deadline passed"] += len(pending)
    print(f"#   {len(idling)}/{count} sessions in IDLE after {setup:.1f} s; "
          f"errors: {dict(errors) or 'none'}", flush=True)
    await asyncio.sleep(hold)
    rss, pss, fds = node_memory(mf.pid)

    load = load_note = None
    load_dir = mf.maildir(LOAD_USER.partition("@")[0])
    if mx_load:
        load_before = count_files(load_dir)
        load = start_mx_load(mf.ports["mx"])
        await asyncio.sleep(LOAD_WARMUP)
        load_began = time.monotonic()
    waits = [asyncio.ensure_future(s.wait_exists(WAKE_TIMEOUT)) for s in idling]
    try:
        began, stored = await asyncio.to_thread(deliver, mf.ports["mx"], names)
        arrived = await asyncio.gather(*waits)
    finally:
        if load is not None:
            load_s = time.monotonic() - load_began + LOAD_WARMUP
            load_note = stop_mx_load(load)
            load_stored = count_files(load_dir) - load_before
            load_note = (f"MX load: {load_stored} messages stored for {LOAD_USER} in "
                         f"{load_s:.1f} s ({load_stored / load_s:.0f}/s){load_note}")
            print(f"#   {load_note}", flush=True)
    # from the start of the delivery to the session's own user to its EXISTS
    woke = sorted(t - began[s.user] for s, t in zip(idling, arrived, strict=True)
                  if t is not None)
    told = len(woke)
    within = {limit: sum(1 for w in woke if w <= limit) for limit in (1.0, 5.0)}
    median = statistics.median(woke) if woke else 0.0
    smtp_took = sorted(stored[u] - began[u] for u in names)
    after = sorted(t - stored[s.user] for s, t in zip(idling, arrived, strict=True)
                   if t is not None)
    worst = woke[-1] if woke else 0.0
    verdict = ("NOT MET" if told < len(idling) or median >= 0.1 or worst >= 1.0
               else "OK" if mx_load else "OK without the load")
    print(f"#   EXISTS after the delivery to the session's user began: {told}/{len(idling)} "
          f"within {WAKE_TIMEOUT:.0f} s, {within[1.0]} within 1 s, {within[5.0]} within "
          f"5 s; median {median * 1e3:.0f} ms, worst {worst * 1e3:.0f} ms"
          f"{' (MX load running)' if mx_load else ''}; the SMTP transactions themselves "
          f"(MAIL to the 250 after DATA) median {statistics.median(smtp_took) * 1e3:.0f} ms, "
          f"worst {smtp_took[-1] * 1e3:.0f} ms; EXISTS after the 250: median "
          f"{statistics.median(after) * 1e3 if after else 0:.0f} ms, worst "
          f"{after[-1] * 1e3 if after else 0:.0f} ms (negative: before it)", flush=True)

    async def done_one(s: Session) -> bool:
        try:
            await s.done()
            return True
        except (OSError, ConnectionError, TimeoutError) as exc:
            errors[f"DONE: {kind(exc)}"] += 1
            return False

    alive = sum(await asyncio.gather(*(done_one(s) for s in idling)))
    for s in sessions:
        s.close()
    per = (pss - idle_pss) / max(1, len(idling))
    total = pss / 1024
    print(f"#   server ({len(fds)} processes): idle RSS {idle_rss / 1024:.1f} MB, PSS "
          f"{idle_pss / 1024:.1f} MB, fds {idle_fds}; held RSS {rss / 1024:.1f} MB, PSS "
          f"{total:.1f} MB, fds {fds}; errors: {dict(errors) or 'none'}", flush=True)
    return [
        f"| {count} IMAP sessions in IDLE ({len(users)} users), held (DONE answered OK "
        f"after {hold:.0f} s) | {alive}/{count} | all held | "
        f"{'OK' if alive == count else 'NOT ALL HELD'} |",
        f"| of them told EXISTS after one delivery to each user (one after another over "
        f"one SMTP session; from the start of their user's) | {within[1.0]} within 1 s, "
        f"{within[5.0]} within 5 s, "
        f"{told}/{len(idling)} within {WAKE_TIMEOUT:.0f} s | all | "
        f"{'OK' if told == len(idling) else 'NOT ALL'} |",
        f"| delivery to EXISTS per session, from the start of its user's delivery, "
        f"{f'the MX 50-session 1 KB load running ({load_note})' if load_note else 'no MX load'}"
        f" | median {median * 1e3:.0f} ms, worst {worst * 1e3:.0f} ms"
        f"{'' if told == len(idling) else ' (of those told)'} | < 100 ms median, < 1 s worst"
        f"{'' if mx_load else ' (with the MX load: --mx-load)'} | "
        f"{verdict} |",
        f"| server memory while they idle, all processes (PSS; RSS summed "
        f"{rss / 1024:.1f} MB) | {total:.1f} MB (idle {idle_pss / 1024:.1f} MB) | < 150 MB | "
        f"{'OK' if total < 150 else 'OVER TARGET'} |",
        f"| server memory per IDLE session (held − idle PSS) / sessions | {per:.2f} kB | — "
        "| — |",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--users", type=int, default=10, help="sessions spread over this many")
    ap.add_argument("--hold", type=float, default=10.0, help="idle seconds before the check")
    ap.add_argument("--deadline", type=float, default=1200.0, help="max seconds for setup")
    ap.add_argument("--port-base", type=int, default=41700)
    ap.add_argument("--workers", type=int, default=1, help="[server] workers (default 1)")
    ap.add_argument("--mx-load", action="store_true",
                    help=f"run the MX 50-session 1 KB load to {LOAD_USER} during the wake-up")
    args = ap.parse_args()
    if not 1 <= args.sessions <= 30_000 or not 1 <= args.users <= 100 \
            or not 0 <= args.hold <= 600 or not 1 <= args.deadline <= 3600:
        ap.error("--sessions 1..30000, --users 1..100, --hold 0..600, --deadline 1..3600")
    with bench_tmpdir("mailfort-imap-idle-") as tmp:
        root = Path(tmp)
        mf = MailfortServer(root, port_base=args.port_base, plaintext_pop3=True, imap=True,
                            max_connections=max(20000, args.sessions + 100),
                            workers=args.workers,
                            extra_limits=f"imap_sessions_per_user = {args.sessions + 10}\n")
        users = dict(list(mf.passwords.items())[:args.users])
        pw = root / "pw"
        if args.mx_load:
            pw.write_text("mxload-pw-bench\n")
            mf.cli("user", "add", LOAD_USER, "--password-file", str(pw))
        for n in range(len(users), args.users):  # more users than mfproc's two
            user, password = f"user{n}@example.test", f"user{n}pw-bench"
            pw.write_text(f"{password}\n")
            mf.cli("user", "add", user, "--password-file", str(pw))
            users[user] = password
        with mf:  # started before the client raises its limit: it inherits the shell's
            soft, hard = raise_nofile(args.sessions + 100)
            s_soft, s_hard = soft_nofile(mf.pid)
            print(f"# client RLIMIT_NOFILE {soft}/{hard}; server {s_soft}/{s_hard}")
            time.sleep(0.5)
            rows = asyncio.run(run(mf, args.sessions, users, args.hold, args.deadline,
                                   args.mx_load))
            if mf.proc is not None and mf.proc.poll() is not None:
                print(f"# server died:\n{mf.log_tail()}")
    print("| measure | mailfort | target | verdict |\n|---|---|---|---|")
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
