"""One message, several queue entries (one per envelope sender): the message's id names
the entry of its own sender, the others are that id + S1, S2…, and `queue show ID` shows
them all (queue/forward.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailfort.policy.srs import SRS
from mailfort.queue import admin
from mailfort.queue.forward import enqueue_envelope
from mailfort.queue.store import Queue, new_id


def test_entries_of_one_message_share_its_id(tmp_path: Path) -> None:
    q = Queue(tmp_path / "queue")
    msg = tmp_path / "msg"
    msg.write_bytes(b"From: x@outside.test\r\nSubject: fwd\r\n\r\nbody\r\n")
    ident = new_id()
    made = enqueue_envelope(q, SRS(tmp_path / "srs.key"), "", msg, "x@outside.test",
                            ["fwd@r.test", "direct@r.test"], {"fwd@r.test": "a@example.test"},
                            None, ident=ident)
    assert made == [ident, f"{ident}S1"]
    assert q.get(ident).sender == "x@outside.test"  # the unchanged sender has the id
    assert q.get(f"{ident}S1").original_sender == "x@outside.test"  # the SRS one
    shown = admin.queue_show(q.root, ident)
    assert f"id:           {ident}\n" in shown and f"{ident}S1" in shown
    assert q.get(ident).id == ident
    with pytest.raises(admin.QueueError, match="taken"):  # never a second entry's id
        q.enqueue_bytes(b"x\r\n", "a@b.test", ["c@d.test"], None, ident=ident)
