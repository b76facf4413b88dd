"""Two mailfort nodes sharing one Redis (``[counters] backend = "redis"``), end to end.

Node A listens on 127.0.0.2, node B on 127.0.0.3; each has its own data directory and
SQLite directory with the same users (the shared directory is PostgreSQL's business).
Real clients over real TLS: logins, submissions and POP3 sessions spread over both nodes
see one set of counts and one maildrop lock; Redis stopped mid-run follows the policy of
policy/authn.py (logins refused for now, MX reception goes on) and recovers.
"""

from __future__ import annotations

import asyncio
import poplib
import smtplib
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailfort.policy import redis_counters
from mailfort.server.app import Node
from tests.conftest import make_config, seed_directory
from tests.server.test_submission import parallel_transactions

ALICE, ALICE_PW = "alice@example.test", "alice-pw"
BOB = "bob@example.test"
NODES = ("127.0.0.2", "127.0.0.3")
AUTH = {"block_after_failures": 4, "delay_after_failures": 100, "failure_delay": 0.0}


def message(n: int) -> str:
    return f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: {n}\r\n\r\nbody {n}\r\n"


@pytest.fixture
def client_ctx(tls_ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    tls_ca.configure_trust(ctx)
    ctx.check_hostname = False  # the test certificate names 127.0.0.1; the CA is checked
    return ctx


class Cluster:
    def __init__(self, nodes: list[Node], ctx: ssl.SSLContext) -> None:
        self.nodes, self.ctx = nodes, ctx

    def host(self, i: int) -> str:
        return NODES[i]

    def pop3(self, i: int, user: str = ALICE, password: str = ALICE_PW) -> poplib.POP3_SSL:
        c = poplib.POP3_SSL(NODES[i], self.nodes[i].port("pop3s"), context=self.ctx,
                            timeout=10)
        c.user(user)
        try:
            c.pass_(password)
        except BaseException:
            c.close()
            raise
        return c

    def smtp_login(self, i: int, password: str = ALICE_PW) -> smtplib.SMTP_SSL:
        s = smtplib.SMTP_SSL(NODES[i], self.nodes[i].port("submissions"), context=self.ctx,
                             timeout=10)
        try:
            s.login(ALICE, password)
        except BaseException:
            s.close()
            raise
        return s

    def mx(self, i: int, n: int) -> None:
        with smtplib.SMTP(NODES[i], self.nodes[i].port("mx"), timeout=10) as s:
            s.sendmail("someone@remote.test", [ALICE], message(n))


@pytest.fixture
async def make_cluster(tmp_path: Path, redis_server: Any, server_ssl_context: ssl.SSLContext,
                       client_ctx: ssl.SSLContext) -> AsyncIterator[Callable[..., Any]]:
    """``await make_cluster(shared_mail=..., **toml_sections)`` -> a started Cluster."""
    async with AsyncExitStack() as stack:
        async def make(*, shared_mail: bool = False, **sections: dict[str, Any]) -> Cluster:
            nodes = []
            for i, ip in enumerate(NODES):
                listen = {name: [f"{ip}:0"] for name in
                          ("mx", "submission", "submissions", "pop3", "pop3s", "imap", "imaps",
                           "managesieve")}
                server = {"mail_dir": str(tmp_path / "shared-mail")} if shared_mail else {}
                cfg = make_config(tmp_path / f"node{i}", listen=listen,
                                  counters={"backend": "redis", "url": redis_server.url},
                                  **({"server": server} if server else {}), **sections)
                seed_directory(cfg)
                nodes.append(await stack.enter_async_context(
                    Node(cfg, ssl_context=server_ssl_context)))
            return Cluster(nodes, client_ctx)

        yield make


class POP3SFrom(poplib.POP3_SSL):
    """POP3S from a chosen loopback address (poplib has no source_address)."""

    def __init__(self, source: str, *args: Any, **kwargs: Any) -> None:
        self.source = source
        super().__init__(*args, **kwargs)

    def _create_socket(self, timeout: float) -> Any:
        sock = socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0))
        return self.context.wrap_socket(sock, server_hostname=self.host)


def run(fn: Callable[..., Any], *args: Any) -> Any:
    return asyncio.to_thread(fn, *args)


async def test_failed_logins_spread_over_both_nodes_block_on_both(make_cluster: Any) -> None:
    c = await make_cluster(auth=AUTH)
    # Two failures on each node: each alone sees fewer than block_after_failures (4).
    # (POP3: one password per attempt; smtplib's login would try two mechanisms.)
    for _ in range(2):
        with pytest.raises(poplib.error_proto):
            await run(c.pop3, 0, ALICE, "wrong")
    assert await c.nodes[0].authenticator.blocks() == []  # not yet
    for _ in range(2):
        with pytest.raises(poplib.error_proto):
            await run(c.pop3, 1, ALICE, "wrong")
    for node in c.nodes:  # both see the block
        assert ("client", "127.0.0.1") in {
            (b.kind, b.key) for b in await node.authenticator.blocks()}
    # Blocked on both: even the right password is refused, over SMTP (421) and POP3.
    with pytest.raises(smtplib.SMTPException):
        await run(c.smtp_login, 1)
    with pytest.raises(poplib.error_proto):
        await run(c.pop3, 0)


