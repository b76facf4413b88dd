"""Content filters at the end of data: the ``[[milter]]`` entries asked in order, and what
their verdicts do to the message before its 250 (and before it is made durable).

Each filter sees the message as the one before it left it (Postfix's order): our Received
field on top (the Return-Path is not part of what a filter sees), the headers, the body. Its
verdict:

* reject → ``550 5.7.1`` with the filter's text made one printable line; tempfail (and a
  recipient the filter refused: we cannot refuse one recipient after the data) → ``451
  4.7.1``; discard → the 250, nothing stored; quarantine → the local copies go to the
  recipients' Maildir++ ``.Junk`` (where DMARC quarantine files them), with a header that
  says why; on submission, where there is no hold queue, a quarantined message with remote
  recipients is refused (nothing a filter wanted held leaves the server).
* header changes and a new body are written into a new spool; our Received field stays on
  top and is never changed; a filter cannot change or delete an Authentication-Results
  field, and one it adds that claims our authserv-id is dropped (RFC 8601 §5: one result
  under our name, ours).
* recipient and sender changes are handed back to the session, which passes each added
  recipient through the same recipient policy as RCPT (server/smtp.py): on the MX, for a
  client that may not relay, only our own domains: a filter cannot make the MX a relay.
* unreachable, too slow, broken, or no free connection within ``limits.milter_wait`` → the
  entry's ``on_error``: tempfail (451 4.7.1) or accept (this filter is skipped).

Each entry keeps the connections of finished messages for the next (its ``reuse``; at most
this process's share of ``limits.max_milter_connections`` idle, each ``IDLE_SECONDS``): the
next SMTP client is announced on one with QUIT_NC, so OPTNEG and the TCP set-up are not paid
per message (policy/milter_client.py). A message small enough to be held in memory is
rewritten on the event loop: a thread hop costs more than copying it.

One decision-log line per verdict (policy/decisionlog.milter).

A hook for later (not built): mail a user moves to or out of Junk could be handed to the
filter's learning interface (rspamd's controller ``learn_spam``/``learn_ham``); the Junk
folder written here is the one such a hook would watch.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from mailfort.config import Config, MilterConfig
from mailfort.policy import decisionlog
from mailfort.policy.authresults import FIELD as AR_FIELD
from mailfort.policy.authresults import claims
from mailfort.policy.milter_client import MilterClient, MilterMessage, MilterVerdict
from mailfort.protocol import milter as m
from mailfort.protocol.address import AddressError, Mailbox, parse_mail_argument
from mailfort.protocol.replies import Reply
from mailfort.server.senderauth import INLINE_MAX, HeaderSectionTooLarge, headers_and_body
from mailfort.store.maildir import Committer, Spool

log = logging.getLogger("mailfort.milter")

UNAVAILABLE = Reply(451, "4.7.1", "Content filter unavailable, try again later")
IDLE_SECONDS = 10.0  # an idle filter connection is kept this long (rspamd's own: 120 s)
_MAX_TEXT = 200


def reply_text(text: str, fallback: str) -> str:
    """A filter's reply text as one printable ASCII line: the codes of later lines and a
    leading enhanced status code removed, controls and non-ASCII replaced, bounded."""
    text = re.sub(r"\r?\n(\d{3}[ -])?(\d\.\d{1,3}\.\d{1,3} )?", " ", text)
    text = re.sub(r"^\s*\d\.\d{1,3}\.\d{1,3}(\s+|$)", "", text)
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    text = " ".join(text.split())[:_MAX_TEXT]
    return text or fallback


@dataclass(frozen=True)
class FilterContext:
    """What a filter is told of the session and the message (as Postfix's macros)."""

    service: str  # mx, submission, submissions
    hostname: str  # our name: macro j
    peer_ip: str
    peer_port: int
    helo: str
    queue_id: str  # macro i
    auth_user: str | None = None  # {auth_authen}, submission
    tls_version: str = ""
    cipher: str = ""


@dataclass
class Outcome:
    """The chain's result: a refusal, a discard, or the spool to store, with the envelope
    changes (``sender``: None unchanged, "" the null sender) for the session to apply."""

    spool: Spool
    trace: bytes  # Return-Path and Received on top of ``spool``
    refusal: Reply | None = None
    discard: bool = False
    quarantine: str | None = None
    sender: str | None = None
    recipients: list[str] | None = None
    notes: list[str] = field(default_factory=list)


class Milters:
    """The node's milters and its bounded number of conversations at once (per process:
    a worker process of ``processes`` gets its share of ``limits.max_milter_connections``)."""

    def __init__(self, cfg: Config, processes: int = 1) -> None:
        self.cfg = cfg
        self.entries = list(cfg.milter)
        self.slots = max(1, math.ceil(cfg.limits.max_milter_connections / max(1, processes)))
        self.wait = cfg.limits.milter_wait
        self._semaphore: asyncio.Semaphore | None = None
        self.clients = [
            MilterClient(e.address, timeout=e.command_timeout, connect_timeout=e.connect_timeout,
                         total_timeout=e.message_timeout, reuse=e.reuse, max_idle=self.slots,
                         idle_timeout=IDLE_SECONDS)
            for e in self.entries]

    def for_service(self, name: str) -> list[MilterConfig]:
        return [e for e in self.entries if name in e.services]

    async def close(self) -> None:
        """Close the idle filter connections (the node stops)."""
        for client in self.clients:
            await client.close()

    async def _check(self, entry: MilterConfig, message: MilterMessage,
                     content: Callable[[], bytes | io.IOBase]) -> MilterVerdict:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.slots)
        if not self._semaphore.locked():  # a free one is taken at once, without a timer
            await self._semaphore.acquire()
        else:
            try:
                async with asyncio.timeout(self.wait):
                    await self._semaphore.acquire()
            except TimeoutError:
                return MilterVerdict(
                    "error", step="connect",
                    reason="no free milter connection (limits.max_milter_connections)")
        try:
            return await self.clients[self.entries.index(entry)].check(message, content)
        finally:
            self._semaphore.release()

    async def run(self, ctx: FilterContext, committer: Committer, spool: Spool, trace: bytes,
                  sender: str, recipients: list[str]) -> Outcome:
        """Ask each milter of ``ctx.service`` in order; ``trace`` is what we wrote on top of
        ``spool`` (Return-Path, Received). The spool given is discarded when a new one is
        returned, and kept (the caller's) otherwise."""
        out = Outcome(spool, trace)
        current_sender, rcpts = sender, list(recipients)
        for entry in self.for_service(ctx.service):
            message = MilterMessage(
                current_sender, list(rcpts), client_address=ctx.peer_ip,
                client_port=ctx.peer_port, client_name=f"[{ctx.peer_ip}]",
                helo=ctx.helo, macros=_macros(ctx, current_sender))
            start = out.trace.index(b"\r\n") + 2  # after Return-Path: Received is seen

            def content(spool: Spool = out.spool, start: int = start) -> bytes | io.IOBase:
                if spool.size < INLINE_MAX:  # in memory: one piece
                    return b"".join(spool.chunks(start))
                return io.BufferedReader(_SpoolReader(spool.chunks(start)))

            verdict = await self._check(entry, message, content)
            if verdict.action == "error":
                detail = f"{verdict.step}: {verdict.reason}; on_error={entry.on_error}"
                decisionlog.milter(ctx.peer_ip, ctx.queue_id, entry.address, "error", detail)
                log.warning("milter %s failed for %s at %s: %s (on_error=%s)", entry.address,
                            ctx.queue_id, verdict.step, verdict.reason, entry.on_error)
                if entry.on_error == "tempfail":
                    out.refusal = UNAVAILABLE
                    return out
                continue
            refusal = _refusal(verdict)
            detail = (decisionlog.reply_text(refusal) if refusal is not None
                      else verdict.quarantine or "")
            decisionlog.milter(ctx.peer_ip, ctx.queue_id, entry.address, verdict.action, detail)
            if refusal is not None:
                out.refusal = refusal
                return out
            if verdict.action == "discard":
                out.discard = True
                return out
            mods = verdict.modifications
            if verdict.quarantine is not None:
                out.quarantine = reply_text(verdict.quarantine, "quarantined by a filter")
                header = self.cfg.sender_auth.quarantine_header
                mods += (m.InsertHeader(1, header, f"milter; {out.quarantine}"),)
            changed = _envelope_changes(mods, current_sender, rcpts, out.notes)
            if changed != current_sender:
                out.sender = current_sender = changed
            if rcpts != list(recipients):
                out.recipients = list(rcpts)
            if any(isinstance(mod, _CONTENT) for mod in mods) or (
                    out.sender is not None and not out.trace.startswith(
                        _return_path(out.sender))):
                args = (committer, out.spool, out.trace, mods, current_sender,
                        self.cfg.server.hostname, out.notes)
                try:
                    if out.spool.size < INLINE_MAX:  # in memory: no file to read or write
                        new, out.trace = _rewrite(*args)
                    else:
                        new, out.trace = await asyncio.to_thread(_rewrite, *args)
                except HeaderSectionTooLarge:
                    out.refusal = UNAVAILABLE
                    return out
                if out.spool is not spool:
                    out.spool.discard()
                out.spool = new
        for note in out.notes:
            log.info("milter %s: %s", ctx.queue_id, note)
        return out


