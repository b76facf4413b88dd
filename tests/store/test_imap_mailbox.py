"""The IMAP view of a Maildir: UIDs that are never reused (reopen, delete, crash, two
processes), flags in file names that POP3 sees, MODSEQ, copy/move, mailbox names."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mailfort.store import mutf7, uidmap
from mailfort.store.imap_mailbox import (
    INBOX,
    BadName,
    MailboxBusy,
    MailboxExists,
    MailStore,
    NoSuchMailbox,
    ScanResult,
)
from mailfort.store.maildir import Committer, maildir_for
from mailfort.store.pop3_mailbox import POP3Mailbox
from mailfort.store.uidmap import LOG_NAME, UidLog
from tests.store.fsyncs import fsynced

__all__ = ["fsynced"]  # a fixture

MSG = b"Subject: hi\r\n\r\nbody\r\n"


def deliver(root: Path, name: str, data: bytes = MSG, sub: str = "new") -> Path:
    """What MX delivery leaves: a complete file in new/ (``<time>.M<us>...``)."""
    for d in ("tmp", "new", "cur"):
        (root / d).mkdir(parents=True, exist_ok=True)
    path = root / sub / name
    path.write_bytes(data)
    return path


def uids_of(store: MailStore, name: str = INBOX) -> list[int]:
    return [m.uid for m in store.mailbox(name).messages()]


def replay(directory: Path) -> uidmap.MapState:
    log = UidLog(directory)
    assert log.refresh()
    return log.state


# -- scan, flags, POP3 coherence ------------------------------------------------------------


def test_scan_numbers_by_delivery_time_then_name_and_renames_nothing(tmp_path: Path) -> None:
    """Numbered in delivery order; left in new/ (no rename per new message at a SELECT:
    the first flag change moves a message to cur/, in the rename that records its flags)."""
    deliver(tmp_path, "1700000002.M5P1Q1.h")
    deliver(tmp_path, "1700000001.M900000P1Q2.h")
    deliver(tmp_path, "1700000001.M95000P1Q3.h")  # M95000 < M900000 as numbers
    for i, path in enumerate(sorted((tmp_path / "new").iterdir())):
        os.utime(path, (1600000000 + i, 1600000000 + i))  # INTERNALDATE: mtime, as Dovecot
    box = MailStore(tmp_path).mailbox(INBOX)
    result = box.scan()
    assert result.added == [1, 2, 3]
    paths = [Path(m.path).name for m in box.messages()]
    assert paths == ["1700000001.M95000P1Q3.h", "1700000001.M900000P1Q2.h",
                     "1700000002.M5P1Q1.h"]
    assert os.listdir(tmp_path / "cur") == []
    box.store([2], add=["\\Seen"])
    assert os.listdir(tmp_path / "cur") == ["1700000001.M900000P1Q2.h:2,S"]
    assert sorted(os.listdir(tmp_path / "new")) == ["1700000001.M95000P1Q3.h",
                                                    "1700000002.M5P1Q1.h"]
    assert MailStore(tmp_path).mailbox(INBOX).messages()[1].flags == frozenset({"\\Seen"})
    assert [m.internal_date for m in box.messages()] == [1600000001, 1600000000, 1600000002]
    assert all(m.size == len(MSG) for m in box.messages())
    assert box.scan().added == []  # stable


def _count_listings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The directories ``os.listdir`` is asked for from now on."""
    seen: list[str] = []
    real = os.listdir

    def listdir(path: str) -> list[str]:
        seen.append(os.path.basename(str(path)))
        return real(path)

    monkeypatch.setattr(os, "listdir", listdir)
    return seen


def test_listing_reused_only_when_made_well_after_the_last_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """new/ and cur/ are listed again at every scan until a listing was made at least two
    whole seconds after the directory changed (a coarse mtime may not move for a change in
    the same second); after that an unchanged directory is not listed, a changed one is."""
    deliver(tmp_path, "1700000001.M1P1Q1.h")
    box = MailStore(tmp_path).mailbox(INBOX)
    assert box.scan().added == [1]
    listed = _count_listings(monkeypatch)
    assert box.scan().added == [] and sorted(listed) == ["cur", "new"]  # same second: again
    listed.clear()
    from mailfort.store import listing
    later = time.time() + 3
    monkeypatch.setattr(listing, "_wall", lambda: later)
    assert box.scan().added == [] and sorted(listed) == ["cur", "new"]  # made 3 s after
    listed.clear()
    assert box.scan().added == [] and listed == []  # unchanged since: not listed
    deliver(tmp_path, "1700000002.M1P1Q1.h")  # new/ changes: its mtime moves
    assert box.scan().added == [2] and "new" in listed
    assert [m.uid for m in box.messages()] == [1, 2]


