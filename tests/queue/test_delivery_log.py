"""The delivery log: one line per recipient per attempt, one per DSN sent, one per entry
removed, each read by the regular expressions a fail2ban filter or a log summariser
would use (README, "Delivery log lines"). Real loopback receivers (tests/delivery/
receiver.py) and the loopback DNS server; nothing is mocked."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mailfort.queue.store import Queue
from mailfort.queue.worker import DeliveryWorker
from tests.delivery.conftest import ConfigFactory, ReceiverFactory
from tests.delivery.worker_helpers import wait_for
from tests.dnsserver import DNSServer
from tests.queue.conftest import LocalSink

MSG = b"From: alice@example.test\r\nSubject: log\r\n\r\nbody\r\n"
ID = r"[0-9A-Za-z]{8,64}"

# The line shapes, written as a fail2ban filter would (anchored, one named group each).
ATTEMPT = re.compile(
    rf"^queue (?P<id>{ID}): to=<(?P<to>[^>]*)>, "
    r"relay=(?P<relay>none|(?P<host>[^\s\[]+)\[(?P<ip>[0-9a-fA-F.:]+)\]:(?P<port>\d+)), "
    r"delay=(?P<delay>\d+(?:\.\d+)?), "
    r"delays=(?P<a>\d+(?:\.\d+)?)/(?P<b>\d+(?:\.\d+)?)/(?P<c>\d+(?:\.\d+)?)/"
    r"(?P<d>\d+(?:\.\d+)?), "
    r"tls=(?P<tls>none|not-verified|verified\((?:dane|mta-sts|policy)\)), "
    r"dsn=(?P<dsn>[245]\.\d{1,3}\.\d{1,3}), "
    r"status=(?P<status>sent|deferred|bounced|expired) \((?P<text>.*)\)$")
NOTICE = re.compile(
    rf"^queue (?P<id>{ID}): sender (?P<kind>non-delivery|delay|forward failure) "
    rf"notification: (?P<dsn_id>{ID}) to=<(?P<to>[^>]*)>, recipients=(?P<n>\d+)$")
REMOVED = re.compile(rf"^queue (?P<id>{ID}): removed \((?P<why>[^)]*)\)$")

FAST = {"connect_timeout": 0.5, "command_timeout": 1.0, "max_lifetime": 0.4,
        "initial_retry": 0.05, "max_retry": 0.1}


@pytest.fixture
async def started() -> AsyncIterator[list[DeliveryWorker]]:
    workers: list[DeliveryWorker] = []
    yield workers
    for w in workers:
        await w.stop()


async def start(cfg: Any, sink: LocalSink, workers: list[DeliveryWorker]) -> DeliveryWorker:
    w = DeliveryWorker(Queue(cfg.data_path / "queue"), cfg, sink)
    await w.start()
    workers.append(w)
    return w


def lines(caplog: pytest.LogCaptureFixture, pattern: re.Pattern[str],
          ident: str) -> list[re.Match[str]]:
    found = [pattern.match(r.getMessage()) for r in caplog.records]
    return [m for m in found if m is not None and m.group("id") == ident]


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then closed): connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_sent_line_names_relay_tls_and_the_remote_reply(
    outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
    sink: LocalSink, started: list[DeliveryWorker], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "mailfort.queue")
    good = await receivers(data_replies=["250 2.0.0 Ok: queued as R1"])
    dns_server.add_a("mx.good.test", "127.0.0.1")
    cfg = outbound_config(queue=FAST,
                          routes={"good.test": {"host": "mx.good.test", "port": good.port}})
    w = await start(cfg, sink, started)
    ident = w.queue.enqueue_bytes(MSG, "alice@example.test", ["bob@good.test"],
                                  "alice@example.test")
    w.wake()
    await wait_for(lambda: bool(lines(caplog, REMOVED, ident)))
    (m,) = lines(caplog, ATTEMPT, ident)
    assert m["to"] == "bob@good.test" and m["status"] == "sent" and m["dsn"] == "2.0.0"
    assert (m["host"], m["ip"], m["port"]) == ("mx.good.test", "127.0.0.1", str(good.port))
    assert m["tls"] == "none"  # the receiver offers no STARTTLS here
    assert m["text"] == "250 2.0.0 Ok: queued as R1"
    parts = sum(float(m[k]) for k in "abcd")
    assert abs(parts - float(m["delay"])) < 0.05, "delay is the sum of its parts"
    assert lines(caplog, REMOVED, ident)[0]["why"] == "1 sent"


async def test_refused_connection_says_why_then_expires_bounces_and_is_removed(
    outbound_config: ConfigFactory, dns_server: DNSServer, sink: LocalSink,
    started: list[DeliveryWorker], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "mailfort.queue")
    port = closed_port()
    dns_server.add_a("mx.dead.test", "127.0.0.1")
    cfg = outbound_config(queue=FAST,
                          routes={"dead.test": {"host": "mx.dead.test", "port": port}})
    w = await start(cfg, sink, started)
    ident = w.queue.enqueue_bytes(MSG, "alice@example.test", ["carol@dead.test"],
                                  "alice@example.test")
    w.wake()
    await wait_for(lambda: bool(lines(caplog, REMOVED, ident)))
    attempts = lines(caplog, ATTEMPT, ident)
    assert [m["status"] for m in attempts][-1] == "expired"
    assert {m["status"] for m in attempts[:-1]} == {"deferred"}
    first = attempts[0]
    assert first["relay"] == "none" and first["tls"] == "none" and first["dsn"] == "4.4.1"
    assert first["text"] == f"connect to mx.dead.test[127.0.0.1]:{port}: Connection refused"
    assert attempts[-1]["dsn"] == "4.4.7"
    (notice,) = lines(caplog, NOTICE, ident)
    assert notice["kind"] == "non-delivery" and notice["to"] == "alice@example.test"
    assert notice["dsn_id"] != ident and ident in notice["dsn_id"]
    assert lines(caplog, REMOVED, ident)[0]["why"] == "1 expired"
    # The bounce has the same reason as the log.
    assert b"Connection refused" in sink.delivered[0][1]


async def test_failed_mx_lookup_is_logged_for_each_recipient(
    outbound_config: ConfigFactory, dns_server: DNSServer, sink: LocalSink,
    started: list[DeliveryWorker], caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: a failed MX lookup left no line at all."""
    caplog.set_level(logging.INFO, "mailfort.queue")
    dns_server.servfail("nowhere.test")
    cfg = outbound_config(queue=FAST | {"max_lifetime": 30.0}, dns={"timeout": 0.3})
    w = await start(cfg, sink, started)
    ident = w.queue.enqueue_bytes(MSG, "alice@example.test",
                                  ["a@nowhere.test", "b@nowhere.test"], "alice@example.test")
    w.wake()
    await wait_for(lambda: len(lines(caplog, ATTEMPT, ident)) >= 2)
    got = lines(caplog, ATTEMPT, ident)[:2]
    assert sorted(m["to"] for m in got) == ["a@nowhere.test", "b@nowhere.test"]
    for m in got:
        assert m["relay"] == "none" and m["status"] == "deferred"
        assert m["dsn"].startswith("4.") and "nowhere.test" in m["text"]


