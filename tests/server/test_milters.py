"""Content filters at the end of DATA, end to end: a real mailfort node, real SMTP clients,
and real filters on loopback: Debian's rspamd, a libmilter filter (tests/milterfilter.py),
ClamAV when it is installed, and small misbehaving filters written here over the codec.

Each verdict has its documented reply before the 250 and nothing is lost: a refused message is
not stored, an accepted one is stored exactly once, with what the filter changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email
import logging
import shutil
import smtplib
import socket
import ssl
import struct
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailfort import config as config_mod
from mailfort.config import MilterConfig
from mailfort.server.app import Node
from mailfort.store.maildir import maildir_for
from tests.audit.conftest import audit_content
from tests.conftest import make_config, seed_directory
from tests.milterfilter import FilterProcess
from tests.policy.test_milter_client import read_packet, reply
from tests.rspamdserver import RspamdServer

ALICE, BOB = "alice@example.test", "bob@example.test"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
RSPAMD_HEADERS = """\
use = ["x-spamd-result", "x-spam-status", "authentication-results"];
skip_local = false;
skip_authenticated = false;
"""
# rspamd's own actions on demand: its settings module by envelope sender
RSPAMD_SETTINGS = """\
header { priority = high; from = "header@remote.test";
         apply { actions { reject = 1000; "add header" = -100; } } }
subject { priority = high; from = "subject@remote.test";
          apply { actions { reject = 1000; "rewrite subject" = -100; } } }
"""
# rspamd's soft reject and greylist actions on demand: multimap rules on local files of
# envelope senders (a soft reject; 5 points: between the greylist (4) and add header (6)
# thresholds of Debian's actions.conf)
RSPAMD_MULTIMAP = """\
SOFT_MARKER { type = "from"; filter = "email:addr"; map = "${LOCAL_CONFDIR}/soft.map";
              prefilter = true; action = "soft reject"; message = "Busy, try again later"; }
GREY_MARKER { type = "from"; filter = "email:addr"; map = "${LOCAL_CONFDIR}/grey.map";
              score = 5.0; }
"""


def rspamd_markers(server: RspamdServer) -> None:
    (server.dir / "local.d" / "multimap.conf").write_text(RSPAMD_MULTIMAP)
    (server.dir / "soft.map").write_text("soft@remote.test\n")
    (server.dir / "grey.map").write_text("grey@remote.test\n")
NodeFactory = Callable[..., Any]


def letter(subject: str, body: str = "Shall we meet at noon?", extra: str = "",
           frm: str = "Carol <carol@remote.test>") -> bytes:
    return (f"From: {frm}\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{time.monotonic_ns()}@remote.test>\r\n"
            f"Date: Mon, 7 Dec 2026 17:00:00 +0000\r\n{extra}\r\n{body}\r\n").encode()


def send(port: int, data: bytes, rcpts: tuple[str, ...] = (ALICE,),
         sender: str = "carol@remote.test", login: str | None = None) -> tuple[int, str]:
    """One message; the reply to its data (the recipients must be accepted)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.remote.test")
        if login:
            s.login(login, "alice-pw")
        assert s.mail(sender)[0] == 250
        for r in rcpts:
            assert s.rcpt(r)[0] == 250, r
        code, text = s.data(data)
        return code, text.decode()


def inbox(node: Node, user: str = ALICE, folder: str = "") -> list[bytes]:
    box = maildir_for(node.cfg.mail_path, user) / folder / "new"
    return [p.read_bytes() for p in sorted(box.iterdir())] if box.exists() else []


def nothing_stored(node: Node) -> bool:
    """No message in any Maildir, no spool file left, nothing queued."""
    root = node.cfg.mail_path
    mail = [p for p in root.rglob("*") if p.is_file() and p.parent.name in ("new", "cur")]
    return not mail and not node.queue.ids() and not _spool_files(node)


def _spool_files(node: Node) -> list[Path]:
    spool = node.cfg.data_path / "spool"
    # an empty link record is a spent one kept for reuse (store/intents.py ``spend``)
    return [p for p in spool.rglob("*") if p.is_file()
            and not (p.name.endswith(".links") and not p.stat().st_size)] \
        if spool.exists() else []


def fields(raw: bytes, name: str) -> list[str]:
    return [" ".join(v.split()) for v in email.message_from_bytes(raw).get_all(name) or []]


