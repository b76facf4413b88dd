"""``mailfort queue adopt DIR``: another node's queue moved into this one, durably, safe to
run twice or after an interruption, refused while that node still runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailfort.queue.adopt import adopt
from mailfort.queue.store import Queue, QueueError
from tests.store.fsyncs import fsynced

__all__ = ["fsynced"]


def msg(i: int) -> bytes:
    return f"From: a@example.test\r\nSubject: {i}\r\n\r\nbody {i}\r\n".encode()


def gone_node_queue(root: Path) -> tuple[Queue, list[str]]:
    """A dead node's queue: three entries, one half delivered and deferred for an hour."""
    q = Queue(root)
    ids = [q.enqueue_bytes(msg(i), "a@example.test", [f"x{i}@r.test", f"y{i}@r.test"],
                           "alice@example.test") for i in range(3)]
    e = q.get(ids[1])
    e.recipients[0].state = "delivered"
    e.recipients[1].state = "deferred"
    e.recipients[1].attempts = 4
    e.recipients[1].next_attempt = time.time() + 3600
    q.update(e)
    return q, ids


def test_entries_move_with_their_state_and_become_due(tmp_path: Path,
                                                      fsynced: list[Path]) -> None:
    old, ids = gone_node_queue(tmp_path / "old" / "queue")
    mine = Queue(tmp_path / "mine" / "queue")
    before = time.time()
    r = adopt(mine, old.root)
    assert (r.adopted, r.finished, r.left) == (3, 0, 0)
    assert mine.ids() == sorted(ids) and old.ids() == []
    assert list(old.msg_dir.iterdir()) == []
    for i, ident in enumerate(ids):
        assert mine.read_message(ident) == msg(i)
    half = mine.get(ids[1])
    assert [r.state for r in half.recipients] == ["delivered", "deferred"]
    assert half.recipients[1].attempts == 4  # its history comes along
    assert half.is_due(time.time()) and half.next_attempt is not None
    assert half.next_attempt <= time.time() and half.next_attempt >= before - 1
    # Durable before the old copy goes: this queue's msg/ and env/ were fsynced.
    assert mine.msg_dir in fsynced and mine.env_dir in fsynced and old.env_dir in fsynced
    assert adopt(mine, old.root).adopted == 0  # twice: nothing more to do
    assert mine.ids() == sorted(ids)


def test_interrupted_run_is_finished_without_duplicates(tmp_path: Path) -> None:
    """What a kill leaves, at each step: message here without state (step 1), entry in
    both queues (step 2 done, old state not yet removed), old state gone but its message
    left (step 3 half done). A second run completes it, each entry once."""
    old, ids = gone_node_queue(tmp_path / "old")
    mine = Queue(tmp_path / "mine")
    os.link(old.message_path(ids[0]), mine.message_path(ids[0]))  # step 1 only
    os.link(old.message_path(ids[1]), mine.message_path(ids[1]))  # steps 1 and 2
    mine._write_state(old.get(ids[1]))
    r = adopt(mine, old.root)
    assert (r.adopted, r.finished) == (2, 1)
    assert mine.ids() == sorted(ids) and old.ids() == []
    assert sorted(p.name for p in mine.msg_dir.iterdir()) == sorted(ids)
    assert list(mine.tmp_dir.iterdir()) == []


def test_never_acknowledged_files_are_left_and_reported(tmp_path: Path) -> None:
    old, _ = gone_node_queue(tmp_path / "old")
    (old.msg_dir / "0000000000AAAAAAAAAAAA").write_bytes(b"half")  # a crash mid-enqueue
    r = adopt(Queue(tmp_path / "mine"), old.root)
    assert (r.adopted, r.left) == (3, 1)
    assert (old.msg_dir / "0000000000AAAAAAAAAAAA").exists()


def test_refused_while_its_node_still_runs(tmp_path: Path) -> None:
    old, ids = gone_node_queue(tmp_path / "old")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from mailfort.queue import owner; "
         f"owner.hold(Path({str(old.root)!r})); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(QueueError, match=rf"running mailfort \(pid {holder.pid} on"):
            adopt(Queue(tmp_path / "mine"), old.root)
        assert sorted(old.ids()) == sorted(ids)  # nothing moved
    finally:
        holder.kill()
        holder.wait()
    assert adopt(Queue(tmp_path / "mine"), old.root).adopted == 3  # the lock died with it


def test_not_a_queue_and_own_queue_refused(tmp_path: Path) -> None:
    mine = Queue(tmp_path / "mine")
    with pytest.raises(QueueError, match="not a mailfort queue"):
        adopt(mine, tmp_path)
    with pytest.raises(QueueError, match="own queue"):
        adopt(mine, tmp_path / "mine")


@pytest.fixture
def other_fs() -> Iterator[Path]:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == Path(tempfile.gettempdir()).stat().st_dev:
        pytest.skip("no second file system (/dev/shm)")
    root = Path(tempfile.mkdtemp(prefix="mailfort-oldqueue-", dir=shm))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_queue_on_another_file_system_is_copied(tmp_path: Path, other_fs: Path) -> None:
    old, ids = gone_node_queue(other_fs / "queue")
    mine = Queue(tmp_path / "mine")
    assert adopt(mine, old.root).adopted == 3
    assert [mine.read_message(i) for i in ids] == [msg(i) for i in range(3)]
    assert old.ids() == [] and list(mine.tmp_dir.iterdir()) == []


async def test_cli_refuses_a_running_nodes_queue_then_adopts_a_gone_one(
        tmp_path: Path, node: object) -> None:
    """The conftest node runs on tmp_path/data: its queue is held by the live process."""
    from mailfort.server.app import Node

    assert isinstance(node, Node)
    node.queue.enqueue_bytes(msg(7), "", ["z@r.test"], None)
    cfg = tmp_path / "other.toml"
    cfg.write_text(f'[server]\ndata_dir = "{tmp_path / "other"}"\n')

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mailfort", "queue", *args,
                               "--config", str(cfg)], capture_output=True, text=True,
                              timeout=60, env=dict(os.environ))

    r = cli("adopt", str(node.queue.root))
    assert r.returncode == 1 and f"running mailfort (pid {os.getpid()} on" in r.stderr
    assert len(node.queue.ids()) == 1
    old, _ = gone_node_queue(tmp_path / "gone" / "queue")
    r = cli("adopt", str(old.root))
    assert r.returncode == 0 and "adopted 3 message(s)" in r.stdout, r.stderr
    assert "3 message(s), 5 recipient(s) pending" in cli("list").stdout
