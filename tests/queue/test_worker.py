"""The delivery worker end to end: queue -> DNS -> SMTP receiver, retries and bounces."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import hashlib
import logging
import os
import socket
import ssl
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from email.message import Message
from pathlib import Path

import pytest

from mailfort.config import Config
from mailfort.queue import worker as worker_mod
from mailfort.queue.store import Entry, Queue
from mailfort.queue.worker import DeliveryWorker, backoff
from tests.delivery.conftest import ConfigFactory, ReceiverFactory
from tests.delivery.receiver import Receiver
from tests.dnsserver import DNSServer
from tests.queue.conftest import LocalSink
from tests.queue.damage import DAMAGES, corrupt_files, kept_files

MSG = (b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\n"
       b"Subject: hello\r\nMessage-ID: <m1@example.test>\r\n\r\nHello Bob.\r\n")

WorkerFactory = Callable[..., Awaitable[DeliveryWorker]]


@pytest.fixture
async def worker_factory(sink: LocalSink) -> AsyncIterator[WorkerFactory]:
    started: list[DeliveryWorker] = []

    async def factory(cfg: Config, *, mx_port: int = 25) -> DeliveryWorker:
        w = DeliveryWorker(Queue(cfg.data_path / "queue"), cfg, sink, mx_port=mx_port)
        await w.start()
        started.append(w)
        return w

    yield factory
    for w in started:
        await w.stop()


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def mx_to(dns: DNSServer, domain: str) -> None:
    dns.add_mx(domain, f"mx.{domain}")
    dns.add_a(f"mx.{domain}", "127.0.0.1")


def parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def dsn_fields(raw: bytes) -> list[Message]:
    """The per-recipient blocks of a DSN."""
    _, status, _ = parse(raw).get_payload()
    return status.get_payload()[1:]


async def test_delivered_via_mx(outbound_config: ConfigFactory, dns_server: DNSServer,
                                receivers: ReceiverFactory, worker_factory: WorkerFactory,
                                sink: LocalSink) -> None:
    rx = await receivers()
    mx_to(dns_server, "remote.test")
    cfg = outbound_config()
    w = await worker_factory(cfg, mx_port=rx.port)
    ident = w.queue.enqueue_bytes(MSG, "alice@example.test", ["bob@remote.test"],
                                  "alice@example.test")
    w.wake()
    # The state file goes first (the commit point), the message file right after it.
    await wait_for(lambda: w.queue.list() == [] and not (w.queue.msg_dir / ident).exists())
    (m,) = rx.messages
    assert m.recipients == ["bob@remote.test"] and m.data == MSG
    assert m.helo == "mailfort.example.test"
    assert sink.delivered == []


async def test_mx_resolving_to_loopback_is_not_delivered_to(
        outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
        worker_factory: WorkerFactory, sink: LocalSink) -> None:
    """A foreign domain whose MX points at 127.0.0.1 (a service on this host, listening
    right there): without an explicit opt-in nothing connects, and the submitter is told."""
    rx = await receivers()
    mx_to(dns_server, "remote.test")
    cfg = outbound_config(delivery={"allow_private_destinations": False})
    w = await worker_factory(cfg, mx_port=rx.port)
    w.queue.enqueue_bytes(MSG, "alice@example.test", ["bob@remote.test"], "alice@example.test")
    w.wake()
    await wait_for(lambda: w.queue.list() == [])
    assert rx.sessions == 0
    ((user, raw),) = sink.delivered
    assert user == "alice@example.test"
    (block,) = dsn_fields(raw)
    assert block["Status"] == "5.4.4" and "non-public address 127.0.0.1" in raw.decode()


async def test_address_fallback_and_starttls(outbound_config: ConfigFactory,
                                             dns_server: DNSServer, receivers: ReceiverFactory,
                                             worker_factory: WorkerFactory,
                                             receiver_tls: ssl.SSLContext) -> None:
    rx = await receivers(ssl_context=receiver_tls)
    dns_server.add_a("plain.test", "127.0.0.1")  # no MX: RFC 5321 implicit MX
    w = await worker_factory(outbound_config(), mx_port=rx.port)
    w.queue.enqueue_bytes(MSG, "alice@example.test", ["bob@plain.test"], "alice@example.test")
    w.wake()
    await wait_for(lambda: len(rx.messages) == 1)
    assert rx.messages[0].tls is True
    assert rx.tls_sessions == 1


async def test_null_mx_bounces_to_submitter(outbound_config: ConfigFactory,
                                            dns_server: DNSServer,
                                            worker_factory: WorkerFactory,
                                            sink: LocalSink) -> None:
    dns_server.add_mx("nomail.test", ".", 0)
    w = await worker_factory(outbound_config())
    w.queue.enqueue_bytes(MSG, "alice@example.test", ["bob@nomail.test"], "alice@example.test")
    w.wake()
    await wait_for(lambda: w.queue.list() == [])
    ((user, raw),) = sink.delivered
    assert user == "alice@example.test"
    (block,) = dsn_fields(raw)
    assert block["Status"] == "5.1.10" and block["Action"] == "failed"
    assert len(sink.files("alice@example.test")) == 1


async def test_4xx_then_250_is_retried(outbound_config: ConfigFactory, dns_server: DNSServer,
                                       receivers: ReceiverFactory,
                                       worker_factory: WorkerFactory, sink: LocalSink) -> None:
    rx = await receivers(rcpt_replies={"bob@remote.test": ["451 4.7.1 greylisted",
                                                           "450 4.2.0 still"]})
    mx_to(dns_server, "remote.test")
    w = await worker_factory(outbound_config(), mx_port=rx.port)
    ident = w.queue.enqueue_bytes(MSG, "alice@example.test", ["bob@remote.test"],
                                  "alice@example.test")
    w.wake()
    await wait_for(lambda: w.queue.get(ident).recipients[0].state == "deferred")
    r = w.queue.get(ident).recipients[0]
    assert r.last_reply.startswith("451 4.7.1 greylisted") and r.status == "4.7.1"
    await wait_for(lambda: len(rx.messages) == 1)
    await wait_for(lambda: w.queue.list() == [])
    assert len(rx.rcpt_commands()) == 3  # two refusals, then accepted
    assert rx.sessions == 3
    assert sink.delivered == []  # a delivered message is never bounced


async def test_5xx_one_bounce_to_submitter_only(outbound_config: ConfigFactory,
                                                dns_server: DNSServer,
                                                receivers: ReceiverFactory,
                                                worker_factory: WorkerFactory,
                                                sink: LocalSink) -> None:
    rx = await receivers(rcpt_replies={"nobody@remote.test": ["550 5.1.1 no such user"]})
    mx_to(dns_server, "remote.test")
    w = await worker_factory(outbound_config(), mx_port=rx.port)
    # sent as an alias address: the bounce still goes to the authenticated user
    w.queue.enqueue_bytes(MSG, "team@example.test", ["nobody@remote.test"],
                          "alice@example.test")
    w.wake()
    await wait_for(lambda: w.queue.list() == [])
    await asyncio.sleep(0.3)  # several retry intervals: nothing more may happen
    assert [u for u, _ in sink.delivered] == ["alice@example.test"]
    assert rx.messages == []  # nothing went to the remote side
    assert len(rx.rcpt_commands()) == 1  # a permanent failure is not retried
    raw = sink.delivered[0][1]
    msg = parse(raw)
    assert msg["To"] == "<alice@example.test>" and msg["Return-Path"] == "<>"
    (block,) = dsn_fields(raw)
    assert block["Final-Recipient"] == "rfc822; nobody@remote.test"
    assert block["Status"] == "5.1.1"
    assert "550 5.1.1 no such user" in block["Diagnostic-Code"]


@pytest.mark.parametrize(("sender", "submitted_by"), [
    ("someone@elsewhere.test", None),  # not submitted by a local user (e.g. a forward)
    ("", "alice@example.test"),  # null sender: never bounce a bounce
])
async def test_no_bounce_without_submitter_or_with_null_sender(
    outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
    worker_factory: WorkerFactory, sink: LocalSink, sender: str, submitted_by: str | None,
) -> None:
    rx = await receivers(rcpt_replies={"nobody@remote.test": ["550 5.1.1 no such user"]})
    mx_to(dns_server, "remote.test")
    w = await worker_factory(outbound_config(), mx_port=rx.port)
    w.queue.enqueue_bytes(MSG, sender, ["nobody@remote.test"], submitted_by)
    w.wake()
    await wait_for(lambda: w.queue.list() == [])
    await asyncio.sleep(0.2)
    assert sink.delivered == []
    assert list(sink.root.rglob("*.eml")) == []
    assert w.stats.failed == 1 and w.stats.bounces == 0


async def test_bounce_says_which_tls_the_failed_hop_had(
        outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
        worker_factory: WorkerFactory, sink: LocalSink, receiver_tls: ssl.SSLContext) -> None:
    rx = await receivers(ssl_context=receiver_tls,
                         rcpt_replies={"nobody@remote.test": ["550 5.1.1 no such user"]})
    mx_to(dns_server, "remote.test")
    w = await worker_factory(outbound_config(), mx_port=rx.port)
    w.queue.enqueue_bytes(MSG, "alice@example.test", ["nobody@remote.test"],
                          "alice@example.test")
    w.wake()
    await wait_for(lambda: len(sink.delivered) == 1)
    (block,) = dsn_fields(sink.delivered[0][1])
    diag = " ".join(block["Diagnostic-Code"].split())
    assert "550 5.1.1 no such user" in diag
    assert "TLSv1.3, not verified" in diag or "TLSv1.2, not verified" in diag  # opportunistic


async def test_bounce_after_a_plaintext_hop_says_so(
        outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
        worker_factory: WorkerFactory, sink: LocalSink) -> None:
    rx = await receivers(rcpt_replies={"nobody@remote.test": ["550 5.1.1 no such user"]})
    mx_to(dns_server, "remote.test")
    w = await worker_factory(outbound_config(), mx_port=rx.port)
    w.queue.enqueue_bytes(MSG, "alice@example.test", ["nobody@remote.test"],
                          "alice@example.test")
    w.wake()
    await wait_for(lambda: len(sink.delivered) == 1)
    (block,) = dsn_fields(sink.delivered[0][1])
    assert "no TLS" in block["Diagnostic-Code"]


async def test_only_the_failed_recipient_is_retried(outbound_config: ConfigFactory,
                                                    dns_server: DNSServer,
                                                    receivers: ReceiverFactory,
                                                    worker_factory: WorkerFactory) -> None:
    rcpts = [f"u{i}@remote.test" for i in range(10)]
    rx = await receivers(rcpt_replies={"u7@remote.test": ["452 4.2.2 mailbox full"]})
    mx_to(dns_server, "remote.test")
    w = await worker_factory(outbound_config(), mx_port=rx.port)
    w.queue.enqueue_bytes(MSG, "alice@example.test", rcpts, "alice@example.test")
    w.wake()
    await wait_for(lambda: len(rx.messages) == 2)
    await wait_for(lambda: w.queue.list() == [])
    first, second = rx.messages
    assert first.recipients == [r for r in rcpts if r != "u7@remote.test"]
    assert second.recipients == ["u7@remote.test"]
    assert rx.rcpt_commands().count("RCPT TO:<u0@remote.test>") == 1


async def test_domains_are_delivered_separately(outbound_config: ConfigFactory,
                                                receivers: ReceiverFactory,
                                                worker_factory: WorkerFactory) -> None:
    a = await receivers()
    b = await receivers()
    cfg = outbound_config(routes={"a.test": {"host": "127.0.0.1", "port": a.port},
                                  "b.test": {"host": "127.0.0.1", "port": b.port}})
    w = await worker_factory(cfg)
    w.queue.enqueue_bytes(MSG, "alice@example.test",
                          ["x@a.test", "y@b.test", "z@a.test"], "alice@example.test")
    w.wake()
    await wait_for(lambda: w.queue.list() == [])
    assert [m.recipients for m in a.messages] == [["x@a.test", "z@a.test"]]
    assert [m.recipients for m in b.messages] == [["y@b.test"]]


async def test_require_tls_domain_without_starttls_is_deferred(
    outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
    worker_factory: WorkerFactory, sink: LocalSink,
) -> None:
    rx = await receivers()  # offers no STARTTLS
    mx_to(dns_server, "secure.test")
    w = await worker_factory(outbound_config(require_tls_domains=["secure.test"]),
                             mx_port=rx.port)
    ident = w.queue.enqueue_bytes(MSG, "alice@example.test", ["bob@secure.test"],
                                  "alice@example.test")
    w.wake()
    await wait_for(lambda: w.queue.get(ident).recipients[0].attempts >= 2)
    r = w.queue.get(ident).recipients[0]
    assert r.state == "deferred" and r.status == "4.7.10"
    assert rx.mail_commands == [] and rx.messages == []  # never sent in clear
    assert sink.delivered == []


async def test_expiry_bounces_once_after_one_delay_warning(
    outbound_config: ConfigFactory, worker_factory: WorkerFactory, sink: LocalSink,
) -> None:
    from tests.dnsserver import free_port_unused

    dead = free_port_unused()
    cfg = outbound_config(
        queue={"max_lifetime": 1.0, "delay_warning_after": 0.2},
        routes={"down.test": {"host": "127.0.0.1", "port": dead}},
    )
    w = await worker_factory(cfg)
    w.queue.enqueue_bytes(MSG, "alice@example.test", ["bob@down.test"], "alice@example.test")
    w.wake()
    await wait_for(lambda: w.queue.list() == [])
    kinds = [parse(raw)["Subject"] for _, raw in sink.delivered]
    assert kinds == ["Delayed Mail (still being retried)", "Undelivered Mail Returned to Sender"]
    assert all(u == "alice@example.test" for u, _ in sink.delivered)
    (warn,) = dsn_fields(sink.delivered[0][1])
    (fail,) = dsn_fields(sink.delivered[1][1])
    assert warn["Action"] == "delayed" and warn["Status"].startswith("4.")
    assert fail["Action"] == "failed" and fail["Status"] == "4.4.7"
    assert "expired" in fail["Diagnostic-Code"]


async def test_bounce_survives_local_delivery_failure(outbound_config: ConfigFactory,
                                                      dns_server: DNSServer,
                                                      worker_factory: WorkerFactory,
                                                      sink: LocalSink) -> None:
    dns_server.add_mx("nomail.test", ".", 0)
    sink.fail = True
    w = await worker_factory(outbound_config())
    ident = w.queue.enqueue_bytes(MSG, "alice@example.test", ["b@nomail.test"],
                                  "alice@example.test")
    w.wake()
    await wait_for(lambda: w.queue.get(ident).recipients[0].state == "failed")
    assert w.queue.get(ident).unnotified  # kept until the bounce is delivered
    sink.fail = False
    w.wake()
    await wait_for(lambda: w.queue.list() == [])
    assert len(sink.delivered) == 1


def test_backoff_doubles_and_caps(outbound_config: ConfigFactory) -> None:
    cfg = outbound_config(queue={"initial_retry": 300.0, "max_retry": 3600.0})
    assert [backoff(cfg, n) for n in (1, 2, 3, 4, 5, 6)] == [300, 600, 1200, 2400, 3600, 3600]


async def test_wake_from_another_thread(outbound_config: ConfigFactory, dns_server: DNSServer,
                                        receivers: ReceiverFactory,
                                        worker_factory: WorkerFactory, tmp_path: Path) -> None:
    """The integrator enqueues from a thread (blocking fsyncs) and wakes from there."""
    rx = await receivers()
    mx_to(dns_server, "remote.test")
    w = await worker_factory(outbound_config(), mx_port=rx.port)
    spool = tmp_path / "spool"
    spool.write_bytes(MSG)

    def submit() -> str:
        ident = w.queue.enqueue(spool, "alice@example.test", ["bob@remote.test"],
                                "alice@example.test")
        w.wake()
        return ident

    started = time.monotonic()
    await asyncio.to_thread(submit)
    await wait_for(lambda: len(rx.messages) == 1)
    assert time.monotonic() - started < 5  # woken, not the 60 s rescan


async def test_receiver_records(receivers: ReceiverFactory) -> None:
    """The test receiver itself speaks enough SMTP for smtplib."""
    import smtplib

    rx: Receiver = await receivers()

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", rx.port, timeout=5) as s:
            s.sendmail("a@x.test", ["b@y.test"], MSG)

    await asyncio.to_thread(send)
    assert rx.messages[0].recipients == ["b@y.test"]


async def test_bounce_lands_in_maildir_through_committer(outbound_config: ConfigFactory,
                                                         dns_server: DNSServer) -> None:
    """The ready-made local_deliver: durable Maildir delivery via the group committer."""
    from mailfort.queue.worker import maildir_deliverer
    from mailfort.store.maildir import Committer, maildir_for

    dns_server.add_mx("nomail.test", ".", 0)
    cfg = outbound_config()
    committer = Committer(cfg.data_path)
    w = DeliveryWorker(Queue(cfg.data_path / "queue"), cfg,
                       maildir_deliverer(committer, cfg.mail_path))
    await w.start()
    try:
        w.queue.enqueue_bytes(MSG, "alice@example.test", ["b@nomail.test"],
                              "alice@example.test")
        w.wake()
        await wait_for(lambda: w.queue.list() == [])
    finally:
        await w.stop()
        committer.stop()
    (f,) = (maildir_for(cfg.mail_path, "alice@example.test") / "new").iterdir()
    msg = parse(f.read_bytes())
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg.get_content_type() == "multipart/report"


class LosesTheBounceRecord(Queue):
    """The save that would record a sent bounce fails once, which is what a kill at that
    moment leaves: the DSN is in the Maildir, the state on disk says "not notified"."""

    lost = False

    def delete(self, ident: str) -> None:
        if not self.lost:
            self.lost = True
            raise OSError("killed before the state was saved")
        super().delete(ident)


async def test_bounce_resent_after_a_lost_state_save_is_stored_once(
    outbound_config: ConfigFactory, dns_server: DNSServer,
) -> None:
    """The resend of a DSN whose delivery the queue could not record finds the first copy
    (same key, same Maildir name) and adds no second bounce."""
    from mailfort.queue.worker import maildir_deliverer
    from mailfort.store.maildir import Committer, maildir_for

    dns_server.add_mx("nomail.test", ".", 0)
    cfg = outbound_config()
    committer = Committer(cfg.data_path)
    q = LosesTheBounceRecord(cfg.data_path / "queue")
    w = DeliveryWorker(q, cfg, maildir_deliverer(committer, cfg.mail_path))
    await w.start()
    try:
        q.enqueue_bytes(MSG, "alice@example.test", ["b@nomail.test"], "alice@example.test")
        w.wake()
        await wait_for(lambda: q.lost and q.list() == [], 5)
    finally:
        await w.stop()
        committer.stop()
    files = list((maildir_for(cfg.mail_path, "alice@example.test") / "new").iterdir())
    assert len(files) == 1, [f.name for f in files]


async def test_missing_message_file_drops_entry_without_looping(
    outbound_config: ConfigFactory, worker_factory: WorkerFactory, sink: LocalSink,
) -> None:
    w = await worker_factory(outbound_config())
    q = w.queue
    ident = q.enqueue_bytes(MSG, "alice@example.test", ["b@remote.test"], "alice@example.test")
    q.message_path(ident).unlink()  # damaged from outside, while the worker runs
    w.wake()
    await wait_for(lambda: q.list() == [])
    assert sink.delivered == [] and w.stats.delivered == 0
    # Set aside, not deleted: its state still says for whom the lost message was.
    assert [d.id for d in q.damaged()] == [ident]
    assert corrupt_files(q, ident) == {f"{ident}.json"}


def test_recover_grace_spares_an_enqueue_in_progress(tmp_path: Path) -> None:
    q = Queue(tmp_path / "q")
    (q.msg_dir / "0000INFLIGHT").write_bytes(MSG)  # linked, state file not yet written
    assert q.recover(grace=60) == 0
    assert (q.msg_dir / "0000INFLIGHT").exists()
    assert q.recover() == 1


async def test_stop_is_not_lost_when_a_wake_arrives_with_it(
        outbound_config: ConfigFactory, sink: LocalSink) -> None:
    """A wake-up and a stop in the same loop iteration: the stop must still win (on
    Python 3.11, ``asyncio.wait_for`` swallows a cancellation that races its result)."""
    cfg = outbound_config()
    w = DeliveryWorker(Queue(cfg.data_path / "queue"), cfg, sink)
    for _ in range(10):
        await w.start()
        await asyncio.sleep(0.05)  # asleep until the next rescan (60 s)
        w.wake()
        started = time.monotonic()
        await w.stop()
        assert time.monotonic() - started < 2, "the stop was lost: waited for the rescan"


class CountingQueue(Queue):
    """A real queue that counts how many state files are read."""

    reads = 0

    def get(self, ident: str) -> Entry:
        CountingQueue.reads += 1
        return super().get(ident)


async def test_a_delivery_does_not_reread_the_whole_queue(
        outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
        sink: LocalSink) -> None:
    """Thousands of deferred messages must not be read again for every new one: a pass
    reads the state of new entries only (all of them once a minute)."""
    rx = await receivers()
    mx_to(dns_server, "up.test")
    with socket.socket() as s:  # a port where nothing listens: delivery is deferred
        s.bind(("127.0.0.1", 0))
        down = s.getsockname()[1]
    cfg = outbound_config(queue={"initial_retry": 3600.0, "max_retry": 3600.0},
                          routes={"down.test": {"host": "127.0.0.1", "port": down}})
    w = DeliveryWorker(CountingQueue(cfg.data_path / "queue"), cfg, sink, mx_port=rx.port)
    await w.start()
    try:
        ids = [w.queue.enqueue_bytes(MSG, "alice@example.test", [f"u{i}@down.test"],
                                     "alice@example.test") for i in range(40)]
        w.wake()
        await wait_for(lambda: all(w.queue.get(i).recipients[0].attempts == 1 for i in ids))
        await w.drain()
        CountingQueue.reads = 0
        for n in range(3):
            w.queue.enqueue_bytes(MSG, "alice@example.test", ["bob@up.test"],
                                  "alice@example.test")
            w.wake()
            await wait_for(lambda n=n: len(rx.messages) == n + 1)
        await w.drain()
        assert CountingQueue.reads <= 3 * 3, CountingQueue.reads  # not 3 x 40
        assert len(w.queue.list()) == 40  # the deferred ones are all still there
    finally:
        await w.stop()


def _open_message_files(msg_dir: Path) -> int:
    """How many descriptors of this process are open on files in the queue's msg/."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"{msg_dir}/"):
                n += 1
    return n


