"""Backend of `mailfort queue list | show | retry | delete`."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from mailfort.config import Config
from mailfort.queue import admin
from mailfort.queue.store import DamagedEntry, Queue, QueueError
from tests.conftest import refusing_dns_port
from tests.delivery.conftest import ConfigFactory
from tests.delivery.receiver import Receiver
from tests.queue.damage import DAMAGES, corrupt_files
from tests.server.production import cli, serving, world_dir, write_config

MSG = b"From: alice@example.test\r\nSubject: status report\r\n\r\nbody\r\n"


@pytest.fixture
def cfg(outbound_config: ConfigFactory) -> Config:
    return outbound_config()


def test_list_show_retry_delete(cfg: Config) -> None:
    root = admin.queue_root(cfg)
    assert root == Path(cfg.server.data_dir) / "queue"
    assert admin.queue_list(root) == "queue is empty"
    q = Queue(root)
    ident = q.enqueue_bytes(MSG, "alice@example.test", ["x@r.test", "y@r.test"],
                            "alice@example.test")
    e = q.get(ident)
    e.recipients[0].state = "delivered"
    e.recipients[1].state = "deferred"
    e.recipients[1].attempts = 3
    e.recipients[1].next_attempt = e.created + 3600
    e.recipients[1].last_reply = "451 4.3.0 try later"
    q.update(e)

    listing = admin.queue_list(root)
    assert ident in listing and "<alice@example.test>" in listing and "1/2" in listing
    assert "1 message(s), 1 recipient(s) pending" in listing

    shown = admin.queue_show(root, ident)
    assert "y@r.test: deferred, 3 attempt(s)" in shown
    assert "451 4.3.0 try later" in shown
    assert "x@r.test: delivered" in shown
    assert "Subject: status report" in shown and "body" not in shown.split("headers:")[1]

    assert admin.queue_retry(root, ident) == f"{ident}: scheduled for immediate retry"
    assert q.get(ident).recipients[1].next_attempt < e.created + 3600
    assert admin.queue_retry(root) == "1 message(s) scheduled for immediate retry"

    assert admin.queue_delete(root, ident) == f"{ident}: deleted"
    assert admin.queue_list(root) == "queue is empty"


def test_unknown_and_malformed_ids(cfg: Config) -> None:
    root = admin.queue_root(cfg)
    with pytest.raises(QueueError, match="no such queue entry"):
        admin.queue_show(root, "0123456789ABCDEF")
    with pytest.raises(QueueError, match="not a queue id"):
        admin.queue_delete(root, "../../directory.sqlite3")
    with pytest.raises(QueueError):
        admin.queue_retry(root, "0123456789ABCDEF")


def test_show_names_the_forwarding_alias_and_the_original_sender(cfg: Config) -> None:
    root = admin.queue_root(cfg)
    ident = Queue(root).enqueue_bytes(
        MSG, "SRS0=abcdef=aa=outside.test=eve@example.test", ["x@r.test"], None,
        forwards={"x@r.test": "fwd@example.test"}, original_sender="eve@outside.test")
    shown = admin.queue_show(root, ident)
    assert "rewritten from: <eve@outside.test> (SRS)" in shown
    assert "forwarded by: fwd@example.test" in shown


# ------------------------------------------------------------------ damaged entries


@pytest.mark.parametrize("kind", DAMAGES)
def test_list_show_retry_delete_of_a_damaged_entry(cfg: Config, kind: str) -> None:
    root = admin.queue_root(cfg)
    q = Queue(root)
    bad = q.enqueue_bytes(MSG, "alice@example.test", ["lost@r.test"], "alice@example.test")
    good = q.enqueue_bytes(MSG, "alice@example.test", ["x@r.test"], "alice@example.test")
    DAMAGES[kind][0](q, bad)
    q.recover()  # a start: finds a message whose state is missing
    why = DAMAGES[kind][1]

    listing = admin.queue_list(root)
    assert good in listing and "1 message(s), 1 recipient(s) pending" in listing
    (line,) = [x for x in listing.splitlines() if bad in x]
    assert "DAMAGED" in line and why in line
    assert admin.queue_retry(root) == ("1 message(s) scheduled for immediate retry; 1 damaged "
                                       "entry set aside, not retried (see `mailfort queue list`)")
    with pytest.raises(DamagedEntry, match=f"{bad} is damaged"):
        admin.queue_retry(root, bad)

    shown = admin.queue_show(root, bad)
    assert "DAMAGED" in shown and f"why:          {why}" in shown
    assert "what to do:" in shown and f"mailfort queue delete {bad}" in shown
    if kind == "message file missing":
        assert "message:      - (lost)" in shown and "lost@r.test" in shown
    else:
        assert f"{q.corrupt_dir / bad} ({len(MSG)} octets)" in shown
        assert "Subject: status report" in shown and "submit the message file again" in shown
    if kind == "truncated":  # what could still be read of it
        assert "  lost@r.test" in shown and "<alice@example.test>" in shown

    assert bad in admin.queue_list(Queue(root).root)  # a restart still shows it
    assert admin.queue_delete(root, bad).startswith(f"{bad}: deleted (a damaged entry")
    assert corrupt_files(q, bad) == set() and "DAMAGED" not in admin.queue_list(root)
    with pytest.raises(QueueError, match="no such queue entry"):
        admin.queue_show(root, bad)


def test_a_queue_of_damaged_entries_only_is_not_empty(cfg: Config) -> None:
    root = admin.queue_root(cfg)
    q = Queue(root)
    bad = q.enqueue_bytes(MSG, "alice@example.test", ["lost@r.test"], None)
    DAMAGES["truncated"][0](q, bad)
    listing = admin.queue_list(root)
    assert listing != "queue is empty" and bad in listing and "1 DAMAGED entry" in listing


async def _until(cond: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_a_running_server_delivers_around_a_damaged_entry_and_the_cli_handles_it(
) -> None:
    """Issue 25 item 8 with a real `mailfort serve`: a state file without "recipients"
    stopped every delivery pass; `queue list` and `queue retry` printed a traceback."""
    root = world_dir()
    rx = await Receiver().start()
    config = write_config(root, refusing_dns_port(),
                          routes={"remote.test": {"host": "127.0.0.1", "port": rx.port}})
    q = Queue(root / "data" / "queue")
    bad = q.enqueue_bytes(MSG, "alice@example.test", ["lost@remote.test"], None)
    q.enqueue_bytes(MSG, "alice@example.test", ["bob@remote.test"], None)
    DAMAGES["missing key"][0](q, bad)

    async def run(*args: str) -> tuple[int, str, str]:
        r = await asyncio.to_thread(cli, config, *args)
        assert "Traceback" not in r.stderr, r.stderr
        return r.returncode, r.stdout, r.stderr

    try:
        with serving(config, root / "data") as srv:
            await _until(lambda: len(rx.messages) == 1, "the healthy entry was not delivered")
            assert rx.messages[0].recipients == ["bob@remote.test"]
            code, out, _ = await run("status")
            assert code == 0 and "queue: 0 message(s)" in out and "1 DAMAGED" in out
            code, out, _ = await run("queue", "list")
            assert code == 0 and bad in out and "field recipients is missing" in out
            code, out, _ = await run("queue", "retry")
            assert code == 0 and "running server" in out and "1 damaged entry" in out
            code, out, err = await run("queue", "retry", bad)
            assert code == 1 and f"{bad} is damaged" in err and out == ""
            code, out, _ = await run("queue", "show", bad)
            assert code == 0 and "DAMAGED" in out and "Subject: status report" in out
            code, out, _ = await run("queue", "delete", bad)
            assert code == 0 and "deleted" in out
            code, out, _ = await run("status")
            assert code == 0 and "DAMAGED" not in out
            _, err = srv.stop()
        log = err + "".join(p.read_text() for p in root.glob("*.log"))
        assert f"queue {bad}: damaged entry set aside" in log
        assert "delivery pass failed" not in log and "Traceback" not in log
    finally:
        await rx.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_retry_now_keeps_the_schedule_and_a_bad_id_is_one_log_line() -> None:
    """Issue 27 with a real `mailfort serve` and an entry as the previous version wrote it
    (no retry fields): `queue show` takes its id; `queue retry ID` tries at once but the
    next scheduled attempt stays where it was (before: every manual retry doubled the
    wait); `queue retry nosuch` is refused with one log line, not a traceback."""
    root = world_dir()
    rx = await Receiver(rcpt_replies={"bob@remote.test": ["451 4.3.0 later"] * 100}).start()
    config = write_config(root, refusing_dns_port(),
                          routes={"remote.test": {"host": "127.0.0.1", "port": rx.port}},
                          queue={"initial_retry": 600, "max_retry": 7200})
    q = Queue(root / "data" / "queue")
    ident = q.enqueue_bytes(MSG, "alice@example.test", ["bob@remote.test"], None)
    state = q.env_dir / f"{ident}.json"
    old = json.loads(state.read_text())
    for r in old["recipients"]:  # as written before retry_at/early existed
        r.pop("retry_at", None)
        r.pop("early", None)
    state.write_text(json.dumps(old))

    def rcpt() -> Any:
        return q.get(ident).recipients[0]

    async def run(*args: str) -> tuple[int, str, str]:
        r = await asyncio.to_thread(cli, config, *args)
        assert "Traceback" not in r.stderr, r.stderr
        return r.returncode, r.stdout, r.stderr

    try:
        with serving(config, root / "data") as srv:
            await _until(lambda: rcpt().attempts == 1, "no first attempt")
            scheduled = rcpt().next_attempt
            assert scheduled > time.time() + 500
            code, out, _ = await run("queue", "show", ident)
            assert code == 0 and f"id:           {ident}" in out
            for n in (2, 3):
                code, out, _ = await run("queue", "retry", ident)
                assert code == 0 and "being retried now" in out, out
                await _until(lambda n=n: rcpt().attempts == n, f"no attempt {n}")  # type: ignore[misc]
                assert rcpt().next_attempt == pytest.approx(scheduled), "schedule moved"
            code, out, err = await run("queue", "retry", "nosuchid0")
            assert code != 0 and "no such queue entry" in err
            _, err = srv.stop()
        log = err + "".join(p.read_text() for p in root.glob("*.log"))
        failed = [ln for ln in log.splitlines() if "control command" in ln]
        assert len(failed) == 1 and "nosuchid0" in failed[0], failed
        assert "Traceback" not in log
    finally:
        await rx.stop()
        shutil.rmtree(root, ignore_errors=True)
