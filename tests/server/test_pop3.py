"""End-to-end POP3 and POP3S: real sockets on 127.0.0.1, real TLS (trustme), poplib and
fetchmail as clients, the real authenticator and a real Maildir on disk."""

from __future__ import annotations

import asyncio
import base64
import os
import poplib
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from argon2 import PasswordHasher

from mailfort.config import AuthConfig, LimitsConfig
from mailfort.directory.sqlite import SQLiteDirectory
from mailfort.passwords import hash_password
from mailfort.policy.authn import Authenticator
from mailfort.policy.counters import MemoryCounters
from mailfort.server.pop3 import PIPELINE_MAX, POP3Server
from mailfort.store import pop3_mailbox
from mailfort.store.maildir import maildir_for
from tests.server.writes import count_writes

ALICE = "alice@example.test"
BOB = "bob@example.test"
PASSWORDS = {ALICE: "alice-pw", BOB: "bob-pw"}
# Delays from the second failure on, a block after five: fast, but both are exercised.
AUTH = AuthConfig(failure_delay=0.05, delay_after_failures=1, block_after_failures=5)
CHEAP = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def make_authenticator(data_dir: Path) -> Any:
    """The real Authenticator over a real SQLite directory, with cheap argon2 parameters."""
    data_dir.mkdir(parents=True, exist_ok=True)
    directory = SQLiteDirectory(data_dir / "directory.sqlite3")
    directory.add_domain("example.test")
    for user, pw in PASSWORDS.items():
        directory.add_user(user, hash_password(pw, hasher=CHEAP))
    return Authenticator(directory, MemoryCounters(), AUTH, hasher=CHEAP)


@dataclass
class POP3Lab:
    data_dir: Path
    plain: POP3Server
    implicit: POP3Server
    client_ctx: ssl.SSLContext
    ca_file: Path
    auth: Authenticator

    @property
    def port(self) -> int:
        return self.plain.ports[0]

    @property
    def tls_port(self) -> int:
        return self.implicit.ports[0]

    def deliver(self, user: str, data: bytes, name: str | None = None) -> str:
        md = maildir_for(self.data_dir / "mail", user)
        for sub in ("tmp", "new", "cur"):
            (md / sub).mkdir(parents=True, exist_ok=True)
        name = name or f"{time.time_ns()}.M{len(os.listdir(md / 'new'))}P{os.getpid()}.test"
        (md / "tmp" / name).write_bytes(data)
        os.rename(md / "tmp" / name, md / "new" / name)
        return name

    def files(self, user: str) -> list[str]:
        md = maildir_for(self.data_dir / "mail", user)
        return sorted(os.listdir(md / "new") + os.listdir(md / "cur"))

    def stls_login(self, user: str = ALICE, password: str | None = None) -> poplib.POP3:
        c = poplib.POP3("127.0.0.1", self.port, timeout=10)
        c.stls(self.client_ctx)
        c.user(user)
        c.pass_(password or PASSWORDS[user])
        return c

    def tls_login(self, user: str = ALICE, password: str | None = None) -> poplib.POP3_SSL:
        c = poplib.POP3_SSL("127.0.0.1", self.tls_port, context=self.client_ctx, timeout=10)
        c.user(user)
        c.pass_(password or PASSWORDS[user])
        return c


async def start_lab(tmp_path: Path, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
                    tls_ca: trustme.CA, limits: LimitsConfig,
                    allow_plaintext: bool = False) -> POP3Lab:
    data_dir = tmp_path / "data"
    auth = make_authenticator(data_dir)
    common: dict[str, Any] = dict(ssl_context=server_ctx, authenticator=auth,
                                  mail_dir=data_dir / "mail",
                                  limits=limits, hostname="mx.example.test")
    plain = POP3Server(implicit_tls=False, allow_plaintext=allow_plaintext, **common)
    implicit = POP3Server(implicit_tls=True, **common)
    await plain.start("127.0.0.1", 0)
    await implicit.start("127.0.0.1", 0)
    ca_file = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_file))
    return POP3Lab(data_dir, plain, implicit, client_ctx, ca_file, auth)


@pytest.fixture(scope="module")
def pop3_ssl_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    """Like the shared server context, with a CN as well: fetchmail checks the CN."""
    cert = tls_ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    cert.configure_cert(ctx)
    return ctx