def _worker_tasks() -> int:
    """Live tasks running the worker's own coroutines (not the receiver's sessions)."""
    return sum(1 for t in asyncio.all_tasks()
               if t.get_coro().__qualname__.startswith("DeliveryWorker."))


async def test_many_due_entries_take_at_most_n_slots(
        outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
        sink: LocalSink) -> None:
    """After an outage hundreds of entries are due at once: at most ``workers`` of them may
    be in flight (tasks) and have their message open, measured inside the receiver while
    each transaction is under way."""
    n = 3
    cfg = outbound_config(queue={"workers": n})
    q = Queue(cfg.data_path / "queue")
    ids = [q.enqueue_bytes(MSG, "alice@example.test", [f"u{i}@remote.test"],
                           "alice@example.test") for i in range(200)]
    peak = {"files": 0, "tasks": 0}

    def probe(_line: str) -> None:
        peak["files"] = max(peak["files"], _open_message_files(q.msg_dir))
        peak["tasks"] = max(peak["tasks"], _worker_tasks())

    rx = await receivers(probe=probe)
    mx_to(dns_server, "remote.test")
    w = DeliveryWorker(q, cfg, sink, mx_port=rx.port)
    await w.start()
    try:
        await wait_for(lambda: len(rx.messages) == len(ids) and q.list() == [], timeout=30)
    finally:
        await w.stop()
    assert 1 <= peak["files"] <= n, peak  # >= 1: the probe does see an open message
    # the loop, and per slot one runner and its connection: not one per due entry
    assert 1 <= peak["tasks"] <= 2 * n + 1, peak


