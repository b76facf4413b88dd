"""End-to-end IMAP and IMAPS: real sockets on 127.0.0.1, real TLS (trustme), imaplib and
imapclient as clients, the real authenticator, mailbox side, watcher and Maildir on disk."""

from __future__ import annotations

import asyncio
import imaplib
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from imapclient import IMAPClient

from mailfort.config import LimitsConfig
from mailfort.policy.authn import Authenticator
from mailfort.server.imap import IMAPServer, UserSessions
from mailfort.server.mailbox_watch import MailboxWatcher
from mailfort.store.imap_mailbox import Mailbox
from mailfort.store.maildir import maildir_for
from tests.server.test_pop3 import ALICE, AUTH, BOB, PASSWORDS, make_authenticator
from tests.server.unread_pipeline import pipeline_without_reading, slow_client
from tests.server.writes import count_writes

MSG = b"From: x@remote.test\r\nTo: alice@example.test\r\nSubject: hi\r\n\r\nhello\r\n"


@dataclass
class IMAPLab:
    data_dir: Path
    plain: IMAPServer
    implicit: IMAPServer
    client_ctx: ssl.SSLContext
    auth: Authenticator
    watcher: MailboxWatcher

    @property
    def port(self) -> int:
        return self.plain.ports[0]

    @property
    def tls_port(self) -> int:
        return self.implicit.ports[0]

    def deliver(self, user: str, data: bytes) -> None:
        """As the MX's committer does: tmp/ then a rename into new/."""
        md = maildir_for(self.data_dir / "mail", user)
        for sub in ("tmp", "new", "cur"):
            (md / sub).mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns()}.M{len(os.listdir(md / 'new'))}P{os.getpid()}.test"
        (md / "tmp" / name).write_bytes(data)
        os.rename(md / "tmp" / name, md / "new" / name)

    def starttls_login(self, user: str = ALICE) -> imaplib.IMAP4:
        c = imaplib.IMAP4("127.0.0.1", self.port, timeout=10)
        c.starttls(self.client_ctx)
        c.login(user, PASSWORDS[user])
        return c

    def tls_client(self) -> IMAPClient:
        return IMAPClient("127.0.0.1", port=self.tls_port, ssl=True,
                          ssl_context=self.client_ctx, timeout=10)


@pytest.fixture
async def lab_factory(
    tmp_path: Path, server_ssl_context: ssl.SSLContext, client_ssl_context: ssl.SSLContext,
    tls_ca: trustme.CA,
) -> AsyncIterator[Callable[..., Any]]:
    labs: list[IMAPLab] = []

    async def factory(limits: LimitsConfig | None = None, **kw: Any) -> IMAPLab:
        limits = limits or LimitsConfig()
        data_dir = tmp_path / f"data{len(labs)}"
        auth = make_authenticator(data_dir)
        watcher = MailboxWatcher(data_dir / "mail")
        await watcher.start()
        users = UserSessions(limits.imap_sessions_per_user)
        common: dict[str, Any] = dict(ssl_context=server_ssl_context, authenticator=auth,
                                      mail_dir=data_dir / "mail", limits=limits,
                                      watcher=watcher, user_sessions=users)
        plain = IMAPServer(implicit_tls=False, **common, **kw)
        implicit = IMAPServer(implicit_tls=True, **common)
        await plain.start("127.0.0.1", 0)
        await implicit.start("127.0.0.1", 0)
        lab = IMAPLab(data_dir, plain, implicit, client_ssl_context, auth, watcher)
        labs.append(lab)
        return lab

    yield factory
    for lab in labs:
        await lab.plain.close()
        await lab.implicit.close()
        await lab.watcher.close()
        lab.auth.close()


@pytest.fixture
async def lab(lab_factory: Callable[..., Any]) -> IMAPLab:
    return await lab_factory()


def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return asyncio.to_thread(fn, *args)


class Raw:
    """A line-level client, for what a library would not send."""

    def __init__(self, port: int) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            ("127.0.0.1", port), timeout=10)
        self.f = self.sock.makefile("rb")

    def line(self) -> bytes:
        return self.f.readline()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def until(self, tag: bytes) -> list[bytes]:
        out = []
        while True:
            ln = self.line()
            assert ln, f"closed; got {out}"
            out.append(ln)
            if ln.startswith(tag + b" "):
                return out

    def tls(self, ctx: ssl.SSLContext) -> None:
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")
        self.f = self.sock.makefile("rb")

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------ TLS and login


