"""A running ``mailfort serve`` seen by its operator: the log, the metrics endpoint, the
control socket (``status``, ``queue retry``) and ``tls show``; IPv6 listeners.

One server for the module (a subprocess, JSON log to a file, metrics on a free port); each
test drives real clients (smtplib with STARTTLS and AUTH) against it.
"""

from __future__ import annotations

import asyncio
import json
import os
import poplib
import shutil
import signal
import smtplib
import socket
import ssl
import sys
import time
import urllib.request
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailfort import config as config_mod
from mailfort.queue.store import Queue
from mailfort.server.app import Node
from tests.conftest import refusing_dns_port
from tests.delivery.receiver import Receiver
from tests.server.production import (
    Server,
    cli,
    free_port,
    serving,
    world_dir,
    write_config,
)

PASSWORD = "correct-horse-PW-7x1"
WRONG = "wrong-battery-PW-9q2"
BODY_SECRET = "body-secret-3f9a61"


def _port(config: Path, name: str) -> int:
    cfg = config_mod.load(config)
    return int(getattr(cfg.listen, name)[0].rpartition(":")[2])


def _no_verify() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    root = world_dir()
    metrics_port = free_port()
    config = write_config(root, refusing_dns_port(),
                          log={"format": "json", "file": str(root / "mailfort.log")},
                          metrics={"listen": f"127.0.0.1:{metrics_port}"},
                          server={"workers": 2})  # one endpoint sums both workers
    pw = root / "pw.txt"
    pw.write_text(PASSWORD + "\n")
    for args in (("domain", "add", "example.test"),
                 ("user", "add", "alice@example.test", "--password-file", str(pw))):
        r = cli(config, *args)
        assert r.returncode == 0, r.stderr
    pw.unlink()
    with serving(config, root / "data") as srv:
        yield srv
    shutil.rmtree(root, ignore_errors=True)


def _log(server: Server) -> str:
    return (server.config.parent / "mailfort.log").read_text()


def _scrape(server: Server) -> dict[str, float]:
    listen = config_mod.load(server.config).metrics.listen
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _session(server: Server) -> int:
    """STARTTLS, one failed and one good AUTH, one refused RCPT, one message; its size."""
    msg = EmailMessage()
    msg["From"] = "alice@example.test"
    msg["To"] = "alice@example.test"
    msg["Subject"] = "hello"
    msg.set_content(f"the body holds {BODY_SECRET}\n")
    with smtplib.SMTP("127.0.0.1", _port(server.config, "submission"), timeout=20) as smtp:
        smtp.starttls(context=_no_verify())
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login("alice@example.test", WRONG)
        smtp.login("alice@example.test", PASSWORD)
        smtp.mail("alice@example.test")
        assert smtp.rcpt("nobody-here@example.test")[0] == 550
        smtp.rset()
        smtp.send_message(msg)
    return len(msg.as_bytes())


def _pop3_logins(server: Server) -> None:
    pop = poplib.POP3("127.0.0.1", _port(server.config, "pop3"), timeout=20)
    try:
        pop.stls(context=_no_verify())
        pop.user("alice@example.test")
        with pytest.raises(poplib.error_proto):
            pop.pass_(WRONG)
    finally:
        pop.close()
    pop = poplib.POP3_SSL("127.0.0.1", _port(server.config, "pop3s"), timeout=20,
                          context=_no_verify())
    pop.user("alice@example.test")
    pop.pass_(PASSWORD)
    pop.quit()


