"""The control socket: how operator commands reach the running server at once.

A unix stream socket ``<data_dir>/control.sock``, mode 0600, owned by the server's user
(root and that user may talk to it). One request line, one reply line, then close::

    retry [ID]   ->  ok N              (entries made due now; the worker rescans at once)
    status       ->  ok {json}         (listeners, queue, certificate, sessions)
    blocks       ->  ok [json]         (blocked clients, slowed accounts, time left)
    unblock X    ->  ok TEXT           (lift a client's block / forget an account's failures)
    anything     ->  error TEXT        (so is a line over MAX_LINE bytes)

The client (``request``) says whether a server answered, so the CLI never claims that a
server did something when none is running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger("mailfort")

SOCKET_NAME = "control.sock"
MAX_LINE = 1024  # bytes of a request line; a longer one is answered with an error
TIMEOUT = 10.0

Handler = Callable[[list[str]], Awaitable[str]]


def socket_path(data_dir: Path) -> Path:
    return data_dir / SOCKET_NAME


class ControlServer:
    """Serves the line protocol with ``handlers[command](args) -> reply text``."""

    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self.server: asyncio.base_events.Server | None = None
        self._inode = 0  # of the socket file this server made (see close)

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket of a server that did not stop cleanly
        old = os.umask(0o177)  # 0600 from creation: no window where others may connect
        try:
            self.server = await asyncio.start_unix_server(self._client, path=str(self.path),
                                                          limit=MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._inode = os.stat(self.path).st_ino

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)
            self.server = None
        # Only our own file: after a reload of the configuration, the next worker
        # generation's primary may already have put its socket at this path.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), TIMEOUT)
            except ValueError:  # no newline within MAX_LINE: no request is that long
                line = None
            words = line.decode("utf-8", "replace").split() if line is not None else []
            handler = self.handlers.get(words[0]) if words else None
            if line is None:
                reply = f"error request line longer than {MAX_LINE} bytes"
            elif handler is None:
                reply = f"error unknown command; known: {', '.join(sorted(self.handlers))}"
            else:
                try:
                    reply = await handler(words[1:])
                except Exception as exc:  # the operator gets the reason, the server lives
                    # One line: a refused request (`queue retry nosuch`) is not a crash.
                    # The traceback is there for debugging, at debug level.
                    log.warning("control command %r failed: %s", " ".join(words)[:200],
                                " ".join(str(exc).split()) or type(exc).__name__)
                    log.debug("control command %s failed", words[0], exc_info=True)
                    reply = f"error {exc}"
            writer.write(reply.replace("\n", " ").encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


class NotRunning(Exception):
    """No server answered on the control socket."""


def request(data_dir: Path, line: str, timeout: float = TIMEOUT) -> str:
    """Send one request; the reply line. Raises NotRunning when nobody answers."""
    path = socket_path(data_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NotRunning(f"no server answers on {path}") from exc
        sock.sendall(line.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.decode("utf-8", "replace").strip()


def parse_status(reply: str) -> dict[str, object]:
    ok, _, payload = reply.partition(" ")
    if ok != "ok":
        raise ValueError(reply)
    result = json.loads(payload)
    assert isinstance(result, dict)
    return result
