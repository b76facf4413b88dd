"""The POP3 view of a Maildir: snapshot, UIDs, sizes, locking, deletion, streaming."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailfort.store import pop3_mailbox
from mailfort.store.pop3_mailbox import (
    CHUNK,
    FLAG_BATCH,
    LOCK_NAME,
    MailboxClosed,
    MailboxInUse,
    POP3Mailbox,
    uid_for,
)
from tests.fuzzing import examples


def deliver(maildir: Path, name: str, data: bytes, sub: str = "new") -> Path:
    for d in ("tmp", "new", "cur"):
        (maildir / d).mkdir(parents=True, exist_ok=True)
    path = maildir / sub / name
    path.write_bytes(data)
    return path


def retr(box: POP3Mailbox, i: int, top: int | None = None) -> bytes:
    reader = box.reader(i, top)
    out = []
    while not reader.done:
        out.append(reader.read())
    return b"".join(out)


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    md = tmp_path / "mail" / "example.test" / "alice"
    deliver(md, "1700000001.M1P1Q1.host", b"Subject: one\r\n\r\nbody one\r\n")
    deliver(md, "1700000002.M1P1Q2.host", b"Subject: two\n\n.dot line\nlf only\n")
    deliver(md, "1700000000.M1P1Q0.host:2,S", b"Subject: old\r\n\r\nseen\r\n", sub="cur")
    return md


def test_snapshot_orders_by_time_and_close_moves_new_to_cur(maildir: Path) -> None:
    box = POP3Mailbox.open(maildir)
    try:
        assert [m.uid for m in box.messages] == [
            "1700000000.M1P1Q0.host", "1700000001.M1P1Q1.host", "1700000002.M1P1Q2.host"]
        assert len(os.listdir(maildir / "new")) == 2  # a login renames nothing
        box.retrieved(1)  # RETR of "one" went out whole: seen
    finally:
        box.close()
    assert os.listdir(maildir / "new") == []
    assert sorted(os.listdir(maildir / "cur")) == [
        "1700000000.M1P1Q0.host:2,S", "1700000001.M1P1Q1.host:2,S",
        "1700000002.M1P1Q2.host:2,"]


def test_snapshot_orders_within_a_second_by_the_microseconds(tmp_path: Path) -> None:
    """Unique names carry the microseconds unpadded: compared as text, the later M120456
    would come before M95123 (two messages received in the same second)."""
    md = tmp_path / "md"
    deliver(md, "1700000005.M120456P7Q2.host", b"Subject: later\r\n\r\n")
    deliver(md, "1700000005.M95123P7Q1.host", b"Subject: earlier\r\n\r\n")
    deliver(md, "1700000005.M9P7Q0.host", b"Subject: first\r\n\r\n")
    deliver(md, "1700000004.M999999P7Q9.host", b"Subject: the second before\r\n\r\n")
    box = POP3Mailbox.open(md)
    try:
        assert [m.uid for m in box.messages] == [
            "1700000004.M999999P7Q9.host", "1700000005.M9P7Q0.host",
            "1700000005.M95123P7Q1.host", "1700000005.M120456P7Q2.host"]
    finally:
        box.close()


def test_sizes_from_maildir_plus_plus_names(tmp_path: Path) -> None:
    md = tmp_path / "md"
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir(parents=True)
    (md / "new" / "1700000000.M1P1Q0.host,S=10,W=12").write_bytes(b"a\nb\nc\nd\ne\n")
    box = POP3Mailbox.open(md)
    try:
        assert box.listing == [("1700000000.M1P1Q0.host,S=10,W=12", 12)]
    finally:
        box.close()


def test_sizes_are_crlf_octets_and_match_what_is_sent(maildir: Path) -> None:
    box = POP3Mailbox.open(maildir)
    try:
        lf = box.messages[2]
        assert lf.size == len(b"Subject: two\r\n\r\n.dot line\r\nlf only\r\n")
        for i, m in enumerate(box.messages):
            wire = retr(box, i)
            assert wire.endswith(b"\r\n.\r\n")
            unstuffed = wire[:-3].replace(b"\r\n..", b"\r\n.")
            assert len(unstuffed) == m.size
        assert b"\r\n..dot line\r\n" in retr(box, 2)
    finally:
        box.close()


def test_uids_stable_across_sessions_and_flags(maildir: Path) -> None:
    box = POP3Mailbox.open(maildir)
    first = box.listing
    retr(box, 1)
    box.retrieved(1)  # RETR: seen
    retr(box, 2, top=0)  # TOP: not seen
    box.close()
    names = sorted(os.listdir(maildir / "cur"))
    assert "1700000001.M1P1Q1.host:2,S" in names
    assert "1700000002.M1P1Q2.host:2," in names
    box = POP3Mailbox.open(maildir)
    try:
        assert box.listing == first
    finally:
        box.close()


def test_a_second_login_parses_no_name_again(maildir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 29: a login of a mailbox of thousands spent a third of its snapshot parsing
    names (time, UIDL, ",W=" size) that the previous login had already parsed; a name's
    parse depends on its unique part alone, which keeps across the S flag's rename."""
    deliver(maildir, "1700000003.M5P1Q3.host,S=30,W=31", b"Subject: w\n\nsized by name\n")
    box = POP3Mailbox.open(maildir)
    first = [(m.uid, m.size) for m in box.messages]
    for i in range(len(box.messages)):
        box.retrieved(i)
    box.close()  # new/ -> cur/ with :2,S: the names change after ":" only

    def parsed_again(unique: str) -> tuple[int, int]:
        raise AssertionError(f"{unique} parsed again")

    monkeypatch.setattr(pop3_mailbox, "_delivery_time", parsed_again)
    box = POP3Mailbox.open(maildir)
    try:
        assert [(m.uid, m.size) for m in box.messages] == first
        assert first[-1] == ("1700000003.M5P1Q3.host,S=30,W=31", 31)
        assert all(m.in_cur and m.marked for m in box.messages)
    finally:
        box.close()


