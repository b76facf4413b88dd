"""The mailbox side of an IMAP session (server/imap_commands.py) on a real Maildir: every
command of the AUTHENTICATED and SELECTED states, its error paths, two sessions on one
mailbox, POP3 and MX beside them, and a large FETCH that must stream."""

from __future__ import annotations

import os
import re
import time
import tracemalloc
from pathlib import Path

import pytest

from mailfort.protocol import imap_message as im
from mailfort.protocol.imap_parse import Command, CommandReader, ContinuationRequest
from mailfort.server.imap_commands import MailSession, MailSessionSettings, Outcome
from mailfort.store import mutf7
from mailfort.store.imap_mailbox import _flock
from mailfort.store.pop3_mailbox import LOCK_NAME as POP3_LOCK
from mailfort.store.pop3_mailbox import POP3Mailbox

MSG = (b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\n"
       b"Subject: hello there\r\nDate: Mon, 7 Dec 2026 10:00:00 +0000\r\n"
       b"Message-ID: <1@example.org>\r\n\r\nThe body text.\r\n")
MIME = (b"From: carol@example.org\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nfirst part\r\n"
        b"--b1\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nAAECAw==\r\n--b1--\r\n")


def parse(line: bytes) -> Command:
    """Bytes through the real command reader (literals included) to a Command."""
    reader = CommandReader()
    reader.feed(line + b"\r\n")
    while True:
        event = reader.next_event()
        if isinstance(event, Command):
            return event
        assert isinstance(event, ContinuationRequest), event


class Client:
    """A MailSession driven as the engine drives it: parsed commands in, lines out."""

    def __init__(self, maildir: Path, **settings: object) -> None:
        settings.setdefault("sync_interval", 0.0)  # every command reports what is due
        self.session = MailSession(maildir, user="u",
                                   settings=MailSessionSettings(**settings))  # type: ignore[arg-type]
        self.last: Outcome | None = None

    def run(self, line: bytes) -> tuple[Outcome, list[bytes]]:
        outcome = self.session.execute(parse(line))
        lines = list(outcome.untagged)
        self.last = outcome
        return outcome, lines

    def ok(self, line: bytes) -> list[bytes]:
        outcome, lines = self.run(line)
        assert outcome.status == "OK", (line, outcome)
        return lines

    def append(self, data: bytes = MSG, box: bytes = b"INBOX", flags: bytes = b"",
               when: bytes = b"") -> Outcome:
        head = b"a APPEND " + box + (b" (" + flags + b")" if flags else b"") + \
            (b' "' + when + b'"' if when else b"")
        return self.run(head + b" {%d}\r\n" % len(data) + data)[0]