def test_a_scan_since_a_wake_up_is_shared_and_never_older_than_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``scan(since)``: a scan of the same object that began at or after ``since`` answers
    without a look at the disk (the sessions woken by one delivery share it), and without
    what it added (\\Recent goes to one session); a ``since`` after the last scan began, or
    none, looks again and sees what arrived meanwhile."""
    deliver(tmp_path, "1700000001.M1P1Q1.h")
    box = MailStore(tmp_path).mailbox(INBOX)
    woken = time.monotonic()  # the wake-up, after the delivery
    first = box.scan(woken)
    assert first.added == [1] and box.scans == 1
    listed = _count_listings(monkeypatch)
    again = box.scan(woken)  # a second session woken by the same change
    assert listed == [] and box.scans == 1
    assert again.added == [] and again.highestmodseq == first.highestmodseq
    deliver(tmp_path, "1700000002.M1P1Q1.h")
    later = time.monotonic()  # woken by the second delivery: the shared scan is too old
    got = box.scan(later)
    assert got.added == [2] and box.scans == 2 and "new" in listed
    assert box.scan().added == [] and box.scans == 3  # no ``since`` (NOOP): always looks
    assert [m.uid for m in box.messages()] == [1, 2]


def test_a_change_right_after_a_scan_is_seen_with_the_same_mtime(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same-second case itself: a file renamed into cur/ after a scan, the directory's
    timestamps put back as a coarse clock would have left them (mtime; ctime moves with
    utime, so the stamp differs in ctime only if the clock ticked): still seen, because a
    listing made in the second of the change is never reused."""
    from mailfort.store import listing
    deliver(tmp_path, "1700000001.M1P1Q1.h", sub="cur")
    box = MailStore(tmp_path).mailbox(INBOX)
    assert box.scan().added == [1]
    cur = tmp_path / "cur"
    before = os.stat(cur)
    deliver(tmp_path, "1700000002.M1P1Q1.h:2,S", sub="cur")
    os.utime(cur, ns=(before.st_atime_ns, before.st_mtime_ns))
    # the stamp a coarse clock would give: mtime and ctime as at the scan
    real_stat = os.stat

    def coarse_stat(path: object, *a: object, **k: object) -> os.stat_result:
        st = real_stat(path, *a, **k)  # type: ignore[arg-type]
        if str(path) == str(cur):
            f = list(st)
            return os.stat_result(f, {"st_mtime_ns": before.st_mtime_ns,
                                      "st_ctime_ns": before.st_ctime_ns})
        return st

    monkeypatch.setattr(listing.os, "stat", coarse_stat)
    assert box.scan().added == [2]
    assert "\\Seen" in box.messages()[1].flags


def test_flags_round_trip_through_names_and_pop3_sees_them(tmp_path: Path) -> None:
    deliver(tmp_path, "1700000001.M1P1Q1.h")
    deliver(tmp_path, "1700000002.M1P1Q2.h")
    store = MailStore(tmp_path)
    box = store.mailbox(INBOX)
    box.scan()
    before = box.status()["HIGHESTMODSEQ"]
    res = box.store([1], add=["\\Seen", "\\Answered", "\\Flagged", "$Forwarded", "Work"])
    assert res.changed[1][1] > before
    assert sorted(os.listdir(tmp_path / "cur"))[0] == "1700000001.M1P1Q1.h:2,FPRS"
    # a fresh store (another process) reads the same flags back from name and map
    again = MailStore(tmp_path).mailbox(INBOX).messages()[0]
    assert again.flags == {"\\Seen", "\\Answered", "\\Flagged", "$Forwarded", "Work"}
    box.store([1], remove=["\\Answered", "work"])
    assert MailStore(tmp_path).mailbox(INBOX).messages()[0].flags == {
        "\\Seen", "\\Flagged", "$Forwarded"}
    pop = POP3Mailbox.open(tmp_path)
    try:
        assert [m.uid for m in pop.messages] == ["1700000001.M1P1Q1.h", "1700000002.M1P1Q2.h"]
        assert pop.messages[0].marked and not pop.messages[1].marked  # S seen by POP3
        pop.retrieved(1)
        assert pop.delete([0]) == 0
    finally:
        pop.close()
    result = box.scan()  # POP3's DELE is an expunge, its S a flag change
    assert result.expunged == [1] and result.changed == [2]
    assert [(m.uid, m.flags) for m in box.messages()] == [(2, frozenset({"\\Seen"}))]
    assert box.expunged_since(before) == [1]


def test_mail_delivered_by_the_committer_appears_in_inbox_and_junk(tmp_path: Path) -> None:
    committer = Committer(tmp_path)
    root = maildir_for(tmp_path / "mail", "alice@example.org")

    async def deliver_two() -> None:
        for target in (root, root / ".Junk"):  # the MX files DMARC quarantine in .Junk
            spool = committer.new_spool()
            spool.write(MSG)
            await committer.commit(spool, [target])

    try:
        asyncio.run(deliver_two())
    finally:
        committer.stop()
    store = MailStore(root)
    assert store.names() == [INBOX, "Junk"]
    for name in (INBOX, "Junk"):
        box = store.mailbox(name)
        assert box.scan().added == [1]
        (m,) = box.messages()
        assert m.size == len(MSG) and Path(m.path).read_bytes() == MSG


def test_create_finishes_a_folder_left_half_made(tmp_path: Path) -> None:
    store = MailStore(tmp_path)
    store.mailbox(INBOX)
    (tmp_path / ".Half").mkdir()  # a CREATE killed after its first mkdir
    with pytest.raises(NoSuchMailbox):
        store.mailbox("Half")
    store.create("Half").append(MSG)
    assert uids_of(store, "Half") == [1]


