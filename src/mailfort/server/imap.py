"""asyncio IMAP listeners (143 with STARTTLS, 993 with implicit TLS) driving the engine.

A session is an ``asyncio.Protocol`` like the POP3 and SMTP sessions (server/session.py):
bytes go straight into ``protocol/imap.py``, so what a client pipelines behind STARTTLS is
discarded by the engine before the handshake. Logins go through the node's authenticator
(policy/authn.py: the same delays, blocks and decision log lines as POP3 and submission).
A logged-in session holds one ``MailSession`` (server/imap_commands.py), blocking code that
runs in worker threads, one call at a time, while reading is paused: the engine parses
nothing more until the command is answered, which keeps replies in order. Its untagged
responses are pulled from a lazy iterable in batches and written as the client reads
them, so a ``UID FETCH 1:* BODY.PEEK[]`` of a large mailbox never sits whole in memory.

IDLE waits on the node's mailbox watcher (``MailboxWatcher.subscribe``; a session
subscribes to its selected mailbox while it is selected), and a command that changed a
mailbox tells the watcher (``changed``) so the other sessions wake at once. The sessions
of this process woken on one mailbox in one loop turn get their updates from one call in
one worker thread (``IMAPServer.updates``): one scan of the mailbox between them
(``Mailbox.scan(since)``) and one thread hand-off instead of one each. The idle
timeout depends on the state: short before login, 30 minutes after it (RFC 9051 §5.4) and
during IDLE. The number of sessions of one user is bounded per node (``UserSessions`` in a
single process; ``SharedUserSessions`` over the worker processes of a node, which count in
memory they share): past it LOGIN gets ``NO [LIMIT]`` and the session stays
unauthenticated, so a client can tell it from a wrong password and try again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import mmap
import os
import socket
import ssl
import time
import typing
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from mailfort.config import LimitsConfig
from mailfort.policy import decisionlog
from mailfort.policy.authn import AuthOutcome, AuthStatus
from mailfort.protocol.imap import (
    UNAVAILABLE,
    CheckCredentials,
    EngineSettings,
    Event,
    Execute,
    Idle,
    IdleEnded,
    IMAPEngine,
    StartTLS,
    State,
)
from mailfort.protocol.imap_parse import Command
from mailfort.server.connections import Admission, flocked, is_loopback, limit_exceptions
from mailfort.server.imap_commands import MailSession, MailSessionSettings, Outcome
from mailfort.server.session import EngineSession, Listener
from mailfort.store.maildir import maildir_for

log = logging.getLogger("mailfort.imap")

TOO_MANY_CONNECTIONS = "[UNAVAILABLE] Too many connections, try again later"
TOO_MANY_FROM_IP = "[UNAVAILABLE] Too many connections from your address, try again later"
_REFUSALS = {Admission.TOO_MANY: TOO_MANY_CONNECTIONS, Admission.TOO_MANY_FROM_IP: TOO_MANY_FROM_IP,
             Admission.RATE_FROM_IP: TOO_MANY_FROM_IP}
SHUTTING_DOWN = "[UNAVAILABLE] Service shutting down, try again later"
STRESS_CLOSE = "[UNAVAILABLE] Server busy, closing idle connection, try again later"
TOO_MANY_SESSIONS = "[LIMIT] Too many sessions for this user, try again later"
INTERNAL = "[SERVERBUG] Internal error, closing connection"
BATCH_BYTES = 256 * 1024  # untagged responses pulled from the mailbox side per write
# (a thread hop each: 2 MB of BODY[] in 8 hops, not 33; a session holds at most this)
FIRST_BATCH_BYTES = 16 * 1024  # the first write of an answer; each next one twice as large
# up to BATCH_BYTES: the client starts reading after ~50 ENVELOPEs (~1 ms of work), not
# after ~850 (~20 ms, idle meanwhile); 2 MB of BODY[] in 11 hops, not 8
UPDATES_CHUNK = 64  # IDLE updates of one mailbox handed back to the loop at a time
POLL_SECONDS = 1.0  # the fallback watcher's period


# ------------------------------------------------------------------ what the driver needs


class MailSessionLike(Protocol):
    """server/imap_commands.MailSession, as this driver uses it (IMAP_CONTRACT.md)."""

    def execute(self, cmd: Command) -> Outcome: ...

    def updates(self, since: float | None = None) -> list[bytes]: ...

    @property
    def watched(self) -> Path | None: ...

    def changed(self) -> Path | None: ...

    def close(self) -> None: ...


class Subscription(Protocol):
    async def wait(self) -> float | None:
        """Until a change may have happened; the monotonic time of the wake-up (None:
        unknown, the mail session then scans on its own)."""

    def close(self) -> None: ...


class Watcher(Protocol):
    """server/mailbox_watch.MailboxWatcher, as this driver uses it."""

    def subscribe(self, mailbox_dir: Path) -> Subscription: ...

    def changed(self, mailbox_dir: Path) -> None: ...


class Authenticator(Protocol):
    async def verify(self, username: str, password: str, client_ip: str) -> AuthOutcome: ...


class _Poll:
    """A subscription that wakes every ``POLL_SECONDS`` (spurious wake-ups are allowed)."""

    async def wait(self) -> float | None:
        await asyncio.sleep(POLL_SECONDS)
        return None

    def close(self) -> None:
        pass


class PollingWatcher:
    """The fallback watcher: no notification, IDLE polls once a second. For a listener
    built without the node's watcher (tests, tools)."""

    def subscribe(self, mailbox_dir: Path) -> Subscription:
        return _Poll()

    def changed(self, mailbox_dir: Path) -> None:
        pass