def test_log_has_a_line_per_event_and_never_a_password_or_body(server: Server) -> None:
    _session(server)
    _pop3_logins(server)
    text = _log(server)
    for secret in (PASSWORD, WRONG, BODY_SECRET):
        assert secret not in text
    events = [json.loads(line) for line in text.splitlines()]
    kinds = [e.get("event") for e in events]
    assert "connect" in kinds and "auth_failed" in kinds and "auth_ok" in kinds
    services = {e.get("service") for e in events if e.get("event") == "connect"}
    assert {"submission", "pop3", "pop3s"} <= services
    refused = [e for e in events if e.get("event") == "reject" and e.get("stage") == "RCPT"]
    assert refused and refused[-1]["code"] == "550" and refused[-1]["client"] == "127.0.0.1"
    accepted = [e for e in events if e.get("event") == "accept"]
    assert accepted[-1]["tls"].startswith("TLSv1.")
    assert "queued as" in accepted[-1]["reply"] and accepted[-1]["from"] == "alice@example.test"
    assert "tls=TLSv1." in accepted[-1]["message"]


def test_log_file_reopened_after_rotation_and_on_sigusr1_and_sighup(server: Server) -> None:
    log = server.config.parent / "mailfort.log"
    rotated = log.with_suffix(".log.1")
    log.rename(rotated)  # logrotate without copytruncate
    with smtplib.SMTP("127.0.0.1", _port(server.config, "mx"), timeout=20) as smtp:
        smtp.ehlo()
    assert '"event": "connect"' in log.read_text()  # a new file, not the moved one
    for sig in (signal.SIGUSR1, signal.SIGHUP):  # without a handler, either ends a process
        log.rename(rotated)
        os.kill(server.pid, sig)
        deadline = time.monotonic() + 10
        while not log.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert log.exists(), sig
        assert server.proc.poll() is None


def test_metrics_move_with_the_traffic(server: Server) -> None:
    before = _scrape(server)
    size = _session(server)
    after = _scrape(server)

    def moved(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert moved('mailfort_connections_total{service="submission"}') == 1
    assert moved("mailfort_messages_accepted_total") == 1
    assert moved("mailfort_message_bytes_total") >= size
    assert moved('mailfort_auth_total{result="failed"}') >= 1  # smtplib tries 2 mechanisms
    assert moved('mailfort_auth_total{result="ok"}') == 1
    assert moved('mailfort_refusals_total{code="5.1.1",stage="RCPT"}') == 1
    assert moved("mailfort_flush_seconds_count") >= 1
    assert after["mailfort_queue_length"] == 0
    with smtplib.SMTP("127.0.0.1", _port(server.config, "mx"), timeout=20) as smtp:
        smtp.ehlo()
        assert _scrape(server)['mailfort_sessions_open{service="mx"}'] == 1


def test_status_and_tls_show(server: Server) -> None:
    r = cli(server.config, "status")
    assert r.returncode == 0, r.stderr
    assert f"pid {server.pid}" in r.stdout  # the supervisor's, which systemd knows
    assert "2 worker process(es)" in r.stdout
    mx = _port(server.config, "mx")
    assert f"127.0.0.1:{mx}" in r.stdout
    assert "queue: 0 message(s)" in r.stdout and "days left" in r.stdout
    r = cli(server.config, "tls", "show")
    assert r.returncode == 0, r.stderr
    assert "subject:    CN=mx.example.test" in r.stdout
    assert "names:      mx.example.test, localhost" in r.stdout
    assert "not after:" in r.stdout and "(self-signed)" in r.stdout


def test_status_without_a_server_says_so(tmp_path: Path) -> None:
    config = write_config(tmp_path, refusing_dns_port())
    r = cli(config, "status")
    assert r.returncode == 3
    assert "not running" in r.stdout


async def test_queue_retry_wakes_the_running_server_at_once() -> None:
    """A deferred message is retried within seconds of ``mailfort queue retry`` (before:
    "scheduled for immediate retry", then up to a minute until the next full pass)."""
    root = world_dir()
    dest = free_port()  # nothing listens yet: the first attempt is deferred
    config = write_config(root, refusing_dns_port(),
                          relay={"trusted_networks": ["127.0.0.1/32"]},
                          routes={"remote.test": {"host": "127.0.0.1", "port": dest}},
                          queue={"initial_retry": 3600.0},
                          server={"workers": 2})  # the primary worker delivers and answers
    queue = Queue(root / "data" / "queue")
    receiver = Receiver()
    try:
        with serving(config, root / "data"):
            with smtplib.SMTP("127.0.0.1", _port(config, "mx"), timeout=20) as smtp:
                smtp.sendmail("a@sender.test", ["b@remote.test"], b"Subject: x\r\n\r\nhi\r\n")
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                entries = queue.list()
                if entries and entries[0].recipients[0].attempts >= 1:
                    break
                await asyncio.sleep(0.05)
            assert entries and entries[0].recipients[0].state == "deferred"
            receiver._server = await asyncio.start_server(receiver._client, "127.0.0.1", dest)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mailfort", "queue", "retry", "--config", str(config),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")})
            out, err = await proc.communicate()
            assert proc.returncode == 0, err
            assert b"retried now by the running server" in out
            deadline = time.monotonic() + 10
            while not receiver.messages and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert receiver.messages, "the running server did not retry at once"
        r = cli(config, "queue", "retry")  # no server now: says so, promises nothing
        assert r.returncode == 0 and "no mailfort server is running" in r.stdout
    finally:
        await receiver.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_ipv6_listener_beside_ipv4(tmp_path: Path) -> None:
    from tests.conftest import make_config

    cfg = make_config(tmp_path / "data", listen={"mx": ["127.0.0.1:0", "[::1]:0"]})
    async with Node(cfg) as node:
        v4, v6 = node.ports["mx"]
        for host, port in (("127.0.0.1", v4), ("::1", v6)):
            reader, writer = await asyncio.open_connection(host, port)
            assert (await reader.readline()).startswith(b"220 ")
            writer.close()


