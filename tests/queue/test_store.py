"""The on-disk queue: durability layout, state updates, recovery, id checks."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
from pathlib import Path

import pytest

from mailfort.queue import store
from mailfort.queue.store import DamagedEntry, Queue, QueueError
from tests.queue.damage import DAMAGES, corrupt_files, kept_files
from tests.store.fsyncs import fsynced
from tests.store.test_storage_faults import fill, small_fs

__all__ = ["fsynced", "small_fs"]

MSG = b"From: a@example.test\r\nSubject: t\r\n\r\nbody\r\n"


def test_enqueue_links_spool_file_and_records_envelope(tmp_path: Path) -> None:
    spool = tmp_path / "spool-1"
    spool.write_bytes(MSG)
    q = Queue(tmp_path / "queue")
    ident = q.enqueue(spool, "a@example.test", ["x@r.test", "y@r.test", "x@r.test"],
                      "alice@example.test")
    spool.unlink()  # the integrator discards its spool file afterwards
    assert q.read_message(ident) == MSG
    e = q.get(ident)
    assert e.sender == "a@example.test" and e.submitted_by == "alice@example.test"
    assert [r.address for r in e.recipients] == ["x@r.test", "y@r.test"]  # deduplicated
    assert all(r.state == "pending" and r.attempts == 0 for r in e.recipients)
    assert e.size == len(MSG)
    raw = json.loads((tmp_path / "queue" / "env" / f"{ident}.json").read_text())
    assert raw["id"] == ident and raw["recipients"][0]["state"] == "pending"
    assert list((tmp_path / "queue" / "tmp").iterdir()) == []


def test_update_due_retry_delete(tmp_path: Path) -> None:
    q = Queue(tmp_path / "q")
    a = q.enqueue_bytes(MSG, "a@example.test", ["x@r.test"], None)
    b = q.enqueue_bytes(MSG, "", ["y@r.test"], None)
    assert [e.id for e in q.list()] == sorted([a, b])
    e = q.get(a)
    e.recipients[0].state = "deferred"
    e.recipients[0].next_attempt = e.created + 1000
    e.recipients[0].last_reply = "451 4.3.0 later"
    q.update(e)
    assert [x.id for x in q.due(e.created + 1)] == [b]
    assert q.get(a).recipients[0].last_reply == "451 4.3.0 later"
    assert q.retry(a) == 1
    assert a in [x.id for x in q.due(e.created + 1 + 1e6)]
    assert q.retry(None) == 2
    q.delete(a)
    assert not (q.msg_dir / a).exists()
    with pytest.raises(QueueError):
        q.get(a)
    with pytest.raises(QueueError):
        q.update(e)  # a deleted entry is not brought back by a late state update
    with pytest.raises(QueueError):
        q.delete(a)


def test_finished_entries_are_not_due(tmp_path: Path) -> None:
    q = Queue(tmp_path / "q")
    ident = q.enqueue_bytes(MSG, "a@example.test", ["x@r.test"], None)
    e = q.get(ident)
    e.recipients[0].state = "delivered"
    q.update(e)
    assert q.due(e.created + 10) == []
    assert q.retry(ident) == 0


@pytest.mark.parametrize("bad", ["../../etc/passwd", "", "a/b", "x" * 100, "abc.json",
                                 "ABCDEF0123\n", "\nABCDEF0123"])
def test_ids_from_outside_are_checked(tmp_path: Path, bad: str) -> None:
    q = Queue(tmp_path / "q")
    with pytest.raises(QueueError):
        q.get(bad)
    with pytest.raises(QueueError):
        q.delete(bad)
    with pytest.raises(QueueError):
        Queue.check_id(bad)
    with pytest.raises(QueueError):
        q.message_path(bad)


def test_an_existing_id_with_a_trailing_newline_is_not_an_id(tmp_path: Path) -> None:
    """``$`` also matches before a final newline: the check must cover the whole string."""
    q = Queue(tmp_path / "q")
    ident = q.enqueue_bytes(MSG, "a@example.test", ["x@r.test"], None)
    assert Queue.check_id(ident) == ident
    with pytest.raises(QueueError):
        Queue.check_id(ident + "\n")
    with pytest.raises(QueueError):
        q.read_message(ident + "\n")


def test_recover_removes_half_written_files(tmp_path: Path) -> None:
    q = Queue(tmp_path / "q")
    keep = q.enqueue_bytes(MSG, "a@example.test", ["x@r.test"], "alice@example.test")
    (q.tmp_dir / "ABCDEF0123.msg").write_bytes(b"half")
    (q.tmp_dir / "ABCDEF0123.1234.json").write_bytes(b"{")
    (q.msg_dir / "0000ORPHAN00").write_bytes(MSG)  # message whose state never landed
    assert Queue(q.root).recover() == 3
    assert [e.id for e in q.list()] == [keep]
    assert sorted(p.name for p in q.msg_dir.iterdir()) == [keep]
    assert list(q.tmp_dir.iterdir()) == []


def test_enqueue_requires_recipients(tmp_path: Path) -> None:
    q = Queue(tmp_path / "q")
    with pytest.raises(QueueError):
        q.enqueue_bytes(MSG, "a@example.test", [], None)
    assert list(q.msg_dir.iterdir()) == []


def test_new_queue_directories_are_durable(tmp_path: Path, fsynced: list[Path]) -> None:
    """msg/, env/ and tmp/ (and the queue root) are fsynced into their parents when
    created: a crash after the first 250 must not lose the directory that holds it."""
    root = tmp_path / "data" / "queue"
    Queue(root)
    assert {tmp_path, tmp_path / "data", root} <= set(fsynced)
    fsynced.clear()
    Queue(root)  # already there: no more syncing
    assert fsynced == []


def test_enqueue_records_what_the_message_needs_of_a_receiver(tmp_path: Path) -> None:
    """Delivery decides SMTPUTF8 and BODY=8BITMIME from what enqueue recorded."""
    q = Queue(tmp_path / "q")
    plain = q.get(q.enqueue_bytes(MSG, "a@example.test", ["x@r.test"], None))
    assert (plain.eight_bit, plain.utf8_headers) == (False, False)
    body8 = q.get(q.enqueue_bytes(MSG + "é\r\n".encode(), "a@example.test", ["x@r.test"], None))
    assert (body8.eight_bit, body8.utf8_headers) == (True, False)
    utf8 = q.get(q.enqueue_bytes("Subject: é\r\n\r\nx\r\n".encode(), "a@example.test",
                                 ["x@r.test"], None))
    assert (utf8.eight_bit, utf8.utf8_headers) == (True, True)
    raw = json.loads((q.env_dir / f"{utf8.id}.json").read_text())
    assert raw["utf8_headers"] is True  # on disk, not worked out again at each attempt


def test_read_headers_reads_the_header_block_only(tmp_path: Path) -> None:
    q = Queue(tmp_path / "q")
    ident = q.enqueue_bytes(MSG + b"x" * 100_000, "a@example.test", ["x@r.test"], None)
    assert q.read_headers(ident) == b"From: a@example.test\r\nSubject: t\r\n"
    assert q.read_headers(ident, limit=10) == b"From: a@ex"


def test_a_state_that_does_not_fit_on_the_disk_is_refused_not_truncated(
    small_fs: Path,
) -> None:
    """Two pages free, a state file of three: the write comes back short. The entry is
    refused (nothing to acknowledge) and leaves no file, instead of being committed with
    a truncated state that no reader can parse (a lost entry after its 250)."""
    q = Queue(small_fs / "queue")
    filler = fill(small_fs)
    os.truncate(filler, os.path.getsize(filler) - 2 * 4096)
    rcpts = [f"recipient-{i:04d}@remote.example.test" for i in range(200)]
    with pytest.raises(OSError) as err:
        q.enqueue_bytes(MSG, "a@example.test", rcpts, "alice@example.test")
    assert err.value.errno == errno.ENOSPC
    assert q.ids() == [] and q.list() == []
    assert [p for d in (q.msg_dir, q.env_dir, q.tmp_dir) for p in d.iterdir()] == []
    filler.unlink()
    ident = q.enqueue_bytes(MSG, "a@example.test", rcpts, "alice@example.test")
    assert len(q.get(ident).recipients) == 200


@pytest.mark.parametrize(
    ("header", "requiretls", "tags"),
    [
        (b"", False, (False, False)),
        (b"TLS-Required: No\r\n", False, (False, True)),
        (b"tls-required:\r\n  no\r\n", False, (False, True)),  # folded, any case
        (b"TLS-Required: No\r\n", True, (True, False)),  # REQUIRETLS wins (RFC 8689 4.1)
        (b"TLS-Required: Yes\r\n", False, (False, False)),
        (b"TLS-Required: No\r\nTLS-Required: No\r\n", False, (False, False)),  # ambiguous
        (b"", True, (True, False)),
    ],
)
def test_rfc8689_tags_are_decided_at_enqueue_and_kept(
    tmp_path: Path, header: bytes, requiretls: bool, tags: tuple[bool, bool]
) -> None:
    q = Queue(tmp_path / "q")
    msg = MSG.replace(b"Subject: t\r\n", b"Subject: t\r\n" + header)
    ident = q.enqueue_bytes(msg + b"TLS-Required: No\r\n", "a@example.test", ["x@r.test"],
                            None, requiretls=requiretls)  # a body line never counts
    e = Queue(tmp_path / "q").get(ident)  # as read after a restart
    assert (e.requiretls, e.tls_optional) == tags
    q.update(e)  # a state change keeps them
    assert (q.get(ident).requiretls, q.get(ident).tls_optional) == tags


# ------------------------------------------------------------------ damaged entries


def _damaged_beside_healthy(root: Path, kind: str) -> tuple[Queue, str, str]:
    q = Queue(root)
    bad = q.enqueue_bytes(MSG, "a@example.test", ["lost@r.test"], "a@example.test")
    good = q.enqueue_bytes(MSG, "a@example.test", ["ok@r.test"], "a@example.test")
    DAMAGES[kind][0](q, bad)
    return q, bad, good


@pytest.mark.parametrize("kind", DAMAGES)
def test_a_damaged_entry_is_set_aside_with_one_log_line_and_the_rest_goes_on(
        tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    q, bad, good = _damaged_beside_healthy(tmp_path / "q", kind)
    caplog.set_level(logging.INFO, "mailfort.queue")
    q.recover()  # what a start does first (a message without a state is found here)
    assert [e.id for e in q.list()] == [good]
    assert [e.id for e in q.due(float("inf"))] == [good]
    assert q.retry() == 1  # the healthy one; the damaged one stops nothing
    (d,) = q.damaged()
    assert d.id == bad and DAMAGES[kind][1] in d.reason
    assert corrupt_files(q, bad) == kept_files(kind, bad)
    assert not (q.env_dir / f"{bad}.json").exists() and not (q.msg_dir / bad).exists()
    lines = [r for r in caplog.records if bad in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.ERROR
    assert DAMAGES[kind][1] in lines[0].getMessage()
    q.list()  # read again: nothing more to set aside, no second line
    assert len([r for r in caplog.records if bad in r.getMessage()]) == 1

    # A restart (a new Queue on the same directory) still has it, and only it, damaged.
    again = Queue(q.root)
    again.recover()
    assert [d.id for d in again.damaged()] == [bad]
    assert [e.id for e in again.list()] == [good]
    with pytest.raises(DamagedEntry, match="damaged"):
        again.get(bad)
    with pytest.raises(DamagedEntry):
        again.retry(bad)
    again.delete(bad)
    assert again.damaged() == [] and corrupt_files(again, bad) == set()
    assert [e.id for e in again.list()] == [good]


def test_what_a_truncated_state_still_says_is_read_for_the_operator(tmp_path: Path) -> None:
    q, bad, _ = _damaged_beside_healthy(tmp_path / "q", "truncated")
    q.list()
    (d,) = q.damaged()
    assert d.sender == "a@example.test" and d.recipients == ["lost@r.test"]
    assert d.message_path == q.corrupt_dir / bad and d.size == len(MSG)


def test_setting_aside_is_durable(tmp_path: Path, fsynced: list[Path]) -> None:
    q, *_ = _damaged_beside_healthy(tmp_path / "q", "missing key")
    fsynced.clear()
    q.list()
    assert {q.corrupt_dir, q.msg_dir, q.env_dir} <= set(fsynced)


def test_a_set_aside_cut_short_by_a_crash_finishes_at_the_next_read(tmp_path: Path) -> None:
    """The message goes first: a crash before the state follows leaves a state without
    its message, which is set aside too, with the state's own reason kept."""
    q, bad, good = _damaged_beside_healthy(tmp_path / "q", "missing key")
    os.rename(q.msg_dir / bad, q.corrupt_dir / bad)  # killed right after the first rename
    assert [e.id for e in Queue(q.root).list()] == [good]
    (d,) = q.damaged()
    assert "field recipients is missing" in d.reason
    assert corrupt_files(q, bad) == {bad, f"{bad}.json"}


