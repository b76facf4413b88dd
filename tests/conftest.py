"""Shared fixtures: test certificates and an in-process mailfort node on free loopback ports."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailfort import config as config_mod
from mailfort.config import Config
from mailfort.server import eventloop
from tests.dnsserver import DNSServer

HOSTNAME = "mx.example.test"


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_ssl_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    cert = tls_ca.issue_cert(HOSTNAME, "localhost", "127.0.0.1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    cert.configure_cert(ctx)
    return ctx


@pytest.fixture(scope="session")
def client_ssl_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    tls_ca.configure_trust(ctx)
    return ctx


_REFUSING_DNS: list[Any] = []


def refusing_dns_port() -> int:
    """The port of one DNS server for the whole run that answers REFUSED to everything
    (a dead port would instead cost every lookup its full timeout)."""
    if not _REFUSING_DNS:
        from dnslib import RCODE

        _REFUSING_DNS.append(DNSServer(default_rcode=RCODE.REFUSED).start())
    return int(_REFUSING_DNS[0].port)


def make_config(data_dir: Path, **sections: dict[str, Any]) -> Config:
    """A config on free ports (0) under data_dir; ``sections`` override TOML tables."""
    raw: dict[str, Any] = {
        "server": {"hostname": HOSTNAME, "data_dir": str(data_dir)},
        "listen": {
            "mx": ["127.0.0.1:0"],
            "submission": ["127.0.0.1:0"],
            "submissions": ["127.0.0.1:0"],
            "pop3": ["127.0.0.1:0"],
            "pop3s": ["127.0.0.1:0"],
            "imap": ["127.0.0.1:0"],
            "imaps": ["127.0.0.1:0"],
            "managesieve": ["127.0.0.1:0"],
        },
        # Never the system resolver: a test that queues remote mail must not send a DNS
        # query off this machine. This server refuses every query, so lookups fail at once:
        # 4xx for delivery, temperror (accepted) for the MX's SPF/DKIM/DMARC.
        "dns": {"nameservers": ["127.0.0.1"], "port": refusing_dns_port(), "timeout": 1.0},
    }
    for name, table in sections.items():
        raw.setdefault(name, {}).update(table)
    return config_mod.from_dict(raw)


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    """The project's own authoritative DNS server on loopback: each test sets its records,
    nothing is forwarded, so no query leaves the machine."""
    server = DNSServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def config_factory(tmp_path: Path) -> Callable[..., Config]:
    def factory(**sections: dict[str, Any]) -> Config:
        return make_config(tmp_path / "data", **sections)

    return factory


def seed_directory(cfg: Config) -> None:
    """example.test with alice and bob, an alias, a remote forward."""
    from mailfort.directory.sqlite import SQLiteDirectory
    from mailfort.passwords import hash_password

    cfg.data_path.mkdir(parents=True, exist_ok=True)
    d = SQLiteDirectory(cfg.data_path / "directory.sqlite3")
    d.add_domain("example.test")
    d.add_user("alice@example.test", hash_password("alice-pw"))
    d.add_user("bob@example.test", hash_password("bob-pw"))
    d.add_alias("team@example.test", ["alice@example.test", "bob@example.test"])
    d.add_alias("postmaster@example.test", ["alice@example.test"])


@pytest.fixture
async def node(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext
) -> AsyncIterator[Any]:
    from mailfort.server.app import Node

    cfg = config_factory()
    seed_directory(cfg)
    async with Node(cfg, ssl_context=server_ssl_context) as n:
        yield n


@pytest.fixture(scope="session")
def postgres_server() -> Any:
    """One real PostgreSQL for the run (tests/pgserver.py); skipped when not installed."""
    from tests.pgserver import PostgresServer, find_bindir, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no PostgreSQL: {reason}")
    bindir = find_bindir()
    assert bindir is not None
    server = PostgresServer(bindir).start()
    yield server
    server.stop()


@pytest.fixture
def pg_directory(postgres_server: Any, tmp_path: Path) -> dict[str, Any]:
    """A ``[directory]`` table for a fresh, empty (unmigrated) database; the password is
    in a file, as in production."""
    from tests.pgserver import PASSWORD

    secret = tmp_path / "directory-password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    return {"backend": "postgresql", "url": postgres_server.url(postgres_server.create_database()),
            "password_file": str(secret)}


@pytest.fixture
def redis_server() -> Iterator[Any]:
    """A real redis-server on a free loopback port (skipped when not installed)."""
    from tests.redisserver import RedisServer

    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def reference_dovecot() -> Iterator[int]:
    """The reference Dovecot's IMAP port (tests/refdovecot.py), or the test skips."""
    from tests import refdovecot

    started, reason = refdovecot.start()
    try:
        if reason:
            pytest.skip(reason)
        yield refdovecot.IMAP_PORT
    finally:
        if started:
            refdovecot.stop()


@pytest.fixture(scope="session")
def event_loop_policy() -> asyncio.AbstractEventLoopPolicy:
    """The suite's in-process nodes serve on the loop that ``mailfort serve`` uses
    (server/eventloop.py)."""
    if eventloop.loop_factory() is asyncio.new_event_loop:
        return asyncio.DefaultEventLoopPolicy()
    import uvloop

    return uvloop.EventLoopPolicy()
