"""End-to-end tests of submission (587 STARTTLS, 465 implicit TLS) with real clients."""

from __future__ import annotations

import asyncio
import base64
import logging
import shutil
import smtplib
import ssl
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import SMTP as SMTP_POLICY
from email.policy import default
from typing import Any

import pytest

from mailfort.server.app import Node
from tests.conftest import seed_directory
from tests.server.test_mx import raw_session, read_reply, stored

ALICE, BOB = "alice@example.test", "bob@example.test"

def note(sender: str = "alice@example.test", to: str = "bob@example.test") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = "hi bob"
    msg.set_content("from alice\n")
    return msg


def submit(port: int, ctx: ssl.SSLContext, msg: EmailMessage, *, user: str = "alice@example.test",
           password: str = "alice-pw", implicit: bool = False,
           sender: str | None = None) -> dict[str, tuple[int, bytes]]:
    cls = smtplib.SMTP_SSL if implicit else smtplib.SMTP
    kw: dict[str, Any] = {"context": ctx} if implicit else {}
    with cls("127.0.0.1", port, **kw) as s:
        s.ehlo("mua.test")
        if not implicit:
            s.starttls(context=ctx)
            s.ehlo("mua.test")
        s.login(user, password)
        return s.send_message(msg, from_addr=sender)