async def test_delivery_memory_does_not_grow_with_the_queue_or_the_message(
        outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
        sink: LocalSink) -> None:
    """Eight 4 MiB messages due at once, two workers: the worker streams each message from
    its file, so the traced peak (client, receiver and all, about 1 MiB) stays below the
    size of a single message; reading them before taking a slot held all eight, 32 MiB."""
    size = 4 << 20
    line = b"x" * 998 + b"\r\n"
    body = (line * (size // len(line) + 1))[:size - 2] + b"\r\n"
    message = b"Subject: big\r\n\r\n" + body
    cfg = outbound_config(queue={"workers": 2})
    q = Queue(cfg.data_path / "queue")
    for i in range(8):
        q.enqueue_bytes(message, "alice@example.test", [f"u{i}@remote.test"], None)
    rx = await receivers(keep_data=False)
    mx_to(dns_server, "remote.test")
    w = DeliveryWorker(q, cfg, sink, mx_port=rx.port)
    tracemalloc.start()
    try:
        await w.start()
        await wait_for(lambda: len(rx.messages) == 8, timeout=30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await w.stop()
    assert {m.sha256 for m in rx.messages} == {hashlib.sha256(message).hexdigest()}
    assert peak < size, peak


UTF8_MSG = ("From: Zoë <zoë@example.test>\r\nTo: jürgen@remote.test\r\n"
            "Subject: grüße\r\nMessage-ID: <u1@example.test>\r\n\r\nHallo.\r\n").encode()


async def test_smtputf8_is_declared_to_a_remote_that_offers_it(
        outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
        worker_factory: WorkerFactory, sink: LocalSink) -> None:
    """RFC 6531: non-ASCII addresses or headers go with the SMTPUTF8 MAIL parameter."""
    rx = await receivers(smtputf8=True)
    mx_to(dns_server, "remote.test")
    w = await worker_factory(outbound_config(), mx_port=rx.port)
    w.queue.enqueue_bytes(UTF8_MSG, "zoë@example.test", ["jürgen@remote.test"],
                          "zoë@example.test")
    w.queue.enqueue_bytes(MSG, "alice@example.test", ["bob@remote.test"], None)
    w.wake()
    await wait_for(lambda: len(rx.messages) == 2)
    by_rcpt = {m.recipients[0]: m for m in rx.messages}
    utf8 = by_rcpt["jürgen@remote.test"]
    assert utf8.sender == "zoë@example.test" and utf8.data == UTF8_MSG
    assert utf8.mail.split()[-1] == "SMTPUTF8" and "BODY=8BITMIME" in utf8.mail.split()
    assert "SMTPUTF8" not in by_rcpt["bob@remote.test"].mail  # only when it is needed
    assert sink.delivered == []


@pytest.mark.parametrize("what", ["header", "recipient"])
async def test_smtputf8_message_to_a_remote_without_it_bounces_with_5_6_7(
        outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
        worker_factory: WorkerFactory, sink: LocalSink, what: str) -> None:
    """No SMTPUTF8 offered: nothing is sent (no MAIL at all), no retry, and the submitter
    gets a bounce with status 5.6.7; an ASCII message to the same remote still goes."""
    rx = await receivers(smtputf8=False)
    mx_to(dns_server, "remote.test")
    w = await worker_factory(outbound_config(), mx_port=rx.port)
    message, rcpt = ((UTF8_MSG, "juergen@remote.test") if what == "header"
                     else (MSG, "jürgen@remote.test"))
    w.queue.enqueue_bytes(message, "alice@example.test", [rcpt], "alice@example.test")
    w.queue.enqueue_bytes(MSG, "alice@example.test", ["bob@remote.test"], None)
    w.wake()
    await wait_for(lambda: w.queue.list() == [] and len(sink.delivered) == 1)
    await asyncio.sleep(0.3)  # several retry intervals: a permanent failure is not retried
    assert [m.recipients for m in rx.messages] == [["bob@remote.test"]]
    assert all("SMTPUTF8" not in c for c in rx.mail_commands)
    assert len(rx.mail_commands) == 1  # the UTF-8 message never got as far as MAIL
    (user, raw), = sink.delivered
    assert user == "alice@example.test"
    (block,) = dsn_fields(raw)
    assert f"Final-Recipient: rfc822; {rcpt}".encode() in raw
    assert block["Status"] == "5.6.7"
    assert "SMTPUTF8" in block["Diagnostic-Code"]


class LosesOneCancel(LocalSink):
    """Local delivery that swallows the first cancellation and carries on, as
    ``asyncio.wait_for`` does on Python 3.11 when the cancel races its result (dnspython's
    asyncio backend awaits every DNS query through it)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.entered = asyncio.Event()

    async def __call__(self, user: str, message: bytes, key: str = "") -> None:
        self.entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(30)  # the cancel is lost: this work goes on


async def test_stop_ends_a_runner_whose_cancel_was_lost(
        outbound_config: ConfigFactory, dns_server: DNSServer, tmp_path: Path) -> None:
    """stop() must not wait for a runner that did not take its cancel (the teardown hang)."""
    dns_server.add_mx("nomail.test", ".", 0)  # null MX: bounced at once, to local delivery
    cfg = outbound_config()
    sink = LosesOneCancel(tmp_path / "local")
    w = DeliveryWorker(Queue(cfg.data_path / "queue"), cfg, sink)
    await w.start()
    w.queue.enqueue_bytes(MSG, "alice@example.test", ["b@nomail.test"], "alice@example.test")
    w.wake()
    await asyncio.wait_for(sink.entered.wait(), 10)
    started = time.monotonic()
    await asyncio.wait_for(w.stop(), 10)
    # It waits STOP_GRACE for the runner to finish on its own, then cancels, and does not
    # wait for a cancel that is lost.
    assert time.monotonic() - started < worker_mod.STOP_GRACE + 2, \
        "stop() waited for the runner's lost cancel"


async def test_dsn_stored_over_a_spool_file_left_by_a_killed_attempt(tmp_path: Path) -> None:
    """A primary worker killed while it stored a DSN leaves its spool file, named by the
    DSN's key (not by its pid, so the supervisor does not remove it): the next attempt,
    in the worker that replaces it, stores the DSN all the same, once."""
    from mailfort.queue.worker import maildir_deliverer
    from mailfort.store.maildir import Committer, keyed_name, maildir_for

    committer = Committer(tmp_path / "data")
    key = "1796524240.B06B14C8D02AF25697BCBCN0"
    (committer.spool_dir / keyed_name(key)).write_bytes(b"Subject: half a bou")
    deliver = maildir_deliverer(committer, tmp_path / "mail")
    dsn = b"Subject: Undelivered Mail\r\n\r\nit bounced\r\n"
    try:
        await deliver("alice@example.test", dsn, key)
        await deliver("alice@example.test", dsn, key)  # a resend finds it: not again
    finally:
        committer.stop()
    new = maildir_for(tmp_path / "mail", "alice@example.test") / "new"
    assert [p.read_bytes() for p in new.iterdir()] == [dsn]
    assert list(committer.spool_dir.iterdir()) == []


async def test_too_many_recipients_552_is_not_a_bounce(
        outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
        worker_factory: WorkerFactory, sink: LocalSink) -> None:
    """A remote limit of 2 recipients per transaction answers the third RCPT with 552
    (RFC 821's code for it): RFC 5321 §4.5.3.1.10 takes it as temporary, and the rest go in
    new transactions on the same connection at once, not after a backoff or as a bounce."""
    rx = await receivers(max_rcpts=2)
    mx_to(dns_server, "remote.test")
    # A retry would come only after an hour: only the same pass can deliver them all.
    cfg = outbound_config(queue={"initial_retry": 3600.0, "max_retry": 3600.0})
    w = await worker_factory(cfg, mx_port=rx.port)
    rcpts = [f"r{i}@remote.test" for i in range(5)]
    w.queue.enqueue_bytes(MSG, "alice@example.test", rcpts, "alice@example.test")
    w.wake()
    await wait_for(lambda: w.queue.list() == [])
    assert sorted(r for m in rx.messages for r in m.recipients) == rcpts
    assert rx.sessions == 1 and len(rx.messages) == 3
    assert w.stats.delivered == 5 and w.stats.deferred == 0 and w.stats.failed == 0
    assert sink.delivered == []


# ------------------------------------------------------------------ forwards (issue 24)


async def forward_worker(cfg: Config, sink: LocalSink, port: int,
                         postmaster: list[str] | None) -> DeliveryWorker:
    from mailfort.directory.sqlite import SQLiteDirectory

    cfg.data_path.mkdir(parents=True, exist_ok=True)
    d = SQLiteDirectory(cfg.data_path / "directory.sqlite3")
    d.add_domain("example.test")
    d.add_user("bob@example.test", "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA")
    if postmaster is not None:
        d.add_alias("postmaster@example.test", postmaster)
    w = DeliveryWorker(Queue(cfg.data_path / "queue"), cfg, sink, mx_port=port, directory=d)
    await w.start()
    return w


async def test_failed_forward_is_told_to_the_alias_owner_until_stored(
        outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
        sink: LocalSink) -> None:
    """Mail from outside forwarded by fwd@example.test, refused for good: the postmaster of
    example.test hears of it (kept in the queue while that local delivery fails), the
    outside sender never does."""
    rx = await receivers(rcpt_replies={"x@remote.test": ["550 5.7.26 SPF/DMARC says no"]})
    mx_to(dns_server, "remote.test")
    w = await forward_worker(outbound_config(), sink, rx.port, ["bob@example.test"])
    try:
        sink.fail = True
        ident = w.queue.enqueue_bytes(MSG, "SRS0=abcdef=aa=outside.test=eve@example.test",
                                      ["x@remote.test"], None,
                                      forwards={"x@remote.test": "fwd@example.test"},
                                      original_sender="eve@outside.test")
        w.wake()
        await wait_for(lambda: w.queue.get(ident).recipients[0].state == "failed")
        assert w.queue.get(ident).unnotified  # not lost: kept until the owner is told
        sink.fail = False
        w.rescan()
        await wait_for(lambda: w.queue.list() == [])
    finally:
        await w.stop()
    ((user, raw),) = sink.delivered
    assert user == "bob@example.test"
    msg = parse(raw)
    assert msg["Subject"] == "Undelivered forwarded mail (alias fwd@example.test)"
    (block,) = dsn_fields(raw)
    assert block["Final-Recipient"] == "rfc822; x@remote.test" and block["Status"] == "5.7.26"
    assert "<eve@outside.test>, who was not told" in raw.decode()
    assert len(rx.mail_commands) == 1  # the forward; no DSN left by SMTP


async def test_failed_forward_without_a_local_postmaster_is_logged(
        outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
        sink: LocalSink, caplog: pytest.LogCaptureFixture) -> None:
    rx = await receivers(rcpt_replies={"x@remote.test": ["550 5.1.1 gone"]})
    mx_to(dns_server, "remote.test")
    w = await forward_worker(outbound_config(), sink, rx.port, None)
    caplog.set_level("WARNING", logger="mailfort.queue")
    try:
        w.queue.enqueue_bytes(MSG, "eve@outside.test", ["x@remote.test"], None,
                              forwards={"x@remote.test": "fwd@example.test"})
        w.wake()
        await wait_for(lambda: w.queue.list() == [])
    finally:
        await w.stop()
    assert sink.delivered == []
    lines = [r.getMessage() for r in caplog.records]
    assert any("<eve@outside.test> to <x@remote.test> failed: 550 5.1.1 gone" in ln
               and "fwd@example.test" in ln for ln in lines), lines
    assert any("nobody to tell" in ln and "postmaster@example.test" in ln for ln in lines)


# ------------------------------------------------------------------ damaged entries


async def test_a_stop_lets_a_delivery_past_data_record_its_outcome(
        outbound_config: ConfigFactory, dns_server: DNSServer, receivers: ReceiverFactory,
        worker_factory: WorkerFactory) -> None:
    """A stop while the remote had said 250 to DATA but not yet answered QUIT cancelled the
    delivery before its outcome was written: the message went out again after the restart
    (seen as a duplicate by CI on a loaded machine). In-flight deliveries now finish."""
    rx = await receivers(quit_delay=0.5)
    mx_to(dns_server, "remote.test")
    cfg = outbound_config()
    w = await worker_factory(cfg, mx_port=rx.port)
    ident = w.queue.enqueue_bytes(MSG, "alice@example.test", ["bob@remote.test"],
                                  "alice@example.test")
    w.wake()
    await wait_for(lambda: any(c.upper() == "QUIT" for c in rx.commands))
    await w.stop()
    assert not (w.queue.env_dir / f"{ident}.json").exists()
    await worker_factory(cfg, mx_port=rx.port)  # a restart on the same directory
    await asyncio.sleep(0.5)
    assert len(rx.messages) == 1


@pytest.mark.parametrize("kind", DAMAGES)
async def test_a_damaged_entry_stops_no_other_delivery_and_is_kept_across_a_restart(
        kind: str, outbound_config: ConfigFactory, dns_server: DNSServer,
        receivers: ReceiverFactory, worker_factory: WorkerFactory, sink: LocalSink,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 25 items 8 and 9: a state file without "recipients" failed every pass (no
    other mail went out); a truncated one vanished from view, never delivered or bounced."""
    monkeypatch.setattr(worker_mod, "_RECOVER_GRACE", 0.0)  # the orphan counts as old
    caplog.set_level(logging.INFO, "mailfort.queue")
    rx = await receivers()
    mx_to(dns_server, "remote.test")
    cfg = outbound_config()
    q = Queue(cfg.data_path / "queue")
    bad = q.enqueue_bytes(MSG, "alice@example.test", ["lost@remote.test"],
                          "alice@example.test")
    good = q.enqueue_bytes(MSG, "alice@example.test", ["bob@remote.test"],
                           "alice@example.test")
    DAMAGES[kind][0](q, bad)

    w = await worker_factory(cfg, mx_port=rx.port)
    await wait_for(lambda: len(rx.messages) == 1 and not (q.env_dir / f"{good}.json").exists())
    assert rx.messages[0].recipients == ["bob@remote.test"]
    assert q.list() == [] and [d.id for d in q.damaged()] == [bad]
    assert corrupt_files(q, bad) == kept_files(kind, bad)
    assert sink.delivered == []  # kept, not bounced
    lines = [r for r in caplog.records if bad in r.getMessage()]
    assert len(lines) == 1 and DAMAGES[kind][1] in lines[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info], "no traceback"

    # More mail while it sits there: delivered too, and nothing more is logged about it.
    w.queue.enqueue_bytes(MSG, "alice@example.test", ["carol@remote.test"],
                          "alice@example.test")
    w.wake()
    await wait_for(lambda: len(rx.messages) == 2)
    await w.stop()

    caplog.clear()
    again = await worker_factory(cfg, mx_port=rx.port)  # a restart on the same directory
    await asyncio.sleep(0.2)
    assert [d.id for d in again.queue.damaged()] == [bad]
    assert corrupt_files(again.queue, bad) == kept_files(kind, bad)
    (note,) = [r for r in caplog.records if bad in r.getMessage()]
    assert note.levelno == logging.WARNING and "1 damaged entry kept" in note.getMessage()
    assert len(rx.messages) == 2 and sink.delivered == []
