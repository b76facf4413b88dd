"""kill -9 at any moment loses no acknowledged queue entry (real subprocesses)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from mailfort.config import Config
from mailfort.queue.store import Queue
from mailfort.queue.worker import DeliveryWorker
from tests.delivery.conftest import ConfigFactory, ReceiverFactory
from tests.queue.conftest import LocalSink

ROOT = Path(__file__).resolve().parents[2]
MSG = b"From: alice@example.test\r\nTo: bob@remote.test\r\nSubject: crash\r\n\r\nbody\r\n"

CHILD_WORKER = textwrap.dedent("""
    import asyncio, json, sys
    from pathlib import Path
    from mailfort import config
    from mailfort.queue.store import Queue
    from mailfort.queue.worker import DeliveryWorker

    raw = json.loads(sys.argv[1])
    cfg = config.from_dict(raw)

    async def local(user, data, key):
        pass

    async def main():
        q = Queue(cfg.data_path / "queue")
        spool = cfg.data_path / "spool-msg"
        spool.write_bytes(bytes.fromhex(sys.argv[2]))
        ident = q.enqueue(spool, "alice@example.test", ["bob@remote.test"],
                          "alice@example.test")
        spool.unlink()
        print(ident, flush=True)
        w = DeliveryWorker(q, cfg, local)
        await w.start()
        await asyncio.Event().wait()

    asyncio.run(main())
""")

CHILD_ENQUEUE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from mailfort.queue.store import Queue

    q = Queue(Path(sys.argv[1]))
    i = 0
    while True:
        body = b"Subject: n%d\\r\\n\\r\\n" % i + b"x" * (i * 97 % 20000) + b"\\r\\n"
        ident = q.enqueue_bytes(body, "alice@example.test", ["r%d@remote.test" % i], "alice")
        print(ident, i, flush=True)
        i += 1
""")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src"),
                                         env.get("PYTHONPATH", "")])
    return env


def _raw(cfg: Config) -> str:
    from mailfort.config import effective

    return json.dumps(effective(cfg))


async def test_entry_survives_sigkill_mid_delivery_and_is_delivered_after_restart(
    outbound_config: ConfigFactory, receivers: ReceiverFactory, sink: LocalSink,
) -> None:
    stall = asyncio.Event()
    rx = await receivers(stall_data=stall)
    cfg = outbound_config(routes={"remote.test": {"host": "127.0.0.1", "port": rx.port}})
    proc = subprocess.Popen([sys.executable, "-c", CHILD_WORKER, _raw(cfg), MSG.hex()],
                            stdout=subprocess.PIPE, env=_env())
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        ident = line.decode().strip()
        await asyncio.wait_for(rx.data_started.wait(), 20)  # the child is inside DATA
        proc.send_signal(signal.SIGKILL)
        assert await asyncio.to_thread(proc.wait, 10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    await asyncio.sleep(0.1)
    stall.set()  # the receiver sees the dead connection and accepts nothing
    await asyncio.sleep(0.1)
    assert rx.messages == []

    q = Queue(cfg.data_path / "queue")
    entry = q.get(ident)
    assert entry.active and q.read_message(ident) == MSG

    rx.stall_data = None
    w = DeliveryWorker(q, cfg, sink)
    await w.start()
    try:
        deadline = time.monotonic() + 10
        while q.list() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await w.stop()
    assert q.list() == []
    (m,) = rx.messages
    assert m.data == MSG and m.recipients == ["bob@remote.test"]
    assert sink.delivered == []


def test_sigkill_during_enqueue_loses_nothing_acknowledged(tmp_path: Path) -> None:
    root = tmp_path / "queue"
    acked: list[tuple[str, int]] = []
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", CHILD_ENQUEUE, str(root)],
                                stdout=subprocess.PIPE, env=_env())
        assert proc.stdout is not None
        target = 20 + round_ * 7
        got: list[tuple[str, int]] = []
        while len(got) < target:
            ident, i = proc.stdout.readline().decode().split()
            got.append((ident, int(i)))
        proc.send_signal(signal.SIGKILL)  # somewhere inside the next enqueue
        proc.wait()
        rest = proc.stdout.read().decode().split("\n")  # acked before the kill landed
        got += [(x.split()[0], int(x.split()[1])) for x in rest if x.strip()]
        acked += got
        q = Queue(root)
        q.recover()
        assert list(q.tmp_dir.iterdir()) == []
        on_disk = {e.id: e for e in q.list()}
        assert {p.name for p in q.msg_dir.iterdir()} == set(on_disk)  # no orphans
        for ident, i in acked:
            e = on_disk[ident]
            assert [r.address for r in e.recipients] == [f"r{i}@remote.test"]
            data = q.read_message(ident)
            assert data.startswith(b"Subject: n%d\r\n" % i) and len(data) == e.size
