"""Run one message through one milter (rspamd's proxy, clamav-milter…) and say what it decided.

The asyncio driver of ``protocol/milter.py``: it connects to ``inet:HOST:PORT``,
``inet:[IPv6]:PORT`` or ``unix:/path``, sends the steps of one message (connect information,
HELO, MAIL, RCPT…, headers, the body in chunks of at most 65535 octets, end of message) and
returns a ``MilterVerdict``. Each awaited reply has ``timeout`` seconds (``Progress`` from the
filter restarts it) and the whole conversation ``total_timeout``. Anything that goes wrong on
the filter's side (unreachable, too slow, closed, protocol broken) is an ``error`` verdict, never
an exception: the caller maps it to the milter's ``on_error`` (tempfail by default: a message is
never silently left unfiltered because the filter was down).

Packets and round trips: a step the filter negotiated away (``SMFIP_NO*``) is not sent, and
one it does not answer (``SMFIP_NR_*``) is not written on its own: the steps are gathered and
written at once when a reply is awaited (or when ``FLUSH_AT`` octets are pending, so that a
large body is never held whole). rspamd answers only OPTNEG and end of message, so a message
is one write and one round trip. ``MilterClient`` keeps the connections of finished messages
(``reuse``) and starts the next SMTP client on one with QUIT_NC then CONNECT, so OPTNEG and the
TCP set-up are not paid per message; an idle connection the filter closed meanwhile is
replaced, and the message asked again, before any of it counts.

The server asks it at the end of DATA/BDAT, before the 250 (server/milters.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from mailfort.protocol import milter as m
from mailfort.protocol.milter import parse_address

READ_CHUNK = 16384
_NOT_NAME = re.compile(rb"[\x00-\x20\x7f]")  # a header field name has none of these
MAX_HEADER_LINE = 65536  # a longer "header" line ends the header section (the rest is body)
FLUSH_AT = 65536  # octets of unanswered steps gathered before they are written anyway
# reuse: "never" (a connection per message), "continue" (after a message the filter ended
# with CONTINUE: where libmilter takes QUIT_NC), "always" (after any end-of-message reply:
# for filters that reset on QUIT_NC in any state, as rspamd's proxy does)
REUSE = ("never", "continue", "always")
# a callable (returning the message or a file of it) can be read again
Content = bytes | Path | BinaryIO | Callable[[], bytes | BinaryIO]


@dataclass(frozen=True, slots=True)
class MilterMessage:
    """What the MTA knows of one message when it asks the filter."""

    sender: str  # envelope MAIL FROM address, "" for the null sender
    recipients: Sequence[str]
    client_address: str = "127.0.0.1"  # "" when unknown
    client_port: int = 0
    client_name: str = "localhost"  # the verified reverse name, or "[addr]"
    helo: str = "localhost"
    # macros per step ("connect", "helo", "mail", "rcpt", "data", "eoh", "eom"), e.g.
    # {"connect": {"j": "mx.example", "{client_addr}": "192.0.2.1"}, "eom": {"i": "QID"}}
    macros: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MilterVerdict:
    """``action``: accept, continue (accepted with ``modifications``), reject, tempfail,
    discard, quarantine (accepted, to be held: ``quarantine`` says why) or error (``reason``;
    the caller applies ``on_error``). ``code``/``text`` are the filter's own reply when it
    gave one (REPLYCODE), else the defaults below."""

    action: str
    code: int = 0
    text: str = ""
    step: str = ""
    modifications: tuple[m.Modification, ...] = ()
    quarantine: str | None = None
    refused_recipients: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    reason: str = ""


DEFAULT_REJECT = (550, "5.7.1 Command rejected")
DEFAULT_TEMPFAIL = (451, "4.7.1 Service unavailable - try again later")


class _Stop(Exception):
    """Internal: the conversation ends here with this verdict."""

    def __init__(self, verdict: MilterVerdict) -> None:
        super().__init__(verdict.action)
        self.verdict = verdict


def split_message(source: bytes | Path | BinaryIO) -> tuple[list[tuple[str, str]], _Body]:
    """The header fields (name, unfolded-as-sent value) and an iterator of body chunks
    (``close`` it: a file opened here is closed then, read or not).

    A file is read in ``READ_CHUNK`` pieces; only the header section is held in memory."""
    stream: BinaryIO
    if isinstance(source, bytes):
        stream = io.BytesIO(source)
    elif isinstance(source, Path):
        stream = source.open("rb")
    else:
        stream = source
    headers: list[tuple[str, str]] = []
    leftover = b""
    while True:
        line = stream.readline(MAX_HEADER_LINE)
        if not line or line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + "\r\n" + _text(line).rstrip("\r\n"))
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or not line.endswith(b"\n") or _NOT_NAME.search(name):
            leftover = line  # not a header field: the body starts here
            break
        headers.append((_text(name), _text(value).strip(" \t\r\n")))
    return headers, _Body(stream, leftover, owned=isinstance(source, Path))


class _Body:
    """The rest of ``stream`` in chunks of at most ``MAX_BODY_CHUNK`` octets."""

    def __init__(self, stream: BinaryIO, leftover: bytes, owned: bool) -> None:
        self._stream, self._pending, self._owned = stream, leftover, owned
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        while not self._done and len(self._pending) < m.MAX_BODY_CHUNK:
            data = self._stream.read(READ_CHUNK)
            if not data:
                self._done = True
            self._pending += data
        if not self._pending:
            raise StopIteration
        chunk, self._pending = self._pending[:m.MAX_BODY_CHUNK], self._pending[m.MAX_BODY_CHUNK:]
        return chunk

    def close(self) -> None:
        self._done, self._pending = True, b""
        if self._owned:
            self._stream.close()


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").replace("\0", "\ufffd")


class _Connection:
    """One connection to the filter, with its protocol session and what it has cost."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.session = m.MilterSession()
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.writes = 0  # transport writes
        self.round_trips = 0  # waits for a reply
        self.replies = 0  # reply packets read (for "closed before it answered anything")
        self.idle_since = 0.0
        self.last_final: type | None = None  # the type of the EOM reply of the last message

    @property
    def usable(self) -> bool:
        return (not self.writer.is_closing() and not self.reader.at_eof()
                and self.session.error is None)

    def queue(self, data: bytes) -> None:
        if data:
            self.pending.append(data)
            self.pending_size += len(data)

    def queued(self, data: bytes) -> bool:
        """Queue a step the filter does not answer while nothing needs writing yet; False
        (nothing done) when ``send`` must take it. Most steps to rspamd go this way: no
        coroutine per step."""
        if self.session.awaiting or self.pending_size + len(data) >= FLUSH_AT:
            return False
        self.queue(data)
        return True

    async def flush(self) -> None:
        if self.pending:
            self.writer.write(b"".join(self.pending))
            self.writes += 1
            self.pending.clear()
            self.pending_size = 0
            await self.writer.drain()

    async def send(self, data: bytes, step: str, timeout: float) -> list[m.Event]:
        """Queue one step; when the filter answers it (or much is pending), write what is
        queued, and if a reply is awaited return the events up to its final one."""
        self.queue(data)
        if not self.session.awaiting:
            if self.pending_size >= FLUSH_AT:
                await self.flush()
            return []
        await self.flush()
        self.round_trips += 1
        events: list[m.Event] = []
        while self.session.awaiting:
            try:  # a timeout scope, not wait_for: no task per reply
                async with asyncio.timeout(timeout):
                    chunk = await self.reader.read(READ_CHUNK)
            except TimeoutError:
                raise _Stop(MilterVerdict("error", step=step, reason="timeout")) from None
            if not chunk:
                raise _Stop(MilterVerdict("error", step=step, reason="connection closed"))
            for event in self.session.receive(chunk):
                self.replies += 1
                if isinstance(event, m.ProtocolError):
                    raise _Stop(MilterVerdict("error", step=step, reason=event.reason))
                if not isinstance(event, m.Progress):
                    events.append(event)
        return events

    def abandon(self) -> None:
        """QUIT (when the session is sound) and close, without waiting."""
        try:
            if not self.writer.is_closing() and self.session.error is None:
                self.writer.write(self.session.quit())
            self.writer.close()
        except OSError:
            pass

    async def close(self) -> None:
        self.abandon()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)


