"""MX throughput of several nodes: (a) one node on the embedded default (SQLite directory,
in-process counters), (b) one node on PostgreSQL + Redis, (c) two nodes on PostgreSQL +
Redis, on 127.0.0.2 and 127.0.0.3 with one shared ``[server] mail_dir``, the load split
between them. The configurations alternate over several rounds (the machine's load drifts);
each round starts fresh servers on fresh data. PostgreSQL and Redis are started here on
loopback (tests/pgserver.py, tests/redisserver.py). Loopback only.

    python3 bench/nodes_bench.py --rounds 3 --messages 1000 --sessions 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import smtp_load  # noqa: E402
from mfproc import bench_tmpdir, wait_disk_quiet, wait_freed_inodes  # noqa: E402

from tests.pgserver import PASSWORD, PostgresServer, find_bindir  # noqa: E402
from tests.redisserver import RedisServer  # noqa: E402

ALICE, ALICE_PW = "alice@example.test", "alice-bench-pw"
IPS = ("127.0.0.2", "127.0.0.3")


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore"}


def cli(cfg: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "mailfort", *args, "--config", str(cfg)],
                   check=True, capture_output=True, env=env(), timeout=120)


def write_config(root: Path, name: str, ip: str, mail_dir: Path, shared: dict[str, str]
                 ) -> tuple[Path, int]:
    port = free_port(ip)
    lines = ["[server]", f'hostname = "{name}.example.test"',
             f"data_dir = {json.dumps(str(root / name))}",
             f"mail_dir = {json.dumps(str(mail_dir))}",
             "[listen]", f'mx = ["{ip}:{port}"]', "submission = []", "submissions = []",
             "pop3 = []", "pop3s = []", "managesieve = []"]
    if shared:
        lines += ["[directory]", 'backend = "postgresql"', f"url = {json.dumps(shared['pg'])}",
                  f"password_file = {json.dumps(shared['pw'])}",
                  "[counters]", 'backend = "redis"', f"url = {json.dumps(shared['redis'])}"]
    path = root / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path, port


def wait_open(ip: str, port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mailfort serve exited with {proc.returncode}")
        try:
            socket.create_connection((ip, port), 1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{ip}:{port} did not open")


def one_run(kind: str, args: argparse.Namespace, pg: PostgresServer | None,
            redis: RedisServer | None, data: str) -> float:
    """Fresh nodes for configuration ``kind`` ("a", "b", "c"); accepted messages/s. Their
    files stay in ``data`` until the benchmark ends (mfproc.FREED_INODE_WINDOW)."""
    tmp = tempfile.mkdtemp(prefix=f"{kind}-", dir=data)
    root = Path(tmp)
    shared: dict[str, str] = {}
    if kind != "a":
        assert pg is not None and redis is not None
        (root / "pw").write_text(PASSWORD + "\n")
        shared = {"pg": pg.url(pg.create_database()), "pw": str(root / "pw"),
                  "redis": redis.url}
    (root / "alice-pw").write_text(ALICE_PW + "\n")
    nodes = [write_config(root, f"n{i}", ip, root / "mail", shared)
             for i, ip in enumerate(IPS[:2 if kind == "c" else 1])]
    first = nodes[0][0]
    if shared:
        cli(first, "db", "migrate")
    cli(first, "domain", "add", "example.test")
    cli(first, "user", "add", ALICE, "--password-file", str(root / "alice-pw"))
    procs = [subprocess.Popen([sys.executable, "-m", "mailfort", "serve", "--config",
                               str(cfg)], env=env(), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for cfg, _ in nodes]
    try:
        for (_, port), ip, p in zip(nodes, IPS, procs, strict=False):
            wait_open(ip, port, p)
        wait_disk_quiet(root)
        share = args.messages // len(nodes)
        loads = [argparse.Namespace(host=ip, port=port, size=1024, sessions=args.sessions
                                    // len(nodes), messages=share,
                                    sender="bench@example.org", rcpt=ALICE,
                                    starttls=False, user="", password="",
                                    keep_session=False)
                 for (_, port), ip in zip(nodes, IPS, strict=False)]

        async def all_loads() -> list[dict[str, float]]:
            return await asyncio.gather(*(smtp_load.run(a) for a in loads))

        start = time.perf_counter()
        results = asyncio.run(all_loads())
        elapsed = time.perf_counter() - start
        failed = sum(r["failed"] for r in results)
        if failed:
            print(f"  {kind}: {failed} failed", file=sys.stderr)
        return sum(r["accepted"] for r in results) / elapsed
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=1000, help="per run, over all nodes")
    ap.add_argument("--sessions", type=int, default=20, help="concurrent clients per run")
    args = ap.parse_args()
    bindir = find_bindir()
    if bindir is None:
        print("no PostgreSQL installed", file=sys.stderr)
        return 2
    pg = PostgresServer(bindir).start()
    redis = RedisServer().start()
    rates: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    wait_freed_inodes()
    try:
        with bench_tmpdir("mf-nodes-") as data:
            for rnd in range(args.rounds):
                for kind in rates:
                    rates[kind].append(one_run(kind, args, pg, redis, data))
                    print(f"round {rnd + 1} {kind}: {rates[kind][-1]:.1f} msg/s", flush=True)
    finally:
        redis.cleanup()
        pg.stop()
    names = {"a": "one node, embedded (SQLite + memory)", "b": "one node, PostgreSQL + Redis",
             "c": "two nodes, PostgreSQL + Redis"}
    med = {k: statistics.median(v) for k, v in rates.items()}
    for k, v in rates.items():
        print(f"{k}) {names[k]}: median {med[k]:.1f} msg/s, range {min(v):.1f}-{max(v):.1f}")
    print(f"b/a = {med['b'] / med['a']:.2f}   c/b = {med['c'] / med['b']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
