"""The control socket: its file belongs to the server that made it; its line limit."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from mailfort.server.control import MAX_LINE, ControlServer, request, socket_path


async def test_a_closing_server_leaves_its_successors_socket_in_place(tmp_path: Path) -> None:
    """After a configuration reload the next primary worker may put its socket at the
    path before the one it replaces has closed: that close must not remove it."""

    async def answer(name: str) -> dict[str, object]:
        async def status(args: list[str]) -> str:
            return f"ok {name}"

        return {"status": status}

    path = socket_path(tmp_path)
    first = ControlServer(path, await answer("first"))  # type: ignore[arg-type]
    await first.start()
    assert await asyncio.to_thread(request, tmp_path, "status") == "ok first"
    second = ControlServer(path, await answer("second"))  # type: ignore[arg-type]
    await second.start()
    await first.close()
    assert path.exists()
    assert await asyncio.to_thread(request, tmp_path, "status") == "ok second"
    await second.close()
    assert not path.exists()


async def test_an_overlong_request_line_is_answered_and_the_server_lives_on(
    tmp_path: Path,
) -> None:
    """Issue 24: a line over the stream's 64 KiB limit raised an uncaught error and the
    client got no answer. Any line over MAX_LINE is answered with an error, then closed;
    the next request is served."""

    async def status(args: list[str]) -> str:
        return "ok alive"

    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    server = ControlServer(socket_path(tmp_path), {"status": status})
    await server.start()

    def send(data: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(socket_path(tmp_path)))
            sock.sendall(data)
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
            return reply

    try:
        for size in (70 * 1024, MAX_LINE + 1):
            reply = await asyncio.to_thread(send, b"status " + b"x" * size + b"\n")
            assert reply.startswith(b"error request line longer than"), (size, reply)
        assert await asyncio.to_thread(send, b"status " + b"x" * 100 + b"\n") == b"ok alive\n"
        assert await asyncio.to_thread(request, tmp_path, "status") == "ok alive"
    finally:
        await server.close()
    assert unhandled == []
