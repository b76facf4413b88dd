"""Delivery under the faults of real networks: every one ends deferred-then-bounced or
bounced, the worker lives on, and the other destinations keep flowing meanwhile.

The remotes are real loopback SMTP servers (tests/delivery/receiver.py) misbehaving in one
way each, and DNS is the real loopback test server answering SERVFAIL or nothing at all.
Timeouts and lifetimes are shortened through the config, as an operator would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mailfort.queue.store import Queue
from mailfort.queue.worker import DeliveryWorker
from tests.delivery.conftest import ConfigFactory, ReceiverFactory
from tests.dnsserver import DNSServer
from tests.queue.conftest import LocalSink
from tests.queue.test_worker import dsn_fields, wait_for

MSG = b"From: alice@example.test\r\nSubject: fault\r\n\r\nbody\r\n"
FAST = {"connect_timeout": 0.3, "command_timeout": 0.3, "max_lifetime": 1.0,
        "initial_retry": 0.05, "max_retry": 0.2}

# fault -> (receiver behaviour, or a DNS fault; the status the submitter is told)
FAULTS: dict[str, tuple[dict[str, Any] | str, str]] = {
    "accepts-and-never-answers": ({"stall_at": "BANNER"}, "4.4.7"),
    "stops-answering-after-ehlo": ({"stall_at": "MAIL"}, "4.4.7"),
    "drops-mid-data": ({"drop_in_data": True}, "4.4.7"),
    "421-forever": ({"banner": "421 4.3.2 not now"}, "4.4.7"),
    "451-forever": ({"data_replies": ["451 4.3.0 later"] * 1000}, "4.4.7"),
    "550": ({"rcpt_replies": {"bob@bad.test": ["550 5.1.1 no such user"] * 1000}}, "5.1.1"),
    "dns-timeout": ("timeout", "4.4.7"),
    "dns-servfail": ("servfail", "4.4.7"),
}


@pytest.fixture
async def started() -> AsyncIterator[list[DeliveryWorker]]:
    workers: list[DeliveryWorker] = []
    yield workers
    for w in workers:
        await w.stop()


async def start_worker(cfg: Any, sink: LocalSink, workers: list[DeliveryWorker]) -> DeliveryWorker:
    w = DeliveryWorker(Queue(cfg.data_path / "queue"), cfg, sink)
    await w.start()
    workers.append(w)
    return w


def alive(w: DeliveryWorker) -> bool:
    return w._task is not None and not w._task.done()


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_fault_defers_then_bounces_once_and_the_rest_flows(
    fault: str, outbound_config: ConfigFactory, dns_server: DNSServer,
    receivers: ReceiverFactory, sink: LocalSink, started: list[DeliveryWorker],
) -> None:
    behaviour, status = FAULTS[fault]
    good = await receivers()
    routes = {"good.test": {"host": "127.0.0.1", "port": good.port}}
    bad = None
    if isinstance(behaviour, dict):
        bad = await receivers(**behaviour)
        routes["bad.test"] = {"host": "127.0.0.1", "port": bad.port}
    elif behaviour == "timeout":
        dns_server.timeout("bad.test")
    else:
        dns_server.servfail("bad.test")
    cfg = outbound_config(queue=FAST, dns={"timeout": 0.3}, routes=routes)
    w = await start_worker(cfg, sink, started)
    q = w.queue
    q.enqueue_bytes(MSG, "alice@example.test", ["bob@bad.test"], "alice@example.test")
    t0 = time.monotonic()
    q.enqueue_bytes(MSG, "alice@example.test", ["carol@good.test"], "alice@example.test")
    w.wake()
    await wait_for(lambda: len(good.messages) == 1, 5)
    assert time.monotonic() - t0 < 0.5, "the good destination waited for the bad one"

    await wait_for(lambda: len(sink.delivered) == 1, 10)  # the bounce
    user, dsn = sink.delivered[0]
    assert user == "alice@example.test"
    (block,) = dsn_fields(dsn)
    assert block["Final-Recipient"].endswith("bob@bad.test")
    assert block["Status"] == status
    if status.startswith("4"):  # deferred and retried until the lifetime ran out
        tries = bad.sessions if bad is not None else sum(
            1 for name, qtype in dns_server.queries if name == "bad.test" and qtype == "MX")
        assert tries >= 2, f"not retried: {tries}"
    await wait_for(lambda: q.ids() == [], 5)

    # Nothing wedged: the worker is alive and the next message goes straight out.
    assert alive(w)
    q.enqueue_bytes(MSG, "alice@example.test", ["dave@good.test"], "alice@example.test")
    w.wake()
    await wait_for(lambda: len(good.messages) == 2, 2)
    await asyncio.sleep(0.3)
    assert len(sink.delivered) == 1, "bounced more than once"
    assert all(not m.recipients[0].startswith("bob") for m in good.messages)


async def test_one_silent_destination_does_not_hold_every_connection(
    outbound_config: ConfigFactory, receivers: ReceiverFactory, sink: LocalSink,
    started: list[DeliveryWorker],
) -> None:
    """More entries for a silent domain than there are workers: with the per-destination
    limit it holds one connection, and another domain's mail goes out at once."""
    slow = await receivers(stall_at="MAIL")
    good = await receivers()
    cfg = outbound_config(
        queue={"workers": 2, "destination_concurrency": 1, "command_timeout": 5.0},
        routes={"slow.test": {"host": "127.0.0.1", "port": slow.port},
                "good.test": {"host": "127.0.0.1", "port": good.port}})
    w = await start_worker(cfg, sink, started)
    q = w.queue
    for i in range(4):
        q.enqueue_bytes(MSG, "alice@example.test", [f"r{i}@slow.test"], "alice@example.test")
    w.wake()
    await wait_for(lambda: slow.sessions >= 1, 2)
    await asyncio.sleep(0.2)  # every runner has picked up what it could
    t0 = time.monotonic()
    q.enqueue_bytes(MSG, "alice@example.test", ["carol@good.test"], "alice@example.test")
    w.wake()
    await wait_for(lambda: len(good.messages) == 1, 4)
    assert time.monotonic() - t0 < 1.0
    assert slow.sessions == 1  # the limit: one connection to the silent domain
    # The parked entries were not counted as attempts.
    attempts = sorted(r.attempts for e in q.list() for r in e.recipients)
    assert attempts == [0, 0, 0, 0]
