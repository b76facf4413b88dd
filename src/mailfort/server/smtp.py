"""asyncio SMTP listeners (MX and submission) that drive the sans-I/O engine.

A session is an ``asyncio.Protocol``, not a task with streams: an idle session costs one
small object and a place among the deadlines (server/timer_wheel.py), which is what lets
thousands of them sit after EHLO. Work that must not block the loop (fsync in the
committer thread, argon2 in the authenticator) runs as a task while reading is paused; the
engine parses nothing more until it is answered, which keeps pipelined replies in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
import logging
import socket
import ssl
import time
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Protocol

from mailfort.config import Config
from mailfort.directory.base import Directory, is_blocking
from mailfort.policy import decisionlog, srs, vacation
from mailfort.policy.inbound import PREGREET, ConnectionVerdict, InboundPolicy
from mailfort.policy.quota import MailboxQuota
from mailfort.policy.recipients import BounceReturn, RecipientPolicy, StrictRecipients
from mailfort.policy.relay import RecipientDecision
from mailfort.policy.senderauth import SenderAuth
from mailfort.policy.spf import SPFResult
from mailfort.protocol.address import Mailbox
from mailfort.protocol.replies import TEMP_LOCAL_ERROR, Reply
from mailfort.protocol.smtp import (
    AuthCredentials,
    Closing,
    DataChunk,
    DataStart,
    EngineSettings,
    Event,
    Helo,
    MailFrom,
    MessageAborted,
    MessageComplete,
    RcptTo,
    ResetTransaction,
    SMTPEngine,
    StartTLS,
)
from mailfort.queue.store import new_id
from mailfort.server import milters as content
from mailfort.server import senderauth
from mailfort.server.connections import Admission, is_loopback, limit_exceptions
from mailfort.server.profile import HARDENED, Profile
from mailfort.server.session import EngineSession, Listener
from mailfort.server.sieve_delivery import Compiled, Outcome, SieveDelivery
from mailfort.server.sieve_delivery import Message as SieveMessage
from mailfort.server.storage_replies import storage_refusal
from mailfort.store.maildir import Committer, Spool, StorageError, maildir_for

log = logging.getLogger("mailfort.smtp")

TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_IP = Reply(421, "4.7.0", "Too many connections from your address, try again later")
SESSION_TOO_LONG = Reply(421, "4.4.2", "Session time limit exceeded, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
STRESS_CLOSE = Reply(421, "4.7.0", "Server busy, closing idle connection, try again later")
CONNECTION_RATE = Reply(421, "4.7.0", "Connection rate limit exceeded, try again later")
_REFUSALS = {Admission.TOO_MANY: TOO_MANY_CONNECTIONS, Admission.TOO_MANY_FROM_IP: TOO_MANY_FROM_IP,
             Admission.RATE_FROM_IP: CONNECTION_RATE}
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
READY_FOR_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
# RFC 5321 3.5 and 4.5.3.1.10: the client sends the other recipients in a new transaction.
# Given when a recipient's Sieve script can reject (its DATA reply must be its own).
ONE_PER_TRANSACTION = Reply(452, "4.5.3", "Too many recipients: a filter of this recipient "
                            "answers alone, send the others in a new transaction")


@dataclass
class Envelope:
    sender: Mailbox | None = None
    local: list[str] = field(default_factory=list)  # canonical local users
    remote: list[str] = field(default_factory=list)  # addresses to relay/forward
    # Remote addresses reached through an alias of ours -> that alias (forwards: their
    # sender is rewritten with SRS, and a failure is told to the alias's owner).
    forwards: dict[str, str] = field(default_factory=dict)
    rcpts: list[str] = field(default_factory=list)  # as the client gave them
    spf: list[SPFResult] = field(default_factory=list)  # MX: SPF of HELO and MAIL FROM
    # MX: SPF still being evaluated in a thread (answers not cached), when the reply to MAIL
    # does not depend on it (spf_fail = "mark"): awaited at the end of data, into ``spf``.
    spf_pending: asyncio.Future[senderauth.SPFOutcome] | None = None
    requiretls: bool = False  # MAIL ... REQUIRETLS (RFC 8689), kept in the queue entry
    size: int | None = None  # MAIL ... SIZE= (RFC 1870): held to local recipients' quota
    # The message's one id (queue/store.py new_id), made at DATA: in Received:, the 250,
    # the queue entry and every log line about it.
    queue_id: str = ""
    # Submission: the addresses the user may send as, fetched once per transaction when
    # the directory is networked (None: looked up where needed, as the embedded one is).
    sender_rights: frozenset[str] | None = None
    # Submission: what the transaction has reserved of the user's hourly allowances
    # (policy/msa.py), spent by the 250 at the end of data, else given back. (A reservation
    # whose answer a lost connection cancelled stays counted till its hour ends: an error
    # against the sender, never for it.)
    held_for: str = ""
    held_messages: int = 0
    held_rcpts: int = 0
    # Sieve (server/sieve_delivery.py): each local user's script as found at RCPT, and
    # whether one of them (or a global one) can reject: then no second recipient.
    scripts: dict[str, Compiled] = field(default_factory=dict)
    sieve_reject: bool = False
    dkim_pass: tuple[str, ...] = ()  # MX: d= of the DKIM signatures that passed


# A session's envelope before MAIL and after RSET: one for all of them, never changed (the
# engine accepts RCPT and DATA only after MAIL, which makes the transaction's own), so an
# idle session holds no envelope and lists of its own (issue 12: memory per session).
NO_TRANSACTION = Envelope()
# What a session that was not screened at connect found: nothing (one for all, frozen).
NOT_SCREENED = ConnectionVerdict()


@dataclass
class ServiceOptions:
    """What distinguishes MX from submission: the same engine, another profile."""

    name: str  # "mx", "submission", "submissions"
    implicit_tls: bool = False
    auth: bool = False  # offer AUTH and require it before MAIL
    plaintext_auth_on_loopback: bool = False


# Hands a message for remote recipients to the outbound queue (on the committer thread,
# after the data flush); returns how to take it back if the final flush then fails.
EnqueueHook = Callable[[Path, "Envelope", str | None], Callable[[], None]]
# Sends a message the server writes itself (a vacation reply) with the null sender to one
# address: stored locally for a local one, else queued (server/app.py).
AutoReplyHook = Callable[[bytes, str, str], Awaitable[None]]
_MAX_CAPTURED_HEADERS = 256 * 1024
_MAX_REMEMBERED_IPS = 4096  # client addresses (and local users) whose answer is kept


_date_cache: tuple[int, str] = (0, "")


def _date_now() -> str:
    """RFC 5322 date of this second (UTC) for the Received field, formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, localtime=False))
    return _date_cache[1]