def test_odd_file_names_survive_the_map(tmp_path: Path) -> None:
    odd = ["1700000001.a b,c%d", "-", "1700000002.caf\udce9", "1700000003.x:2,S é-"]
    for name in odd:
        deliver(tmp_path, name, sub="cur" if ":" in name else "new")
    assert MailStore(tmp_path).mailbox(INBOX).scan().added == [1, 2, 3, 4]
    again = MailStore(tmp_path).mailbox(INBOX).messages()
    assert sorted(Path(m.path).name.partition(":")[0] for m in again) == sorted(
        n.partition(":")[0] for n in odd)
    assert [m.flags for m in again if "x" in m.path] == [{"\\Seen"}]
    assert replay(tmp_path).entries[4].letters == " -Sé"


def test_replace_keeps_unknown_letters_and_refuses_bad_flags(tmp_path: Path) -> None:
    deliver(tmp_path, "1700000001.M1P1Q1.h:2,Sa", sub="cur")  # 'a': another tool's keyword
    box = MailStore(tmp_path).mailbox(INBOX)
    box.scan()
    box.store([1], replace=["\\Draft"])
    assert os.listdir(tmp_path / "cur") == ["1700000001.M1P1Q1.h:2,Da"]
    for bad in ("\\Recent", "\\Bogus", "a b", "x(y", ""):
        with pytest.raises(ValueError):
            box.store([1], add=[bad])


def test_unchanged_since_reports_modified(tmp_path: Path) -> None:
    for i in range(3):
        deliver(tmp_path, f"170000000{i}.M1P1Q{i}.h")
    box = MailStore(tmp_path).mailbox(INBOX)
    box.scan()
    modseq = box.status()["HIGHESTMODSEQ"]
    box.store([2], add=["\\Seen"])
    res = box.store([1, 2, 3], add=["\\Flagged"], unchanged_since=modseq)
    assert res.modified == [2] and sorted(res.changed) == [1, 3]
    assert len({m for _, m in res.changed.values()}) == 1  # one MODSEQ per operation


def test_pop3_session_holds_renames_but_not_uids(tmp_path: Path) -> None:
    deliver(tmp_path, "1700000001.M1P1Q1.h")
    box = MailStore(tmp_path).mailbox(INBOX)
    pop = POP3Mailbox.open(tmp_path)
    try:
        assert box.scan().added == [1]
        assert os.listdir(tmp_path / "new") == ["1700000001.M1P1Q1.h"]  # POP3's snapshot
        with pytest.raises(MailboxBusy):
            box.store([1], add=["\\Seen"])
        box.store([1], add=["Keyword"])  # a keyword renames nothing
    finally:
        pop.close()
    assert box.scan().added == []
    assert os.listdir(tmp_path / "new") == []
    assert box.messages()[0].uid == 1


# -- expunge, append, copy, move -------------------------------------------------------------


def test_expunge_only_deleted_and_uid_expunge(tmp_path: Path) -> None:
    box = MailStore(tmp_path).mailbox(INBOX)
    uids = [box.append(MSG, ["\\Deleted"] if i < 3 else [])[1] for i in range(4)]
    assert uids == [1, 2, 3, 4]
    assert box.expunge([2]) == [2]
    assert box.expunge() == [1, 3]
    assert uids_of(MailStore(tmp_path)) == [4]
    assert len(os.listdir(tmp_path / "cur")) == 1


def test_append_sets_date_flags_and_size(tmp_path: Path) -> None:
    box = MailStore(tmp_path).mailbox(INBOX)
    validity, uid = box.append(b"a\nb\n", ["\\Seen", "Todo"], internal_date=1234567890)
    assert validity == box.status()["UIDVALIDITY"] and uid == 1
    (m,) = box.messages()
    assert m.size == 6 and m.internal_date == 1234567890  # wire size: LF counted as CRLF
    assert m.flags == {"\\Seen", "Todo"}
    assert os.stat(m.path).st_mtime == 1234567890
    assert Path(m.path).name.endswith(":2,S") and os.listdir(tmp_path / "tmp") == []


def test_copy_and_move_give_copyuid_and_keep_metadata(tmp_path: Path) -> None:
    store = MailStore(tmp_path)
    store.ensure_special()
    inbox = store.mailbox(INBOX)
    for i in range(3):
        inbox.append(MSG, ["\\Flagged", "Kw"], internal_date=1000 + i)
    junk = store.mailbox("Junk")
    junk.append(MSG)
    validity, src, dst = inbox.copy_to([3, 1, 99], junk)
    assert (validity, src, dst) == (junk.status()["UIDVALIDITY"], [1, 3], [2, 3])
    copies = {m.uid: m for m in junk.messages()}
    assert copies[2].internal_date == 1000 and copies[3].flags == {"\\Flagged", "Kw"}
    assert os.stat(copies[2].path).st_ino == os.stat(inbox.messages()[0].path).st_ino
    _, src, dst = inbox.move_to([2], store.mailbox("Trash"))
    assert (src, dst) == ([2], [1])
    assert uids_of(store) == [1, 3] and uids_of(store, "Trash") == [1]