@pytest.fixture
async def lab_factory(
    tmp_path: Path, pop3_ssl_context: ssl.SSLContext, client_ssl_context: ssl.SSLContext,
    tls_ca: trustme.CA,
) -> AsyncIterator[Callable[..., Any]]:
    server_ssl_context = pop3_ssl_context
    labs: list[POP3Lab] = []

    async def factory(limits: LimitsConfig | None = None, **kw: Any) -> POP3Lab:
        lab = await start_lab(tmp_path, server_ssl_context, client_ssl_context, tls_ca,
                                 limits or LimitsConfig(), **kw)
        labs.append(lab)
        return lab

    yield factory
    for lab in labs:
        await lab.plain.close()
        await lab.implicit.close()
        lab.auth.close()


@pytest.fixture
async def lab(lab_factory: Callable[..., Any]) -> POP3Lab:
    return await lab_factory()


def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return asyncio.to_thread(fn, *args)


CRLF_MSG = b"From: x@remote.test\r\nSubject: hi\r\n\r\nhello\r\n"


# ------------------------------------------------------------------ TLS and login

async def test_login_refused_before_stls_then_accepted_after(lab: POP3Lab) -> None:
    lab.deliver(ALICE, CRLF_MSG)

    def session() -> tuple[bytes, list[str], dict[str, Any], tuple[int, int]]:
        c = poplib.POP3("127.0.0.1", lab.port, timeout=10)
        greeting = c.getwelcome()
        caps_before = list(c.capa())
        with pytest.raises(poplib.error_proto) as refused:
            c.user(ALICE)
        assert b"[AUTH]" in refused.value.args[0]
        with pytest.raises(poplib.error_proto):
            c._shortcmd("AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0alice-pw")
                        .decode())
        c.stls(lab.client_ctx)
        caps_after = c.capa()
        c.user(ALICE)
        c.pass_(PASSWORDS[ALICE])
        stat = c.stat()
        c.quit()
        return greeting, caps_before, caps_after, stat

    greeting, before, after, stat = await in_thread(session)
    assert greeting.startswith(b"+OK")
    assert b"mailfort" not in greeting.lower() and b"python" not in greeting.lower()
    assert "STLS" in before and "USER" not in before and "SASL" not in before
    assert "USER" in after and after["SASL"] == ["PLAIN"] and "STLS" not in after
    assert stat == (1, len(CRLF_MSG))


async def test_implicit_tls_login_and_auth_plain(lab: POP3Lab) -> None:
    lab.deliver(ALICE, CRLF_MSG)

    def session() -> tuple[tuple[int, int], bytes]:
        c = poplib.POP3_SSL("127.0.0.1", lab.tls_port, context=lab.client_ctx, timeout=10)
        assert "STLS" not in c.capa()
        token = base64.b64encode(f"\0{ALICE}\0{PASSWORDS[ALICE]}".encode()).decode()
        resp = c._shortcmd("AUTH PLAIN " + token)
        stat = c.stat()
        c.quit()
        return stat, resp

    stat, resp = await in_thread(session)
    assert resp.startswith(b"+OK")
    assert stat == (1, len(CRLF_MSG))


async def test_wrong_password_and_unknown_user_get_the_same_reply(lab: POP3Lab) -> None:
    def attempt(user: str, password: str) -> bytes:
        c = poplib.POP3_SSL("127.0.0.1", lab.tls_port, context=lab.client_ctx, timeout=10)
        c.user(user)
        with pytest.raises(poplib.error_proto) as err:
            c.pass_(password)
        c.quit()
        return err.value.args[0]

    wrong = await in_thread(attempt, ALICE, "not-it")
    unknown = await in_thread(attempt, "nobody@example.test", "not-it")
    foreign = await in_thread(attempt, "x@elsewhere.test", "not-it")
    assert wrong == unknown == foreign == b"-ERR [AUTH] Authentication failed"


async def test_brute_force_block_is_shared_and_looks_like_a_failure(lab: POP3Lab) -> None:
    # Failures counted by the shared Authenticator (here as SMTP AUTH from this host would
    # count them) block this client over POP3 too, and a blocked login gets the very reply
    # of a wrong password.
    for _ in range(AUTH.block_after_failures):
        outcome = await lab.auth.verify(BOB, "guess", "127.0.0.1")
        assert not outcome.ok

    def attempt(password: str) -> bytes:
        c = poplib.POP3_SSL("127.0.0.1", lab.tls_port, context=lab.client_ctx, timeout=10)
        c.user(BOB)
        try:
            return c.pass_(password)
        except poplib.error_proto as err:
            return err.args[0]
        finally:
            c.close()

    blocked = await in_thread(attempt, PASSWORDS[BOB])
    wrong = await in_thread(attempt, "another guess")
    assert blocked == wrong == b"-ERR [AUTH] Authentication failed"
    # The client is blocked, not the account (tests/policy/test_authn.py over sockets).
    assert (await lab.auth.verify(BOB, PASSWORDS[BOB], "192.0.2.7")).ok


