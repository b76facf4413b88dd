"""Link records and their replay after a crash (store/intents.py, store/maildir.py).

A power loss cannot be had in a test; what it leaves can. After the first flush of a
batch, the data and the record are on disk whatever happens next, while the links made
after it may be lost: these tests build that state (by a real commit whose link is then
removed, or by hand) and run the recovery the node runs at start, as in a later boot (the
record names another boot than the one recovery runs in).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import zlib
from pathlib import Path

import pytest

from mailfort.store import intents
from mailfort.store.maildir import Committer, maildir_for, recover_spool
from tests.store.faults import AtFlush

BODY = b"Subject: kept\r\n\r\nacknowledged before its link was flushed\r\n"


def _spool(tmp_path: Path, name: str, data: bytes) -> Path:
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    (spool / name).write_bytes(data)
    return spool


def _entry(name: str, data: bytes, *maildirs: Path) -> intents.Entry:
    """Targets as a committer names them: relative to the Maildir root (``<tmp>/mail``)."""
    n = len(data)
    return intents.Entry(name, n, zlib.crc32(data),
                         tuple(f"{md.parent.name}/{md.name}/new/{name},S={n},W={n}"
                               for md in maildirs))


def _record(path: Path, entries: list[intents.Entry], boot: str = "an-earlier-boot") -> None:
    """A record as a committer of ``boot`` wrote it."""
    path.write_bytes(intents.encode(entries, boot))


def test_a_record_reads_back_and_any_damage_is_seen() -> None:
    entries = [intents.Entry("1.M2P3Q4.h", 10, 0xDEADBEEF, ("/m/a/new/x", "/m/é\t\n/new/y")),
               intents.Entry("1.M2P3Q5.h", 0, 0, ())]
    data = intents.encode(entries, "boot-1")
    assert intents.decode(data) == ("boot-1", entries)
    for cut in range(len(data) - 1):  # torn anywhere (the final newline is optional)
        assert intents.decode(data[:cut]) is None, cut
    for i in range(len(data)):
        if data[i:i + 1] == b"\n" and i == len(data) - 1:
            continue
        flipped = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]
        assert intents.decode(flipped) is None, i
    assert intents.decode(b"\x00" * len(data)) is None


def test_recovery_links_again_what_the_record_promised(tmp_path: Path) -> None:
    name = "1796530000.M1P4242Q7.host"
    spool = _spool(tmp_path, name, BODY)
    a, b = tmp_path / "mail" / "d.test" / "a", tmp_path / "mail" / "d.test" / "b"
    _record(spool / f"1796530000.M2P4242Q8.host{intents.SUFFIX}", [_entry(name, BODY, a, b)])
    # the spool file (the record goes with its replay)
    assert recover_spool(spool, 4242, mail_root=tmp_path / "mail") == 1
    for md in (a, b):
        (f,) = (md / "new").iterdir()
        assert f.read_bytes() == BODY and f.name == f"{name},S={len(BODY)},W={len(BODY)}"
    assert list(spool.iterdir()) == []
    assert recover_spool(spool, mail_root=tmp_path / "mail") == 0  # nothing twice


def test_recovery_does_not_deliver_twice_what_is_already_there(tmp_path: Path) -> None:
    name = "1796530000.M1P77Q1.host"
    spool = _spool(tmp_path, name, BODY)
    md = tmp_path / "mail" / "d.test" / "a"
    (md / "cur").mkdir(parents=True)
    (md / "cur" / f"{name},S={len(BODY)},W={len(BODY)}:2,S").write_bytes(BODY)  # read
    _record(spool / f"r{intents.SUFFIX}", [_entry(name, BODY, md)])
    recover_spool(spool, mail_root=tmp_path / "mail")
    assert not (md / "new").exists() or list((md / "new").iterdir()) == []
    assert len(list((md / "cur").iterdir())) == 1


def test_recovery_never_links_a_message_the_flush_did_not_finish(tmp_path: Path) -> None:
    """Right size, wrong bytes (zeros, as a cut flush leaves them), or a torn record: that
    batch was never acknowledged, and nothing of it is delivered."""
    md = tmp_path / "mail" / "d.test" / "a"
    spool = _spool(tmp_path, "1.M1P9Q1.h", b"\x00" * len(BODY))
    _record(spool / f"1.M1P9Q2.h{intents.SUFFIX}", [_entry("1.M1P9Q1.h", BODY, md)])
    (spool / "1.M1P9Q3.h").write_bytes(BODY)
    torn = intents.encode([_entry("1.M1P9Q3.h", BODY, md)], "boot-1")
    (spool / f"1.M1P9Q4.h{intents.SUFFIX}").write_bytes(torn[: len(torn) // 2])
    assert recover_spool(spool, mail_root=tmp_path / "mail") == 2  # the two spool files
    assert not (md / "new").exists()
    assert list(spool.iterdir()) == []


def test_a_record_of_this_boot_is_not_replayed(tmp_path: Path) -> None:
    """A worker process that died (SIGKILL) lost none of its links: the kernel has them. A
    message a POP3 client deleted since must not come back, so the record is only flushed
    and removed."""
    name = "1796530000.M1P4343Q1.host"
    spool = _spool(tmp_path, name, BODY)
    md = tmp_path / "mail" / "d.test" / "a"
    (md / "new").mkdir(parents=True)  # the message was linked, then deleted by its reader
    _record(spool / f"1796530000.M1P4343Q2.host{intents.SUFFIX}", [_entry(name, BODY, md)],
            intents.BOOT_ID)
    assert recover_spool(spool, 4343, mail_root=tmp_path / "mail") == 1
    assert list((md / "new").iterdir()) == []
    assert list(spool.iterdir()) == []


def test_a_link_lost_after_the_250_comes_back_at_recovery(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """The whole path: a real commit, acknowledged after its first flush; the flush of its
    link is held, and the link is then removed, as a power loss before that flush would
    lose it; the committer's files are what the disk would hold. Recovery restores it."""
    c = Committer(tmp_path)
    release = threading.Event()
    fault = AtFlush(2, release=release, error=OSError(5, "the machine lost power"))
    c.fault = fault
    md = maildir_for(tmp_path / "mail", "a@d.test")

    async def one() -> None:
        spool = c.new_spool()
        spool.write(BODY)
        await c.commit(spool, [md])

    asyncio.run(one())
    assert fault.held.wait(10)
    (link,) = (md / "new").iterdir()
    link.unlink()  # lost with the power

    def down(at: str) -> None:
        if at == "sync":
            raise OSError(5, "still down")

    c.fault = down  # no later flush succeeds either: stop() leaves the record on disk
    release.set()
    c.stop()
    assert any(p.name.endswith(intents.SUFFIX) for p in c.spool_dir.iterdir())
    monkeypatch.setattr(intents, "BOOT_ID", "the-boot-after-the-power-came-back")
    recover_spool(c.spool_dir, mail_root=tmp_path / "mail")
    (back,) = (md / "new").iterdir()
    assert back.read_bytes() == BODY and back.name == link.name
    assert list(c.spool_dir.iterdir()) == []


