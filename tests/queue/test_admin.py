"""Backend of `mailfort queue list | show | retry | delete`."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailfort.config import Config
from mailfort.queue import admin
from mailfort.queue.store import Queue, QueueError
from tests.delivery.conftest import ConfigFactory

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