def test_the_parse_memory_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pop3_mailbox, "PARSED_MAX", 3)
    pop3_mailbox._PARSED.clear()
    md = tmp_path / "alice"
    for i in range(5):
        deliver(md, f"17000000{i:02d}.M1P1Q{i}.host", b"x\n")
    box = POP3Mailbox.open(md)
    try:
        assert len(box.messages) == 5
        assert len(pop3_mailbox._PARSED) <= 3
    finally:
        box.close()


def test_uid_for_unfit_names_is_a_stable_digest() -> None:
    assert uid_for("123.abc:2,S") == "123.abc"
    long = "x" * 100
    assert uid_for(long) == uid_for(long + ":2,S")
    assert len(uid_for(long)) <= 70
    assert uid_for("caf\xe9") != "caf\xe9" and uid_for("caf\xe9").isascii()


def test_mail_arriving_during_session_waits_for_the_next(maildir: Path) -> None:
    box = POP3Mailbox.open(maildir)
    deliver(maildir, "1700000003.M1P1Q3.host", b"Subject: late\r\n\r\n")
    assert len(box.messages) == 3
    box.close()
    box = POP3Mailbox.open(maildir)
    try:
        assert len(box.messages) == 4
    finally:
        box.close()


def test_close_without_update_deletes_nothing_and_delete_removes(maildir: Path) -> None:
    box = POP3Mailbox.open(maildir)
    box.close()
    assert len(os.listdir(maildir / "cur")) == 3
    box = POP3Mailbox.open(maildir)
    doomed = box.messages[0].uid
    assert box.delete([0]) == 0
    box.close()
    assert len(os.listdir(maildir / "cur")) == 2
    assert not any(n.startswith(doomed) for n in os.listdir(maildir / "cur"))


def test_second_open_in_process_is_in_use_until_close(maildir: Path) -> None:
    box = POP3Mailbox.open(maildir)
    with pytest.raises(MailboxInUse):
        POP3Mailbox.open(maildir)
    box.close()
    box.close()  # idempotent
    POP3Mailbox.open(maildir).close()


def test_lock_is_shared_with_other_processes(maildir: Path) -> None:
    (maildir / LOCK_NAME).touch()
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(maildir / LOCK_NAME)!r}, os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(MailboxInUse):
            POP3Mailbox.open(maildir)
    finally:
        proc.communicate("")
    POP3Mailbox.open(maildir).close()  # released with the other process


def test_missing_maildir_is_created_empty(tmp_path: Path) -> None:
    box = POP3Mailbox.open(tmp_path / "nobody")
    try:
        assert box.messages == []
        assert (tmp_path / "nobody" / "cur").is_dir()
    finally:
        box.close()


def test_large_message_streams_in_bounded_memory(tmp_path: Path) -> None:
    md = tmp_path / "big"
    for d in ("tmp", "new", "cur"):
        (md / d).mkdir(parents=True)
    line = b"." + b"x" * 997 + b"\n"  # LF on disk and a dot to stuff on every line
    with open(md / "new" / "1700000000.M1P1Q1.host", "wb") as f:
        for _ in range(50 * 1024):  # 50 MB
            f.write(line)
    tracemalloc.start()
    try:
        box = POP3Mailbox.open(md)
        reader = box.reader(0, None)
        total = 0
        while not reader.done:
            total += len(reader.read())
        box.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert box.messages[0].size == 50 * 1024 * (len(line) + 1)
    assert total == box.messages[0].size + 50 * 1024 + 3  # one stuffed dot a line, ".\r\n"
    assert peak < 2 * 1024 * 1024


