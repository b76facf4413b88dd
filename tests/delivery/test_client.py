"""The outbound SMTP client against a recording receiver over real sockets and TLS."""

from __future__ import annotations

import ssl

from mailfort.delivery import client
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
    assert "cannot connect" in res.results["bob@remote.test"].reply


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