async def test_stls_discards_pipelined_commands(lab: POP3Lab) -> None:
    lab.deliver(ALICE, CRLF_MSG)
    sock = socket.create_connection(("127.0.0.1", lab.port), timeout=10)

    def session() -> list[bytes]:
        f = sock.makefile("rb")
        assert f.readline().startswith(b"+OK")
        # the classic injection: commands in the same packet as STLS
        sock.sendall(b"STLS\r\nUSER alice@example.test\r\nPASS alice-pw\r\n")
        assert f.readline() == b"+OK Begin TLS negotiation\r\n"
        tls = lab.client_ctx.wrap_socket(sock, server_hostname="localhost")
        tf = tls.makefile("rb")
        tls.sendall(b"PASS alice-pw\r\nSTAT\r\nQUIT\r\n")
        replies = [tf.readline() for _ in range(3)]
        tls.close()
        return replies

    replies = await in_thread(session)
    assert replies[0].startswith(b"-ERR")  # no USER survived the handshake
    assert replies[1].startswith(b"-ERR")  # and no login either
    assert replies[2] == b"+OK Bye\r\n"


async def test_plaintext_allowed_on_loopback_by_config(lab_factory: Callable[..., Any]) -> None:
    lab = await lab_factory(allow_plaintext=True)

    def session() -> tuple[dict[str, Any], tuple[int, int]]:
        c = poplib.POP3("127.0.0.1", lab.port, timeout=10)
        caps = c.capa()
        c.user(ALICE)
        c.pass_(PASSWORDS[ALICE])
        stat = c.stat()
        c.quit()
        return caps, stat

    caps, stat = await in_thread(session)
    assert "USER" in caps
    assert stat == (0, 0)


# ------------------------------------------------------------------ RFC 1939 semantics

async def test_retr_top_uidl_dele_rset_quit(lab: POP3Lab) -> None:
    m1 = b"Subject: one\r\nX: 1\r\n\r\nl1\r\nl2\r\nl3\r\n"
    m2 = b"Subject: two\r\n\r\nbody two\r\n"
    n1 = lab.deliver(ALICE, m1)
    n2 = lab.deliver(ALICE, m2)

    def first() -> dict[str, Any]:
        c = lab.stls_login()
        r: dict[str, Any] = {}
        r["uidl"] = c.uidl()[1]
        r["list"] = c.list()[1]
        r["top"] = c.top(1, 1)[1]
        r["top0"] = c.top(1, 0)[1]
        r["retr"] = c.retr(2)[1]
        c.dele(1)
        with pytest.raises(poplib.error_proto):
            c.retr(1)
        r["stat_after_dele"] = c.stat()
        c.rset()
        r["stat_after_rset"] = c.stat()
        c.dele(2)
        r["noop"] = c.noop()
        r["quit"] = c.quit()
        return r

    r = await in_thread(first)
    assert r["uidl"] == [f"1 {n1}".encode(), f"2 {n2}".encode()]
    assert r["list"] == [b"1 %d" % len(m1), b"2 %d" % len(m2)]
    assert r["top"] == [b"Subject: one", b"X: 1", b"", b"l1"]
    assert r["top0"] == [b"Subject: one", b"X: 1", b""]
    assert r["retr"] == [b"Subject: two", b"", b"body two"]
    assert r["stat_after_dele"] == (1, len(m2))
    assert r["stat_after_rset"] == (2, len(m1) + len(m2))
    assert r["noop"].startswith(b"+OK")
    assert r["quit"].startswith(b"+OK")
    # +OK to QUIT comes once the deletions are done: message 2 is gone at once (message 1
    # may be on its way from new/ to cur/, so only its absence is certain here).
    assert n2 not in [f.split(":")[0] for f in lab.files(ALICE)]

    def files_once_filed() -> list[str]:
        # Filing in cur/ ends in a thread after the +OK; a next login waits for it.
        c = lab.stls_login()
        try:
            assert c.stat()[0] == 1
            return lab.files(ALICE)
        finally:
            c.quit()

    files = await in_thread(files_once_filed)
    assert len(files) == 1 and files[0].startswith(n1 + ":2,")  # only message 2 is gone


async def test_dropped_connection_deletes_nothing(lab: POP3Lab) -> None:
    lab.deliver(ALICE, CRLF_MSG)
    lab.deliver(ALICE, CRLF_MSG)

    def drop() -> None:
        c = lab.stls_login()
        c.dele(1)
        c.dele(2)
        c.sock.close()  # no QUIT

    await in_thread(drop)
    await asyncio.sleep(0.1)
    assert len(lab.files(ALICE)) == 2

    def again() -> tuple[int, int]:
        c = lab.stls_login()  # the lock was released
        stat = c.stat()
        c.quit()
        return stat

    assert (await in_thread(again))[0] == 2