# -- UIDVALIDITY and UIDs never reused -------------------------------------------------------


def test_uids_never_reused_after_expunge_and_reopen(tmp_path: Path) -> None:
    box = MailStore(tmp_path).mailbox(INBOX)
    for _ in range(3):
        box.append(MSG, ["\\Deleted"])
    box.expunge()
    validity = box.status()["UIDVALIDITY"]
    box2 = MailStore(tmp_path).mailbox(INBOX)
    assert box2.append(MSG) == (validity, 4)
    assert box2.status()["UIDNEXT"] == 5


def test_delete_and_create_gives_a_new_uidvalidity(tmp_path: Path) -> None:
    store = MailStore(tmp_path)
    seen = {store.mailbox(INBOX).status()["UIDVALIDITY"]}
    for _ in range(3):
        box = store.create("Projects")
        box.append(MSG)
        validity = box.status()["UIDVALIDITY"]
        assert validity not in seen
        seen.add(validity)
        store.delete("Projects")
        with pytest.raises(NoSuchMailbox):
            store.mailbox("Projects")
    assert store.names() == [INBOX]


def test_lost_map_changes_uidvalidity_and_renumbers_openly(tmp_path: Path) -> None:
    box = MailStore(tmp_path).mailbox(INBOX)
    box.append(MSG)
    box.append(MSG)
    old = box.status()["UIDVALIDITY"]
    (tmp_path / LOG_NAME).unlink()
    box2 = MailStore(tmp_path).mailbox(INBOX)
    box2.scan()
    assert box2.status()["UIDVALIDITY"] > old
    assert uids_of(MailStore(tmp_path)) == [1, 2]


def test_another_map_at_the_same_inode_is_read_from_its_start(tmp_path: Path) -> None:
    """A map replaced by another one that got the old file's inode number (deleted, then
    made anew: ext4 reuses numbers) and is at least as long is not read on from the old
    offset: its first record differs, so it is replayed whole."""
    store = MailStore(tmp_path)
    first = store.mailbox(INBOX)
    first.append(MSG)
    other = store.create("Other")
    a, b = first.path, other.path
    for _ in range(3):
        other.append(MSG)
    assert other.status()["UIDVALIDITY"] != first.status()["UIDVALIDITY"]
    replacement = (b / LOG_NAME).read_bytes()
    log = a / LOG_NAME
    assert len(replacement) > log.stat().st_size
    with open(log, "r+b") as f:  # same inode, other map
        f.write(replacement)
    st = first.status()
    assert st["UIDVALIDITY"] == other.status()["UIDVALIDITY"] and st["MESSAGES"] == 3


def test_torn_last_record_is_ignored_then_cut(tmp_path: Path) -> None:
    box = MailStore(tmp_path).mailbox(INBOX)
    box.append(MSG)
    log = tmp_path / LOG_NAME
    good = log.read_bytes()
    torn = uidmap.rec_assign(uidmap.Entry(2, "x", "", (), 9, 1, 1))[:-7]
    log.write_bytes(good + torn)
    box2 = MailStore(tmp_path).mailbox(INBOX)
    assert box2.status()["UIDNEXT"] == 2 and uids_of(MailStore(tmp_path)) == [1]
    assert box2.append(MSG)[1] == 2
    data = log.read_bytes()
    assert data.startswith(good) and torn not in data
    assert replay(tmp_path).uidnext == 3


def test_bad_record_before_good_ones_means_a_lost_map(tmp_path: Path) -> None:
    box = MailStore(tmp_path).mailbox(INBOX)
    for _ in range(3):
        box.append(MSG)
    old = box.status()["UIDVALIDITY"]
    log = tmp_path / LOG_NAME
    lines = log.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b" A 1 ", b" A 7 ")  # checksum no longer matches
    log.write_bytes(b"\n".join(lines))
    fresh = MailStore(tmp_path).mailbox(INBOX)
    fresh.scan()
    assert fresh.status()["UIDVALIDITY"] != old  # not replayed with a hole in it
    assert len(list(tmp_path.glob(f"{LOG_NAME}.damaged-*"))) == 1


def _append_forever(root: str, report: str) -> None:
    box = MailStore(Path(root)).mailbox(INBOX)
    with open(report, "a") as out:
        while True:
            validity, uid = box.append(MSG, ["\\Seen"] if uid_odd(box) else [])
            out.write(f"{validity} {uid}\n")
            out.flush()
            box.store([uid], add=["\\Flagged", "Kw"])


def uid_odd(box: object) -> bool:
    return time.monotonic_ns() % 2 == 1


