"""Mail by SMTP held to the users' quota at RCPT (policy/quota.py), against a real
``mailfort serve``: 452 4.2.2 on MX and submission once a Maildir is full, or when MAIL's
SIZE= would take it over, and accepted again once the user deleted over IMAP or POP3."""

from __future__ import annotations

import poplib
import smtplib
import ssl
from pathlib import Path

import trustme

from mailfort.store.listing import MaildirUsage
from tests.server import imapserve

ALICE, BOB = "alice@example.test", "bob@example.test"


def message(n: int, body: int = 200) -> bytes:
    return (f"From: <sender@remote.test>\r\nTo: <{ALICE}>\r\nSubject: quota {n}\r\n"
            f"Message-ID: <quota-{n}@remote.test>\r\n\r\n").encode() + b"q" * body + b"\r\n"


def rcpt_reply(port: int, user: str, size: int | None = None) -> tuple[int, bytes]:
    """The MX's reply to RCPT TO:<user> (after MAIL, with SIZE= when given)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.ehlo("client.remote.test")
        code, _ = smtp.mail("sender@remote.test", [f"SIZE={size}"] if size else [])
        assert code == 250
        return smtp.rcpt(user)


def send(port: int, user: str, n: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.ehlo("client.remote.test")
        smtp.sendmail("sender@remote.test", [user], message(n))


def test_quota_refuses_at_rcpt_until_mail_is_deleted(tmp_path: Path) -> None:
    ca = trustme.CA()
    with imapserve.start(ca, limits={"mailbox_quota": 20_000,
                                     "mailbox_quota_messages": 3}) as mf:
        mx = mf.ports["mx"]
        for n in range(3):
            send(mx, ALICE, n)
        assert rcpt_reply(mx, ALICE) == (452, b"4.2.2 Mailbox full")
        # submission too (bob, authenticated over STARTTLS, writing to alice)
        ctx = ssl.create_default_context(cafile=str(mf.cafile))
        with smtplib.SMTP("127.0.0.1", mf.ports["submission"], timeout=20) as sub:
            sub.starttls(context=ctx)
            sub.login(BOB, imapserve.PASSWORDS[BOB])
            sub.mail(BOB)
            assert sub.rcpt(ALICE) == (452, b"4.2.2 Mailbox full")
        # bob's Maildir is empty, but a message of 30,000 octets would take it over
        assert rcpt_reply(mx, BOB, size=30_000) == (452, b"4.2.2 Mailbox full")
        assert rcpt_reply(mx, BOB, size=1_000)[0] == 250

        imap = mf.imap(ALICE)  # one deleted over IMAP: room for one more
        imap.select("INBOX")
        imap.store("1", "+FLAGS.SILENT", "(\\Deleted)")
        imap.expunge()
        imap.logout()
        assert rcpt_reply(mx, ALICE)[0] == 250
        send(mx, ALICE, 3)
        assert rcpt_reply(mx, ALICE)[0] == 452

        pop = poplib.POP3_SSL("127.0.0.1", mf.ports["pop3s"], context=ctx, timeout=20)
        pop.user(ALICE)
        pop.pass_(imapserve.PASSWORDS[ALICE])
        pop.dele(1)
        pop.quit()  # deleted over POP3: room again
        assert rcpt_reply(mx, ALICE)[0] == 250


def test_usage_counts_every_folder_and_sees_a_deletion(tmp_path: Path) -> None:
    """MaildirUsage: the names' W= (else S=, else the file's size) over INBOX and the
    Maildir++ folders; a deletion right after a look shows at the next one."""
    for d in ("new", "cur", "tmp", ".Sent/cur", ".Sent/new"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "new" / "1.M1P1.h,S=100,W=102").write_bytes(b"x" * 100)
    (tmp_path / "cur" / "2.M1P1.h,S=50:2,S").write_bytes(b"x" * 50)
    (tmp_path / "cur" / "3.M1P1.h:2,").write_bytes(b"x" * 7)
    (tmp_path / ".Sent" / "cur" / "4.M1P1.h,S=10,W=11:2,S").write_bytes(b"x" * 10)
    usage = MaildirUsage()
    assert usage.usage(tmp_path) == (102 + 50 + 7 + 11, 4)
    (tmp_path / "cur" / "2.M1P1.h,S=50:2,S").unlink()
    assert usage.usage(tmp_path) == (102 + 7 + 11, 3)
    assert usage.usage(tmp_path / "nobody") == (0, 0)
