"""What was acknowledged survives SIGKILL of the server at any moment, exactly once.

The load and the verdict are bench/crash_campaign.py's (MX, submission to local, remote
and bounced recipients, POP3 deletions); here is its short form, a few kills per flush
mode, and a check that its verdict can fail.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


# ------------------------------------------------------------------ the crash campaign

def _campaign() -> ModuleType:
    """bench/crash_campaign.py: the long run lives in bench/, this is its short form."""
    path = Path(__file__).resolve().parents[2] / "bench" / "crash_campaign.py"
    spec = importlib.util.spec_from_file_location("crash_campaign", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("flush", "workers"), [("fsync", 1), ("syncfs", 2)])
async def test_crash_campaign_short_form(tmp_path: Path, flush: str, workers: int) -> None:
    """MX, submission (local, remote, bounced) and POP3 deletions under 3 SIGKILLs: every
    250 stored or delivered or bounced exactly once, every confirmed DELE gone. With
    ``workers = 2`` each round also reloads a changed configuration a quarter of the way
    (a new generation of workers takes over under load, the old primary hands the queue
    over), SIGKILLs one worker halfway (the supervisor replaces it; the workers' flushes
    are shared), then the supervisor, and its workers die with it."""
    cc = _campaign()
    # Longer rounds with workers: two fresh workers starting early in a round cost a
    # quarter of its mail (measured), and the check wants enough of it.
    load = (0.5, 0.9) if workers == 1 else (0.9, 1.3)
    report = await cc.campaign(tmp_path, kills=3, load=load, seed=16, flush=flush,
                               drain_timeout=30.0, workers=workers, reloads=workers > 1)
    assert report.ok, "\n".join(report.lines())
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert log.count("configuration reloaded") == report.reloads == (3 if workers > 1 else 0)
    assert "another process delivers" not in log  # one deliverer at any time
    assert report.worker_kills == (3 if workers > 1 else 0)
    assert report.kills == 3 + report.worker_kills
    if workers > 1:  # the workers' committers shared their flushes (store/shared_flush.py)
        count = (tmp_path / "data" / "flush.count").read_bytes()
        started, completed = struct.unpack("<QQ", count)
        assert started >= completed > 0
    assert sum(report.acked.values()) > 30, "the load did not get going"
    kinds = {"alice@example.test", "bob@example.test", "remote", "bounce"}
    assert kinds <= set(report.acked), report.acked


def test_crash_campaign_check_sees_loss_duplicate_and_undeleted(tmp_path: Path) -> None:
    """The campaign's verdict can fail: a lost, a doubled and an undeleted message."""
    cc = _campaign()
    new = tmp_path / "mail" / "example.test" / "alice" / "new"
    new.mkdir(parents=True)

    def store(name: str, token: str) -> None:
        (new / name).write_bytes(f"Subject: {token}\r\n\r\n".encode() + cc.END)

    store("1", "tok-mx-000001")
    store("2", "tok-mx-000002")
    store("3", "tok-mx-000002")
    store("4", "tok-mx-000004")
    ledger = cc.Ledger()
    for i in (1, 2, 3, 4):
        ledger.sent.add(f"tok-mx-00000{i}")
        ledger.acked[f"tok-mx-00000{i}"] = "alice@example.test"
    ledger.deleted.add("tok-mx-000004")
    report = cc.check(tmp_path / "mail", ledger, cc.Receiver(), 0.0)
    assert report.lost == ["tok-mx-000003"]
    assert report.duplicates == ["tok-mx-000002"]
    assert report.undeleted == ["tok-mx-000004"]
    assert not report.ok