def deliver(root: Path, name: str, data: bytes = MSG) -> Path:
    """What MX delivery leaves: a complete file in new/."""
    for sub in ("tmp", "new", "cur"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    path = root / "new" / name
    path.write_bytes(data)
    return path


def code(lines: list[bytes], name: bytes) -> bytes | None:
    for line in lines:
        m = re.search(rb"\[" + re.escape(name) + rb" ?([^\]]*)\]", line)
        if m:
            return m.group(1)
    return None


def fetch_flags(lines: list[bytes]) -> dict[int, bytes]:
    out = {}
    for line in lines:
        m = re.match(rb"\* (\d+) FETCH \(.*FLAGS \(([^)]*)\)", line)
        if m:
            out[int(m.group(1))] = m.group(2)
    return out


@pytest.fixture
def client(tmp_path: Path) -> Client:
    return Client(tmp_path)


def filled(tmp_path: Path, n: int = 3, **settings: object) -> Client:
    c = Client(tmp_path, **settings)
    for _ in range(n):
        assert c.append().status == "OK"
    return c


# -- mailboxes ------------------------------------------------------------------------------


def test_special_folders_exist_and_list_shows_attributes(client: Client) -> None:
    lines = client.ok(b'a LIST "" "*"')
    assert b'* LIST (\\HasNoChildren) "." "INBOX"\r\n' in lines
    for name, attr in (("Sent", "\\Sent"), ("Drafts", "\\Drafts"), ("Junk", "\\Junk"),
                       ("Trash", "\\Trash"), ("Archive", "\\Archive")):
        assert f'* LIST (\\HasNoChildren {attr}) "." "{name}"\r\n'.encode() in lines
    assert client.ok(b'a LIST "" ""') == [b'* LIST (\\Noselect) "." ""\r\n']
    only = client.ok(b'a LIST (SPECIAL-USE) "" "*"')
    assert len(only) == 5 and not any(b'"INBOX"' in x for x in only)
    assert client.run(b'a LIST (BOGUS) "" "*"')[0].status == "BAD"
    assert client.run(b'a LIST (RECURSIVEMATCH) "" "*"')[0].status == "BAD"


def test_create_delete_rename_and_their_errors(client: Client) -> None:
    client.ok(b"a CREATE Projects.2026")
    lines = client.ok(b'a LIST "" "%"')
    assert b'* LIST (\\Noselect \\HasChildren) "." "Projects"\r\n' in lines
    client.ok(b"a CREATE Projects")
    assert b'* LIST (\\HasChildren) "." "Projects"\r\n' in client.ok(b'a LIST "" "Proj*"')
    out, _ = client.run(b"a CREATE Projects")
    assert (out.status, out.code) == ("NO", "ALREADYEXISTS")
    out, _ = client.run(b"a DELETE Nothing")
    assert (out.status, out.code) == ("NO", "NONEXISTENT")
    out, _ = client.run(b"a DELETE INBOX")
    assert (out.status, out.code) == ("NO", "CANNOT")
    out, _ = client.run(b"a CREATE INBOX.x")
    assert (out.status, out.code) == ("NO", "CANNOT")
    client.ok(b"a RENAME Projects Work")
    names = b"".join(client.ok(b'a LIST "" "*"'))
    assert b'"Work"' in names and b'"Work.2026"' in names and b'"Projects' not in names
    out, _ = client.run(b"a RENAME Nothing Other")
    assert (out.status, out.code) == ("NO", "NONEXISTENT")
    out, _ = client.run(b"a RENAME Work Sent")
    assert (out.status, out.code) == ("NO", "ALREADYEXISTS")
    client.ok(b"a DELETE Work")
    assert b'"Work.2026"' in b"".join(client.ok(b'a LIST "" "*"'))


def test_create_special_use_is_kept_and_follows_rename(tmp_path: Path) -> None:
    client = Client(tmp_path)
    client.ok(b"a CREATE Everything (USE (\\All))")
    assert b'* LIST (\\HasNoChildren \\All) "." "Everything"\r\n' in client.ok(
        b'a LIST "" "Every*"')
    out, _ = client.run(b"a CREATE Odd (USE (\\Bogus))")
    assert (out.status, out.code) == ("NO", "USEATTR")
    client.ok(b"a RENAME Everything Alles")
    lines = Client(tmp_path).ok(b'a LIST "" "*"')  # a new session reads the file
    assert b'* LIST (\\HasNoChildren \\All) "." "Alles"\r\n' in lines


def test_rename_inbox_moves_its_messages(tmp_path: Path) -> None:
    client = filled(tmp_path, 2)
    client.ok(b"a RENAME INBOX Old")
    status = client.ok(b"a STATUS INBOX (MESSAGES)") + client.ok(b"a STATUS Old (MESSAGES)")
    assert status == [b'* STATUS "INBOX" (MESSAGES 0)\r\n', b'* STATUS "Old" (MESSAGES 2)\r\n']


def test_mailbox_names_are_modified_utf7_in_rev1_and_utf8_in_rev2(tmp_path: Path) -> None:
    client = Client(tmp_path)
    client.ok(b"a CREATE Entw&APw-rfe")
    assert (tmp_path / ".Entw&APw-rfe" / "cur").is_dir()
    assert b'"Entw&APw-rfe"' in b"".join(client.ok(b'a LIST "" "Entw*"'))
    assert client.run(b"a CREATE Bad&Jjo")[0].code == "CANNOT"
    client.ok(b"a ENABLE IMAP4rev2")
    lines = client.ok(b'a LIST "" "Entw*"')
    assert lines == ['* LIST (\\HasNoChildren) "." "Entwürfe"\r\n'.encode()]
    client.ok("a SELECT \"Entwürfe\"".encode())
    assert mutf7.decode("Entw&APw-rfe") == "Entwürfe"


def test_utf8_accept_is_neither_announced_nor_enabled(tmp_path: Path) -> None:
    """UTF8=ACCEPT (RFC 6855) is not implemented (no APPEND ``UTF8 (~{N})`` form), so it
    is not announced, and ENABLE of it does nothing (RFC 5161: a name the server does not
    announce is ignored): names stay modified UTF-7 for an IMAP4rev1 client."""
    from mailfort.protocol.imap import SESSION_CAPABILITIES
    assert not any(c.upper().startswith("UTF8=") for c in SESSION_CAPABILITIES)
    client = Client(tmp_path)
    client.ok(b"a CREATE Entw&APw-rfe")
    assert client.ok(b"a ENABLE UTF8=ACCEPT") == [b"* ENABLED\r\n"]
    assert b'"Entw&APw-rfe"' in b"".join(client.ok(b'a LIST "" "Entw*"'))


def test_subscriptions_persist_lsub_and_list_extended(tmp_path: Path) -> None:
    client = Client(tmp_path)
    client.ok(b"a CREATE Lists.python")
    client.ok(b"a SUBSCRIBE INBOX")
    client.ok(b"a SUBSCRIBE Lists.python")
    client.ok(b"a SUBSCRIBE Gone")  # a name that does not exist may be subscribed
    other = Client(tmp_path)
    lines = other.ok(b'a LIST (SUBSCRIBED) "" "*"')
    assert b'* LIST (\\HasNoChildren \\Subscribed) "." "INBOX"\r\n' in lines
    assert b'* LIST (\\HasNoChildren \\Subscribed) "." "Lists.python"\r\n' in lines
    assert b'* LIST (\\NonExistent \\HasNoChildren \\Subscribed) "." "Gone"\r\n' in lines
    rec = other.ok(b'a LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"')
    assert b'* LIST (\\NonExistent \\HasChildren) "." "Lists" ("CHILDINFO" ("SUBSCRIBED"))\r\n' \
        in rec
    ret = other.ok(b'a LIST "" "*" RETURN (SUBSCRIBED CHILDREN)')
    assert b'* LIST (\\HasNoChildren \\Sent) "." "Sent"\r\n' in ret
    assert b'* LIST (\\HasNoChildren \\Subscribed) "." "INBOX"\r\n' in ret
    lsub = other.ok(b'a LSUB "" "*"')
    assert b'* LSUB () "." "Lists.python"\r\n' in lsub and len(lsub) == 3
    other.ok(b"a UNSUBSCRIBE Gone")
    assert other.run(b"a UNSUBSCRIBE Gone")[0].code == "NONEXISTENT"
    assert len(Client(tmp_path).ok(b'a LSUB "" "*"')) == 2
    other.ok(b"a ENABLE IMAP4rev2")
    assert other.run(b'a LSUB "" "*"')[0].status == "BAD"  # gone from IMAP4rev2


def test_list_status_returns_status_after_each_mailbox(tmp_path: Path) -> None:
    client = filled(tmp_path, 2)
    lines = client.ok(b'a LIST "" "INBOX" RETURN (STATUS (MESSAGES UNSEEN SIZE))')
    assert lines[0].startswith(b"* LIST")
    assert lines[1] == b'* STATUS "INBOX" (MESSAGES 2 UNSEEN 2 SIZE %d)\r\n' % (2 * len(MSG))


def test_status_items(tmp_path: Path) -> None:
    client = filled(tmp_path, 3)
    client.ok(b"a SELECT INBOX")
    client.ok(b"a STORE 1 +FLAGS (\\Seen \\Deleted)")
    client.ok(b"a UNSELECT")
    deliver(tmp_path, "1800000000.M1P1.host")
    (line,) = client.ok(b"a STATUS INBOX (MESSAGES UIDNEXT UIDVALIDITY UNSEEN DELETED SIZE "
                        b"HIGHESTMODSEQ RECENT APPENDLIMIT)")
    m = re.match(rb'\* STATUS "INBOX" \(MESSAGES 4 UIDNEXT 5 UIDVALIDITY \d+ UNSEEN 3 '
                 rb"DELETED 1 SIZE (\d+) HIGHESTMODSEQ (\d+) RECENT 1 APPENDLIMIT (\d+)\)", line)
    assert m, line
    assert int(m.group(1)) == 4 * len(MSG)
    out, _ = client.run(b"a STATUS Nothing (MESSAGES)")
    assert (out.status, out.code) == ("NO", "NONEXISTENT")
    assert client.run(b"a STATUS INBOX (MAILBOXID)")[0].status == "BAD"


def test_namespace_enable_and_quota(tmp_path: Path) -> None:
    client = filled(tmp_path, 2, quota_storage=10 * 1024, quota_messages=100)
    assert client.ok(b"a NAMESPACE") == [b'* NAMESPACE (("" ".")) NIL NIL\r\n']
    assert client.ok(b"a ENABLE QRESYNC X-NONE") == [b"* ENABLED QRESYNC\r\n"]
    assert client.ok(b"a ENABLE QRESYNC CONDSTORE") == [b"* ENABLED\r\n"]  # already on
    lines = client.ok(b"a GETQUOTAROOT INBOX")
    assert lines == [b'* QUOTAROOT "INBOX" ""\r\n', b'* QUOTA "" (STORAGE 1 10 MESSAGE 2 100)\r\n']
    assert client.ok(b'a GETQUOTA ""') == lines[1:]
    out, _ = client.run(b"a GETQUOTA other")
    assert (out.status, out.code) == ("NO", "NONEXISTENT")
    plain = Client(tmp_path / "nobody")
    assert plain.ok(b"a GETQUOTAROOT INBOX") == [b'* QUOTAROOT "INBOX"\r\n']


# -- APPEND ---------------------------------------------------------------------------------


def test_append_flags_date_appenduid_and_errors(tmp_path: Path) -> None:
    client = Client(tmp_path, append_limit=1000, quota_messages=3)
    out = client.append(flags=b"\\Seen $Work", when=b"01-Feb-2024 10:20:30 +0100")
    assert out.status == "OK" and re.fullmatch(r"APPENDUID \d+ 1", out.code or "")
    client.ok(b"a SELECT INBOX")
    (line,) = [x for x in client.ok(b"a FETCH 1 (FLAGS INTERNALDATE)") if b"FETCH" in x]
    assert b"FLAGS (\\Seen $Work)" in line
    client.ok(b"a UNSELECT")
    out = client.append(box=b"Nowhere")
    assert (out.status, out.code) == ("NO", "TRYCREATE")
    out = client.append(data=b"x" * 1001)
    assert (out.status, out.code) == ("NO", "TOOBIG")
    assert client.append(flags=b"\\Bogus").status == "BAD"
    assert client.append().status == "OK"
    assert client.append(box=b"Sent").status == "OK"
    out = client.append()
    assert (out.status, out.code) == ("NO", "OVERQUOTA")
    storage = Client(tmp_path / "s", quota_storage=len(MSG) + 10)
    assert storage.append().status == "OK"
    assert storage.append().code == "OVERQUOTA"


def test_append_to_the_selected_mailbox_reports_exists(tmp_path: Path) -> None:
    client = filled(tmp_path, 1)
    client.ok(b"a SELECT INBOX")
    out, lines = client.run(b"a APPEND INBOX {%d}\r\n" % len(MSG) + MSG)
    assert out.status == "OK" and lines == [b"* 2 EXISTS\r\n", b"* 0 RECENT\r\n"]
    assert client.ok(b"a CHECK") == []


# -- SELECT ---------------------------------------------------------------------------------


def test_select_and_examine(tmp_path: Path) -> None:
    client = filled(tmp_path, 3)
    deliver(tmp_path, "1800000000.M2P1.host")
    out, lines = client.run(b"a SELECT INBOX")
    assert (out.status, out.code, out.selected) == ("OK", "READ-WRITE", True)
    assert b"* 4 EXISTS\r\n" in lines and b"* 1 RECENT\r\n" in lines
    assert code(lines, b"UIDNEXT") == b"5" and code(lines, b"UNSEEN") == b"1"
    assert code(lines, b"UIDVALIDITY") and code(lines, b"HIGHESTMODSEQ")
    assert lines[0].startswith(b"* FLAGS (\\Answered")
    assert b"\\*" in code(lines, b"PERMANENTFLAGS")  # type: ignore[operator]
    out, lines = client.run(b"a EXAMINE INBOX")
    assert (out.code, out.selected) == ("READ-ONLY", True)
    assert b"* 0 RECENT\r\n" in lines  # the first session took them
    out, _ = client.run(b"a SELECT Nothing")
    assert (out.status, out.code, out.selected) == ("NO", "NONEXISTENT", False)
    out, _ = client.run(b"a FETCH 1 FLAGS")
    assert out.status == "BAD"  # nothing selected any more


def test_select_in_rev2_sends_list_and_closed_but_no_recent(tmp_path: Path) -> None:
    client = filled(tmp_path, 1)
    client.ok(b"a ENABLE IMAP4rev2")
    lines = client.ok(b"a SELECT INBOX")
    assert b'* LIST (\\HasNoChildren) "." "INBOX"\r\n' in lines
    assert not any(b"RECENT" in x or b"UNSEEN" in x for x in lines)
    lines = client.ok(b"a SELECT Sent")
    assert lines[0] == b"* OK [CLOSED] previous mailbox closed\r\n"
    (line,) = client.ok(b"a SEARCH ALL")
    assert line == b'* ESEARCH (TAG "a")\r\n'  # rev2: ESEARCH, even without RETURN


def test_qresync_select_reports_vanished_and_changes(tmp_path: Path) -> None:
    client = filled(tmp_path, 4)
    lines = client.ok(b"a SELECT INBOX")
    validity = int(code(lines, b"UIDVALIDITY"))  # type: ignore[arg-type]
    modseq = int(code(lines, b"HIGHESTMODSEQ"))  # type: ignore[arg-type]
    client.ok(b"a STORE 1 +FLAGS (\\Deleted)")
    client.ok(b"a STORE 3 +FLAGS (\\Flagged)")
    client.ok(b"a EXPUNGE")
    client.ok(b"a CLOSE")
    assert client.run(b"a SELECT INBOX (QRESYNC (%d %d))" % (validity, modseq))[0].status \
        == "BAD"  # not enabled
    client.ok(b"a ENABLE QRESYNC")
    lines = client.ok(b"a SELECT INBOX (QRESYNC (%d %d 1:4))" % (validity, modseq))
    assert b"* VANISHED (EARLIER) 1\r\n" in lines
    assert any(re.match(rb"\* 2 FETCH \(UID 3 FLAGS \(\\Flagged\) MODSEQ \(\d+\)\)", x)
               for x in lines)
    lines = client.ok(b"a UID FETCH 1:* FLAGS (CHANGEDSINCE %d VANISHED)" % modseq)
    assert lines[0] == b"* VANISHED (EARLIER) 1\r\n" and len(lines) == 2
    assert client.run(b"a FETCH 1:* FLAGS (CHANGEDSINCE 1 VANISHED)")[0].status == "BAD"
    lines = client.ok(b"a SELECT INBOX (QRESYNC (1 %d))" % modseq)  # other validity
    assert not any(b"VANISHED" in x for x in lines)


# -- FETCH ----------------------------------------------------------------------------------


def test_fetch_every_item_agrees_with_imap_message(tmp_path: Path) -> None:
    client = Client(tmp_path)
    client.append(MIME, flags=b"\\Seen")
    client.ok(b"a ENABLE CONDSTORE")
    client.ok(b"a SELECT INBOX")
    items = [b"ENVELOPE", b"BODY", b"BODYSTRUCTURE", b"BODY.PEEK[HEADER.FIELDS (SUBJECT)]",
             b"BODY.PEEK[1]", b"BODY.PEEK[2.MIME]", b"BODY.PEEK[TEXT]<2.5>", b"BINARY.PEEK[2]",
             b"BINARY.SIZE[2]", b"RFC822.HEADER", b"RFC822.SIZE", b"BODY.PEEK[]<0.10>"]
    wire = im.to_wire(MIME)
    for item in items:
        (line,) = client.ok(b"a FETCH 1 (" + item + b")")
        att = parse(b"a FETCH 1 (" + item + b")").args[1][0]  # type: ignore[index]
        assert line == b"* 1 FETCH (" + im.fetch_item(att, wire) + b")\r\n", item
    (line,) = client.ok(b"a UID FETCH 1 (FLAGS MODSEQ INTERNALDATE)")
    assert re.fullmatch(rb'\* 1 FETCH \(UID 1 FLAGS \(\\Seen\) MODSEQ \(\d+\) INTERNALDATE '
                        rb'"\d\d-\w\w\w-\d{4} \d\d:\d\d:\d\d [+-]\d{4}"\)\r\n', line)
    (line,) = client.ok(b"a FETCH 1 FAST")
    assert b"RFC822.SIZE %d" % len(wire) in line
    (line,) = client.ok(b"a FETCH 1 RFC822")
    assert line.endswith(b"RFC822 {%d}\r\n" % len(wire) + wire + b")\r\n")
    assert client.run(b"a FETCH 2 FLAGS")[0].status == "BAD"
    assert client.ok(b"a UID FETCH 7:9 FLAGS") == []
    assert client.run(b"a FETCH 1 EMAILID")[0].status == "BAD"


def test_binary_of_an_unknown_encoding_is_no_unknown_cte(tmp_path: Path) -> None:
    msg = b"Subject: x\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin\r\n"
    client = Client(tmp_path)
    client.append(msg)
    client.ok(b"a SELECT INBOX")
    out, _ = client.run(b"a FETCH 1 BINARY.PEEK[1]")
    assert (out.status, out.code) == ("NO", "UNKNOWN-CTE")


def test_fetch_without_peek_sets_seen_only_when_read_write(tmp_path: Path) -> None:
    client = filled(tmp_path, 2)
    client.ok(b"a EXAMINE INBOX")
    (line,) = client.ok(b"a FETCH 1 BODY[TEXT]")
    assert b"FLAGS" not in line
    client.ok(b"a SELECT INBOX")
    (line,) = client.ok(b"a FETCH 1 BODY[TEXT]")
    assert line.endswith(b" FLAGS (\\Seen))\r\n")
    (line,) = client.ok(b"a FETCH 1 BODY[TEXT]")  # already seen: no FLAGS again
    assert b"FLAGS" not in line
    lines = client.ok(b"a FETCH 1:2 (FLAGS BODY.PEEK[])")
    assert fetch_flags(lines) == {1: b"\\Seen", 2: b""}


def test_fetch_of_2000_messages_streams(tmp_path: Path) -> None:
    big = MSG + b"x" * 20_000 + b"\r\n"
    cur = tmp_path / "cur"
    for sub in ("tmp", "new", "cur"):
        (tmp_path / sub).mkdir()
    for i in range(2000):
        (cur / f"1700000000.M{i}P1.host:2,").write_bytes(big)
    client = Client(tmp_path)
    client.ok(b"a SELECT INBOX")
    outcome = client.session.execute(parse(b"a UID FETCH 1:* BODY.PEEK[]"))
    assert not isinstance(outcome.untagged, list | tuple)
    tracemalloc.start()
    try:
        count = 0
        size = 0
        for line in outcome.untagged:
            count += 1
            size += len(line)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 2000 and size > 2000 * 20_000
    assert peak < 4 * 1024 * 1024, peak  # 40 MB went out; a few messages at a time were held


# -- STORE ----------------------------------------------------------------------------------


def test_store_forms_keywords_and_unchangedsince(tmp_path: Path) -> None:
    client = filled(tmp_path, 3)
    client.ok(b"a SELECT INBOX")
    assert fetch_flags(client.ok(b"a STORE 1:2 +FLAGS (\\Flagged)")) == {
        1: b"\\Flagged", 2: b"\\Flagged"}
    assert client.ok(b"a STORE 1 -FLAGS.SILENT (\\Flagged)") == []
    lines = client.ok(b"a STORE 3 FLAGS ($Work \\Answered)")
    assert lines[0].startswith(b"* FLAGS (") and b"$Work" in lines[0]
    assert b"$Work" in code(lines, b"PERMANENTFLAGS")  # type: ignore[operator]
    assert fetch_flags(lines) == {3: b"\\Answered $Work"}
    lines = client.ok(b"a UID STORE 3 +FLAGS ($work)")  # keywords compare case-insensitively
    assert re.match(rb"\* 3 FETCH \(UID 3 FLAGS \(\\Answered \$Work\)\)", lines[0])
    (line,) = client.ok(b"a FETCH 1 MODSEQ")  # changed after 2, before 3
    modseq = int(re.search(rb"MODSEQ \((\d+)\)", line).group(1))  # type: ignore[union-attr]
    out, lines = client.run(b"a STORE 1:3 (UNCHANGEDSINCE %d) +FLAGS (\\Seen)" % modseq)
    assert (out.status, out.code) == ("OK", "MODIFIED 3")
    assert list(fetch_flags(lines)) == [1, 2] and b"MODSEQ (" in lines[0]
    out, lines = client.run(b"a UID STORE 1:3 (UNCHANGEDSINCE 1) +FLAGS.SILENT (\\Draft)")
    assert out.code == "MODIFIED 1:3" and lines == []
    assert client.run(b"a STORE 1 +FLAGS (\\Bogus)")[0].status == "BAD"
    assert client.run(b"a STORE 4 +FLAGS (\\Seen)")[0].status == "BAD"
    client.ok(b"a EXAMINE INBOX")
    assert client.run(b"a STORE 1 +FLAGS (\\Seen)")[0].status == "NO"


def test_store_while_pop3_holds_inbox_is_inuse(tmp_path: Path) -> None:
    client = filled(tmp_path, 1)
    client.ok(b"a SELECT INBOX")
    with _flock(tmp_path / POP3_LOCK) as got:
        assert got
        out, _ = client.run(b"a STORE 1 +FLAGS (\\Deleted)")
    assert (out.status, out.code) == ("NO", "INUSE")


# -- SEARCH ---------------------------------------------------------------------------------


def test_search_keys_charsets_esearch_and_searchres(tmp_path: Path) -> None:
    client = Client(tmp_path)
    client.append(MSG, flags=b"\\Seen")
    client.append(MIME)
    client.append(MSG.replace(b"hello there", b"=?utf-8?q?gr=C3=BC=C3=9Fe?="),
                  when=b"01-Jan-2020 00:00:00 +0000")
    client.ok(b"a SELECT INBOX")

    def search(q: bytes) -> bytes:
        (line,) = client.ok(b"a " + q)
        return line

    assert search(b"SEARCH ALL") == b"* SEARCH 1 2 3\r\n"
    assert search(b"SEARCH UNSEEN FROM alice") == b"* SEARCH 3\r\n"
    assert search("SEARCH CHARSET UTF-8 SUBJECT {7+}\r\ngrüße".encode()) == b"* SEARCH 3\r\n"
    assert search(b"SEARCH BODY \"first part\"") == b"* SEARCH 2\r\n"
    assert search(b"SEARCH OR TEXT body HEADER Subject parts") == b"* SEARCH 1 2 3\r\n"
    assert search(b"SEARCH BEFORE 1-Jan-2021") == b"* SEARCH 3\r\n"
    assert search(b"SEARCH NOT 1:2 LARGER 10") == b"* SEARCH 3\r\n"
    assert search(b"UID SEARCH UID 2:*") == b"* SEARCH 2 3\r\n"
    assert search(b"SEARCH RETURN (MIN MAX COUNT) SEEN") == \
        b'* ESEARCH (TAG "a") MIN 1 MAX 1 COUNT 1\r\n'
    assert search(b"UID SEARCH RETURN () ALL") == b'* ESEARCH (TAG "a") UID ALL 1:3\r\n'
    assert client.ok(b"a SEARCH RETURN (SAVE) FROM carol") == []
    assert fetch_flags(client.ok(b"a FETCH $ FLAGS")) == {2: b""}
    assert search(b"SEARCH OR $ SEEN") == b"* SEARCH 1 2\r\n"
    assert client.ok(b"a SEARCH RETURN (SAVE) OR $ SEEN") == []  # uses the $ of before
    assert search(b"UID SEARCH $") == b"* SEARCH 1 2\r\n"
    assert client.run(b"a SEARCH RETURN (SAVE) CHARSET X ALL")[0].status == "NO"
    assert search(b"SEARCH $") == b"* SEARCH\r\n"  # a failed SAVE empties it
    line = search(b"SEARCH MODSEQ 1")
    assert re.fullmatch(rb"\* SEARCH 1 2 3 \(MODSEQ \d+\)\r\n", line)
    out, _ = client.run(b"a SEARCH CHARSET KOI8-R ALL")
    assert (out.status, out.code) == ("NO", "BADCHARSET (UTF-8 US-ASCII)")
    small = Client(tmp_path, max_search_work=5)
    small.ok(b"a SELECT INBOX")
    out, _ = small.run(b"a SEARCH FROM a TO b")
    assert (out.status, out.code) == ("NO", "LIMIT")


# -- EXPUNGE, COPY, MOVE --------------------------------------------------------------------


def test_expunge_uid_expunge_and_uids_never_reused(tmp_path: Path) -> None:
    client = filled(tmp_path, 4)
    client.ok(b"a SELECT INBOX")
    client.ok(b"a STORE 1:4 +FLAGS.SILENT (\\Deleted)")
    assert client.ok(b"a UID EXPUNGE 2:3") == [b"* 3 EXPUNGE\r\n", b"* 2 EXPUNGE\r\n"]
    assert client.ok(b"a EXPUNGE") == [b"* 2 EXPUNGE\r\n", b"* 1 EXPUNGE\r\n"]
    out = client.append()
    assert out.code and out.code.endswith(" 5")
    client.ok(b"a EXAMINE INBOX")
    assert client.run(b"a EXPUNGE")[0].status == "NO"
    client.ok(b"a ENABLE QRESYNC")
    client.ok(b"a SELECT INBOX")
    client.ok(b"a STORE 1 +FLAGS (\\Deleted)")
    assert client.ok(b"a EXPUNGE") == [b"* VANISHED 5\r\n"]


def test_close_expunges_silently_unless_read_only(tmp_path: Path) -> None:
    client = filled(tmp_path, 2)
    client.ok(b"a SELECT INBOX")
    client.ok(b"a STORE 1 +FLAGS (\\Deleted)")
    client.ok(b"a EXAMINE INBOX")
    out, lines = client.run(b"a CLOSE")
    assert (out.status, out.selected, lines) == ("OK", False, [])
    assert client.ok(b"a STATUS INBOX (MESSAGES)") == [b'* STATUS "INBOX" (MESSAGES 2)\r\n']
    client.ok(b"a SELECT INBOX")
    out, lines = client.run(b"a CLOSE")
    assert (out.selected, lines) == (False, [])
    assert client.ok(b"a STATUS INBOX (MESSAGES)") == [b'* STATUS "INBOX" (MESSAGES 1)\r\n']
    client.ok(b"a SELECT INBOX")
    out, _ = client.run(b"a UNSELECT")
    assert out.selected is False


def test_copy_and_move_with_copyuid_and_trycreate(tmp_path: Path) -> None:
    client = filled(tmp_path, 3)
    client.ok(b"a SELECT INBOX")
    out, _ = client.run(b"a COPY 1:2 Archive")
    assert re.fullmatch(r"COPYUID \d+ 1:2 1:2", out.code or "")
    out, _ = client.run(b"a COPY 1 INBOX")  # into itself: a new message
    assert re.fullmatch(r"COPYUID \d+ 1 4", out.code or ""), out
    assert b"* 4 EXISTS\r\n" in list(out.untagged)
    out, lines = client.run(b"a MOVE 2:3 Trash")
    assert out.status == "OK"
    assert re.fullmatch(rb"\* OK \[COPYUID \d+ 2:3 1:2\] moved\r\n", lines[0])
    assert lines[1:] == [b"* 3 EXPUNGE\r\n", b"* 2 EXPUNGE\r\n"]
    assert client.session.changed_dirs() == [tmp_path / ".Trash", tmp_path]
    out, _ = client.run(b"a UID MOVE 1 Nowhere")
    assert (out.status, out.code) == ("NO", "TRYCREATE")
    assert client.run(b"a MOVE 1 INBOX")[0].status == "NO"
    assert client.ok(b"a STATUS Trash (MESSAGES)") == [b'* STATUS "Trash" (MESSAGES 2)\r\n']


# -- two sessions, POP3 and MX --------------------------------------------------------------


class Mirror:
    """What a client believes: applies untagged updates to its list of [UID, flags]."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.rows: list[list] = []
        for line in client.ok(b"a FETCH 1:* (UID FLAGS)"):
            self.apply(line)

    @property
    def uids(self) -> list[int]:
        return [r[0] for r in self.rows]

    def flags(self, uid: int) -> bytes:
        return next(r[1] for r in self.rows if r[0] == uid)

    def apply(self, line: bytes) -> None:
        if m := re.match(rb"\* (\d+) EXPUNGE", line):
            del self.rows[int(m.group(1)) - 1]
        elif m := re.match(rb"\* (\d+) EXISTS", line):
            assert int(m.group(1)) >= len(self.rows)  # EXISTS never shrinks the mailbox
            while len(self.rows) < int(m.group(1)):
                self.rows.append([0, b""])
        elif m := re.match(rb"\* (\d+) FETCH \((?:UID (\d+) )?FLAGS \(([^)]*)\)", line):
            seq = int(m.group(1))
            while len(self.rows) < seq:
                self.rows.append([0, b""])
            row = self.rows[seq - 1]
            if m.group(2):
                assert row[0] in (0, int(m.group(2)))
                row[0] = int(m.group(2))
            row[1] = m.group(3)

    def catch_up(self) -> None:
        for line in self.client.session.updates():
            self.apply(line)
        if 0 in self.uids:
            for line in self.client.ok(b"a UID FETCH 1:* (UID FLAGS)"):
                self.apply(line)


def test_two_sessions_see_each_others_changes_in_a_legal_order(tmp_path: Path) -> None:
    a = filled(tmp_path, 6)
    b = Client(tmp_path)
    a.ok(b"a SELECT INBOX")
    b.ok(b"a SELECT INBOX")
    mirror = Mirror(b)
    assert mirror.uids == [1, 2, 3, 4, 5, 6]
    a.ok(b"a STORE 2,4,5 +FLAGS (\\Deleted)")
    a.ok(b"a STORE 6 +FLAGS (\\Flagged)")
    a.ok(b"a EXPUNGE")
    a.append()
    deliver(tmp_path, "1900000000.M1P1.host")
    # during a FETCH by sequence number, b hears of flags and new mail but of no expunge
    lines = b.ok(b"a FETCH 1 FLAGS")
    assert not any(b"EXPUNGE" in x for x in lines)
    assert b"* 8 EXISTS\r\n" in lines
    for line in lines:
        mirror.apply(line)
    mirror.catch_up()
    assert mirror.uids == [1, 3, 6, 7, 8]
    assert mirror.flags(6) == b"\\Flagged" and mirror.flags(1) == b""
    # and b's changes reach a
    b.ok(b"a STORE 1 +FLAGS (\\Seen)")
    assert fetch_flags(a.session.updates()) == {1: b"\\Seen"}
    assert a.session.updates() == []


def test_pop3_dele_is_an_expunge_and_delivery_is_exists(tmp_path: Path) -> None:
    a = filled(tmp_path, 3)
    a.ok(b"a SELECT INBOX")
    pop = POP3Mailbox.open(tmp_path)
    try:
        pop.delete([1])
    finally:
        pop.close()
    assert a.session.updates() == [b"* 2 EXPUNGE\r\n"]
    deliver(tmp_path, "1900000000.M2P1.host")
    assert a.session.updates() == [b"* 3 EXISTS\r\n", b"* 1 RECENT\r\n"]
    assert a.session.watched == tmp_path
    assert a.ok(b"a UID SEARCH ALL") == [b"* SEARCH 1 3 4\r\n"]


def test_commands_rescan_at_most_every_sync_interval_but_own_changes_at_once(
        tmp_path: Path) -> None:
    """A burst of STOREs does not rescan the mailbox after each (mbsync sends one per
    message); NOOP (updates) always does, and the session's own EXPUNGE is reported at once."""
    a = filled(tmp_path, 3, sync_interval=3600.0)
    a.ok(b"a SELECT INBOX")
    deliver(tmp_path, "1900000000.M3P1.host")
    assert fetch_flags(a.ok(b"a STORE 1 +FLAGS (\\Seen)")) == {1: b"\\Seen"}  # no EXISTS yet
    assert a.ok(b"a UID STORE 2 +FLAGS.SILENT (\\Deleted)") == []
    assert a.ok(b"a EXPUNGE")[0] == b"* 2 EXPUNGE\r\n"  # its own: at once, with the rest
    assert a.session.updates() == []
    deliver(tmp_path, "1900000001.M4P1.host")
    assert a.ok(b"a CHECK") == [b"* 4 EXISTS\r\n", b"* 2 RECENT\r\n"]


def test_a_message_renamed_by_another_session_is_still_fetched(tmp_path: Path) -> None:
    a = filled(tmp_path, 1)
    b = Client(tmp_path)
    a.ok(b"a SELECT INBOX")
    b.ok(b"a SELECT INBOX")
    b.ok(b"a STORE 1 +FLAGS (\\Answered)")  # renames the file a knows
    lines = a.ok(b"a FETCH 1 BODY.PEEK[HEADER.FIELDS (SUBJECT)]")
    assert lines[0] == b'* 1 FETCH (BODY[HEADER.FIELDS (SUBJECT)] {24}\r\n' \
        b"Subject: hello there\r\n\r\n)\r\n"
    assert fetch_flags(lines[1:]) == {1: b"\\Answered"}


# -- against the reference Dovecot ------------------------------------------------------------


def test_a_scripted_session_agrees_with_dovecot(tmp_path: Path, reference_dovecot: int) -> None:
    """The same messages (same files, flags and dates) in Dovecot and in a MailSession:
    STATUS and EXAMINE counts, FETCH (FLAGS RFC822.SIZE ENVELOPE BODYSTRUCTURE) and SEARCH
    results agree. Messages are matched by (size, envelope): the two number them alike
    only by chance of directory order."""
    import imaplib
    import shutil

    from tests.protocol.test_imap_message import (
        DIFFERENTIAL,
        LETTERS,
        MAILDIRS,
        MTIMES,
        _imap_values,
        _normalise,
        _responses,
    )

    folder = f"mailfort-session-{os.getpid()}"
    dove_box = MAILDIRS / "alice" / f".{folder}"
    ours_box = tmp_path / f".{folder}"
    created = [p for p in (MAILDIRS, MAILDIRS / "alice") if not p.exists()]
    for box in (dove_box, ours_box):
        for sub in ("cur", "new", "tmp"):
            (box / sub).mkdir(parents=True, exist_ok=True)
        (box / "maildirfolder").touch()
        for i, data in enumerate(DIFFERENTIAL.values()):
            path = box / "cur" / f"{1700000000 + i}.M{i}P1.mailfort:2,{LETTERS[i]}"
            path.write_bytes(data)
            os.utime(path, (MTIMES[i], MTIMES[i]))
    for path in [*created, dove_box, *dove_box.rglob("*")]:
        os.chown(path, 5000, 5000)
    searches = ["ALL", "UNSEEN", "FLAGGED", "SUBJECT original", "FROM example.test",
                'BODY "inner two"', "TEXT minutes", "LARGER 300", "OR SEEN FROM fwd",
                "NOT SUBJECT x", "SENTBEFORE 1-Jan-2000", "BEFORE 6-Dec-2026"]
    items = "(FLAGS RFC822.SIZE ENVELOPE BODYSTRUCTURE)"
    try:
        imap = imaplib.IMAP4("127.0.0.1", reference_dovecot, timeout=10)
        try:
            imap.login("alice", "alicepw")
            typ, data = imap.status(f'"{folder}"', "(MESSAGES UNSEEN)")
            assert typ == "OK"
            dove_status = _imap_values(data[0])[1]
            typ, data = imap.select(f'"{folder}"', readonly=True)
            dove_exists = int(data[0])
            typ, data = imap.fetch("1:*", items)
            dove_fetch = _responses(data)
            dove_search = {c: {int(n) for n in imap.search(None, c)[1][0].split()}
                           for c in searches}
        finally:
            imap.logout()
    finally:
        shutil.rmtree(dove_box, ignore_errors=True)

    client = Client(tmp_path)
    (line,) = client.ok(b"a STATUS " + folder.encode() + b" (MESSAGES UNSEEN)")
    assert _imap_values(line[2:])[2] == dove_status
    lines = client.ok(b"a EXAMINE " + folder.encode())
    assert f"* {dove_exists} EXISTS\r\n".encode() in lines
    raw = b"".join(x[2:].replace(b" FETCH ", b" ", 1) for x in client.ok(
        b"a FETCH 1:* " + items.encode()))
    values = _imap_values(raw)
    ours_fetch = dict(zip(values[0::2], values[1::2], strict=True))

    def table(fetched: dict) -> dict[int, tuple]:
        out = {}
        for seq, pairs in fetched.items():
            d = dict(zip(pairs[0::2], pairs[1::2], strict=True))
            flags = sorted(f for f in d[b"FLAGS"] if f != b"\\Recent")
            out[seq] = (d[b"RFC822.SIZE"], repr(d[b"ENVELOPE"]), flags,
                        repr(_normalise(d[b"BODYSTRUCTURE"])))
        return out

    ours_t, dove_t = table(ours_fetch), table(dove_fetch)
    assert sorted(ours_t.values()) == sorted(dove_t.values())
    for criteria in searches:
        (line,) = client.ok(b"a SEARCH " + criteria.encode())
        ours = {ours_t[int(n)][:2] for n in line.split()[2:]}
        assert ours == {dove_t[n][:2] for n in dove_search[criteria]}, criteria


def test_envelopes_come_from_the_cache_the_second_time_and_the_cache_is_bounded(
        tmp_path: Path) -> None:
    """A file's octets never change under its name: the second ENVELOPE fetch reads no
    file (shown by moving the files away behind the session's back, which a real client
    would never see answered from disk), and the cache holds to its byte limit."""
    from mailfort.server import imap_commands

    client = filled(tmp_path, 3)
    client.ok(b"a SELECT INBOX")
    first = client.ok(b"a FETCH 1:3 ENVELOPE")
    hidden = tmp_path / "hidden"
    (tmp_path / "cur").rename(hidden)
    try:
        assert client.ok(b"a FETCH 1:3 ENVELOPE") == first
        assert client.ok(b"a FETCH 1:3 BODY.PEEK[TEXT]") == []  # not cached: files are gone
    finally:
        hidden.rename(tmp_path / "cur")
    cache = imap_commands._Cache(64 * 1000)
    for i in range(200):
        cache.add(("box", f"m{i}"), "ENVELOPE", b"x" * 500)
    assert cache._size <= 64 * 1000 and cache.get(("box", "m199")) and not cache.get(("box", "m0"))
    cache.add(("box", "big"), "ENVELOPE", b"x" * 2000)  # over 1/64 of the limit: not kept
    assert cache.get(("box", "big")) == {}


def test_sessions_that_caught_up_share_one_view_of_the_mailbox(tmp_path: Path) -> None:
    """Sessions of one user idle on the same mailbox share its snapshot: one more session
    on a 2,000-message INBOX costs a few KB, not a copy of every message's facts; a session
    that changes flags copies, and shares again once caught up."""
    cur = tmp_path / "cur"
    for sub in ("tmp", "new", "cur"):
        (tmp_path / sub).mkdir()
    for i in range(2000):
        (cur / f"1700000000.M{i}P1.host,S={len(MSG)},W={len(MSG)}:2,").write_bytes(MSG)
    first = Client(tmp_path)
    first.ok(b"a SELECT INBOX")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        others = [Client(tmp_path) for _ in range(20)]
        for c in others:
            c.ok(b"a SELECT INBOX")
        per_session = (tracemalloc.get_traced_memory()[0] - before) / len(others)
    finally:
        tracemalloc.stop()
    assert per_session < 40_000, per_session
    first.ok(b"a STORE 1 +FLAGS (\\Seen)")
    for c in others:
        assert fetch_flags(c.session.updates()) == {1: b"\\Seen"}
    first.session.updates()
    assert all(c.session.view.info is first.session.view.info for c in others)  # type: ignore[union-attr]


def test_shared_views_get_what_an_own_copy_gets_from_one_difference(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Views that share the mailbox's snapshot take their updates from one difference of
    the two snapshots, worked out once (IDLE wake-ups of many sessions); what they report
    is what a session with a copy of its own is told, with CONDSTORE's MODSEQ too."""
    from mailfort.server import imap_commands

    writer = filled(tmp_path, 3)
    writer.ok(b"a SELECT INBOX")
    shared = [Client(tmp_path) for _ in range(3)]
    own = Client(tmp_path)
    for c in [*shared, own]:
        c.ok(b"a ENABLE IMAP4rev2")  # no RECENT, which only one session is told
    shared[2].ok(b"a ENABLE CONDSTORE")
    for c in [*shared, own]:
        c.ok(b"a SELECT INBOX")
        c.session.updates()
    assert all(c.session.view.shared for c in shared)  # type: ignore[union-attr]
    MailSession._own(own.session.view)  # type: ignore[arg-type]  # its own copy
    worked = 0
    real = imap_commands._difference

    def counted(box: object, old: object, new: object) -> object:
        nonlocal worked
        found = imap_commands._DIFFERENCES.get(box)  # type: ignore[call-overload]
        worked += not (found is not None and found[0] is old and found[1] is new)
        return real(box, old, new)  # type: ignore[arg-type]

    monkeypatch.setattr(imap_commands, "_difference", counted)
    writer.ok(b"a STORE 2 +FLAGS ($Important \\Seen)")
    deliver(tmp_path, "1700000009.M1P1.host")
    woken = time.monotonic()  # as IDLE's wake-up: after the changes
    got = [c.session.updates(woken) for c in shared]
    expected = own.session.updates()
    assert got[0] == got[1] == expected
    assert expected[0].startswith(b"* FLAGS (") and b"$Important" in expected[0]
    assert expected[2:] == [b"* 2 FETCH (FLAGS (\\Seen $Important))\r\n", b"* 4 EXISTS\r\n"]
    assert re.fullmatch(rb"\* 2 FETCH \(FLAGS \(\\Seen \$Important\) MODSEQ \(\d+\)\)\r\n",
                        got[2][2])
    assert worked == 1
    assert fetch_flags(own.ok(b"a FETCH 1:* FLAGS")) == \
        fetch_flags(shared[0].ok(b"a FETCH 1:* FLAGS"))


def test_a_shared_scan_serves_only_if_begun_after_the_sessions_last_updates(
        tmp_path: Path) -> None:
    """IDLE's ``updates(since)`` takes another session's scan only if it began after the
    wake-up *and* after this session's previous ``updates`` ended: that call may have taken
    in a snapshot newer than an older scan, and the older scan's snapshot would then look
    like expunged messages or flags going back to this view."""
    client = filled(tmp_path, 2)
    client.ok(b"a SELECT INBOX")
    box = client.session.view.box  # type: ignore[union-attr]
    woken = time.monotonic()
    client.session.updates()  # a scan of its own, begun after ``woken``
    scans = box.scans
    client.session.updates(woken)  # that scan began before this session's view: looks again
    assert box.scans == scans + 1
    other = Client(tmp_path)
    other.ok(b"a SELECT INBOX")
    other.session.updates()
    scans = box.scans
    woken = time.monotonic()  # one change wakes both, after their last updates
    client.session.updates(woken)  # no scan since: looks
    other.session.updates(woken)  # the one just made began after both: shared
    assert box.scans == scans + 1


def test_a_subscriptions_file_written_by_dovecot_is_read(tmp_path: Path) -> None:
    """Dovecot's Maildir++ ``subscriptions`` (version line, levels split by a tab) is the
    same file: a user moving from Dovecot keeps the folders the client shows."""
    client = Client(tmp_path)
    client.ok(b"a CREATE Lists.python")
    (tmp_path / "subscriptions").write_text("V\t2\n\nINBOX\nLists\tpython\n")
    lines = client.ok(b'a LSUB "" "*"')
    assert lines == [b'* LSUB () "." "INBOX"\r\n', b'* LSUB () "." "Lists.python"\r\n']


def test_condstore_select_parameter_and_move_under_qresync(tmp_path: Path) -> None:
    client = filled(tmp_path, 3)
    lines = client.ok(b"a SELECT INBOX (CONDSTORE)")
    assert code(lines, b"HIGHESTMODSEQ")
    (line,) = client.ok(b"a STORE 1 +FLAGS (\\Flagged)")  # enabled: STORE tells MODSEQ
    assert re.fullmatch(rb"\* 1 FETCH \(FLAGS \(\\Flagged\) MODSEQ \(\d+\)\)\r\n", line)
    assert client.run(b"a SELECT INBOX (BOGUS)")[0].status == "BAD"
    client.ok(b"a ENABLE QRESYNC")
    client.ok(b"a SELECT INBOX")
    lines = client.ok(b"a MOVE 2:3 Trash")
    assert lines[1:] == [b"* VANISHED 2:3\r\n"]
    assert client.ok(b"a UID FETCH 1 FLAGS") == [b"* 1 FETCH (UID 1 FLAGS (\\Flagged))\r\n"]


def test_concurrent_sessions_in_threads_lose_no_flag_and_agree(tmp_path: Path) -> None:
    """Two sessions of one user in two threads (the driver runs each in a worker thread)
    add different flags (renames) and keywords to the same messages while mail arrives:
    no change is lost, and both views end equal to the store's."""
    import threading

    a, b = filled(tmp_path, 10), Client(tmp_path)
    a.ok(b"a SELECT INBOX")
    b.ok(b"a SELECT INBOX")
    errors: list[BaseException] = []

    def work(client: Client, keyword: bytes) -> None:
        try:
            for n in range(1, 11):
                client.ok(b"a STORE %d +FLAGS (%s)" % (n, keyword))
                client.ok(b"a FETCH %d (FLAGS BODY.PEEK[HEADER])" % n)
                client.session.updates()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(a, b"$A \\Flagged")),
               threading.Thread(target=work, args=(b, b"$B \\Answered"))]
    for t in threads:
        t.start()
    for i in range(5):
        deliver(tmp_path, f"1900000100.M{i}P9.host")
    for t in threads:
        t.join()
    assert not errors, errors
    for c in (a, b):
        c.session.updates()
    truth = {m.uid: m.flags for m in a.session.store.mailbox("INBOX").messages()}
    assert all({"$A", "$B", "\\Flagged", "\\Answered"} <= truth[u] for u in range(1, 11))
    for c in (a, b):
        view = c.session.view
        assert view is not None and view.uids == sorted(truth)
        assert {u: view.info[u].flags for u in view.uids} == truth