class UserSessions:
    """Logged-in IMAP sessions per user in this process, bounded."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}

    def take(self, user: str) -> bool:
        n = self.counts.get(user, 0)
        if n >= self.limit:
            return False
        self.counts[user] = n + 1
        return True

    def give(self, user: str) -> None:
        n = self.counts.get(user, 0) - 1
        if n > 0:
            self.counts[user] = n
        else:
            self.counts.pop(user, None)


class UserSessionTable:
    """Logged-in IMAP sessions per user of every worker process of a node, in memory they
    all share: mapped by the supervisor before it forks, as ``ConnectionTable``.

    Each worker slot owns a row: an open-addressing hash table (linear probing) of a keyed
    64-bit hash of the user's name (key drawn at each start) and the number of that user's
    sessions in that worker. Exact, unlike ConnectionTable's buckets: a limit of a few
    sessions per user that two users shared would refuse one for the other's devices.
    A worker writes only its own row; the supervisor clears the row of one that ended, so
    a SIGKILLed worker's sessions are not counted for ever."""

    _ENTRY = 12  # a u64 key and a u32 count

    def __init__(self, slots: int, sessions: int, lock_path: Path) -> None:
        """``sessions``: the most a worker can hold (``limits.max_connections``); a row
        has room for twice as many users, so probes stay short."""
        self.slots = slots
        self.cap = 1 << max(6, (2 * max(1, sessions) - 1).bit_length())
        self.lock_path = lock_path
        n = slots * self.cap
        self._mem = mmap.mmap(-1, n * self._ENTRY)  # MAP_SHARED, anonymous
        self.keys = memoryview(self._mem)[:n * 8].cast("Q")
        self.counts = memoryview(self._mem)[n * 8:].cast("I")
        self._secret = os.urandom(16)

    def key(self, user: str) -> int:
        digest = hashlib.blake2b(user.encode("utf-8", "surrogateescape"), digest_size=8,
                                 key=self._secret).digest()
        return int.from_bytes(digest, "little") or 1  # 0 marks a free entry

    def find(self, row: int, key: int) -> int:
        """The index of ``key`` in ``row``, or of the free entry that ends its probe
        (``keys[i] == 0``), or -1 when the row is full without it."""
        keys, mask, base = self.keys, self.cap - 1, row * self.cap
        i = key & mask
        for _ in range(self.cap):
            k = keys[base + i]
            if k == key or k == 0:
                return base + i
            i = (i + 1) & mask
        return -1

    def clear(self, row: int) -> None:
        """Forget what ``row`` counted (its worker died or stopped)."""
        with flocked(self.lock_path):
            a, b = row * self.cap, (row + 1) * self.cap
            self.keys[a:b] = memoryview(bytes(8 * self.cap)).cast("Q")
            self.counts[a:b] = memoryview(bytes(4 * self.cap)).cast("I")


