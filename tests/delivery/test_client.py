"""The outbound SMTP client against a recording receiver over real sockets and TLS."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from mailfort.delivery import client
from mailfort.delivery.message import Outbound
from mailfort.delivery.mx import Target
from tests.delivery.conftest import ReceiverFactory
from tests.dnsserver import free_port_unused

MSG = (b"From: alice@example.test\r\nTo: bob@remote.test\r\nSubject: hi\r\n\r\n"
       b"hello\r\n.leading dot\r\n")


def target(port: int, *, host: str = "mx.remote.test", require_tls: bool = False,
           addresses: tuple[str, ...] = ("127.0.0.1",)) -> Target:
    return Target(host, addresses, port, 10, require_tls)


async def test_delivers_with_starttls_when_offered(
    receivers: ReceiverFactory, receiver_tls: ssl.SSLContext
) -> None:
    rx = await receivers(ssl_context=receiver_tls)
    res = await client.deliver([target(rx.port)], "alice@example.test", ["bob@remote.test"],
                               MSG, helo="mailfort.example.test")
    assert res.results["bob@remote.test"].outcome == "delivered"
    assert res.tls is True
    (m,) = rx.messages
    assert m.tls and m.sender == "alice@example.test" and m.recipients == ["bob@remote.test"]
    assert m.data == MSG  # dot-stuffing undone by the receiver: byte-identical
    assert m.helo == "mailfort.example.test"
    # nothing of the transaction was sent before STARTTLS
    assert rx.commands.index("STARTTLS") < rx.commands.index(rx.mail_commands[0])


async def test_plaintext_when_not_offered_and_not_required(receivers: ReceiverFactory) -> None:
    rx = await receivers()
    res = await client.deliver([target(rx.port)], "", ["bob@remote.test"], MSG, helo="h.test")
    assert res.results["bob@remote.test"].outcome == "delivered"
    assert res.tls is False
    assert rx.mail_commands[0].startswith("MAIL FROM:<>")  # null sender kept null


async def test_require_tls_without_starttls_is_temporary_and_sends_nothing(
    receivers: ReceiverFactory,
) -> None:
    rx = await receivers()  # no STARTTLS
    res = await client.deliver([target(rx.port, require_tls=True)], "alice@example.test",
                               ["bob@remote.test"], MSG, helo="h.test")
    r = res.results["bob@remote.test"]
    assert r.outcome == "temporary"
    assert r.status == "4.7.10"
    assert rx.mail_commands == [] and rx.messages == []


async def test_require_tls_with_starttls_delivers(
    receivers: ReceiverFactory, receiver_tls: ssl.SSLContext
) -> None:
    rx = await receivers(ssl_context=receiver_tls)
    res = await client.deliver([target(rx.port)], "a@example.test", ["bob@remote.test"], MSG,
                               helo="h.test", require_tls=True)
    assert res.results["bob@remote.test"].outcome == "delivered"
    assert rx.messages[0].tls


async def test_per_recipient_results_one_connection(receivers: ReceiverFactory) -> None:
    rx = await receivers(rcpt_replies={
        "gone@remote.test": ["550 5.1.1 no such user"],
        "busy@remote.test": ["452 4.2.2 mailbox full"],
    })
    rcpts = ["ok1@remote.test", "gone@remote.test", "busy@remote.test", "ok2@remote.test"]
    res = await client.deliver([target(rx.port)], "a@example.test", rcpts, MSG, helo="h.test")
    out = {a: (r.outcome, r.status) for a, r in res.results.items()}
    assert out == {
        "ok1@remote.test": ("delivered", "2.0.0"),
        "gone@remote.test": ("permanent", "5.1.1"),
        "busy@remote.test": ("temporary", "4.2.2"),
        "ok2@remote.test": ("delivered", "2.0.0"),
    }
    assert "550 5.1.1 no such user" in res.results["gone@remote.test"].reply
    assert rx.sessions == 1
    (m,) = rx.messages
    assert m.recipients == ["ok1@remote.test", "ok2@remote.test"]


async def test_data_rejection_applies_to_accepted_recipients(
    receivers: ReceiverFactory,
) -> None:
    rx = await receivers(data_replies=["554 5.7.1 spam"])
    res = await client.deliver([target(rx.port)], "a@example.test",
                               ["x@remote.test", "y@remote.test"], MSG, helo="h.test")
    assert {r.outcome for r in res.results.values()} == {"permanent"}
    assert all(r.status == "5.7.1" for r in res.results.values())
    assert rx.messages == []


async def test_next_mx_on_connection_failure(receivers: ReceiverFactory) -> None:
    rx = await receivers()
    dead = free_port_unused()
    res = await client.deliver(
        [target(dead, host="mx1.remote.test"), target(rx.port, host="mx2.remote.test")],
        "a@example.test", ["bob@remote.test"], MSG, helo="h.test", connect_timeout=2)
    assert res.results["bob@remote.test"].outcome == "delivered"
    assert res.host == "mx2.remote.test"
    assert len(rx.messages) == 1


async def test_next_mx_on_421_greeting(receivers: ReceiverFactory) -> None:
    busy = await receivers(banner="421 4.3.2 too busy")
    rx = await receivers()
    res = await client.deliver([target(busy.port), target(rx.port)], "a@example.test",
                               ["bob@remote.test"], MSG, helo="h.test")
    assert res.results["bob@remote.test"].outcome == "delivered"
    assert busy.messages == [] and len(rx.messages) == 1


async def test_all_hosts_down_is_temporary() -> None:
    res = await client.deliver([target(free_port_unused())], "a@example.test",
                               ["bob@remote.test", "carol@remote.test"], MSG, helo="h.test",
                               connect_timeout=2)
    assert [r.outcome for r in res.results.values()] == ["temporary", "temporary"]
    assert res.results["bob@remote.test"].reply.endswith(": Connection refused")


async def test_unsafe_address_is_refused_locally(receivers: ReceiverFactory) -> None:
    rx = await receivers()
    res = await client.deliver([target(rx.port)], "a@example.test",
                               ["bob@remote.test", "evil>\r\nRSET@remote.test"], MSG,
                               helo="h.test")
    assert res.results["bob@remote.test"].outcome == "delivered"
    assert res.results["evil>\r\nRSET@remote.test"].outcome == "permanent"
    assert not any("RSET" in c for c in rx.commands)


def test_status_of() -> None:
    assert client.status_of(550, "5.1.1 user unknown") == "5.1.1"
    assert client.status_of(550, "user unknown") == "5.0.0"
    assert client.status_of(450, "5.1.1 mismatched class") == "4.0.0"


UTF8 = "From: zoë@example.test\r\nSubject: grüße\r\n\r\nHallo.\r\n".encode()


async def test_smtputf8_host_after_one_without_it(receivers: ReceiverFactory) -> None:
    """A host without SMTPUTF8 is skipped like an unreachable one; the next MX takes it."""
    old = await receivers()
    new = await receivers(smtputf8=True)
    res = await client.deliver([target(old.port), target(new.port)], "zoë@example.test",
                               ["bob@remote.test"], UTF8, helo="h.test")
    assert res.results["bob@remote.test"].outcome == "delivered"
    assert old.mail_commands == [] and old.commands[-1] == "QUIT"  # asked nothing, left
    (m,) = new.messages
    assert m.data == UTF8 and "SMTPUTF8" in m.mail.split()


async def test_without_smtputf8_anywhere_permanent_but_temporary_if_a_host_was_down(
        receivers: ReceiverFactory) -> None:
    old = await receivers()
    res = await client.deliver([target(old.port)], "a@example.test", ["bob@remote.test"],
                               UTF8, helo="h.test")
    r = res.results["bob@remote.test"]
    assert (r.outcome, r.status) == ("permanent", "5.6.7") and "SMTPUTF8" in r.reply
    # a host that could not be asked might offer it: try again later
    res = await client.deliver([target(free_port_unused()), target(old.port)],
                               "a@example.test", ["bob@remote.test"], UTF8, helo="h.test",
                               connect_timeout=2)
    assert res.results["bob@remote.test"].outcome == "temporary"
    assert old.mail_commands == []


async def test_data_is_streamed_from_a_file_with_dot_stuffing(
        receivers: ReceiverFactory, receiver_tls: ssl.SSLContext, tmp_path: Path) -> None:
    """A message larger than many chunks, lines starting with ".", over STARTTLS: the
    receiver gets it byte for byte."""
    rx = await receivers(ssl_context=receiver_tls)
    body = b"".join(b".%d line that starts with a dot\r\n" % i for i in range(40000))
    message = b"Subject: big\r\n\r\n" + body + b".\r\n..\r\n"
    p = tmp_path / "msg"
    p.write_bytes(message)
    res = await client.deliver([target(rx.port)], "a@example.test", ["bob@remote.test"],
                               Outbound.from_file(p), helo="h.test")
    assert res.results["bob@remote.test"].outcome == "delivered" and res.tls
    (m,) = rx.messages
    assert m.size == len(message) and m.data == message
    assert f"SIZE={len(message)}" in m.mail.split()


async def test_a_reply_before_the_end_of_data_is_heard(receivers: ReceiverFactory,
                                                       tmp_path: Path) -> None:
    """A server that refuses in the middle of a long message and closes: the client stops
    sending and reports that reply (or a lost connection), never hangs to the timeout."""
    import asyncio

    async def refuse_mid_data(reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 x ESMTP\r\n")
        while line := await reader.readline():
            if line.startswith(b"EHLO"):
                writer.write(b"250-x\r\n250 SIZE 100000000\r\n")
            elif line.startswith(b"DATA"):
                writer.write(b"354 go\r\n")
                await writer.drain()
                await reader.readexactly(200_000)
                writer.write(b"552 5.3.4 too much\r\n")
                await writer.drain()
                writer.close()
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    server = await asyncio.start_server(refuse_mid_data, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    p = tmp_path / "msg"
    p.write_bytes(b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 20000)
    try:
        started = asyncio.get_running_loop().time()
        res = await client.deliver([target(port)], "a@example.test", ["bob@remote.test"],
                                   Outbound.from_file(p), helo="h.test", timeout=20)
        assert asyncio.get_running_loop().time() - started < 5
    finally:
        server.close()
    r = res.results["bob@remote.test"]
    assert (r.outcome, r.status) == ("permanent", "5.3.4"), r


@pytest.mark.parametrize("limit_reply", ["552 5.5.3 Too many recipients",
                                         "452 4.5.3 Too many recipients"])
async def test_recipient_limit_sends_the_rest_in_a_new_transaction_at_once(
        receivers: ReceiverFactory, limit_reply: str) -> None:
    """RFC 5321 §4.5.3.1.10: "too many recipients" (452, or 552 as RFC 821 had it) is not a
    failure of the recipient: the rest go in another transaction, on the same connection."""
    rx = await receivers(max_rcpts=2, rcpt_limit_reply=limit_reply)
    rcpts = [f"r{i}@remote.test" for i in range(5)]
    res = await client.deliver([target(rx.port)], "a@example.test", rcpts, MSG,
                               helo="me.test")
    assert {r: res.results[r].outcome for r in rcpts} == dict.fromkeys(rcpts, "delivered")
    assert [m.recipients for m in rx.messages] == [rcpts[0:2], rcpts[2:4], rcpts[4:]]
    assert rx.sessions == 1
    assert len(rx.mail_commands) == 3


async def test_recipient_limit_then_a_refusal_of_the_first_is_final(
        receivers: ReceiverFactory) -> None:
    """A 552 to the first RCPT of a transaction is about that recipient (a full mailbox),
    not the limit: it is final, and the next ones still go."""
    rx = await receivers(max_rcpts=1, rcpt_replies={"full@remote.test": ["552 5.2.2 full"] * 3})
    rcpts = ["a@remote.test", "full@remote.test", "b@remote.test"]
    res = await client.deliver([target(rx.port)], "a@example.test", rcpts, MSG,
                               helo="me.test")
    assert {r: res.results[r].outcome for r in rcpts} == {
        "a@remote.test": "delivered", "full@remote.test": "permanent",
        "b@remote.test": "delivered"}
    assert res.results["full@remote.test"].status == "5.2.2"
    assert [m.recipients for m in rx.messages] == [["a@remote.test"], ["b@remote.test"]]
    assert rx.sessions == 1


async def test_connection_lost_in_a_later_transaction_keeps_what_was_delivered(
        receivers: ReceiverFactory) -> None:
    """The first transaction's recipients were delivered: the rest are retried later, and
    nothing is sent twice (not again on this host, nor on the next one)."""
    rx = await receivers(max_rcpts=1, drop_after_messages=1)
    other = await receivers()
    rcpts = ["a@remote.test", "b@remote.test"]
    res = await client.deliver([target(rx.port), target(other.port, host="mx2.remote.test")],
                               "x@example.test", rcpts, MSG, helo="me.test")
    assert res.results["a@remote.test"].outcome == "delivered"
    assert res.results["b@remote.test"].outcome == "temporary"
    assert [m.recipients for m in rx.messages] == [["a@remote.test"]]
    assert other.sessions == 0