_CONTENT = (m.AddHeader, m.ChangeHeader, m.InsertHeader, m.ReplaceBody)


def _macros(ctx: FilterContext, sender: str) -> dict[str, dict[str, str]]:
    """The macros Postfix sends, per step ({rcpt_addr} is set per recipient).

    ``{daemon_name}`` is our host name, not the listener's: rspamd takes it for the
    authserv-id of its Authentication-Results field, which then claims ours and is dropped
    (one result under our name); the listener's name goes in ``{if_name}``."""
    connect = {"j": ctx.hostname, "{daemon_name}": ctx.hostname, "{if_name}": ctx.service,
               "v": "mailfort",
               "{client_addr}": ctx.peer_ip, "{client_port}": str(ctx.peer_port),
               "{client_name}": "unknown", "_": f"unknown [{ctx.peer_ip}]"}
    helo = {"{tls_version}": ctx.tls_version, "{cipher}": ctx.cipher} if ctx.tls_version else {}
    mail = {"i": ctx.queue_id, "{mail_addr}": sender}
    if ctx.auth_user:
        mail |= {"{auth_type}": "PLAIN", "{auth_authen}": ctx.auth_user}
    return {"connect": connect, "helo": helo, "mail": mail, "rcpt": {},
            "data": {"i": ctx.queue_id}, "eoh": {"i": ctx.queue_id},
            "eom": {"i": ctx.queue_id}}