def _other_process_changes(maildir: str) -> None:
    """Runs in a child process: a session of its own (its own MailStore and UID map)."""
    other = Client(Path(maildir))
    other.ok(b"a SELECT INBOX")
    other.ok(b"a STORE 2 +FLAGS (\\Deleted)")
    other.ok(b"a STORE 3 +FLAGS ($Other)")
    other.ok(b"a EXPUNGE")


def test_changes_made_by_a_session_in_another_process_are_reported(tmp_path: Path) -> None:
    """Another worker process (no shared memory, only the files and the UID map) expunges
    and flags: this session's NOOP reports both, numbers renumbered."""
    import multiprocessing

    client = filled(tmp_path, 3)
    client.ok(b"a SELECT INBOX")
    child = multiprocessing.get_context("fork").Process(target=_other_process_changes,
                                                         args=(str(tmp_path),))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    lines = client.session.updates()
    assert lines[0] == b"* 2 EXPUNGE\r\n"
    assert lines[1].startswith(b"* FLAGS (") and b"$Other" in lines[1]
    assert fetch_flags(lines) == {2: b"$Other"}


# -- what the process keeps between sessions -------------------------------------------------


def test_a_new_session_after_the_maildir_was_emptied_and_refilled_sees_the_new_mail(
        tmp_path: Path) -> None:
    """The store and snapshot a finished session leaves in the process are never taken for
    a map made anew: same HIGHESTMODSEQ, other UIDVALIDITY, other messages."""
    for i in range(2):
        deliver(tmp_path, f"1700000000.M{i}P1.host", MSG)
    first = Client(tmp_path)
    lines = first.ok(b"a SELECT INBOX")
    assert b"* 2 EXISTS\r\n" in lines
    validity = code(lines, b"UIDVALIDITY")
    first.session.close()
    del first
    for sub in ("new", "cur"):
        for f in (tmp_path / sub).iterdir():
            f.unlink()
    (tmp_path / "mailfort-imap.uids").unlink()
    for i in range(5):
        deliver(tmp_path, f"1700000100.M{i}P1.host", MSG.replace(b"hello", b"fresh"))
    second = Client(tmp_path)
    lines = second.ok(b"a SELECT INBOX")
    assert b"* 5 EXISTS\r\n" in lines and code(lines, b"UIDVALIDITY") != validity
    assert second.ok(b"a UID SEARCH SUBJECT fresh") == [b"* SEARCH 1 2 3 4 5\r\n"]


