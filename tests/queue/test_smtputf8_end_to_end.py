"""SMTPUTF8 from submission to the remote, through a real Node (issue 15, item 7).

A user submits with SMTPUTF8 (smtplib) a message to a non-ASCII address with a UTF-8
Subject; the Node queues it and delivers it to a recording receiver found through the test
DNS server. With SMTPUTF8 offered by the receiver, MAIL carries the parameter; without it,
nothing is sent and the submitter finds a 5.6.7 bounce in their Maildir.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl

import pytest

from tests.server.test_outbound import (
    ALICE,
    OutboundFactory,
    maildir_files,
    outbound,
    wait_for,
)

__all__ = ["outbound"]

RCPT = "jürgen@remote.test"
MESSAGE = (f"From: {ALICE}\r\nTo: {RCPT}\r\nSubject: grüße\r\n"
           "Message-ID: <utf8-e2e@example.test>\r\n\r\nHallo Jürgen.\r\n").encode()


def submit_utf8(port: int, ctx: ssl.SSLContext) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("mua.example.test")
        s.starttls(context=ctx)
        s.ehlo("mua.example.test")
        assert s.has_extn("smtputf8")
        s.login(ALICE, "alice-pw")
        assert s.sendmail(ALICE, [RCPT], MESSAGE, mail_options=["SMTPUTF8"]) == {}


@pytest.mark.parametrize("offered", [True, False], ids=["remote-offers", "remote-lacks"])
async def test_submitted_utf8_mail_is_relayed_with_smtputf8_or_bounced(
        outbound: OutboundFactory, client_ssl_context: ssl.SSLContext, offered: bool) -> None:
    o = await outbound(smtputf8=offered)
    await asyncio.to_thread(submit_utf8, o.node.port("submission"), client_ssl_context)
    await wait_for(o.queue_empty, "queue empty")
    if offered:
        (got,) = o.receiver.messages
        assert got.recipients == [RCPT] and got.tls
        assert "SMTPUTF8" in got.mail.split()
        assert "Subject: grüße".encode() in got.data
        assert maildir_files(o.node, ALICE) == []
    else:
        await wait_for(lambda: maildir_files(o.node, ALICE) != [], "bounce in alice's Maildir")
        assert o.receiver.messages == [] and o.receiver.mail_commands == []
        (bounce,) = maildir_files(o.node, ALICE)
        assert b"Status: 5.6.7" in bounce and b"SMTPUTF8" in bounce
        assert f"Final-Recipient: rfc822; {RCPT}".encode() in bounce