async def test_starttls_then_login_with_imaplib(lab: IMAPLab) -> None:
    lab.deliver(ALICE, MSG)

    def session() -> tuple[bytes, tuple[str, ...], tuple[str, ...], list[bytes]]:
        c = imaplib.IMAP4("127.0.0.1", lab.port, timeout=10)
        greeting = c.welcome
        before = c.capabilities
        c.starttls(lab.client_ctx)
        after = c.capabilities
        c.login(ALICE, PASSWORDS[ALICE])
        typ, _ = c.select("INBOX")
        assert typ == "OK"
        typ, body = c.fetch("1", "(BODY.PEEK[])")
        c.logout()
        return greeting, before, after, body

    greeting, before, after, body = await in_thread(session)
    assert greeting.startswith(b"* OK [CAPABILITY ") and greeting.endswith(b"IMAP ready")
    assert b"mailfort" not in greeting.lower() and b"python" not in greeting.lower()
    assert "LOGINDISABLED" in before and "STARTTLS" in before
    assert not any(c.startswith("AUTH=") for c in before)
    assert "AUTH=PLAIN" in after and "STARTTLS" not in after and "LOGINDISABLED" not in after
    assert body[0][1] == MSG  # type: ignore[index]


async def test_implicit_tls_login_with_imapclient(lab: IMAPLab) -> None:
    lab.deliver(ALICE, MSG)

    def session() -> tuple[list[bytes], dict[bytes, Any], dict[int, Any]]:
        with lab.tls_client() as c:
            caps = list(c.capabilities())
            c.login(ALICE, PASSWORDS[ALICE])
            caps = list(c.capabilities())
            info = c.select_folder("INBOX")
            got = c.fetch(c.search(), ["RFC822.SIZE", "FLAGS"])
            c.logout()
        return caps, info, got

    caps, info, got = await in_thread(session)
    assert b"IDLE" in caps and b"UIDPLUS" in caps and b"STARTTLS" not in caps
    assert info[b"EXISTS"] == 1
    assert [v[b"RFC822.SIZE"] for v in got.values()] == [len(MSG)]


async def test_authenticate_plain_with_sasl_ir_over_imaps(lab: IMAPLab) -> None:
    def session() -> bytes:
        with lab.tls_client() as c:
            typ = c.plain_login(ALICE, PASSWORDS[ALICE])
            c.logout()
        return typ  # type: ignore[no-any-return]

    assert b"Logged in" in await in_thread(session)


async def test_login_in_the_clear_refused_without_tls(lab: IMAPLab) -> None:
    def session() -> tuple[str, bytes]:
        c = imaplib.IMAP4("127.0.0.1", lab.port, timeout=10)
        try:
            c.login(ALICE, PASSWORDS[ALICE])
        except imaplib.IMAP4.error as err:
            refused = str(err)
        else:
            raise AssertionError("LOGIN accepted in the clear")
        raw = Raw(lab.port)
        raw.line()
        raw.send(b"a AUTHENTICATE PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABhbGljZS1wdw==\r\n")
        reply = raw.line()
        raw.close()
        c.logout()
        return refused, reply

    refused, reply = await in_thread(session)
    assert "PRIVACYREQUIRED" in refused
    assert reply == b"a NO [PRIVACYREQUIRED] Use STARTTLS before logging in\r\n"


async def test_loopback_exception_allows_login_in_the_clear(
        lab_factory: Callable[..., Any]) -> None:
    lab = await lab_factory(allow_plaintext=True)

    def session() -> tuple[str, ...]:
        c = imaplib.IMAP4("127.0.0.1", lab.port, timeout=10)
        caps = c.capabilities
        c.login(ALICE, PASSWORDS[ALICE])
        c.logout()
        return caps

    caps = await in_thread(session)
    assert "AUTH=PLAIN" in caps and "LOGINDISABLED" not in caps