def _refusal(verdict: MilterVerdict) -> Reply | None:
    if verdict.action == "reject":
        return Reply(550, "5.7.1", reply_text(verdict.text, "Message rejected by content filter"))
    if verdict.action == "tempfail":
        return Reply(451, "4.7.1", reply_text(verdict.text, "Content filter: try again later"))
    if verdict.refused_recipients:  # refused at RCPT: after the data only the whole can be
        _code, text = next(iter(verdict.refused_recipients.values()))
        return Reply(451, "4.7.1", reply_text(text, "Recipient refused by content filter"))
    return None


def mailbox(address: str) -> Mailbox | None:
    """A recipient handed back by ``Milters.run`` as the session's policy takes it."""
    try:
        return parse_mail_argument(f"TO:<{address}>", prefix="TO:", null_allowed=False,
                                   smtputf8_allowed=True)[0]
    except AddressError:
        return None


def _address(raw: str, prefix: str) -> str | None:
    """A filter's address (``<a@b>`` or ``a@b``) checked as SMTP would: the address, ""
    for the null sender, None when it does not parse."""
    raw = raw.strip()
    path = raw if raw.startswith("<") else f"<{raw}>"
    try:
        mailbox, _ = parse_mail_argument(f"{prefix}{path}", prefix=prefix,
                                         null_allowed=prefix == "FROM:", smtputf8_allowed=True)
    except AddressError:
        return None
    return "" if mailbox is None else str(mailbox)


def _envelope_changes(mods: tuple[m.Modification, ...], sender: str, rcpts: list[str],
                      notes: list[str]) -> str:
    """Apply recipient changes to ``rcpts`` in place; the (maybe new) sender."""
    for mod in mods:
        if isinstance(mod, m.AddRecipient):
            addr = _address(mod.address, "TO:")
            if addr is None:
                notes.append(f"added recipient {mod.address!r} ignored: not an address")
            elif addr.lower() not in (r.lower() for r in rcpts):
                rcpts.append(addr)
        elif isinstance(mod, m.DeleteRecipient):
            addr = _address(mod.address, "TO:")
            if addr is not None:
                rcpts[:] = [r for r in rcpts if r.lower() != addr.lower()]
        elif isinstance(mod, m.ChangeSender):
            new = _address(mod.address, "FROM:")
            if new is None:
                notes.append(f"sender change to {mod.address!r} ignored: not an address")
            else:
                sender = new
    return sender