@pytest.mark.parametrize("delay", [0.05, 0.13, 0.21])
def test_sigkill_during_writes_never_reuses_a_uid(tmp_path: Path, delay: float) -> None:
    report = tmp_path / "acked"
    root = tmp_path / "md"
    ctx = multiprocessing.get_context("fork")
    for round_ in range(3):
        child = ctx.Process(target=_append_forever, args=(str(root), str(report)))
        child.start()
        time.sleep(delay + 0.02 * round_)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        box = MailStore(root).mailbox(INBOX)
        box.scan()
        state = replay(root)
        acked = [tuple(map(int, line.split())) for line in report.read_text().splitlines()]
        assert acked, "the child made no progress"
        assert {v for v, _ in acked} == {state.uidvalidity}  # never a new validity
        acked_uids = [u for _, u in acked]
        assert acked_uids == sorted(set(acked_uids))  # strictly increasing across crashes
        assert set(acked_uids) <= set(state.entries)  # every acknowledged UID is kept
        assert state.uidnext > max(state.entries)
        # every file has exactly one UID and every UID one file
        files = {n.partition(":")[0] for n in os.listdir(root / "cur")}
        assert files == set(state.by_unique)


def test_sigkill_in_the_middle_of_a_record_write(tmp_path: Path) -> None:
    box = MailStore(tmp_path).mailbox(INBOX)
    box.append(MSG)

    def torn_then_die(self: UidLog, records: list[bytes], *_: object) -> None:
        data = b"".join(records)
        with open(self.path, "ab") as f:
            f.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    def child() -> None:
        UidLog.append = torn_then_die  # type: ignore[method-assign]
        MailStore(tmp_path).mailbox(INBOX).append(MSG, ["\\Seen"])

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    again = MailStore(tmp_path).mailbox(INBOX)
    validity = again.status()["UIDVALIDITY"]
    again.scan()  # the file linked before the crash gets a UID now, never seen before
    assert uids_of(MailStore(tmp_path)) == [1, 2]
    assert again.append(MSG) == (validity, 3)
    assert replay(tmp_path).uidnext == 4


def test_compaction_keeps_every_fact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uidmap, "COMPACT_MIN", 10)
    monkeypatch.setattr(uidmap, "MAX_EXPUNGE_GROUPS", 2)
    box = MailStore(tmp_path).mailbox(INBOX)
    for i in range(8):
        box.append(MSG, ["\\Deleted"] if i % 2 else ["Kw"])
    for uid in (2, 4, 6):
        box.expunge([uid])
    before = box.messages()
    modseq = box.status()["HIGHESTMODSEQ"]
    for _ in range(12):  # flag churn: the log grows, then is rewritten
        box.store([1], add=["\\Seen"])
        box.store([1], remove=["\\Seen"])
    header = (tmp_path / LOG_NAME).read_bytes().split(b"\n")[0].split()
    assert header[1] == b"H" and header[3] == b"9"  # compacted: UIDNEXT in the header
    state = replay(tmp_path)
    assert state.uidnext == 9 and state.highestmodseq >= modseq + 24
    assert set(state.expunged) == {2, 4, 6}
    after = MailStore(tmp_path).mailbox(INBOX).messages()
    assert [(m.uid, m.flags, m.size, m.internal_date) for m in after] == [
        (m.uid, m.flags, m.size, m.internal_date) for m in before]
    assert box.expunged_since(0) == [2, 4, 6]
    assert MailStore(tmp_path).mailbox(INBOX).append(MSG)[1] == 9


def test_sigkill_during_compaction_leaves_the_old_log(tmp_path: Path) -> None:
    box = MailStore(tmp_path).mailbox(INBOX)
    for _ in range(3):
        box.append(MSG)
    good = (tmp_path / LOG_NAME).read_bytes()

    def child() -> None:
        uidmap.COMPACT_MIN = -100  # compact at the next append

        def die(*args: object) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        uidmap.os.rename = die  # type: ignore[assignment]  # the forked child only
        MailStore(tmp_path).mailbox(INBOX).store([1, 2], add=["\\Seen"])

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    assert (tmp_path / LOG_NAME).read_bytes() == good
    again = MailStore(tmp_path).mailbox(INBOX)
    result = again.scan()  # the renames that were done are seen as changes
    assert result.changed == [1, 2] and result.added == [] and result.expunged == []
    assert again.append(MSG)[1] == 4
    assert list(tmp_path.glob("*.tmp")) != []
    uidmap.UidLog(tmp_path).create(uidmap.next_uidvalidity(tmp_path))  # any rewrite
    assert list(tmp_path.glob("*.tmp")) == []  # cleans up


def test_a_new_map_is_written_whole_with_its_first_uids(
        tmp_path: Path, fsynced: list[Path]) -> None:
    """A cold SELECT (files in new/, no map) writes the map's header and its UIDs in one
    temporary file: one file fsync and one directory fsync for the map, where a map made
    empty then appended to took two and one more; the UIDVALIDITY record's two stay."""
    for i in range(5):
        deliver(tmp_path, f"{1700000000 + i}.M{i}P1.h,S={len(MSG)},W={len(MSG)}")
    box = MailStore(tmp_path).mailbox(INBOX)
    fsynced.clear()
    assert box.scan().added == [1, 2, 3, 4, 5]
    assert tmp_path / LOG_NAME not in fsynced  # never synced in place: renamed whole
    maps = [p for p in fsynced if p.name.startswith(LOG_NAME)]
    assert len(maps) == 1 and len(fsynced) == 4, fsynced
    assert replay(tmp_path).uidnext == 6
    assert MailStore(tmp_path).mailbox(INBOX).status()["MESSAGES"] == 5
    fsynced.clear()
    store = MailStore(tmp_path)  # a map with nothing to number is still written at once
    store.create("Empty")
    assert (store.mailbox("Empty").path / LOG_NAME).exists()


