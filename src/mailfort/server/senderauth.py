"""The sessions' side of sender authentication: worker threads and spool rewriting.

SPF runs at MAIL FROM, DKIM/DMARC (MX) or DKIM signing (submission) after the end of
data. A check whose DNS answers are all in the cache (the common case: a sender's records
are asked once per TTL) runs right on the event loop: it is a few tens of microseconds of
Python, which a worker thread would run under the same GIL anyway, while the hand-over to a
thread and back cost the loop more than the check (measured: bench/RESULTS.md, 2026-12-07).
Any other check (a lookup to make, an answer past its TTL, a message over ``INLINE_MAX``,
whose body hash is better done where hashlib can release the GIL) runs in a worker thread,
so that DNS waits never block the loop.
The fields they add go on top of the message: a message the checks read into memory is
rewritten in its own spool (``rewrite``: no second spool file made, written and unlinked,
which was most of the checks' cost on a 100 KB message); a larger one is copied into a new
spool behind them (``rebuild``). On the MX any Authentication-Results field claiming our
host name is dropped on the way, wherever it is in the header section (bounded at
reception: protocol/body.py).
At most ``sender_auth.dkim_max_bytes`` of a message are read into memory for DKIM; a
larger one is verified as it streams from the spool (never skipped: DMARC needs it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from mailfort.policy.authresults import strip_ours
from mailfort.policy.dnslookup import NotCached
from mailfort.policy.senderauth import SenderAuth, Verdict, header_block
from mailfort.policy.spf import SPFResult
from mailfort.protocol.body import HEADER_TOO_BIG, MAX_HEADER_SECTION
from mailfort.protocol.replies import Reply
from mailfort.store.maildir import Committer, Spool

log = logging.getLogger("mailfort.senderauth")
# (authenticated user, the message) -> the DKIM-Signature fields to add (policy/msa.py)
SignHook = Callable[[str, bytes], bytes]
# Messages up to this size are checked on the loop when their DNS answers are cached.
INLINE_MAX = 64 * 1024


SPFOutcome = tuple[list[SPFResult], Reply | None]


def check_mail_cached(auth: SenderAuth, ip: str, helo: str, sender: str) -> SPFOutcome | None:
    """SPF of HELO and MAIL FROM when every answer it needs is cached; None when not."""
    try:
        with auth.lookup.cache_only():
            return auth.check_mail(ip, helo, sender)
    except NotCached:
        return None


def check_mail_in_thread(auth: SenderAuth, ip: str, helo: str,
                         sender: str) -> asyncio.Future[SPFOutcome]:
    """SPF in a worker thread, where its lookups may wait for DNS (from the start)."""
    return asyncio.get_running_loop().run_in_executor(
        auth.executor, auth.check_mail, ip, helo, sender)



def read_message(spool: Spool, start: int, limit: int) -> bytes | None:
    """The client's message (after our trace fields), or None when over ``limit``."""
    if spool.size - start > limit:
        return None
    return b"".join(spool.chunks(start))


class HeaderSectionTooLarge(ValueError):
    """The header section is longer than reception allows (it never is: defence in depth,
    as a section read in part would let a forged field below the part through)."""


def _header_section(chunks: Iterator[bytes]) -> tuple[bytes, int]:
    """(what was read, where the header section ends in it: after the CRLF of its last
    field; everything read when the message has no body)."""
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        if buf.startswith(b"\r\n"):
            return bytes(buf), 0
        end = buf.find(b"\r\n\r\n", max(0, len(buf) - len(chunk) - 3))
        if end >= 0:
            return bytes(buf), end + 2
        if len(buf) > MAX_HEADER_SECTION + 4:
            raise HeaderSectionTooLarge
    return bytes(buf), len(buf)


def read_headers(spool: Spool, start: int) -> bytes:
    """The client's header section (without the blank line); HeaderSectionTooLarge."""
    buf, split = _header_section(iter(spool.chunks(start)))
    return buf[:split]


def headers_and_body(spool: Spool, start: int) -> tuple[bytes, Iterator[bytes]]:
    """The client's header section (as read_headers) and its body (after the empty line)
    in pieces, read from the spool as they are consumed."""
    chunks = iter(spool.chunks(start))
    buf, split = _header_section(chunks)
    rest = buf[split:]
    first = rest[2:] if rest.startswith(b"\r\n") else b""
    return buf[:split], itertools.chain((first,), chunks)


def rebuild(committer: Committer, spool: Spool, trace: bytes, fields: bytes,
            strip_host: str | None) -> Spool:
    """A new spool holding: our trace fields (Return-Path, Received), ``fields``, and the
    client's message, without forged Authentication-Results when ``strip_host``."""
    new = committer.new_spool()
    try:
        new.write(trace + fields)  # right below our Received: ours, above every earlier hop
        chunks = iter(spool.chunks(len(trace)))
        buf, split = _header_section(chunks)
        block = buf[:split]
        if strip_host is not None:
            block, removed = strip_ours(block, strip_host)
            if removed:
                log.info("removed %d Authentication-Results field(s) claiming %s",
                         removed, strip_host)
        new.write(block + buf[split:])
        for chunk in chunks:
            new.write(chunk)
    except BaseException:
        new.discard()
        raise
    return new


def rewrite(spool: Spool, trace: bytes, fields: bytes, message: bytes,
            strip_host: str | None) -> None:
    """As :func:`rebuild`, for a client's ``message`` already read into memory for the
    checks: the spool is overwritten in place (``Spool.replace``), no second spool file
    made, written and freed, no second read of the message."""
    block = header_block(message)
    split = len(block)
    if strip_host is not None:
        block, removed = strip_ours(block, strip_host)
        if removed:
            log.info("removed %d Authentication-Results field(s) claiming %s",
                     removed, strip_host)
    with memoryview(message)[split:] as body:
        spool.replace((trace + fields + block, body))