def _return_path(sender: str) -> bytes:
    return f"Return-Path: <{sender}>\r\n".encode()


class _SpoolReader(io.RawIOBase):
    """The spool's chunks as a file (the milter client reads lines, then pieces)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:  # the spool file, when the filter decided before the end
            close()
        super().close()


def _fields(block: bytes) -> list[bytes]:
    """A header block (fields ending in CRLF) as whole fields, continuation lines kept."""
    out: list[bytes] = []
    for line in block.split(b"\r\n")[:-1] if block.endswith(b"\r\n") else block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and out:
            out[-1] += line + b"\r\n"
        else:
            out.append(line + b"\r\n")
    return out


def _name(raw: bytes) -> str:
    return raw.partition(b":")[0].strip().decode("utf-8", "replace").lower()


def _field(name: str, value: str) -> bytes:
    if "\n" in value:  # folded (rspamd's long fields): CRLF line ends, as the message's
        value = value.replace("\r\n", "\n").replace("\n", "\r\n")
    return f"{name}: {value}\r\n".encode()


def _rewrite(committer: Committer, spool: Spool, trace: bytes,
             mods: tuple[m.Modification, ...], sender: str, hostname: str,
             notes: list[str]) -> tuple[Spool, bytes]:
    """A new spool: Return-Path of ``sender``, our Received, the fields as the filter left
    them, the body (replaced when it sent one). Runs in a thread."""
    rp_end = trace.index(b"\r\n") + 2
    received = trace[rp_end:]
    block, body = headers_and_body(spool, rp_end)
    ar = AR_FIELD.lower()
    if block.endswith(b"\r\n") and all(type(mod) is m.AddHeader for mod in mods):
        # rspamd's case: fields added at the end, nothing else; the block is kept whole
        # (its fields joined again are the same octets), not split into fields
        added = []
        for mod in mods:
            if mod.name.lower() == ar and claims(mod.value.encode(), hostname):
                notes.append(f"{AR_FIELD} claiming {hostname} from a filter dropped")
            else:
                added.append(_field(mod.name, mod.value))
        return _written(committer, _return_path(sender) + block + b"".join(added) + b"\r\n",
                        None, body), _return_path(sender) + received
    fields = _fields(block)
    ours = 1 if fields and received and fields[0] == received else 0  # Received: fixed on top
    replaced: list[bytes] | None = None
    for mod in mods:
        if isinstance(mod, m.AddHeader | m.InsertHeader):
            if mod.name.lower() == ar and claims(mod.value.encode(), hostname):
                notes.append(f"{AR_FIELD} claiming {hostname} from a filter dropped")
                continue
            new = _field(mod.name, mod.value)
            if isinstance(mod, m.AddHeader):
                fields.append(new)
            else:
                fields.insert(max(ours, min(mod.index, len(fields))), new)
        elif isinstance(mod, m.ChangeHeader):
            if mod.name.lower() == ar:
                notes.append(f"change of an {AR_FIELD} field by a filter ignored")
                continue
            found = [i for i, f in enumerate(fields) if _name(f) == mod.name.lower()]
            if 1 <= mod.index <= len(found):
                at = found[mod.index - 1]
                if at < ours:
                    notes.append("change of our Received field by a filter ignored")
                elif mod.value:
                    fields[at] = _field(mod.name, mod.value)
                else:
                    del fields[at]
            elif mod.value:  # no such occurrence: added, as Sendmail does
                fields.append(_field(mod.name, mod.value))
        elif isinstance(mod, m.ReplaceBody):
            replaced = [] if replaced is None else replaced
            replaced.append(mod.data)
    head = _return_path(sender) + b"".join(fields) + b"\r\n"
    return _written(committer, head, replaced, body), _return_path(sender) + received


def _written(committer: Committer, head: bytes, replaced: list[bytes] | None,
             body: Iterator[bytes]) -> Spool:
    """A new spool: ``head`` (Return-Path, the fields, the empty line), then the new body
    when a filter replaced it, else the message's own."""
    out = committer.new_spool()
    try:
        out.write(head)
        if replaced is not None:
            data = re.sub(rb"\r?\n", b"\r\n", b"".join(replaced))
            out.write(data)
        else:
            for chunk in body:
                out.write(chunk)
    except BaseException:
        out.discard()
        raise
    return out


def processes(cfg: Config, worker: bool) -> int:
    """How many processes share the node's milter connections."""
    return (cfg.server.workers or os.cpu_count() or 1) if worker else 1
