"""Several mailfort nodes, one mail system: a shared PostgreSQL directory (a real server,
tests/pgserver.py) and one Maildir root (``[server] mail_dir``), nodes on 127.0.0.2 and
127.0.0.3, real clients (the mailfort CLI, smtplib, poplib over TLS)."""

from __future__ import annotations

import asyncio
import json
import os
import poplib
import smtplib
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailfort import config as config_mod
from mailfort.config import Config
from mailfort.server.app import Node
from mailfort.store.maildir import maildir_for
from tests.conftest import HOSTNAME, refusing_dns_port
from tests.server.test_mx import read_reply

ALICE = "alice@example.test"
PASSWORD = "alice-password-1"
NODE_IPS = {"a": "127.0.0.2", "b": "127.0.0.3"}


def _toml(value: Any) -> str:
    return json.dumps(value)  # strings and lists of strings are the same in TOML


def write_config(root: Path, name: str, directory: dict[str, Any], mail_dir: Path,
                 file: str = "", extra: str = "") -> Path:
    """One node's configuration file (``root/<file or name>.toml``): its own data_dir
    (``root/<file or name>``) and addresses, the shared rest."""
    ip = NODE_IPS[name]
    file = file or name
    lines = ["[server]", f"hostname = {_toml(f'{name}.{HOSTNAME}')}",
             f"data_dir = {_toml(str(root / file))}", f"mail_dir = {_toml(str(mail_dir))}",
             "[listen]"]
    lines += [f"{svc} = {_toml([f'{ip}:0'])}"
              for svc in ("mx", "submission", "submissions", "pop3", "pop3s", "imap", "imaps",
                          "managesieve")]
    lines += ["[dns]", 'nameservers = ["127.0.0.1"]', f"port = {refusing_dns_port()}",
              "[directory]"]
    lines += [f"{k} = {_toml(v)}" for k, v in directory.items()]
    path = root / f"{file}.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailfort", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"})