@dataclass
class Outcome:
    spool: Spool
    refusal: Reply | None = None
    junk: bool = False
    # d= of the DKIM signatures that passed (a vacation reply asks whether one of them is
    # the envelope sender's domain: policy/vacation.py)
    dkim_pass: tuple[str, ...] = ()


def _verify_inbound(auth: SenderAuth, committer: Committer, spool: Spool, trace: bytes,
                    spf_results: list[SPFResult], sender: str) -> tuple[Spool, Verdict]:
    limit = auth.opts.dkim_max_bytes
    try:
        message = read_message(spool, len(trace), limit)
        if message is None:  # larger: verified as it streams from the spool
            headers, body = headers_and_body(spool, len(trace))
            verdict = auth.check_message(None, spf_results, sender, headers, body)
        else:
            verdict = auth.check_message(message, spf_results, sender)
        if verdict.refusal is not None:
            return spool, verdict
        if message is not None:
            rewrite(spool, trace, verdict.fields, message, auth.cfg.server.hostname)
            return spool, verdict
        return rebuild(committer, spool, trace, verdict.fields,
                       auth.cfg.server.hostname), verdict
    except HeaderSectionTooLarge:
        return spool, Verdict(refusal=HEADER_TOO_BIG, summary="header section too large")


def _log_checks(peer_ip: str, sender: str, verdict: Verdict) -> None:
    refusal = verdict.refusal
    log.info("sender-auth [%s] from=<%s> %s%s", peer_ip, sender, verdict.summary,
             f" -> {refusal.code} {refusal.enhanced}" if refusal else "")


async def inbound(auth: SenderAuth, committer: Committer, spool: Spool, trace: bytes,
                  spf_results: list[SPFResult], sender: str, peer_ip: str) -> Outcome:
    """DKIM and DMARC of a message received on the MX; a refusal or the new spool."""
    checked: tuple[Spool, Verdict] | None = None
    if spool.size - len(trace) <= INLINE_MAX:
        try:
            with auth.lookup.cache_only():
                # NotCached can only come from the checks, before any new spool is made
                checked = _verify_inbound(auth, committer, spool, trace, spf_results, sender)
        except NotCached:
            pass
    if checked is None:
        checked = await asyncio.get_running_loop().run_in_executor(
            auth.executor, _verify_inbound, auth, committer, spool, trace, spf_results,
            sender)
    new, verdict = checked
    if verdict.refusal is None:  # written while the message is committed, not before
        asyncio.get_running_loop().call_soon(_log_checks, peer_ip, sender, verdict)
    else:  # before the refusal's own line
        _log_checks(peer_ip, sender, verdict)
    if new is not spool:
        spool.discard()
    return Outcome(new, verdict.refusal, verdict.junk,
                   tuple(d.domain for d in verdict.dkim if d.result == "pass"))


def _unforged(committer: Committer, spool: Spool, trace: bytes, hostname: str) -> Spool:
    if not strip_ours(read_headers(spool, len(trace)), hostname)[1]:
        return spool  # the common case: nothing to remove, no copy
    return rebuild(committer, spool, trace, b"", hostname)


async def unforged(committer: Committer, spool: Spool, trace: bytes, hostname: str) -> Spool:
    """The MX's message without Authentication-Results fields claiming ``hostname`` when
    it does not check the sender itself (disabled, or a trusted network): a reader that
    trusts our authserv-id must never find a result we did not write (RFC 8601 §5)."""
    if spool.in_memory and spool.size - len(trace) <= INLINE_MAX:
        # Memory only (a header scan, a copy when a field is forged): on the loop, as a
        # cached check is; the hand-over to a thread and back cost the loop more.
        new = _unforged(committer, spool, trace, hostname)
    else:  # a spool file to read: not on the loop
        new = await asyncio.to_thread(_unforged, committer, spool, trace, hostname)
    if new is not spool:
        spool.discard()
    return new


def _sign(sign: SignHook | None, committer: Committer, spool: Spool, trace: bytes, user: str,
          limit: int, hostname: str) -> Spool:
    message = read_message(spool, len(trace), limit)
    if message is None:
        log.warning("not DKIM-signed: message from %s over %d bytes", user, limit)
        return _unforged(committer, spool, trace, hostname)
    fields = sign(user, message) if sign is not None else b""
    # A user must not hand a local recipient a result "from us" either (RFC 8601 §5).
    forged = strip_ours(header_block(message), hostname)[1] > 0
    if not fields and not forged:
        return spool
    rewrite(spool, trace, fields, message, hostname)
    return spool


async def signed(sign: SignHook | None, committer: Committer, spool: Spool, trace: bytes,
                 user: str, limit: int, hostname: str,
                 signs: Callable[[bytes], bool] | None = None) -> Spool:
    """The message with DKIM-Signature fields of the From: domain's keys, if it has any,
    and without Authentication-Results fields that claim ``hostname``.

    ``signs(message)``: whether ``sign`` has a key for it. A message in memory that gets
    no signature is done on the loop, as ``unforged`` is (a header scan): the hand-over
    to a thread and back cost more than the work (~4 % of a submission worker's time,
    bench/RESULTS.md 2026-12-08). A signature (RSA: about a millisecond) is made in a
    thread."""
    if spool.in_memory and spool.size - len(trace) <= INLINE_MAX and signs is not None:
        message = read_message(spool, len(trace), limit)
        if message is not None and (sign is None or not signs(message)):
            return _sign(None, committer, spool, trace, user, limit, hostname)
    new = await asyncio.to_thread(_sign, sign, committer, spool, trace, user, limit, hostname)
    if new is not spool:
        spool.discard()
    return new