_background: set[asyncio.Task[None]] = set()  # held here until done (the loop holds weakly)


def _in_background(work: Awaitable[None], peer_ip: str) -> None:
    """Run ``work`` that no reply waits for; a failure is logged, never lost silently."""

    async def guarded() -> None:
        try:
            await work
        except Exception:
            log.exception("%s: background work failed", peer_ip)

    task = asyncio.get_running_loop().create_task(guarded())
    _background.add(task)
    task.add_done_callback(_background.discard)


def _add_recipient(env: Envelope, rcpt: str, decision: RecipientDecision) -> None:
    """An accepted recipient into the envelope: its local users, remote addresses, forwards."""
    assert decision.resolution is not None
    env.rcpts.append(rcpt)
    env.local.extend(u for u in decision.resolution.local if u not in env.local)
    env.remote.extend(a for a in decision.resolution.remote if a not in env.remote)
    if not decision.relay and not isinstance(decision, BounceReturn):
        for a in decision.resolution.remote:  # through our alias: a forward
            env.forwards.setdefault(a, rcpt)


def _sieve_refusal(reason: str) -> Reply:
    """A Sieve reject/ereject as the DATA reply: 550 5.7.1 with the reason on one line."""
    text = " ".join(reason.split())
    text = "".join(c if c.isascii() and c.isprintable() else "?" for c in text)[:400]
    return Reply(550, "5.7.1", text or "Message rejected by the recipient's filter")


class SubmissionPolicy(Protocol):
    """What an MSA checks beyond the MX rules (see policy/msa.py)."""

    def sender_rights(self, user: str) -> frozenset[str]:
        """The addresses ``user`` may send as (a directory lookup, may block)."""

    async def check_mail(self, user: str, sender: Mailbox | None,
                         rights: frozenset[str] | None = None) -> Reply | None:
        """A refusal, or None with one message of the user's hour reserved."""

    def check_rcpt(self, user: str, count: int) -> Reply | None: ...

    async def reserve_recipient(self, user: str) -> Reply | None:
        """A refusal, or None with one recipient of the user's hour reserved."""

    @property
    def store(self) -> object | None:
        """Not None when the counts are in this process's reach: the ``_now`` calls may
        be used, and answer in the same turn of the loop."""

    def check_mail_now(self, user: str, sender: Mailbox | None,
                       rights: frozenset[str] | None = None) -> Reply | None: ...

    def reserve_recipient_now(self, user: str) -> Reply | None: ...

    async def release(self, user: str, messages: int, recipients: int) -> None:
        """Give back reservations that no 250 spent."""

    def check_headers(self, user: str, header_block: bytes,
                      rights: frozenset[str] | None = None) -> tuple[Reply | None, bytes]:
        """A refusal, or the header block to store instead of the client's (completed
        with Message-ID and Date). The block is the client's header lines without the
        blank line, or the whole message when it ended first, then maybe not in CRLF."""

    def sign(self, user: str, message: bytes) -> bytes:
        """DKIM-Signature fields to add to the message (empty: none)."""

    def signs(self, message: bytes) -> bool:
        """Whether ``sign`` would add a field (a key of the From: domain)."""