def test_sigkill_before_a_new_map_is_in_place(tmp_path: Path) -> None:
    """Killed at the rename that puts a cold SELECT's map in place: no map, no UID given
    out; the next scan numbers the files under a newer UIDVALIDITY."""
    for i in range(3):
        deliver(tmp_path, f"{1700000000 + i}.M{i}P1.h,S={len(MSG)},W={len(MSG)}")

    def child() -> None:
        real = os.rename

        def die_at_the_map(src: object, dst: object) -> None:
            if str(dst).endswith(LOG_NAME):
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)  # the UIDVALIDITY record's

        uidmap.os.rename = die_at_the_map  # type: ignore[assignment]  # the forked child only
        MailStore(tmp_path).mailbox(INBOX).scan()

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    assert not (tmp_path / LOG_NAME).exists()
    first = int((tmp_path / uidmap.VALIDITY_NAME).read_text())
    box = MailStore(tmp_path).mailbox(INBOX)
    assert box.scan().added == [1, 2, 3]
    assert box.status()["UIDVALIDITY"] > first
    assert list(tmp_path.glob(f"{LOG_NAME}*.tmp")) == []


def test_move_refused_whole_while_pop3_holds_inbox(tmp_path: Path) -> None:
    store = MailStore(tmp_path)
    store.ensure_special()
    inbox = store.mailbox(INBOX)
    inbox.append(MSG)
    pop = POP3Mailbox.open(tmp_path)
    try:
        with pytest.raises(MailboxBusy):
            inbox.move_to([1], store.mailbox("Archive"))
        assert uids_of(store, "Archive") == []
        os.unlink(inbox.messages()[0].path)  # a file gone while POP3 runs: not yet an
        assert inbox.scan().expunged == []  # expunge (its renames could hide a file)
    finally:
        pop.close()
    assert inbox.scan().expunged == [1]


# -- concurrency -----------------------------------------------------------------------------


def _append_n(root: str, n: int, queue: multiprocessing.Queue[list[int]]) -> None:
    box = MailStore(Path(root)).mailbox(INBOX)
    queue.put([box.append(MSG)[1] for _ in range(n)])


def test_two_processes_appending_get_disjoint_uids(tmp_path: Path) -> None:
    MailStore(tmp_path).mailbox(INBOX).status()
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[list[int]] = ctx.Queue()
    procs = [ctx.Process(target=_append_n, args=(str(tmp_path), 25, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=30) for _ in procs]
    for p in procs:
        p.join()
    assert not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1]) == list(range(1, 51))
    assert uids_of(MailStore(tmp_path)) == list(range(1, 51))


def test_concurrent_flag_changes_are_not_lost(tmp_path: Path) -> None:
    box = MailStore(tmp_path).mailbox(INBOX)
    for _ in range(20):
        box.append(MSG)
    flags = ["\\Seen", "\\Flagged", "\\Answered", "Kw1"]

    def worker(flag: str) -> None:
        mine = MailStore(tmp_path).mailbox(INBOX)  # its own descriptor, as another process
        for uid in range(1, 21):
            mine.store([uid], add=[flag])

    threads = [threading.Thread(target=worker, args=(f,)) for f in flags]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(m.flags == set(flags) for m in MailStore(tmp_path).mailbox(INBOX).messages())


# -- mailbox names ---------------------------------------------------------------------------


def test_names_on_disk_are_modified_utf7_and_rename_moves_children(tmp_path: Path) -> None:
    store = MailStore(tmp_path)
    store.ensure_special()
    store.ensure_special()  # idempotent
    box = store.create("Entwürfe")
    box.append(MSG)
    validity = box.status()["UIDVALIDITY"]
    store.create("Entwürfe.日本")
    assert (tmp_path / ".Entw&APw-rfe").is_dir() and (tmp_path / ".Entw&APw-rfe.&ZeVnLA-").is_dir()
    assert (tmp_path / ".Entw&APw-rfe" / "maildirfolder").exists()
    store.rename("Entwürfe", "Drafts old")
    assert "Drafts old.日本" in store.names() and "Entwürfe" not in store.names()
    moved = store.mailbox("Drafts old")
    assert moved.status()["UIDVALIDITY"] == validity and uids_of(store, "Drafts old") == [1]
    listing = dict(store.list())
    assert listing["Junk"] == {"\\Junk", "\\HasNoChildren"}
    assert "\\HasChildren" in listing["Drafts old"]
    with pytest.raises(MailboxExists):
        store.create("Junk")
    for bad in ("a..b", ".a", "a/b", "a.", "INBOX.x", "a*", "x\x01", " a", "a" * 300):
        with pytest.raises(BadName):
            store.create(bad)
    assert store.mailbox("inbox").name == INBOX


