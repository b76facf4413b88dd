"""Hostile clients at full size: is a legitimate client still served within 2 seconds?

    python bench/hostile_clients.py                       # 10,000 hostile, default limits
    python bench/hostile_clients.py --hostile 3000 --duration 30 --no-stress

A crowd of ``--hostile`` connections to mailfort's MX, spread over the loopback addresses
127.0.0.2..127.0.0.254 (the client binds its socket), mixing idle sessions (EHLO, then
nothing), byte-at-a-time writers (one byte a second, a command line that never ends) and
clients that pipeline NOOPs and never read a reply. A crowd member whose connection ends
(refused, timed out, evicted) reconnects a second later, so the pressure holds for the whole
``--duration``. Every ``--probe-every`` seconds a legitimate client (smtplib, from
127.0.0.1) sends one message; its time from connect to the 250 is recorded.

The server runs with the default limits (5,000 connections, 50 per address, 300 s idle)
unless told otherwise, so stress mode (server/stress.py) is what lets the probe in;
``--no-stress`` sets ``stress_threshold = 0`` to show the difference. Reported: the crowd's
open connections and the server's sessions (descriptors) at their largest, the server's
RSS, the probe's latencies, and what the crowd was told. Both processes raise their
RLIMIT_NOFILE soft limit to the hard limit. Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import smtplib
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from mfproc import MailfortServer, bench_tmpdir, open_fds, proc_status, soft_nofile

ADDRESSES = [f"127.0.0.{i}" for i in range(2, 255)]
KINDS = ("idle", "idle", "idle", "slow", "deaf")  # 60 % idle, 20 % slowloris, 20 % deaf


class Crowd:
    """The hostile connections, each a task that reconnects when its connection ends."""

    def __init__(self, port: int, count: int, stop: asyncio.Event) -> None:
        self.port, self.count, self.stop = port, count, stop
        self.open = 0  # connections currently established and greeted (220)
        self.peak_open = 0
        self.told: Counter[str] = Counter()  # the server's last words, by reply
        self.errors: Counter[str] = Counter()
        self.gate = asyncio.Semaphore(300)  # handshakes in flight at once

    async def member(self, i: int) -> None:
        kind = KINDS[i % len(KINDS)]
        source = ADDRESSES[i % len(ADDRESSES)]
        while not self.stop.is_set():
            try:
                await self._session(kind, source)
            except (OSError, ConnectionError, TimeoutError) as exc:
                self.errors[type(exc).__name__] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 1.0)

    async def _session(self, kind: str, source: str) -> None:
        async with self.gate:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", self.port, local_addr=(source, 0)), 30)
            banner = await asyncio.wait_for(reader.readline(), 30)
        if not banner.startswith(b"220 "):
            self.told[banner[:40].decode(errors="replace").strip()] += 1
            writer.close()
            return
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)
        try:
            if kind == "idle":
                writer.write(b"EHLO idle.bench.test\r\n")
            elif kind == "deaf":
                writer.write(b"NOOP\r\n" * 500)
            last = b""
            while not self.stop.is_set():
                if kind == "slow":
                    writer.write(b"x")
                if kind == "deaf":  # never reads; notices only a close the loop sees
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), 1.0)
                    if reader.at_eof() or writer.is_closing():
                        break
                    continue
                with contextlib.suppress(TimeoutError):
                    data = await asyncio.wait_for(reader.read(4096), 1.0)
                    if not data:
                        break
                    last = data
            if last.startswith((b"421", b"-ERR")):
                self.told[last[:40].decode(errors="replace").strip()] += 1
        finally:
            self.open -= 1
            writer.close()


def probe(port: int) -> tuple[float, str]:
    """One legitimate message: seconds from connect to the 250, and the outcome."""
    t0 = time.monotonic()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("legit.bench.test")
            s.sendmail("someone@elsewhere.test", ["alice@example.test"],
                       b"From: <someone@elsewhere.test>\r\nSubject: probe\r\n\r\n"
                       b"still served\r\n")
    except (smtplib.SMTPException, OSError) as exc:
        return time.monotonic() - t0, f"{type(exc).__name__}: {str(exc)[:60]}"
    return time.monotonic() - t0, "250"


async def run(port: int, pid: int, hostile: int, duration: float, every: float) -> None:
    stop = asyncio.Event()
    crowd = Crowd(port, hostile, stop)
    idle_rss = proc_status(pid)["VmRSS"]
    tasks = [asyncio.create_task(crowd.member(i)) for i in range(hostile)]
    t0 = time.monotonic()
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    peak_fds = peak_rss = 0
    await asyncio.sleep(min(20.0, duration / 3))  # let the crowd build up first
    while time.monotonic() - t0 < duration:
        st = proc_status(pid)
        peak_rss, peak_fds = max(peak_rss, st["VmRSS"]), max(peak_fds, open_fds(pid))
        latency, outcome = await asyncio.to_thread(probe, port)
        if outcome == "250":
            latencies.append(latency)
        else:
            failures[outcome] += 1
        print(f"#  t={time.monotonic() - t0:5.1f}s crowd open {crowd.open:5d} "
              f"server fds {open_fds(pid):5d} RSS {st['VmRSS'] / 1024:6.1f} MB  "
              f"probe {latency * 1000:7.1f} ms {outcome}", flush=True)
        await asyncio.sleep(every)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    lat = sorted(latencies)
    within = sum(x < 2.0 for x in lat)
    probes = len(lat) + sum(failures.values())
    print(f"# crowd: {hostile} members; largest open at once {crowd.peak_open}; "
          f"told {dict(crowd.told.most_common(4))}; errors {dict(crowd.errors)}")
    print(f"# server: idle RSS {idle_rss / 1024:.1f} MB, peak RSS {peak_rss / 1024:.1f} MB, "
          f"peak fds {peak_fds}")
    if lat:
        print(f"# probe: {within}/{probes} accepted within 2 s; median "
              f"{statistics.median(lat) * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms; "
              f"failures {dict(failures) or 'none'}")
    else:
        print(f"# probe: 0/{probes} accepted; failures {dict(failures)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hostile", type=int, default=10_000)
    ap.add_argument("--duration", type=float, default=90.0)
    ap.add_argument("--probe-every", type=float, default=2.0)
    ap.add_argument("--max-connections", type=int, default=5000)
    ap.add_argument("--no-stress", action="store_true", help="stress_threshold = 0")
    ap.add_argument("--port-base", type=int, default=13700)
    args = ap.parse_args()
    if not 1 <= args.hostile <= 15_000 or not 10 <= args.duration <= 3600:
        ap.error("--hostile 1..15000, --duration 10..3600")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    extra = "stress_threshold = 0\n" if args.no_stress else ""
    with bench_tmpdir("mailfort-hostile-") as tmp:
        mf = MailfortServer(Path(tmp), port_base=args.port_base,
                            max_connections=args.max_connections, max_connections_per_ip=50,
                            extra_limits=extra)
        with mf:
            print(f"# client RLIMIT_NOFILE {hard}; server {'/'.join(soft_nofile(mf.pid))}; "
                  f"max_connections {args.max_connections}, 50 per address, "
                  f"stress {'off' if args.no_stress else 'on'}")
            time.sleep(0.5)
            asyncio.run(run(mf.ports["mx"], mf.pid, args.hostile, args.duration,
                            args.probe_every))
            if mf.proc is not None and mf.proc.poll() is not None:
                print(f"# server died:\n{mf.log_tail()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
