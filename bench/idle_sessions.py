"""Many concurrent idle SMTP sessions on mailfort's MX: are they all held, at what RSS?

    python bench/idle_sessions.py               # 10,000 sessions
    python bench/idle_sessions.py --sessions 2000 --hold 5

Each session connects to 127.0.0.1, reads the banner, sends EHLO, reads the reply, and
then stays idle. Once all are open (or the setup deadline passes) the script waits
``--hold`` seconds, reads the server's memory (RSS and PSS, summed over the supervisor and
its workers with ``--workers``) and open descriptors, then sends NOOP on every session: a
session counts as held only if it answers 250. The client raises its own RLIMIT_NOFILE to
the hard limit; the server's limit is read from /proc/<pid>/limits.
Target (issues 5 and 12): all held, < 100 MB in all (PSS: a page that the forked workers
share is counted once, as the machine holds it once). Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from collections import Counter
from pathlib import Path

from mfproc import (
    MailfortServer,
    bench_tmpdir,
    open_fds,
    proc_status,
    process_tree,
    soft_nofile,
)

SETUP_CONCURRENCY = 200  # handshakes in flight at once (the server's listen backlog is 1024)
STEP_TIMEOUT = 30.0


def raise_nofile(need: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft < need:
        print(f"# WARNING: client RLIMIT_NOFILE {soft} < {need} needed")
    return soft, hard


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    """One SMTP reply (all its lines); returns the last line."""
    for _ in range(100):
        line = await asyncio.wait_for(reader.readline(), STEP_TIMEOUT)
        if not line:
            raise ConnectionError("closed by server")
        if line[3:4] != b"-":
            return line
    raise ConnectionError("reply too long")


class Client:
    """One idle SMTP session."""

    def __init__(self) -> None:
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self, port: int) -> None:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), STEP_TIMEOUT)
        banner = await read_reply(self.reader)
        if not banner.startswith(b"220"):
            raise ConnectionError(f"banner {banner[:60]!r}")
        self.writer.write(b"EHLO client.bench.test\r\n")
        last = await read_reply(self.reader)
        if not last.startswith(b"250"):
            raise ConnectionError(f"EHLO {last[:60]!r}")

    async def noop(self) -> None:
        assert self.reader is not None and self.writer is not None
        self.writer.write(b"NOOP\r\n")
        last = await read_reply(self.reader)
        if not last.startswith(b"250"):
            raise ConnectionError(f"NOOP {last[:60]!r}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def pss_kb(pid: int) -> int:
    """Proportional set size: the process's private pages plus its share of the pages it
    shares (a forked worker shares the supervisor's code and imports until it writes them),
    so that a sum over processes counts each page once."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def node_memory(pid: int) -> tuple[int, int, list[int]]:
    """(RSS summed, PSS summed, open descriptors of each process) over ``pid`` and its
    workers, in kB."""
    pids = process_tree(pid)
    return (sum(proc_status(p)["VmRSS"] for p in pids), sum(pss_kb(p) for p in pids),
            [open_fds(p) for p in pids])


def kind(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:60]}"


async def run(port: int, count: int, hold: float, pid: int, deadline_s: float) -> list[str]:
    rows: list[str] = []
    idle, idle_pss, fds_idle = node_memory(pid)
    clients = [Client() for _ in range(count)]
    errors: Counter[str] = Counter()
    gate = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def open_one(c: Client) -> bool:
        async with gate:
            try:
                await c.open(port)
                return True
            except (OSError, ConnectionError, TimeoutError) as exc:
                errors[kind(exc)] += 1
                c.close()
                return False

    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(open_one(c)) for c in clients]
    done, pending = await asyncio.wait(tasks, timeout=deadline_s)
    for t in pending:
        t.cancel()
    setup = time.perf_counter() - t0
    opened = [c for c, t in zip(clients, tasks, strict=True) if t in done and t.result()]
    if pending:
        errors["setup deadline passed"] += len(pending)
    print(f"#   {len(opened)}/{count} sessions past EHLO in {setup:.1f} s "
          f"({len(opened) / setup:.0f}/s); errors: {dict(errors) or 'none'}", flush=True)
    await asyncio.sleep(hold)
    held_rss, held_pss, fds = node_memory(pid)

    async def noop_one(c: Client) -> bool:
        try:
            await c.noop()
            return True
        except (OSError, ConnectionError, TimeoutError) as exc:
            errors[f"after hold: {kind(exc)}"] += 1
            return False

    alive = sum(await asyncio.gather(*(noop_one(c) for c in opened)))
    for c in clients:
        c.close()
    await asyncio.sleep(1.0)
    after = node_memory(pid)[0]
    per = (held_pss - idle_pss) / max(1, len(opened))
    total_mb = held_pss / 1024
    ok = "OK" if total_mb < 100 else "OVER TARGET"
    print(f"#   server ({len(fds)} processes): idle RSS {idle / 1024:.1f} MB, PSS "
          f"{idle_pss / 1024:.1f} MB, fds {fds_idle}; held RSS {held_rss / 1024:.1f} MB, "
          f"PSS {total_mb:.1f} MB, fds {fds} (the sessions' spread over the processes); "
          f"after closing RSS {after / 1024:.1f} MB; errors: {dict(errors) or 'none'}")
    rows.append(f"| {count} concurrent idle SMTP sessions after EHLO, held "
                f"(answered NOOP after {hold:.0f} s idle) | {alive}/{count} | all held | "
                f"{'OK' if alive == count else 'NOT ALL HELD'} |")
    rows.append(f"| server memory while they are held, all processes (PSS; RSS summed "
                f"{held_rss / 1024:.1f} MB) | {total_mb:.1f} MB (idle "
                f"{idle_pss / 1024:.1f} MB) | < 100 MB | {ok} |")
    rows.append(f"| server memory per session (held − idle PSS) / sessions | {per:.2f} kB "
                "| — | — |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--hold", type=float, default=10.0, help="idle seconds before the check")
    ap.add_argument("--deadline", type=float, default=180.0, help="max seconds for setup")
    ap.add_argument("--port-base", type=int, default=13500)
    ap.add_argument("--workers", type=int, default=1, help="[server] workers (default 1)")
    args = ap.parse_args()
    if not 1 <= args.sessions <= 30_000 or not 0 <= args.hold <= 240:
        ap.error("--sessions 1..30000, --hold 0..240")
    with bench_tmpdir("mailfort-idle-bench-") as tmp:
        mf = MailfortServer(Path(tmp), port_base=args.port_base,
                            max_connections=max(20000, args.sessions + 100),
                            workers=args.workers)
        with mf:  # started before the client raises its limit: it inherits the shell's
            soft, hard = raise_nofile(args.sessions + 100)
            print(f"# client RLIMIT_NOFILE {soft}/{hard}")
            s_soft, s_hard = soft_nofile(mf.pid)
            print(f"# server RLIMIT_NOFILE {s_soft}/{s_hard} (soft/hard)")
            if s_soft.isdigit() and int(s_soft) < args.sessions + 100:
                print(f"# WARNING: the server's soft limit {s_soft} cannot hold {args.sessions} "
                      "sessions: mailfort should raise its soft RLIMIT_NOFILE to the hard "
                      "limit at start")
            time.sleep(0.5)
            rows = asyncio.run(run(mf.ports["mx"], args.sessions, args.hold, mf.pid,
                                   args.deadline))
            if mf.proc is not None and mf.proc.poll() is not None:
                print(f"# server died:\n{mf.log_tail()}")
    print("| measure | mailfort | target | verdict |\n|---|---|---|---|")
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