@pytest.mark.parametrize(("change", "why"), [
    ({"created": "yesterday"}, "field created is not a time"),
    ({"created": True}, "field created is not a time"),
    ({"size": -1}, "field size is not a whole number"),
    ({"submitted_by": 7}, "field submitted_by is not a string or null"),
    ({"forwards": {"x@r.test": None}}, "field forwards is not an object of strings"),
    ({"extra": {"dsns": "two"}}, "field extra is not a whole number"),
    ({"id": "0000000000OTHER"}, "not the file's name"),
    ({"recipients": []}, "field recipients is not a non-empty list"),
    ({"recipients": ["x@r.test"]}, "field recipients is not a list of objects"),
    ({"recipients": [{"state": "pending"}]}, "field recipients[0].address is missing"),
    ({"recipients": [{"address": "x@r.test", "state": "sent"}]},
     "field recipients[0].state is not one of"),
    ({"recipients": [{"address": "x@r.test", "attempts": 1.5}]},
     "field recipients[0].attempts is not a whole number"),
])
def test_the_schema_checks_every_field(tmp_path: Path, change: dict[str, object],
                                       why: str) -> None:
    q = Queue(tmp_path / "q")
    ident = q.enqueue_bytes(MSG, "a@example.test", ["x@r.test"], None)
    d = json.loads((q.env_dir / f"{ident}.json").read_bytes())
    d.update(change)
    (q.env_dir / f"{ident}.json").write_text(json.dumps(d))
    assert q.list() == []
    (found,) = q.damaged()
    assert why in found.reason