def _decided(final: object, step: str) -> MilterVerdict | None:
    """The verdict a final reply gives at a step other than EOM; None to go on."""
    if isinstance(final, m.Continue) or final is None:
        return None
    if isinstance(final, m.Accept):
        return MilterVerdict("accept", step=step)
    if isinstance(final, m.Discard):
        return MilterVerdict("discard", step=step)
    if isinstance(final, m.Reject):
        return MilterVerdict("reject", *DEFAULT_REJECT, step=step)
    if isinstance(final, m.Tempfail):
        return MilterVerdict("tempfail", *DEFAULT_TEMPFAIL, step=step)
    if isinstance(final, m.ReplyCode):
        action = "reject" if final.code >= 500 else "tempfail"
        return MilterVerdict(action, final.code, final.text, step=step)
    return None


class MilterClient:
    """One filter's address, its timeouts, and its idle connections (at most ``max_idle``,
    each kept ``idle_timeout`` seconds). ``writes``, ``round_trips`` and ``connections``
    count what the conversations cost, for the tests and the benchmarks."""

    def __init__(self, address: str, *, timeout: float = 10.0, connect_timeout: float = 5.0,
                 total_timeout: float = 120.0, reuse: str = "never", max_idle: int = 1,
                 idle_timeout: float = 10.0) -> None:
        if reuse not in REUSE:
            raise ValueError(f"reuse must be one of {', '.join(REUSE)}")
        self.address = address
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.total_timeout = total_timeout
        self.reuse, self.max_idle, self.idle_timeout = reuse, max_idle, idle_timeout
        self._idle: list[_Connection] = []
        self.connections = self.writes = self.round_trips = 0
        self._target: tuple[str, str, int] | str  # parsed once; the error text otherwise
        try:
            self._target = parse_address(address)
        except ValueError as exc:
            self._target = str(exc)

    async def check(self, message: MilterMessage, content: Content) -> MilterVerdict:
        """Run ``message`` (``content``: the whole RFC 5322 message, CRLF line ends) through
        the filter. Never raises for anything the filter or the network does."""
        if not message.recipients:
            return MilterVerdict("error", step="rcpt", reason="a message needs a recipient")
        target = self._target
        if isinstance(target, str):
            return MilterVerdict("error", step="connect", reason=target)
        again = not isinstance(content, io.IOBase)  # bytes, a path or an opener
        conn = self._take()
        if conn is not None:
            verdict = await self._converse(conn, message, content)
            closed = verdict.reason == "connection closed" or verdict.reason.startswith(
                "connection failed")
            if not (verdict.action == "error" and closed and conn.replies == 0 and again):
                return verdict
            # the filter had closed it while idle: nothing was decided, ask on a new one
        conn = await self._open(target)
        if isinstance(conn, MilterVerdict):
            return conn
        return await self._converse(conn, message, content)

    def _take(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable and now - conn.idle_since < self.idle_timeout:
                return conn
            conn.abandon()
        return None

    async def _open(self, target: tuple[str, str, int]) -> _Connection | MilterVerdict:
        kind, where, port = target
        try:
            if kind == "unix":
                opening = asyncio.open_unix_connection(where)
            else:
                opening = asyncio.open_connection(where, port)
            reader, writer = await asyncio.wait_for(opening, self.connect_timeout)
        except (OSError, TimeoutError) as exc:
            return MilterVerdict("error", step="connect", reason=f"cannot connect: {exc!r}")
        self.connections += 1
        return _Connection(reader, writer)

    async def _converse(self, conn: _Connection, message: MilterMessage,
                        content: Content) -> MilterVerdict:
        writes, trips = conn.writes, conn.round_trips
        conn.replies = 0
        verdict: MilterVerdict | None = None
        stream = content() if callable(content) else content
        try:
            async with asyncio.timeout(self.total_timeout):
                verdict = await _run(conn, message, stream, self.timeout)
        except _Stop as stop:
            verdict = stop.verdict
        except TimeoutError:
            verdict = MilterVerdict("error", reason="total timeout")
        except (OSError, asyncio.IncompleteReadError) as exc:
            verdict = MilterVerdict("error", reason=f"connection failed: {exc!r}")
        except ValueError as exc:  # a NUL in what we were given to send: refuse, do not crash
            verdict = MilterVerdict("error", reason=f"cannot encode: {exc}")
        finally:
            if callable(content) and isinstance(stream, io.IOBase):
                stream.close()  # opened here
            self.writes += conn.writes - writes
            self.round_trips += conn.round_trips - trips
            if verdict is not None and self._keeps(conn, verdict):
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
            else:
                await conn.close()
        return verdict

    def _keeps(self, conn: _Connection, verdict: MilterVerdict) -> bool:
        """Whether the connection can carry the next client: the message went to its end
        of message, the filter's last word was one after which it takes QUIT_NC."""
        if self.reuse == "never" or verdict.step != "eom" or verdict.action == "error":
            return False
        if self.reuse == "continue" and conn.last_final is not m.Continue:
            return False
        return conn.usable and len(self._idle) < self.max_idle

    async def close(self) -> None:
        """Close the idle connections (the node stops)."""
        idle, self._idle = self._idle, []
        await asyncio.gather(*(conn.close() for conn in idle), return_exceptions=True)


async def check_message(address: str, message: MilterMessage,
                        content: bytes | Path | BinaryIO, *, timeout: float = 10.0,
                        connect_timeout: float = 5.0,
                        total_timeout: float = 120.0) -> MilterVerdict:
    """One message on a connection of its own (``MilterClient`` keeps them)."""
    client = MilterClient(address, timeout=timeout, connect_timeout=connect_timeout,
                          total_timeout=total_timeout)
    return await client.check(message, content)


def _final(events: list[m.Event]) -> object:
    return events[-1] if events else None


async def _run(conn: _Connection, msg: MilterMessage, content: bytes | Path | BinaryIO,
               timeout: float) -> MilterVerdict:
    s, macros = conn.session, msg.macros

    async def ask(data: bytes, step: str) -> MilterVerdict | None:
        """Send a step that may need a reply (or a write); its verdict, None to go on."""
        return _decided(_final(await conn.send(data, step, timeout)), step)

    if s.negotiated is None:
        await conn.send(s.start(), "optneg", timeout)
    else:  # a kept connection: the filter forgets the last client, this one follows
        conn.queue(s.new_connection())
    conn.last_final = None
    family = "6" if ":" in msg.client_address else "4" if msg.client_address else "U"
    # each step: queued at once when the filter does not answer it, else asked
    data = s.connect(msg.client_name, family, msg.client_port, msg.client_address,
                     macros.get("connect"))
    if not conn.queued(data) and (verdict := await ask(data, "connect")) is not None:
        return verdict
    data = s.helo(msg.helo, macros.get("helo"))
    if not conn.queued(data) and (verdict := await ask(data, "helo")) is not None:
        return verdict
    data = s.mail(msg.sender, (), macros.get("mail"))
    if not conn.queued(data) and (verdict := await ask(data, "mail")) is not None:
        return verdict
    refused: dict[str, tuple[int, str]] = {}
    rcpt_macros = macros.get("rcpt", {})
    for rcpt in msg.recipients:
        data = s.rcpt(rcpt, (), {**rcpt_macros, "{rcpt_addr}": rcpt})  # this recipient's
        if conn.queued(data) or (verdict := await ask(data, "rcpt")) is None:
            continue
        if verdict.action in ("reject", "tempfail"):
            refused[rcpt] = (verdict.code, verdict.text)  # this recipient only, as Postfix
            continue
        return verdict
    if len(refused) == len(msg.recipients):
        code, text = next(iter(refused.values()), DEFAULT_REJECT)
        return MilterVerdict("reject" if code >= 500 else "tempfail", code, text, step="rcpt",
                             refused_recipients=refused)
    headers, body = split_message(content)
    try:
        data = s.data(macros.get("data"))
        if not conn.queued(data) and (verdict := await ask(data, "data")) is not None:
            return _with_refused(verdict, refused)
        if s.skips(m.Step.HEADER):
            pass
        elif not s.answers(m.Step.HEADER):  # the common case (rspamd): all in one piece
            data = s.headers(headers)
            if not conn.queued(data):
                await conn.send(data, "header", timeout)  # written: nothing to wait for
        else:
            for name, value in headers:
                if (verdict := await ask(s.header(name, value), "header")) is not None:
                    return _with_refused(verdict, refused)
        data = s.end_of_headers(macros.get("eoh"))
        if not conn.queued(data) and (verdict := await ask(data, "eoh")) is not None:
            return _with_refused(verdict, refused)
        if not s.skips(m.Step.BODY):  # a filter that wants no body: none is read
            for chunk in body:
                data = s.body(chunk)
                if not conn.queued(data) and (verdict := await ask(data, "body")) is not None:
                    return _with_refused(verdict, refused)
                if s.skip_body:
                    break
    finally:
        body.close()
    events = await conn.send(s.end_of_message(macros.get("eom")), "eom", timeout)
    conn.last_final = type(_final(events))
    mods = tuple(e for e in events if isinstance(e, m.Modification))
    quarantine = next((e.reason for e in mods if isinstance(e, m.Quarantine)), None)
    decided = _decided(_final(events), "eom")  # no verdict built only to be copied
    action, code, text = ("continue", 0, "") if decided is None else (
        decided.action, decided.code, decided.text)
    if quarantine is not None and action in ("accept", "continue"):
        action, code, text = "quarantine", 0, ""
    return MilterVerdict(action, code, text, "eom", mods, quarantine, refused)


def _with_refused(verdict: MilterVerdict, refused: dict[str, tuple[int, str]]) -> MilterVerdict:
    return MilterVerdict(verdict.action, verdict.code, verdict.text, verdict.step,
                         verdict.modifications, verdict.quarantine, refused, verdict.reason)
