"""A client that pipelines commands the engine answers itself and does not read: what the
server holds for it meanwhile (shared by the SMTP, IMAP and ManageSieve server tests; the
POP3 one is tests/server/test_pop3.py)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

# What one read of such commands made the session hold before the engines paused at
# ``OUTPUT_PAUSE`` (64 KiB): SMTP VRFYs 1.3 MB, IMAP CAPABILITYs 0.7 MB, ManageSieve
# CAPABILITYs 1.6 MB; after, 70-80 KB (a pass of 64 KiB and the transport's high-water mark
# at most).
HELD_MAX = 256 * 1024


def slow_client(port: int) -> tuple[socket.socket, Any]:
    """A client socket with a 4 KB receive buffer (it reads slowly), and its reader."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    return sock, sock.makefile("rb")


def _read_exactly(reader: Any, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = reader.read1(min(1 << 20, n - len(got)))
        assert chunk, f"connection closed early after {len(got)} of {n} octets"
        got += chunk
    return bytes(got)


async def pipeline_without_reading(sock: socket.socket, reader: Any, session: Any,
                                   command: bytes, answer: bytes, count: int) -> None:
    """Send ``count`` times ``command`` in one go, read nothing for a second, check the
    session holds under ``HELD_MAX`` (the transport's buffer and the engine's pending
    output), then read and check every answer, in order."""
    send = asyncio.create_task(asyncio.to_thread(sock.sendall, command * count))
    try:
        await asyncio.sleep(1.0)  # the server answers what it can; the client reads nothing
        held = session.transport.get_write_buffer_size() \
            + sum(len(b) for b in session.engine._out)
        assert held < HELD_MAX, held
        expected = answer * count
        got = await asyncio.to_thread(_read_exactly, reader, len(expected))
        await send
    finally:
        if not send.done():
            sock.shutdown(socket.SHUT_RDWR)  # a failed check: unblock the sender
            await asyncio.gather(send, return_exceptions=True)
    assert got == expected
