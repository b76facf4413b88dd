"""Stress mode (server/stress.py) against hostile clients, scaled down for the suite.

A few hundred connections from many loopback addresses (127.0.0.x) against a node whose
``max_connections`` is low: idle sessions, byte-at-a-time writers (slowloris) and clients
that never read their replies fill the table. A legitimate client must still get its
message accepted within 2 seconds, because the table ends its oldest idle sessions (421
4.7.0) before refusing, and a writer that trickles bytes cannot renew its deadline. The
same crowd without stress mode shows why: the legitimate client is refused.
bench/hostile_clients.py is the full-size form (10,000 connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import smtplib
import ssl
import time
from collections.abc import Callable
from typing import Any

from mailfort.config import Config
from mailfort.server.app import Node
from tests.conftest import seed_directory
from tests.server.test_mx import read_reply

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
ADDRESSES = [f"127.0.0.{i}" for i in range(2, 42)]  # the crowd; the legitimate client is .1


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _open(port: int, n: int) -> Conn | None:
    """One hostile connection from the n-th crowd address; None if the server refused it."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(ADDRESSES[n % len(ADDRESSES)], 0))
    banner = await read_reply(reader)
    if not banner.startswith("220 "):
        writer.close()
        return None
    return reader, writer


async def _crowd(port: int, count: int, start: int, kind: str) -> list[Conn]:
    """``count`` hostile connections of one kind: ``idle`` (EHLO, then nothing), ``slow``
    (a command line that never ends, one byte at a time, see ``_trickle``) or ``deaf``
    (pipelines NOOPs and never reads a reply)."""
    conns = [c for c in await asyncio.gather(*(_open(port, start + i) for i in range(count)))
             if c is not None]
    for reader, writer in conns:
        if kind == "idle":
            writer.write(b"EHLO idle.test\r\n")
            await read_reply(reader)
        elif kind == "deaf":
            writer.write(b"NOOP\r\n" * 200)
    return conns


class Trickler:
    """Byte-at-a-time writers: each sends one byte every 0.1 s, never ending its line, and
    reads whatever the server says, so its last word is seen before any reset."""

    def __init__(self, conns: list[Conn]) -> None:
        self.heard: list[bytes] = [b""] * len(conns)
        self.closed = [False] * len(conns)
        self.tasks = [asyncio.create_task(self._one(i, c)) for i, c in enumerate(conns)]

    async def _one(self, i: int, conn: Conn) -> None:
        reader, writer = conn
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(b"x")
                with contextlib.suppress(TimeoutError):
                    data = await asyncio.wait_for(reader.read(4096), 0.1)
                    self.heard[i] += data
                    if not data:
                        break
        self.closed[i] = True

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _legitimate_send(port: int) -> tuple[float, str]:
    """A real client (smtplib): seconds from connect to the 250 after DATA, or the refusal."""
    t0 = time.monotonic()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.ehlo("legit.test")
            s.sendmail("someone@elsewhere.test", ["alice@example.test"],
                       b"From: <someone@elsewhere.test>\r\nSubject: hi\r\n\r\n"
                       b"still served\r\n")
    except smtplib.SMTPException as exc:
        return time.monotonic() - t0, repr(exc)
    return time.monotonic() - t0, "250"


async def _ended_with(conns: list[Conn], text: bytes) -> int:
    """How many of ``conns`` were told ``text`` and closed by the server (within 1 s)."""

    async def one(reader: asyncio.StreamReader) -> bool:
        with contextlib.suppress(TimeoutError, ConnectionError):
            return text in await asyncio.wait_for(reader.read(), 1)
        return False

    return sum(await asyncio.gather(*(one(r) for r, _ in conns)))


async def _run_crowd(
    config_factory: Callable[..., Config], ctx: ssl.SSLContext, limits: dict[str, Any]
) -> dict[str, Any]:
    _raise_nofile()
    cfg = config_factory(limits=limits)
    seed_directory(cfg)
    async with Node(cfg, ssl_context=ctx) as node:
        port = node.port("mx")
        # The table fills with the oldest hostile sessions...
        idle = await _crowd(port, 30, 0, "idle")
        slow = await _crowd(port, 15, 30, "slow")
        deaf = await _crowd(port, 15, 45, "deaf")
        trickler = Trickler(slow)
        await asyncio.sleep(1.2)  # ...which go quiet (the slow ones still send bytes)
        # ...then a few hundred more arrive at once, each wanting a slot.
        late = await asyncio.gather(*(_open(port, 60 + i) for i in range(240)))
        latency, outcome = await asyncio.to_thread(_legitimate_send, port)
        result = {
            "latency": latency, "outcome": outcome,
            "evicted": node.stress.evicted, "timed_out": node.stress.timed_out,
            "total": node.limiter.total,
        }
        await asyncio.sleep(1.5)  # the stressed idle timeout (1 s) passes for the slow ones
        result["slow_ended"] = sum(trickler.closed)
        result["slow_told"] = sum(b"421 4.7.0 Server busy" in h for h in trickler.heard)
        result["idle_ended"] = await _ended_with(idle, b"421 4.7.0 Server busy")
        await trickler.stop()
        for _, w in idle + slow + deaf + [c for c in late if c is not None]:
            w.close()
    return result


