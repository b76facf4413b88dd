"""The IMAP change watcher (server/mailbox_watch.py): memory of many subscriptions, and how
fast a change made by another process (or node) reaches a subscriber.

    python bench/mailbox_watch.py                       # 10,000 subs on 1,000 mailboxes
    python bench/mailbox_watch.py --subs 10000 --boxes 1000 --rounds 200 --redis

Memory: Python heap (tracemalloc) and RSS growth of one process holding ``--subs``
subscriptions spread over ``--boxes`` Maildirs, each with a task blocked in ``wait()`` as
an IDLE session's would be (the task is counted: it is the least a session costs), and the
inotify watches the kernel holds (3 per mailbox). Latency: a child process delivers into
one subscribed mailbox (tmp/ then rename into new/) ``--rounds`` times, 20 ms apart,
stamping its monotonic clock just before; the subscribers wake and stamp theirs. Paths:
inotify (another worker process), Redis pub/sub (another node, inotify off: ``--redis``
starts a redis-server on a free loopback port), the stat poll (``--poll 0.5``).
Target (issue 28): 10,000 IDLE sessions < 150 MB in all; a delivery reaches an IDLE client
in < 100 ms median, < 1 s worst.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from mailfort.server.mailbox_watch import MailboxWatcher  # noqa: E402

_CHILD = r"""
import os, sys, time
root = sys.argv[1]
for n, line in enumerate(sys.stdin):
    name = f"{time.time_ns()}.P{os.getpid()}Q{n}.bench"
    with open(f"{root}/tmp/{name}", "wb") as f:
        f.write(b"Subject: x\r\n\r\nbody\r\n")
    t = time.monotonic()
    os.rename(f"{root}/tmp/{name}", f"{root}/new/{name}")
    print(t, flush=True)