def many(tmp_path: Path, count: int) -> Path:
    md = tmp_path / "many"
    for i in range(count):
        deliver(md, f"{1700000000 + i}.M{i}P1.host,S=9,W=10", b"Subject:\n")
    return md


def test_retrieved_messages_get_s_in_the_background_during_the_session(
        tmp_path: Path) -> None:
    md = many(tmp_path, FLAG_BATCH + 3)
    box = POP3Mailbox.open(md)
    try:
        for i in range(FLAG_BATCH):
            assert box.read_whole(i, None) == b"Subject:\r\n.\r\n"
            box.retrieved(i)
        box._flags_settled()  # what QUIT does before deleting: wait for the batch
        cur = os.listdir(md / "cur")
        assert len(cur) == FLAG_BATCH and all(n.endswith(":2,S") for n in cur)
        # A message renamed under the session is still read, by its new name.
        assert box.read_whole(0, None) == b"Subject:\r\n.\r\n"
        assert box.delete([1]) == 0
    finally:
        box.close()
    names = sorted(os.listdir(md / "cur"))
    assert os.listdir(md / "new") == [] and len(names) == FLAG_BATCH + 2
    assert sum(n.endswith(":2,S") for n in names) == FLAG_BATCH - 1  # one deleted
    assert sum(n.endswith(":2,") for n in names) == 3  # never retrieved: moved, no S


def test_a_filed_mailbox_is_not_renamed_again(tmp_path: Path) -> None:
    md = many(tmp_path, 5)
    box = POP3Mailbox.open(md)
    for i in range(5):
        box.retrieved(i)
    box.close()
    before = {n: os.stat(md / "cur" / n).st_ctime_ns for n in os.listdir(md / "cur")}
    box = POP3Mailbox.open(md)
    assert all(not m.to_file for m in box.messages)
    for i in range(5):
        box.retrieved(i)
    assert not box._to_flag  # nothing queued: all had S
    box.close()
    after = {n: os.stat(md / "cur" / n).st_ctime_ns for n in os.listdir(md / "cur")}
    assert after == before  # a rename would have changed the ctime


def test_read_whole_refuses_a_file_bigger_than_its_name_says(tmp_path: Path) -> None:
    md = tmp_path / "liar"
    deliver(md, "1700000000.M1P1.host,S=10,W=12", b"x" * (CHUNK + 10))
    box = POP3Mailbox.open(md)
    try:
        assert box.messages[0].size == 12
        assert box.read_whole(0, None) is None  # the caller streams it instead
        assert len(retr(box, 0)) > CHUNK
    finally:
        box.close()


def test_foreign_info_is_left_alone(tmp_path: Path) -> None:
    md = tmp_path / "foreign"
    deliver(md, "1700000000.M1P1.host:1,experimental", b"a\n", sub="cur")
    box = POP3Mailbox.open(md)
    box.retrieved(0)
    box.close()
    assert os.listdir(md / "cur") == ["1700000000.M1P1.host:1,experimental"]


_NAME_CHARS = st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",))


@settings(max_examples=examples(60), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.text(_NAME_CHARS, min_size=1, max_size=90),
                          st.sampled_from(["new", "cur"]), st.binary(max_size=40)),
                max_size=12))
def test_arbitrary_names_properties(tmp_path_factory: pytest.TempPathFactory,
                                    files: list[tuple[str, str, bytes]]) -> None:
    """Whatever another program put in new/ and cur/ (any names, the same unique name
    twice): the snapshot does not fail, every UID is a valid RFC 1939 unique-id and appears
    once, sizes match what RETR sends, no file is ever lost or overwritten, and every
    message retrieved ends in cur/ with S unless a file of the same unique name is there."""
    md = tmp_path_factory.mktemp("arbitrary")
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir()
    for i, (name, sub, data) in enumerate(files):
        if name.startswith(".") or len(name.encode()) > 200:
            continue
        (md / sub / name).write_bytes(data + b"#%d" % i)  # every file tells itself apart

    def contents() -> list[bytes]:
        return sorted((md / sub / n).read_bytes() for sub in ("new", "cur")
                      for n in os.listdir(md / sub))

    before = contents()
    box = POP3Mailbox.open(md)
    try:
        uids = [m.uid for m in box.messages]
        assert len(set(uids)) == len(uids)
        assert all(1 <= len(u) <= 70 and u.isascii() and u.isprintable() and " " not in u
                   for u in uids)
        for i, m in enumerate(box.messages):
            wire = retr(box, i)
            if ",W=" not in m.path.rpartition("/")[2]:  # a name may claim any size
                unstuffed = (b"\r\n" + wire[:-3]).replace(b"\r\n..", b"\r\n.")[2:]
                assert len(unstuffed) == m.size
            box.retrieved(i)
    finally:
        box.close()
    assert contents() == before
    cur = os.listdir(md / "cur")
    for n in os.listdir(md / "new"):  # left in new/: a foreign info, or a namesake in cur/
        unique, sep, info = n.partition(":")
        assert (sep and not info.startswith("2,")) or any(
            c.partition(":")[0] == unique for c in cur)
    for m in box.messages:  # each one retrieved: S, wherever its name says "2,"
        folder, _, name = m.path.rpartition("/")
        assert os.path.exists(m.path)
        info = name.partition(":")[2]
        if folder.endswith("/cur") and info.startswith("2,"):
            assert "S" in info[2:]


