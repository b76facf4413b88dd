"""Run one message through one milter (rspamd's proxy, clamav-milter…) and say what it decided.

The asyncio driver of ``protocol/milter.py``: it connects to ``inet:HOST:PORT``,
``inet:[IPv6]:PORT`` or ``unix:/path``, sends the steps of one message (connect information,
HELO, MAIL, RCPT…, headers, the body in chunks of at most 65535 octets, end of message) and
returns a ``MilterVerdict``. Each awaited reply has ``timeout`` seconds (``Progress`` from the
filter restarts it) and the whole conversation ``total_timeout``. Anything that goes wrong on
the filter's side (unreachable, too slow, closed, protocol broken) is an ``error`` verdict, never
an exception: the caller maps it to the milter's ``on_error`` (tempfail by default: a message is
never silently left unfiltered because the filter was down).

The server asks it at the end of DATA/BDAT, before the 250 (server/milters.py).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from mailfort.protocol import milter as m
from mailfort.protocol.milter import parse_address

READ_CHUNK = 16384
MAX_HEADER_LINE = 65536  # a longer "header" line ends the header section (the rest is body)


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


def split_message(source: bytes | Path | BinaryIO) -> tuple[list[tuple[str, str]], Iterator[bytes]]:
    """The header fields (name, unfolded-as-sent value) and an iterator of body chunks.

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
        if not colon or not name or not line.endswith(b"\n") or any(
            c <= 32 or c == 127 for c in name
        ):
            leftover = line  # not a header field: the body starts here
            break
        headers.append((_text(name), _text(value).strip(" \t\r\n")))

    def body() -> Iterator[bytes]:
        pending = leftover
        try:
            while True:
                data = stream.read(READ_CHUNK)
                pending += data
                while len(pending) >= m.MAX_BODY_CHUNK or (pending and not data):
                    yield pending[: m.MAX_BODY_CHUNK]
                    pending = pending[m.MAX_BODY_CHUNK:]
                if not data:
                    return
        finally:
            if isinstance(source, Path):
                stream.close()

    return headers, body()


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").replace("\0", "\ufffd")


class _Conversation:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float) -> None:
        self.reader, self.writer, self.timeout = reader, writer, timeout
        self.session = m.MilterSession()

    async def send(self, data: bytes, step: str) -> list[m.Event]:
        """Send one step; if a reply is awaited, the events up to its final one."""
        if not data:
            return []
        self.writer.write(data)
        await self.writer.drain()
        events: list[m.Event] = []
        while self.session.awaiting:
            try:
                chunk = await asyncio.wait_for(self.reader.read(READ_CHUNK), self.timeout)
            except TimeoutError:
                raise _Stop(MilterVerdict("error", step=step, reason="timeout")) from None
            if not chunk:
                raise _Stop(MilterVerdict("error", step=step, reason="connection closed"))
            for event in self.session.receive(chunk):
                if isinstance(event, m.ProtocolError):
                    raise _Stop(MilterVerdict("error", step=step, reason=event.reason))
                if not isinstance(event, m.Progress):
                    events.append(event)
        return events


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


async def check_message(address: str, message: MilterMessage,
                        content: bytes | Path | BinaryIO, *, timeout: float = 10.0,
                        connect_timeout: float = 5.0,
                        total_timeout: float = 120.0) -> MilterVerdict:
    """Run ``message`` (``content``: the whole RFC 5322 message, CRLF line ends) through the
    milter at ``address``. Never raises for anything the filter or the network does."""
    if not message.recipients:
        return MilterVerdict("error", step="rcpt", reason="a message needs a recipient")
    try:
        target = parse_address(address)
    except ValueError as exc:
        return MilterVerdict("error", step="connect", reason=str(exc))
    try:
        kind, where, port = target
        if kind == "unix":
            opening = asyncio.open_unix_connection(where)
        else:
            opening = asyncio.open_connection(where, port)
        reader, writer = await asyncio.wait_for(opening, connect_timeout)
    except (OSError, TimeoutError) as exc:
        return MilterVerdict("error", step="connect", reason=f"cannot connect: {exc!r}")
    talk = _Conversation(reader, writer, timeout)
    try:
        async with asyncio.timeout(total_timeout):
            return await _run(talk, message, content)
    except _Stop as stop:
        return stop.verdict
    except TimeoutError:
        return MilterVerdict("error", reason="total timeout")
    except (OSError, asyncio.IncompleteReadError) as exc:
        return MilterVerdict("error", reason=f"connection failed: {exc!r}")
    except ValueError as exc:  # a NUL in what we were given to send: refuse, do not crash
        return MilterVerdict("error", reason=f"cannot encode: {exc}")
    finally:
        try:
            if not writer.is_closing() and talk.session.error is None:
                writer.write(talk.session.quit())
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), 1.0)
        except (OSError, TimeoutError):
            pass


def _final(events: list[m.Event]) -> object:
    return events[-1] if events else None


async def _run(talk: _Conversation, msg: MilterMessage,
               content: bytes | Path | BinaryIO) -> MilterVerdict:
    s, send, macros = talk.session, talk.send, msg.macros
    await send(s.start(), "optneg")
    family = "6" if ":" in msg.client_address else "4" if msg.client_address else "U"
    steps = [
        ("connect", lambda: s.connect(msg.client_name, family, msg.client_port,
                                      msg.client_address, macros.get("connect"))),
        ("helo", lambda: s.helo(msg.helo, macros.get("helo"))),
        ("mail", lambda: s.mail(msg.sender, (), macros.get("mail"))),
    ]
    for step, command in steps:
        if (verdict := _decided(_final(await send(command(), step)), step)) is not None:
            return verdict
    refused: dict[str, tuple[int, str]] = {}
    for rcpt in msg.recipients:
        per_rcpt = {**macros.get("rcpt", {}), "{rcpt_addr}": rcpt}  # this recipient's
        final = _final(await send(s.rcpt(rcpt, (), per_rcpt), "rcpt"))
        verdict = _decided(final, "rcpt")
        if verdict is None:
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
    later = [
        ("data", lambda: s.data(macros.get("data"))),
        *[("header", lambda n=n, v=v: s.header(n, v)) for n, v in headers],
        ("eoh", lambda: s.end_of_headers(macros.get("eoh"))),
    ]
    for step, command in later:
        if (verdict := _decided(_final(await send(command(), step)), step)) is not None:
            return _with_refused(verdict, refused)
    for chunk in body:
        events = await send(s.body(chunk), "body")
        if (verdict := _decided(_final(events), "body")) is not None:
            return _with_refused(verdict, refused)
        if s.skip_body:
            break
    events = await send(s.end_of_message(macros.get("eom")), "eom")
    mods = tuple(e for e in events if isinstance(e, m.Modification))
    quarantine = next((e.reason for e in mods if isinstance(e, m.Quarantine)), None)
    verdict = _decided(_final(events), "eom") or MilterVerdict("continue", step="eom")
    if quarantine is not None and verdict.action in ("accept", "continue"):
        verdict = MilterVerdict("quarantine", step="eom")
    return MilterVerdict(verdict.action, verdict.code, verdict.text, "eom", mods, quarantine,
                         refused)


def _with_refused(verdict: MilterVerdict, refused: dict[str, tuple[int, str]]) -> MilterVerdict:
    return MilterVerdict(verdict.action, verdict.code, verdict.text, verdict.step,
                         verdict.modifications, verdict.quarantine, refused, verdict.reason)