async def test_rejected_recipient_is_bounced_with_the_remote_reply_and_notice(
    outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
    sink: LocalSink, started: list[DeliveryWorker], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "mailfort.queue")
    rx = await receivers(rcpt_replies={"gone@bad.test": ["550 5.1.1 no such user"]})
    dns_server.add_a("mx.bad.test", "127.0.0.1")
    cfg = outbound_config(queue=FAST,
                          routes={"bad.test": {"host": "mx.bad.test", "port": rx.port}})
    w = await start(cfg, sink, started)
    ident = w.queue.enqueue_bytes(MSG, "alice@example.test",
                                  ["gone@bad.test", "ok@bad.test"], "alice@example.test")
    w.wake()
    await wait_for(lambda: bool(lines(caplog, REMOVED, ident)))
    by_rcpt = {m["to"]: m for m in lines(caplog, ATTEMPT, ident)}
    assert by_rcpt["ok@bad.test"]["status"] == "sent"
    gone = by_rcpt["gone@bad.test"]
    assert gone["status"] == "bounced" and gone["dsn"] == "5.1.1"
    assert gone["relay"] == f"mx.bad.test[127.0.0.1]:{rx.port}"
    assert gone["text"].startswith("550 5.1.1 no such user")
    (notice,) = lines(caplog, NOTICE, ident)
    assert notice["kind"] == "non-delivery" and notice["n"] == "1"
    assert lines(caplog, REMOVED, ident)[0]["why"] == "1 sent, 1 bounced"