def test_block_remove_lifts_a_brute_force_block_at_once() -> None:
    root = world_dir()
    config = write_config(root, refusing_dns_port(),
                          auth={"block_after_failures": 2, "failure_delay": 0.0},
                          server={"allow_plaintext_auth_on_loopback": True,
                                  "workers": 2})  # the block and its removal hold node-wide
    pw = root / "pw.txt"
    pw.write_text(PASSWORD + "\n")
    for args in (("domain", "add", "example.test"),
                 ("user", "add", "alice@example.test", "--password-file", str(pw))):
        assert cli(config, *args).returncode == 0

    def login(password: str) -> bool:
        with smtplib.SMTP("127.0.0.1", _port(config, "submission"), timeout=20) as smtp:
            try:
                smtp.login("alice@example.test", password)
            except (smtplib.SMTPAuthenticationError, smtplib.SMTPServerDisconnected,
                    smtplib.SMTPResponseException):
                return False
            return True

    try:
        with serving(config, root / "data"):
            for _ in range(2):
                assert not login(WRONG)
            assert not login(PASSWORD)  # blocked: even the right password is refused
            r = cli(config, "block", "remove", "127.0.0.1")
            assert r.returncode == 0, r.stderr
            assert "client 127.0.0.1: block removed" in r.stdout
            assert login(PASSWORD)
        r = cli(config, "block", "remove", "127.0.0.1")
        assert r.returncode == 3 and "not running" in r.stdout
    finally:
        shutil.rmtree(root, ignore_errors=True)


class _POP3SFrom(poplib.POP3_SSL):
    """POP3S from a chosen loopback address (poplib has no source_address)."""

    source = "127.0.0.5"

    def _create_socket(self, timeout: float) -> Any:
        sock = socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0))
        return self.context.wrap_socket(sock, server_hostname=self.host)


def _pop3s_login(config: Path, password: str) -> bool:
    c = _POP3SFrom("127.0.0.1", _port(config, "pop3s"), context=_no_verify(), timeout=20)
    try:
        c.user("alice@example.test")
        c.pass_(password)
        return True
    except poplib.error_proto:
        return False
    finally:
        c.close()


