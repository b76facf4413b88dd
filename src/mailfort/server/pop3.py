"""asyncio POP3 listeners (110 with STLS, 995 with implicit TLS) driving the sans-I/O engine.

A session is an ``asyncio.Protocol`` like the SMTP sessions: bytes from the socket go
straight into the engine, so whatever a client pipelines after STLS is thrown away by the
engine before the handshake and can never be read as if it had come over TLS. Work that
must not block the loop (argon2 in the authenticator, opening and snapshotting a Maildir,
reading large messages, deleting at QUIT) runs as one task at a time while reading is
paused; the engine parses nothing more until it is answered, which keeps pipelined replies
in order. Small messages (one chunk) are answered inline, and after each one the next is
read while the client is still reading this one (clients download in order), which is what
makes a mailbox of thousands of 1 KB messages download fast. Commands a client pipelined
are answered in one write (up to ``PIPELINE_MAX`` octets), not one send per reply.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from mailfort.config import LimitsConfig
from mailfort.policy import decisionlog
from mailfort.policy.authn import AuthOutcome, AuthStatus
from mailfort.protocol.pop3 import (
    IN_USE,
    SYS_TEMP,
    CheckCredentials,
    EngineSettings,
    Event,
    OpenMailbox,
    POP3Engine,
    Quit,
    Retrieve,
    StartTLS,
)
from mailfort.server.connections import Admission, is_loopback, limit_exceptions
from mailfort.server.session import EngineSession, Listener
from mailfort.store.maildir import maildir_for
from mailfort.store.maildrop_lock import Lease, LocksUnavailable, MaildropLocks, NodeLocks
from mailfort.store.pop3_mailbox import CHUNK, MailboxInUse, POP3Mailbox

log = logging.getLogger("mailfort.pop3")
T = TypeVar("T")

TOO_MANY_CONNECTIONS = "[SYS/TEMP] Too many connections, try again later"
TOO_MANY_FROM_IP = "[SYS/TEMP] Too many connections from your address, try again later"
_REFUSALS = {Admission.TOO_MANY: TOO_MANY_CONNECTIONS, Admission.TOO_MANY_FROM_IP: TOO_MANY_FROM_IP,
             Admission.RATE_FROM_IP: TOO_MANY_FROM_IP}
SHUTTING_DOWN = "[SYS/TEMP] Service shutting down, try again later"
STRESS_CLOSE = "[SYS/TEMP] Server busy, closing idle connection, try again later"
MESSAGE_GONE = "[SYS/TEMP] Message is no longer available"
# Read-ahead holds at most this much per session beyond what the transport buffers.
READ_AHEAD_MAX = 16 * 1024
# Answers to pipelined commands wait for one write until they hold this much.
PIPELINE_MAX = 64 * 1024
SHUTDOWN_LEASE_WAIT = 5.0  # seconds a stopping server waits to release maildrop leases


class Authenticator(Protocol):
    """``mailfort.policy.authn.Authenticator``: same delay and counters as SMTP AUTH."""

    async def verify(self, username: str, password: str, client_ip: str) -> AuthOutcome: ...



class POP3Server(Listener):
    """One POP3 listener kind: plaintext+STLS (``implicit_tls=False``) or POP3S."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None,
        authenticator: Authenticator,
        mail_dir: Path,
        limits: LimitsConfig,
        implicit_tls: bool,
        allow_plaintext: bool = False,
        hostname: str = "localhost",
        locks: MaildropLocks | None = None,
    ) -> None:
        """``allow_plaintext`` (config ``allow_plaintext_auth_on_loopback``) only ever
        applies to clients connecting from a loopback address. ``locks``: the maildrop
        lock across nodes (store/maildrop_lock.py); default: this node's own."""
        if implicit_tls and ssl_context is None:
            raise ValueError("implicit TLS needs an ssl_context")
        super().__init__(limits.max_connections, limits.max_connections_per_ip,
                         limit_exceptions(limits.connection_limit_exceptions, ()))
        self.ssl_context = ssl_context
        self.authenticator = authenticator
        self.mail_dir = Path(mail_dir)  # the Maildir root (Config.mail_path)
        self.limits = limits
        self.implicit_tls = implicit_tls
        self.hostname = hostname
        self.locks: MaildropLocks = locks if locks is not None else NodeLocks()
        self.releasing: set[asyncio.Task[None]] = set()  # leases freed after a close
        # Told the Maildir once a session's UPDATE and close have changed it (DELE, Seen,
        # new/ -> cur/), so IMAP sessions on other nodes learn it (server/mailbox_watch.py).
        self.changed: Callable[[Path], None] | None = None
        base = EngineSettings(
            tls_available=ssl_context is not None and not implicit_tls,
            allow_plaintext=False,
            max_errors=limits.max_errors,
            error_slowdown=limits.error_slowdown,
            greeting=f"{hostname} POP3 ready",
        )
        self.settings = base
        self.loopback_settings = (
            dataclasses.replace(base, allow_plaintext=True) if allow_plaintext else base
        )

    async def start(self, host: str, port: int,
                    sock: socket.socket | None = None) -> asyncio.base_events.Server:
        tls = self.ssl_context if self.implicit_tls else None
        return await self.listen(lambda: POP3Session(self), host, port, tls, sock=sock)

    async def close(self) -> None:
        await super().close()
        if self.releasing:  # let closes finish and free their maildrops on other nodes
            await asyncio.wait(list(self.releasing), timeout=SHUTDOWN_LEASE_WAIT)