def test_mutf7_round_trip_and_strictness() -> None:
    for name in ["Entwürfe", "a&b", "日本語", "😀 x", "~peter/mail/台北"]:
        assert mutf7.decode(mutf7.encode(name)) == name
    assert mutf7.encode("Entwürfe") == "Entw&APw-rfe"
    for bad in ("&", "&Jjo", "&AGE-", "é"):  # unterminated, unterminated, ASCII in base64
        with pytest.raises(ValueError):
            mutf7.decode(bad)


# -- state machine ---------------------------------------------------------------------------


class MailboxMachine(RuleBasedStateMachine):
    """append / flag / expunge / external delivery and deletion / scan / reopen, with the
    invariants: a UID names one message forever, UIDs grow, the map matches the model."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="imapsm-"))
        self.store = MailStore(self.dir)
        self.box = self.store.mailbox(INBOX)
        self.validity = self.box.status()["UIDVALIDITY"]
        self.model: dict[int, frozenset[str]] = {}  # uid -> flags
        self.ever: dict[int, str] = {}  # uid -> unique name, every UID ever seen
        self.top = 0
        self.modseq = self.box.status()["HIGHESTMODSEQ"]
        self.delivered = 0
        self.pending = 0  # delivered, not numbered yet
        self.store.create("Archive")
        self.archive: dict[int, frozenset[str]] = {}  # its model
        self.archive_top = 0

    def teardown(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

    def _note(self, uid: int) -> None:
        assert uid > self.top
        self.top = uid

    @rule(flags=st.sets(st.sampled_from(["\\Seen", "\\Deleted", "\\Flagged", "Kw"])))
    def append(self, flags: set[str]) -> None:
        validity, uid = self.box.append(MSG, flags)
        assert validity == self.validity
        assert uid == self.top + self.pending + 1  # delivered mail is numbered first
        for earlier in range(self.top + 1, uid):
            self.model[earlier] = frozenset()
        self.pending = 0
        self._note(uid)
        self.model[uid] = frozenset(flags)

    @rule()
    def deliver(self) -> None:
        self.delivered += 1
        self.pending += 1
        deliver(self.dir, f"1700000000.M{self.delivered}P1Q{self.delivered}.h")

    @rule()
    def scan(self) -> None:
        self._apply(self.box.scan())

    def _apply(self, result: ScanResult) -> None:
        assert len(result.added) == self.pending
        self.pending = 0
        for uid in result.added:
            self._note(uid)
            self.model[uid] = frozenset()
        for uid in result.expunged:
            self.model.pop(uid)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), add=st.booleans(),
          flag=st.sampled_from(["\\Seen", "\\Deleted", "\\Answered", "Kw", "Other"]))
    def flag(self, data: st.DataObject, add: bool, flag: str) -> None:
        uid = data.draw(st.sampled_from(sorted(self.model)))
        if add:
            self.box.store([uid], add=[flag])
            self.model[uid] = self.model[uid] | {flag}
        else:
            self.box.store([uid], remove=[flag])
            self.model[uid] = self.model[uid] - {flag}

    @rule()
    def expunge(self) -> None:
        gone = self.box.expunge()
        assert gone == sorted(u for u, f in self.model.items() if "\\Deleted" in f)
        for uid in gone:
            del self.model[uid]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def external_delete(self, data: st.DataObject) -> None:
        uid = data.draw(st.sampled_from(sorted(self.model)))
        (m,) = [m for m in self.box.messages() if m.uid == uid]
        os.unlink(m.path)  # what POP3's DELE does
        result = self.box.scan()
        assert result.expunged == [uid]
        self._apply(result)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), move=st.booleans())
    def copy_or_move(self, data: st.DataObject, move: bool) -> None:
        uids = data.draw(st.sets(st.sampled_from(sorted(self.model)), min_size=1))
        target = self.store.mailbox("Archive")
        do = self.box.move_to if move else self.box.copy_to
        _, src, dst = do(uids, target)
        assert src == sorted(uids) and dst == sorted(dst) and dst[0] > self.archive_top
        self.archive_top = dst[-1]
        for s_uid, d_uid in zip(src, dst, strict=True):
            self.archive[d_uid] = self.model[s_uid]
            if move:
                del self.model[s_uid]
        assert {m.uid: m.flags for m in target.messages()} == self.archive

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def external_flag(self, data: st.DataObject) -> None:
        uid = data.draw(st.sampled_from(sorted(self.model)))
        self.box.scan()
        self._apply_pending()
        (m,) = [m for m in self.box.messages() if m.uid == uid]
        head, _, letters = m.path.rpartition(":2,")
        if not head:  # still in new/: the tool moves it to cur/ as it flags it
            root, _, name = m.path.rpartition("/new/")
            head, letters = f"{root}/cur/{name}", ""
        new = "".join(sorted(set(letters) ^ {"F"}))
        os.rename(m.path, f"{head}:2,{new}")  # another Maildir tool toggles \Flagged
        before = self.box.status()["HIGHESTMODSEQ"]
        assert self.box.scan().changed == [uid]
        assert self.box.messages()[[x.uid for x in self.box.messages()].index(uid)].modseq > before
        self.model[uid] = self.model[uid] ^ {"\\Flagged"}

    def _apply_pending(self) -> None:
        for earlier in range(self.top + 1, self.top + self.pending + 1):
            self.model[earlier] = frozenset()
            self._note(earlier)
        self.pending = 0

    @rule(cut=st.integers(min_value=1, max_value=60))
    def torn_tail(self, cut: int) -> None:
        """A writer killed mid-record: part of a record that was never acknowledged."""
        rec = uidmap.rec_assign(uidmap.Entry(self.top + 99, "ghost", "S", (), 1, 1, 1))
        with open(self.dir / LOG_NAME, "ab") as f:
            f.write(rec[: min(cut, len(rec) - 1)])

    @rule()
    def reopen(self) -> None:
        self.store = MailStore(self.dir)
        self.box = self.store.mailbox(INBOX)

    @invariant()
    def map_matches_model(self) -> None:
        msgs = self.box.messages()
        assert {m.uid: m.flags for m in msgs} == self.model
        status = self.box.status()
        assert status["UIDVALIDITY"] == self.validity
        assert status["UIDNEXT"] > self.top
        assert status["HIGHESTMODSEQ"] >= self.modseq
        self.modseq = status["HIGHESTMODSEQ"]
        for m in msgs:
            unique = Path(m.path).name.partition(":")[0]
            assert self.ever.setdefault(m.uid, unique) == unique  # a UID names one message


MailboxMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_mailbox_state_machine = MailboxMachine.TestCase


def test_adding_a_keyword_in_another_case_keeps_its_spelling(tmp_path: Path) -> None:
    """Keywords compare case-insensitively: +FLAGS ($work) on $Work changes nothing, so the
    flag list a session announced stays true (it used to become $work, a new MODSEQ)."""
    store = MailStore(tmp_path)
    box = store.mailbox(INBOX)
    _, uid = box.append(MSG, ["$Work"])
    assert box.store([uid], add=["$work"]).changed == {}
    assert box.messages()[0].flags == frozenset({"$Work"})


def test_rfc822_size_is_the_size_of_body_as_sent(tmp_path: Path) -> None:
    """RFC822.SIZE must equal the octets BODY[] sends (imap_message.to_wire): no final CRLF
    added (Dovecot says 10 for "Subject: x"), bare LF counted as CRLF. It used to be the
    POP3 size (+2 for a missing final line end). A name's W= is RFC822.SIZE, so APPEND
    writes none where POP3's size differs (POP3 takes W= for its own)."""
    from mailfort.protocol.imap_message import to_wire

    store = MailStore(tmp_path)
    box = store.mailbox(INBOX)
    box.append(b"Subject: x")
    deliver(tmp_path, "1700000001.M1P1.h", b"Subject: y\n\nlf body")
    deliver(tmp_path, f"1700000002.M1P1.h,S={len(MSG)},W={len(MSG)}", MSG)
    box.append(b"Subject: z\r\n")
    box.scan()
    sizes = [m.size for m in box.messages()]
    assert sizes == [10, len(to_wire(b"Subject: y\n\nlf body")), len(MSG), 12]
    names = sorted(p.name for p in (tmp_path / "cur").iterdir())
    appended = next(n for n in names if ",S=10" in n)
    assert ",W=" not in appended  # POP3 counts it: LIST and RETR still agree
    assert any(",S=12,W=12:" in n for n in names)  # both sizes at once
    trash = store.create("Trash")
    box.copy_to([1, 4], trash)
    assert [m.size for m in trash.messages()] == [10, 12]
    copies = sorted(p.name for p in (trash.path / "cur").iterdir())
    assert sum(",W=" in n for n in copies) == 1 and any(",S=12,W=12:" in n for n in copies)