@pytest.fixture
async def mailfort(tmp_path: Path, server_ssl_context: ssl.SSLContext
                   ) -> AsyncIterator[NodeFactory]:
    """``await mailfort(milter_entry, ..., limits={...})``: a started node with those
    ``[[milter]]`` entries (dicts), plaintext AUTH allowed on loopback for submission."""
    async with contextlib.AsyncExitStack() as stack:
        count = 0

        async def factory(*milters: dict[str, Any], **sections: dict[str, Any]) -> Node:
            nonlocal count
            count += 1
            server = {"allow_plaintext_auth_on_loopback": True, **sections.pop("server", {})}
            cfg = make_config(tmp_path / f"n{count}", server=server, **sections)
            cfg = config_mod.validate(dataclasses.replace(
                cfg, milter=[MilterConfig(**entry) for entry in milters]))
            seed_directory(cfg)
            return await stack.enter_async_context(Node(cfg, ssl_context=server_ssl_context))

        yield factory


# ------------------------------------------------------------------ rspamd

@pytest.fixture(scope="module")
def rspamd() -> Iterator[RspamdServer]:
    server = RspamdServer(RSPAMD_HEADERS)
    (server.dir / "local.d" / "settings.conf").write_text(RSPAMD_SETTINGS)
    rspamd_markers(server)
    try:
        yield server.start()
    finally:
        server.cleanup()


async def test_rspamd_gtube_is_refused_at_data_with_its_text(
        mailfort: NodeFactory, rspamd: RspamdServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailfort")
    node = await mailfort({"address": rspamd.address})
    code, text = await asyncio.to_thread(send, node.port("mx"), letter("hi", GTUBE))
    assert (code, text) == (550, "5.7.1 Gtube pattern")
    assert nothing_stored(node)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("milter [127.0.0.1] id=") and "action=reject" in line
               and f"filter={rspamd.address}" in line for line in lines), lines
    assert any(line.startswith("reject: DATA from [127.0.0.1]: 550 5.7.1 Gtube pattern")
               for line in lines)
    # submission too (outbound spam from a compromised account), by default
    code, text = await asyncio.to_thread(send, node.port("submission"),
                                         letter("hi", GTUBE, frm=ALICE), (BOB,), ALICE, ALICE)
    assert (code, text) == (550, "5.7.1 Gtube pattern") and nothing_stored(node)