def _record_v1(path: Path, entries: list[intents.Entry], boot: str = "an-earlier-boot") -> None:
    """A record of the first format (targets as paths), as older versions wrote it."""
    body = json.dumps({"boot": boot, "messages": [[e.spool, e.size, e.crc, list(e.targets)]
                                                  for e in entries]})
    text = f"mailfort-links 1\n{body}\n"
    path.write_bytes(f"{text}{zlib.crc32(text.encode()):08x}\n".encode())


def test_a_target_is_a_maildir_name_below_the_root_by_its_text() -> None:
    """The replay's check of a target's text (issue 24): domain/local/new/NAME relative to
    the root; a record of the first format only with a path inside the root."""
    root = Path("/srv/mail")
    e = intents.Entry("1.M1P2Q3.h", 5, 0, ())
    assert intents.maildir_target("d.test/a/new/1.M1P2Q3.h,S=5,W=5", e, root) == (
        "d.test", "a", "1.M1P2Q3.h,S=5,W=5")
    assert intents.maildir_target("/srv/mail/d.test/a/new/1.M1P2Q3.h,S=5", e, root, 1) == (
        "d.test", "a", "1.M1P2Q3.h,S=5")
    for bad in ("/srv/mail/d.test/a/new/1.M1P2Q3.h",  # absolute in format 2
                "../etc/a/new/1.M1P2Q3.h", "d.test/../new/1.M1P2Q3.h",
                "d.test/a/cur/1.M1P2Q3.h", "d.test/a/new/other", "d.test/a/new/",
                ".d/a/new/1.M1P2Q3.h", "d.test/.a/new/1.M1P2Q3.h",
                "d.test/a/b/new/1.M1P2Q3.h", "d.test/a/new/1.M1P2Q3.h/x", "",
                "d.test//new/1.M1P2Q3.h", "d.test/a/new/1.M1P2Q3.h\0"):
        with pytest.raises(intents.Refused):
            intents.maildir_target(bad, e, root)
    for bad in ("/srv/evil/new/1.M1P2Q3.h", "/srv/mailx/d/a/new/1.M1P2Q3.h",
                "/srv/mail/../../etc/new/1.M1P2Q3.h", "/srv/mail/d.test/new/1.M1P2Q3.h"):
        with pytest.raises(intents.Refused):
            intents.maildir_target(bad, e, root, 1)


