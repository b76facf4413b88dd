"""Sieve at local delivery, end to end: real sockets, real clients (smtplib, imaplib), a
recording remote SMTP server reached through the test DNS, SPF from the test DNS.

fileinto a folder (visible over IMAP, with its flags), reject at DATA (550, nothing
stored), the 452 that keeps a rejecting recipient alone in its transaction, redirect
(local and remote, with the limits), discard, a broken script (INBOX), a global before
script, and the vacation responder that answers an authenticated sender once and never a
forged one or a list.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import imaplib
import logging
import os
import shutil
import smtplib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailfort.server.app import Node
from mailfort.store.maildir import maildir_for
from mailfort.store.sieve_scripts import ScriptStore
from tests.conftest import refusing_dns_port, seed_directory
from tests.delivery.receiver import Receiver
from tests.dnsserver import DNSServer
from tests.server.test_outbound import FAST_QUEUE, mx_to_loopback, wait_for

ALICE = "alice@example.test"
BOB = "bob@example.test"


@dataclass
class World:
    node: Node
    remote: Receiver  # every remote domain's MX
    dns: DNSServer

    @property
    def mx(self) -> int:
        return self.node.port("mx")

    def script(self, user: str, text: str) -> None:
        store = ScriptStore(maildir_for(self.node.cfg.mail_path, user))
        store.put("main", text.encode())
        store.set_active("main")

    def files(self, user: str, folder: str = "") -> list[Path]:
        md = maildir_for(self.node.cfg.mail_path, user)
        if folder:
            md = md / f".{folder}"
        return sorted(p for sub in ("new", "cur") if (md / sub).is_dir()
                      for p in (md / sub).iterdir())


WorldFactory = Callable[..., Any]


@pytest.fixture
async def world(config_factory: Callable[..., Any], server_ssl_context: ssl.SSLContext,
                dns_server: DNSServer, receivers: Any,
                tmp_path: Path) -> AsyncIterator[WorldFactory]:
    async with contextlib.AsyncExitStack() as stack:

        async def factory(**sections: dict[str, Any]) -> World:
            remote = await receivers()
            for domain in ("remote.test", "pass.test", "fail.test", "lists.test"):
                mx_to_loopback(dns_server, domain)
            dns_server.add_txt("pass.test", "v=spf1 ip4:127.0.0.1 -all")
            dns_server.add_txt("fail.test", "v=spf1 ip4:192.0.2.1 -all")
            dns_server.add_txt("lists.test", "v=spf1 ip4:127.0.0.1 -all")
            cfg = config_factory(dns=dns_server.config(timeout=1.0),
                                 queue={**FAST_QUEUE, "mx_port": remote.port},
                                 delivery={"allow_private_destinations": True}, **sections)
            seed_directory(cfg)
            node = await stack.enter_async_context(Node(cfg, ssl_context=server_ssl_context))
            return World(node, remote, dns_server)

        yield factory


def letter(frm: str, to: str = ALICE, subject: str = "hello", **extra: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = frm
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = email.utils.make_msgid(domain="client.test")
    for k, v in extra.items():
        msg[k.replace("_", "-")] = v
    msg.set_content("body\n")
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def send(port: int, sender: str, rcpts: list[str], data: bytes) -> tuple[int, bytes]:
    """One MX transaction; the reply to the data (or the first refused command's)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.remote.test")
        s.mail(sender)
        for r in rcpts:
            code, text = s.rcpt(r)
            if code != 250:
                return code, text
        return s.data(data)


async def test_fileinto_a_new_folder_with_flags_is_seen_over_imap(
        world: WorldFactory, client_ssl_context: ssl.SSLContext) -> None:
    w = await world()
    w.script(ALICE, 'require ["fileinto", "imap4flags", "mailbox"];\n'
                    'if header :contains "Subject" "report" {\n'
                    '  fileinto :create :flags "\\\\Flagged" "Reports";\n}\n')
    code, _ = await asyncio.to_thread(send, w.mx, "a@remote.test", [ALICE],
                                      letter("a@remote.test", subject="weekly report"))
    assert code == 250
    await asyncio.to_thread(send, w.mx, "a@remote.test", [ALICE], letter("a@remote.test"))
    assert len(w.files(ALICE)) == 1  # the other one: INBOX
    (filed,) = w.files(ALICE, "Reports")
    assert filed.parent.name == "cur" and filed.name.endswith(":2,F")

    def imap() -> tuple[list[bytes], bytes]:
        c = imaplib.IMAP4("127.0.0.1", w.node.port("imap"), timeout=10)
        c.starttls(client_ssl_context)
        c.login(ALICE, "alice-pw")
        _, listing = c.list()
        c.select("Reports")
        _, data = c.fetch("1", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        c.logout()
        return listing, b"".join(x if isinstance(x, bytes) else b"".join(x) for x in data)

    listing, fetched = await asyncio.to_thread(imap)
    assert any(b'"Reports"' in line or line.endswith(b" Reports") for line in listing)
    assert b"\\Flagged" in fetched and b"weekly report" in fetched


async def test_fileinto_a_missing_folder_without_create_keeps_in_inbox(
        world: WorldFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailfort.sieve")
    w = await world()
    w.script(ALICE, 'require "fileinto";\nfileinto "Nowhere";\n')
    assert (await asyncio.to_thread(send, w.mx, "a@remote.test", [ALICE],
                                    letter("a@remote.test")))[0] == 250
    assert len(w.files(ALICE)) == 1 and not w.files(ALICE, "Nowhere")
    assert "no such folder" in caplog.text


async def test_reject_is_a_550_in_the_session_and_nothing_is_stored(
        world: WorldFactory) -> None:
    w = await world()
    w.script(ALICE, 'require "reject";\nif header :contains "Subject" "offer" '
                    '{ reject "No offers, thank you"; }\n')
    code, text = await asyncio.to_thread(send, w.mx, "a@remote.test", [ALICE],
                                         letter("a@remote.test", subject="great offer"))
    assert code == 550 and text == b"5.7.1 No offers, thank you"
    assert w.files(ALICE) == []
    assert w.node.queue.list() == []  # never a bounce
    code, _ = await asyncio.to_thread(send, w.mx, "a@remote.test", [ALICE],
                                      letter("a@remote.test", subject="hi"))
    assert code == 250 and len(w.files(ALICE)) == 1


async def test_a_rejecting_recipient_gets_its_own_transaction(world: WorldFactory) -> None:
    """RCPT after a recipient whose script can reject, or of such a recipient after
    another: 452 4.5.3; the client sends it again in a new transaction."""
    w = await world()
    w.script(ALICE, 'require "reject";\nif header :contains "Subject" "x" { reject "no"; }\n')

    def session(rcpts: list[str]) -> list[tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", w.mx, timeout=30) as s:
            s.ehlo("client.remote.test")
            s.mail("a@remote.test")
            return [s.rcpt(r) for r in rcpts]

    assert [c for c, _ in await asyncio.to_thread(session, [ALICE, BOB])] == [250, 452]
    replies = await asyncio.to_thread(session, [BOB, ALICE])
    assert replies[1] == (452, b"4.5.3 Too many recipients: a filter of this recipient "
                                b"answers alone, send the others in a new transaction")
    # sendmail with both: the 452 one is refused, the other delivered; then its own.

    def both() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", w.mx, timeout=30) as s:
            return s.sendmail("a@remote.test", [ALICE, BOB], letter("a@remote.test"))

    refused = await asyncio.to_thread(both)
    assert list(refused) == [BOB] and refused[BOB][0] == 452
    assert len(w.files(ALICE)) == 1 and w.files(BOB) == []
    code, _ = await asyncio.to_thread(send, w.mx, "a@remote.test", [BOB],
                                      letter("a@remote.test", subject="x"))
    assert code == 250 and len(w.files(BOB)) == 1


async def test_redirect_local_and_remote_with_srs_and_the_daily_limit(
        world: WorldFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailfort.sieve")
    w = await world(sieve={"redirects_per_day": 2})
    w.script(ALICE, 'redirect "far@remote.test";\nredirect "bob@example.test";\n')
    code, _ = await asyncio.to_thread(send, w.mx, "a@pass.test", [ALICE],
                                      letter("a@pass.test"))
    assert code == 250
    assert len(w.files(BOB)) == 1 and w.files(ALICE) == []
    await wait_for(lambda: len(w.remote.messages) == 1, "the redirect at the remote")
    got = w.remote.messages[0]
    assert got.recipients == ["far@remote.test"]
    assert got.sender.startswith("SRS0=") and got.sender.endswith("@example.test")
    # The day's two are spent: the next message stays in INBOX, said in the log.
    await asyncio.to_thread(send, w.mx, "a@pass.test", [ALICE], letter("a@pass.test"))
    assert len(w.files(ALICE)) == 1 and len(w.files(BOB)) == 1
    assert "over redirects_per_day (2)" in caplog.text


async def test_over_max_redirects_in_one_run_keeps_in_inbox(
        world: WorldFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailfort.sieve")
    w = await world(sieve={"max_redirects": 1})
    w.script(ALICE, 'redirect "far@remote.test";\nredirect "bob@example.test";\n')
    code, _ = await asyncio.to_thread(send, w.mx, "a@pass.test", [ALICE],
                                      letter("a@pass.test"))
    assert code == 250 and len(w.files(ALICE)) == 1 and w.files(BOB) == []
    assert "message kept" in caplog.text and w.node.queue.list() == []


async def test_discard_stores_nothing_and_answers_250(world: WorldFactory) -> None:
    w = await world()
    w.script(ALICE, 'if header :contains "Subject" "junk" { discard; }\n')
    code, _ = await asyncio.to_thread(send, w.mx, "a@remote.test", [ALICE],
                                      letter("a@remote.test", subject="junk mail"))
    assert code == 250 and w.files(ALICE) == []


async def test_a_broken_script_delivers_to_inbox_and_says_why(
        world: WorldFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailfort.sieve")
    w = await world()
    w.script(ALICE, 'if header :contains "Subject" {{{ discard\n')
    code, _ = await asyncio.to_thread(send, w.mx, "a@remote.test", [ALICE],
                                      letter("a@remote.test"))
    assert code == 250 and len(w.files(ALICE)) == 1
    assert "does not compile" in caplog.text


async def test_global_before_script_files_spam_into_junk(world: WorldFactory,
                                                         tmp_path: Path) -> None:
    before = tmp_path / "before.sieve"
    before.write_text('require "fileinto";\nif header :is "X-Spam" "yes" '
                      '{ fileinto "Junk"; }\n')
    w = await world(sieve={"before": str(before)})
    await asyncio.to_thread(send, w.mx, "a@remote.test", [ALICE],
                            letter("a@remote.test", X_Spam="yes"))
    await asyncio.to_thread(send, w.mx, "a@remote.test", [ALICE], letter("a@remote.test"))
    assert len(w.files(ALICE, "Junk")) == 1 and len(w.files(ALICE)) == 1


VACATION = ('require "vacation";\n'
            'vacation :days 3 :subject "Away" "I am away until Monday.";\n')


async def test_vacation_answers_an_authenticated_sender_once(
        world: WorldFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailfort.sieve")
    w = await world()
    w.script(ALICE, VACATION)
    first = letter("friend@pass.test")
    await asyncio.to_thread(send, w.mx, "friend@pass.test", [ALICE], first)
    await wait_for(lambda: len(w.remote.messages) == 1, "the vacation reply")
    reply = w.remote.messages[0]
    assert reply.sender == "" and reply.recipients == ["friend@pass.test"]
    parsed = email.message_from_bytes(reply.data)
    assert parsed["Auto-Submitted"].startswith("auto-replied")
    assert parsed["Subject"] == "Away" and parsed["From"] == ALICE
    assert parsed["In-Reply-To"] == email.message_from_bytes(first)["Message-ID"]
    assert "I am away until Monday." in parsed.get_payload()
    # Within :days: none again; the message itself is stored both times.
    await asyncio.to_thread(send, w.mx, "friend@pass.test", [ALICE], letter("friend@pass.test"))
    await wait_for(lambda: "already answered within the period" in caplog.text, "the log")
    assert len(w.remote.messages) == 1 and len(w.files(ALICE)) == 2


async def test_vacation_with_discard_still_answers(world: WorldFactory) -> None:
    w = await world()
    w.script(ALICE, 'require "vacation";\nvacation "Away.";\ndiscard;\n')
    code, _ = await asyncio.to_thread(send, w.mx, "friend@pass.test", [ALICE],
                                      letter("friend@pass.test"))
    assert code == 250 and w.files(ALICE) == []
    await wait_for(lambda: len(w.remote.messages) == 1, "the vacation reply")


@pytest.mark.parametrize(("sender", "extra", "why"), [
    ("victim@fail.test", {}, "sender not authenticated"),  # forged: SPF fail
    ("victim@remote.test", {}, "sender not authenticated"),  # no SPF at all
    ("news@lists.test", {"List_Id": "<news.lists.test>"}, "mailing list"),
    ("news@lists.test", {"Precedence": "bulk"}, "Precedence: bulk"),
    ("bot@pass.test", {"Auto_Submitted": "auto-generated"}, "Auto-Submitted"),
    ("owner-news@pass.test", {}, "system or list address"),
])
async def test_vacation_never_answers_forged_senders_lists_or_robots(
        world: WorldFactory, caplog: pytest.LogCaptureFixture, sender: str,
        extra: dict[str, str], why: str) -> None:
    caplog.set_level(logging.INFO, logger="mailfort.sieve")
    w = await world()
    w.script(ALICE, VACATION)
    code, _ = await asyncio.to_thread(send, w.mx, sender, [ALICE], letter(sender, **extra))
    assert code == 250
    await wait_for(lambda: f"vacation for {ALICE} to <{sender}>: not sent" in caplog.text,
                   "the vacation decision")
    assert why in caplog.text
    await asyncio.sleep(0.3)
    assert w.remote.messages == [] and w.node.queue.list() == []


async def test_vacation_answers_a_local_user_who_submitted_with_auth(
        world: WorldFactory, client_ssl_context: ssl.SSLContext) -> None:
    """Submission with SMTP AUTH is an authenticated sender; the reply to a local user is
    stored in their Maildir, and the original reaches the user on vacation."""
    from tests.server.test_outbound import submit

    w = await world()
    w.script(ALICE, VACATION)
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = BOB, ALICE, "lunch?"
    msg.set_content("today?\n")
    await asyncio.to_thread(submit, w.node.port("submission"), client_ssl_context, msg,
                            [ALICE], user=BOB, password="bob-pw")
    await wait_for(lambda: len(w.files(BOB)) == 1, "the reply in bob's INBOX")
    reply = email.message_from_bytes(w.files(BOB)[0].read_bytes())
    assert reply["Subject"] == "Away" and reply["Auto-Submitted"].startswith("auto-replied")
    assert len(w.files(ALICE)) == 1 and w.remote.messages == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mailfort serve as root with "
                    "server.user reads the global script before the privilege drop")
@pytest.mark.parametrize("workers", [1, 2])
def test_global_script_readable_by_root_only_runs_after_the_drop(tmp_path: Path,
                                                                 workers: int) -> None:
    """``[sieve] before`` in a directory only root may read: read before the drop (as
    the README's root rule has it), so every worker still runs it."""
    from tests.server.production import cli, free_port, serving, world_dir, write_config

    root = world_dir()
    try:
        admin = root / "admin"
        admin.mkdir(mode=0o700)
        before = admin / "before.sieve"
        before.write_text('require "fileinto";\nif header :is "X-Spam" "yes" '
                          '{ fileinto "Junk"; }\n')
        mx = f"127.0.0.1:{free_port()}"
        config = write_config(root, refusing_dns_port(), listen={"mx": [mx]},
                              server={"user": "nobody", "workers": workers},
                              sieve={"before": str(before)})
        data = root / "data"
        assert cli(config, "domain", "add", "example.test").returncode == 0
        pw = root / "bob.pw"
        pw.write_text("pw-of-bob-1234\n")
        assert cli(config, "user", "add", BOB, "--password-file", str(pw)).returncode == 0
        with serving(config, data) as server:
            with smtplib.SMTP("127.0.0.1", int(mx.rpartition(":")[2]), timeout=10) as smtp:
                smtp.sendmail("s@remote.test", [BOB], b"From: s@remote.test\r\nX-Spam: yes"
                              b"\r\nSubject: x\r\n\r\nhi\r\n")
            err = server.stop()[1]
        assert list((data / "mail").glob("example.test/bob/.Junk/new/*")), err
        assert not list((data / "mail").glob("example.test/bob/new/*"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_vacation_without_days_answers_once_per_the_configured_default(
        tmp_path: Path) -> None:
    """RFC 5230 4.1: without :days the site's default applies: [sieve]
    vacation_default_days, not a constant of the interpreter."""
    from mailfort import config
    from mailfort.protocol import sieve
    from mailfort.server.sieve_delivery import Message, SieveDelivery

    cfg = config.from_dict({"sieve": {"vacation_default_days": 3}})
    md = tmp_path / "u"
    store = ScriptStore(md)
    store.put("away", b'require "vacation";\r\nvacation "Away.";\r\n')
    store.set_active("away")
    sv = SieveDelivery(cfg, directory=None)  # type: ignore[arg-type]  # not asked here
    msg = Message(b"From: a@example.org\r\nTo: u@example.test\r\n\r\n", lambda: b"x\r\n",
                  40, "a@example.org", None, None, "QID")
    actions = sv.evaluate("u@example.test", md, msg, sv.load(md)) or []
    (v,) = [a for a in actions if isinstance(a, sieve.Vacation)]
    assert v.seconds == 3 * 86400


def test_a_global_script_in_the_service_users_tree_is_not_read_as_root(
        tmp_path: Path) -> None:
    """[sieve] before inside data_dir: the service user could make it a link to a file
    only root may read, so preload (as root) leaves it to be read after the drop."""
    from mailfort import config
    from mailfort.server import sieve_delivery

    data = tmp_path / "data"
    (data / "sieve").mkdir(parents=True)
    secret = tmp_path / "root-only"
    secret.write_bytes(b"secret\r\n")
    (data / "sieve" / "before.sieve").symlink_to(secret)
    outside = tmp_path / "etc"
    outside.mkdir()
    (outside / "after.sieve").write_bytes(b"keep;\r\n")
    cfg = config.from_dict({"server": {"data_dir": str(data)}, "sieve": {
        "before": str(data / "sieve" / "before.sieve"),
        "after": str(outside / "after.sieve")}})
    sieve_delivery.preload(cfg)
    try:
        assert str(data / "sieve" / "before.sieve") not in sieve_delivery._PRELOADED
        assert sieve_delivery._PRELOADED[str(outside / "after.sieve")] == b"keep;\r\n"
    finally:
        sieve_delivery._PRELOADED.clear()