async def test_the_audit_sees_rspamd_refuse_gtube(mailfort: NodeFactory, rspamd: RspamdServer,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``mailfort audit``'s content check against mailfort with rspamd: PASS, rspamd's text;
    only its control message (no GTUBE) stored, for the known user."""
    node = await mailfort({"address": rspamd.address})
    got = await audit_content(node, capsys)
    assert (got["status"], got["note_key"]) == ("PASS", "content.refused"), got
    assert "550 5.7.1 Gtube pattern" in got["result"]
    (raw,) = inbox(node)
    assert GTUBE.encode() not in raw and b"content filter control (no GTUBE)" in raw


async def test_rspamd_clean_message_is_stored_with_its_headers_and_one_result_of_ours(
        mailfort: NodeFactory, rspamd: RspamdServer) -> None:
    node = await mailfort({"address": rspamd.address})
    code, text = await asyncio.to_thread(send, node.port("mx"), letter("lunch"))
    assert code == 250, text
    (raw,) = inbox(node)
    assert fields(raw, "X-Spamd-Result") and fields(raw, "X-Spam-Status")
    results = fields(raw, "Authentication-Results")
    # rspamd wrote one under our authserv-id ({daemon_name}): dropped, ours kept
    assert len(results) == 1 and results[0].startswith("mx.example.test; spf="), results
    assert text.endswith(raw.split(b" id ", 1)[1].split(b"\r\n", 1)[0].decode())  # queue id


async def test_rspamd_add_header_and_rewrite_subject(mailfort: NodeFactory,
                                                     rspamd: RspamdServer) -> None:
    node = await mailfort({"address": rspamd.address})
    for sender in ("header@remote.test", "subject@remote.test"):
        code, _ = await asyncio.to_thread(send, node.port("mx"), letter("lunch"), (ALICE,),
                                          sender)
        assert code == 250
    marked, rewritten = sorted(inbox(node), key=lambda raw: b"*** SPAM ***" in raw)
    assert fields(marked, "X-Spam") == ["Yes"] and fields(marked, "Subject") == ["lunch"]
    assert fields(rewritten, "Subject") == ["*** SPAM *** lunch"]
    for raw in (marked, rewritten):  # rspamd's result under our name dropped: one, ours
        ours = [r for r in fields(raw, "Authentication-Results")
                if r.startswith("mx.example.test;")]
        assert len(ours) == 1 and "spf=" in ours[0], ours
        assert len(fields(raw, "X-Spam")) <= 1


async def test_rspamd_soft_reject_is_451_and_nothing_stored(mailfort: NodeFactory,
                                                              rspamd: RspamdServer) -> None:
    node = await mailfort({"address": rspamd.address, "reuse": "always"})
    code, text = await asyncio.to_thread(send, node.port("mx"), letter("lunch"), (ALICE,),
                                         "soft@remote.test")
    assert (code, text) == (451, "4.7.1 Busy, try again later")
    assert nothing_stored(node)
    # the same kept connection then carries the next client's message as usual
    assert (await asyncio.to_thread(send, node.port("mx"), letter("lunch")))[0] == 250
    assert node.milters is not None and node.milters.clients[0].connections == 1


def test_rspamd_greylisting_is_451_then_stored_on_retry(tmp_path: Path) -> None:
    """rspamd's greylist module (its records in a Redis of the test's own; the "greylist"
    action for one envelope sender, by a multimap score): the first try of a message is
    451 4.7.1 with rspamd's text, nothing stored; once the greylist delay is over, the same
    message is stored. Without the module (no Redis) the "greylist" action is an accept in rspamd's
    milter mode: greylisting is that module's work (test_rspamd_greylist_action_alone)."""
    from tests.redisserver import RedisServer

    redis = RedisServer().start()
    server = RspamdServer(RSPAMD_HEADERS)
    (server.dir / "local.d" / "greylist.conf").write_text(
        f'servers = "127.0.0.1:{redis.port}";\ncheck_local = true;\ntimeout = 1s;\n')
    rspamd_markers(server)
    try:
        server.start()

        async def go() -> None:
            cfg = make_config(tmp_path / "node")
            cfg = config_mod.validate(dataclasses.replace(
                cfg, milter=[MilterConfig(address=server.address, reuse="always")]))
            seed_directory(cfg)
            async with Node(cfg) as node:
                data, grey = letter("lunch"), (ALICE,)
                first = await asyncio.to_thread(send, node.port("mx"), data, grey,
                                                "grey@remote.test")
                assert first == (451, "4.7.1 Try again later") and nothing_stored(node)
                await asyncio.sleep(1.5)  # the greylist timeout is over
                again = await asyncio.to_thread(send, node.port("mx"), data, grey,
                                                "grey@remote.test")
                assert again[0] == 250
                assert len(inbox(node)) == 1

        asyncio.run(go())
    finally:
        server.cleanup()
        redis.cleanup()


async def test_rspamd_greylist_action_alone_is_stored(mailfort: NodeFactory,
                                                       rspamd: RspamdServer) -> None:
    node = await mailfort({"address": rspamd.address})
    code, _ = await asyncio.to_thread(send, node.port("mx"), letter("lunch"), (ALICE,),
                                      "grey@remote.test")
    assert code == 250 and len(inbox(node)) == 1


async def test_rspamd_stopped_tempfails_by_default_or_accepts_when_configured(
        mailfort: NodeFactory, rspamd: RspamdServer) -> None:
    """Last of the rspamd tests (file order): it stops the module's rspamd."""
    strict = await mailfort({"address": rspamd.address})
    lax = await mailfort({"address": rspamd.address, "on_error": "accept"})
    rspamd.stop()
    code, text = await asyncio.to_thread(send, strict.port("mx"), letter("lunch"))
    assert code == 451 and text.startswith("4.7.1"), text
    assert nothing_stored(strict)
    code, _ = await asyncio.to_thread(send, lax.port("mx"), letter("lunch"))
    assert code == 250 and len(inbox(lax)) == 1


# ------------------------------------------------------------------ a libmilter filter

@pytest.fixture(scope="module")
def libmilter() -> Iterator[FilterProcess]:
    proc = FilterProcess().start()
    try:
        yield proc
    finally:
        proc.stop()