async def test_the_per_user_send_rate_is_shared(make_cluster: Any) -> None:
    c = await make_cluster(submission={"messages_per_hour": 2})

    def send(i: int, n: int) -> None:
        with c.smtp_login(i) as s:
            s.sendmail(ALICE, [BOB], message(n))

    await run(send, 0, 1)
    await run(send, 1, 2)
    for i in (0, 1):  # each node has sent only one: the shared count says two
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            await run(send, i, 3)
        assert refused.value.smtp_code == 452


async def test_parallel_sessions_on_both_nodes_get_exactly_the_hourly_limits(
        make_cluster: Any) -> None:
    """Eight sessions at once, spread over both nodes: the reservation at MAIL and at RCPT
    is one Lua script in Redis, so together they get exactly the limits."""
    c = await make_cluster(submission={"messages_per_hour": 3, "recipients_per_hour": 5})
    results = await run(parallel_transactions, lambda i: c.smtp_login(i % 2), [BOB, ALICE])
    assert sorted(mail for mail, _, _ in results) == [250] * 3 + [452] * 5
    assert sorted(code for _, rcpts, _ in results for code in rcpts) == [250] * 5 + [452]
    assert [data for _, _, data in results].count(250) == 3


async def test_a_second_pop3_session_on_the_other_node_is_in_use(make_cluster: Any) -> None:
    # Separate Maildirs: B's own lock sees nothing, only the shared lease can refuse.
    c = await make_cluster()
    first = await run(c.pop3, 0)
    try:
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            await run(c.pop3, 1)
    finally:
        await run(first.quit)
    second = await run(c.pop3, 1)  # released at QUIT
    await run(second.quit)


async def test_mail_received_by_a_is_read_and_deleted_on_b(make_cluster: Any) -> None:
    c = await make_cluster(shared_mail=True)
    await run(c.mx, 0, 1)
    await run(c.mx, 0, 2)

    def read_and_delete() -> list[bytes]:
        p = c.pop3(1)
        count, _ = p.stat()
        lines = p.retr(1)[1]
        p.dele(1)
        p.quit()
        return [count, lines]

    count, lines = await run(read_and_delete)
    assert count == 2 and b"body 1" in lines
    p = await run(c.pop3, 0)  # at once on A: the deletion made at B's QUIT is applied
    assert (await run(p.stat))[0] == 1
    await run(p.quit)


async def test_redis_stopped_mid_run_refuses_logins_keeps_mx_and_recovers(
        make_cluster: Any, redis_server: Any) -> None:
    c = await make_cluster()
    s = await run(c.smtp_login, 0)
    await run(s.quit)
    redis_server.stop()
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        await run(c.smtp_login, 0)
    assert refused.value.smtp_code == 454
    with pytest.raises(poplib.error_proto, match=r"SYS/TEMP"):
        await run(c.pop3, 1)
    await run(c.mx, 0, 1)  # MX reception takes no password: it goes on
    await run(c.mx, 1, 2)
    redis_server.start()
    await asyncio.sleep(redis_counters.RETRY_EVERY + 0.2)
    s = await run(c.smtp_login, 0)
    await run(s.quit)
    p = await run(c.pop3, 1)
    assert (await run(p.stat))[0] == 1  # B's own Maildir: the message B received
    await run(p.quit)


async def test_a_block_made_on_a_is_listed_and_removed_on_b(make_cluster: Any) -> None:
    """What ``mailfort block list|remove`` asks of a node (server/operations.py), with the
    blocks in Redis: any node lists and lifts what any node blocked."""
    c = await make_cluster(auth=AUTH)

    def guess_from(ip: str, password: str) -> bool:
        p = POP3SFrom(ip, NODES[0], c.nodes[0].port("pop3s"), context=c.ctx, timeout=10)
        try:
            p.user(ALICE)
            p.pass_(password)
            return True
        except poplib.error_proto:
            return False
        finally:
            p.close()

    for _ in range(AUTH["block_after_failures"]):
        assert not await run(guess_from, "127.0.0.5", "wrong")
    assert not await run(guess_from, "127.0.0.5", ALICE_PW)  # blocked
    listed = await c.nodes[1].authenticator.blocks()
    assert [(b.kind, b.key) for b in listed if b.kind == "client"] == [("client", "127.0.0.5")]
    assert "block removed" in await c.nodes[1].authenticator.unblock("127.0.0.5")
    assert await run(guess_from, "127.0.0.5", ALICE_PW)


async def test_a_session_whose_lease_is_lost_ends_without_its_deletions(
        make_cluster: Any, redis_server: Any) -> None:
    """If the lease goes (it expired while Redis was away, say), another node may hold the
    maildrop now: the session is ended and its DELEs are not applied."""
    c = await make_cluster()
    c.nodes[0].maildrop_locks.ttl = 0.6  # renewed every 0.2 s
    await run(c.mx, 0, 1)
    p = await run(c.pop3, 0)
    await run(p.dele, 1)
    await c.nodes[0].counters.client.delete(f"mailfort:pop3-lock:{ALICE}")
    await asyncio.sleep(0.6)
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
        await run(p.quit)  # the server's -ERR came first
    p.close()
    p = await run(c.pop3, 0)
    assert (await run(p.stat))[0] == 1  # the DELE was not applied
    await run(p.quit)