async def test_submission_587_delivers_locally_with_msa_headers(
    node: Node, client_ssl_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await asyncio.to_thread(submit, node.port("submission"), client_ssl_context, note())
    (msg,) = stored(node, "bob@example.test")
    assert b"with ESMTPSA id" in msg
    assert b"\r\nMessage-ID: <" in msg
    assert b"\r\nDate: " in msg
    assert b"alice-pw" not in msg
    assert base64.b64encode(b"\0alice@example.test\0alice-pw") not in msg
    assert "alice-pw" not in caplog.text


async def test_submissions_465_implicit_tls(node: Node, client_ssl_context: ssl.SSLContext) -> None:
    await asyncio.to_thread(
        submit, node.port("submissions"), client_ssl_context, note(), implicit=True
    )
    (msg,) = stored(node, "bob@example.test")
    assert b"with ESMTPSA" in msg


async def test_auth_before_tls_and_mail_before_auth(node: Node) -> None:
    token = base64.b64encode(b"\0alice@example.test\0alice-pw")
    replies = await raw_session(
        node.port("submission"),
        [b"EHLO mua\r\n", b"AUTH PLAIN " + token + b"\r\n", b"MAIL FROM:<alice@example.test>\r\n"],
    )
    assert "AUTH" not in replies[1]
    assert "STARTTLS" in replies[1]
    assert replies[2].startswith("538 5.7.11")
    assert replies[3].startswith("530 5.7.0")


async def auth_reply(port: int, ctx: ssl.SSLContext, user: str, password: str) -> tuple[str, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                   server_hostname="mx.example.test")
    await read_reply(reader)
    writer.write(b"EHLO mua\r\n")
    await read_reply(reader)
    token = base64.b64encode(f"\0{user}\0{password}".encode())
    loop = asyncio.get_running_loop()
    start = loop.time()
    writer.write(b"AUTH PLAIN " + token + b"\r\n")
    reply = await read_reply(reader)
    elapsed = loop.time() - start
    writer.close()
    return reply, elapsed


async def test_wrong_password_same_reply_for_real_and_unknown_user(
    config_factory: Any, server_ssl_context: ssl.SSLContext, client_ssl_context: ssl.SSLContext
) -> None:
    cfg = config_factory(auth={"delay_after_failures": 100, "block_after_failures": 1000})
    seed_directory(cfg)
    async with Node(cfg, ssl_context=server_ssl_context) as node:
        port = node.port("submissions")
        real_times, fake_times = [], []
        for _ in range(5):
            real, t = await auth_reply(port, client_ssl_context, "alice@example.test", "wrong")
            real_times.append(t)
            fake, t = await auth_reply(port, client_ssl_context, "nobody@example.test", "wrong")
            fake_times.append(t)
            assert real == fake
            assert real.startswith("535 5.7.8")
    # an unknown user costs a dummy argon2 check: no fast path that tells names apart
    real_median, fake_median = sorted(real_times)[2], sorted(fake_times)[2]
    assert fake_median > real_median / 3 and real_median > fake_median / 3


async def test_brute_force_is_blocked(
    config_factory: Any, server_ssl_context: ssl.SSLContext, client_ssl_context: ssl.SSLContext
) -> None:
    cfg = config_factory(auth={"delay_after_failures": 100, "block_after_failures": 3,
                               "failure_delay": 0.0})
    seed_directory(cfg)
    async with Node(cfg, ssl_context=server_ssl_context) as node:
        port = node.port("submissions")
        codes = []
        for _ in range(5):
            reply, _ = await auth_reply(port, client_ssl_context, "alice@example.test", "guess")
            codes.append(reply[:3])
        assert codes[:3] == ["535"] * 3
        assert codes[-1] == "421"
        # even the right password is refused while blocked
        reply, _ = await auth_reply(port, client_ssl_context, "alice@example.test", "alice-pw")
        assert reply.startswith("421 4.7.0")


async def test_foreign_mail_from_refused(
    node: Node, client_ssl_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailfort.decision")
    with pytest.raises(smtplib.SMTPSenderRefused) as exc:
        await asyncio.to_thread(submit, node.port("submission"), client_ssl_context, note(),
                                sender="bob@example.test")
    assert exc.value.smtp_code == 553
    assert b"5.7.1" in exc.value.smtp_error
    (line,) = [r.getMessage() for r in caplog.records if "reject:" in r.getMessage()]
    assert line.startswith("reject: MAIL from [127.0.0.1]: 553 5.7.1 ")
    assert line.endswith("; from=<bob@example.test> helo=<" + line.split("helo=<")[1])


async def test_foreign_from_header_refused(
    node: Node, client_ssl_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailfort.decision")
    with pytest.raises(smtplib.SMTPDataError) as exc:
        await asyncio.to_thread(submit, node.port("submission"), client_ssl_context,
                                note(sender="ceo@bank.test"), sender="alice@example.test")
    assert exc.value.smtp_code == 553
    assert stored(node, "bob@example.test") == []
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("reject: DATA from [127.0.0.1]: 553 5.7.1 ")
               and "from=<alice@example.test>" in m for m in lines)
    assert not any(m.startswith("accept:") for m in lines)


async def test_alias_grants_sending(node: Node, client_ssl_context: ssl.SSLContext) -> None:
    await asyncio.to_thread(submit, node.port("submission"), client_ssl_context,
                            note(sender="postmaster@example.test"),
                            sender="postmaster@example.test")
    assert len(stored(node, "bob@example.test")) == 1


async def test_null_sender_refused_on_submission(
    node: Node, client_ssl_context: ssl.SSLContext
) -> None:
    with pytest.raises(smtplib.SMTPSenderRefused) as exc:
        await asyncio.to_thread(submit, node.port("submission"), client_ssl_context, note(),
                                sender="<>")
    assert exc.value.smtp_code == 553


async def test_rate_limit(
    config_factory: Any, server_ssl_context: ssl.SSLContext, client_ssl_context: ssl.SSLContext
) -> None:
    cfg = config_factory(submission={"messages_per_hour": 2})
    seed_directory(cfg)
    async with Node(cfg, ssl_context=server_ssl_context) as node:
        port = node.port("submission")
        for _ in range(2):
            await asyncio.to_thread(submit, port, client_ssl_context, note())
        with pytest.raises(smtplib.SMTPSenderRefused) as exc:
            await asyncio.to_thread(submit, port, client_ssl_context, note())
        assert exc.value.smtp_code == 452
        assert b"4.7.1" in exc.value.smtp_error
        assert len(stored(node, "bob@example.test")) == 2


async def test_unauthenticated_relay_on_mx_still_refused(node: Node) -> None:
    replies = await raw_session(
        node.port("mx"),
        [b"EHLO c\r\n", b"MAIL FROM:<alice@example.test>\r\n", b"RCPT TO:<x@foreign.test>\r\n"],
    )
    assert replies[3].startswith("554 5.7.1")


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed (CI installs it)")
async def test_swaks_submission(node: Node) -> None:
    proc = await asyncio.to_thread(
        subprocess.run,
        ["swaks", "--server", f"127.0.0.1:{node.port('submission')}", "--tls",
         "--auth", "PLAIN", "--auth-user", "alice@example.test", "--auth-password", "alice-pw",
         "--from", "alice@example.test", "--to", "bob@example.test",
         "--header", "From: alice@example.test", "--body", "swaks submission"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (msg,) = stored(node, "bob@example.test")
    assert b"swaks submission" in msg


async def test_recipients_per_message_limit(
    config_factory: Any, server_ssl_context: ssl.SSLContext, client_ssl_context: ssl.SSLContext
) -> None:
    cfg = config_factory(submission={"max_recipients": 1})
    seed_directory(cfg)
    async with Node(cfg, ssl_context=server_ssl_context) as node:
        msg = note(to="bob@example.test, alice@example.test")
        refused = await asyncio.to_thread(
            submit, node.port("submission"), client_ssl_context, msg
        )
        assert refused["alice@example.test"][0] == 452
        assert len(stored(node, "bob@example.test")) == 1
        assert stored(node, "alice@example.test") == []

        def second_refused() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", node.port("submission")) as s:
                s.starttls(context=client_ssl_context)
                s.login("alice@example.test", "alice-pw")
                s.mail("alice@example.test")
                assert s.rcpt("bob@example.test")[0] == 250
                return s.rcpt("alice@example.test")

        code, text = await asyncio.to_thread(second_refused)
        assert code == 452 and b"4.7.1" in text


async def submit_raw(node: Node, ctx: ssl.SSLContext, transfer: list[bytes]) -> list[str]:
    """An authenticated session on 465; ``transfer`` (DATA or BDAT commands with their
    octets) follows RCPT, one reply read after each element."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", node.port("submissions"), ssl=ctx, server_hostname="mx.example.test")
    token = base64.b64encode(b"\0alice@example.test\0alice-pw")
    replies = [await read_reply(reader)]
    for chunk in [b"EHLO mua\r\n", b"AUTH PLAIN " + token + b"\r\n",
                  b"MAIL FROM:<alice@example.test>\r\n", b"RCPT TO:<bob@example.test>\r\n",
                  *transfer]:
        writer.write(chunk)
        replies.append(await read_reply(reader))
    writer.close()
    return replies


def bdat(*chunks: bytes) -> list[bytes]:
    return [b"BDAT %d%s\r\n" % (len(c), b" LAST" if i == len(chunks) - 1 else b"") + c
            for i, c in enumerate(chunks)]


HEADERS = b"From: alice@example.test\r\nSubject: bdat-test"

# Messages whose header section reaches the end of the message or a chunk boundary:
# the Message-ID and Date that submission adds must each stand on a line of their own.
HEADER_ONLY_TRANSFERS = {
    "bdat-no-final-crlf": bdat(HEADERS),
    "bdat-headers-crlf": bdat(HEADERS + b"\r\n"),
    "bdat-headers-blank-line": bdat(HEADERS + b"\r\n\r\n"),
    "bdat-split-blank-line": bdat(HEADERS + b"\r\n\r", b"\nbody\r\n"),
    "bdat-split-no-final-crlf": bdat(b"From: alice@example.test\r\nSubj", b"ect: bdat-test"),
    "data-headers-crlf": [b"DATA\r\n", HEADERS + b"\r\n.\r\n"],
    "data-headers-blank-line": [b"DATA\r\n", HEADERS + b"\r\n\r\n.\r\n"],
}


@pytest.mark.parametrize("transfer", HEADER_ONLY_TRANSFERS.values(),
                         ids=HEADER_ONLY_TRANSFERS.keys())
async def test_added_headers_never_join_a_client_line(
    node: Node, client_ssl_context: ssl.SSLContext, transfer: list[bytes]
) -> None:
    replies = await submit_raw(node, client_ssl_context, transfer)
    assert replies[-1].startswith("250 2.0.0"), replies
    (raw,) = stored(node, "bob@example.test")
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert b"Subject: bdat-test" in head
    assert sum(line.startswith(b"Message-ID: <") for line in head) == 1
    assert sum(line.startswith(b"Date: ") for line in head) == 1
    msg = BytesParser(policy=default).parsebytes(raw)
    assert msg["Subject"] == "bdat-test"
    assert msg["Date"].datetime is not None
    assert raw.endswith(b"\r\n")
    assert b"\n" not in raw.replace(b"\r\n", b"")


# ------------------------------------------------------------------ REQUIRETLS (RFC 8689)


async def test_requiretls_in_the_clear_is_refused_with_530_5_7_10(node: Node) -> None:
    replies = await raw_session(
        node.port("mx"),
        [b"EHLO relay.test\r\n", b"MAIL FROM:<x@remote.test> REQUIRETLS\r\n",
         b"MAIL FROM:<x@remote.test>\r\n"],
    )
    assert "REQUIRETLS" not in replies[1]
    assert replies[2].startswith("530 5.7.10")
    assert replies[3].startswith("250")  # the session goes on


async def test_requiretls_after_starttls_is_offered_and_recorded_durably(
    node: Node, client_ssl_context: ssl.SSLContext
) -> None:
    from mailfort.queue.store import Queue

    def run() -> tuple[bool, bool]:
        with smtplib.SMTP("127.0.0.1", node.port("submission")) as s:
            s.ehlo("mua.test")
            before = s.has_extn("requiretls")
            s.starttls(context=client_ssl_context)
            s.ehlo("mua.test")
            after = s.has_extn("requiretls")
            s.login("alice@example.test", "alice-pw")
            s.sendmail("alice@example.test", ["carol@remote.test"],
                       note(to="carol@remote.test").as_bytes(policy=SMTP_POLICY),
                       mail_options=["REQUIRETLS"])
            s.sendmail("alice@example.test", ["dave@remote.test"],
                       note(to="dave@remote.test").as_bytes(policy=SMTP_POLICY))
        return before, after

    before, after = await asyncio.to_thread(run)
    assert (before, after) == (False, True)
    # read back from disk by a fresh queue object, as after a restart
    entries = {e.recipients[0].address: e for e in Queue(node.cfg.data_path / "queue").list()}
    assert entries["carol@remote.test"].requiretls is True
    assert entries["dave@remote.test"].requiretls is False


async def test_received_header_names_tls_version_and_cipher(
    node: Node, client_ssl_context: ssl.SSLContext
) -> None:
    await asyncio.to_thread(submit, node.port("submission"), client_ssl_context, note())
    (msg,) = stored(node, "bob@example.test")
    received = msg.split(b"\r\n\r\n")[0].decode()
    assert "(using TLSv1.3 with cipher TLS_" in received or \
        "(using TLSv1.2 with cipher " in received


# ---- hourly limits under parallel sessions (issue 24, item 11) ------------------------------

SESSIONS = 8


def parallel_transactions(login: Callable[[int], smtplib.SMTP], rcpts: list[str],
                          sessions: int = SESSIONS) -> list[tuple[int, list[int], int]]:
    """``sessions`` authenticated sessions, each in its own thread: all log in, all give
    MAIL and ``rcpts``, wait for one another, then each with a recipient sends DATA. Every
    MAIL and RCPT is thus answered before any message ends: a limit that is read at MAIL
    and counted after the 250 lets them all through. (mail, [rcpt...], data) per session
    (data 0: not sent)."""
    logged_in, mailed = threading.Barrier(sessions), threading.Barrier(sessions)

    def one(i: int) -> tuple[int, list[int], int]:
        with login(i) as s:
            logged_in.wait(timeout=60)
            mail = s.mail(ALICE)
            codes = [s.rcpt(r)[0] for r in rcpts] if mail[0] == 250 else []
            if mail[0] == 250:
                assert mail[1] == b"2.1.0 Sender OK"
            else:
                assert mail == (452, b"4.7.1 Message rate limit exceeded, try again later")
            mailed.wait(timeout=60)
            if 250 not in codes:
                return mail[0], codes, 0
            return mail[0], codes, s.data(f"From: {ALICE}\r\nTo: {BOB}\r\n\r\nhi\r\n")[0]

    with ThreadPoolExecutor(sessions) as pool:  # not asyncio's: its few threads would wait
        return list(pool.map(one, range(sessions)))


def starttls_login(port: int, ctx: ssl.SSLContext) -> Callable[[int], smtplib.SMTP]:
    def login(i: int) -> smtplib.SMTP:
        s = smtplib.SMTP("127.0.0.1", port, timeout=30)
        s.starttls(context=ctx)
        s.login(ALICE, "alice-pw")
        return s
    return login


async def test_parallel_sessions_get_exactly_the_hourly_messages(
    config_factory: Any, server_ssl_context: ssl.SSLContext, client_ssl_context: ssl.SSLContext
) -> None:
    """Eight sessions at once, three messages an hour: three get 250 at MAIL and deliver,
    five get 452 4.7.1 at MAIL (reserved at MAIL, atomically, in the shared counters)."""
    cfg = config_factory(submission={"messages_per_hour": 3})
    seed_directory(cfg)
    async with Node(cfg, ssl_context=server_ssl_context) as node:
        login = starttls_login(node.port("submission"), client_ssl_context)
        results = await asyncio.to_thread(parallel_transactions, login, [BOB])
        assert sorted(mail for mail, _, _ in results) == [250] * 3 + [452] * 5
        assert [data for _, _, data in results].count(250) == 3
        assert len(stored(node, BOB)) == 3
        with pytest.raises(smtplib.SMTPSenderRefused):  # and the hour stays spent
            await asyncio.to_thread(submit, node.port("submission"), client_ssl_context, note())


async def test_parallel_sessions_get_exactly_the_hourly_recipients(
    config_factory: Any, server_ssl_context: ssl.SSLContext, client_ssl_context: ssl.SSLContext
) -> None:
    """submission.recipients_per_hour: each RCPT takes one, atomically; past it RCPT gets
    452 4.7.1 (RFC 5321 §4.5.3.1.10: the client sends those recipients later)."""
    cfg = config_factory(submission={"recipients_per_hour": 5})
    seed_directory(cfg)
    async with Node(cfg, ssl_context=server_ssl_context) as node:
        login = starttls_login(node.port("submission"), client_ssl_context)
        results = await asyncio.to_thread(parallel_transactions, login, [BOB, ALICE])
        codes = [c for _, rcpts, _ in results for c in rcpts]
        assert sorted(codes) == [250] * 5 + [452] * 11
        assert len(stored(node, BOB)) + len(stored(node, ALICE)) == 5

        def refused() -> tuple[int, bytes]:
            with login(0) as s:
                assert s.mail(ALICE)[0] == 250
                return s.rcpt(BOB)

        assert await asyncio.to_thread(refused) == (
            452, b"4.7.1 Recipient rate limit exceeded, try again later")


async def test_a_transaction_without_250_gives_its_reservation_back(
    config_factory: Any, server_ssl_context: ssl.SSLContext, client_ssl_context: ssl.SSLContext
) -> None:
    """Reserved at MAIL and RCPT, given back by RSET, a refusal at DATA, a new EHLO or a
    connection that ends: only 250s spend the hour."""
    cfg = config_factory(submission={"messages_per_hour": 2, "recipients_per_hour": 2})
    seed_directory(cfg)
    async with Node(cfg, ssl_context=server_ssl_context) as node:
        port = node.port("submission")
        login = starttls_login(port, client_ssl_context)

        def abandon() -> None:
            with login(0) as s:
                for end in ("RSET", "EHLO mua.test", "RSET"):
                    assert s.mail(ALICE)[0] == 250 and s.rcpt(BOB)[0] == 250
                    assert s.docmd(end)[0] == 250
                assert s.mail(ALICE)[0] == 250 and s.rcpt(BOB)[0] == 250
                code, _ = s.data(f"From: {BOB}\r\nTo: {BOB}\r\n\r\nnot mine\r\n")
                assert code == 553
                assert s.mail(ALICE)[0] == 250 and s.rcpt(BOB)[0] == 250
            # closed in the middle of a transaction
            s = login(0)
            assert s.mail(ALICE)[0] == 250 and s.rcpt(BOB)[0] == 250
            s.sock.close()

        await asyncio.to_thread(abandon)
        for _ in range(20):  # the server sees the close a moment later
            if not node.services["submission"].sessions:
                break
            await asyncio.sleep(0.05)
        for _ in range(2):
            await asyncio.to_thread(submit, port, client_ssl_context, note())
        assert len(stored(node, BOB)) == 2
        with pytest.raises(smtplib.SMTPSenderRefused) as exc:
            await asyncio.to_thread(submit, port, client_ssl_context, note())
        assert exc.value.smtp_code == 452


def submit_bytes(port: int, ctx: ssl.SSLContext, data: bytes) -> None:
    """alice submits ``data`` as it is (MAIL FROM her own address)."""
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.ehlo("mua.test")
        s.starttls(context=ctx)
        s.ehlo("mua.test")
        s.login("alice@example.test", "alice-pw")
        s.sendmail("alice@example.test", ["bob@example.test"], data)


@pytest.mark.parametrize(("fields", "code", "enhanced"), [
    # RFC 5322 §4.5.3: white space before the colon is still a From: field to mail readers.
    (b"From : Bob <bob@example.test>\r\nFrom: alice@example.test\r\n", 550, b"5.6.0"),
    (b"From: alice@example.test\r\nFROM\t: bob@example.test\r\n", 550, b"5.6.0"),
    (b"From: alice@example.test\r\nSender : bob@example.test\r\n", 553, b"5.7.1"),
    (b"From: alice@example.test\r\nResent-From: Bob <bob@example.test>\r\n", 553, b"5.7.1"),
    (b"From: alice@example.test (\\() , bob@example.test\r\n", 553, b"5.7.1"),
    (b"From: alice@example.test bob@example.test\r\n", 550, b"5.6.0"),
])
async def test_every_author_field_is_checked_by_the_tolerant_reader(
    node: Node, client_ssl_context: ssl.SSLContext, fields: bytes, code: int, enhanced: bytes
) -> None:
    data = fields + b"To: bob@example.test\r\nSubject: hi\r\n\r\nbody\r\n"
    with pytest.raises(smtplib.SMTPDataError) as exc:
        await asyncio.to_thread(submit_bytes, node.port("submission"), client_ssl_context, data)
    assert (exc.value.smtp_code, exc.value.smtp_error[:5]) == (code, enhanced), exc.value
    assert stored(node, "bob@example.test") == []
    # Her own address in every field (obsolete syntax included) is fine.
    await asyncio.to_thread(submit_bytes, node.port("submission"), client_ssl_context,
                            b"From : Alice <alice@example.test>\r\nSender: alice@example.test\r\n"
                            b"Resent-From: (me) alice@example.test\r\n"
                            b"To: bob@example.test\r\nSubject: hi\r\n\r\nbody\r\n")
    assert len(stored(node, "bob@example.test")) == 1


def _pipelined_records(port: int, ctx: ssl.SSLContext) -> tuple[int, bytes]:
    """On 465, authenticated: MAIL, RCPT and DATA sent in one write; the TLS application
    records that carry their three replies (read off the socket under a memory BIO), and
    the replies."""
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="mx.example.test")
    raw = bytearray()  # received, not yet split into records

    def flush() -> None:
        if outgoing.pending:
            sock.sendall(outgoing.read())

    def receive() -> int:
        """Feed one more TCP read to the BIO; the application records it completed."""
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        raw.extend(chunk)
        records = 0
        while len(raw) >= 5 and len(raw) >= 5 + int.from_bytes(raw[3:5], "big"):
            records += raw[0] == 23  # application_data
            del raw[:5 + int.from_bytes(raw[3:5], "big")]
        incoming.write(chunk)
        return records

    def reply_lines(count: int) -> tuple[int, bytes]:
        got, records = b"", 0
        while got.count(b"\r\n") < count or got.splitlines()[-1][3:4] == b"-":
            try:
                got += tls.read(65536)
            except ssl.SSLWantReadError:
                flush()
                records += receive()
        return records, got

    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            flush()
            receive()
    flush()
    token = base64.b64encode(b"\0alice@example.test\0alice-pw")
    reply_lines(1)  # greeting
    for line in (b"EHLO mua\r\n", b"AUTH PLAIN " + token + b"\r\n"):
        tls.write(line)
        flush()
        reply_lines(1)
    tls.write(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
    flush()
    records, got = reply_lines(3)
    sock.close()
    return records, got


async def test_pipelined_mail_rcpt_data_answered_in_one_tls_record(
    node: Node, client_ssl_context: ssl.SSLContext
) -> None:
    """MAIL and RCPT on submission were each a task and a write of their own: three TLS
    records and three sends for what the MX answers in one. With the hourly counts in
    the process's reach they are decided at once, and the three replies leave together."""
    records, got = await asyncio.to_thread(_pipelined_records, node.port("submissions"),
                                           client_ssl_context)
    assert got.startswith(b"250") and got.splitlines()[-1].startswith(b"354"), got
    assert records == 1, (records, got)