async def test_quit_then_disconnect_still_applies_every_dele(lab: POP3Lab) -> None:
    """RFC 1939 §6: once QUIT is sent, the marked messages go and nothing else does, even
    when the client closes at once (the server then cannot answer +OK). The deletions must
    neither race the end-of-session new/ -> cur/ renames (a delete missing a renamed file
    left it in cur/) nor outlive the maildrop lock (a next session listed them)."""
    count, rounds = 40, 10

    def quit_and_vanish() -> None:
        sock = socket.create_connection(("127.0.0.1", lab.tls_port), timeout=10)
        tls = lab.client_ctx.wrap_socket(sock, server_hostname="localhost")
        f = tls.makefile("rb")
        tls.sendall(f"USER {ALICE}\r\nPASS {PASSWORDS[ALICE]}\r\n".encode())
        replies = [f.readline() for _ in range(3)]
        assert all(r.startswith(b"+OK") for r in replies), replies
        doomed = b"".join(b"DELE %d\r\n" % i for i in range(1, count + 1, 2))
        tls.sendall(doomed + b"QUIT\r\n")
        # at once and abortively (RST): the server learns of it while it is deleting
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        f.close()
        tls.close()

    def next_session() -> tuple[int, int]:
        deadline = time.monotonic() + 10
        while True:
            c = poplib.POP3_SSL("127.0.0.1", lab.tls_port, context=lab.client_ctx, timeout=10)
            c.user(ALICE)
            try:
                c.pass_(PASSWORDS[ALICE])
            except poplib.error_proto as err:  # the update still holds the maildrop
                assert err.args[0].startswith(b"-ERR [IN-USE]"), err.args
                c.close()
                assert time.monotonic() < deadline, "the mailbox stayed locked"
                time.sleep(0.01)
                continue
            stat = c.stat()
            c.quit()
            return stat

    md = maildir_for(lab.data_dir / "mail", ALICE)
    for _ in range(rounds):
        for sub in ("new", "cur"):
            for old in os.listdir(md / sub) if (md / sub).exists() else []:
                (md / sub / old).unlink()
        names = [lab.deliver(ALICE, CRLF_MSG + b"%d\r\n" % i) for i in range(count)]
        kept = set(names[1::2])  # DELE 1, 3, 5... (1-based) removes names[0::2]
        await in_thread(quit_and_vanish)
        stat = await in_thread(next_session)
        assert stat[0] == count // 2  # the next session lists no deleted message
        assert {f.partition(":")[0] for f in lab.files(ALICE)} == kept


