"""Issue 27 end to end: sending through a provider (smarthost) with TLS and AUTH.

Two real mailfort Nodes on loopback: the *provider*, whose submission ports (587 with
STARTTLS, 465 with implicit TLS) carry a trustme certificate for smtp.provider.test and
take logins; and the *sender*, whose ``[routes."*"]`` points at the provider with
``auth_user`` / ``auth_password_file`` and ``cafile`` = the trustme CA. alice submits to
the sender; the message must arrive in the provider's local mailbox for dest@provider.test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import ssl
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailfort.directory.sqlite import SQLiteDirectory
from mailfort.passwords import hash_password
from mailfort.queue.store import Queue
from mailfort.server.app import Node
from tests.conftest import make_config, seed_directory
from tests.dnsserver import DNSServer
from tests.server.production import cli, serving, world_dir, write_config
from tests.server.test_outbound import ALICE, maildir_files, new_message, submit, wait_for

PROVIDER = "smtp.provider.test"
DEST = "dest@provider.test"
RELAY_PW = "Relay-Password-4711"  # alice's account at the provider
QUEUE = {"initial_retry": 0.2, "max_retry": 0.4, "max_lifetime": 300.0,
         "delay_warning_after": 3600.0, "connect_timeout": 2.0}


@dataclass
class Pair:
    sender: Node
    provider: Node
    logins: list[str] = field(default_factory=list)  # user names the provider was asked


def _provider_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls_ca.issue_cert(PROVIDER).configure_cert(ctx)
    return ctx


PairFactory = Callable[..., Awaitable[Pair]]


@pytest.fixture
async def pair(tmp_path: Path, tls_ca: trustme.CA, server_ssl_context: ssl.SSLContext,
               dns_server: DNSServer) -> AsyncIterator[PairFactory]:
    """``await pair(tls="starttls"|"implicit", password=..., **route_overrides)``."""
    ca = tmp_path / "provider-ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca))
    dns_server.add_a(PROVIDER, "127.0.0.1")
    async with contextlib.AsyncExitStack() as stack:

        async def factory(tls: str = "starttls", password: str = RELAY_PW,
                          queue: dict[str, Any] | None = None, **route: Any) -> Pair:
            pcfg = make_config(tmp_path / "provider", server={"hostname": PROVIDER})
            pcfg.data_path.mkdir(parents=True)
            d = SQLiteDirectory(pcfg.data_path / "directory.sqlite3")
            d.add_domain("provider.test")
            d.add_user(DEST, hash_password("dest-pw"))
            d.add_domain("example.test")  # alice's account at the provider
            d.add_user(ALICE, hash_password(RELAY_PW))
            provider = await stack.enter_async_context(
                Node(pcfg, ssl_context=_provider_context(tls_ca)))
            pw = tmp_path / "relay.pw"
            pw.write_text(password + "\n")
            pw.chmod(0o600)
            port = provider.port("submissions" if tls == "implicit" else "submission")
            scfg = make_config(
                tmp_path / "sender", dns=dns_server.config(timeout=1.0),
                queue={**QUEUE, **(queue or {})},
                routes={"*": {"host": PROVIDER, "port": port, "tls": tls,
                              "auth_user": ALICE, "auth_password_file": str(pw),
                              "cafile": str(ca), **route}})
            seed_directory(scfg)
            sender = await stack.enter_async_context(Node(scfg, ssl_context=server_ssl_context))
            out = Pair(sender, provider)
            for name in ("submission", "submissions"):  # what the provider was asked
                service = provider.services[name]
                real = service.authenticate
                assert real is not None

                async def counted(user: str, pw: str, ip: str, real: Any = real) -> Any:
                    out.logins.append(user)
                    return await real(user, pw, ip)

                service.authenticate = counted
            return out

        yield factory


async def _submit(p: Pair, ctx: ssl.SSLContext) -> str:
    msg, token = new_message([DEST])
    refused = await asyncio.to_thread(submit, p.sender.port("submission"), ctx, msg, [DEST])
    assert refused == {}
    return token


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_mail_through_the_provider_arrives(
    pair: PairFactory, client_ssl_context: ssl.SSLContext, tls: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    p = await pair(tls=tls)
    token = await _submit(p, client_ssl_context)
    await wait_for(lambda: len(maildir_files(p.provider, DEST)) == 1, "at the provider")
    await wait_for(lambda: p.sender.queue.list() == [], "sender's queue empty")
    (got,) = maildir_files(p.provider, DEST)
    assert f"Subject: {token}".encode() in got
    # The provider took it as a login of alice over TLS (its own Received: ESMTPSA).
    assert p.logins == [ALICE]
    assert b"with ESMTPSA" in got.split(b"\r\n\r\n", 1)[0]
    assert RELAY_PW not in caplog.text


async def test_wrong_password_defers_then_bounces_with_the_providers_reply(
    pair: PairFactory, client_ssl_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "Not-The-Password-0815"
    p = await pair(password=wrong, queue={"max_lifetime": 1.5, "initial_retry": 0.6})
    token = await _submit(p, client_ssl_context)

    def deferred() -> str:
        return "".join(r.last_reply for e in p.sender.queue.list()
                       for r in p.sender.queue.get(e.id).recipients if r.state == "deferred")

    # Deferred, the provider's reply kept with the entry (what `queue show` prints).
    await wait_for(lambda: "535 5.7.8" in deferred(), "the deferral")
    assert "refused AUTH PLAIN as alice@example.test" in deferred()
    assert maildir_files(p.provider, DEST) == []
    # At expiry, alice hears why: the provider's own reply, in her bounce.
    await wait_for(lambda: len(maildir_files(p.sender, ALICE)) == 1, "the bounce", 15)
    (bounce,) = maildir_files(p.sender, ALICE)
    text = bounce.decode("utf-8", "replace")
    assert "Action: failed" in text and f"Subject: {token}" in text
    assert "refused AUTH" in text and "535 5.7.8 Authentication credentials invalid" in text
    assert ALICE in p.logins
    assert "535 5.7.8 Authentication credentials invalid" in caplog.text
    for secret in (wrong, RELAY_PW):
        assert secret not in caplog.text and secret not in text


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_certificate_that_does_not_verify_defers_and_sends_no_auth(
    pair: PairFactory, client_ssl_context: ssl.SSLContext, dns_server: DNSServer, tls: str,
) -> None:
    # Trusted CA, but the provider's certificate names smtp.provider.test, not this host.
    dns_server.add_a("relay.provider.test", "127.0.0.1")
    p = await pair(tls=tls, host="relay.provider.test")
    await _submit(p, client_ssl_context)
    await wait_for(lambda: any(r.attempts >= 1 for e in p.sender.queue.list()
                               for r in p.sender.queue.get(e.id).recipients), "an attempt")
    (entry,) = p.sender.queue.list()
    (r,) = p.sender.queue.get(entry.id).recipients
    assert r.state == "deferred" and r.status == "4.7.5", r.last_reply
    assert "certificate" in r.last_reply.lower()
    assert p.logins == []  # the provider was never asked
    assert maildir_files(p.provider, DEST) == []


def test_config_check_shows_the_route_but_never_the_password(tmp_path: Path) -> None:
    root = tmp_path
    pw = root / "relay.pw"
    pw.write_text(RELAY_PW + "\n")
    pw.chmod(0o640)
    config = write_config(root, 53, routes={"*": {
        "host": PROVIDER, "port": 587, "tls": "starttls", "auth_user": "me@provider.test",
        "auth_password_file": str(pw)}})
    r = cli(config, "config", "check")
    assert r.returncode == 0, r.stderr
    assert 'auth_user = "me@provider.test"' in r.stdout and str(pw) in r.stdout
    assert RELAY_PW not in r.stdout + r.stderr
    bad = write_config(root, 53, routes={"*": {
        "host": PROVIDER, "port": 587, "tls": "none", "auth_user": "me@provider.test",
        "auth_password_file": str(pw)}})
    r = cli(bad, "config", "check")
    assert r.returncode != 0 and "auth_user" in r.stderr, (r.stdout, r.stderr)


# ------------------------------------------------ the password file and the service user


as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: it starts mailfort as "
                             "root with server.user = nobody")


@as_root
@pytest.mark.parametrize("readable_by_service", [True, False])
async def test_password_file_is_read_by_the_service_user_after_the_drop(
    tls_ca: trustme.CA, dns_server: DNSServer, readable_by_service: bool,
) -> None:
    """The decision, checked on a real ``mailfort serve`` started as root that drops to
    nobody: the file is read at login, as the service user. root:nogroup 0640 works; a
    root-only file defers (4.3.5, naming the file and "Permission denied"), because root
    never reads it for the service."""
    root = world_dir()
    try:
        dns_server.add_a(PROVIDER, "127.0.0.1")
        pcfg = make_config(root / "provider", server={"hostname": PROVIDER})
        pcfg.data_path.mkdir(parents=True)
        d = SQLiteDirectory(pcfg.data_path / "directory.sqlite3")
        d.add_domain("provider.test")
        d.add_user(DEST, hash_password("dest-pw"))
        d.add_domain("example.test")
        d.add_user(ALICE, hash_password(RELAY_PW))
        ca = root / "provider-ca.pem"
        tls_ca.cert_pem.write_to_path(str(ca))
        ca.chmod(0o644)
        pw = root / "relay.pw"
        pw.write_text(RELAY_PW + "\n")
        nobody = pwd.getpwnam("nobody")
        os.chown(pw, 0, nobody.pw_gid if readable_by_service else 0)
        pw.chmod(0o640 if readable_by_service else 0o600)
        async with Node(pcfg, ssl_context=_provider_context(tls_ca)) as provider:
            config = write_config(
                root, int(dns_server.port), server={"user": "nobody", "workers": 1},
                queue=QUEUE, routes={"*": {
                    "host": PROVIDER, "port": provider.port("submission"), "tls": "starttls",
                    "auth_user": ALICE, "auth_password_file": str(pw), "cafile": str(ca)}})
            data = root / "data"
            assert cli(config, "domain", "add", "example.test").returncode == 0
            upw = root / "alice.pw"
            upw.write_text("alice-pw\n")
            add = cli(config, "user", "add", ALICE, "--password-file", str(upw))
            assert add.returncode == 0, add.stderr
            port = int(tomllib.loads(config.read_text())["listen"]["submission"][0]
                       .rpartition(":")[2])
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # its self-signed one
            with serving(config, data) as server:
                msg, _token = new_message([DEST])
                await asyncio.to_thread(submit, port, ctx, msg, [DEST], password="alice-pw")
                queue = Queue(data / "queue")

                def settled() -> bool:
                    if readable_by_service:
                        return len(maildir_files(provider, DEST)) == 1
                    return any(r.attempts >= 1 for e in queue.list()
                               for r in queue.get(e.id).recipients)

                try:
                    await wait_for(settled, "delivered or deferred")
                except AssertionError as exc:
                    raise AssertionError(f"{exc}; the server said: {server.stop()[1][-6000:]}")\
                        from None
                if not readable_by_service:
                    (entry,) = queue.list()
                    (r,) = queue.get(entry.id).recipients
                    assert r.status == "4.3.5" and "Permission denied" in r.last_reply, \
                        r.last_reply
                    assert str(pw) in r.last_reply
                status = await asyncio.to_thread(cli, config, "status")
                assert status.returncode == 0, status.stderr
                assert RELAY_PW not in status.stdout + status.stderr
                _out, err = await asyncio.to_thread(server.stop)
            assert RELAY_PW not in err
    finally:
        shutil.rmtree(root, ignore_errors=True)
