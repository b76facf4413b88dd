"""Connection limits of a whole node: one count over every listener, one client keying rule.

Real sockets to a real ``Node``: connections spread over the MX, submission and POP3
listeners must meet the one node-wide cap, and the per-client cap counts a client the way
the brute-force protection does (``client_key``: IPv4 address, IPv6 /64).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from mailfort.config import Config
from mailfort.policy.counters import client_key
from mailfort.server.app import Node
from mailfort.server.connections import Admission, ConnectionLimiter, limit_exceptions
from tests.conftest import refusing_dns_port, seed_directory
from tests.server.production import serving, world_dir, write_config
from tests.server.test_mx import read_reply

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# These clients connect from loopback, which is exempt from the per-address limits by
# default (limits.connection_limit_exceptions): the tests of those limits count it.
COUNT_LOOPBACK: dict[str, Any] = {"connection_limit_exceptions": []}


@asynccontextmanager
async def node_with(
    config_factory: Callable[..., Config], ctx: ssl.SSLContext, **sections: dict[str, Any]
) -> AsyncIterator[Node]:
    cfg = config_factory(**sections)
    seed_directory(cfg)
    async with Node(cfg, ssl_context=ctx) as node:
        yield node


async def connect(
    port: int, host: str = "127.0.0.1", source: str | None = None
) -> tuple[Conn, str]:
    """Open a plain connection (from ``source`` if given) and read the first reply line."""
    local = (source, 0) if source else None
    reader, writer = await asyncio.open_connection(host, port, local_addr=local)
    return (reader, writer), await read_reply(reader)


def close_all(conns: list[Conn]) -> None:
    for _, w in conns:
        w.close()


async def test_total_cap_counts_every_listener(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext
) -> None:
    async with node_with(config_factory, server_ssl_context,
                         limits={"max_connections": 2, "stress_threshold": 0}) as node:
        held = []
        conn, greeting = await connect(node.port("mx"))
        held.append(conn)
        assert greeting.startswith("220 ")
        conn, greeting = await connect(node.port("pop3"))
        held.append(conn)
        assert greeting.startswith("+OK")
        # The third connection, on yet another listener, meets the node's cap.
        conn, refused = await connect(node.port("submission"))
        held.append(conn)
        assert refused.startswith("421 4.7.0 Too many connections")
        conn, refused = await connect(node.port("pop3"))
        held.append(conn)
        assert refused.startswith("-ERR [SYS/TEMP] Too many connections")
        # A connection that ends frees its place for any listener.
        held[0][1].close()
        await held[0][1].wait_closed()
        for _ in range(100):
            if node.services["mx"].sessions == set():
                break
            await asyncio.sleep(0.01)
        conn, greeting = await connect(node.port("submission"))
        held.append(conn)
        assert greeting.startswith("220 ")
        close_all(held)


async def test_per_client_cap_counts_every_listener(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext
) -> None:
    async with node_with(config_factory, server_ssl_context,
                         limits={"max_connections_per_ip": 2, **COUNT_LOOPBACK}) as node:
        held = []
        for name in ("mx", "pop3"):
            conn, greeting = await connect(node.port(name))
            held.append(conn)
            assert not greeting.startswith(("421", "-ERR"))
        conn, refused = await connect(node.port("submission"))
        held.append(conn)
        assert refused.startswith("421 4.7.0 Too many connections from your address")
        conn, refused = await connect(node.port("pop3"))
        held.append(conn)
        assert refused.startswith("-ERR [SYS/TEMP] Too many connections from your address")
        # Another client is counted on its own.
        conn, greeting = await connect(node.port("submission"), source="127.0.0.2")
        held.append(conn)
        assert greeting.startswith("220 ")
        close_all(held)


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
async def test_ipv6_client_meets_the_node_wide_cap(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext
) -> None:
    async with node_with(config_factory, server_ssl_context,
                         limits={"max_connections_per_ip": 2, **COUNT_LOOPBACK},
                         listen={"mx": ["[::1]:0"], "pop3": ["[::1]:0"]}) as node:
        held = []
        for name in ("mx", "pop3"):
            conn, greeting = await connect(node.port(name), host="::1")
            held.append(conn)
            assert not greeting.startswith(("421", "-ERR"))
        conn, refused = await connect(node.port("mx"), host="::1")
        held.append(conn)
        assert refused.startswith("421 4.7.0 Too many connections from your address")
        # ::1 is counted as its /64, the identity authentication counts it under too.
        assert node.limiter.per_client == {"::/64": 2}
        close_all(held)


def test_limiter_counts_a_client_by_client_key() -> None:
    """IPv6 by /64, IPv4-mapped as IPv4 (``client_key``, as for authentication failures:
    tests/policy/test_authn.py::test_ipv6_client_is_counted_by_its_64)."""
    limiter = ConnectionLimiter(max_total=10, max_per_ip=1)
    assert limiter.admit("2001:db8:1:2::a") is Admission.OK
    assert limiter.admit("2001:db8:1:2:ffff::b") is Admission.TOO_MANY_FROM_IP
    assert limiter.admit("2001:db8:1:3::a") is Admission.OK  # another /64
    assert limiter.admit("192.0.2.1") is Admission.OK
    assert limiter.admit("::ffff:192.0.2.1") is Admission.TOO_MANY_FROM_IP
    limiter.release("2001:db8:1:2::a")
    assert limiter.admit("2001:db8:1:2::c") is Admission.OK
    assert limiter.total == 3
    assert set(limiter.per_client) == {client_key("2001:db8:1:2::c"), "2001:db8:1:3::/64",
                                       "192.0.2.1"}


def test_limiter_rate_per_client_per_minute() -> None:
    from mailfort.policy.counters import MemoryCounters

    now = [0.0]
    limiter = ConnectionLimiter(100, 100, rate_per_minute=2,
                                counters=MemoryCounters(clock=lambda: now[0]))
    assert limiter.admit("192.0.2.1") is Admission.OK
    limiter.release("192.0.2.1")
    assert limiter.admit("192.0.2.1") is Admission.OK
    limiter.release("192.0.2.1")
    assert limiter.admit("192.0.2.1") is Admission.RATE_FROM_IP  # 3rd in a minute
    assert limiter.admit("2001:db8::1") is Admission.OK
    assert limiter.admit("2001:db8::2") is Admission.OK  # the same /64 ...
    assert limiter.admit("2001:db8::3") is Admission.RATE_FROM_IP  # ... is one client
    assert limiter.total == 2  # the refused ones hold no slot
    now[0] = 60.0
    assert limiter.admit("192.0.2.1") is Admission.OK  # a new minute


async def test_connection_rate_limit_refuses_and_logs(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    caplog.set_level(logging.INFO, "mailfort.decision")
    async with node_with(config_factory, server_ssl_context,
                         limits={"max_connection_rate_per_ip": 2, **COUNT_LOOPBACK}) as node:
        for port in (node.port("mx"), node.port("pop3")):  # node-wide, every listener
            (_, w), greeting = await connect(port)
            w.close()
            assert greeting.startswith(("220 ", "+OK"))
        (reader, w), refused = await connect(node.port("mx"))
        assert refused == "421 4.7.0 Connection rate limit exceeded, try again later\r\n"
        assert await asyncio.wait_for(reader.read(), 5) == b""
        w.close()
        (_, w), other = await connect(node.port("mx"), source="127.0.0.5")
        w.close()
        assert other.startswith("220 ")
    assert ("reject: CONNECT from [127.0.0.1]: 421 4.7.0 Connection rate limit exceeded, "
            "try again later") in [r.getMessage() for r in caplog.records]


def test_shared_limiter_counts_over_workers_and_forgets_a_dead_one(tmp_path: Any) -> None:
    """Two workers' limiters on one table: the caps hold over both; a slot cleared (its
    worker died and is replaced) releases what that worker had counted."""
    from mailfort.server.connections import ConnectionTable, SharedConnectionLimiter

    table = ConnectionTable(2, tmp_path / "connections.lock")
    w0 = SharedConnectionLimiter(table, 0, max_total=3, max_per_ip=2)
    w1 = SharedConnectionLimiter(table, 1, max_total=3, max_per_ip=2)
    assert w0.admit("192.0.2.1") is Admission.OK
    assert w1.admit("192.0.2.1") is Admission.OK
    assert w0.admit("192.0.2.1") is Admission.TOO_MANY_FROM_IP
    assert w1.admit("192.0.2.1") is Admission.TOO_MANY_FROM_IP
    assert w1.admit("192.0.2.2") is Admission.OK
    assert w0.admit("192.0.2.3") is Admission.TOO_MANY
    w0.release("192.0.2.1")
    assert w0.admit("192.0.2.3") is Admission.OK
    assert w0.total == 3
    table.clear(1)  # worker 1 died: its two connections are gone with it
    assert w0.total == 1
    assert w0.admit("192.0.2.1") is Admission.OK
    assert w1.admit("192.0.2.1") is Admission.OK


def test_workers_in_other_processes_never_admit_past_the_cap_together(tmp_path: Any) -> None:
    """Four forked workers, 100 rounds: at a barrier they all start admitting one client's
    connections until refused, against a node cap of 2; at the next barrier the admissions
    are counted (exactly 2 every round: each admission is checked and counted under the
    table's lock), then released. Each read of the shared counts is slowed down (a real
    read, then a sleep), so that admissions overlap: without the lock, two workers that
    read 1 at the same moment both get in, and this test fails. The parent, a fifth
    process, shares the same counts."""
    import multiprocessing
    import time

    from mailfort.server.connections import ConnectionTable, SharedConnectionLimiter

    class SlowReads:
        def __init__(self, counts: Any) -> None:
            self._counts = counts

        def __getitem__(self, i: int) -> int:
            value = self._counts[i]
            time.sleep(0.0001)
            return int(value)

        def __setitem__(self, i: int, value: int) -> None:
            self._counts[i] = value

    rounds, workers = 100, 4
    table = ConnectionTable(workers + 1, tmp_path / "connections.lock")
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(workers, timeout=30)
    got = ctx.Array("i", rounds * workers, lock=False)  # admissions per round and worker

    def worker(slot: int) -> None:
        mine = SharedConnectionLimiter(table, slot, max_total=2, max_per_ip=100)
        mine._counts = SlowReads(table.counts)  # type: ignore[assignment]
        for r in range(rounds):
            barrier.wait()
            n = 0
            while mine.admit("198.51.100.7") is Admission.OK:
                n += 1
            got[r * workers + slot] = n
            barrier.wait()
            for _ in range(n):
                mine.release("198.51.100.7")

    procs = [ctx.Process(target=worker, args=(slot,)) for slot in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    per_round = [sum(got[r * workers:(r + 1) * workers]) for r in range(rounds)]
    assert per_round == [2] * rounds, [n for n in per_round if n != 2][:10]
    parent = SharedConnectionLimiter(table, workers, max_total=2, max_per_ip=100)
    assert parent.total == 0  # every admission was released
    assert parent.admit("198.51.100.7") is Admission.OK
    assert parent.admit("198.51.100.8") is Admission.OK
    assert parent.admit("198.51.100.9") is Admission.TOO_MANY


# ------------------------------------------------ issue 24, item 9: slots and exceptions

EXEMPT = limit_exceptions(["loopback", "trusted_networks", "198.51.100.0/24"],
                          ["192.0.2.0/24"])


def test_exceptions_skip_the_per_client_cap_and_rate_but_not_the_node_cap() -> None:
    limiter = ConnectionLimiter(max_total=5, max_per_ip=1, rate_per_minute=1, exempt=EXEMPT)
    exempt = ["127.0.0.1", "127.0.0.1", "::1", "::ffff:192.0.2.7", "198.51.100.9"]
    for ip in exempt:
        assert limiter.admit(ip) is Admission.OK, ip
    assert limiter.per_client == {}  # counted in the node's total only
    assert limiter.admit("127.0.0.1") is Admission.TOO_MANY
    for ip in exempt:
        limiter.release(ip)
    assert limiter.total == 0
    assert limiter.admit("203.0.113.1") is Admission.OK  # others are held to both limits
    assert limiter.admit("203.0.113.1") is Admission.RATE_FROM_IP
    assert limit_exceptions([], ["192.0.2.0/24"]) == ()


def test_shared_limiter_exempts_over_workers(tmp_path: Any) -> None:
    from mailfort.server.connections import ConnectionTable, SharedConnectionLimiter

    table = ConnectionTable(2, tmp_path / "connections.lock")
    w0, w1 = (SharedConnectionLimiter(table, slot, max_total=4, max_per_ip=1, exempt=EXEMPT)
              for slot in (0, 1))
    assert [w.admit("192.0.2.1") for w in (w0, w1, w0)] == [Admission.OK] * 3
    assert w1.admit("203.0.113.1") is Admission.OK
    assert w0.admit("203.0.113.1") is Admission.TOO_MANY
    w0.release("192.0.2.1")
    assert w0.admit("203.0.113.1") is Admission.TOO_MANY_FROM_IP
    for w, ip in ((w1, "192.0.2.1"), (w0, "192.0.2.1"), (w1, "203.0.113.1")):
        w.release(ip)
    assert w0.total == 0 and not any(table.counts)


async def test_loopback_is_exempt_from_the_per_client_cap_by_default(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext
) -> None:
    async with node_with(config_factory, server_ssl_context,
                         limits={"max_connections_per_ip": 1}) as node:
        held = []
        for name in ("mx", "pop3", "mx"):
            conn, greeting = await connect(node.port(name))
            held.append(conn)
            assert greeting.startswith(("220 ", "+OK")), greeting
        assert node.limiter.total == 3 and node.limiter.per_client == {}
        close_all(held)


async def test_trusted_networks_are_exempt_when_listed(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext
) -> None:
    async with node_with(config_factory, server_ssl_context,
                         limits={"max_connections_per_ip": 1,
                                 "connection_limit_exceptions": ["trusted_networks"]},
                         relay={"trusted_networks": ["127.0.0.2/32"]}) as node:
        held = []
        for _ in range(3):
            conn, greeting = await connect(node.port("mx"), source="127.0.0.2")
            held.append(conn)
            assert greeting.startswith("220 ")
        conn, greeting = await connect(node.port("mx"), source="127.0.0.3")
        held.append(conn)
        assert greeting.startswith("220 ")
        conn, refused = await connect(node.port("mx"), source="127.0.0.3")
        held.append(conn)
        assert refused.startswith("421 4.7.0 Too many connections from your address")
        close_all(held)


async def _send_messages(port: int, sessions: int, messages: int) -> dict[str, int]:
    """``sessions`` clients at once, one connection per message (as ``smtp-source -s``):
    the replies that ended each attempt, counted."""
    left = messages
    outcomes: dict[str, int] = {}
    body = b"From: <s@remote.test>\r\nSubject: load\r\n\r\nhello\r\n.\r\n"

    async def one() -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            greeting = await read_reply(reader)
            if not greeting.startswith("220 "):
                return greeting[:60]
            writer.write(b"EHLO client.remote.test\r\nMAIL FROM:<s@remote.test>\r\n"
                         b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
            for _ in range(4):
                await read_reply(reader)
            writer.write(body)
            end = await read_reply(reader)
            writer.write(b"QUIT\r\n")
            await read_reply(reader)
            return "250" if end.startswith("250 ") else end[:60]
        finally:
            writer.close()

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            outcome = await asyncio.wait_for(one(), 30)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    await asyncio.gather(*(client() for _ in range(sessions)))
    return outcomes


SENDERS = 45


def test_parallel_senders_never_meet_the_per_address_cap_over_workers() -> None:
    """Issue 24, item 9, against ``mailfort serve`` with two workers: 45 senders at once,
    each message on its own connection. The slot of a session that answered QUIT is free
    before its client reads the 221, so the next connection (often on the other worker)
    never meets the cap. The cap is exactly 45 here, so that a slot still counted for a
    moment after its 221 shows at once (with the default 50, today's code met it only
    after a few thousand messages; bench/parallel_senders.py runs the issue's 20,000).
    Loopback is counted here; 127.0.0.9, a trusted network, is exempt on every worker."""
    from mailfort.config import load

    root = world_dir()
    config = write_config(root, refusing_dns_port(), server={"workers": 2},
                          log={"file": str(root / "serve.log")},
                          limits={"max_connections_per_ip": SENDERS,
                                  "connection_limit_exceptions": ["trusted_networks"]},
                          relay={"trusted_networks": ["127.0.0.9/32"]})
    cfg = load(config)
    seed_directory(cfg)
    port = int(cfg.listen.mx[0].rsplit(":", 1)[1])
    with serving(config, cfg.data_path):
        outcomes = asyncio.run(_send_messages(port, SENDERS, 1500))
        assert outcomes == {"250": 1500}, outcomes
        held = [socket.create_connection(("127.0.0.1", port), timeout=10,
                                         source_address=("127.0.0.9", 0)) for _ in range(55)]
        try:
            greetings = [s.recv(200)[:4] for s in held]
        finally:
            for s in held:
                s.close()
        assert greetings == [b"220 "] * 55


@pytest.mark.parametrize("entry", ["lo", "10.0.0.1/8", "192.0.2.0/33", "", "0.0.0.0/0", "::/0",
                                   "64.0.0.0/2"])
def test_a_wrong_limit_exception_is_refused_and_named(
    config_factory: Callable[..., Config], entry: str,
) -> None:
    from mailfort.config import ConfigError

    with pytest.raises(ConfigError, match=r"limits\.connection_limit_exceptions\[1\]"):
        config_factory(limits={"connection_limit_exceptions": ["loopback", entry]})
    cfg = config_factory(limits={"connection_limit_exceptions": ["trusted_networks",
                                                                  "2001:db8::/32"]})
    assert cfg.limits.connection_limit_exceptions == ["trusted_networks", "2001:db8::/32"]