def test_a_namesake_in_cur_is_never_overwritten(tmp_path: Path) -> None:
    """Two files with one unique name (another program's doing): filing the one shown
    must not replace the other, which os.rename would do silently."""
    md = tmp_path / "twins"
    deliver(md, "1700000000.M1P1.host", b"Subject: in new\r\n\r\n")
    deliver(md, "1700000000.M1P1.host:2,S", b"Subject: in cur\r\n\r\n", sub="cur")
    box = POP3Mailbox.open(md)
    assert len(box.messages) == 1
    box.retrieved(0)
    box.close()
    kept = sorted(p.read_bytes() for p in md.glob("*/1700000000.M1P1.host*"))
    assert kept == [b"Subject: in cur\r\n\r\n", b"Subject: in new\r\n\r\n"]


def test_close_waits_for_a_running_delete_and_keeps_the_lock(
        maildir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A close that overlapped the deletions renamed doomed files out of their way and
    unlocked the maildrop before they were gone; it must wait, and a closed box must not
    delete. The deletions are held at their directory fsync to make the overlap certain."""
    syncing, go_on = threading.Event(), threading.Event()
    real_fsync_dir = pop3_mailbox.fsync_dir

    def slow_fsync_dir(path: str) -> None:
        syncing.set()
        assert go_on.wait(10)
        real_fsync_dir(path)

    monkeypatch.setattr(pop3_mailbox, "fsync_dir", slow_fsync_dir)
    box = POP3Mailbox.open(maildir)
    doomed = box.messages[1].uid  # in new/: the close would move it to cur/
    with ThreadPoolExecutor(2) as pool:
        deleting = pool.submit(box.delete, [1])
        assert syncing.wait(10)
        closing = pool.submit(box.close)
        time.sleep(0.2)
        assert not closing.done()  # still deleting: not closed, not unlocked
        with pytest.raises(MailboxInUse):
            POP3Mailbox.open(maildir)
        go_on.set()
        assert deleting.result(10) == 0
        closing.result(10)
    names = os.listdir(maildir / "cur") + os.listdir(maildir / "new")
    assert len(names) == 2 and not any(n.startswith(doomed) for n in names)
    with pytest.raises(MailboxClosed):
        box.delete([0])
    POP3Mailbox.open(maildir).close()  # unlocked at last


def test_a_login_after_announce_close_waits_for_the_close(maildir: Path) -> None:
    """The server answers QUIT before its thread runs ``close``; a login in between was told
    the maildrop is in use. Once the close is announced, that login waits for it instead."""
    box = POP3Mailbox.open(maildir)
    with pytest.raises(MailboxInUse):  # not announced: the box is simply held
        POP3Mailbox.open(maildir)
    box.announce_close()
    with ThreadPoolExecutor(1) as pool:
        opening = pool.submit(POP3Mailbox.open, maildir)
        time.sleep(0.2)
        assert not opening.done()  # waiting for the announced close, not refused
        box.close()
        second = opening.result(10)
    assert len(second.messages) == len(box.messages)
    second.close()
    box.close()  # a second close of a closed box is harmless
    POP3Mailbox.open(maildir).close()


def test_a_message_swapped_for_a_symlink_is_not_served(maildir: Path, tmp_path: Path) -> None:
    """Whoever can write in the Maildir swaps a listed message for a link to a file the
    service user can read: RETR must not send that file (ELOOP: the message is gone)."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"Subject: secret\r\n\r\nroot's eyes only\r\n")
    box = POP3Mailbox.open(maildir)
    try:
        path = Path(box.messages[1].path)
        path.unlink()
        path.symlink_to(secret)
        with pytest.raises(OSError):
            retr(box, 1)
        with pytest.raises(OSError):
            box.read_whole(1, None)
    finally:
        box.close()
    assert secret.read_bytes().startswith(b"Subject: secret")
