"""Accepting with a gate (server/acceptor.py), on real loopback sockets.

The protocol greets on connection; a client that gets no greeting was not accepted: its
connection waits in the listening socket's queue, which the kernel completes on its own.
"""

from __future__ import annotations

import asyncio
import socket
import typing
from typing import ClassVar

import pytest

from mailfort.server.acceptor import AcceptGate, Acceptor, bind


class Greeter(asyncio.Protocol):
    accepted = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = typing.cast(asyncio.Transport, transport)
        Greeter.accepted += 1
        transport.write(b"220 hello\r\n")


async def _greeted(port: int, timeout: float) -> tuple[bool, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError:
        return False, writer
    return line.startswith(b"220"), writer


async def _until(predicate: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_a_closed_gate_leaves_connections_waiting_and_opening_it_serves_them() -> None:
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    acceptor = Acceptor(sock, Greeter, None, None)
    acceptor.set_gate(False)
    greeted, writer = await _greeted(port, 0.3)
    assert not greeted and acceptor.waiting()
    acceptor.set_gate(True)
    greeted, later = await _greeted(port, 5)  # the one that waited is served, and this one
    assert greeted
    await _until(lambda: not acceptor.waiting())
    writer.close()
    later.close()
    acceptor.close()
    assert acceptor.sockets == [] and sock.fileno() == -1
    await acceptor.wait_closed()


async def test_the_gate_opens_while_the_node_is_busy_or_connections_wait() -> None:
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    acceptor = Acceptor(sock, Greeter, None, None)
    node_connections = 0
    gate = AcceptGate([acceptor], lambda: node_connections)
    gate.HOLD = 0.2
    try:
        before = Greeter.accepted
        # Quiet node, nothing waiting: closed. A connection arrives: it waits in the queue,
        # the gate sees it waiting and opens (another worker would have taken it first).
        greeted, w1 = await _greeted(port, 5)
        assert greeted and Greeter.accepted == before + 1
        w1.close()
        await asyncio.sleep(0.4)  # past HOLD: closed again
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.settimeout(5)
            await _until(acceptor.waiting)  # not accepted at once: the gate was closed
            assert (await asyncio.to_thread(raw.recv, 64)).startswith(b"220")  # within ticks
        await asyncio.sleep(0.4)
        node_connections = AcceptGate.BUSY_AT  # a busy node: open without anything waiting
        await _until(lambda: acceptor.gate_open)  # at the next look, nothing waiting
        greeted, w2 = await _greeted(port, 0.1)
        assert greeted
        w2.close()
        node_connections = 0
    finally:
        gate.stop()
        acceptor.close()


def test_bind_listens_on_ipv6_too() -> None:
    try:
        sock = bind("::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    with sock:
        assert sock.family == socket.AF_INET6 and sock.getsockname()[1] > 0


class _Recorder(asyncio.Protocol):
    nodelay: ClassVar[list[int]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        _Recorder.nodelay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        transport = typing.cast(asyncio.Transport, transport)
        transport.write(b"* OK\r\n")


@pytest.mark.parametrize("tls", [False, True])
async def test_every_accepted_connection_has_nagle_off(tls: bool) -> None:
    """A reply written in two parts (IMAP's untagged lines, then the tagged one) must not
    wait for the client's delayed ACK: 40 ms per command. ``socket.create_server`` makes
    sockets with protocol 0, for which asyncio does not set TCP_NODELAY itself."""
    import ssl

    import trustme

    ctx = None
    client_ctx = None
    if tls:
        ca = trustme.CA()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("localhost").configure_cert(ctx)
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
    sock = bind("127.0.0.1", 0)
    acceptor = Acceptor(sock, _Recorder, ctx, 5.0 if tls else None)
    _Recorder.nodelay = []
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", sock.getsockname()[1], ssl=client_ctx,
        server_hostname="localhost" if tls else None)
    assert await asyncio.wait_for(reader.readline(), 5) == b"* OK\r\n"
    assert _Recorder.nodelay == [1]
    writer.close()
    acceptor.close()
    await acceptor.wait_closed()


async def test_a_worker_over_its_share_takes_connections_again_when_one_of_its_own_ends(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker over its share leaves waiting connections to the others for ``DEFER``;
    when one of its own connections ends (``share_changed``, from the limiter's release)
    it looks again at once. Two workers used to rest in turn that way with connections
    waiting, and 10 senders of a message per connection ran at half their rate."""
    from mailfort.server import acceptor as module
    monkeypatch.setattr(module, "DEFER", 60.0)  # a deferral that would outlast the test
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    acceptor = Acceptor(sock, Greeter, None, None)
    share = [0]
    acceptor.balance = lambda waiting: share[0]
    greeted, writer = await _greeted(port, 0.3)
    assert not greeted and acceptor.waiting()  # over its share: left waiting
    share[0] = 1
    acceptor.share_changed()  # one of its connections ended
    await _until(lambda: not acceptor.waiting(), timeout=5.0)
    writer.close()
    acceptor.close()
    await acceptor.wait_closed()