class SharedUserSessions:
    """``UserSessions`` for one worker of a node: the limit counts every worker's sessions
    (``UserSessionTable``). ``take`` holds the table's lock, so the limit is exact across
    workers; ``give`` only lowers a count of this worker's row (no lock: a reader sees the
    count before or after, as with a release racing an admission)."""

    def __init__(self, table: UserSessionTable, row: int, limit: int) -> None:
        self.table, self.row, self.limit = table, row, limit
        self._used = 0  # entries of this row with a key (live or at 0): compacted when high
        self._lock = os.open(table.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def reset_slot(self) -> None:
        self.table.clear(self.row)
        self._used = 0

    def take(self, user: str) -> bool:
        t = self.table
        key = t.key(user)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            total = 0
            for row in range(t.slots):
                i = t.find(row, key)
                if i >= 0 and t.keys[i] == key:
                    total += t.counts[i]
            if total >= self.limit:
                return False
            i = t.find(self.row, key)
            if i < 0 or t.keys[i] != key:
                if self._used + 1 > t.cap * 3 // 4:
                    self._compact()
                i = t.find(self.row, key)
                if i < 0 or self._used + 1 > t.cap * 3 // 4:
                    log.warning("imap: the table of sessions per user is full (more sessions "
                                "than limits.max_connections at start?): login refused")
                    return False
                t.keys[i] = key
                self._used += 1
            t.counts[i] += 1
            return True
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    def give(self, user: str) -> None:
        t = self.table
        key = t.key(user)
        i = t.find(self.row, key)
        if i >= 0 and t.keys[i] == key and t.counts[i] > 0:
            t.counts[i] -= 1

    def _compact(self) -> None:
        """Drop this row's users at 0 sessions (under the lock: readers never see a row
        half rewritten)."""
        t = self.table
        a, b = self.row * t.cap, (self.row + 1) * t.cap
        live = [(t.keys[i], t.counts[i]) for i in range(a, b) if t.keys[i] and t.counts[i]]
        t.keys[a:b] = memoryview(bytes(8 * t.cap)).cast("Q")
        t.counts[a:b] = memoryview(bytes(4 * t.cap)).cast("I")
        for key, count in live:
            i = t.find(self.row, key)
            t.keys[i], t.counts[i] = key, count
        self._used = len(live)

    def close(self) -> None:
        os.close(self._lock)


def open_mail_session(maildir: Path, user: str, limits: LimitsConfig) -> MailSessionLike:
    """The mailbox side of a logged-in session (blocking: creates the special folders)."""
    settings = MailSessionSettings(
        append_limit=limits.imap_append_limit,
        quota_storage=limits.mailbox_quota or None,
        quota_messages=limits.mailbox_quota_messages or None)
    return MailSession(maildir, user=user, settings=settings)


def _batch(items: Iterator[bytes], limit: int) -> bytes:
    """Untagged responses from ``items`` up to about ``limit`` octets (runs in a thread)."""
    out: list[bytes] = []
    size = 0
    for item in items:
        out.append(item)
        size += len(item)
        if size >= limit:
            break
    return b"".join(out)


# ------------------------------------------------------------------ the listener


class IMAPServer(Listener):
    """One IMAP listener kind: plaintext+STARTTLS (``implicit_tls=False``) or IMAPS."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None,
        authenticator: Authenticator,
        mail_dir: Path,
        limits: LimitsConfig,
        implicit_tls: bool,
        allow_plaintext: bool = False,
        watcher: Watcher | None = None,
        user_sessions: UserSessions | SharedUserSessions | None = None,
        open_session: Callable[[Path, str], MailSessionLike] | None = None,
    ) -> None:
        """``allow_plaintext`` (``allow_plaintext_auth_on_loopback``) applies to loopback
        clients only. ``watcher``, ``user_sessions``: the node's, shared by its IMAP
        listeners. ``open_session(maildir, user)``: the mailbox side (blocking)."""
        if implicit_tls and ssl_context is None:
            raise ValueError("implicit TLS needs an ssl_context")
        super().__init__(limits.max_connections, limits.max_connections_per_ip,
                         limit_exceptions(limits.connection_limit_exceptions, ()))
        self.ssl_context = ssl_context
        self.authenticator = authenticator
        self.mail_dir = Path(mail_dir)
        self.limits = limits
        self.implicit_tls = implicit_tls
        self.watcher: Watcher = watcher if watcher is not None else PollingWatcher()
        self.user_sessions: UserSessions | SharedUserSessions = (
            user_sessions if user_sessions is not None
            else UserSessions(limits.imap_sessions_per_user))
        self.open_session = open_session or (
            lambda maildir, user: open_mail_session(maildir, user, limits))
        base = EngineSettings(
            tls_available=ssl_context is not None and not implicit_tls,
            allow_plaintext=False,
            max_errors=limits.max_errors,
            error_slowdown=limits.error_slowdown,
            append_limit=limits.imap_append_limit,
        )
        self.settings = base
        self.loopback_settings = (
            dataclasses.replace(base, allow_plaintext=True) if allow_plaintext else base)
        self.name = "imaps" if implicit_tls else "imap"
        # mailbox directory -> IDLE updates asked for in this loop turn, run together
        self._wakes: dict[Path, list[tuple[MailSessionLike, float | None,
                                           asyncio.Future[list[bytes]]]]] = {}

    async def start(self, host: str, port: int,
                    sock: socket.socket | None = None) -> asyncio.base_events.Server:
        tls = self.ssl_context if self.implicit_tls else None
        return await self.listen(lambda: IMAPSession(self), host, port, tls, sock=sock)

    def updates(self, watched: Path, mail: MailSessionLike,
                since: float | None) -> asyncio.Future[list[bytes]]:
        """``mail.updates(since)``, run in a worker thread together with those of the
        other sessions on ``watched`` that ask in this loop turn (one change wakes them
        all in one turn). In order, one after the other: the first scans, the others find
        its scan (``Mailbox.scan``) and only compare their views with the snapshot."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[bytes]] = loop.create_future()
        batch = self._wakes.get(watched)
        if batch is None:
            batch = self._wakes[watched] = []
            loop.call_soon(self._run_updates, watched)
        batch.append((mail, since, fut))
        return fut

    def _run_updates(self, watched: Path) -> None:
        batch = self._wakes.pop(watched, [])
        loop = asyncio.get_running_loop()
        work = [(mail, since) for mail, since, _ in batch]
        futs = [fut for _, _, fut in batch]

        def hand_out(start: int, results: list[list[bytes] | BaseException]) -> None:
            for fut, got in zip(futs[start:start + len(results)], results, strict=True):
                if fut.done():
                    continue
                if isinstance(got, BaseException):
                    fut.set_exception(got)
                else:
                    fut.set_result(got)

        def finished(f: asyncio.Future[None]) -> None:  # the thread failed or was stopped
            exc = (None if not f.cancelled() and f.exception() is None
                   else asyncio.CancelledError() if f.cancelled() else f.exception())
            for fut in futs:
                if not fut.done():
                    fut.set_exception(exc or RuntimeError("IDLE updates not made"))

        def chunk(start: int, results: list[list[bytes] | BaseException]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(hand_out, start, results)

        try:
            done = loop.run_in_executor(None, _updates_of, work, chunk)
        except RuntimeError as exc:  # the executor is shut down: the loop is ending
            for fut in futs:
                fut.set_exception(exc)
            return
        done.add_done_callback(finished)


# ------------------------------------------------------------------ one connection


class IMAPSession(EngineSession):
    """One client connection."""

    engine: IMAPEngine | None

    def __init__(self, server: IMAPServer) -> None:
        super().__init__()
        self.server = server
        self.engine = None
        self.mail: MailSessionLike | None = None
        self.user: str | None = None  # holds a slot of UserSessions while set
        self._busy: asyncio.Future[Any] | None = None  # the mail session's call in a thread
        self._untagged: Iterator[bytes] | None = None  # being written
        self._watched: Path | None = None
        self._sub: Subscription | None = None
        self._idle_wait: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = typing.cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.peer_ip = str(peer[0])
        srv = self.server
        settings = srv.loopback_settings if is_loopback(self.peer_ip) else srv.settings
        settings = srv.stress.engine_settings(srv.limiter, settings)
        self.engine = IMAPEngine(settings, tls_active=srv.implicit_tls)
        decisionlog.connect(srv.name, self.peer_ip)
        self.admit(srv.limiter, srv.sessions, _REFUSALS, srv.limits.imap_login_timeout,
                   stress=srv.stress)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.release()
        self._end_mail()

    def stress_reply(self, engine: IMAPEngine) -> None:  # type: ignore[override]
        engine.close(STRESS_CLOSE)

    def shutdown(self) -> None:
        engine = self.engine
        if engine is not None:  # a command in flight is answered first (an APPEND stored)
            self.close_engine(lambda: engine.close(SHUTTING_DOWN))

    # ---------------------------------------------------------------- hooks

    def _timeout(self) -> float:
        engine, limits = self.engine, self.server.limits
        assert engine is not None
        if engine.idling:
            return limits.imap_idle_timeout
        if engine.state is State.NOT_AUTHENTICATED:
            return limits.imap_login_timeout
        return limits.imap_timeout

    def _rearm(self) -> None:
        self.arm_timer(self._timeout())

    def on_timer(self) -> None:
        self.idle_check(self._timeout(), "imap")

    def task_failed(self) -> None:
        if self.engine is not None:
            self.engine.close(INTERNAL)

    def on_closing(self) -> None:
        self._end_mail()

    def handle(self, ev: Event) -> None:
        if isinstance(ev, CheckCredentials):
            self.run(self._check(ev))
        elif isinstance(ev, Execute):
            self.run(self._execute(ev.command))
        elif isinstance(ev, StartTLS):
            self.run(self._starttls())
        elif isinstance(ev, Idle):
            self._idle_wait = asyncio.get_running_loop().create_task(self._idle())
        elif isinstance(ev, IdleEnded):
            self._stop_idle()
            self._rearm()  # the timer was set for IDLE's longer timeout

    # ---------------------------------------------------------------- login and TLS

    async def _check(self, ev: CheckCredentials) -> None:
        engine, srv = self.engine, self.server
        assert engine is not None
        outcome = await srv.authenticator.verify(ev.username, ev.password, self.peer_ip)
        if outcome.status is AuthStatus.UNAVAILABLE:  # shared counters down: try later
            engine.credentials_unverifiable(UNAVAILABLE)
            return
        if not (outcome.ok and outcome.user):  # one reply: neither account nor block shows
            log.info("imap %s: login %s (%s)", self.peer_ip, outcome.status, ev.mechanism)
            engine.credentials_refused()
            return
        user = outcome.user
        if not srv.user_sessions.take(user):
            log.info("imap %s: %s has %d sessions, login refused", self.peer_ip, user,
                     srv.user_sessions.limit)
            engine.credentials_unverifiable(TOO_MANY_SESSIONS)
            return
        fut = asyncio.get_running_loop().run_in_executor(
            None, srv.open_session, maildir_for(srv.mail_dir, user), user)
        self._busy = fut
        try:
            mail = await asyncio.shield(fut)
        except (OSError, ValueError):
            srv.user_sessions.give(user)
            log.exception("imap %s: cannot open the mailboxes of %s", self.peer_ip, user)
            engine.credentials_unverifiable(UNAVAILABLE)
            return
        except BaseException:  # cancelled: the thread goes on; close what it opens
            srv.user_sessions.give(user)
            fut.add_done_callback(_close_opened)
            raise
        self.mail, self.user = mail, user
        if self.transport is None or engine.closed:
            self._end_mail()
            return
        log.info("imap %s: %s logged in", self.peer_ip, user)
        engine.credentials_accepted(user)

    async def _starttls(self) -> None:
        engine, ctx = self.engine, self.server.ssl_context
        assert engine is not None and ctx is not None
        if await self.start_tls(ctx, lambda: engine.close("TLS handshake failed")):
            engine.tls_started()

    # ---------------------------------------------------------------- the mailbox side

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn`` in a worker thread. If this session is cancelled meanwhile the call runs
        to its end, and the mail session is closed only after it (``_end_mail``)."""
        return await asyncio.shield(self._submit(fn, *args))

    def _submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """``fn`` started in a worker thread (the one call in flight: ``_busy``)."""
        fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        self._busy = fut
        return fut

    async def _execute(self, cmd: Command) -> None:
        engine, mail = self.engine, self.mail
        assert engine is not None and mail is not None
        if cmd.name == "NOOP":  # RFC 9051 §6.1.2: the updates are its whole point
            engine.write_untagged(b"".join(await self._call(mail.updates)))
            engine.executed("OK", None, "NOOP completed")
            return
        outcome: Outcome = await self._call(mail.execute, cmd)
        if not await self._stream(outcome.untagged):
            return  # the client is gone
        for changed in _changed_dirs(mail):
            self.server.watcher.changed(changed)
        engine.executed(outcome.status, outcome.code, outcome.text, outcome.selected)
        self._follow(mail.watched)

    async def _stream(self, untagged: Iterable[bytes]) -> bool:
        """Write the untagged responses in batches as the client reads them; False if the
        connection was lost meanwhile."""
        engine = self.engine
        assert engine is not None
        items = iter(untagged)
        self._untagged = items
        limit = FIRST_BATCH_BYTES
        try:
            chunk = await self._call(_batch, items, limit)
            while chunk:
                engine.write_untagged(chunk)
                out = engine.take_output()
                if self.transport is None:
                    return False
                self.transport.write(out)
                self.last_activity = time.monotonic()
                # The next batch is made in its thread while the client reads this one
                # (one batch ahead at most: it waits below until the transport drains).
                limit = min(limit * 2, BATCH_BYTES)
                ahead = self._submit(_batch, items, limit)
                await self.writable()
                chunk = await asyncio.shield(ahead)
                if self.transport is None:
                    return False
            return True
        finally:
            if self._untagged is items:
                self._untagged = None

    def _follow(self, watched: Path | None) -> None:
        """Subscribe to the selected mailbox (and only to it) while it is selected."""
        if watched == self._watched:
            return
        if self._sub is not None:
            self._sub.close()
            self._sub = None
        self._watched = watched
        if watched is not None:
            self._sub = self.server.watcher.subscribe(watched)

    # ---------------------------------------------------------------- IDLE

    async def _idle(self) -> None:
        """While the engine idles: the updates due at once (a change between the last
        command's scan and the subscription is not lost), then those of each wake-up of the
        subscription, each written by a task so that DONE is read only after them. No
        mailbox selected: nothing to watch; DONE or the timeout ends it."""
        first = True
        while True:
            sub, engine = self._sub, self.engine
            if sub is None or engine is None:
                return
            # The wake-up's time: a scan of the mailbox begun after it (another session's
            # of this worker, woken by the same change) shows all it signals.
            since = None if first else await sub.wait()
            first = False
            while self.task is not None:  # the previous wake-up's updates still going out
                await asyncio.wait([self.task])
            if not engine.idling or self.transport is None:
                return
            self.run(self._idle_updates(since))

    async def _idle_updates(self, since: float | None) -> None:
        engine, mail, watched = self.engine, self.mail, self._watched
        assert engine is not None and mail is not None
        if watched is None:
            lines = await self._call(mail.updates, since)
        else:  # with the other sessions woken on this mailbox (the one call in flight)
            fut = self._busy = self.server.updates(watched, mail, since)
            lines = await asyncio.shield(fut)
        engine.write_untagged(b"".join(lines))

    def _stop_idle(self) -> None:
        task, self._idle_wait = self._idle_wait, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    # ---------------------------------------------------------------- the end

    def _end_mail(self) -> None:
        """Give back the user's slot and close the mail session (after its call in flight,
        and the responses being written, in a thread)."""
        self._stop_idle()
        self._follow(None)
        if self.user is not None:
            self.server.user_sessions.give(self.user)
            self.user = None
        mail, self.mail = self.mail, None
        items, self._untagged = self._untagged, None
        if mail is None:
            return
        busy = self._busy
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            _close_quietly(mail, items)
            return
        if busy is None or busy.done():
            loop.run_in_executor(None, _close_quietly, mail, items)
        else:
            busy.add_done_callback(
                lambda _: loop.run_in_executor(None, _close_quietly, mail, items))


def _updates_of(work: list[tuple[MailSessionLike, float | None]],
                chunk: Callable[[int, list[list[bytes] | BaseException]], None]) -> None:
    """Each mail session's ``updates(since)`` in turn (in a worker thread), handed out
    ``UPDATES_CHUNK`` at a time so that the first sessions of a large batch are not kept
    waiting for the last; one that fails fails alone."""
    start = 0
    out: list[list[bytes] | BaseException] = []
    for mail, since in work:
        try:
            out.append(mail.updates(since))
        except Exception as exc:
            out.append(exc)
        if len(out) >= UPDATES_CHUNK:
            chunk(start, out)
            start, out = start + len(out), []
    if out:
        chunk(start, out)


def _changed_dirs(mail: MailSessionLike) -> list[Path]:
    """What the last command changed: every directory (MOVE: source and target) where the
    mail session says, else the one of the contract's ``changed``."""
    many = getattr(mail, "changed_dirs", None)
    if many is not None:
        return list(many())
    one = mail.changed()
    return [one] if one is not None else []


def _close_opened(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        _close_quietly(fut.result(), None)


def _close_quietly(mail: MailSessionLike, items: Iterator[bytes] | None) -> None:
    try:
        close = getattr(items, "close", None)
        if close is not None:
            close()
        mail.close()
    except Exception:
        log.exception("imap: closing a mail session failed")