def test_nan_is_not_a_time_and_unknown_keys_are_ignored(tmp_path: Path) -> None:
    q = Queue(tmp_path / "q")
    ident = q.enqueue_bytes(MSG, "a@example.test", ["x@r.test"], None)
    path = q.env_dir / f"{ident}.json"
    d = json.loads(path.read_bytes())
    d["from_a_newer_version"] = {"anything": [1]}
    path.write_text(json.dumps(d))
    assert [e.id for e in q.list()] == [ident]
    path.write_text(json.dumps(d).replace(f'"created":{d["created"]}', '"created":NaN')
                    .replace(f'"created": {d["created"]}', '"created": NaN'))
    assert q.list() == []
    assert "NaN is not a number" in q.damaged()[0].reason


def test_the_schema_names_every_field_of_an_entry() -> None:
    """A field added to Entry or Recipient must be added to the schema too."""
    assert set(store.ENTRY_SCHEMA) == {f.name for f in dataclasses.fields(store.Entry)}
    assert set(store.RECIPIENT_SCHEMA) == {f.name for f in dataclasses.fields(store.Recipient)}


def test_an_unreadable_entry_is_reported_once_and_left_in_place(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    q = Queue(tmp_path / "q")
    ok = q.enqueue_bytes(b"Subject: a\r\n\r\nx\r\n", "a@example.org", ["b@example.net"], None)
    bad = ok[:-1] + ("0" if ok[-1] != "0" else "1")
    (q.env_dir / f"{bad}.json").mkdir()  # reading it fails with an OSError, as EIO would
    caplog.set_level(logging.ERROR, logger="mailfort.queue")
    assert [e.id for e in q.list()] == [ok]
    assert [e.id for e in q.list()] == [ok]
    said = [r.getMessage() for r in caplog.records if bad in r.getMessage()]
    assert len(said) == 1 and "cannot be read" in said[0]
    assert (q.env_dir / f"{bad}.json").is_dir()  # not set aside as damaged
    with pytest.raises(store.UnreadableEntry):
        q.get(bad)
