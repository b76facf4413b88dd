"""Node A killed under load: two real ``mailfort serve`` processes on 127.0.0.2 and
127.0.0.3 sharing one PostgreSQL directory, one Redis and one ``[server] mail_dir``.

Every MX message a client got 250 for, from either node, is in the Maildir exactly once once
A has been restarted (its spool recovery run); B's clients never see A's death; a POP3
session A held ends with A, and its maildrop lease expires (``[counters]
pop3_lease_seconds``) so the user reads on B. The verdict is bench/crash_campaign.py's.
"""

from __future__ import annotations

import asyncio
import os
import poplib
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.conftest import HOSTNAME, refusing_dns_port
from tests.server.test_durability import _campaign
from tests.server.test_nodes import NODE_IPS, _toml, ok

ALICE, PASSWORD = "alice@example.test", "alice-password-1"
LEASE = 2.0  # seconds: pop3_lease_seconds for the test (30 by default)
ROOT = Path(__file__).resolve().parents[2]


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def write_config(root: Path, name: str, directory: dict[str, Any], redis_url: str,
                 mail_dir: Path) -> tuple[Path, dict[str, int]]:
    ip = NODE_IPS[name]
    ports = {"mx": free_port(ip), "pop3": free_port(ip)}
    lines = ["[server]", f"hostname = {_toml(f'{name}.{HOSTNAME}')}",
             f"data_dir = {_toml(str(root / name))}", f"mail_dir = {_toml(str(mail_dir))}",
             "allow_plaintext_auth_on_loopback = true",
             "[listen]", f"mx = [\"{ip}:{ports['mx']}\"]", f"pop3 = [\"{ip}:{ports['pop3']}\"]",
             "submission = []", "submissions = []", "pop3s = []",
             "imap = []", "imaps = []", "managesieve = []",
             "[dns]", 'nameservers = ["127.0.0.1"]', f"port = {refusing_dns_port()}",
             "timeout = 1.0", "[counters]", 'backend = "redis"', f"url = {_toml(redis_url)}",
             f"pop3_lease_seconds = {LEASE}", "[directory]"]
    lines += [f"{k} = {_toml(v)}" for k, v in directory.items()]
    path = root / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path, ports


def serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore"}
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "mailfort", "serve", "--config",
                                 str(config)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=f, env=env)


async def wait_open(ip: str, ports: dict[str, int], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    for port in ports.values():
        while True:
            assert proc.poll() is None, f"mailfort serve exited with {proc.returncode}"
            try:
                _, w = await asyncio.open_connection(ip, port)
                w.close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"{ip}:{port} did not open"
                await asyncio.sleep(0.05)


async def test_killing_node_a_under_load_loses_no_acknowledged_message(
        tmp_path: Path, pg_directory: dict[str, Any], redis_server: Any) -> None:
    cc = _campaign()
    mail = tmp_path / "shared-mail"
    cfg, ports = {}, {}
    for n in NODE_IPS:
        cfg[n], ports[n] = write_config(tmp_path, n, pg_directory, redis_server.url, mail)
    ok(cfg["a"], "db", "migrate")
    ok(cfg["a"], "domain", "add", "example.test")
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    ok(cfg["b"], "user", "add", ALICE, "--password-file", str(tmp_path / "pw"))

    procs = {n: serve(cfg[n], tmp_path / f"{n}.log") for n in NODE_IPS}
    try:
        for n in NODE_IPS:
            await wait_open(NODE_IPS[n], ports[n], procs[n])
        # Alice's POP3 session on A, open when A dies.
        pop_a = await asyncio.to_thread(poplib.POP3, NODE_IPS["a"], ports["a"]["pop3"], 10)
        await asyncio.to_thread(pop_a.user, ALICE)
        await asyncio.to_thread(pop_a.pass_, PASSWORD)

        ledger = cc.Ledger()
        acked: dict[str, list[str]] = {"a": [], "b": []}
        failed = Counter[str]()
        stop = asyncio.Event()

        async def load(n: str) -> None:
            while not stop.is_set():
                token = ledger.token(n)
                if await cc.smtp_send(ports[n]["mx"], False, "x@far.test", [ALICE],
                                    cc.message(token, ALICE, 1024), host=NODE_IPS[n]):
                    acked[n].append(token)
                else:
                    failed[n] += 1
                    await asyncio.sleep(0.02)

        clients = [asyncio.create_task(load(n)) for n in NODE_IPS for _ in range(3)]
        await asyncio.sleep(1.5)
        procs["a"].send_signal(signal.SIGKILL)
        procs["a"].wait()
        b_before = len(acked["b"])
        killed_at = time.monotonic()
        await asyncio.sleep(1.5)  # B alone (A's clients fail meanwhile)
        stop.set()
        await asyncio.gather(*clients)
        assert len(acked["a"]) > 3 and b_before > 3, "the load did not get going"
        assert failed["b"] == 0, "a client of B saw a failure"
        assert len(acked["b"]) > b_before + 3, "B stopped accepting when A died"
        assert failed["a"] > 0  # A's clients did see it die

        # A's POP3 session died with A; the lease ends by expiry, then B serves Alice.
        pop_a.close()
        while True:
            try:
                pop_b = await asyncio.to_thread(poplib.POP3, NODE_IPS["b"],
                                                ports["b"]["pop3"], 10)
                await asyncio.to_thread(pop_b.user, ALICE)
                await asyncio.to_thread(pop_b.pass_, PASSWORD)
                break
            except poplib.error_proto as exc:
                assert b"IN-USE" in exc.args[0], exc
                assert time.monotonic() - killed_at < LEASE + 2, "the lease did not expire"
                await asyncio.sleep(0.2)
        assert (await asyncio.to_thread(pop_b.stat))[0] > 0
        await asyncio.to_thread(pop_b.quit)

        # A restarts: its spool recovery stores what it acknowledged but had not stored.
        procs["a"] = serve(cfg["a"], tmp_path / "a.log")
        await wait_open(NODE_IPS["a"], ports["a"], procs["a"])
        expected = acked["a"] + acked["b"]
        deadline = time.monotonic() + 5
        while True:
            msgs, _, partial = cc._maildir_tokens(mail, ALICE)
            if set(expected) <= set(msgs) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert [t for t in expected if msgs[t] == 0] == [], "acknowledged, lost"
        assert [t for t, k in msgs.items() if k > 1] == [], "stored twice"
        assert partial == []
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