async def test_shutdown_lets_a_quit_being_applied_finish(
        lab: POP3Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shutdown that arrives while QUIT's deletions run does not cut them short: the
    client gets its +OK once they are done, not a "shutting down" -ERR that leaves it
    unsure. The deletions are held at their directory fsync to make the overlap certain."""
    for _ in range(3):
        lab.deliver(ALICE, CRLF_MSG)
    syncing, go_on = threading.Event(), threading.Event()
    real_fsync_dir = pop3_mailbox.fsync_dir

    def slow_fsync_dir(path: str) -> None:
        syncing.set()
        assert go_on.wait(10)
        real_fsync_dir(path)

    monkeypatch.setattr(pop3_mailbox, "fsync_dir", slow_fsync_dir)

    def session() -> bytes:
        c = lab.tls_login()
        c.dele(1)
        c.dele(3)
        return c.quit()

    quitting = asyncio.ensure_future(in_thread(session))
    assert await in_thread(syncing.wait, 10)
    closing = asyncio.ensure_future(lab.implicit.close())
    await asyncio.sleep(0.1)  # the shutdown has reached the session
    go_on.set()
    assert (await quitting).startswith(b"+OK")
    await closing
    assert len(lab.files(ALICE)) == 1

async def test_two_sessions_second_is_in_use(lab: POP3Lab) -> None:
    lab.deliver(ALICE, CRLF_MSG)

    def sessions() -> tuple[bytes, tuple[int, int], tuple[int, int]]:
        first = lab.tls_login()
        second = poplib.POP3_SSL("127.0.0.1", lab.tls_port, context=lab.client_ctx, timeout=10)
        second.user(ALICE)
        with pytest.raises(poplib.error_proto) as err:
            second.pass_(PASSWORDS[ALICE])
        stat = first.stat()  # the first session is unaffected
        first.quit()
        second.user(ALICE)
        second.pass_(PASSWORDS[ALICE])  # free again
        stat2 = second.stat()
        second.quit()
        return err.value.args[0], stat, stat2

    err, stat, stat2 = await in_thread(sessions)
    assert err.startswith(b"-ERR [IN-USE]")
    assert stat == stat2 == (1, len(CRLF_MSG))


async def test_leading_dots_and_8bit_round_trip_byte_for_byte(lab: POP3Lab) -> None:
    body = (
        b"From: x@remote.test\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b".\r\n..\r\n.leading dot\r\ncaf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \xff\xfe\x80\r\n"
        b"\r\n.\r\nend\r\n"
    )
    lab.deliver(ALICE, body)
    lab.deliver(ALICE, body.replace(b"\r\n", b"\n"))  # an LF file on disk: CRLF on the wire

    def fetch() -> tuple[list[bytes], list[int]]:
        c = lab.tls_login()
        got = [b"\r\n".join(c.retr(i)[1]) + b"\r\n" for i in (1, 2)]
        sizes = [int(x.split()[1]) for x in c.list()[1]]
        c.quit()
        return got, sizes

    got, sizes = await in_thread(fetch)
    assert got == [body, body]
    assert sizes == [len(body), len(body)]


async def test_a_bare_cr_on_disk_reaches_the_client_as_a_line_end(lab: POP3Lab) -> None:
    """RETR follows SMTP DATA's rule (protocol/dotstuff.py): a bare CR in a file that another
    program wrote ends a line, and LIST (counted: no W= in the name) says what RETR sends."""
    lab.deliver(ALICE, b"Subject: cr\r\n\r\nold\rmac\r.lines\r\nend")

    def fetch() -> tuple[list[bytes], int]:
        c = lab.tls_login()
        lines = c.retr(1)[1]
        size = int(c.list()[1][0].split()[1])
        c.quit()
        return lines, size

    lines, size = await in_thread(fetch)
    assert lines == [b"Subject: cr", b"", b"old", b"mac", b".lines", b"end"]
    assert size == sum(len(line) + 2 for line in lines)


async def test_uidl_stable_across_sessions_and_new_mail_waits(lab: POP3Lab) -> None:
    lab.deliver(ALICE, CRLF_MSG)
    lab.deliver(ALICE, CRLF_MSG)

    def uidls(deliver_during: bool) -> list[bytes]:
        c = lab.tls_login()
        if deliver_during:
            lab.deliver(ALICE, CRLF_MSG)
        c.retr(1)
        listing = c.uidl()[1]
        c.quit()
        return listing

    first = await in_thread(uidls, True)
    second = await in_thread(uidls, False)
    assert len(first) == 2
    assert len(second) == 3 and second[:2] == first
    assert any(f.endswith(":2,S") for f in lab.files(ALICE))


# ------------------------------------------------------------------ limits

async def test_line_limit_and_bad_commands(lab_factory: Callable[..., Any]) -> None:
    lab = await lab_factory(LimitsConfig(max_errors=3))

    def session() -> list[bytes]:
        sock = socket.create_connection(("127.0.0.1", lab.port), timeout=10)
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b"NOOP " + b"x" * 300 + b"\r\nCAPA\r\n")
        out = [f.readline()]
        while (line := f.readline()) != b".\r\n":
            out.append(line)
        sock.sendall(b"BOGUS\r\nBOGUS\r\nBOGUS\r\nCAPA\r\n")
        out += f.readlines()  # until the server closes
        sock.close()
        return out

    out = await in_thread(session)
    assert out[0] == b"-ERR Command line too long\r\n"
    assert out[1].startswith(b"+OK")  # the session went on after the long line
    assert out[-1] == b"-ERR Too many errors, closing connection\r\n"


async def test_idle_timeout_closes(lab_factory: Callable[..., Any]) -> None:
    lab = await lab_factory(LimitsConfig(pop3_idle_timeout=0.3))
    reader, writer = await asyncio.open_connection("127.0.0.1", lab.port)
    assert (await reader.readline()).startswith(b"+OK")
    line = await asyncio.wait_for(reader.readline(), 5)
    assert line == b"-ERR Idle timeout, closing connection\r\n"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_connections_per_ip(lab_factory: Callable[..., Any]) -> None:
    lab = await lab_factory(LimitsConfig(max_connections_per_ip=2,
                                         connection_limit_exceptions=[]))  # count loopback
    conns = [await asyncio.open_connection("127.0.0.1", lab.port) for _ in range(3)]
    replies = [await asyncio.wait_for(r.readline(), 5) for r, _ in conns]
    assert replies[0].startswith(b"+OK") and replies[1].startswith(b"+OK")
    assert replies[2].startswith(b"-ERR [SYS/TEMP]")
    assert await asyncio.wait_for(conns[2][0].read(), 5) == b""
    for _, w in conns:
        w.close()
    await asyncio.sleep(0.1)
    r, w = await asyncio.open_connection("127.0.0.1", lab.port)
    assert (await r.readline()).startswith(b"+OK")  # slots are given back
    w.close()


async def test_large_message_streams_without_buffering(lab: POP3Lab) -> None:
    md = maildir_for(lab.data_dir / "mail", ALICE)
    (md / "new").mkdir(parents=True)
    big = md / "new" / "1700000000.M0P0Q0.big"
    line = b"." + b"y" * 1021 + b"\r\n"
    with open(big, "wb") as f:
        for _ in range(50 * 1024):  # 50 MB
            f.write(line)
    size = big.stat().st_size

    def fetch() -> int:
        sock = socket.create_connection(("127.0.0.1", lab.tls_port), timeout=30)
        tls = lab.client_ctx.wrap_socket(sock, server_hostname="localhost")
        tls.sendall(f"USER {ALICE}\r\nPASS {PASSWORDS[ALICE]}\r\n".encode())
        f = tls.makefile("rb")
        f.readline(), f.readline(), f.readline()
        tls.sendall(b"RETR 1\r\n")
        assert f.readline() == f"+OK {size} octets\r\n".encode()
        total = 0
        tail = b""
        while not tail.endswith(b"\r\n.\r\n"):
            chunk = f.read1(1 << 16)
            assert chunk
            total += len(chunk)
            tail = (tail + chunk)[-5:]
        tls.sendall(b"QUIT\r\n")
        f.readline()
        tls.close()
        return total

    tracemalloc.start()
    try:
        total = await in_thread(fetch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == size + 50 * 1024 + 3  # one stuffed dot per line and the terminator
    assert peak < 10 * 1024 * 1024


# ------------------------------------------------------------------ a real client

FETCHMAIL = shutil.which("fetchmail")


@pytest.mark.skipif(FETCHMAIL is None, reason="fetchmail not installed (run-tests installs it)")
@pytest.mark.parametrize("mode", ["stls", "implicit"])
async def test_fetchmail_downloads_and_deletes(lab: POP3Lab, tmp_path: Path, mode: str) -> None:
    bodies = [b"Subject: f%d\r\n\r\n.dot %d\r\ncaf\xc3\xa9\r\n" % (i, i) for i in range(3)]
    for b in bodies:
        lab.deliver(BOB, b)
    out = tmp_path / f"fetched-{mode}"
    out.mkdir()
    port = lab.port if mode == "stls" else lab.tls_port
    tls = "ssl" if mode == "implicit" else "sslproto tls1.2+"
    rc = tmp_path / f"fetchmailrc-{mode}"
    rc.write_text(
        f'poll localhost via 127.0.0.1 port {port} protocol POP3 uidl\n'
        f'  user "{BOB}" password "{PASSWORDS[BOB]}" is "tester" here\n'
        f'  {tls} sslcertck sslcertfile "{lab.ca_file}" sslcommonname "localhost"\n'
        f'  mda "/bin/sh -c \'cat > {out}/$$.eml\'"\n'
    )
    rc.chmod(0o600)
    env = {**os.environ, "HOME": str(tmp_path), "FETCHMAILHOME": str(tmp_path)}
    proc = await asyncio.create_subprocess_exec(
        FETCHMAIL, "-f", str(rc), "--nodetach", "--nosyslog", "-v",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
        stdin=subprocess.DEVNULL,
    )
    log, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = log.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "PASS" in text and "alice-pw" not in text
    fetched = sorted(p.read_bytes() for p in out.iterdir())
    assert len(fetched) == 3
    for b in bodies:
        assert any(b.replace(b"\r\n", b"\n") in f.replace(b"\r\n", b"\n") for f in fetched)
    assert lab.files(BOB) == []  # fetchmail deletes what it fetched, at QUIT



async def test_command_sent_right_after_the_stls_handshake_is_answered(lab: POP3Lab) -> None:
    """Bytes that arrive through TLS before the server has noted the handshake count."""
    for _ in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", lab.port)
        assert (await reader.readline()).startswith(b"+OK")
        writer.write(b"STLS\r\n")
        assert (await reader.readline()).startswith(b"+OK")
        await writer.start_tls(lab.client_ctx, server_hostname="localhost")
        writer.write(b"NOOP\r\n")  # at once, no pause after the handshake
        reply = await asyncio.wait_for(reader.readline(), 5)
        assert reply.startswith((b"+OK", b"-ERR"))  # answered, not silently dropped
        writer.close()


async def test_read_ahead_never_answers_the_wrong_command(lab: POP3Lab) -> None:
    """The server reads message n+1 while the client reads n; TOP, out-of-order RETR and
    DELE must still get exactly what they ask for."""
    bodies = [b"Subject: m%d\r\n\r\nl1\r\nl2\r\n" % i for i in range(1, 5)]
    for b in bodies:
        lab.deliver(ALICE, b)
        time.sleep(0.001)  # distinct delivery times keep the order

    def session() -> list[list[bytes]]:
        c = lab.stls_login()
        got = [c.retr(1)[1], c.top(2, 0)[1], c.retr(2)[1], c.retr(4)[1], c.retr(3)[1]]
        c.dele(1)
        got.append(c.retr(2)[1])
        with pytest.raises(poplib.error_proto):
            c.retr(1)
        c.quit()
        return got

    got = await in_thread(session)
    lines = [b.rstrip(b"\r\n").split(b"\r\n") for b in bodies]
    assert got == [lines[0], lines[1][:2], lines[1], lines[3], lines[2], lines[1]]

    def files_once_filed() -> list[str]:
        # +OK to QUIT waits for the deletions only; filing in cur/ with the S flags ends in
        # a thread, and the next login waits for it: list the files from inside that login.
        c = lab.stls_login()
        try:
            assert c.stat()[0] == 3
            return lab.files(ALICE)
        finally:
            c.quit()

    files = await in_thread(files_once_filed)
    assert len(files) == 3 and all(f.endswith(":2,S") for f in files)


async def test_pipelined_retrs_are_answered_in_one_write(
        lab_factory: Callable[..., Any]) -> None:
    """Issue 29: each inline RETR answer went out in its own send, so a client pipelining
    RETR 1..n paid a system call per message; now what the client pipelined is answered
    in one write, in order (an error and a DELE's reply included), and a lone RETR is
    still sent at once."""
    lab = await lab_factory(allow_plaintext=True)
    bodies = [b"Subject: m%d\n\n.dot\nline\n" % i for i in range(1, 5)]
    for b in bodies:
        lab.deliver(ALICE, b)
        time.sleep(0.001)  # distinct delivery times keep the order
    sock = await in_thread(socket.create_connection, ("127.0.0.1", lab.port), 10)
    reader = sock.makefile("rb")

    def ask(data: bytes, lines: int) -> list[bytes]:
        sock.sendall(data)
        return [reader.readline() for _ in range(lines)]

    try:
        await in_thread(reader.readline)  # greeting
        assert (await in_thread(ask, f"USER {ALICE}\r\n".encode(), 1))[0].startswith(b"+OK")
        pw = f"PASS {PASSWORDS[ALICE]}\r\n".encode()
        assert (await in_thread(ask, pw, 1))[0].startswith(b"+OK")
        (session,) = lab.plain.sessions
        writes = count_writes(session)
        # RETR: +OK, Subject, blank, ..dot, line, "." (6 lines); TOP 4 0: +OK, Subject,
        # blank, "."; RETR 9 and the RETR of a deleted message: -ERR
        got = await in_thread(ask, b"RETR 1\r\nRETR 2\r\nRETR 9\r\nDELE 3\r\nRETR 3\r\n"
                              b"TOP 4 0\r\nNOOP\r\n", 6 + 6 + 1 + 1 + 1 + 4 + 1)
        assert len(writes) == 1
        assert got[1:6] == [b"Subject: m1\r\n", b"\r\n", b"..dot\r\n", b"line\r\n", b".\r\n"]
        assert got[7] == b"Subject: m2\r\n"
        assert [g[:4] for g in got[12:16]] == [b"-ERR", b"+OK ", b"-ERR", b"+OK "]
        assert got[16:19] == [b"Subject: m4\r\n", b"\r\n", b".\r\n"]
        assert got[19] == b"+OK \r\n"
        writes.clear()
        got = await in_thread(ask, b"RETR 4\r\n", 6)
        assert got[1] == b"Subject: m4\r\n" and len(writes) == 1
        # What waits is bounded: 2,000 pipelined answers (~90 KB) go out in pieces of at
        # most PIPELINE_MAX and one more answer
        writes.clear()
        got = await in_thread(ask, b"RETR 4\r\n" * 2000, 6 * 2000)
        assert got[-5:] == [b"Subject: m4\r\n", b"\r\n", b"..dot\r\n", b"line\r\n", b".\r\n"]
        assert len(writes) >= 2 and max(writes) <= PIPELINE_MAX + 100
        await in_thread(ask, b"QUIT\r\n", 1)
    finally:
        reader.close()
        sock.close()


def _log_in(sock: socket.socket, reader: Any) -> None:
    """Read the greeting and log in as alice with USER and PASS sent together."""
    reader.readline()
    sock.sendall(f"USER {ALICE}\r\nPASS {PASSWORDS[ALICE]}\r\n".encode())
    assert reader.readline().startswith(b"+OK")
    assert reader.readline().startswith(b"+OK")


async def test_pipelined_commands_from_a_client_that_does_not_read_hold_little_memory(
        lab_factory: Callable[..., Any]) -> None:
    """One read of pipelined commands used to be answered whole before anything was
    written: 6,000 LISTs of a 200-message mailbox (36 KB sent) made the session build and
    buffer ~12 MB, and 64 KB of them ~110 MB. Now the session stops answering once the
    client stops reading (server/session.py ``pump``), and every answer still comes, in
    order, when it reads."""
    lab = await lab_factory(allow_plaintext=True)
    for i in range(200):
        lab.deliver(ALICE, b"Subject: m%d\n\nbody\n" % i)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that reads slowly
    await in_thread(sock.connect, ("127.0.0.1", lab.port))
    reader = sock.makefile("rb")
    try:
        await in_thread(_log_in, sock, reader)
        (session,) = lab.plain.sessions
        sock.sendall(b"LIST\r\n" * 6000)
        await asyncio.sleep(1.0)  # the server answers what it can; the client reads nothing
        held = session.transport.get_write_buffer_size() + session.engine.output_size
        assert held < 1024 * 1024, held

        def read_all() -> bytes:
            got = bytearray()
            while got.count(b"\r\n.\r\n") < 6000:
                chunk = reader.read1(1 << 20)
                assert chunk, "connection closed early"
                got += chunk
            return bytes(got)

        answers = (await in_thread(read_all)).split(b"\r\n.\r\n")
        assert len(answers) == 6001 and answers[-1] == b""
        assert all(a.startswith(b"+OK 200 messages") for a in answers[:-1])
        sock.sendall(b"QUIT\r\n")
        assert (await in_thread(reader.readline)).startswith(b"+OK")
    finally:
        reader.close()
        sock.close()


async def test_a_retr_pipelined_after_errors_past_the_soft_limit_does_not_free_them(
        lab_factory: Callable[..., Any]) -> None:
    """Negative replies past the soft error limit are held (protocol/errors.py); a RETR
    pipelined behind them was answered inline with a direct write that sent the held
    replies at once, so a prober could skip the slowdown by ending each batch of guesses
    with a RETR. Now the answer waits with them."""
    lab = await lab_factory(LimitsConfig(max_errors=10, soft_errors=1, error_delay=0.6,
                                         max_error_delay=1.0), allow_plaintext=True)
    lab.deliver(ALICE, b"Subject: m\n\nbody\n")
    sock = await in_thread(socket.create_connection, ("127.0.0.1", lab.port), 10)
    reader = sock.makefile("rb")
    try:
        await in_thread(_log_in, sock, reader)
        start = time.monotonic()
        sock.sendall(b"BOGUS\r\nBOGUS\r\nRETR 1\r\n")  # the second error is held 0.6 s
        first = await in_thread(reader.readline)
        waited = time.monotonic() - start
        assert first.startswith(b"-ERR")
        assert waited >= 0.5, f"the held replies came after {waited:.3f} s"
        rest = [await in_thread(reader.readline) for _ in range(5)]
        assert rest[0].startswith(b"-ERR") and rest[1].startswith(b"+OK")
        assert rest[2:] == [b"Subject: m\r\n", b"\r\n", b"body\r\n"]
    finally:
        reader.close()
        sock.close()


async def test_non_ascii_auth_before_login_gets_an_err_over_pop3s(
    lab: POP3Lab, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 15 item 2: ``AUTH PLAIN é`` over POP3S once raised out of the engine, logged a
    traceback and dropped the connection; it must get -ERR and the session go on."""
    lab.deliver(ALICE, CRLF_MSG)

    def session() -> tuple[bytes, tuple[int, int]]:
        c = poplib.POP3_SSL("127.0.0.1", lab.tls_port, context=lab.client_ctx, timeout=10)
        with pytest.raises(poplib.error_proto) as refused:
            c._shortcmd("AUTH PLAIN \u00e9")  # poplib sends it as UTF-8
        c.user(ALICE)
        c.pass_(PASSWORDS[ALICE])
        stat = c.stat()
        c.quit()
        return refused.value.args[0], stat

    with caplog.at_level("WARNING"):
        reply, stat = await in_thread(session)
    assert reply.startswith(b"-ERR")
    assert stat == (1, len(CRLF_MSG))  # the same connection went on to log in
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