class POP3Session(EngineSession):
    """One client connection."""

    engine: POP3Engine | None

    def __init__(self, server: POP3Server) -> None:
        super().__init__()
        self.server = server
        self.engine = None
        self.mailbox: POP3Mailbox | None = None
        self.lease: Lease | None = None  # the maildrop lock across nodes, with the mailbox
        self._watch: asyncio.Task[None] | None = None  # ends the session if it is lost
        # The message after the one just sent, read while the client reads that one: a
        # client downloading a mailbox asks for them in order.
        self._ahead: tuple[int, bytes] | None = None
        self.updating = False  # QUIT was read: the deletions are under way

    # ---------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = typing.cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.peer_ip = str(peer[0])
        srv = self.server
        settings = srv.loopback_settings if is_loopback(self.peer_ip) else srv.settings
        settings = srv.stress.engine_settings(srv.limiter, settings)
        self.engine = POP3Engine(settings, tls_active=srv.implicit_tls)
        decisionlog.connect("pop3s" if srv.implicit_tls else "pop3", self.peer_ip)
        self.admit(srv.limiter, srv.sessions, _REFUSALS, srv.limits.pop3_idle_timeout,
                   stress=srv.stress)

    def eof_received(self) -> bool | None:
        return False  # close: a half-closed POP3 client is gone

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.release()
        self._release_mailbox()  # dropped before QUIT: nothing is deleted

    def stress_reply(self, engine: POP3Engine) -> None:  # type: ignore[override]
        engine.close(STRESS_CLOSE)

    def shutdown(self) -> None:
        if self.updating:
            return  # a QUIT being applied: its deletions end soon, then +OK and close
        if self.engine is not None and self.transport is not None:
            if self.task is not None:
                self.task.cancel()
            self.engine.close(SHUTTING_DOWN)
            self.pump()

    # ---------------------------------------------------------------- hooks

    def on_timer(self) -> None:
        self.idle_check(self.server.limits.pop3_idle_timeout, "pop3")

    def task_failed(self) -> None:
        if self.engine is not None:
            self.engine.close(SYS_TEMP)

    def handle(self, ev: Event) -> None:
        if type(ev) is Retrieve:  # first: a session is mostly RETRs
            self._retrieve(ev)
        elif isinstance(ev, CheckCredentials):
            self.run(self._check(ev))
        elif isinstance(ev, OpenMailbox):
            self.run(self._open(ev.user))
        elif isinstance(ev, StartTLS):
            self.run(self._starttls())
        elif isinstance(ev, Quit):
            self.run(self._update(ev))

    # ---------------------------------------------------------------- events

    async def _check(self, ev: CheckCredentials) -> None:
        engine = self.engine
        assert engine is not None
        outcome = await self.server.authenticator.verify(ev.username, ev.password, self.peer_ip)
        if outcome.ok and outcome.user:
            engine.credentials_accepted(outcome.user)
        elif outcome.status is AuthStatus.UNAVAILABLE:  # shared counters down: try later
            engine.credentials_unverifiable(SYS_TEMP)
        else:  # failed or blocked: one reply, so neither the account nor the block shows
            log.info("pop3 %s: login %s (%s)", self.peer_ip, outcome.status, ev.mechanism)
            engine.credentials_refused()

    async def _open(self, user: str) -> None:
        engine = self.engine
        assert engine is not None
        try:
            lease = await self.server.locks.acquire(user)
        except LocksUnavailable as exc:  # exclusivity cannot be known: not now
            log.warning("pop3 %s: maildrop lock of %s unavailable (%s)", self.peer_ip, user,
                        exc)
            engine.mailbox_unavailable(SYS_TEMP)
            return
        if lease is None:
            log.info("pop3 %s: %s mailbox in use on another node", self.peer_ip, user)
            engine.mailbox_unavailable(IN_USE)
            return
        try:
            path = maildir_for(self.server.mail_dir, user)
            mailbox = await _in_thread(POP3Mailbox.open, path, cleanup=POP3Mailbox.close)
        except MailboxInUse:
            self._free(lease)
            log.info("pop3 %s: %s mailbox in use", self.peer_ip, user)
            engine.mailbox_unavailable(IN_USE)
            return
        except (OSError, ValueError):
            self._free(lease)
            log.exception("pop3 %s: cannot open the mailbox of %s", self.peer_ip, user)
            engine.mailbox_unavailable(SYS_TEMP)
            return
        except BaseException:  # cancelled: _in_thread closes the mailbox
            self._free(lease)
            raise
        if self.transport is None or engine.closed or lease.lost.is_set():
            await asyncio.to_thread(mailbox.close)
            self._free(lease)
            if not engine.closed and self.transport is not None:
                engine.mailbox_unavailable(SYS_TEMP)
            return
        self.mailbox, self.lease = mailbox, lease
        self._watch = asyncio.get_running_loop().create_task(self._watch_lease(lease))
        log.info("pop3 %s: %s logged in, %d messages", self.peer_ip, user,
                 len(mailbox.messages))
        engine.mailbox_opened(mailbox.listing)

    def _retrieve(self, ev: Retrieve) -> None:
        """Small messages inline (one read), large ones as a task reading in a thread."""
        engine, mailbox, transport = self.engine, self.mailbox, self.transport
        assert engine is not None and mailbox is not None and transport is not None
        ahead, self._ahead = self._ahead, None
        size = mailbox.messages[ev.index].size
        if size > CHUNK or self.write_paused:
            self.run(self._stream(ev))
            return
        if ahead is not None and ahead[0] == ev.index and ev.top_lines is None:
            wire: bytes | None = ahead[1]
        else:
            try:
                wire = mailbox.read_whole(ev.index, ev.top_lines)
            except OSError:
                engine.retrieve_failed(MESSAGE_GONE)
                return
        if wire is None:  # larger than its name said
            self.run(self._stream(ev))
            return
        engine.retrieve_whole(size, wire)
        if engine.holding or (engine.line_waiting and engine.output_size < PIPELINE_MAX):
            # The client pipelined more: its answers go out with this one, in one write
            # (pump's, or the last inline RETR's below). One send per reply cost a system
            # call each, ~10-20 us on loopback. A negative reply pipelined before this
            # RETR past the soft error limit is held (pump's ``take_hold``), this answer
            # with it: the direct write below sent it at once.
            if ev.top_lines is None:
                mailbox.retrieved(ev.index)
            return
        transport.write(engine.take_output())
        if ev.top_lines is None:  # after the write: the client need not wait for these
            mailbox.retrieved(ev.index)
            self._read_ahead(mailbox, ev.index + 1)

    def _read_ahead(self, mailbox: POP3Mailbox, index: int) -> None:
        if index >= len(mailbox.messages) or mailbox.messages[index].size > READ_AHEAD_MAX:
            return
        try:
            wire = mailbox.read_whole(index, None)
        except OSError:
            return  # RETR will say it is gone
        if wire is not None:
            self._ahead = (index, wire)

    async def _stream(self, ev: Retrieve) -> None:
        engine, mailbox = self.engine, self.mailbox
        assert engine is not None and mailbox is not None
        try:
            reader = await asyncio.to_thread(mailbox.reader, ev.index, ev.top_lines)
        except OSError:
            engine.retrieve_failed(MESSAGE_GONE)
            return
        try:
            engine.retrieve_started(mailbox.messages[ev.index].size)
            self._write(engine.take_output())
            while not reader.done:
                await self.writable()
                if self.transport is None:
                    return
                self._write(await asyncio.to_thread(reader.read))
                self.last_activity = time.monotonic()
        finally:
            reader.close()
        engine.retrieve_done()
        if ev.top_lines is None:
            mailbox.retrieved(ev.index)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and data:
            self.transport.write(data)

    async def _starttls(self) -> None:
        engine, ctx = self.engine, self.server.ssl_context
        assert engine is not None and ctx is not None
        if await self.start_tls(ctx, lambda: engine.close("TLS handshake failed")):
            engine.tls_started()

    async def _update(self, ev: Quit) -> None:
        """UPDATE state (RFC 1939 §6): the only place where messages are removed.

        Once QUIT is read the deletions are carried out whatever happens to the session (a
        client that resets the connection, a shutdown): the thread runs to its end, and only
        then is the mailbox closed (new/ -> cur/ moves, unlock). Closing it as soon as this
        task is cancelled let the renames race the deletions (a doomed file moved away from
        the path being unlinked survived) and freed the maildrop for a next session while
        its messages were still being deleted.
        """
        engine, mailbox, lease = self.engine, self.mailbox, self.lease
        assert engine is not None and mailbox is not None
        if lease is not None and lease.lost.is_set():  # another node may hold it now
            self._release_mailbox()
            engine.update_done(len(ev.deletions))
            return
        self._stop_watch()
        self.mailbox, self.lease = None, None  # the UPDATE owns them, even if the client drops
        self._ahead = None
        self.updating = True
        if not ev.deletions:
            # Nothing to remove: no thread to go through before the +OK (most sessions end
            # so). The close goes on in a thread as below, and a next login waits for it.
            self._close(mailbox, lease)
            if lease is not None:
                await lease.closing()
            engine.update_done(0)
            return
        deleting = asyncio.get_running_loop().run_in_executor(
            None, mailbox.delete, [i for i, _ in ev.deletions])
        # Seen flags and the new/ -> cur/ moves need not hold up the +OK: they finish in a
        # thread, and a next session of this mailbox waits for them (see POP3Mailbox.open;
        # on another node, the lease says "closing" until then: store/maildrop_lock.py).
        deleting.add_done_callback(lambda _: self._close(mailbox, lease))
        failures = await asyncio.shield(deleting)
        if lease is not None:
            await lease.closing()  # before the +OK: a next login anywhere waits for us
        if failures:
            log.error("pop3 %s: %d deletions failed", self.peer_ip, failures)
        engine.update_done(failures)

    def _release_mailbox(self) -> None:
        self._stop_watch()
        mailbox, self.mailbox = self.mailbox, None
        lease, self.lease = self.lease, None
        self._ahead = None
        if mailbox is not None:
            self._close(mailbox, lease)

    def _stop_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None and watch is not asyncio.current_task():
            watch.cancel()

    def _close(self, mailbox: POP3Mailbox, lease: Lease | None) -> None:
        """Close the mailbox in a thread; then free the maildrop for the other nodes."""
        closing = _close_in_thread(mailbox)
        changed = self.server.changed
        if changed is not None and closing is not None:
            closing.add_done_callback(lambda _: changed(mailbox.maildir))
        if lease is not None:
            self._free(lease, closing)

    def _free(self, lease: Lease, after: asyncio.Future[None] | None = None) -> None:
        async def free() -> None:
            await lease.closing()
            if after is not None:
                await asyncio.wait([after])
            await lease.release()

        try:
            task = asyncio.get_running_loop().create_task(free())
        except RuntimeError:  # no loop any more: the lease ends by expiry
            return
        self.server.releasing.add(task)
        task.add_done_callback(self.server.releasing.discard)

    async def _watch_lease(self, lease: Lease) -> None:
        """End the session if the maildrop lease is lost: another node may have it now,
        so nothing of this session's (its DELEs) may be applied."""
        await lease.lost.wait()
        engine = self.engine
        if self.lease is not lease or engine is None:
            return
        self._watch = None
        log.error("pop3 %s: maildrop lease lost, closing the session", self.peer_ip)
        self._release_mailbox()
        self.close_engine(lambda: engine.close(SYS_TEMP))


def _close_in_thread(mailbox: POP3Mailbox) -> asyncio.Future[None] | None:
    """Close (file in cur/, unlock) without blocking the loop; the close's future."""
    mailbox.announce_close()
    try:
        return asyncio.get_running_loop().run_in_executor(None, mailbox.close)
    except RuntimeError:  # the loop or its executor is shutting down: release it right here
        mailbox.close()
        return None


async def _in_thread(fn: Callable[..., T], *args: Any,
                     cleanup: Callable[[T], object] | None = None) -> T:
    """Run fn in a thread; if we are cancelled, it still finishes and ``cleanup`` gets the
    result, so a mailbox locked by a thread that outlived its session is always released."""
    fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        if cleanup is not None:
            def done(f: asyncio.Future[T]) -> None:
                if not f.cancelled() and f.exception() is None:
                    cleanup(f.result())

            fut.add_done_callback(done)
        raise