async def test_an_entry_deleted_by_the_operator_is_logged_as_removed(
    outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
    sink: LocalSink, started: list[DeliveryWorker], caplog: pytest.LogCaptureFixture,
) -> None:
    from mailfort.queue.admin import queue_delete, queue_root

    caplog.set_level(logging.INFO, "mailfort.queue")
    rx = await receivers(data_replies=["451 4.3.0 later"] * 10)
    dns_server.add_a("mx.slow.test", "127.0.0.1")
    cfg = outbound_config(queue=FAST | {"initial_retry": 600.0, "max_lifetime": 3600.0},
                          routes={"slow.test": {"host": "mx.slow.test", "port": rx.port}})
    w = await start(cfg, sink, started)
    ident = w.queue.enqueue_bytes(MSG, "alice@example.test", ["x@slow.test"], None)
    w.wake()
    await wait_for(lambda: bool(lines(caplog, ATTEMPT, ident)))
    (m,) = lines(caplog, ATTEMPT, ident)
    assert m["status"] == "deferred" and m["text"].startswith("451 4.3.0 later")
    assert queue_delete(queue_root(cfg), ident) == f"{ident}: deleted"
    w.rescan()
    await wait_for(lambda: bool(lines(caplog, REMOVED, ident)))
    assert lines(caplog, REMOVED, ident)[0]["why"] == "deleted by the operator"


def readme_regex() -> re.Pattern[str]:
    """The attempt-line regex the README gives operators."""
    text = (Path(__file__).parents[2] / "README.md").read_text()
    block = text.split("A fail2ban-style regex reads every attempt line", 1)[1]
    return re.compile(block.split("```text\n", 1)[1].split("\n```", 1)[0])


async def test_the_readme_regex_reads_the_attempt_lines(
    outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
    sink: LocalSink, started: list[DeliveryWorker], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "mailfort.queue")
    rx = await receivers(rcpt_replies={"gone@mixed.test": ["550 5.1.1 no such user"]})
    dns_server.add_a("mx.mixed.test", "127.0.0.1")
    dns_server.servfail("nowhere.test")
    cfg = outbound_config(queue=FAST, dns={"timeout": 0.3},
                          routes={"mixed.test": {"host": "mx.mixed.test", "port": rx.port}})
    w = await start(cfg, sink, started)
    ident = w.queue.enqueue_bytes(MSG, "alice@example.test",
                                  ["ok@mixed.test", "gone@mixed.test", "x@nowhere.test"],
                                  "alice@example.test")
    w.wake()
    await wait_for(lambda: bool(lines(caplog, REMOVED, ident)))
    attempts = [r.getMessage() for r in caplog.records
                if r.getMessage().startswith(f"queue {ident}: to=")]
    pattern = readme_regex()
    assert all(pattern.match(x) for x in attempts), attempts
    assert {pattern.match(x)["status"] for x in attempts} == \
        {"sent", "bounced", "deferred", "expired"}


async def test_a_delay_warning_is_one_line_with_its_own_id(
    outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
    sink: LocalSink, started: list[DeliveryWorker], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "mailfort.queue")
    rx = await receivers(data_replies=["451 4.3.0 later"] * 100)
    dns_server.add_a("mx.slow.test", "127.0.0.1")
    cfg = outbound_config(queue=FAST | {"max_lifetime": 3600.0, "delay_warning_after": 0.2},
                          routes={"slow.test": {"host": "mx.slow.test", "port": rx.port}})
    w = await start(cfg, sink, started)
    ident = w.queue.enqueue_bytes(MSG, "alice@example.test", ["x@slow.test"],
                                  "alice@example.test")
    w.wake()
    await wait_for(lambda: bool(lines(caplog, NOTICE, ident)))
    (notice,) = lines(caplog, NOTICE, ident)
    assert notice["kind"] == "delay" and notice["dsn_id"] == f"B{ident}N0"
    assert notice["to"] == "alice@example.test" and notice["n"] == "1"
    assert sink.delivered and sink.delivered[0][0] == "alice@example.test"