def _block_world(**tables: dict[str, Any]) -> tuple[Path, Path]:
    root = world_dir()
    config = write_config(root, refusing_dns_port(),
                          auth={"block_after_failures": 3, "failure_delay": 0.0}, **tables)
    pw = root / "pw.txt"
    pw.write_text(PASSWORD + "\n")
    for args in (("domain", "add", "example.test"),
                 ("user", "add", "alice@example.test", "--password-file", str(pw))):
        assert cli(config, *args).returncode == 0
    return root, config


@pytest.mark.parametrize("workers", [1, 2])
def test_block_list_shows_a_pop3s_guesser_and_remove_lets_it_in_again(workers: int) -> None:
    """With two worker processes the guesses land on either; the list is the node's."""
    root, config = _block_world(server={"workers": workers})
    try:
        with serving(config, root / "data"):
            for _ in range(3):  # block_after_failures
                assert not _pop3s_login(config, WRONG)
            assert not _pop3s_login(config, PASSWORD)  # blocked: the right one is refused
            r = cli(config, "block", "list")
            assert r.returncode == 0, r.stderr
            line = next(x for x in r.stdout.splitlines() if "127.0.0.5" in x)
            assert line.startswith("client") and "blocked" in line and "left" in line
            listed = json.loads(cli(config, "block", "list", "--json").stdout)
            client = next(b for b in listed if b["kind"] == "client")
            assert client["key"] == "127.0.0.5" and 0 < client["remaining"] <= 900
            r = cli(config, "block", "remove", "127.0.0.5")
            assert r.returncode == 0 and "client 127.0.0.5: block removed" in r.stdout
            assert _pop3s_login(config, PASSWORD)
        r = cli(config, "block", "list")
        assert r.returncode == 3 and "not running" in r.stdout
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_block_list_without_a_server_says_where_the_blocks_are(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from mailfort.cli import status

    for counters, where in (({}, "live in the running server only"),
                            ({"backend": "redis", "url": "redis://127.0.0.1:1/0"},
                             "the blocks are in Redis")):
        config = write_config(tmp_path, refusing_dns_port(), counters=counters)
        args = argparse.Namespace(config=str(config), json=False)
        assert status.cmd_block_list(args) == 3
        assert where in capsys.readouterr().out


async def test_certificate_files_changed_on_disk_are_served_without_a_signal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another tool renews tls.cert_file / key_file in place: new handshakes get the new
    certificate without SIGHUP, and an open TLS session carries on."""
    import trustme
    from cryptography import x509

    from mailfort.server import operations
    from tests.conftest import HOSTNAME, make_config

    ca = trustme.CA()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"

    def issue() -> None:
        issued = ca.issue_cert(HOSTNAME)
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))

    issue()
    cfg = make_config(tmp_path / "d", tls={"cert_file": str(cert), "key_file": str(key)})
    monkeypatch.setattr(operations, "CERT_WATCH_EVERY", 0.05)
    ops = operations.Operations(cfg)
    node = Node(cfg)
    node.after_bind = ops.after_bind
    await node.start()
    await ops.started(node)

    def handshake() -> tuple[smtplib.SMTP, int]:
        smtp = smtplib.SMTP("127.0.0.1", node.port("mx"), timeout=20)
        smtp.starttls(context=_no_verify())
        der = smtp.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        return smtp, x509.load_der_x509_certificate(der).serial_number

    try:
        old_session, first = await asyncio.to_thread(handshake)
        issue()
        deadline = time.monotonic() + 10
        second = first
        while second == first and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            session, second = await asyncio.to_thread(handshake)
            await asyncio.to_thread(session.quit)
        assert second != first, "the changed files are not served"
        assert (await asyncio.to_thread(old_session.noop))[0] == 250
        await asyncio.to_thread(old_session.quit)
    finally:
        ops.stopping()
        await node.stop()
        await ops.stopped()
