"""Issue 3 end to end: submission through a real Node, the queue, DNS, delivery, bounces.

Every test runs a real mailfort Node (in-process, or ``python -m mailfort serve`` for the
crash test) whose resolver is a real DNS server on a loopback port (tests/dnsserver.py) and
whose MX port is a recording SMTP receiver (tests/delivery/receiver.py) on another loopback
port. Clients are real: smtplib, swaks. Outcomes are polled with bounded deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import os
import re
import secrets
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailfort.config import Config
from mailfort.queue.store import Queue
from mailfort.server.app import Node
from mailfort.store.maildir import maildir_for
from tests.conftest import seed_directory
from tests.delivery.conftest import ReceiverFactory
from tests.delivery.receiver import Receiver
from tests.dnsserver import DNSServer
from tests.server.test_durability import free_port, wait_port
from tests.server.test_mx import all_stored

ALICE = "alice@example.test"
BOB = "bob@example.test"
REMOTE_DOMAINS = ("remote.test", "second.test", "third.test", "elsewhere.test")
# Retries within a fraction of a second; nothing expires or warns during a test.
FAST_QUEUE: dict[str, Any] = {
    "initial_retry": 0.2,
    "max_retry": 0.5,
    "max_lifetime": 300.0,
    "delay_warning_after": 3600.0,
    "connect_timeout": 2.0,
}
DEADLINE = 20.0


# ---------------------------------------------------------------------------- helpers


async def wait_for(cond: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s: {what}")
        await asyncio.sleep(0.02)


def mx_to_loopback(dns: DNSServer, domain: str) -> None:
    """``domain`` MX 10 mx1.<domain>, and mx1.<domain> A 127.0.0.1."""
    dns.add_mx(domain, f"mx1.{domain}", 10)
    dns.add_a(f"mx1.{domain}", "127.0.0.1")


def new_message(to: list[str], sender: str = ALICE) -> tuple[EmailMessage, str]:
    token = f"outbound-{secrets.token_hex(6)}"
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Subject"] = token
    msg.set_content(f"body of {token}\n")
    return msg, token


def submit(
    port: int,
    ctx: ssl.SSLContext,
    msg: EmailMessage,
    rcpts: list[str],
    *,
    implicit: bool = False,
    user: str = ALICE,
    password: str = "alice-pw",
) -> dict[str, tuple[int, bytes]]:
    """An MUA: STARTTLS on 587 (or implicit TLS on 465), AUTH, one message."""
    if implicit:
        s: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=30)
    else:
        s = smtplib.SMTP("127.0.0.1", port, timeout=30)
    with s:
        s.ehlo("mua.example.test")
        if not implicit:
            s.starttls(context=ctx)
            s.ehlo("mua.example.test")
        s.login(user, password)
        return s.send_message(msg, from_addr=user, to_addrs=rcpts)


def maildir_files(node: Node, user: str) -> list[bytes]:
    new = maildir_for(node.cfg.mail_path, user) / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


def parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def check_bounce(raw: bytes, *, failed: list[str], not_listed: list[str], token: str) -> None:
    """An RFC 3464 DSN to alice with a null sender, listing exactly ``failed``."""
    assert raw.startswith(b"Return-Path: <>\r\n"), raw[:200]
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert ALICE in msg["To"]
    assert msg["From"].lower().startswith("mail delivery system <mailer-daemon@")
    parts = msg.get_payload()
    assert isinstance(parts, list)
    types = [p.get_content_type() for p in parts]
    assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"], types
    text = raw.decode("utf-8", "replace")
    status_part = text.split("Content-Type: message/delivery-status", 1)[1]
    status_part = status_part.split("Content-Type: text/rfc822-headers", 1)[0]
    for addr in failed:
        assert f"Final-Recipient: rfc822; {addr}" in status_part
    for addr in not_listed:
        assert addr not in status_part
    assert status_part.count("Final-Recipient:") == len(failed)
    assert status_part.count("Action: failed") == len(failed)
    assert "Status: 5.1.1" in status_part
    assert "Diagnostic-Code: smtp; 550 5.1.1" in status_part
    # The original's headers come back (so alice knows which message), not its body.
    assert f"Subject: {token}" in text.split("Content-Type: text/rfc822-headers", 1)[1]
    assert f"body of {token}" not in text


@dataclass
class Outbound:
    node: Node
    receiver: Receiver
    dns: DNSServer

    @property
    def queue(self) -> Queue:
        return self.node.queue

    def queue_empty(self) -> bool:
        return self.node.queue.list() == []

    def rcpt_count(self, addr: str) -> int:
        return sum(1 for c in self.receiver.rcpt_commands() if f"<{addr}>" in c)


OutboundFactory = Callable[..., Awaitable[Outbound]]


@pytest.fixture
async def outbound(
    config_factory: Callable[..., Config],
    server_ssl_context: ssl.SSLContext,
    receiver_tls: ssl.SSLContext,
    dns_server: DNSServer,
    receivers: ReceiverFactory,
) -> AsyncIterator[OutboundFactory]:
    """``await outbound(rcpt_replies=...)``: a receiver (STARTTLS offered) reached through
    MX records of the test DNS server, and a Node that delivers there."""
    async with contextlib.AsyncExitStack() as stack:

        async def factory(**receiver_kwargs: Any) -> Outbound:
            receiver_kwargs.setdefault("ssl_context", receiver_tls)
            receiver = await receivers(**receiver_kwargs)
            for domain in REMOTE_DOMAINS:
                mx_to_loopback(dns_server, domain)
            cfg = config_factory(
                dns=dns_server.config(timeout=1.0),
                queue={**FAST_QUEUE, "mx_port": receiver.port},
                delivery={"allow_private_destinations": True},  # the MX is on loopback
            )
            seed_directory(cfg)
            node = await stack.enter_async_context(Node(cfg, ssl_context=server_ssl_context))
            return Outbound(node, receiver, dns_server)

        yield factory


# ---------------------------------------------------------------------------- 1, 2: delivery


@pytest.mark.parametrize("service", ["submission", "submissions"])
async def test_submitted_mail_is_delivered_once_through_mx_records(
    outbound: OutboundFactory, client_ssl_context: ssl.SSLContext, service: str
) -> None:
    o = await outbound()
    msg, token = new_message(["someone@remote.test"])
    refused = await asyncio.to_thread(
        submit, o.node.port(service), client_ssl_context, msg, ["someone@remote.test"],
        implicit=service == "submissions",
    )
    assert refused == {}
    await wait_for(lambda: len(o.receiver.messages) >= 1, "message at the receiver")
    await wait_for(o.queue_empty, "queue empty")

    (got,) = o.receiver.messages
    assert got.sender == ALICE
    assert got.recipients == ["someone@remote.test"]
    assert got.tls, "the receiver offered STARTTLS; delivery must use it"
    assert got.helo == o.node.cfg.server.hostname
    assert f"Subject: {token}".encode() in got.data
    assert f"body of {token}".encode() in got.data
    assert b"with ESMTPSA" in got.data  # the MSA's Received header went out with it
    assert b"\r\nMessage-ID: <" in got.data
    assert b"alice-pw" not in got.data
    # Found through DNS: the MX of remote.test, then the A record of its exchange.
    assert ("remote.test", "MX") in o.dns.queries
    assert ("mx1.remote.test", "A") in o.dns.queries
    assert len(o.receiver.mail_commands) == 1
    assert o.rcpt_count("someone@remote.test") == 1
    # Nothing landed locally: no bounce, no copy.
    assert all_stored(o.node) == 0


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed (CI installs it)")
@pytest.mark.parametrize(("service", "tls_flag"), [("submission", "--tls"),
                                                    ("submissions", "--tlsc")])
async def test_swaks_submission_is_delivered(
    outbound: OutboundFactory, service: str, tls_flag: str
) -> None:
    o = await outbound()
    token = f"swaks-{secrets.token_hex(6)}"
    proc = await asyncio.to_thread(
        subprocess.run,
        ["swaks", "--server", f"127.0.0.1:{o.node.port(service)}", tls_flag,
         "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", "alice-pw",
         "--from", ALICE, "--to", "someone@remote.test",
         "--header", f"From: {ALICE}", "--header", f"Subject: {token}",
         "--body", f"swaks body {token}"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    await wait_for(lambda: len(o.receiver.messages) >= 1, "message at the receiver")
    await wait_for(o.queue_empty, "queue empty")
    (got,) = o.receiver.messages
    assert (got.sender, got.recipients) == (ALICE, ["someone@remote.test"])
    assert f"swaks body {token}".encode() in got.data
    assert b"with ESMTPSA" in got.data
    assert all_stored(o.node) == 0


def header_section(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


async def test_relayed_mail_carries_no_return_path(
    outbound: OutboundFactory, client_ssl_context: ssl.SSLContext
) -> None:
    """RFC 5321 §4.4: only the final delivery adds Return-Path; a relay must not send one
    (ours, written on top of the spool, went out with every relayed message). One the
    client wrote goes too (§4.4: a message with one SHOULD NOT be sent on)."""
    o = await outbound()
    msg, token = new_message(["someone@remote.test"])
    msg["Return-Path"] = "<forged@elsewhere.test>"
    await asyncio.to_thread(
        submit, o.node.port("submission"), client_ssl_context, msg, ["someone@remote.test"])
    await wait_for(lambda: len(o.receiver.messages) >= 1, "message at the receiver")
    (got,) = o.receiver.messages
    head = header_section(got.data)
    assert b"return-path" not in head.lower(), head.decode()
    assert f"Subject: {token}".encode() in head and b"with ESMTPSA" in head


async def test_forwarded_mail_carries_no_return_path(outbound: OutboundFactory) -> None:
    o = await outbound()
    o.node.directory.add_alias("fwd@example.test", ["x@remote.test"])
    msg, token = new_message(["fwd@example.test"], sender="someone@elsewhere.test")

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", o.node.port("mx"), timeout=30) as s:
            s.ehlo("client.elsewhere.test")
            s.send_message(msg, from_addr="someone@elsewhere.test",
                           to_addrs=["fwd@example.test"])

    await asyncio.to_thread(send)
    await wait_for(lambda: len(o.receiver.messages) >= 1, "forward at the receiver")
    (got,) = o.receiver.messages
    head = header_section(got.data)
    assert b"return-path" not in head.lower(), head.decode()
    assert f"Subject: {token}".encode() in head


# ---------------------------------------------------------------------------- 3: 4xx then 250


@pytest.mark.parametrize("stage", ["rcpt", "data"])
async def test_temporary_failure_is_retried_then_delivered_without_bounce(
    outbound: OutboundFactory, client_ssl_context: ssl.SSLContext, stage: str
) -> None:
    if stage == "rcpt":
        o = await outbound(rcpt_replies={"someone@remote.test": ["450 4.2.1 try again later"]})
    else:
        o = await outbound(data_replies=["451 4.3.0 temporary local problem"])
    msg, token = new_message(["someone@remote.test"])
    await asyncio.to_thread(
        submit, o.node.port("submission"), client_ssl_context, msg, ["someone@remote.test"]
    )
    await wait_for(lambda: len(o.receiver.messages) >= 1, "delivered after a retry")
    await wait_for(o.queue_empty, "queue empty")

    (got,) = o.receiver.messages
    assert (got.sender, got.recipients) == (ALICE, ["someone@remote.test"])
    assert f"Subject: {token}".encode() in got.data
    assert len(o.receiver.mail_commands) == 2, "exactly one failed attempt, one retry"
    assert o.rcpt_count("someone@remote.test") == 2
    assert o.receiver.sessions == 2
    assert maildir_files(o.node, ALICE) == [], "a temporary failure must not bounce"
    assert all_stored(o.node) == 0


# ---------------------------------------------------------------------------- 4: 5xx -> one bounce


async def test_permanent_failure_bounces_once_to_the_submitter_only(
    outbound: OutboundFactory, client_ssl_context: ssl.SSLContext
) -> None:
    o = await outbound(rcpt_replies={"someone@remote.test": ["550 5.1.1 no such user here"]})
    msg, token = new_message(["someone@remote.test"])
    await asyncio.to_thread(
        submit, o.node.port("submission"), client_ssl_context, msg, ["someone@remote.test"]
    )
    await wait_for(lambda: len(maildir_files(o.node, ALICE)) >= 1, "bounce in alice's Maildir")
    # The entry is deleted only after its bounce was stored: an empty queue means done.
    await wait_for(o.queue_empty, "queue empty")

    (bounce,) = maildir_files(o.node, ALICE)
    check_bounce(bounce, failed=["someone@remote.test"], not_listed=[], token=token)
    # Nothing to anyone else: one attempt at the receiver, no message accepted there,
    # no DSN sent out by SMTP (no MAIL FROM:<>), nothing in any other Maildir.
    assert o.receiver.messages == []
    assert len(o.receiver.mail_commands) == 1
    assert o.receiver.mail_commands[0].upper().startswith(f"MAIL FROM:<{ALICE.upper()}>")
    assert o.rcpt_count("someone@remote.test") == 1, "a 5xx must not be retried"
    assert maildir_files(o.node, BOB) == []
    assert all_stored(o.node) == 1


# ---------------------------------------------------------------------------- 5: MX -> no bounce


def send_via_mx(port: int, msg: EmailMessage, sender: str, rcpts: list[str]
                ) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.elsewhere.test")
        return s.send_message(msg, from_addr=sender, to_addrs=rcpts)


@pytest.mark.parametrize(
    "sender",
    ["victim@elsewhere.test", ALICE, ""],
    ids=["forged-external", "forged-local-user", "null-sender"],
)
async def test_mail_from_the_mx_that_fails_is_never_bounced(
    outbound: OutboundFactory, sender: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused forward is told to the alias's owner (postmaster@example.test: alice),
    never to the envelope sender (who may be forged: backscatter), and logged."""
    o = await outbound(rcpt_replies={"x@remote.test": ["550 5.1.1 no such user here"]})
    o.node.directory.add_alias("fwd@example.test", ["x@remote.test"])
    msg, token = new_message(["fwd@example.test"], sender=sender or "nobody@elsewhere.test")
    caplog.set_level("WARNING", logger="mailfort.queue")

    assert await asyncio.to_thread(send_via_mx, o.node.port("mx"), msg, sender,
                                   ["fwd@example.test"]) == {}
    await wait_for(lambda: o.rcpt_count("x@remote.test") >= 1, "forward attempted")
    await wait_for(lambda: len(maildir_files(o.node, ALICE)) >= 1, "the owner told")
    await wait_for(o.queue_empty, "queue empty")

    # The forward was tried once and refused; no DSN by SMTP (to the envelope sender,
    # whose domain's MX is this very receiver): the one MAIL is the forward itself, with
    # the sender rewritten (SRS) unless null or of the forwarding domain.
    assert o.receiver.messages == []
    (mail,) = o.receiver.mail_commands
    if sender == "victim@elsewhere.test":
        assert mail.upper().startswith("MAIL FROM:<SRS0=")
        assert "=ELSEWHERE.TEST=VICTIM@EXAMPLE.TEST>" in mail.upper()
    else:
        assert mail.upper().startswith(f"MAIL FROM:<{sender.upper()}>")
    assert o.rcpt_count("x@remote.test") == 1
    assert f"Subject: {token}" not in "".join(o.receiver.commands)
    # The alias's owner, and only they, got a report: which alias, which recipient, why.
    (notice,) = maildir_files(o.node, ALICE)
    assert all_stored(o.node) == 1
    n = parse(notice)
    assert n["Subject"] == "Undelivered forwarded mail (alias fwd@example.test)"
    assert n.get_param("report-type") == "delivery-status" and ALICE in n["To"]
    text = notice.decode()
    assert "Final-Recipient: rfc822; x@remote.test" in text
    assert "550 5.1.1 no such user here" in text
    assert f"<{sender}>, who was not told" in text
    assert f"Subject: {token}" in text and f"body of {token}" not in text
    assert any("x@remote.test" in r.getMessage() and "550 5.1.1" in r.getMessage()
               and "fwd@example.test" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------- SRS (issue 24)

SRS_SENDER = re.compile(r"SRS0=[a-z2-7]{6}=[a-z2-7]{2}=elsewhere\.test=someone@example\.test")


def spf_of(o: Outbound, sender: str) -> str:
    """SPF of ``sender`` for a client at 127.0.0.1, as the destination evaluates it."""
    from mailfort.policy.dnslookup import Lookup
    from mailfort.policy.spf import check_mailfrom

    return check_mailfrom(Lookup(o.node.cfg.dns), "127.0.0.1", sender, "mx.example.test",
                          budget=5).result


async def forwarded_once(o: Outbound) -> str:
    """someone@elsewhere.test writes to fwd@example.test, forwarded to x@remote.test;
    returns the envelope sender the forward left with."""
    o.dns.add_txt("elsewhere.test", "v=spf1 ip4:192.0.2.1 -all")  # not us
    o.dns.add_txt("example.test", "v=spf1 ip4:127.0.0.1 -all")  # us
    o.node.directory.add_alias("fwd@example.test", ["x@remote.test"])
    msg, _ = new_message(["fwd@example.test"], sender="someone@elsewhere.test")
    await asyncio.to_thread(send_via_mx, o.node.port("mx"), msg, "someone@elsewhere.test",
                            ["fwd@example.test"])
    await wait_for(lambda: len(o.receiver.messages) >= 1, "forward delivered")
    (got,) = o.receiver.messages
    return got.sender


async def test_forward_leaves_with_an_srs_sender_that_passes_spf(
        outbound: OutboundFactory) -> None:
    """The outsider's address would fail SPF from us at the destination; the SRS one,
    of the alias's domain, passes."""
    o = await outbound()
    sender = await forwarded_once(o)
    assert SRS_SENDER.fullmatch(sender), sender
    assert await asyncio.to_thread(spf_of, o, "someone@elsewhere.test") == "fail"
    assert await asyncio.to_thread(spf_of, o, sender) == "pass"
    assert (o.node.cfg.data_path / "srs.key").stat().st_mode & 0o777 == 0o600


async def test_bounce_to_the_srs_address_goes_back_to_the_original_sender(
        outbound: OutboundFactory) -> None:
    o = await outbound()
    srs_sender = await forwarded_once(o)
    dsn = (b"From: MAILER-DAEMON@remote.test\r\nTo: " + srs_sender.encode() +
           b"\r\nSubject: Undelivered Mail\r\n\r\nx@remote.test: mailbox gone later\r\n")

    def bounce() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", o.node.port("mx"), timeout=30) as s:
            s.ehlo("mx.remote.test")
            return s.sendmail("", [srs_sender], dsn)

    assert await asyncio.to_thread(bounce) == {}
    await wait_for(lambda: len(o.receiver.messages) >= 2, "bounce sent back")
    await wait_for(o.queue_empty, "queue empty")
    back = o.receiver.messages[1]
    assert (back.sender, back.recipients) == ("", ["someone@elsewhere.test"])
    assert b"mailbox gone later" in back.data
    assert all_stored(o.node) == 0


async def test_srs_address_is_no_open_relay_and_no_backscatter_route(
        outbound: OutboundFactory) -> None:
    """Only a null sender, only a hash of ours, only a recent day: everything else is an
    unknown user at RCPT (nothing accepted, nothing queued, nothing bounced)."""
    o = await outbound()
    good = await forwarded_once(o)
    local = good.rpartition("@")[0]
    _, h, tt, dom, user = local.split("=")
    forged = [
        f"SRS0={'b' if h[0] == 'a' else 'a'}{h[1:]}={tt}={dom}={user}@example.test",
        f"SRS0={h}={tt}=victim.test={user}@example.test",
        f"SRS0={h}={tt}={dom}=victim@example.test",
        "SRS0=abcdef=aa=victim.test=v@example.test",
        f"SRS1={h}=other.test=={h}={tt}={dom}={user}@example.test",
    ]

    def rcpt(sender: str, to: str) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", o.node.port("mx"), timeout=30) as s:
            s.ehlo("client.elsewhere.test")
            s.mail(sender)
            return s.rcpt(to)

    for to in forged:
        code, text = await asyncio.to_thread(rcpt, "", to)
        assert (code, text[:5]) == (550, b"5.1.1"), (to, code, text)
    # The real address, with a sender: not a bounce, so no way to write to someone@ via us.
    code, text = await asyncio.to_thread(rcpt, "spammer@elsewhere.test", good)
    assert (code, text[:5]) == (550, b"5.1.1")
    code, _ = await asyncio.to_thread(rcpt, "", good)
    assert code == 250
    assert o.queue_empty() and len(o.receiver.messages) == 1


# ---------------------------------------------------------------------------- 6: mixed results


async def test_mixed_domains_only_the_failing_recipient_is_bounced(
    outbound: OutboundFactory, client_ssl_context: ssl.SSLContext
) -> None:
    o = await outbound(rcpt_replies={"bad@second.test": ["550 5.1.1 no such user here"]})
    rcpts = ["good@remote.test", "bad@second.test"]
    msg, token = new_message(rcpts)
    await asyncio.to_thread(submit, o.node.port("submission"), client_ssl_context, msg, rcpts)
    await wait_for(lambda: len(maildir_files(o.node, ALICE)) >= 1, "bounce in alice's Maildir")
    await wait_for(o.queue_empty, "queue empty")

    (got,) = o.receiver.messages
    assert (got.sender, got.recipients) == (ALICE, ["good@remote.test"])
    assert f"Subject: {token}".encode() in got.data
    assert o.rcpt_count("good@remote.test") == 1
    assert o.rcpt_count("bad@second.test") == 1
    assert o.receiver.sessions == 2, "one connection per domain"
    (bounce,) = maildir_files(o.node, ALICE)
    check_bounce(bounce, failed=["bad@second.test"], not_listed=["good@remote.test"],
                 token=token)
    assert maildir_files(o.node, BOB) == []


async def test_mixed_domains_only_the_deferred_recipient_is_retried(
    outbound: OutboundFactory, client_ssl_context: ssl.SSLContext
) -> None:
    o = await outbound(rcpt_replies={"slow@third.test": ["451 4.7.1 greylisted, come back"]})
    rcpts = ["good@remote.test", "slow@third.test"]
    msg, token = new_message(rcpts)
    await asyncio.to_thread(submit, o.node.port("submission"), client_ssl_context, msg, rcpts)
    await wait_for(lambda: len(o.receiver.messages) >= 2, "both delivered")
    await wait_for(o.queue_empty, "queue empty")

    by_rcpt = {tuple(m.recipients): m for m in o.receiver.messages}
    assert sorted(by_rcpt) == [("good@remote.test",), ("slow@third.test",)]
    assert all(m.sender == ALICE and f"Subject: {token}".encode() in m.data
               for m in o.receiver.messages)
    assert o.rcpt_count("good@remote.test") == 1, "a delivered recipient is not retried"
    assert o.rcpt_count("slow@third.test") == 2
    assert maildir_files(o.node, ALICE) == []
    assert all_stored(o.node) == 0


# ---------------------------------------------------------------------------- 7: kill -9


def _cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "mailfort", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_queue_entry_survives_sigkill_and_is_delivered_after_restart(
    tmp_path: Path,
    tls_ca: trustme.CA,
    client_ssl_context: ssl.SSLContext,
    dns_server: DNSServer,
    receivers: ReceiverFactory,
    receiver_tls: ssl.SSLContext,
) -> None:
    # The receiver holds its reply to DATA: the server is killed mid-delivery, so the
    # entry is on disk, not yet delivered, and the receiver has acknowledged nothing.
    stall = asyncio.Event()
    receiver = await receivers(ssl_context=receiver_tls, stall_data=stall)
    mx_to_loopback(dns_server, "remote.test")

    cert = tls_ca.issue_cert("127.0.0.1", "mailfort.example.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    data = tmp_path / "data"
    port = free_port()
    cfg_path = tmp_path / "mailfort.toml"
    cfg_path.write_text(
        "[server]\n"
        'hostname = "mailfort.example.test"\n'
        f'data_dir = "{data}"\n'
        "[tls]\n"
        f'cert_file = "{tmp_path / "cert.pem"}"\n'
        f'key_file = "{tmp_path / "key.pem"}"\n'
        "[listen]\n"
        f'mx = []\nsubmission = ["127.0.0.1:{port}"]\nsubmissions = []\npop3 = []\npop3s = []\n'
        "imap = []\nimaps = []\nmanagesieve = []\n"
        "[dns]\n"
        f'nameservers = ["127.0.0.1"]\nport = {dns_server.port}\ntimeout = 1.0\n'
        "[queue]\n"
        f"mx_port = {receiver.port}\ninitial_retry = 0.2\nmax_retry = 0.5\n"
        "connect_timeout = 2.0\n"
        "[delivery]\n"
        "allow_private_destinations = true\n"  # the receiver is on loopback
    )
    password = "alice-long-password"
    (tmp_path / "pw.txt").write_text(password + "\n")
    await asyncio.to_thread(_cli, "domain", "add", "example.test", config=cfg_path)
    await asyncio.to_thread(_cli, "user", "add", ALICE, "--password-file",
                            str(tmp_path / "pw.txt"), config=cfg_path)

    def serve() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "mailfort", "serve", "--config", str(cfg_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    msg, token = new_message(["someone@remote.test"])
    proc = serve()
    try:
        await wait_port(port, proc)
        await asyncio.to_thread(
            submit, port, client_ssl_context, msg, ["someone@remote.test"], password=password
        )
        await asyncio.wait_for(receiver.data_started.wait(), DEADLINE)
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
    finally:
        _stop(proc)
    assert receiver.messages == []

    (entry,) = Queue(data / "queue").list()
    assert entry.sender == ALICE
    assert entry.submitted_by == ALICE
    assert [(r.address, r.active) for r in entry.recipients] == [("someone@remote.test", True)]
    assert f"Subject: {token}".encode() in Queue(data / "queue").read_message(entry.id)

    proc = serve()
    try:
        await wait_port(port, proc)
        # Release the stalled session only once the restarted server has reconnected:
        # the killed session's EOF is then long seen, so the receiver drops it unacknowledged.
        await wait_for(lambda: receiver.sessions >= 2, "restarted server reconnects")
        stall.set()
        await wait_for(lambda: len(receiver.messages) >= 1, "delivered after restart")
        queue = Queue(data / "queue")
        await wait_for(lambda: queue.list() == [], "queue empty after restart")
    finally:
        _stop(proc)

    (got,) = receiver.messages
    assert (got.sender, got.recipients) == (ALICE, ["someone@remote.test"])
    assert f"Subject: {token}".encode() in got.data
    assert got.tls
    new = maildir_for(data / "mail", ALICE) / "new"
    assert not new.exists() or list(new.iterdir()) == [], "delivered: nothing to bounce"


async def test_mail_queued_on_any_worker_is_delivered_once_and_at_once(
    tmp_path: Path,
    tls_ca: trustme.CA,
    client_ssl_context: ssl.SSLContext,
    dns_server: DNSServer,
    receivers: ReceiverFactory,
    receiver_tls: ssl.SSLContext,
) -> None:
    """``workers = 2``: only worker 0 delivers. Mail submitted on worker 1 wakes it through
    the supervisor's pipe, so it leaves in seconds, not at the next rescan of the queue
    (a minute), and every message is delivered exactly once."""
    from tests.server.test_workers import worker_of

    receiver = await receivers(ssl_context=receiver_tls)
    mx_to_loopback(dns_server, "remote.test")
    cert = tls_ca.issue_cert("127.0.0.1", "mailfort.example.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    port = free_port()
    cfg_path = tmp_path / "mailfort.toml"
    cfg_path.write_text(
        '[server]\nhostname = "mailfort.example.test"\n'
        f'data_dir = "{tmp_path / "data"}"\nworkers = 2\n'
        f'[tls]\ncert_file = "{tmp_path / "cert.pem"}"\nkey_file = "{tmp_path / "key.pem"}"\n'
        f'[listen]\nmx = []\nsubmission = ["127.0.0.1:{port}"]\nsubmissions = []\n'
        "pop3 = []\npop3s = []\nimap = []\nimaps = []\nmanagesieve = []\n"
        f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns_server.port}\ntimeout = 1.0\n'
        f"[queue]\nmx_port = {receiver.port}\ninitial_retry = 0.2\nmax_retry = 0.5\n"
        "connect_timeout = 2.0\n"
        "[delivery]\nallow_private_destinations = true\n"  # the test MX is on loopback
    )
    password = "alice-long-password"
    (tmp_path / "pw.txt").write_text(password + "\n")
    await asyncio.to_thread(_cli, "domain", "add", "example.test", config=cfg_path)
    await asyncio.to_thread(_cli, "user", "add", ALICE, "--password-file",
                            str(tmp_path / "pw.txt"), config=cfg_path)
    log = tmp_path / "serve.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailfort", "serve", "--config", str(cfg_path)],
            stdout=subprocess.DEVNULL, stderr=err)

    def send(token_msg: EmailMessage) -> int:
        """Submit; the pid of the worker that took the message."""
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            pid = worker_of(proc.pid, port, s.sock)
            s.starttls(context=client_ssl_context)
            s.login(ALICE, password)
            assert s.send_message(token_msg, to_addrs=["someone@remote.test"]) == {}
        return pid

    try:
        await wait_for(lambda: log.read_text().count(" serving") == 2, "two workers")
        (line,) = [x for x in log.read_text().splitlines() if "with outbound delivery" in x]
        delivering = int(line.split("(pid ")[1].split(")")[0])
        # Two connections held open make the node busy, so that the second worker
        # accepts too (a quiet node's connections all go to the first: acceptor.py).
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        tokens, on_other = [], False
        try:
            for s in held:
                assert s.recv(512).startswith(b"220")
            for _ in range(20):
                msg, token = new_message(["someone@remote.test"])
                on_other |= await asyncio.to_thread(send, msg) != delivering
                tokens.append(token)
                if on_other and len(tokens) >= 3:
                    break
        finally:
            for s in held:
                s.close()
        assert on_other, "every submission landed on the delivering worker"
        await wait_for(lambda: len(receiver.messages) >= len(tokens), "delivered", 15.0)
        await asyncio.sleep(0.5)  # a second delivery would show here
    finally:
        _stop(proc)
    got = sorted(t for m in receiver.messages for t in tokens
                 if f"Subject: {t}".encode() in m.data)
    assert got == sorted(tokens)


# ---------------------------------------------------------------------------- one id per message


def submit_for_reply(port: int, ctx: ssl.SSLContext, msg: EmailMessage,
                     rcpts: list[str]) -> str:
    """Submit as alice; the text of the final reply to the message data."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("mua.example.test")
        s.starttls(context=ctx)
        s.ehlo("mua.example.test")
        s.login(ALICE, "alice-pw")
        s.mail(ALICE)
        for r in rcpts:
            assert s.rcpt(r)[0] == 250
        code, text = s.data(msg.as_bytes(policy=email.policy.SMTP))
        assert code == 250, text
        return text.decode()


async def test_the_id_in_the_250_is_the_id_everywhere(
    outbound: OutboundFactory, client_ssl_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: the 250, Received: and the queue each had an id of their own, and
    `queue show` did not know the one the client was told."""
    from mailfort.queue.admin import queue_root, queue_show

    caplog.set_level("INFO", logger="mailfort.queue")
    o = await outbound(rcpt_replies={"someone@remote.test": ["450 4.2.1 later"] * 3})
    rcpts = ["someone@remote.test", "other@second.test", BOB]
    msg, _ = new_message(rcpts)
    text = await asyncio.to_thread(submit_for_reply, o.node.port("submission"),
                                   client_ssl_context, msg, rcpts)
    m = re.search(r"queued as ([0-9A-Za-z]+)$", text)
    assert m, text
    ident = m.group(1)
    await wait_for(lambda: o.rcpt_count("someone@remote.test") >= 1, "a first attempt")
    shown = queue_show(queue_root(o.node.cfg), ident)  # the key the client was told
    assert f"id:           {ident}" in shown and "someone@remote.test: " in shown
    await wait_for(lambda: len(o.receiver.messages) >= 2, "both remote domains")
    await wait_for(o.queue_empty, "queue empty")
    for got in o.receiver.messages:  # one id for both destinations
        assert re.search(rb"with ESMTPSA id " + ident.encode() + rb"\b", got.data), got.data
    (local,) = maildir_files(o.node, BOB)
    assert b"with ESMTPSA id " + ident.encode() in local
    about = [r.getMessage() for r in caplog.records if f"queue {ident}:" in r.getMessage()]
    assert any("to=<someone@remote.test>" in x and "status=deferred" in x for x in about)
    assert any("to=<someone@remote.test>" in x and "status=sent" in x for x in about)
    assert any("to=<other@second.test>" in x and "status=sent" in x for x in about)
    # logged once the delete (in a thread) returned: just after the queue looks empty
    await wait_for(lambda: any(f"queue {ident}: removed (2 sent)" in r.getMessage()
                               for r in caplog.records), "the removal's log line")
