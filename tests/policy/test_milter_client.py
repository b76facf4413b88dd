"""The milter client against a real rspamd on loopback, and against small filters written here
for what rspamd will not do on demand (a slow filter, a dropped connection, a malformed packet,
header modifications at end of message)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from mailfort.policy.milter_client import (
    MilterClient,
    MilterMessage,
    MilterVerdict,
    check_message,
    split_message,
)
from mailfort.protocol import milter as m
from tests.rspamdserver import RspamdServer

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
ENVELOPE = MilterMessage("alice@example.org", ["bob@example.net"], client_address="127.0.0.1",
                         client_port=40000, client_name="localhost", helo="client.example.org",
                         macros={"connect": {"j": "mx.example.net"}, "eom": {"i": "4QID"}})


def message(body: bytes) -> bytes:
    return (b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: lunch\r\n"
            b"Message-ID: <m1@example.org>\r\nDate: Mon, 7 Dec 2026 17:00:00 +0000\r\n"
            b"\r\n" + body + b"\r\n")


@pytest.fixture(scope="module")
def rspamd() -> Iterator[RspamdServer]:
    server = RspamdServer()
    (server.dir / "local.d" / "settings.conf").write_text(
        'bad { priority = high; ip = "198.51.100.7"; apply { actions { reject = -100; } } }\n')
    try:
        yield server.start()
    finally:
        server.cleanup()


def test_rspamd_rejects_gtube_with_its_text(rspamd: RspamdServer) -> None:
    verdict = asyncio.run(check_message(rspamd.address, ENVELOPE, message(GTUBE)))
    assert verdict.action == "reject", verdict
    assert verdict.code // 100 == 5 and verdict.step == "eom"
    assert "Gtube" in verdict.text or "GTUBE" in verdict.text.upper()


def test_rspamd_accepts_a_normal_message_with_its_header(rspamd: RspamdServer,
                                                         tmp_path: Path) -> None:
    path = tmp_path / "msg.eml"
    path.write_bytes(message(b"Shall we meet at noon?\r\n" * 5000))  # several body chunks
    verdict = asyncio.run(check_message(rspamd.address, ENVELOPE, path))
    assert verdict.action in ("accept", "continue"), verdict
    names = [mod.name for mod in verdict.modifications
             if isinstance(mod, m.AddHeader | m.ChangeHeader | m.InsertHeader)]
    assert "X-Spamd-Result" in names, verdict.modifications


def test_rspamd_takes_the_next_client_on_a_kept_connection(rspamd: RspamdServer) -> None:
    """QUIT_NC, then the next client's CONNECT on the same connection: rspamd judges each
    message by its own client (a rule on one address rejects only that client's)."""

    async def go() -> list[str]:
        client = MilterClient(rspamd.address, reuse="always", max_idle=1)
        actions = []
        for ip in ("192.0.2.1", "198.51.100.7", "192.0.2.1"):
            envelope = MilterMessage("alice@example.org", ["bob@example.net"],
                                     client_address=ip, helo="client.example.org")
            actions.append((await client.check(envelope, message(b"hi"))).action)
        assert (client.connections, client.round_trips) == (1, 4)  # OPTNEG + 3 messages
        await client.close()
        return actions

    assert asyncio.run(go()) == ["accept", "reject", "accept"]


def test_rspamd_stopped_is_an_error_verdict(rspamd: RspamdServer) -> None:
    """Last of the rspamd tests (file order): it stops the module's rspamd."""
    assert asyncio.run(check_message(rspamd.address, ENVELOPE, message(b"hi"))).action in (
        "accept", "continue")
    rspamd.stop()
    verdict = asyncio.run(check_message(rspamd.address, ENVELOPE, message(b"hi")))
    assert verdict.action == "error" and verdict.step == "connect", verdict


# ------------------------------------------------------------------ filters written here

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_packet(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    (length,) = struct.unpack(">I", await reader.readexactly(4))
    data = await reader.readexactly(length)
    return data[:1], data[1:]


def reply(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + command + data


def filter_that(at_eom: list[bytes], *, wait: float = 0.0, protocol: int = 0,
                actions: int = m.OFFERED_ACTIONS) -> Handler:
    """A filter: negotiates ``protocol``, continues every step, at EOM sends ``at_eom``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                command, _ = await read_packet(reader)
                if command == b"O":
                    writer.write(reply(b"O", struct.pack(">III", 6, actions, protocol)))
                elif command == b"E":
                    if not at_eom:
                        break  # drop the connection instead of answering
                    await asyncio.sleep(wait)
                    writer.write(b"".join(at_eom))
                elif command in (b"Q", b"A"):
                    break
                elif command != b"D":
                    writer.write(reply(b"c"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return handle


async def run_with(handler: Handler, content: bytes = b"", envelope: MilterMessage = ENVELOPE,
                   **kw: float) -> MilterVerdict:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        return await check_message(f"inet:127.0.0.1:{port}", envelope,
                                   content or message(b"hello"), **kw)


def test_modifications_and_quarantine_are_returned() -> None:
    eom = [reply(b"h", b"X-Scan\0clean\0"), reply(b"i", struct.pack(">I", 0) + b"X-Top\0v\0"),
           reply(b"m", struct.pack(">I", 1) + b"Subject\0[SPAM] lunch\0"),
           reply(b"+", b"<carol@example.net>\0"), reply(b"-", b"<bob@example.net>\0"),
           reply(b"e", b"<bounce@example.org>\0"), reply(b"b", b"new body\r\n"),
           reply(b"p"), reply(b"q", b"looks odd\0"), reply(b"c")]
    verdict = asyncio.run(run_with(filter_that(eom)))
    assert verdict.action == "quarantine" and verdict.quarantine == "looks odd"
    assert verdict.modifications == (
        m.AddHeader("X-Scan", "clean"), m.InsertHeader(0, "X-Top", "v"),
        m.ChangeHeader(1, "Subject", "[SPAM] lunch"), m.AddRecipient("<carol@example.net>"),
        m.DeleteRecipient("<bob@example.net>"), m.ChangeSender("<bounce@example.org>"),
        m.ReplaceBody(b"new body\r\n"), m.Quarantine("looks odd"))


def test_replycode_tempfail() -> None:
    verdict = asyncio.run(run_with(filter_that([reply(b"y", b"451 4.7.1 Try later\0")])))
    assert (verdict.action, verdict.code, verdict.text) == ("tempfail", 451, "4.7.1 Try later")


def test_slow_filter_is_an_error_verdict_in_time() -> None:
    verdict = asyncio.run(run_with(filter_that([reply(b"c")], wait=5), timeout=0.3))
    assert verdict.action == "error" and verdict.reason == "timeout" and verdict.step == "eom"


def test_dropped_connection_and_malformed_packet_are_error_verdicts() -> None:
    dropped = asyncio.run(run_with(filter_that([])))  # closes at EOM without a reply
    assert dropped.action == "error" and dropped.step == "eom", dropped
    huge = asyncio.run(run_with(filter_that([struct.pack(">I", 10**9) + b"b"])))
    assert huge.action == "error" and "out of bounds" in huge.reason
    unasked = asyncio.run(run_with(filter_that([reply(b"h", b"X-A\0b\0"), reply(b"c")],
                                               actions=m.CHGHDRS)))
    assert unasked.action == "error" and "not negotiated" in unasked.reason


def test_skipped_steps_are_not_sent() -> None:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        flags = m.NOHELO | m.NOHDRS | m.NOBODY | m.NR_RCPT
        while (command := (await read_packet(reader))[0]) not in (b"Q", b"A"):
            seen.append(command)
            if command == b"O":
                writer.write(reply(b"O", struct.pack(">III", 6, 0, flags)))
            elif command == b"E":
                writer.write(reply(b"a"))
            elif command not in (b"D", b"R"):
                writer.write(reply(b"c"))
        writer.close()

    verdict = asyncio.run(run_with(handle))
    assert verdict.action == "accept"
    assert seen == [b"O", b"D", b"C", b"M", b"D", b"R", b"T", b"N", b"D", b"E"]  # {rcpt_addr}


def test_split_message_reads_headers_and_chunks_body() -> None:
    headers, body = split_message(b"A: 1\r\nB: two\r\n  folded\r\n\r\n" + b"x" * 70000)
    assert headers == [("A", "1"), ("B", "two\r\n  folded")]
    assert [len(c) for c in body] == [65535, 70000 - 65535]


def test_what_cannot_be_sent_is_an_error_verdict_not_an_exception() -> None:
    nul = MilterMessage("a\0b@example.org", ["bob@example.net"])
    verdict = asyncio.run(run_with(filter_that([reply(b"c")]), envelope=nul))
    assert verdict.action == "error" and "encode" in verdict.reason
    none = asyncio.run(check_message("inet:127.0.0.1:9", MilterMessage("a@b", []), b""))
    assert none.action == "error" and none.step == "rcpt"
    bad = asyncio.run(check_message("tcp:127.0.0.1:9", ENVELOPE, b""))
    assert bad.action == "error" and bad.step == "connect"


def test_unix_socket_address(tmp_path: Path) -> None:
    async def go() -> MilterVerdict:
        path = tmp_path / "milter.sock"
        server = await asyncio.start_unix_server(filter_that([reply(b"a")]), str(path))
        async with server:
            return await check_message(f"unix:{path}", ENVELOPE, message(b"hi"))

    assert asyncio.run(go()).action == "accept"


RSPAMD_LIKE = (m.NR_CONN | m.NR_HELO | m.NR_MAIL | m.NR_RCPT | m.NR_DATA | m.NR_UNKN | m.NR_HDR
               | m.NR_EOH | m.NR_BODY)  # rspamd answers only OPTNEG and end of message


def test_kept_connection_closed_by_the_filter_is_replaced_not_a_tempfail() -> None:
    """A filter that hangs up after each verdict (its idle timeout, a restart): the next
    message is asked again on a new connection, and the kept one is not counted against
    it; a filter that breaks on the retry too is still an error verdict."""
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (command := (await read_packet(reader))[0]) != b"E":
            if command == b"O":  # as rspamd: a reply to end of message only
                writer.write(reply(b"O", struct.pack(">III", 6, 0, RSPAMD_LIKE)))
        writer.write(reply(b"a"))
        await writer.drain()
        writer.close()  # right after its verdict, before any QUIT

    async def go(handler: Handler) -> tuple[list[str], int]:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            client = MilterClient(f"inet:127.0.0.1:{port}", reuse="always", max_idle=1)
            actions = []
            for _ in range(3):
                actions.append((await client.check(ENVELOPE, message(b"hi"))).action)
            await client.close()
            return actions, client.connections

    async def optneg_then_hang_up(reader: asyncio.StreamReader,
                                  writer: asyncio.StreamWriter) -> None:
        await read_packet(reader)
        writer.write(reply(b"O", struct.pack(">III", 6, 0, RSPAMD_LIKE)))
        await writer.drain()
        writer.close()

    assert asyncio.run(go(hang_up)) == (["accept"] * 3, 3)
    actions, _ = asyncio.run(go(optneg_then_hang_up))
    assert actions == ["error"] * 3