async def test_pipelined_command_after_starttls_is_not_executed(lab: IMAPLab) -> None:
    def session() -> list[bytes]:
        raw = Raw(lab.port)
        raw.line()
        # the injection: a command in the same packet as STARTTLS
        raw.send(b"a STARTTLS\r\nb LOGIN alice@example.test alice-pw\r\nc CAPABILITY\r\n")
        assert raw.line() == b"a OK Begin TLS negotiation now\r\n"
        raw.tls(lab.client_ctx)
        raw.send(b"d NOOP\r\n")
        got = raw.until(b"d")
        raw.close()
        return got

    assert await in_thread(session) == [b"d OK NOOP completed\r\n"]


async def test_wrong_password_and_unknown_user_get_the_same_reply(lab: IMAPLab) -> None:
    def attempt(user: str, password: str) -> str:
        with lab.tls_client() as c:
            try:
                c.login(user, password)
            except Exception as err:  # imapclient.exceptions.LoginError
                return str(err)
        raise AssertionError("login accepted")

    wrong = await in_thread(attempt, ALICE, "not-it")
    unknown = await in_thread(attempt, "nobody@example.test", "not-it")
    assert wrong == unknown and "[AUTHENTICATIONFAILED] Authentication failed" in wrong


async def test_brute_force_block_is_shared_with_the_other_services(lab: IMAPLab) -> None:
    for _ in range(AUTH.block_after_failures):
        assert not (await lab.auth.verify(BOB, "guess", "127.0.0.1")).ok

    def attempt(password: str) -> bytes:
        raw = Raw(lab.tls_port)
        raw.sock = lab.client_ctx.wrap_socket(raw.sock, server_hostname="localhost")
        raw.f = raw.sock.makefile("rb")
        raw.line()
        raw.send(f"a LOGIN {BOB} {password}\r\n".encode())
        reply = raw.line()
        raw.close()
        return reply

    blocked = await in_thread(attempt, PASSWORDS[BOB])
    wrong = await in_thread(attempt, "another-guess")
    assert blocked == wrong == b"a NO [AUTHENTICATIONFAILED] Authentication failed\r\n"


