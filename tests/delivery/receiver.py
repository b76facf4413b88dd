"""A recording SMTP server for delivery tests, on 127.0.0.1, scriptable per test.

It answers just enough SMTP for an MTA client: EHLO/HELO, STARTTLS (when given an SSL
context), MAIL, RCPT, DATA, RSET, NOOP, QUIT. Replies can be scripted: ``rcpt_replies``
maps an address to a list of replies used one per attempt (then 250), ``data_replies`` is
a list used one per DATA (then 250), ``mail_reply`` answers every MAIL. Everything seen is
recorded in ``commands`` and, for each accepted message, in ``messages``.

``max_rcpts``, when set, is the server's recipient limit per transaction: past it every RCPT
gets ``rcpt_limit_reply`` (RFC 5321 §4.5.3.1.10; "552" as RFC 821 had it, or "452").

``starttls_reply``, when set, answers STARTTLS with it (e.g. "454 4.7.0 not now") instead
of starting TLS. ``smtputf8`` advertises SMTPUTF8 (RFC 6531); ``requiretls`` advertises
REQUIRETLS (RFC 8689) once TLS is active. ``keep_data=False`` keeps only
the size and SHA-256 of each message (a memory measurement must not count the receiver's copies).
``auth``, when set (e.g. "PLAIN LOGIN"), is advertised as AUTH, in clear as well (as a
careless provider would); ``auth_reply`` answers the credentials, which are recorded,
decoded, with whether TLS was active, in ``logins``.
``probe``, when set, is called with every command line and with "." at each end of data,
while the client waits for the reply: a test measures the client's state there.

Faults of a real remote: ``stall_at`` ("BANNER" or a verb such as "EHLO", "MAIL", "DATA")
stops answering there, for good, while keeping the connection open; ``drop_in_data``
closes the connection after the first line of the message; ``drop_after_messages`` closes
it after accepting that many messages in the session (before the next command's reply).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    tls: bool
    helo: str
    size: int = 0  # octets after dot-unstuffing
    sha256: str = ""
    mail: str = ""  # the MAIL command line as sent
    accepted_at: float = 0.0  # time.monotonic() just before the 250 was sent


@dataclass
class Receiver:
    ssl_context: ssl.SSLContext | None = None  # offer STARTTLS when set
    banner: str = "220 receiver.test ESMTP"
    mail_reply: str = "250 2.1.0 ok"
    rcpt_replies: dict[str, list[str]] = field(default_factory=dict)
    data_replies: list[str] = field(default_factory=list)
    max_rcpts: int | None = None
    rcpt_limit_reply: str = "552 5.5.3 Too many recipients"
    stall_data: asyncio.Event | None = None  # when set: hold the DATA reply until it fires
    starttls_reply: str | None = None
    smtputf8: bool = False
    requiretls: bool = False
    keep_data: bool = True
    probe: Callable[[str], None] | None = None
    auth: str = ""
    auth_reply: str = "235 2.7.0 Authentication successful"
    logins: list[tuple[str, str, str, bool]] = field(default_factory=list)  # mech,user,pw,tls
    stall_at: str | None = None
    drop_in_data: bool = False
    drop_after_messages: int | None = None
    quit_delay: float = 0.0  # seconds before the QUIT reply (a slow remote after DATA)
    messages: list[Received] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    sessions: int = 0
    tls_sessions: int = 0
    data_started: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    _server: asyncio.Server | None = None

    async def start(self) -> Receiver:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    @property
    def mail_commands(self) -> list[str]:
        return [c for c in self.commands if c.upper().startswith("MAIL")]

    def rcpt_commands(self) -> list[str]:
        return [c for c in self.commands if c.upper().startswith("RCPT")]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        try:
            await self._session(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()

        tls = False
        helo = ""
        sender: str | None = None
        mail_line = ""
        rcpts: list[str] = []
        if self.stall_at == "BANNER":
            await _hold(reader)
            return
        await send(self.banner)
        if not self.banner.startswith("220"):
            return
        while True:
            raw = await reader.readline()
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.commands.append(line)
            if self.probe is not None:
                self.probe(line)
            verb = line[:4].upper()
            arg = line[5:] if len(line) > 5 else ""
            if self.drop_after_messages is not None and \
                    len(self.messages) >= self.drop_after_messages:
                return
            if verb == self.stall_at:
                await _hold(reader)
                return
            if verb == "EHLO":
                helo = arg
                exts = ["SIZE 10485760", "8BITMIME"]
                if self.smtputf8:
                    exts.append("SMTPUTF8")
                if self.requiretls and tls:
                    exts.append("REQUIRETLS")
                if self.ssl_context is not None and not tls:
                    exts.append("STARTTLS")
                if self.auth:
                    exts.append(f"AUTH {self.auth}")
                lines = ["250-receiver.test", *(f"250-{e}" for e in exts[:-1]), f"250 {exts[-1]}"]
                for x in lines:
                    writer.write(x.encode() + b"\r\n")
                await writer.drain()
            elif verb == "HELO":
                helo = arg
                await send("250 receiver.test")
            elif line.upper() == "STARTTLS" and self.starttls_reply is not None:
                await send(self.starttls_reply)
            elif line.upper() == "STARTTLS" and self.ssl_context is not None and not tls:
                await send("220 2.0.0 go ahead")
                await writer.start_tls(self.ssl_context)
                tls = True
                self.tls_sessions += 1
                sender, rcpts, helo = None, [], ""
            elif verb == "AUTH" and self.auth:
                mech, _, initial = arg.partition(" ")
                if mech.upper() == "PLAIN":
                    _z, user, pw = base64.b64decode(initial).decode().split("\0")
                else:
                    await send("334 VXNlcm5hbWU6")
                    user = base64.b64decode(await reader.readline()).decode()
                    await send("334 UGFzc3dvcmQ6")
                    pw = base64.b64decode(await reader.readline()).decode()
                self.logins.append((mech.upper(), user, pw, tls))
                await send(self.auth_reply)
            elif verb == "MAIL":
                if not self.mail_reply.startswith("250"):
                    await send(self.mail_reply)
                    continue
                sender = _path(arg)
                mail_line = line
                rcpts = []
                await send(self.mail_reply)
            elif verb == "RCPT":
                addr = _path(arg)
                script = self.rcpt_replies.get(addr)
                if self.max_rcpts is not None and len(rcpts) >= self.max_rcpts:
                    reply = self.rcpt_limit_reply
                else:
                    reply = script.pop(0) if script else "250 2.1.5 ok"
                if reply.startswith("250"):
                    rcpts.append(addr)
                await send(reply)
            elif verb == "DATA":
                if sender is None or not rcpts:
                    await send("503 5.5.1 no valid recipients")
                    continue
                await send("354 go ahead")
                if self.drop_in_data:
                    await reader.readline()
                    return  # closed mid-message: nothing accepted
                data, size, digest = await _read_data(reader, keep=self.keep_data)
                if self.probe is not None:
                    self.probe(".")
                self.data_started.set()
                if self.stall_data is not None:
                    await self.stall_data.wait()
                    if reader.at_eof():  # the client died meanwhile: nothing was accepted
                        return
                reply = self.data_replies.pop(0) if self.data_replies else "250 2.0.0 queued"
                if reply.startswith("250"):
                    self.messages.append(
                        Received(sender, rcpts, data, tls, helo, size, digest, mail_line,
                                 time.monotonic()))
                sender, rcpts = None, []
                await send(reply)
            elif verb == "RSET":
                sender, rcpts = None, []
                await send("250 2.0.0 ok")
            elif verb == "NOOP":
                await send("250 2.0.0 ok")
            elif verb == "QUIT":
                await asyncio.sleep(self.quit_delay)
                await send("221 2.0.0 bye")
                return
            else:
                await send("500 5.5.2 unknown command")


async def _hold(reader: asyncio.StreamReader) -> None:
    """Answer nothing more; read until the client gives up and closes."""
    while await reader.read(65536):
        pass


def _path(arg: str) -> str:
    """``FROM:<a@b> SIZE=1`` -> ``a@b``."""
    _, _, rest = arg.partition(":")
    rest = rest.strip()
    if rest.startswith("<"):
        return rest[1 : rest.index(">")] if ">" in rest else rest[1:]
    return rest.split(" ")[0]


async def _read_data(reader: asyncio.StreamReader, *, keep: bool) -> tuple[bytes, int, str]:
    """The message (or b"" unless ``keep``), its size and SHA-256, dot-unstuffed."""
    lines = []
    size = 0
    digest = hashlib.sha256()
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("eof in DATA")
        if line == b".\r\n":
            return b"".join(lines), size, digest.hexdigest()
        if line.startswith(b"."):
            line = line[1:]
        size += len(line)
        digest.update(line)
        if keep:
            lines.append(line)
