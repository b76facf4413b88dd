"""A connection that ends during STARTTLS/STLS gives its connection slot back (issue 24, 2).

asyncio hands a connection being upgraded to its TLS layer: when the connection dies in
the handshake, that layer hears of it and the session's ``connection_lost`` is never
called. Every way a client can end the connection there (a reset, a FIN, a ClientHello
cut short, garbage instead of TLS, silence until the handshake timeout) is played here
over real sockets against MX, submission and POP3; each must leave no session and no
counted slot behind, and the address must be served again. ``mailfort serve`` (workers
and the shared connection table) gets the issue's reproduction: 55 resets after STARTTLS,
then a normal session is greeted and ``mailfort status`` shows no session.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest

from mailfort.config import Config
from mailfort.server import session as session_mod
from mailfort.server.app import Node
from tests.conftest import refusing_dns_port, seed_directory
from tests.server.production import cli, serving, world_dir, write_config

MODES = ("rst", "rst-mid-hello", "fin", "fin-mid-hello", "garbage", "stall")
PER_IP = 2  # limits.max_connections_per_ip of these nodes (loopback not exempted)


def client_hello() -> bytes:
    """A real TLS ClientHello, as the first flight of a client."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="mx.example.test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def _line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def _reply(sock: socket.socket) -> bytes:
    while True:
        line = _line(sock)
        if len(line) < 4 or line[3:4] != b"-":
            return line


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # SO_LINGER 0: the close sends a RST


def _until_closed(sock: socket.socket) -> None:
    """Read until the server closes (or resets) the connection."""
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    sock.close()


def abrupt_upgrade(port: int, pop3: bool, mode: str) -> None:
    """Ask for STARTTLS (STLS), get the go-ahead, then end the connection as ``mode``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    greeting = _reply(sock)
    assert greeting.startswith(b"+OK" if pop3 else b"220 "), greeting
    if pop3:
        sock.sendall(b"STLS\r\n")
        assert _line(sock).startswith(b"+OK"), mode
    else:
        sock.sendall(b"EHLO client.example.org\r\n")
        assert _reply(sock).startswith(b"250 ")
        sock.sendall(b"STARTTLS\r\n")
        assert _reply(sock).startswith(b"220 "), mode
    hello = client_hello()
    if mode == "rst":
        _reset(sock)
    elif mode == "rst-mid-hello":
        sock.sendall(hello[: len(hello) // 2])
        time.sleep(0.05)  # the server has begun the handshake
        _reset(sock)
    elif mode == "fin":
        sock.shutdown(socket.SHUT_WR)
        _until_closed(sock)
    elif mode == "fin-mid-hello":
        sock.sendall(hello[: len(hello) // 2])
        sock.shutdown(socket.SHUT_WR)
        _until_closed(sock)
    elif mode == "garbage":
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x00" * 300)
        _until_closed(sock)
    elif mode == "stall":
        _until_closed(sock)  # the server's handshake timeout ends it
    else:
        raise AssertionError(mode)


def greet(port: int, pop3: bool) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        return _reply(sock)


async def _released(node: Node, name: str) -> bool:
    listener: Any = node.services.get(name) or node.pop3[name]
    for _ in range(300):
        if not listener.sessions and node.limiter.total == 0:
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.mark.parametrize("service", ["mx", "submission", "pop3"])
async def test_every_end_during_the_upgrade_releases_the_slot(
    service: str, config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_mod, "TLS_HANDSHAKE_TIMEOUT", 0.3)  # the "stall" case
    cfg = config_factory(limits={"max_connections_per_ip": PER_IP,
                                 "connection_limit_exceptions": []})
    seed_directory(cfg)
    pop3 = service == "pop3"
    async with Node(cfg, ssl_context=server_ssl_context) as node:
        port = node.port(service)
        for mode in MODES:
            await asyncio.to_thread(abrupt_upgrade, port, pop3, mode)
            assert await _released(node, service), (
                f"{service} {mode}: session or slot left: {node.limiter.total} counted")
        # More abrupt ends than the address has slots, and it is still served.
        assert (await asyncio.to_thread(greet, port, pop3)).startswith(
            b"+OK" if pop3 else b"220 ")


def test_resets_after_starttls_do_not_lock_an_address_out_of_a_served_node() -> None:
    """The issue's reproduction against ``mailfort serve`` (two workers, the shared
    table): 55 STARTTLS + reset, 55 STLS + reset; then 220 / +OK, and no session left."""
    root = world_dir()
    config = write_config(root, refusing_dns_port(), server={"workers": 2},
                          log={"file": str(root / "serve.log")},
                          limits={"connection_limit_exceptions": []})
    seed_directory(_load(config))
    data_dir = root / "data"
    ports = _ports(config)
    with serving(config, data_dir):
        for _ in range(55):
            abrupt_upgrade(ports["mx"], False, "rst")
            abrupt_upgrade(ports["pop3"], True, "rst")
        assert greet(ports["mx"], False).startswith(b"220 ")
        assert greet(ports["pop3"], True).startswith(b"+OK")
        deadline = time.monotonic() + 10
        while True:
            r = cli(config, "status", "--json")
            sessions = json.loads(r.stdout)["sessions"] if r.returncode == 0 else None
            if sessions is not None and not any(sessions.values()):
                break
            assert time.monotonic() < deadline, (r.stdout, r.stderr)
            time.sleep(0.1)


def _load(config: Any) -> Config:
    from mailfort.config import load

    return load(config)


def _ports(config: Any) -> dict[str, int]:
    cfg = _load(config)
    return {name: int(getattr(cfg.listen, name)[0].rsplit(":", 1)[1])
            for name in ("mx", "pop3")}