async def test_decision_log_lines_as_pop3_and_no_password_logged(
        lab: IMAPLab, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    def session() -> None:
        with lab.tls_client() as c:
            with pytest.raises(Exception, match="AUTHENTICATIONFAILED"):
                c.login(ALICE, "wrong-secret-pw")
            c.login(ALICE, PASSWORDS[ALICE])
            c.logout()

    await in_thread(session)
    decisions = [r.getMessage() for r in caplog.records if r.name == "mailfort.decision"]
    assert "connect from [127.0.0.1] service=imaps" in decisions
    assert f"auth failed from [127.0.0.1] user={ALICE}" in decisions
    assert any(d.startswith("auth ok from [127.0.0.1]") for d in decisions)
    assert "wrong-secret-pw" not in caplog.text and PASSWORDS[ALICE] not in caplog.text


# ------------------------------------------------------------------ limits


async def test_sessions_per_user_limit(lab_factory: Callable[..., Any]) -> None:
    lab = await lab_factory(LimitsConfig(imap_sessions_per_user=2))

    def session() -> tuple[str, str]:
        first, second = lab.tls_client(), lab.tls_client()
        first.login(ALICE, PASSWORDS[ALICE])
        second.login(ALICE, PASSWORDS[ALICE])
        with lab.tls_client() as third:
            try:
                third.login(ALICE, PASSWORDS[ALICE])
            except Exception as err:
                refused = str(err)
            else:
                raise AssertionError("a third session logged in")
            # another user is not concerned
            with lab.tls_client() as bob:
                bob.login(BOB, PASSWORDS[BOB])
                bob.logout()
            first.logout()
            deadline = time.monotonic() + 5
            while True:  # the slot is given back when the server has closed the first one
                try:
                    third.login(ALICE, PASSWORDS[ALICE])
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            ok = "logged in"
            third.logout()
        second.logout()
        return refused, ok

    refused, ok = await in_thread(session)
    assert "[LIMIT] Too many sessions for this user" in refused
    assert ok == "logged in"


async def test_huge_literal_refused_before_buffering(lab: IMAPLab) -> None:
    def session() -> list[bytes]:
        raw = Raw(lab.port)
        raw.line()
        raw.send(b"a SELECT {4294967295}\r\n")  # (LOGIN's literal is refused before TLS)
        got = [raw.line()]
        raw.send(b"b CAPABILITY\r\n")
        got += raw.until(b"b")
        raw.close()
        return got

    got = await in_thread(session)
    assert got[0] == b"a BAD [TOOBIG] literal too large\r\n"
    assert got[-1] == b"b OK CAPABILITY completed\r\n"


async def test_append_over_appendlimit_refused_toobig(lab_factory: Callable[..., Any]) -> None:
    lab = await lab_factory(LimitsConfig(imap_append_limit=1000))

    def session() -> tuple[list[bytes], bytes]:
        with lab.tls_client() as c:
            c.login(ALICE, PASSWORDS[ALICE])
            caps = list(c.capabilities())
            try:
                c.append("INBOX", b"x" * 2000)
            except Exception as err:
                refused = str(err).encode()
            else:
                raise AssertionError("APPEND over the limit accepted")
            c.logout()
        return caps, refused

    caps, refused = await in_thread(session)
    assert b"APPENDLIMIT=1000" in caps
    assert b"TOOBIG" in refused


async def test_literal_plus_append_and_one_over_appendlimit(
        lab_factory: Callable[..., Any]) -> None:
    """LITERAL+ is announced (not LITERAL-), an APPEND {N+} larger than LITERAL-'s 4096
    is stored without a continuation, and one over APPENDLIMIT sent whole without waiting
    gets NO [TOOBIG] with the session still in step (the next command answered)."""
    lab = await lab_factory(LimitsConfig(imap_append_limit=20_000))

    def session() -> list[bytes]:
        raw = Raw(lab.tls_port)
        raw.tls(lab.client_ctx)
        got = [raw.line()]
        raw.send(b'a LOGIN "%s" "%s"\r\n' % (ALICE.encode(), PASSWORDS[ALICE].encode()))
        got += raw.until(b"a")
        msg = b"Subject: plus\r\n\r\n" + b"p" * 10_000 + b"\r\n"
        raw.send(b"b APPEND INBOX {%d+}\r\n" % len(msg) + msg + b"\r\n")
        got += raw.until(b"b")
        big = b"Subject: big\r\n\r\n" + b"q" * 30_000 + b"\r\n"
        raw.send(b"c APPEND INBOX {%d+}\r\n" % len(big) + big + b"\r\nd NOOP\r\n")
        got += raw.until(b"c") + raw.until(b"d")
        raw.send(b"e STATUS INBOX (MESSAGES)\r\n")
        got += raw.until(b"e")
        raw.close()
        return got

    got = await in_thread(session)
    assert b"LITERAL+" in got[0] and b"LITERAL-" not in got[0]
    assert any(g.startswith(b"b OK [APPENDUID ") for g in got)
    assert any(g.startswith(b"c NO [TOOBIG]") for g in got)
    assert any(g.startswith(b"d OK") for g in got)
    assert b"* STATUS \"INBOX\" (MESSAGES 1)\r\n" in got


async def test_configured_quota_is_reported_and_enforced(
        lab_factory: Callable[..., Any]) -> None:
    """limits.mailbox_quota reaches the session: GETQUOTAROOT shows it (old Thunderbird
    reads it there) and an APPEND past it gets [OVERQUOTA]."""
    lab = await lab_factory(LimitsConfig(mailbox_quota=4096, mailbox_quota_messages=10))

    def session() -> tuple[object, object, bytes]:
        with lab.tls_client() as c:
            c.login(ALICE, PASSWORDS[ALICE])
            c.append("INBOX", b"Subject: one\r\n\r\n" + b"x" * 1000 + b"\r\n")
            roots, quotas = c.get_quota_root("INBOX")
            root = (roots.mailbox, tuple(roots.quota_roots))
            quota = sorted((q.quota_root, q.resource, q.usage, q.limit) for q in quotas)
            try:
                c.append("INBOX", b"Subject: two\r\n\r\n" + b"y" * 5000 + b"\r\n")
            except Exception as err:
                refused = str(err).encode()
            else:
                raise AssertionError("APPEND past the quota accepted")
            c.logout()
        return root, quota, refused

    root, quota, refused = await in_thread(session)
    assert root == ("INBOX", ("",))
    assert quota == [("", "MESSAGE", 1, 10), ("", "STORAGE", 1, 4)]
    assert b"OVERQUOTA" in refused


async def test_idle_timeout_before_login(lab_factory: Callable[..., Any]) -> None:
    lab = await lab_factory(LimitsConfig(imap_login_timeout=0.3))

    def session() -> list[bytes]:
        raw = Raw(lab.port)
        got = [raw.line(), raw.line(), raw.line()]
        raw.close()
        return got

    got = await in_thread(session)
    assert got[1] == b"* BYE Autologout; idle for too long\r\n" and got[2] == b""


async def test_large_fetch_streams_as_the_client_reads(
        lab_factory: Callable[..., Any]) -> None:
    """10 MiB of messages to a client that reads slowly: the session never holds more than
    about one message and a socket buffer of it (the untagged responses are pulled lazily)."""
    lab = await lab_factory(allow_plaintext=True)
    body = b"Subject: big\r\n\r\n" + (b"x" * 1022 + b"\r\n") * 256  # 256 KiB
    for _ in range(40):
        lab.deliver(ALICE, body)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.settimeout(10)
    await in_thread(sock.connect, ("127.0.0.1", lab.port))
    f = sock.makefile("rb")

    def start() -> None:
        f.readline()
        sock.sendall(f"a LOGIN {ALICE} {PASSWORDS[ALICE]}\r\nb SELECT INBOX\r\n".encode())
        while not f.readline().startswith(b"b OK"):
            pass
        sock.sendall(b"c UID FETCH 1:* BODY.PEEK[]\r\n")

    await in_thread(start)
    await asyncio.sleep(0.5)  # the client reads nothing meanwhile
    (session,) = lab.plain.sessions
    held = session.transport.get_write_buffer_size()
    assert held < 1024 * 1024, held

    def drain() -> int:
        total = 0
        while True:
            line = f.readline()
            if line.startswith(b"c "):
                assert line.startswith(b"c OK"), line
                return total
            total += len(line)

    got = await in_thread(drain)
    sock.close()
    assert got > 40 * len(body)


async def test_pipelined_commands_from_a_client_that_does_not_read_hold_little_memory(
        lab_factory: Callable[..., Any]) -> None:
    """CAPABILITY is answered by the engine itself, with no event for the server: one read
    of pipelined CAPABILITYs (~20 answer octets per command octet after login) used to be
    answered whole before anything was written, 1.3 MB held. The engine now parses no
    further command once ``OUTPUT_PAUSE`` of its answers wait, so the session's passes stop
    while the client does not read; every answer still comes, in order."""
    lab = await lab_factory(allow_plaintext=True)
    sock, reader = await in_thread(slow_client, lab.port)
    try:
        assert (await in_thread(reader.readline)).startswith(b"* OK")
        sock.sendall(f"l LOGIN {ALICE} {PASSWORDS[ALICE]}\r\n".encode())
        assert (await in_thread(reader.readline)).startswith(b"l OK")
        (session,) = lab.plain.sessions
        sock.sendall(b"a CAPABILITY\r\n")
        answer = await in_thread(reader.readline)
        answer += await in_thread(reader.readline)
        assert answer.startswith(b"* CAPABILITY ")
        assert answer.endswith(b"a OK CAPABILITY completed\r\n")
        count = 8_000_000 // len(answer)
        await pipeline_without_reading(sock, reader, session, b"a CAPABILITY\r\n", answer,
                                       count)
        sock.sendall(b"z LOGOUT\r\n")
        assert (await in_thread(reader.readline)).startswith(b"* BYE")
    finally:
        reader.close()
        sock.close()


async def test_a_large_fetch_answer_starts_with_a_small_write(
        lab_factory: Callable[..., Any]) -> None:
    """The first write of a long FETCH answer is small (the client starts reading after a
    few dozen responses, not after the ~256 KiB a batch holds: ~850 ENVELOPEs, ~20 ms of
    work with the client idle), and the writes then grow: no more hops than needed."""
    lab = await lab_factory(allow_plaintext=True)
    body = b"Subject: s\r\n\r\n" + (b"y" * 1022 + b"\r\n") * 2  # ~2 KiB
    for _ in range(300):
        lab.deliver(ALICE, body)
    sock = socket.create_connection(("127.0.0.1", lab.port), timeout=10)
    f = sock.makefile("rb")

    def command(text: bytes) -> int:
        sock.sendall(text)
        total = 0
        while not (line := f.readline()).startswith(text[:2]):
            assert line, "connection closed"
            total += len(line)
        assert line.startswith(text[:2] + b"OK"), line
        return total

    await in_thread(f.readline)
    await in_thread(command, f"a LOGIN {ALICE} {PASSWORDS[ALICE]}\r\n".encode())
    await in_thread(command, b"b SELECT INBOX\r\n")
    (session,) = lab.plain.sessions
    writes = count_writes(session)
    got = await in_thread(command, b"c UID FETCH 1:* BODY.PEEK[]\r\n")
    sock.close()
    assert got > 300 * len(body)
    assert writes[0] <= 20 * 1024, writes  # FIRST_BATCH_BYTES and one response
    assert writes[1] <= 2 * writes[0] + 4096, writes
    assert len(writes) <= 8, writes  # 16, 32, 64, 128, 256 KiB, the rest, the tagged OK


async def test_timeouts_by_state_idle_outlasts_the_others(
        lab_factory: Callable[..., Any]) -> None:
    # The login timeout is not under test here (test_idle_timeout_before_login): long
    # enough for a LOGIN on a loaded machine.
    lab = await lab_factory(LimitsConfig(imap_login_timeout=10, imap_timeout=0.4,
                                         imap_idle_timeout=5), allow_plaintext=True)

    def session() -> tuple[list[bytes], float]:
        raw = Raw(lab.port)
        raw.line()
        raw.send(f"a LOGIN {ALICE} {PASSWORDS[ALICE]}\r\nb IDLE\r\n".encode())
        got = raw.until(b"a")
        got.append(raw.line())  # + idling
        time.sleep(1.0)  # longer than the logged-in timeout: IDLE has its own
        raw.send(b"DONE\r\n")
        got += raw.until(b"b")
        start = time.monotonic()
        got.append(raw.line())  # the logged-in timeout, counted from DONE
        took = time.monotonic() - start
        raw.close()
        return got, took

    got, took = await in_thread(session)
    assert got[-3] == b"+ idling\r\n" and got[-2] == b"b OK IDLE terminated\r\n"
    assert got[-1] == b"* BYE Autologout; idle for too long\r\n"
    assert 0.2 < took < 2.0


# ------------------------------------------------------------------ IDLE


async def test_idle_sees_a_delivered_message(lab: IMAPLab) -> None:
    lab.deliver(ALICE, MSG)
    ready = asyncio.Event()
    loop = asyncio.get_running_loop()

    def session() -> tuple[list[Any], float]:
        with lab.tls_client() as c:
            c.login(ALICE, PASSWORDS[ALICE])
            c.select_folder("INBOX")
            c.idle()
            loop.call_soon_threadsafe(ready.set)
            start = time.monotonic()
            responses = c.idle_check(timeout=5)
            took = time.monotonic() - start
            c.idle_done()
            c.logout()
        return responses, took

    task = asyncio.ensure_future(in_thread(session))
    await ready.wait()
    await asyncio.sleep(0.1)
    lab.deliver(ALICE, MSG)
    responses, took = await task
    assert (2, b"EXISTS") in responses
    assert took < 1.5


async def test_many_idle_sessions_on_one_mailbox_share_one_scan_per_delivery(
        lab_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Forty sessions of one user IDLE on INBOX: each delivery reaches every one of them as
    EXISTS, in order, and the worker scans the mailbox a few times per delivery (the
    delivery, and the wake-ups its own move to cur/ and UID log record cause), not once
    per session: the sessions woken by one change share a scan begun after it."""
    n = 40
    lab = await lab_factory(LimitsConfig(imap_sessions_per_user=n + 5), allow_plaintext=True)
    scans = 0
    real = Mailbox._scan_quiet

    def counted(self: Mailbox, *args: Any) -> Any:
        nonlocal scans
        scans += 1
        return real(self, *args)

    monkeypatch.setattr(Mailbox, "_scan_quiet", counted)
    lab.deliver(ALICE, MSG)
    conns = []
    for _ in range(n):
        r, w = await asyncio.open_connection("127.0.0.1", lab.port)
        await r.readline()
        w.write(f"a LOGIN {ALICE} {PASSWORDS[ALICE]}\r\ne ENABLE IMAP4rev2\r\n"
                "b SELECT INBOX\r\nc IDLE\r\n".encode())  # rev2: no RECENT after EXISTS
        while not (await asyncio.wait_for(r.readline(), 10)).startswith(b"+"):
            pass
        conns.append((r, w))

    async def told(r: asyncio.StreamReader) -> list[bytes]:
        got: list[bytes] = []
        while not got or not got[-1].endswith(b" EXISTS\r\n"):
            got.append(await asyncio.wait_for(r.readline(), 10))
        return got

    try:
        for exists in (2, 3):
            await asyncio.sleep(0.2)  # the last round's wake-ups are over
            before = scans
            lab.deliver(ALICE, MSG)
            got = await asyncio.gather(*(told(r) for r, _ in conns))
            assert all(g == [b"* %d EXISTS\r\n" % exists] for g in got), got
            await asyncio.sleep(0.3)  # the wake-ups the scan's own changes cause
            assert scans - before <= 4, f"{scans - before} scans for {n} sessions"
        for r, w in conns:
            w.write(b"DONE\r\nd FETCH 1:* (UID)\r\n")
            lines = [await asyncio.wait_for(r.readline(), 10) for _ in range(5)]
            assert lines[0] == b"c OK IDLE terminated\r\n" and lines[-1].startswith(b"d OK")
    finally:
        for _, w in conns:
            w.close()


async def test_idle_sessions_sharing_scans_follow_flags_expunges_and_deliveries(
        lab_factory: Callable[..., Any]) -> None:
    """Eight sessions IDLE on INBOX while another session of the same worker stores flags
    and expunges, and mail arrives, in quick succession (wake-ups coalesce, scans are
    shared): what each IDLE session is told, applied in order to its own list of messages,
    ends as the mailbox is (RFC 9051 §7.5.1 order: the numbers stay right)."""
    lab = await lab_factory(LimitsConfig(imap_sessions_per_user=20), allow_plaintext=True)
    for _ in range(3):
        lab.deliver(ALICE, MSG)

    async def login(idle: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        r, w = await asyncio.open_connection("127.0.0.1", lab.port)
        await r.readline()
        w.write(f"a LOGIN {ALICE} {PASSWORDS[ALICE]}\r\ne ENABLE IMAP4rev2\r\n"
                f"b SELECT INBOX\r\n{'c IDLE' if idle else 'f NOOP'}\r\n".encode())
        end = b"+" if idle else b"f OK"
        while not (await asyncio.wait_for(r.readline(), 10)).startswith(end):
            pass
        return r, w

    async def command(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                      tag: bytes, text: bytes) -> list[bytes]:
        w.write(tag + b" " + text + b"\r\n")
        got = []
        while not (line := await asyncio.wait_for(r.readline(), 10)).startswith(tag + b" "):
            got.append(line)
        assert line.startswith(tag + b" OK"), line
        return got

    def apply(model: list[frozenset[bytes]], line: bytes) -> None:
        if m := re.fullmatch(rb"\* (\d+) EXISTS\r\n", line):
            model.extend(frozenset() for _ in range(int(m[1]) - len(model)))
        elif m := re.fullmatch(rb"\* (\d+) EXPUNGE\r\n", line):
            del model[int(m[1]) - 1]
        elif m := re.fullmatch(rb"\* (\d+) FETCH \((?:UID \d+ )?FLAGS \(([^)]*)\)\)\r\n", line):
            model[int(m[1]) - 1] = frozenset(m[2].split())

    idlers = [await login(True) for _ in range(8)]
    writer = await login(False)
    models = [[frozenset[bytes]() for _ in range(3)] for _ in idlers]

    async def follow(i: int, r: asyncio.StreamReader) -> None:
        while line := await r.readline():
            apply(models[i], line)

    readers = [asyncio.ensure_future(follow(i, r)) for i, (r, _) in enumerate(idlers)]
    try:
        await command(*writer, b"w1", b"STORE 1 +FLAGS (\\Flagged)")
        lab.deliver(ALICE, MSG)
        await command(*writer, b"n1", b"NOOP")  # the writer's own view learns of it
        await command(*writer, b"w2", b"STORE 2,4 +FLAGS (\\Seen)")
        await command(*writer, b"w3", b"STORE 1,3 +FLAGS (\\Deleted)")
        await command(*writer, b"w4", b"EXPUNGE")
        lab.deliver(ALICE, MSG)
        await command(*writer, b"w5", b"STORE 1 FLAGS (\\Answered)")
        await asyncio.sleep(1.0)  # every wake-up's updates are out
        truth = [frozenset[bytes]() for _ in range(3)]
        for line in await command(*writer, b"w6", b"FETCH 1:* (FLAGS)"):
            apply(truth, line)
        assert [sorted(f) for f in truth] == [[b"\\Answered"], [b"\\Seen"], []]
        for model in models:
            assert model == truth
    finally:
        for t in readers:
            t.cancel()
        for _, w in [*idlers, writer]:
            w.close()


async def test_noop_reports_a_delivered_message(lab: IMAPLab) -> None:
    def session() -> list[Any]:
        with lab.tls_client() as c:
            c.login(ALICE, PASSWORDS[ALICE])
            c.select_folder("INBOX")
            lab.deliver(ALICE, MSG)
            _, responses = c.noop()
            c.logout()
        return responses  # type: ignore[no-any-return]

    assert (1, b"EXISTS") in await in_thread(session)


async def test_store_wakes_another_sessions_idle(lab: IMAPLab) -> None:
    lab.deliver(ALICE, MSG)
    ready = asyncio.Event()
    loop = asyncio.get_running_loop()

    def idler() -> list[Any]:
        with lab.tls_client() as c:
            c.login(ALICE, PASSWORDS[ALICE])
            c.select_folder("INBOX")
            c.idle()
            loop.call_soon_threadsafe(ready.set)
            responses = c.idle_check(timeout=5)
            c.idle_done()
            c.logout()
        return responses  # type: ignore[no-any-return]

    def writer() -> None:
        with lab.tls_client() as c:
            c.login(ALICE, PASSWORDS[ALICE])
            c.select_folder("INBOX")
            c.add_flags(c.search(), [b"\\Flagged"], silent=True)
            c.logout()

    task = asyncio.ensure_future(in_thread(idler))
    await ready.wait()
    await in_thread(writer)
    responses = await task
    assert any(r[0] == 1 and r[1] == b"FETCH" for r in responses), responses


async def test_shutdown_says_bye(lab: IMAPLab) -> None:
    raw = Raw(lab.port)
    greeting = await in_thread(raw.line)
    assert greeting.startswith(b"* OK")
    await lab.plain.close()
    bye = await in_thread(raw.line)
    raw.close()
    assert bye == b"* BYE [UNAVAILABLE] Service shutting down, try again later\r\n"


# ------------------------------------------------------------------ the node


def test_embedded_default_listens_on_2143_and_2993() -> None:
    from mailfort.config import Config
    from mailfort.server.node_plan import LISTENERS

    listen = Config().listen
    assert (listen.imap, listen.imaps) == (["127.0.0.1:2143"], ["127.0.0.1:2993"])
    rows = {p.name: p for p in LISTENERS}
    assert rows["imap"].engine == rows["imaps"].engine == "imap"
    assert rows["imaps"].implicit_tls and not rows["imap"].implicit_tls


async def test_node_mail_from_the_mx_wakes_an_idle_client(
        node: Any, client_ssl_context: ssl.SSLContext) -> None:
    """The whole node: the MX's committer tells the watcher, IDLE over IMAPS sees it."""
    import smtplib

    ready = asyncio.Event()
    loop = asyncio.get_running_loop()

    def idler() -> tuple[list[Any], float]:
        with IMAPClient("127.0.0.1", port=node.port("imaps"), ssl=True,
                        ssl_context=client_ssl_context, timeout=10) as c:
            c.login(ALICE, "alice-pw")
            c.select_folder("INBOX")
            c.idle()
            loop.call_soon_threadsafe(ready.set)
            start = time.monotonic()
            responses = c.idle_check(timeout=5)
            took = time.monotonic() - start
            c.idle_done()
            c.logout()
        return responses, took

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", node.port("mx"), timeout=10) as s:
            s.sendmail("x@remote.test", [ALICE], MSG)

    task = asyncio.ensure_future(in_thread(idler))
    await ready.wait()
    await in_thread(send)
    responses, took = await task
    assert (1, b"EXISTS") in responses and took < 1.5