@pytest.mark.parametrize("planted", ["domain", "new"])
def test_replay_refuses_a_symlink_on_the_way_and_keeps_the_spool_file(
        tmp_path: Path, planted: str, caplog: pytest.LogCaptureFixture) -> None:
    """Whoever can write in the data directory plants a symlink where a Maildir directory
    should be (the domain, or new/): nothing is made through it, the error is logged, and
    the message waits in spool/kept/ with its record."""
    name = "1796530000.M1P5151Q1.host"
    spool = _spool(tmp_path, name, BODY)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    mail = tmp_path / "mail"
    if planted == "domain":
        mail.mkdir()
        (mail / "d.test").symlink_to(elsewhere)
    else:
        (mail / "d.test" / "a").mkdir(parents=True)
        (mail / "d.test" / "a" / "new").symlink_to(elsewhere)
    record = f"1796530000.M1P5151Q2.host{intents.SUFFIX}"
    _record(spool / record, [_entry(name, BODY, mail / "d.test" / "a")])
    with caplog.at_level(logging.ERROR, "mailfort.store"):
        assert recover_spool(spool, mail_root=mail) == 0
    assert list(elsewhere.iterdir()) == []
    assert sorted(os.listdir(spool / intents.KEPT)) == sorted([name, record])
    assert os.listdir(spool) == [intents.KEPT]
    assert "refused to link" in caplog.text
    assert recover_spool(spool, mail_root=mail) == 0  # kept stays kept
    assert (spool / intents.KEPT / name).read_bytes() == BODY