def ok(config: Path, *args: str) -> str:
    r = cli(config, *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture
def node_tls(tls_ca: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server certificate for both node addresses, and a client context trusting it."""
    cert = tls_ca.issue_cert(HOSTNAME, *NODE_IPS.values())
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(server)
    client = ssl.create_default_context()
    tls_ca.configure_trust(client)
    return server, client


@pytest.fixture
def configs(tmp_path: Path, pg_directory: dict[str, Any]) -> dict[str, Path]:
    shared = tmp_path / "shared-mail"
    # Greylisting on, with no delay: a first attempt is deferred, any retry passes.
    grey = "[greylist]\nenabled = true\ndelay = 0\n"
    return {n: write_config(tmp_path, n, pg_directory, shared, extra=grey) for n in NODE_IPS}


@pytest.fixture
async def nodes(configs: dict[str, Path], node_tls: tuple[ssl.SSLContext, ssl.SSLContext]
                ) -> AsyncIterator[dict[str, Node]]:
    """Node A and node B started on the migrated shared directory, with example.test."""
    assert "migrated to version" in ok(configs["a"], "db", "migrate")
    ok(configs["b"], "domain", "add", "example.test")
    async with Node(config_mod.load(configs["a"]), ssl_context=node_tls[0]) as a, \
            Node(config_mod.load(configs["b"]), ssl_context=node_tls[0]) as b:
        yield {"a": a, "b": b}


def pop3_retrieve_all(ip: str, port: int, ctx: ssl.SSLContext, user: str,
                      password: str) -> list[bytes]:
    c = poplib.POP3_SSL(ip, port, context=ctx, timeout=10)
    try:
        c.user(user)
        c.pass_(password)
        count, _ = c.stat()
        return [b"\r\n".join(c.retr(i + 1)[1]) for i in range(count)]
    finally:
        c.quit()


async def test_user_added_through_node_a_reads_on_node_b_what_a_received(
        nodes: dict[str, Node], configs: dict[str, Path], tmp_path: Path,
        node_tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    a, b = nodes["a"], nodes["b"]
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    assert "user alice@example.test added" in ok(
        configs["a"], "user", "add", ALICE, "--password-file", str(tmp_path / "pw"))
    assert ok(configs["b"], "user", "list").split() == [ALICE]  # one directory
    assert "already at version" in ok(configs["b"], "db", "migrate")

    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "x@far.test", ALICE, "via node a"
    msg.set_content("received by a, read on b\n")

    def send() -> None:
        with smtplib.SMTP(NODE_IPS["a"], a.port("mx"), timeout=10) as s:
            s.send_message(msg)

    with pytest.raises(smtplib.SMTPRecipientsRefused) as grey:  # the first attempt...
        await asyncio.to_thread(send)
    assert grey.value.recipients[ALICE][0] == 451
    await asyncio.to_thread(send)  # ...and its retry, through the same node
    got = await asyncio.to_thread(pop3_retrieve_all, NODE_IPS["b"], b.port("pop3s"),
                                  node_tls[1], ALICE, PASSWORD)
    assert len(got) == 1 and b"received by a, read on b" in got[0]
    assert b"by a.mx.example.test" in got[0]  # A's Received: line, read through B
    # The message lives in the shared mail_dir, in neither node's own data directory.
    assert a.cfg.mail_path == b.cfg.mail_path == tmp_path / "shared-mail"
    assert list((maildir_for(tmp_path / "shared-mail", ALICE) / "cur").iterdir())
    assert not (tmp_path / "a" / "mail").exists() and not (tmp_path / "b" / "mail").exists()

    with pytest.raises(poplib.error_proto, match="ERR"):
        await asyncio.to_thread(pop3_retrieve_all, NODE_IPS["a"], a.port("pop3s"),
                                node_tls[1], ALICE, "wrong-password")


async def test_greylisting_is_shared_so_a_retry_through_the_other_node_passes(
        nodes: dict[str, Node], configs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    ok(configs["a"], "user", "add", ALICE, "--password-file", str(tmp_path / "pw"))

    def rcpt(node: str) -> int:
        with smtplib.SMTP(NODE_IPS[node], nodes[node].port("mx"), timeout=10) as s:
            s.ehlo("client.test")
            s.mail("x@far.test")
            return s.rcpt(ALICE)[0]

    assert await asyncio.to_thread(rcpt, "a") == 451  # first attempt, on A
    assert await asyncio.to_thread(rcpt, "b") == 250  # the retry lands on B: known there


async def test_unknown_recipient_refused_at_rcpt_from_postgresql(
        nodes: dict[str, Node]) -> None:
    def rcpt() -> tuple[int, bytes]:
        with smtplib.SMTP(NODE_IPS["b"], nodes["b"].port("mx"), timeout=10) as s:
            s.ehlo("client.test")
            s.mail("x@far.test")
            return s.rcpt("nobody@example.test")

    code, text = await asyncio.to_thread(rcpt)
    assert code == 550 and b"5.1.1" in text


async def test_a_slow_directory_does_not_stall_other_sessions(
        nodes: dict[str, Node], postgres_server: Any, pg_directory: dict[str, Any]) -> None:
    """While a RCPT lookup waits on a locked table, the node still greets and answers
    other clients: the lookup runs in a thread, not on the event loop."""
    import psycopg

    from tests.pgserver import PASSWORD as DB_PASSWORD

    node = nodes["a"]
    port = node.port("mx")
    locker = await asyncio.to_thread(psycopg.connect, pg_directory["url"],
                                     password=DB_PASSWORD)
    try:
        await asyncio.to_thread(locker.execute, "LOCK TABLE domains IN ACCESS EXCLUSIVE MODE")
        r1, w1 = await asyncio.open_connection(NODE_IPS["a"], port)
        await read_reply(r1)
        w1.write(b"EHLO one.test\r\nMAIL FROM:<x@far.test>\r\nRCPT TO:<alice@example.test>\r\n")
        await w1.drain()
        await read_reply(r1)
        await read_reply(r1)  # MAIL's 250; RCPT now waits on the lock
        r2, w2 = await asyncio.open_connection(NODE_IPS["a"], port)
        greeting = await asyncio.wait_for(read_reply(r2), 2.0)
        assert greeting.startswith("220")
        w2.write(b"NOOP\r\n")
        await w2.drain()
        assert (await asyncio.wait_for(read_reply(r2), 2.0)).startswith("250")
        w2.close()
        await asyncio.to_thread(locker.rollback)  # the lock goes; RCPT gets its answer
        rcpt = await asyncio.wait_for(read_reply(r1), 5.0)
        assert rcpt.startswith("550")  # alice was never added in this test
        w1.close()
    finally:
        await asyncio.to_thread(locker.close)


async def test_submission_sender_rights_from_postgresql(
        nodes: dict[str, Node], configs: dict[str, Path], tmp_path: Path,
        node_tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """MAIL FROM and From: are checked against the shared directory (looked up off the
    event loop once per transaction): own address and alias yes, anyone else's no."""
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    ok(configs["a"], "user", "add", ALICE, "--password-file", str(tmp_path / "pw"))
    ok(configs["a"], "alias", "add", "sales@example.test", ALICE)
    b = nodes["b"]

    def submit(mail_from: str, header_from: str) -> dict[str, Any]:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = header_from, ALICE, "s"
        msg.set_content("x\n")
        with smtplib.SMTP(NODE_IPS["b"], b.port("submission"), timeout=10) as s:
            s.starttls(context=node_tls[1])
            s.login(ALICE, PASSWORD)
            return s.send_message(msg, from_addr=mail_from)

    assert await asyncio.to_thread(submit, ALICE, "sales@example.test") == {}
    with pytest.raises(smtplib.SMTPSenderRefused) as env:
        await asyncio.to_thread(submit, "ceo@example.test", ALICE)
    assert env.value.smtp_code == 553
    with pytest.raises(smtplib.SMTPDataError) as hdr:
        await asyncio.to_thread(submit, ALICE, "ceo@example.test")
    assert hdr.value.smtp_code == 553
    assert len(list((maildir_for(b.cfg.mail_path, ALICE) / "new").iterdir())) == 1


def test_cli_db_commands_and_secrets(tmp_path: Path, configs: dict[str, Path],
                                     pg_directory: dict[str, Any]) -> None:
    """Clear one-line errors, and the password in none of them; import via the CLI."""
    embedded = write_config(tmp_path, "a", {"backend": "sqlite"}, tmp_path / "m", "embedded")
    r = cli(embedded, "db", "migrate")
    assert r.returncode == 1 and 'backend = "postgresql"' in r.stderr
    r = cli(configs["a"], "user", "list")
    assert r.returncode == 1 and "mailfort db migrate" in r.stderr  # not migrated yet
    ok(configs["a"], "db", "migrate")

    src = tmp_path / "old"
    old = write_config(tmp_path, "b", {"backend": "sqlite"}, tmp_path / "m", "old")
    ok(old, "domain", "add", "example.test")
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    ok(old, "user", "add", ALICE, "--password-file", str(tmp_path / "pw"))
    sqlite_file = str(src / "directory.sqlite3")
    assert "imported 1 domain(s), 1 user(s)" in ok(configs["a"], "db", "import",
                                                   "--from-sqlite", sqlite_file)
    assert "0 user(s)" in ok(configs["a"], "db", "import", "--from-sqlite", sqlite_file)
    assert ok(configs["a"], "user", "list").split() == [ALICE]

    secret = Path(pg_directory["password_file"])
    real = secret.read_text().strip()
    secret.write_text("not-the-password\n")
    r = cli(configs["a"], "user", "list")
    assert r.returncode == 1 and "password authentication failed" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert real not in r.stderr + r.stdout
    assert "not-the-password" not in r.stderr + r.stdout


def test_node_config_is_valid(configs: dict[str, Path]) -> None:
    cfg: Config = config_mod.load(configs["b"])
    assert cfg.directory.backend == "postgresql"
    assert cfg.listen.pop3s == [f"{NODE_IPS['b']}:0"]


async def test_directory_down_is_a_temporary_failure_and_the_node_keeps_serving(
        nodes: dict[str, Node], postgres_server: Any, caplog: pytest.LogCaptureFixture
        ) -> None:
    """PostgreSQL refusing the nodes: RCPT gets a 4xx (the sender retries later; nothing
    is bounced or lost), the node stays up and answers the next client."""
    from tests.pgserver import PASSWORD as DB_PASSWORD
    from tests.pgserver import ROLE

    node = nodes["b"]

    def rcpt() -> tuple[int, int]:
        with smtplib.SMTP(NODE_IPS["b"], node.port("mx"), timeout=30) as s:
            s.ehlo("client.test")
            s.mail("x@far.test")
            return s.rcpt(ALICE)[0], s.noop()[0]

    postgres_server.admin_sql(f"ALTER ROLE {ROLE} NOLOGIN")
    try:
        postgres_server.admin_sql(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{ROLE}'")
        assert await asyncio.to_thread(rcpt) == (451, 250)  # the session goes on too
        assert await asyncio.to_thread(rcpt) == (451, 250)  # no reconnection possible
    finally:
        postgres_server.admin_sql(f"ALTER ROLE {ROLE} LOGIN")
    assert DB_PASSWORD not in caplog.text