class SMTPService(Listener):
    """One listening service: its settings, its sessions and its shared parts."""

    def __init__(
        self,
        cfg: Config,
        options: ServiceOptions,
        directory: Directory,
        committer: Committer,
        ssl_context: ssl.SSLContext | None,
        *,
        authenticate: Callable[[str, str, str], Awaitable[tuple[str, str | None]]] | None = None,
        enqueue: EnqueueHook | None = None,
        queued: Callable[[], None] | None = None,
        submission: SubmissionPolicy | None = None,
        profile: Profile = HARDENED,
        sender_auth: SenderAuth | None = None,
        milters: content.Milters | None = None,
    ) -> None:
        """``profile``: the policies given in Python (server/profile.py), never by a config."""
        self.cfg = cfg
        self.options = options
        self.directory = directory
        self.committer = committer
        self.ssl_context = ssl_context
        self.authenticate = authenticate
        self.enqueue = enqueue
        self.queued = queued  # called once queued mail is acknowledged (wakes delivery)
        self.submission = submission
        self.sender_auth = sender_auth  # MX: SPF, DKIM, DMARC (policy/senderauth.py)
        # [[milter]] content filters acting on this listener (server/milters.py), or None.
        self.milters = milters if milters is not None and milters.for_service(
            options.name) else None
        # MX only: blocklists, pre-greeting checks, greylisting (policy/inbound.py).
        self.inbound: InboundPolicy | None = None
        # Sieve at delivery (server/sieve_delivery.py) and how its replies leave; set by
        # the node when [sieve] is enabled.
        self.sieve: SieveDelivery | None = None
        self.auto_reply: AutoReplyHook | None = None
        # [limits] mailbox_quota(_messages) at RCPT for local users (policy/quota.py)
        self.quota = MailboxQuota(cfg.limits.mailbox_quota, cfg.limits.mailbox_quota_messages,
                                  self.maildir) \
            if cfg.limits.mailbox_quota or cfg.limits.mailbox_quota_messages else None
        super().__init__(cfg.limits.max_connections, cfg.limits.max_connections_per_ip,
                         limit_exceptions(cfg.limits.connection_limit_exceptions,
                                          cfg.relay.trusted_networks))
        self._trusted = [ipaddress.ip_network(n, strict=False) for n in cfg.relay.trusted_networks]
        self._trusted_ips: dict[str, bool] = {}
        self._maildirs: dict[str, Path] = {}
        lim = cfg.limits
        self.settings = EngineSettings(
            hostname=cfg.server.hostname,
            max_message_size=lim.max_message_size,
            max_recipients=lim.max_recipients,
            max_errors=lim.max_errors,
            error_slowdown=lim.error_slowdown,
            max_received_headers=lim.max_received_headers,
            tls_available=ssl_context is not None and not options.implicit_tls,
            auth_mechanisms=("PLAIN", "LOGIN") if options.auth else (),
            auth_requires_tls=True,
            auth_required=options.auth,
        )
        # On loopback the operator may allow AUTH in the clear (local MUAs, tests).
        self.loopback_settings = (
            dataclasses.replace(self.settings, auth_requires_tls=False)
            if options.plaintext_auth_on_loopback
            else self.settings
        )
        # The profile's seams (server/profile.py): engine settings, disclosure, recipients.
        self.recipients: RecipientPolicy = (
            profile.recipients if profile.recipients is not None
            else StrictRecipients(srs.for_config(cfg), cfg.srs.domain))
        weakened = profile.smtp(self.settings, directory)
        if weakened is not self.settings:
            self.settings = self.loopback_settings = weakened

    async def start(self, host: str, port: int,
                    sock: socket.socket | None = None) -> asyncio.base_events.Server:
        tls = self.ssl_context if self.options.implicit_tls else None
        return await self.listen(lambda: SMTPSession(self), host, port, tls, sock=sock)

    def maildir(self, user: str) -> Path:
        """The Maildir of a canonical local user, remembered (a Path costs a few us)."""
        found = self._maildirs.get(user)
        if found is None:
            if len(self._maildirs) >= _MAX_REMEMBERED_IPS:  # bounded like the IPs
                self._maildirs.clear()
            found = self._maildirs[user] = maildir_for(self.cfg.mail_path, user)
        return found

    def trusted(self, ip: str) -> bool:
        """Whether ``ip`` is in ``relay.trusted_networks``; remembered per address (asked
        for every message; none configured, the default, needs no parsing at all)."""
        if not self._trusted:
            return False
        known = self._trusted_ips.get(ip)
        if known is None:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                known = False
            else:
                known = any(addr in net for net in self._trusted)
            if len(self._trusted_ips) >= _MAX_REMEMBERED_IPS:
                self._trusted_ips.clear()
            self._trusted_ips[ip] = known
        return known


