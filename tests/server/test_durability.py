"""What was acknowledged survives SIGKILL of the server at any moment, stored exactly once."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HOSTNAME, seed_directory
from tests.server.test_mx import read_reply


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, port: int, flush: str, workers: int = 1) -> Path:
    data = tmp_path / "data"
    cfg = tmp_path / "mailfort.toml"
    cfg.write_text(
        f'[server]\nhostname = "{HOSTNAME}"\ndata_dir = "{data}"\nworkers = {workers}\n'
        f'[store]\nflush = "{flush}"\n'
        f'[listen]\nmx = ["127.0.0.1:{port}"]\nsubmission = []\nsubmissions = []\n'
        "pop3 = []\npop3s = []\n"
    )
    return cfg


async def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(200):
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError("server did not start")


async def send_one(port: int, token: str) -> bool:
    """True only if the server answered 250 after DATA."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await read_reply(reader)
        writer.write(
            b"EHLO load.test\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
            b"DATA\r\n"
        )
        replies = [await read_reply(reader) for _ in range(4)]
        if not replies[3].startswith("354"):
            return False
        body = f"Subject: {token}\r\n\r\n" + f"{token}\r\n" * 40 + "END-OF-MESSAGE\r\n.\r\n"
        writer.write(body.encode())
        reply = await read_reply(reader)
        writer.close()
        return reply.startswith("250")
    except (OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError):
        return False


@pytest.mark.parametrize(("flush", "workers"), [("syncfs", 1), ("fsync", 2)])
async def test_acknowledged_mail_survives_sigkill(
        tmp_path: Path, flush: str, workers: int) -> None:
    """``workers = 2``: the SIGKILL hits the supervisor, and its workers die with it."""
    port = free_port()
    cfg_path = write_config(tmp_path, port, flush, workers)
    from mailfort import config

    cfg = config.load(cfg_path)
    seed_directory(cfg)
    acked: set[str] = set()
    rng = random.Random(1234)
    counter = 0
    for _round in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailfort", "serve", "--config", str(cfg_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            await wait_port(port, proc)
            stop = asyncio.Event()

            async def client(stop: asyncio.Event) -> None:
                nonlocal counter
                while not stop.is_set():
                    counter += 1
                    token = f"token-{counter:06d}"
                    if await send_one(port, token):
                        acked.add(token)

            tasks = [asyncio.create_task(client(stop)) for _ in range(8)]
            await asyncio.sleep(rng.uniform(0.5, 1.5))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            stop.set()
            await asyncio.gather(*tasks)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert len(acked) > 20, "the load did not get going"
    counts: dict[str, int] = {}
    new = cfg.data_path / "mail" / "example.test" / "alice" / "new"
    for f in new.iterdir():
        data = f.read_bytes()
        assert data.endswith(b"END-OF-MESSAGE\r\n"), f"partial message {f.name}"
        token = data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
        counts[token] = counts.get(token, 0) + 1
    lost = sorted(t for t in acked if t not in counts)
    assert lost == [], f"acknowledged but lost: {lost[:5]}"
    assert all(n == 1 for n in counts.values())