def test_search_probe_keeps_answers_of_headers_read_before_a_flag_change(
        tmp_path: Path) -> None:
    """Headers cached by path: a flag change renames the file, the search reads the new
    name's header and answers the same."""
    c = filled(tmp_path, 3)
    c.ok(b"a SELECT INBOX")
    assert c.ok(b"a UID SEARCH SUBJECT hello") == [b"* SEARCH 1 2 3\r\n"]
    c.ok(b"a UID STORE 2 +FLAGS (\\Seen)")
    assert c.ok(b"a UID SEARCH SUBJECT hello") == [b"* SEARCH 1 2 3\r\n"]
    assert c.ok(b"a UID SEARCH SUBJECT hello SEEN") == [b"* SEARCH 2\r\n"]
    assert c.ok(b"a UID SEARCH SUBJECT nothere") == [b"* SEARCH\r\n"]
    assert c.ok(b"a UID SEARCH BODY BODY") == [b"* SEARCH 1 2 3\r\n"]


def test_a_map_made_anew_with_the_old_uidvalidity_is_not_taken_for_the_old_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Map and UIDVALIDITY record both lost, within one second: the new map gets the old
    UIDVALIDITY and the old HIGHESTMODSEQ. The process's snapshot of the old map (and the
    file paths in it) must still not answer for the new one."""
    from mailfort.store import uidmap
    monkeypatch.setattr(uidmap.time, "time", lambda: 1796000000.0)
    for i in range(2):
        deliver(tmp_path, f"1700000000.M{i}P1.host", MSG)
    first = Client(tmp_path)  # its special folders took UIDVALIDITYs: forget them
    (tmp_path / "mailfort-imap.validity").unlink()
    assert b"* 2 EXISTS\r\n" in first.ok(b"a SELECT INBOX")
    first.ok(b"a FETCH 1:* (ENVELOPE BODY.PEEK[HEADER])")  # the caches hold the old files
    first.session.close()
    del first
    for sub in ("new", "cur"):
        for f in (tmp_path / sub).iterdir():
            f.unlink()
    for name in ("mailfort-imap.uids", "mailfort-imap.validity"):
        (tmp_path / name).unlink()
    for i in range(2):
        deliver(tmp_path, f"1700000100.M{i}P1.host", MSG.replace(b"hello", b"fresh"))
    second = Client(tmp_path)
    assert b"* 2 EXISTS\r\n" in second.ok(b"a SELECT INBOX")
    lines = second.ok(b"a FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert all(b"fresh" in line for line in lines if b"FETCH" in line), lines


def test_a_message_swapped_for_a_symlink_is_neither_searched_nor_copied(tmp_path: Path) -> None:
    """A listed message replaced by a link to a file the service user can read: SEARCH
    must not match the linked file's text, FETCH and COPY must not serve or copy it."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"Subject: secret\r\n\r\nroot's eyes only\r\n")
    client = filled(tmp_path / "u", 2)
    client.ok(b"a SELECT INBOX")
    (path,) = [p for p in (tmp_path / "u").glob("*/*") if p.parent.name in ("new", "cur")
               and p.is_file()][:1]
    path.unlink()
    path.symlink_to(secret)
    (line,) = client.ok(b"a SEARCH BODY eyes")
    assert line == b"* SEARCH\r\n"
    _, lines = client.run(b"a FETCH 1:* BODY.PEEK[]")
    assert not any(b"eyes" in x for x in lines)
    client.ok(b"a CREATE Other")
    client.run(b"a COPY 1:* Other")
    copied = [p for p in (tmp_path / "u" / ".Other").glob("*/*") if p.is_file()]
    assert all(b"eyes" not in p.read_bytes() for p in copied)
