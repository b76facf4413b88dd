"""The lab's capture points: where the consequences of an attack can be seen.

* ``CaptureSMTP``: a small SMTP receiver on loopback, built on mailfort's own engine. One
  plays the victim's remote server (relayed mail lands there), another the mailbox of the
  forged sender (backscatter arrives there). Every message is kept, and written to the
  lab's scratch directory.
* ``RecordingProxy``: a TCP proxy in front of a server that records every byte in both
  directions, as an eavesdropper on the path would see them. It connects upstream from
  the client's own loopback address, so the server counts each client as itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import typing
from dataclasses import dataclass, field
from pathlib import Path

from mailfort.protocol import smtp as e
from mailfort.protocol.replies import Reply


@dataclass
class Captured:
    sender: str
    recipients: list[str]
    data: bytes


class _CaptureSession(asyncio.Protocol):
    def __init__(self, owner: CaptureSMTP) -> None:
        self.owner = owner
        self.engine = e.SMTPEngine(e.EngineSettings(hostname=owner.hostname))
        self.transport: asyncio.Transport | None = None
        self._reset()

    def _reset(self) -> None:
        self.sender = ""
        self.rcpts: list[str] = []
        self.data = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = typing.cast(asyncio.Transport, transport)
        self.transport = transport
        self.engine.greet()
        self._pump()

    def data_received(self, data: bytes) -> None:
        self.engine.receive(data)
        self._pump()

    def _pump(self) -> None:
        # The engine stops parsing at OUTPUT_PAUSE octets of its own replies: go on while
        # a batch that full came out (nothing else would resume it before more input).
        while self._pump_batch() >= e.OUTPUT_PAUSE and not self.engine.closed:
            pass

    def _pump_batch(self) -> int:
        eng = self.engine
        while (ev := eng.next_event()) is not None:
            if isinstance(ev, e.MailFrom):
                self._reset()
                self.sender = "" if ev.sender is None else str(ev.sender)
                eng.decide(Reply(250, "2.1.0", "OK"))
            elif isinstance(ev, e.RcptTo):
                self.rcpts.append(str(ev.recipient))
                eng.decide(Reply(250, "2.1.5", "OK"))
            elif isinstance(ev, e.DataStart):
                eng.decide(Reply(354, "", "Go ahead") if not ev.bdat else Reply(250, "2.0.0",
                                                                                "OK"))
            elif isinstance(ev, e.DataChunk):
                self.data += ev.data
            elif isinstance(ev, e.MessageComplete):
                self.owner.store(Captured(self.sender, list(self.rcpts), bytes(self.data)))
                self._reset()
                eng.decide(Reply(250, "2.0.0", "Captured"))
            elif isinstance(ev, e.ResetTransaction | e.MessageAborted):
                self._reset()
        out = eng.take_output()
        if self.transport is not None:
            if out:
                self.transport.write(out)
            if eng.closed:
                self.transport.close()
        return len(out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class CaptureSMTP:
    """A receiving SMTP server that keeps every message (see the module docstring)."""

    def __init__(self, name: str, hostname: str, spool: Path) -> None:
        self.name = name
        self.hostname = hostname
        self.spool = spool
        self.messages: list[Captured] = []
        self._lock = threading.Lock()
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.spool.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _CaptureSession(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def store(self, msg: Captured) -> None:
        with self._lock:
            self.messages.append(msg)
            n = len(self.messages)
        (self.spool / f"{n:04d}.eml").write_bytes(msg.data)

    def snapshot(self) -> list[Captured]:
        with self._lock:
            return list(self.messages)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)


@dataclass
class Chunk:
    conn: int
    direction: str  # ">" client to server, "<" server to client
    data: bytes


@dataclass
class Recording:
    chunks: list[Chunk] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, conn: int, direction: str, data: bytes) -> None:
        with self.lock:
            self.chunks.append(Chunk(conn, direction, data))

    def mark(self) -> int:
        with self.lock:
            return len(self.chunks)

    def since(self, mark: int) -> list[Chunk]:
        with self.lock:
            return list(self.chunks[mark:])


class RecordingProxy:
    """Forwards 127.0.0.1:port to the server's port and records both directions."""

    def __init__(self, name: str, upstream_port: int) -> None:
        self.name = name
        self.upstream_port = upstream_port
        self.recording = Recording()
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._conns = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns += 1
        conn = self._conns
        peer = writer.get_extra_info("peername") or ("127.0.0.1", 0)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port,
                                                       local_addr=(peer[0], 0))
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(self._pipe(reader, up_w, conn, ">"),
                                 self._pipe(up_r, writer, conn, "<"))
        except asyncio.CancelledError:
            # Only ``close`` cancels this handler, at the lab's end. asyncio's stream server
            # would report a cancelled handler as an error (3.11), so it ends quietly.
            pass
        finally:
            for w in (writer, up_w):
                w.close()
            if task is not None:
                self._tasks.discard(task)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, conn: int,
                    direction: str) -> None:
        try:
            while data := await src.read(65536):
                self.recording.add(conn, direction, data)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.write_eof()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)
