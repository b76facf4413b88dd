"""What waking IMAP IDLE sessions costs the server, per session, counted in process.

    python bench/imap_idle_wake.py                          # 200 sessions on one mailbox
    python bench/imap_idle_wake.py --sessions 1000 --users 5 --rounds 10
    python bench/imap_idle_wake.py --source /tmp/base/src    # the same, another checkout

The server side (IMAPServer, MailboxWatcher, the real Maildir store, a cheap argon2 so that
logins take no time) runs in this process, the clients in a child process (asyncio, one
socket per session: LOGIN, SELECT INBOX, IDLE). Each round writes one message into each
user's Maildir (tmp/ then a rename into new/, as another worker's MX does: the inotify
path) and waits until every session was told EXISTS. Counted per round, in this process
only: CPU time (``time.process_time``, so the client's is not in it), mailbox scans
(``Mailbox._scan_quiet``: those that took the locks and listed the directories), and
``os.listdir`` calls; the wake latency per session from the child's clock (CLOCK_MONOTONIC
is one clock for the machine). Why in process: on a busy machine wall time is noise,
CPU time and counts are not (bench/RESULTS.md, "IDLE wake-up cost").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ``--source DIR``: another checkout's src/, to count a base version the same way
_SRC = (sys.argv[sys.argv.index("--source") + 1] if "--source" in sys.argv[:-1]
        else str(ROOT / "src"))
sys.path.insert(0, _SRC)

PASSWORD = "wake-bench-pw1"


async def _client(port: int, users: list[str], sessions: int) -> None:
    """The child: open the sessions, say "ready", then per round report EXISTS times."""
    conns: list[tuple[str, asyncio.StreamReader, asyncio.StreamWriter]] = []
    gate = asyncio.Semaphore(50)

    async def open_one(i: int) -> None:
        async with gate:
            user = users[i % len(users)]
            r, w = await asyncio.open_connection("127.0.0.1", port)
            await r.readline()
            w.write(b'a LOGIN "%s" "%s"\r\nb SELECT INBOX\r\nc IDLE\r\n'
                    % (user.encode(), PASSWORD.encode()))
            while not (await r.readline()).startswith(b"+"):
                pass
            conns.append((user, r, w))

    await asyncio.gather(*(open_one(i) for i in range(sessions)))
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async def one(user: str, r: asyncio.StreamReader) -> tuple[str, float]:
        while True:
            got = await asyncio.wait_for(r.readline(), 30)
            if not got:
                raise ConnectionError("closed")
            if got.endswith(b" EXISTS\r\n"):
                return user, time.monotonic()

    while (await stdin.readline()).strip() == b"round":
        got = await asyncio.gather(*(one(u, r) for u, r, _ in conns))
        print(json.dumps(got), flush=True)
    for _, _, w in conns:
        w.close()


def _counting() -> dict[str, int]:
    """Wrap the calls counted (counting only: the calls themselves are unchanged)."""
    from mailfort.store import imap_mailbox, listing

    counts = {"scans": 0, "listdir": 0}
    scan_quiet = imap_mailbox.Mailbox._scan_quiet
    real_listdir = os.listdir

    def counted_scan(self: object, *a: object, **kw: object) -> object:
        counts["scans"] += 1
        return scan_quiet(self, *a, **kw)  # type: ignore[arg-type]

    def counted_listdir(path: object) -> list[str]:
        counts["listdir"] += 1
        return real_listdir(path)  # type: ignore[arg-type]

    imap_mailbox.Mailbox._scan_quiet = counted_scan  # type: ignore[method-assign]
    listing.os.listdir = counted_listdir  # type: ignore[attr-defined]
    return counts


async def serve(args: argparse.Namespace, tmp: Path) -> None:
    from argon2 import PasswordHasher

    from mailfort.config import AuthConfig, LimitsConfig
    from mailfort.directory.sqlite import SQLiteDirectory
    from mailfort.passwords import hash_password
    from mailfort.policy.authn import Authenticator
    from mailfort.policy.counters import MemoryCounters
    from mailfort.server.imap import IMAPServer, UserSessions
    from mailfort.server.mailbox_watch import MailboxWatcher
    from mailfort.store.maildir import maildir_for

    cheap = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    directory = SQLiteDirectory(tmp / "directory.sqlite3")
    directory.add_domain("example.test")
    users = [f"user{n}@example.test" for n in range(args.users)]
    for user in users:
        directory.add_user(user, hash_password(PASSWORD, hasher=cheap))
    auth = Authenticator(directory, MemoryCounters(), AuthConfig(), hasher=cheap)
    limits = LimitsConfig(max_connections=args.sessions + 100,
                          max_connections_per_ip=args.sessions + 100,
                          imap_sessions_per_user=args.sessions + 10)
    watcher = MailboxWatcher(tmp / "mail")
    await watcher.start()
    server = IMAPServer(ssl_context=None, authenticator=auth, mail_dir=tmp / "mail",
                        limits=limits, implicit_tls=False, allow_plaintext=True,
                        watcher=watcher, user_sessions=UserSessions(args.sessions + 10))
    await server.start("127.0.0.1", 0)
    boxes = [maildir_for(tmp / "mail", u) for u in users]
    for md in boxes:  # the mailbox the sessions idle on holds --messages already
        for sub in ("tmp", "new", "cur"):
            (md / sub).mkdir(parents=True, exist_ok=True)
        for i in range(args.messages):
            (md / "new" / f"{1700000000 + i}.M{i}P1.fill").write_bytes(
                b"Subject: old\r\n\r\nold mail\r\n")
    counts = _counting()
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--child", str(server.ports[0]), str(args.sessions),
        *users, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    line = await asyncio.wait_for(child.stdout.readline(), 300)
    assert line.strip() == b"ready", line
    await asyncio.sleep(1.0)
    per_session: list[float] = []
    cpu_rounds: list[float] = []
    scans: list[int] = []
    lists: list[int] = []
    wakeups: list[int] = []
    for n in range(args.rounds):
        await asyncio.sleep(args.gap)
        for k in counts:
            counts[k] = 0
        child.stdin.write(b"round\n")
        await child.stdin.drain()
        await asyncio.sleep(0.2)  # the child is reading again
        cpu0 = time.process_time()
        woken0 = watcher.wakeups
        began: dict[str, float] = {}
        for user, md in zip(users, boxes, strict=True):
            name = f"{time.time_ns()}.R{n}P{os.getpid()}.bench"
            (md / "tmp" / name).write_bytes(b"Subject: wake\r\n\r\nwake up\r\n")
            began[user] = time.monotonic()
            os.rename(md / "tmp" / name, md / "new" / name)
        got = json.loads(await asyncio.wait_for(child.stdout.readline(), 60))
        cpu = time.process_time() - cpu0
        per_session += [t - began[u] for u, t in got]
        cpu_rounds.append(cpu)
        scans.append(counts["scans"])
        lists.append(counts["listdir"])
        await asyncio.sleep(0.1)  # the wake-ups the scan's own changes cause
        wakeups.append(watcher.wakeups - woken0)
    child.stdin.write(b"end\n")
    await child.stdin.drain()
    await child.wait()
    await server.close()
    await watcher.close()
    auth.close()
    per_session.sort()
    cpu_us = statistics.median(cpu_rounds) / args.sessions * 1e6
    print(f"{args.sessions} sessions, {args.users} users, {args.messages} messages, "
          f"{args.rounds} rounds: server CPU "
          f"per round median {statistics.median(cpu_rounds) * 1e3:.1f} ms "
          f"= {cpu_us:.0f} µs per woken session; scans per round median "
          f"{statistics.median(scans):g} (per delivery {statistics.median(scans) / args.users:g})"
          f", listdir per round {statistics.median(lists):g}, subscriptions woken per "
          f"session {statistics.median(wakeups) / args.sessions:g}; wake latency median "
          f"{statistics.median(per_session) * 1e3:.1f} ms, worst {per_session[-1] * 1e3:.1f} ms")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        port, sessions, users = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
        asyncio.run(_client(port, users, sessions))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--users", type=int, default=1, help="sessions spread over this many")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--gap", type=float, default=0.5, help="seconds between rounds")
    ap.add_argument("--messages", type=int, default=0, help="in each INBOX beforehand")
    ap.add_argument("--source", default="", help="run the server from this src/ directory")
    args = ap.parse_args()
    if not 1 <= args.sessions <= 5000 or not 1 <= args.users <= min(100, args.sessions) \
            or not 1 <= args.rounds <= 1000 or not 0 <= args.gap <= 60 \
            or not 0 <= args.messages <= 100_000:
        ap.error("--sessions 1..5000, --users 1..min(100, sessions), --rounds 1..1000, "
                 "--gap 0..60, --messages 0..100000")
    with tempfile.TemporaryDirectory(prefix="mailfort-idle-wake-") as tmp:
        asyncio.run(serve(args, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