class SMTPSession(EngineSession):
    """One client connection."""

    engine: SMTPEngine | None

    def __init__(self, service: SMTPService) -> None:
        super().__init__()
        self.service = service
        self.engine = None
        self.peer_port = 0
        self.envelope = NO_TRANSACTION
        self.spool: Spool | None = None
        self.started = time.monotonic()
        self.tls_info = ""
        self.headers: bytearray | None = None  # submission: client headers held until checked
        self.refusal: Reply | None = None  # submission: refusal decided from the headers
        self.trace = b""  # the trace fields we wrote at the top of the spool
        # What the pre-greeting checks found (nothing when there were none).
        self.screened = NOT_SCREENED

    # ---------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = typing.cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.peer_ip, self.peer_port = str(peer[0]), int(peer[1])
        svc = self.service
        settings = svc.settings
        if svc.loopback_settings is not settings and is_loopback(self.peer_ip):
            settings = svc.loopback_settings
        settings = svc.stress.engine_settings(svc.limiter, settings)
        tls = svc.options.implicit_tls
        self.engine = SMTPEngine(settings, tls_active=tls)
        decisionlog.connect(svc.options.name, self.peer_ip)
        if tls:
            self._note_tls(transport)
        inbound = svc.inbound
        screening = inbound is not None and inbound.screens_connections
        screen = self._pregreeting_checks if screening else None
        self.admit(svc.limiter, svc.sessions, _REFUSALS, svc.cfg.limits.idle_timeout,
                   screen=screen, pregreet_refusal=PREGREET, stress=svc.stress)

    async def _pregreeting_checks(self) -> Reply | None:
        assert self.service.inbound is not None
        self.screened = await self.service.inbound.screen_connection(self.peer_ip)
        return self.screened.refusal

    def connection_refused(self, reply: Reply, reason: str) -> None:  # type: ignore[override]
        decisionlog.reject("CONNECT", self.peer_ip, reply)

    def eof_received(self) -> bool | None:
        self._abort_message()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._abort_message()
        self.release()
        self.transport = None

    def shutdown(self) -> None:
        engine = self.engine
        if engine is not None:
            self.close_engine(lambda: engine.close(SHUTTING_DOWN))

    def stress_reply(self, engine: SMTPEngine) -> None:  # type: ignore[override]
        self._abort_message()
        engine.close(STRESS_CLOSE)

    # ---------------------------------------------------------------- hooks

    def on_timer(self) -> None:
        engine = self.engine
        assert engine is not None
        lim = self.service.cfg.limits
        now = time.monotonic()
        if now - self.started >= lim.session_timeout:
            self.close_engine(lambda: engine.close(SESSION_TOO_LONG))
        elif self.task is None and now - self.last_activity >= lim.idle_timeout:
            self.close_engine(engine.timeout)
        else:
            wait = lim.idle_timeout - (now - self.last_activity)
            self.arm_timer(max(0.05, min(wait, lim.session_timeout - (now - self.started))))

    def on_closing(self) -> None:
        self._abort_message()

    def task_failed(self) -> None:
        if self.engine is not None and self.engine.waiting:
            self.engine.decide(TEMP_LOCAL_ERROR)

    def pump(self) -> None:
        super().pump()
        engine = self.engine
        if engine is not None:  # the engine's own refusals, one decision-log line each
            for verb, reply in engine.take_refusals():
                decisionlog.reject(verb, self.peer_ip, reply, helo=engine.helo)

    def handle(self, ev: Event) -> None:
        engine = self.engine
        assert engine is not None
        if isinstance(ev, DataChunk):
            if self.headers is not None:
                self._capture_headers(ev.data)
            elif self.spool is not None:
                self.spool.write(ev.data)
        elif isinstance(ev, RcptTo):
            if is_blocking(self.service.directory) or self.service.quota is not None \
                    or (self._submitting() and not self._counts_at_once()):
                self.run(self._rcpt_off_loop(ev))  # a networked directory, count or quota
                return
            decision = self._decide_rcpt(ev)
            if self._submitting():
                decision = self._reserve_rcpt_now(decision)
            if self._inbound_applies(decision):
                self.run(self._screen_rcpt(ev, decision))
            elif self._scripts_unknown(decision):
                self.run(self._finish_rcpt(ev, decision))
            else:
                self._answer_rcpt(ev, decision)
        elif isinstance(ev, MailFrom):
            self._on_mail(ev)
        elif isinstance(ev, DataStart):
            engine.decide(self._start_spool(ev.bdat))
        elif isinstance(ev, MessageComplete):
            self.run(self._store())
        elif isinstance(ev, MessageAborted):
            self._abort_message()
        elif isinstance(ev, ResetTransaction):
            self._abort_message()
            self.envelope = NO_TRANSACTION
        elif isinstance(ev, StartTLS):
            self.run(self._starttls())
        elif isinstance(ev, AuthCredentials):
            self.run(self._auth(ev))
        elif isinstance(ev, Helo | Closing):
            pass

    # ---------------------------------------------------------------- envelope

    def _on_mail(self, ev: MailFrom) -> None:
        engine = self.engine
        assert engine is not None
        self._release_held()
        self.envelope = Envelope(sender=ev.sender, requiretls=ev.requiretls, size=ev.size)
        if self.service.submission is not None and engine.authenticated_as is not None:
            if self._counts_at_once():
                user = engine.authenticated_as
                sub = self.service.submission
                # Looked up once for the transaction: MAIL's check and the From: check.
                rights = self.envelope.sender_rights = sub.sender_rights(user)
                self._mail_decided(ev, user, sub.check_mail_now(user, ev.sender, rights))
                return
            self.run(self._check_submission(ev))  # the rate may be counted over the network
            return
        if self._checks_sender():
            self._check_spf()  # ---- sender authentication: SPF
            return
        engine.decide(SENDER_OK)

    async def _check_submission(self, ev: MailFrom) -> None:
        """MAIL on submission: sender rights and the hourly rate. With a networked
        directory the user's sender rights are fetched in a thread, once for the
        transaction (MAIL and the From: check)."""
        engine, sub = self.engine, self.service.submission
        assert engine is not None and sub is not None and engine.authenticated_as is not None
        user = engine.authenticated_as
        rights = None
        if is_blocking(self.service.directory):
            rights = await asyncio.to_thread(sub.sender_rights, user)
            self.envelope.sender_rights = rights
        self._mail_decided(ev, user, await sub.check_mail(user, ev.sender, rights))

    def _counts_at_once(self) -> bool:
        """Submission's MAIL and RCPT decided in the turn of the loop that read them: the
        directory and the hourly counts are in this process's reach (policy/msa.py)."""
        sub = self.service.submission
        return (sub is not None and sub.store is not None
                and not is_blocking(self.service.directory))

    def _mail_decided(self, ev: MailFrom, user: str, refusal: Reply | None) -> None:
        engine = self.engine
        assert engine is not None
        if refusal is not None:
            decisionlog.reject("MAIL", self.peer_ip, refusal, from_=ev.sender or "",
                               helo=engine.helo)
        else:
            self.envelope.held_for, self.envelope.held_messages = user, 1
        engine.decide(refusal or SENDER_OK)

    def _submitting(self) -> bool:
        """An authenticated session on submission: its recipients count per hour."""
        engine = self.engine
        return (self.service.submission is not None and engine is not None
                and engine.authenticated_as is not None)

    async def _reserve_rcpt(self, decision: RecipientDecision) -> RecipientDecision:
        """Submission: an accepted recipient takes one of the user's hour, or is refused."""
        user = self._rcpt_user(decision)
        if user is None:
            return decision
        sub = self.service.submission
        assert sub is not None
        return self._rcpt_reserved(decision, user, await sub.reserve_recipient(user))

    def _reserve_rcpt_now(self, decision: RecipientDecision) -> RecipientDecision:
        """``_reserve_rcpt`` on the counts in reach (``_counts_at_once``)."""
        user = self._rcpt_user(decision)
        if user is None:
            return decision
        sub = self.service.submission
        assert sub is not None
        return self._rcpt_reserved(decision, user, sub.reserve_recipient_now(user))

    def _rcpt_user(self, decision: RecipientDecision) -> str | None:
        """The user whose hour an accepted recipient takes (None: nothing to reserve)."""
        engine = self.engine
        if not decision.reply.positive or self.service.submission is None or engine is None:
            return None
        return engine.authenticated_as

    def _rcpt_reserved(self, decision: RecipientDecision, user: str,
                       refusal: Reply | None) -> RecipientDecision:
        if refusal is not None:
            return RecipientDecision(refusal, None)
        self.envelope.held_for = user
        self.envelope.held_rcpts += 1
        return decision

    def _release_held(self) -> None:
        """Give back what the transaction reserved and no 250 spent (RSET, EHLO, a refused
        or aborted message, the connection gone): in the background, as nothing waits."""
        env, sub = self.envelope, self.service.submission
        if sub is None or not (env.held_messages or env.held_rcpts):
            return
        messages, rcpts = env.held_messages, env.held_rcpts
        env.held_messages = env.held_rcpts = 0
        _in_background(sub.release(env.held_for, messages, rcpts), self.peer_ip)

    def _checks_sender(self) -> bool:
        """MX mail from outside (not our trusted hosts) is checked: SPF, DKIM, DMARC."""
        return (self.service.sender_auth is not None and self.engine is not None
                and self.engine.authenticated_as is None
                and not self.service.trusted(self.peer_ip))

    def _check_spf(self) -> None:
        """SPF at MAIL FROM: decided at once from cached answers (the common case); else
        the lookups start in a thread. Only ``spf_fail = "reject"`` makes the reply to MAIL
        wait for them; otherwise MAIL is answered now and the lookups overlap RCPT and the
        data transfer, their result awaited at the end of data (``_sender_auth``)."""
        engine, auth, env = self.engine, self.service.sender_auth, self.envelope
        assert engine is not None and auth is not None
        sender = str(env.sender) if env.sender is not None else ""
        helo = engine.helo or ""
        done = senderauth.check_mail_cached(auth, self.peer_ip, helo, sender)
        if done is not None:
            self._spf_decided(done, sender)
            return
        pending = senderauth.check_mail_in_thread(auth, self.peer_ip, helo, sender)
        if auth.opts.spf_fail == "reject":
            self.run(self._await_spf(pending, sender))
            return
        env.spf_pending = pending
        engine.decide(SENDER_OK)

    async def _await_spf(self, pending: asyncio.Future[senderauth.SPFOutcome],
                         sender: str) -> None:
        self._spf_decided(await pending, sender)

    def _spf_decided(self, done: senderauth.SPFOutcome, sender: str) -> None:
        engine = self.engine
        assert engine is not None
        self.envelope.spf, refusal = done
        if refusal is not None:
            decisionlog.reject("MAIL", self.peer_ip, refusal, from_=sender, helo=engine.helo)
        engine.decide(refusal or SENDER_OK)

    def may_relay(self) -> bool:
        engine = self.engine
        return bool(engine and engine.authenticated_as) or self.service.trusted(self.peer_ip)

    def _limit_rcpt(self) -> RecipientDecision | None:
        sub = self.service.submission
        user = self.engine.authenticated_as if self.engine is not None else None
        if sub is not None and user is not None:
            refusal = sub.check_rcpt(user, len(self.envelope.rcpts))
            if refusal is not None:
                return RecipientDecision(refusal, None)
        return None

    def _decide_rcpt(self, ev: RcptTo) -> RecipientDecision:
        return self._limit_rcpt() or self.service.recipients.decide(
            ev.recipient, self.service.directory, may_relay=self.may_relay(),
            bounce=self.envelope.sender is None)

    async def _rcpt_off_loop(self, ev: RcptTo) -> None:
        """RCPT that awaits: the same decision, a networked directory's lookups in a
        thread, then on submission the recipient reserved in the (maybe shared) counts."""
        decision = self._limit_rcpt()
        if decision is None:
            if is_blocking(self.service.directory):
                decision = await asyncio.to_thread(
                    self.service.recipients.decide, ev.recipient, self.service.directory,
                    may_relay=self.may_relay(), bounce=self.envelope.sender is None)
            else:
                decision = self.service.recipients.decide(
                    ev.recipient, self.service.directory, may_relay=self.may_relay(),
                    bounce=self.envelope.sender is None)
        decision = await self._hold_to_quota(decision)
        decision = await self._reserve_rcpt(decision)
        if self._inbound_applies(decision):
            await self._screen_rcpt(ev, decision)
        else:
            await self._finish_rcpt(ev, decision)

    async def _hold_to_quota(self, decision: RecipientDecision) -> RecipientDecision:
        """A local recipient over its quota, or whom MAIL's SIZE= would take over: 452
        4.2.2 (policy/quota.py). The Maildirs are looked at in a thread."""
        quota, found = self.service.quota, decision.resolution
        if quota is None or not decision.reply.positive or found is None or not found.local:
            return decision
        refusal = await asyncio.to_thread(quota.refusal, found.local, self.envelope.size)
        return decision if refusal is None else RecipientDecision(refusal, None)

    def _inbound_applies(self, decision: RecipientDecision) -> bool:
        """Blocklists and greylisting judge only mail from outside to our own users."""
        inbound = self.service.inbound
        return (inbound is not None and decision.reply.positive and not decision.relay
                and inbound.checks_rcpt(self.screened) and not self.may_relay())

    async def _screen_rcpt(self, ev: RcptTo, decision: RecipientDecision) -> None:
        inbound, engine = self.service.inbound, self.engine
        assert inbound is not None and engine is not None
        refusal = await inbound.check_rcpt(
            self.peer_ip, self.screened, engine.helo, self.envelope.sender, ev.recipient)
        if refusal is not None:
            decision = RecipientDecision(refusal, None)
        await self._finish_rcpt(ev, decision)

    # ---------------------------------------------------------------- Sieve at RCPT

    def _scripts_unknown(self, decision: RecipientDecision) -> bool:
        """Whether an accepted recipient's users have a script not yet compiled (then
        loaded in a thread before the answer: it may reject, see ``_one_transaction``)."""
        sv = self.service.sieve
        if sv is None or not decision.reply.positive or decision.resolution is None:
            return False
        env = self.envelope
        for user in decision.resolution.local:
            if user not in env.scripts:
                found = sv.cached(self.service.maildir(user))
                if found is None:
                    return True
                env.scripts[user] = found
        return False

    async def _finish_rcpt(self, ev: RcptTo, decision: RecipientDecision) -> None:
        sv = self.service.sieve
        if sv is not None and self._scripts_unknown(decision):
            assert decision.resolution is not None
            for user in decision.resolution.local:
                if user not in self.envelope.scripts:
                    self.envelope.scripts[user] = await asyncio.to_thread(
                        sv.load, self.service.maildir(user))
        self._answer_rcpt(ev, decision)

    def _one_transaction(self, decision: RecipientDecision) -> Reply | None:
        """452 for a second recipient when this one's or an earlier one's scripts can
        reject: a DATA reply is one for all, and a reject must be its recipient's own."""
        sv, env = self.service.sieve, self.envelope
        if sv is None or decision.resolution is None:
            return None
        users = decision.resolution.local
        rejecting = bool(users) and (sv.global_reject() or any(
            env.scripts[u].uses_reject for u in users if u in env.scripts))
        if env.rcpts and (env.sieve_reject or rejecting):
            if env.held_rcpts and self.service.submission is not None:
                env.held_rcpts -= 1  # the hour's reservation given back
                _in_background(self.service.submission.release(env.held_for, 0, 1),
                               self.peer_ip)
            return ONE_PER_TRANSACTION
        env.sieve_reject = env.sieve_reject or rejecting
        return None

    def _answer_rcpt(self, ev: RcptTo, decision: RecipientDecision) -> None:
        engine = self.engine
        assert engine is not None
        if decision.reply.positive and decision.resolution is not None:
            refusal = self._one_transaction(decision)
            if refusal is not None:
                decision = RecipientDecision(refusal, None)
        if decision.reply.positive and decision.resolution is not None:
            assert self.envelope is not NO_TRANSACTION
            _add_recipient(self.envelope, str(ev.recipient), decision)
        else:
            decisionlog.reject("RCPT", self.peer_ip, decision.reply,
                               from_=self.envelope.sender or "", to=ev.recipient,
                               helo=engine.helo)
        engine.decide(decision.reply)

    # ---------------------------------------------------------------- the message

    def _start_spool(self, bdat: bool) -> Reply:
        try:
            self.spool = self.service.committer.new_spool()
            self.envelope.queue_id = new_id()
            self.trace = self._trace_headers()
            self.spool.write(self.trace)
            self.refusal = None
            if self.service.submission is not None:
                self.headers = bytearray()
        except OSError:
            log.exception("cannot open spool")
            self.spool = None
            return TEMP_LOCAL_ERROR
        return Reply(250, "2.0.0", "OK") if bdat else READY_FOR_DATA

    def _trace_headers(self) -> bytes:
        engine = self.engine
        assert engine is not None
        env = self.envelope
        sender = str(env.sender) if env.sender is not None else ""
        proto = "ESMTP" if engine.esmtp else "SMTP"
        if engine.tls_active:
            proto += "S"
        if engine.authenticated_as:
            proto += "A"
        rcpt = f"\r\n\tfor <{env.rcpts[0]}>" if len(env.rcpts) == 1 else ""
        tls = f"\r\n\t(using {self.tls_info})" if self.tls_info else ""
        svc = self.service
        received = (
            f"Received: from {engine.helo} ([{self.peer_ip}])\r\n"
            f"\tby {svc.cfg.server.hostname} with {proto} id {env.queue_id}{tls}{rcpt};\r\n"
            f"\t{_date_now()}\r\n"
        )
        return f"Return-Path: <{sender}>\r\n{received}".encode()

    async def _store(self) -> None:
        engine = self.engine
        spool = self.spool
        assert engine is not None
        if self.headers is not None:
            self._release_headers()
        self.spool = None
        if self.refusal is not None:
            if spool is not None:
                spool.discard()
            decisionlog.reject("DATA", self.peer_ip, self.refusal,
                               from_=self.envelope.sender or "", helo=engine.helo)
            engine.decide(self.refusal)
            return
        if spool is None or spool.failed is not None:
            if spool is not None:
                spool.discard()
            engine.decide(storage_refusal(spool.failed.errno if spool and spool.failed else None))
            return
        env = self.envelope
        svc = self.service
        # ---- sender authentication: DKIM/DMARC on the MX, DKIM signing on submission;
        # the content filters on the message as it will be stored: on the MX after the
        # checks (which must see it as the client sent it), on submission before signing.
        junk = False
        refusal = None
        filtered: content.Outcome | None = None
        submitting = svc.submission is not None and engine.authenticated_as is not None
        try:
            if submitting and svc.milters is not None:
                filtered = await self._filter(spool, svc.milters)
                spool, refusal = filtered.spool, filtered.refusal
            if refusal is None and not (filtered and filtered.discard):
                spool, refusal, junk = await self._sender_auth(spool)
            if refusal is None and not submitting and svc.milters is not None:
                filtered = await self._filter(spool, svc.milters)
                spool, refusal = filtered.spool, filtered.refusal
            if refusal is None and filtered is not None and not filtered.discard:
                refusal = await self._apply_envelope(filtered)
        except Exception:
            spool.discard()
            raise
        if refusal is not None:
            spool.discard()
            decisionlog.reject("DATA", self.peer_ip, refusal, from_=env.sender or "")
            engine.decide(refusal)
            return
        if filtered is not None and (filtered.discard or not env.rcpts):
            # Discarded by a filter (or every recipient taken away): the 250 the filter
            # asked for, nothing stored; the decision log has the filter's line.
            spool.discard()
            if not filtered.discard:
                log.info("%s: every recipient removed by the content filters: nothing stored",
                         env.queue_id)
            env.held_messages = env.held_rcpts = 0
            engine.decide(Reply(250, "2.0.0", f"OK queued as {env.queue_id}"))
            return
        if filtered is not None and filtered.quarantine is not None:
            junk = True
        # ---- Sieve: each local user's scripts decide where the message goes (not for a
        # quarantined message: Junk it is, and no vacation answers it).
        outcomes: list[Outcome] = []
        letters: dict[Path, str] = {}
        seen: SieveMessage | None = None
        if svc.sieve is not None and env.local and not junk and self._sieve_applies():
            try:
                outcomes, seen = await self._sieve(svc.sieve, spool)
            except Exception:
                spool.discard()
                raise
            rejected = next((o.reject for o in outcomes if o.reject is not None), None)
            if rejected is not None:
                spool.discard()
                refusal = _sieve_refusal(rejected.reason)
                decisionlog.reject("DATA", self.peer_ip, refusal, from_=env.sender or "",
                                   to=env.local[0], helo=engine.helo)
                engine.decide(refusal)
                return
            maildirs = []
            for o in outcomes:
                for md, fl in o.targets.items():
                    maildirs.append(md)
                    if fl:
                        letters[md] = "".join(sorted(set(letters.get(md, "") + fl)))
                for addr in o.remote_redirects:  # forwards of the user's (SRS rules)
                    if addr not in env.remote:
                        env.remote.append(addr)
                        env.forwards.setdefault(addr, o.user)
            if not maildirs and not env.remote:  # discarded by every user's script
                spool.discard()
                env.held_messages = env.held_rcpts = 0
                log.info("%s: discarded by Sieve for every recipient: nothing stored",
                         env.queue_id)
                engine.decide(Reply(250, "2.0.0", f"OK queued as {env.queue_id}"))
                self._reply_later(outcomes, seen)
                return
        else:
            maildirs = [svc.maildir(u) for u in env.local]
        if junk:
            maildirs = [m / ".Junk" for m in maildirs]
        extra = None
        if env.remote and svc.enqueue is not None:
            enqueue = svc.enqueue
            submitted_by = engine.authenticated_as

            def extra(path: Path) -> Callable[[], None]:
                return enqueue(path, env, submitted_by)

        elif env.remote:
            spool.discard()
            engine.decide(TEMP_LOCAL_ERROR)
            return
        try:
            await svc.committer.commit(spool, maildirs, extra, letters)
        except StorageError as exc:
            reply = storage_refusal(exc.errno)
            log.error("storage error, message refused with %d: %s", reply.code, exc)
            engine.decide(reply)
            return
        # Durable now: the 250 is earned, and nothing that follows may take it back.
        env.held_messages = env.held_rcpts = 0  # the hour's reservations are spent
        accepted = Reply(250, "2.0.0", f"OK queued as {env.queue_id}")
        engine.decide(accepted)
        # Its record right after: the 250 goes out first (the session's pump, as this task
        # ends), the client's next command waits on nothing but the reply.
        asyncio.get_running_loop().call_soon(
            decisionlog.accept, self.peer_ip, accepted, env.sender or "",
            len(env.local) + len(env.remote), spool.size, self.tls_info.partition(" ")[0])
        if env.remote and svc.queued is not None:
            svc.queued()
        self._reply_later(outcomes, seen)

    # ---------------------------------------------------------------- Sieve at DATA

    def _reply_later(self, outcomes: list[Outcome], seen: SieveMessage | None) -> None:
        """After the 250: the vacation replies the scripts asked for, in the background."""
        svc = self.service
        replies = [o for o in outcomes if o.vacation is not None]
        if replies and seen is not None and svc.sieve is not None and svc.auto_reply is not None:
            _in_background(self._vacations(svc.sieve, svc.auto_reply, replies, seen,
                                           self._vacation_authenticated()), self.peer_ip)

    def _sieve_applies(self) -> bool:
        """Whether any script may run: a global one, or a user's found at RCPT (or not
        known: recipients a content filter added)."""
        sv, env = self.service.sieve, self.envelope
        assert sv is not None
        return sv.has_globals or any(
            env.scripts.get(u) is None or env.scripts[u].key is not None for u in env.local)

    async def _sieve(self, sv: SieveDelivery,
                     spool: Spool) -> tuple[list[Outcome], SieveMessage]:
        """Every local user's scripts on the message as stored. In a thread (disk, CPU),
        unless the message is in memory and each user's scripts are compiled and ran in
        under 2 ms lately (a 50-rule script takes about 0.2 ms, less than the hand-over to
        a thread costs the loop): then on the loop, and only what writes goes to a thread
        (folders to create, redirects)."""
        env = self.envelope
        scripts = [env.scripts.get(u) for u in env.local]
        if not spool.in_memory or not all(sv.cheap(c) for c in scripts):
            return await asyncio.to_thread(self._run_sieve, sv, spool)
        msg = self._sieve_message(spool)
        svc, alone = self.service, len(env.local) == 1 and not env.remote
        done = [(u, sv.evaluate(u, svc.maildir(u), msg, c))
                for u, c in zip(env.local, scripts, strict=True) if c is not None]

        def apply() -> list[Outcome]:
            return [sv.apply(u, svc.maildir(u), msg, actions, alone=alone)
                    for u, actions in done]

        if any(sv.needs_io(svc.maildir(u), actions) for u, actions in done):
            return await asyncio.to_thread(apply), msg
        return apply(), msg

    def _sieve_message(self, spool: Spool) -> SieveMessage:
        """The message as the scripts see it: its header section read from the spool, its
        body only if a test asks."""
        env, engine = self.envelope, self.engine
        assert engine is not None
        head = senderauth.read_headers(spool, 0) + b"\r\n"

        def body() -> bytes:
            return b"".join(spool.chunks())[len(head):]

        return SieveMessage(head, body, spool.size,
                            "" if env.sender is None else str(env.sender),
                            engine.authenticated_as,
                            env.rcpts[0] if len(env.rcpts) == 1 else None, env.queue_id)

    def _run_sieve(self, sv: SieveDelivery,
                   spool: Spool) -> tuple[list[Outcome], SieveMessage]:
        """``_sieve`` in a thread: every user's script loaded (if need be) and run."""
        env = self.envelope
        msg = self._sieve_message(spool)
        alone = len(env.local) == 1 and not env.remote
        return [sv.run(u, self.service.maildir(u), msg, alone=alone) for u in env.local], msg

    def _vacation_authenticated(self) -> bool:
        """The envelope sender proven (policy/vacation.py): AUTH, SPF pass, aligned DKIM."""
        env, engine = self.envelope, self.engine
        assert engine is not None
        sender = "" if env.sender is None else str(env.sender)
        spf = next((r.domain for r in env.spf if r.identity == "mailfrom"
                    and r.result == "pass"), "")
        return vacation.sender_authenticated(
            submitted_by=engine.authenticated_as, sender=sender, spf_pass_domain=spf,
            dkim_pass_domains=env.dkim_pass)

    async def _vacations(self, sv: SieveDelivery, send: AutoReplyHook,
                         outcomes: list[Outcome], msg: SieveMessage,
                         authenticated: bool) -> None:
        """After the 250: each vacation reply decided (policy/vacation.py), then sent."""
        for o in outcomes:
            reply = await asyncio.to_thread(sv.vacation_reply, o, self.service.maildir(o.user),
                                            msg, authenticated)
            if reply is not None:
                await send(reply, msg.sender, msg.queue_id)

    async def _filter(self, spool: Spool, milters: content.Milters) -> content.Outcome:
        """The message through the service's milters (server/milters.py)."""
        engine, env = self.engine, self.envelope
        assert engine is not None
        version, _, cipher = self.tls_info.partition(" with cipher ")
        ctx = content.FilterContext(
            self.service.options.name, self.service.cfg.server.hostname, self.peer_ip,
            self.peer_port, engine.helo or "", env.queue_id, engine.authenticated_as,
            version, cipher)
        sender = "" if env.sender is None else str(env.sender)
        out = await milters.run(ctx, self.service.committer, spool, self.trace, sender,
                                list(env.rcpts))
        if out.spool is not spool:
            spool.discard()
            self.trace = out.trace
        return out

    async def _apply_envelope(self, out: content.Outcome) -> Reply | None:
        """A filter's sender and recipient changes. Each recipient goes through the same
        recipient policy as RCPT for this session (on the MX, for a client that may not
        relay: our domains only); one it refuses is dropped and logged. A quarantined
        message for remote recipients is refused on submission: there is no hold queue."""
        env, svc = self.envelope, self.service
        if out.sender is not None:
            env.sender = content.mailbox(out.sender) if out.sender else None
        if out.recipients is not None:
            env.rcpts, env.local, env.remote, env.forwards = [], [], [], {}
            for addr in out.recipients:
                rcpt = content.mailbox(addr)
                if rcpt is None:
                    continue
                decide = functools.partial(svc.recipients.decide, rcpt, svc.directory,
                                           may_relay=self.may_relay(),
                                           bounce=env.sender is None)
                decision = (await asyncio.to_thread(decide) if is_blocking(svc.directory)
                            else decide())
                if decision.reply.positive and decision.resolution is not None:
                    _add_recipient(env, addr, decision)
                else:
                    decisionlog.reject("MILTER", self.peer_ip, decision.reply,
                                       from_=env.sender or "", to=addr)
        if out.quarantine is not None and env.remote and svc.submission is not None:
            return Reply(550, "5.7.1", f"Message held by content filter: {out.quarantine}")
        return None

    async def _sender_auth(self, spool: Spool) -> tuple[Spool, Reply | None, bool]:
        """The spool to store (with the fields added), a refusal, whether it is junk."""
        svc, engine = self.service, self.engine
        assert engine is not None
        user = engine.authenticated_as
        if svc.submission is not None and user is not None:
            sa = svc.cfg.sender_auth
            spool = await senderauth.signed(
                svc.submission.sign if sa.sign_submissions else None, svc.committer, spool,
                self.trace, user, sa.dkim_max_bytes, svc.cfg.server.hostname,
                svc.submission.signs)
            return spool, None, False
        if svc.sender_auth is None or not self._checks_sender():
            if svc.submission is None:  # MX: no forged result of ours either way
                spool = await senderauth.unforged(svc.committer, spool, self.trace,
                                                  svc.cfg.server.hostname)
            return spool, None, False
        env = self.envelope
        if env.spf_pending is not None:  # SPF's lookups, started at MAIL FROM
            env.spf = (await env.spf_pending)[0]
            env.spf_pending = None
        out = await senderauth.inbound(svc.sender_auth, svc.committer, spool, self.trace,
                                       env.spf, "" if env.sender is None else str(env.sender),
                                       self.peer_ip)
        env.dkim_pass = out.dkim_pass
        return out.spool, out.refusal, out.junk

    def _capture_headers(self, data: bytes) -> None:
        """Hold the client's header section until its end, to check and complete it."""
        hdr = self.headers
        assert hdr is not None
        start = max(0, len(hdr) - 3)
        hdr += data
        end = 0 if hdr.startswith(b"\r\n") else hdr.find(b"\r\n\r\n", start)
        if end == 0:
            self._release_headers(split=0)
        elif end > 0:
            self._release_headers(split=end + 2)
        elif len(hdr) > _MAX_CAPTURED_HEADERS:
            self.refusal = Reply(552, "5.6.0", "Message header section too large")
            self.headers = None

    def _release_headers(self, split: int | None = None) -> None:
        """Check the header block, add what an MSA adds, and pass everything on."""
        hdr = self.headers
        engine = self.engine
        sub = self.service.submission
        self.headers = None
        if hdr is None or sub is None or engine is None or engine.authenticated_as is None:
            return
        block = bytes(hdr if split is None else hdr[:split])
        rest = b"" if split is None else bytes(hdr[split:])
        refusal, completed = sub.check_headers(engine.authenticated_as, block,
                                               self.envelope.sender_rights)
        if refusal is not None:
            self.refusal = refusal
            return
        if self.spool is not None:
            self.spool.write(completed + rest)

    def _abort_message(self) -> None:
        """The transaction ends without a 250 (or after it, with nothing held)."""
        self._release_held()
        self.headers = None
        if self.spool is not None:
            self.spool.discard()
            self.spool = None

    # ---------------------------------------------------------------- TLS and AUTH

    async def _starttls(self) -> None:
        engine, ctx = self.engine, self.service.ssl_context
        assert engine is not None and ctx is not None
        failed = Reply(421, "4.7.0", "TLS handshake failed")
        if await self.start_tls(ctx, lambda: engine.close(failed)):
            assert self.transport is not None
            self._note_tls(self.transport)
            engine.tls_started()

    def _note_tls(self, transport: asyncio.BaseTransport) -> None:
        obj = transport.get_extra_info("ssl_object")
        if obj is not None:
            cipher = obj.cipher()
            self.tls_info = f"{obj.version()} with cipher {cipher[0] if cipher else '?'}"

    async def _auth(self, ev: AuthCredentials) -> None:
        engine = self.engine
        assert engine is not None
        auth = self.service.authenticate
        if auth is None:
            engine.decide(Reply(454, "4.7.0", "Temporary authentication failure"))
            return
        outcome, user = await auth(ev.username, ev.password, self.peer_ip)
        if outcome == "ok" and user is not None:
            engine.decide(Reply(235, "2.7.0", "Authentication successful"))
            engine.authenticated_as = user
        elif outcome == "blocked":
            engine.decide(Reply(421, "4.7.0", "Too many failed authentications, try later"))
        elif outcome == "unavailable":  # the shared counters are down (policy/authn.py)
            engine.decide(Reply(454, "4.7.0", "Temporary authentication failure"))
        else:
            engine.decide(Reply(535, "5.7.8", "Authentication credentials invalid"))