STRESS = {"max_connections": 60, "max_connections_per_ip": 50, "stress_idle_timeout": 1.0}


async def test_legitimate_client_is_served_within_2s_under_hostile_crowd(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext
) -> None:
    r = await _run_crowd(config_factory, server_ssl_context, STRESS)
    assert r["outcome"] == "250", r
    assert r["latency"] < 2.0, r
    assert r["evicted"] > 0, r  # oldest idle sessions were ended to make room
    assert r["idle_ended"] > 0, r  # ...and their clients were told so (421 4.7.0)
    # Byte-at-a-time writers do not renew their deadline: every one was ended and told why.
    assert r["slow_ended"] == r["slow_told"] == 15, r
    assert r["timed_out"] > 0, r  # the stressed idle timeout (1 s) ended some by itself
    assert r["total"] <= STRESS["max_connections"]


async def test_without_stress_mode_the_crowd_keeps_the_legitimate_client_out(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext
) -> None:
    """The old behaviour (stress mode off): the full table refuses the legitimate client."""
    r = await _run_crowd(config_factory, server_ssl_context, {**STRESS, "stress_threshold": 0})
    assert r["outcome"] != "250" and "421" in r["outcome"], r
    assert r["evicted"] == 0 and r["slow_ended"] == 0, r


async def test_sessions_opened_under_stress_get_the_lower_error_limit(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext
) -> None:
    """Past the threshold a new session ends after stress_max_errors (3) errors, not 20."""
    cfg = config_factory(limits={"max_connections": 5, "stress_threshold": 0.4})
    seed_directory(cfg)
    async with Node(cfg, ssl_context=server_ssl_context) as node:
        port = node.port("mx")
        calm = await _open(port, 0)  # 1 of 5: below the threshold
        assert calm is not None
        crowd = [await _open(port, i) for i in (1, 2)]  # 3 of 5: under stress
        assert all(c is not None for c in crowd)
        stressed = await _open(port, 3)
        assert stressed is not None

        async def errors_until_closed(conn: Conn) -> int:
            """Errors answered (5xx) before the session's closing 421; 99: never closed."""
            reader, writer = conn
            errors = 0
            for _ in range(8):
                writer.write(b"BOGUS\r\n")
                reply = await read_reply(reader)
                if reply.startswith("421"):
                    return errors
                errors += reply.startswith("5")
            return 99

        assert await errors_until_closed(stressed) == 4  # the 4th error ends it
        assert await errors_until_closed(calm) == 99  # opened before: the normal limit
        for _, w in [calm, stressed, *crowd]:  # type: ignore[misc]
            w.close()


async def test_a_full_table_ends_an_idle_pop3_session_for_a_new_smtp_client(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext
) -> None:
    """One table over every listener: the oldest idle session goes, whatever its protocol,
    and it is told so in its own protocol's words."""
    cfg = config_factory(limits={"max_connections": 2})
    seed_directory(cfg)
    async with Node(cfg, ssl_context=server_ssl_context) as node:
        pop_r, pop_w = await asyncio.open_connection("127.0.0.1", node.port("pop3"))
        assert (await pop_r.readline()).startswith(b"+OK")
        smtp_conn = await _open(node.port("mx"), 0)
        assert smtp_conn is not None
        smtp_conn[1].write(b"NOOP\r\n")  # the SMTP session has made progress since
        assert (await read_reply(smtp_conn[0])).startswith("250")
        newcomer = await _open(node.port("submission"), 1)
        assert newcomer is not None  # admitted: the table made room
        last = await asyncio.wait_for(pop_r.read(), 5)
        assert last.startswith(b"-ERR [SYS/TEMP] Server busy"), last
        smtp_conn[1].write(b"NOOP\r\n")  # the more recent SMTP session was kept
        assert (await read_reply(smtp_conn[0])).startswith("250")
        assert node.stress.evicted == 1
        for w in (pop_w, smtp_conn[1], newcomer[1]):
            w.close()


def test_a_workers_stress_mode_reads_the_nodes_connection_count(tmp_path: Any) -> None:
    """With worker processes, each worker's guard adapts its own sessions, but it goes
    into stress mode on the node's count (shared), not on the connections it holds."""
    from mailfort.server.connections import Admission, ConnectionTable, SharedConnectionLimiter
    from mailfort.server.stress import StressGuard, StressSettings

    table = ConnectionTable(2, tmp_path / "connections.lock")
    w0 = SharedConnectionLimiter(table, 0, max_total=10, max_per_ip=10)
    w1 = SharedConnectionLimiter(table, 1, max_total=10, max_per_ip=10)
    guard0 = StressGuard(StressSettings(threshold=0.5))
    for i in range(5):  # every connection on worker 1
        assert w1.admit(f"192.0.2.{i}") is Admission.OK
    assert guard0.active(w0)  # worker 0 holds none, the node's table is half full
    w1.release("192.0.2.0")
    assert not guard0.active(w0)
    w0.close()
    w1.close()