def test_w_in_a_name_is_rfc822_size_and_the_file_is_not_read(tmp_path: Path) -> None:
    """``W=`` as Dovecot writes and trusts it (the size with each LF as CRLF): a Maildir
    Dovecot wrote keeps its sizes, and a SELECT of thousands of new files reads none.
    Here a name whose W= is not what the file holds (a file shorter than its name says):
    the name is what counts. An LF file without W= is still counted."""
    store = MailStore(tmp_path)
    box = store.mailbox(INBOX)
    body = b"Subject: y\n\nlf body"  # no final line end: Dovecot counts 2 LFs, adds none
    deliver(tmp_path, f"1700000001.M1P1.h,S={len(body)},W={len(body) + 2}", body)
    deliver(tmp_path, "1700000002.M1P1.h,S=5,W=4000", b"short")
    deliver(tmp_path, "1700000003.M1P1.h,S=20", body)
    box.scan()
    assert [m.size for m in box.messages()] == [len(body) + 2, 4000, len(body) + 2]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("aZ09,.-_~%:/ é\udcff!")), max_size=12))
def test_name_encoding_fast_paths_agree_with_quote(name: str) -> None:
    """The shortcuts for plain names (and names with commas) write what quote() writes,
    and every name reads back as itself."""
    from urllib.parse import quote
    ref = quote(name.encode("utf-8", "surrogateescape"), safe=uidmap._SAFE)
    ref = "%2D" if ref == "-" else ref or "-"
    assert uidmap._enc_name(name) == ref
    assert uidmap._dec_name(uidmap._enc_name(name)) == name