def test_an_old_record_is_replayed_inside_the_root_and_refused_outside(
        tmp_path: Path) -> None:
    """Records of the first format name absolute paths: one inside the Maildir root is
    still linked; one elsewhere (data/evil/new/owned, the issue's record) is not."""
    mail = tmp_path / "mail"
    good, evil = "1796530000.M1P6Q1.host", "1796530000.M1P6Q2.host"
    spool = _spool(tmp_path, good, BODY)
    (spool / evil).write_bytes(BODY)
    md = mail / "d.test" / "a"
    n = len(BODY)
    _record_v1(spool / f"r1{intents.SUFFIX}", [intents.Entry(
        good, n, zlib.crc32(BODY), (str(md / "new" / f"{good},S={n},W={n}"),))])
    _record_v1(spool / f"r2{intents.SUFFIX}", [intents.Entry(
        evil, n, zlib.crc32(BODY), (str(tmp_path / "evil" / "new" / evil),))])
    recover_spool(spool, mail_root=mail)
    assert [f.name for f in (md / "new").iterdir()] == [f"{good},S={n},W={n}"]
    assert not (tmp_path / "evil").exists()
    assert sorted(os.listdir(spool / intents.KEPT)) == sorted([evil, f"r2{intents.SUFFIX}"])


def test_a_spool_file_that_is_a_symlink_is_never_linked(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(BODY)
    spool = tmp_path / "spool"
    spool.mkdir()
    name = "1796530000.M1P7Q1.host"
    (spool / name).symlink_to(secret)
    md = tmp_path / "mail" / "d.test" / "a"
    _record(spool / f"r{intents.SUFFIX}", [_entry(name, BODY, md)])
    recover_spool(spool, mail_root=tmp_path / "mail")
    assert not (md / "new").exists() or list((md / "new").iterdir()) == []
    assert secret.read_bytes() == BODY


def test_a_committer_names_its_targets_relative_to_the_root(tmp_path: Path) -> None:
    """What a record says is never a path: domain/local/new/NAME."""
    c = Committer(tmp_path)
    release = threading.Event()
    c.fault = AtFlush(2, release=release)
    md = maildir_for(tmp_path / "mail", "a@d.test")

    async def one() -> None:
        spool = c.new_spool()
        spool.write(BODY)
        await c.commit(spool, [md])

    try:
        asyncio.run(one())
        assert c.fault.held.wait(10)
        (record,) = [p for p in c.spool_dir.iterdir() if p.name.endswith(intents.SUFFIX)]
        _boot, (entry,) = intents.decode(record.read_bytes())
        (target,) = entry.targets
        assert target.startswith("d.test/a/new/") and not target.startswith("/")
    finally:
        release.set()
        c.stop()


def test_a_lone_sender_s_batches_reuse_their_records_and_free_no_inode(tmp_path: Path) -> None:
    """One message at a time (the one-session MX row): each batch writes its record into a
    spent one, emptied (``intents.spend``), instead of creating a file and removing it, since
    on ext4 without a journal every inode freed makes later file creations slower. A few
    record files in all, however many batches; the messages all arrive whole."""
    c = Committer(tmp_path, shared_flush=True)
    md = maildir_for(tmp_path / "mail", "a@d.test")
    names: set[str] = set()

    async def sequential() -> None:
        for i in range(20):
            spool = c.new_spool()
            spool.write(BODY + b"%d\r\n" % i)
            await c.commit(spool, [md])
            names.update(p.name for p in c.spool_dir.iterdir()
                         if p.name.endswith(intents.SUFFIX))
            await asyncio.sleep(0.002)

    try:
        asyncio.run(sequential())
        assert c.batches == 20
        assert len(names) <= 3, sorted(names)  # before: a new record file per batch
        assert len(list((md / "new").iterdir())) == 20
    finally:
        c.stop()
    assert not list(c.spool_dir.glob("*" + intents.SUFFIX))  # a clean stop removes them


def test_a_spent_record_left_by_a_crash_is_removed_without_a_word(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An emptied record (kept for reuse when the process died) is not an unreadable one:
    recovery removes it and warns of nothing."""
    spool = tmp_path / "spool"
    spool.mkdir()
    spare = spool / ("1.M1P99Q1.host" + intents.SUFFIX)
    spare.write_bytes(b"")
    with caplog.at_level(logging.WARNING, "mailfort.store"):
        assert recover_spool(spool, mail_root=tmp_path / "mail") == 0
    assert not spare.exists()
    assert "unreadable" not in caplog.text