"""


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def watches(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return sum(1 for line in f if line.startswith("inotify wd:"))


def make_maildir(d: Path) -> None:
    for sub in ("tmp", "new", "cur"):  # not ensure_maildir: 3,000 fsyncs are not measured
        (d / sub).mkdir(parents=True, exist_ok=True)


async def hold(w: MailboxWatcher, dirs: list[Path], subs: int) -> tuple[list, list]:
    held = [w.subscribe(dirs[i % len(dirs)]) for i in range(subs)]
    tasks = [asyncio.create_task(s.wait()) for s in held]
    await asyncio.sleep(0.1)
    return held, tasks


async def release(held: list, tasks: list) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for s in held:
        s.close()


async def memory(base: Path, subs: int, boxes: int) -> tuple[MailboxWatcher, list, list]:
    """Measured, then left held: the latency below is measured beside them."""
    dirs = [base / "mail" / "example.test" / f"user{i}" for i in range(1, boxes + 1)]
    for d in dirs:
        make_maildir(d)
    w = MailboxWatcher(base / "mail", poll="auto")
    await w.start()
    assert w._ino is not None
    # RSS first, without tracemalloc (which costs memory of its own)
    gc.collect()
    rss0 = rss_kib()
    held, tasks = await hold(w, dirs, subs)
    gc.collect()
    rss1 = rss_kib()
    kernel = watches(w._ino.fd)
    await release(held, tasks)
    del held, tasks
    # then the Python heap: subscriptions alone, and with a task waiting on each
    gc.collect()
    tracemalloc.start()
    s0 = tracemalloc.take_snapshot()
    held = [w.subscribe(dirs[i % boxes]) for i in range(subs)]
    gc.collect()
    subs_only = sum(st.size_diff for st in tracemalloc.take_snapshot().compare_to(s0, "filename"))
    tasks = [asyncio.create_task(s.wait()) for s in held]
    await asyncio.sleep(0.1)
    gc.collect()
    total = sum(st.size_diff for st in tracemalloc.take_snapshot().compare_to(s0, "filename"))
    tracemalloc.stop()
    print(f"memory: {subs} subscriptions on {boxes} mailboxes: "
          f"{subs_only / 1e6:.2f} MB heap ({subs_only / subs:.0f} B each); with a task "
          f"waiting on each: {total / 1e6:.2f} MB ({total / subs:.0f} B each); "
          f"RSS +{(rss1 - rss0) / 1024:.1f} MB (with the tasks); "
          f"kernel inotify watches: {kernel}")
    return w, held, tasks


async def latency(base: Path, label: str, receiver: MailboxWatcher, rounds: int,
                  extra: int = 9) -> None:
    """``extra`` more subscribers on the same mailbox (10 sessions each, as above)."""
    md = base / "mail" / "example.test" / "user0"
    make_maildir(md)
    sub = receiver.subscribe(md)
    others = [receiver.subscribe(md) for _ in range(extra)]
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(md)], text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    await asyncio.sleep(1.0)
    while True:  # the first poll's look, the connection's wake-up: not measured
        try:
            await asyncio.wait_for(sub.wait(), 0.05)
        except TimeoutError:
            break
    out: list[float] = []
    for _ in range(rounds):
        child.stdin.write("go\n")
        child.stdin.flush()
        await asyncio.wait_for(sub.wait(), 5)
        woke = time.monotonic()
        sent = float(await asyncio.to_thread(child.stdout.readline))
        out.append(woke - sent)
        for s in others:
            await asyncio.wait_for(s.wait(), 5)
        await asyncio.sleep(0.02)
    child.stdin.close()
    child.wait(5)
    sub.close()
    for s in others:
        s.close()
    out.sort()
    print(f"latency {label}: {rounds} deliveries from another process: median "
          f"{statistics.median(out) * 1000:.2f} ms, p99 {out[int(len(out) * 0.99) - 1] * 1000:.2f}"
          f" ms, worst {out[-1] * 1000:.2f} ms")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subs", type=int, default=10000)
    ap.add_argument("--boxes", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--redis", action="store_true", help="also the Redis path (redis-server)")
    ap.add_argument("--poll", type=float, default=0.5, help="also the poll at this interval")
    ap.add_argument("--mx-load", type=int, default=0, metavar="SESSIONS",
                    help="also: probes to alice while SESSIONS MX sessions send to bob")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="mailfort-watch-", dir=os.environ.get(
        "MAILFORT_BENCH_DIR", "/var/tmp")))
    try:
        w, held, tasks = await memory(base, args.subs, args.boxes)
        await latency(base, f"inotify, beside the {args.subs} subscriptions", w, args.rounds)
        await release(held, tasks)
        assert w._ino is not None
        print(f"after closing them all: {w.subscribed} directories, "
              f"{watches(w._ino.fd)} watches")
        await w.close()
        if args.redis:
            from tests.redisserver import RedisServer

            server = RedisServer().start()
            try:
                cfg = (server.url, None, "bench:")
                a = MailboxWatcher(base / "mail", poll="never", inotify=False, redis=cfg)
                b = MailboxWatcher(base / "mail", poll="never", inotify=False, redis=cfg)
                await a.start()
                await b.start()
                for _ in range(100):
                    if a._redis_up and b._redis_up:
                        break
                    await asyncio.sleep(0.02)
                await redis_latency(base, a, b, args.rounds)
                await a.close()
                await b.close()
            finally:
                server.cleanup()
        if args.poll:
            w = MailboxWatcher(base / "mail", poll="always", poll_interval=args.poll,
                               inotify=False)
            await w.start()
            await latency(base, f"poll every {args.poll}s", w, max(20, args.rounds // 10))
            await w.close()
        if args.mx_load:
            await mx_load(base, 100, args.mx_load)
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def redis_latency(base: Path, a: MailboxWatcher, b: MailboxWatcher, rounds: int) -> None:
    """Node B learns of the delivery by inotify and says ``changed`` (as its committer's
    hook would); node A, inotify off, hears it from Redis."""
    md = base / "mail" / "example.test" / "user0"
    ino = MailboxWatcher(base / "mail", poll="never")
    await ino.start()
    local = ino.subscribe(md)

    async def forward() -> None:
        while True:
            await local.wait()
            b.changed(md)

    task = asyncio.create_task(forward())
    await latency(base, "Redis (other node)", a, rounds)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    local.close()
    await ino.close()


async def mx_load(base: Path, probes: int, sessions: int) -> None:
    """A ``mailfort serve`` with two workers takes ``sessions`` MX sessions sending to bob
    without pause; meanwhile ``probes`` messages to alice, one at a time, each reach a
    subscriber in this process (another process than the worker that stored it)."""
    import smtplib

    import aiosmtplib
    from mfproc import MailfortServer

    (base / "serve").mkdir()
    srv = MailfortServer(base / "serve", port_base=13600, workers=2, source=str(ROOT / "src"))
    srv.start()
    w = MailboxWatcher(srv.mail, poll="never")
    await w.start()
    stop = asyncio.Event()
    sent = [0]
    body = b"From: load@remote.test\r\nTo: bob@example.test\r\n\r\n" + (b"x" * 76 + b"\r\n") * 13

    async def load() -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=srv.ports["mx"], timeout=30,
                                start_tls=False)
        await client.connect()
        while not stop.is_set():
            await client.sendmail("load@remote.test", ["bob@example.test"], body)
            sent[0] += 1
        await client.quit()

    def probe() -> tuple[float, float]:
        with smtplib.SMTP("127.0.0.1", srv.ports["mx"], timeout=30) as c:
            c.ehlo("probe.test")
            t0 = time.monotonic()
            c.sendmail("probe@remote.test", ["alice@example.test"],
                       "From: probe@remote.test\r\nTo: alice@example.test\r\n\r\nhi\r\n")
            return t0, time.monotonic()

    try:
        md = srv.maildir("alice")
        make_maildir(md)
        sub = w.subscribe(md)
        loaders = [asyncio.create_task(load()) for _ in range(sessions)]
        await asyncio.sleep(2.0)
        from_send, from_250 = [], []
        for _ in range(probes):
            task = asyncio.create_task(asyncio.to_thread(probe))
            await asyncio.wait_for(sub.wait(), 10)
            woke = time.monotonic()
            t0, t250 = await task
            from_send.append(woke - t0)
            from_250.append(woke - t250)
            await asyncio.sleep(0.05)
        stop.set()
        errors = [r for r in await asyncio.gather(*loaders, return_exceptions=True) if r]
        if errors:
            print(f"load sessions failed: {len(errors)}, e.g. {errors[0]!r}")
        from_send.sort()
        print(f"latency under MX load ({sessions} sessions, {sent[0]} messages to bob, 2 "
              f"workers): {probes} probes to alice, from the probe's MAIL FROM to the "
              f"wake-up: median {statistics.median(from_send) * 1000:.1f} ms, worst "
              f"{from_send[-1] * 1000:.1f} ms; wake-up minus the probe's 250: median "
              f"{statistics.median(from_250) * 1000:+.1f} ms")
        sub.close()
    finally:
        await w.close()
        srv.stop()


if __name__ == "__main__":
    asyncio.run(main())