async def test_header_and_body_changes(mailfort: NodeFactory,
                                       libmilter: FilterProcess) -> None:
    node = await mailfort({"address": libmilter.address})
    data = letter("milter: headers,body", extra="X-Remove-Me: yes\r\n")
    assert (await asyncio.to_thread(send, node.port("mx"), data))[0] == 250
    (raw,) = inbox(node)
    head, _, body = raw.partition(b"\r\n\r\n")
    names = [line.split(b":")[0] for line in head.split(b"\r\n") if line[:1] not in b" \t"]
    assert names[:3] == [b"Return-Path", b"Received", b"X-Top"]  # ours stays on top
    assert fields(raw, "X-Filter") == ["seen"] and not fields(raw, "X-Remove-Me")
    assert fields(raw, "Subject") == ["[filtered] milter: headers,body"]
    results = fields(raw, "Authentication-Results")
    assert len(results) == 2 and results[0].startswith("mx.example.test; spf="), results
    assert results[1] == "filter.example; spf=pass"  # another authserv-id: kept
    assert body == b"The filter replaced this body.\r\n"


async def test_recipient_changes_pass_the_recipient_policy(
        mailfort: NodeFactory, libmilter: FilterProcess,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailfort")
    node = await mailfort({"address": libmilter.address})
    code, _ = await asyncio.to_thread(send, node.port("mx"), letter("milter: rcpt,sender"))
    assert code == 250
    assert inbox(node, ALICE) == []  # deleted
    (raw,) = inbox(node, BOB)  # added
    assert raw.startswith(b"Return-Path: <bounces@example.test>\r\nReceived: ")
    # the outsider it added is refused as at RCPT: the MX relays for no filter
    assert node.queue.ids() == []
    assert any("reject: MILTER from [127.0.0.1]: 554 5.7.1" in r.getMessage()
               and "to=<victim@elsewhere.test>" in r.getMessage() for r in caplog.records)


async def test_quarantine_files_into_junk(mailfort: NodeFactory,
                                          libmilter: FilterProcess) -> None:
    node = await mailfort({"address": libmilter.address})
    assert (await asyncio.to_thread(send, node.port("mx"), letter("milter: quarantine")))[0] \
        == 250
    assert inbox(node) == []
    (raw,) = inbox(node, folder=".Junk")
    assert fields(raw, "X-Quarantine") == ["milter; looks like a phish"]
    # submission has no hold queue: held mail for outside is refused, not sent
    code, text = await asyncio.to_thread(send, node.port("submission"),
                                         letter("milter: quarantine", frm=ALICE),
                                         ("dave@remote.test",), ALICE, ALICE)
    assert (code, text) == (550, "5.7.1 Message held by content filter: looks like a phish")
    assert node.queue.ids() == [] and len(inbox(node, folder=".Junk")) == 1


async def test_tempfail_reject_and_discard(mailfort: NodeFactory, libmilter: FilterProcess,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailfort")
    node = await mailfort({"address": libmilter.address})
    port = node.port("mx")
    assert await asyncio.to_thread(send, port, letter("milter: tempfail")) == (
        451, "4.7.1 Busy scanning, come back later")
    assert await asyncio.to_thread(send, port, letter("milter: reject")) == (
        550, "5.7.1 Refused by the test filter second line")  # one printable line
    code, text = await asyncio.to_thread(send, port, letter("milter: discard"))
    assert code == 250 and text.startswith("2.0.0 OK queued as ")
    assert nothing_stored(node)
    assert any("action=discard" in r.getMessage() for r in caplog.records)


async def test_macros_as_postfix_sends_them(mailfort: NodeFactory,
                                            libmilter: FilterProcess) -> None:
    node = await mailfort({"address": libmilter.address, "services": ["submission"]})
    code, text = await asyncio.to_thread(send, node.port("submission"),
                                         letter("milter: macros", frm=ALICE), (BOB,), ALICE, ALICE)
    assert code == 250, text
    (raw,) = inbox(node, BOB)
    (macros,) = fields(raw, "X-Macros")
    queue_id = text.rsplit(" ", 1)[1]
    for expected in ("j=mx.example.test", "{client_addr}=127.0.0.1", f"i={queue_id}",
                     "{auth_authen}=alice@example.test", "{mail_addr}=alice@example.test",
                     f"rcpts=<{BOB}>={BOB}", "hostname=[127.0.0.1]"):
        assert expected in macros, (expected, macros)
    # services: not on the MX
    assert (await asyncio.to_thread(send, node.port("mx"), letter("milter: reject")))[0] == 250


async def test_slow_filter_gets_on_error(mailfort: NodeFactory,
                                         libmilter: FilterProcess) -> None:
    slow = {"address": libmilter.address, "command_timeout": 0.5}
    strict = await mailfort(slow)
    lax = await mailfort({**slow, "on_error": "accept"})
    began = time.monotonic()
    code, text = await asyncio.to_thread(send, strict.port("mx"), letter("milter: slow,reject"))
    assert (code, text) == (451, "4.7.1 Content filter unavailable, try again later")
    assert time.monotonic() - began < 2.5 and nothing_stored(strict)
    code, _ = await asyncio.to_thread(send, lax.port("mx"), letter("milter: slow,reject"))
    assert code == 250 and len(inbox(lax)) == 1  # unfiltered: the operator chose it


@contextlib.asynccontextmanager
async def counting_proxy(upstream: int, commands: list[list[bytes]]) -> AsyncIterator[str]:
    """A TCP relay to the filter on ``upstream`` that reads the MTA's packets on the way:
    ``commands`` gets one list of command bytes per connection, however the bytes were cut
    into segments (an honest count of connections and packets, not of writes)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen: list[bytes] = []
        commands.append(seen)
        up_r, up_w = await asyncio.open_connection("127.0.0.1", upstream)

        async def back() -> None:
            while data := await up_r.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        task = asyncio.create_task(back())
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                command, data = await read_packet(reader)
                seen.append(command)
                up_w.write(struct.pack(">I", len(data) + 1) + command + data)
                await up_w.drain()
        up_w.close()
        await asyncio.gather(task, return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"inet:127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_no_reply_filter_one_connection_one_write_one_round_trip_per_message(
        mailfort: NodeFactory) -> None:
    """A filter that answers only at end of message (as rspamd): its connection is kept
    for the next SMTP client (QUIT_NC, then CONNECT: no new OPTNEG), the steps it skips are
    not sent, and each message is one write and one wait for its verdict."""
    noreply = FilterProcess("noreply").start()
    commands: list[list[bytes]] = []
    try:
        async with counting_proxy(noreply.port, commands) as address:
            node = await mailfort({"address": address})
            for n in range(3):  # three SMTP sessions, one message each (as the benchmark)
                code, _ = await asyncio.to_thread(send, node.port("mx"), letter(f"m{n}"))
                assert code == 250
    finally:
        noreply.stop()
    assert len(commands) == 1, commands  # one TCP connection to the filter
    packets = commands[0]
    assert packets.count(b"O") == 1 and packets.count(b"K") == 2
    assert packets.count(b"C") == packets.count(b"E") == 3
    assert not {b"H", b"T", b"N", b"B"} & set(packets)  # negotiated away: not sent
    stored = sorted(fields(raw, "X-Seen-By")[0] for raw in inbox(node))
    assert stored == [f"noreply-filter; subject=m{n}; client=127.0.0.1" for n in range(3)]
    # the writes and waits of the client itself: OPTNEG, then one of each per message
    assert node.milters is not None
    client = node.milters.clients[0]
    assert (client.connections, client.writes, client.round_trips) == (1, 4, 4)


# ------------------------------------------------------------------ misbehaving filters

@contextlib.asynccontextmanager
async def raw_filter(at: bytes, then: Callable[[asyncio.StreamWriter], Any] | None = None,
                     wait: float = 0.0, seen: list[bytes] | None = None) -> AsyncIterator[str]:
    """A filter that negotiates everything, continues each step, and at command ``at``
    waits ``wait`` seconds, then does ``then`` (None: closes the connection); the header
    packets it gets go into ``seen``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                command, data = await read_packet(reader)
                if command == b"L" and seen is not None:
                    seen.append(data)
                if command == b"O":
                    writer.write(reply(b"O", struct.pack(">III", 6, 0x1FF, 0)))
                elif command == at:
                    await asyncio.sleep(wait)
                    if then is None:
                        break
                    then(writer)
                elif command in (b"Q", b"A"):
                    break
                elif command != b"D":
                    writer.write(reply(b"c"))
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"inet:127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_dropped_connection_mid_message(mailfort: NodeFactory) -> None:
    async with raw_filter(b"B") as address:  # closes when the body comes
        strict = await mailfort({"address": address})
        lax = await mailfort({"address": address, "on_error": "accept"})
        assert (await asyncio.to_thread(send, strict.port("mx"), letter("x")))[0] == 451
        assert nothing_stored(strict)
        assert (await asyncio.to_thread(send, lax.port("mx"), letter("x")))[0] == 250
        assert len(inbox(lax)) == 1


async def test_malformed_packet(mailfort: NodeFactory) -> None:
    def garbage(writer: asyncio.StreamWriter) -> None:
        writer.write(reply(b"h", b"X-Bad\0line\r\nInjected: yes\0") + reply(b"c"))

    async with raw_filter(b"E", garbage) as address:
        node = await mailfort({"address": address})
        code, text = await asyncio.to_thread(send, node.port("mx"), letter("x"))
        assert (code, text[:5]) == (451, "4.7.1") and nothing_stored(node)


async def test_connections_are_bounded_per_node(mailfort: NodeFactory) -> None:
    seen: list[bytes] = []
    async with raw_filter(b"E", lambda w: w.write(reply(b"c")), wait=1.5,
                          seen=seen) as address:
        node = await mailfort({"address": address},
                              limits={"max_milter_connections": 1, "milter_wait": 0.2})
        port = node.port("mx")
        first = asyncio.create_task(asyncio.to_thread(send, port, letter("first")))
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:  # the first holds the connection
            await asyncio.sleep(0.02)
        assert inbox(node) == []  # and is not stored before its filter has said yes
        second = await asyncio.to_thread(send, port, letter("second"))
        assert second == (451, "4.7.1 Content filter unavailable, try again later")
        assert (await first)[0] == 250 and len(inbox(node)) == 1


async def test_filters_run_in_order_each_seeing_what_the_last_changed(
        mailfort: NodeFactory, libmilter: FilterProcess) -> None:
    seen: list[bytes] = []
    async with raw_filter(b"E", lambda w: w.write(reply(b"a")), seen=seen) as address:
        node = await mailfort({"address": libmilter.address}, {"address": address})
        assert (await asyncio.to_thread(send, node.port("mx"), letter("milter: headers")))[0] \
            == 250
    assert seen[0].startswith(b"Received\0from client.remote.test ([127.0.0.1])")
    assert b"X-Filter\0seen\0" in seen
    assert b"Subject\0[filtered] milter: headers\0" in seen


async def test_bdat_end_is_filtered_too(mailfort: NodeFactory,
                                        libmilter: FilterProcess) -> None:
    node = await mailfort({"address": libmilter.address})
    data = letter("milter: reject")

    def bdat() -> bytes:
        with socket.create_connection(("127.0.0.1", node.port("mx")), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO client.remote.test\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            s.sendall(f"MAIL FROM:<c@remote.test>\r\nRCPT TO:<{ALICE}>\r\n".encode())
            f.readline(), f.readline()
            s.sendall(f"BDAT {len(data)} LAST\r\n".encode() + data)
            return f.readline()

    assert (await asyncio.to_thread(bdat)).startswith(b"550 5.7.1 Refused by the test filter")
    assert nothing_stored(node)


# ------------------------------------------------------------------ ClamAV

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


@pytest.fixture(scope="module")
def clamav() -> Iterator[str]:
    """clamd with a signature database of our own (sigtool: the MD5 of the EICAR file; no
    network update), and clamav-milter rejecting what it finds; the milter's address."""
    tools = [shutil.which(t) for t in ("clamd", "clamav-milter", "sigtool")]
    if None in tools:
        pytest.skip("ClamAV not installed (Debian clamav-daemon, clamav-milter; run-tests "
                    "installs them as root)")
    clamd, milter, sigtool = (str(t) for t in tools)
    work = Path(tempfile.mkdtemp(prefix="mailfort-clamav-"))
    (work / "db").mkdir()
    (work / "eicar.com").write_bytes(EICAR)
    sig = subprocess.run([sigtool, "--md5", str(work / "eicar.com")], capture_output=True,
                         check=True, cwd=work).stdout
    (work / "db" / "test.hdb").write_bytes(sig)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    user = "User root\n" if _is_root() else ""
    (work / "clamd.conf").write_text(
        f"Foreground yes\nDatabaseDirectory {work / 'db'}\nLocalSocket {work / 'clamd.sock'}\n"
        f"LogFile {work / 'clamd.log'}\nPidFile {work / 'clamd.pid'}\n{user}")
    (work / "milter.conf").write_text(
        f"Foreground yes\nMilterSocket inet:{port}@127.0.0.1\n"
        f"ClamdSocket unix:{work / 'clamd.sock'}\nOnInfected Reject\nOnFail Defer\n"
        f"LogFile {work / 'milter.log'}\nPidFile {work / 'milter.pid'}\n{user}"
        f"TemporaryDirectory {work}\n")
    procs = [subprocess.Popen([clamd, "-c", str(work / "clamd.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        _wait_for(lambda: (work / "clamd.sock").exists(), "clamd", work / "clamd.log")
        procs.append(subprocess.Popen([milter, "-c", str(work / "milter.conf")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for(lambda: _listening(port), "clamav-milter", work / "milter.log")
        yield f"inet:127.0.0.1:{port}"
    finally:
        for proc in procs:  # test processes, their state thrown away: no slow shutdown
            proc.kill()
            proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def _is_root() -> bool:
    import os

    return os.geteuid() == 0


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def _wait_for(ready: Callable[[], bool], what: str, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
    pytest.skip(f"{what} did not start within 20 s here: {tail}")


async def test_clamav_rejects_eicar_at_data(mailfort: NodeFactory, clamav: str) -> None:
    node = await mailfort({"address": clamav})
    import base64

    attachment = base64.b64encode(EICAR).decode()
    body = ("--b1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--b1\r\n"
            "Content-Type: application/octet-stream; name=eicar.com\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n" + attachment + "\r\n--b1--")
    extra = 'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n'
    code, text = await asyncio.to_thread(send, node.port("mx"),
                                         letter("invoice", body, extra))
    assert code == 550 and text.startswith("5.7.1"), text
    assert nothing_stored(node)
    assert (await asyncio.to_thread(send, node.port("mx"), letter("clean")))[0] == 250


def test_added_fields_only_keep_the_header_block_whole(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """rspamd's usual verdict (fields added at the end): the new spool is built without
    splitting the header section into fields, and holds the same octets as the general path
    (a field inserted at the end); a claimed Authentication-Results is still dropped."""
    from mailfort.protocol import milter as m
    from mailfort.server.milters import _rewrite
    from mailfort.store.maildir import Committer

    committer = Committer(tmp_path, use_syncfs=False)
    try:
        trace = (b"Return-Path: <a@example.org>\r\n"
                 b"Received: from c ([192.0.2.1])\r\n\tby mx.example.test; id 1\r\n")
        message = (b"From: a@example.org\r\nSubject: hi\r\n folded\r\n\r\nbody\r\n.x\r\n")
        spool = committer.new_spool()
        spool.write(trace + message)
        added = (m.AddHeader("X-Spamd-Result", "default: False;\n\tA(0.00)[]"),
                 m.AddHeader("Authentication-Results", "mx.example.test; spf=pass"))
        notes: list[str] = []

        def split(block: bytes) -> list[bytes]:
            raise AssertionError("the header section was split into fields")

        monkeypatch.setattr("mailfort.server.milters._fields", split)
        fast, fast_trace = _rewrite(committer, spool, trace, added, "a@example.org",
                                    "mx.example.test", notes)
        monkeypatch.undo()
        general, general_trace = _rewrite(
            committer, spool, trace, (*added, m.InsertHeader(999, "X-Last", "1")),
            "a@example.org", "mx.example.test", [])
        got, other = b"".join(fast.chunks()), b"".join(general.chunks())
        assert got == (trace + b"From: a@example.org\r\nSubject: hi\r\n folded\r\n"
                       b"X-Spamd-Result: default: False;\r\n\tA(0.00)[]\r\n"
                       b"\r\nbody\r\n.x\r\n")
        assert other == got.replace(b"[]\r\n\r\n", b"[]\r\nX-Last: 1\r\n\r\n")
        assert fast_trace == general_trace == trace
        assert notes == ["Authentication-Results claiming mx.example.test from a filter dropped"]
        for s in (spool, fast, general):
            s.discard()
    finally:
        committer.stop()
