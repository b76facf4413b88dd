"""What every mailfort session does around its sans-I/O engine, SMTP and POP3 alike.

A session is an ``asyncio.Protocol`` (an idle one costs one object and a place in a bucket
of deadlines, server/timer_wheel.py). Bytes go into the engine; its events are handled one
at a time; work that must not block the loop (fsync, argon2, mailbox I/O) runs as one task
while reading is paused, so the engine parses nothing more until that work has answered
it. Connection limits are checked at greeting; the slot is given back in one idempotent
place (``_free_slot``), as soon as the last reply is decided (before the client can read
it) or else when the session ends any other way (``release``, which a connection dying in
a STARTTLS handshake reaches too). A client that stops reading its replies is not read
either. A close the server decides (shutdown, session time limit) waits for that work's
answer, so a reply already earned (250 for a durable message) is sent before the 421,
never replaced by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from mailfort.policy import decisionlog
from mailfort.server import timer_wheel
from mailfort.server.acceptor import Acceptor, bind
from mailfort.server.connections import Admission, ConnectionLimiter, Network
from mailfort.server.stress import PROGRESS_BYTES, StressGuard

log = logging.getLogger("mailfort.session")

CLOSE_GRACE = 10.0  # seconds a closing client gets to read our last reply
TLS_HANDSHAKE_TIMEOUT = 30.0
SHUTDOWN_GRACE = 5.0  # seconds a stopping listener waits for its sessions to end
# Octets of replies one pass of ``pump`` gathers before it writes them and looks whether
# the client still reads: what one read of pipelined commands can make us hold.
PUMP_FLUSH_AT = 64 * 1024


class Listener:
    """One service's listening sockets, its live sessions and its connection limits."""

    def __init__(self, max_connections: int, max_connections_per_ip: int,
                 exempt: Iterable[Network] = ()) -> None:
        """A node gives every listener its one limiter; this one serves a listener alone
        (``exempt``: see ``connections.limit_exceptions``)."""
        self.sessions: set[Any] = set()
        self.limiter = ConnectionLimiter(max_connections, max_connections_per_ip,
                                         exempt=exempt)
        self.stress = StressGuard()  # a node gives every listener its one guard
        self.servers: list[Acceptor] = []

    async def listen(
        self,
        factory: Callable[[], asyncio.BaseProtocol],
        host: str,
        port: int,
        implicit_tls: ssl.SSLContext | None,
        sock: socket.socket | None = None,
    ) -> Acceptor:
        """Listen on host:port (port 0: a free one), or on ``sock`` already bound and
        listening (socket activation, worker processes); TLS from the first byte if given."""
        if sock is None:
            sock = bind(host, port)
        tls_timeout = TLS_HANDSHAKE_TIMEOUT if implicit_tls else None
        acceptor = Acceptor(sock, factory, implicit_tls, tls_timeout)
        self.servers.append(acceptor)
        return acceptor

    @property
    def ports(self) -> list[int]:
        return [s.getsockname()[1] for srv in self.servers for s in srv.sockets]

    async def close(self) -> None:
        """Stop accepting, tell every session (421 / -ERR), wait a little for the sockets.

        A session with work in flight closes once that work has answered (a stored
        message gets its 250 first, see ``close_engine``); the wait lets those last
        replies reach the client before the node stops its store and its loop.
        (``Server.wait_closed`` waits for the connections only from Python 3.12 on.)
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_GRACE
        for server in self.servers:
            server.close()
        for session in list(self.sessions):
            session.shutdown()
        while self.sessions and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), max(0.1, deadline - loop.time()))
        self.servers.clear()


class Engine(Protocol):
    """The part of the SMTP and POP3 engines that the session plumbing uses."""

    @property
    def closed(self) -> bool: ...

    def receive(self, data: bytes) -> None: ...

    def next_event(self) -> Any: ...

    def take_output(self) -> bytes: ...

    def take_hold(self) -> float: ...

    internal_error: Exception | None

    def greet(self) -> None: ...

    def refuse_connection(self, reply: Any) -> None: ...


class EngineSession(asyncio.Protocol):
    """Plumbing shared by the SMTP and POP3 sessions; subclasses handle the events."""

    engine: Engine | None

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer_ip = "?"
        self.task: asyncio.Task[None] | None = None
        self.last_activity = time.monotonic()
        self.timer: int | None = None  # the bucket of the deadline (server/timer_wheel.py)
        self._wheel: timer_wheel.TimerWheel | None = None
        self.counted = False
        self.closing = False
        self.write_paused = False  # the client is not reading its replies
        self._resumed: asyncio.Event | None = None  # made by the first wait for it
        self._limiter: ConnectionLimiter | None = None
        self._sessions: set[Any] | None = None
        # Stress mode (server/stress.py): progress is a reply sent or PROGRESS_BYTES received.
        self._stress: StressGuard | None = None
        self.last_progress = self.last_activity
        self._unprogressed = 0  # octets received since the last progress
        self._close_after_task: Callable[[], None] | None = None
        # Pre-greeting screening (MX): the banner waits for it; input meanwhile is refused.
        self.screening: asyncio.Task[None] | None = None
        self._pregreet_refusal: Any = None

    # ---------------------------------------------------------------- admission

    def admit(
        self,
        limiter: ConnectionLimiter,
        sessions: set[Any],
        refusals: dict[Admission, Any],
        idle_timeout: float,
        screen: Callable[[], Awaitable[Any]] | None = None,
        pregreet_refusal: Any = None,
        stress: StressGuard | None = None,
    ) -> None:
        """Greet, or refuse with the engine's own words when a connection limit is hit.

        ``screen`` (checks before the banner, e.g. blocklists and a greeting delay) gives
        a refusal or None; the banner waits for it, and a client that sends anything
        before the banner is refused with ``pregreet_refusal`` at once. With ``stress``, a
        full table first ends its oldest idle session to make room (server/stress.py)."""
        assert self.engine is not None
        if stress is not None and limiter.total >= limiter.max_total:
            stress.make_room(limiter)
        admission = limiter.admit(self.peer_ip)
        if admission is not Admission.OK:
            self.connection_refused(refusals[admission], admission.value)
            self.engine.refuse_connection(refusals[admission])
        else:
            self._limiter, self._sessions = limiter, sessions
            sessions.add(self)
            self.counted = True
            if stress is not None:
                self._stress = stress
                stress.add(self)
                stress.check(limiter)
            self.arm_timer(idle_timeout)
            if screen is not None:
                self._pregreet_refusal = pregreet_refusal
                self.screening = asyncio.get_running_loop().create_task(self._screen(screen))
                return
            self.engine.greet()
        self.pump()

    def connection_refused(self, reply: Any, reason: str) -> None:
        """Log a refusal at greeting, one line (the SMTP session words it as SMTP)."""
        decisionlog.connection_refused(self.peer_ip, str(reply), reason)

    async def _screen(self, screen: Callable[[], Awaitable[Any]]) -> None:
        try:
            refusal = await screen()
        except asyncio.CancelledError:
            raise
        except Exception:  # a check that fails must not keep the client out (fail open)
            log.exception("%s: pre-greeting check failed, greeting anyway", self.peer_ip)
            refusal = None
        self.screening = None
        engine = self.engine
        if engine is None or self.transport is None or engine.closed:
            return
        if refusal is not None:
            self.connection_refused(refusal, "screen")
            engine.refuse_connection(refusal)
        else:
            engine.greet()
        self.pump()

    def _talked_before_greeting(self) -> None:
        assert self.screening is not None and self.engine is not None
        self.screening.cancel()
        self.screening = None
        self.connection_refused(self._pregreet_refusal, "pregreet")
        self.engine.refuse_connection(self._pregreet_refusal)
        self.pump()

    def release(self) -> None:
        """Undo ``admit``: the slot, the timer, the pending work. Idempotent, so that every
        way a session ends may call it (``connection_lost``, which ``start_tls`` also calls
        for a connection that died in the handshake; stress mode's eviction)."""
        self._wake_writers()  # a writer waiting for the client finds it gone
        self.cancel_timer()
        if self.task is not None and not self.task.done() \
                and self.task is not asyncio.current_task():  # start_tls ends it itself
            self.task.cancel()
        if self.screening is not None:
            self.screening.cancel()
            self.screening = None
        self._free_slot()
        if self._sessions is not None:
            self._sessions.discard(self)
            self._sessions = None
        if self._stress is not None:
            self._stress.discard(self)
            self._stress = None

    def _free_slot(self) -> None:
        """Give the connection slot back, once: the one place that does.

        Called by ``release`` and as soon as the session's last reply is decided (QUIT's
        221, a 421), before that reply is written: a client that read it and connects
        again at once, maybe to another worker, must find its slot free (issue 24: 45
        parallel senders met the cap of 50 with slots of sessions they had ended). The
        connection may linger a little to flush that reply (``CLOSE_GRACE`` at most for
        a client that does not read), holding a descriptor, not a slot."""
        if self.counted and self._limiter is not None:
            self.counted = False
            self._limiter.release(self.peer_ip)

    def stress_close(self) -> None:
        """Stress mode ends this session (idle too long, or its slot is needed): the
        engine's last word, then the slot is freed at once, not when the socket drains; a
        client that does not read loses its connection now."""
        engine, transport = self.engine, self.transport
        if engine is not None and transport is not None and not engine.closed:
            self.stress_reply(engine)
            self.pump()
        if self.write_paused and self.transport is not None:
            self.transport.abort()
        self.release()

    def stress_reply(self, engine: Any) -> None:
        """Give the engine its last reply when stress mode ends the session."""
        raise NotImplementedError

    # ---------------------------------------------------------------- asyncio callbacks

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        self._unprogressed += len(data)
        if self._unprogressed >= PROGRESS_BYTES and self._stress is not None:
            self._unprogressed = 0
            self._stress.progress(self)
        assert self.engine is not None
        if self.screening is not None:
            if self._pregreet_refusal is not None:
                self._talked_before_greeting()
            else:
                self.engine.receive(data)  # answered after the banner
            return
        self.engine.receive(data)
        if self.task is None:
            self.pump()

    def pause_writing(self) -> None:
        """Stop reading a client that does not read: neither our output nor its pipelined
        input may grow without bound."""
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    async def writable(self) -> None:
        """Return once the client reads again (or the connection is gone): what streams a
        large answer waits here between writes, so its output stays bounded."""
        if not self.write_paused or self.transport is None:
            return
        if self._resumed is None:
            self._resumed = asyncio.Event()
        self._resumed.clear()
        await self._resumed.wait()

    def _wake_writers(self) -> None:
        if self._resumed is not None:
            self._resumed.set()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_writers()
        self.last_activity = time.monotonic()
        if self.transport is not None and self.task is None and not self.closing:
            self.pump()  # the commands left when the client stopped reading (``pump``)
            if self.transport is not None and self.task is None and not self.closing \
                    and not self.write_paused:
                self.transport.resume_reading()

    # ---------------------------------------------------------------- timer

    def arm_timer(self, delay: float) -> None:
        """``on_timer`` in ``delay`` seconds (up to timer_wheel.RESOLUTION later), instead
        of any deadline set before."""
        self.cancel_timer()
        wheel = self._wheel
        if wheel is None:
            wheel = self._wheel = timer_wheel.for_loop(asyncio.get_running_loop())
        self.timer = wheel.schedule(self, delay)

    def cancel_timer(self) -> None:
        if self.timer is not None and self._wheel is not None:
            self._wheel.cancel(self, self.timer)
        self.timer = None

    def _timer_fired(self) -> None:
        self.timer = None
        if self.transport is not None and self.engine is not None:
            self.on_timer()

    def on_timer(self) -> None:
        """Idle and session-time checks; re-arm lazily (one deadline per session)."""
        raise NotImplementedError

    def idle_check(self, limit: float, service: str) -> None:
        """The idle rule of POP3 and IMAP: re-arm while the client has been quiet less than
        ``limit``; past it, end the session with the engine's timeout reply, or, while
        work is pending (a reply the client does not read), abort the connection."""
        assert self.engine is not None and self.transport is not None
        waited = time.monotonic() - self.last_activity
        if waited < limit:
            self.arm_timer(max(0.05, limit - waited))
        elif self.task is not None:
            log.info("%s %s: no progress for %.0fs, aborting", service, self.peer_ip, waited)
            self.transport.abort()
        else:
            self.engine.timeout()
            self.pump()

    # ---------------------------------------------------------------- server-side close

    def close_engine(self, close: Callable[[], None]) -> None:
        """A close the server decides (shutdown, session time limit): ``close`` gives the
        engine its last reply. Pending work answers the engine first: a reply it has earned
        (250 for a message already durable, 235 for a checked password) goes out before
        the 421, so a client never retries, and duplicates, what was accepted."""
        if self.engine is None or self.transport is None or self.engine.closed:
            return
        if self.task is not None:
            self._close_after_task = close
            return
        close()
        self.pump()

    # ---------------------------------------------------------------- the pump

    def handle(self, ev: Any) -> None:
        raise NotImplementedError

    def on_closing(self) -> None:
        """The engine closed the session: drop what it was holding."""

    def task_failed(self) -> None:
        """An internal error in the pending work: answer the engine so it can go on."""
        raise NotImplementedError

    def pump(self) -> None:
        """Answer the commands the engine has, in passes of at most ``PUMP_FLUSH_AT``
        octets of replies: a client that pipelines and does not read stops being answered
        once the transport's buffer is full (``pause_writing``; ``resume_writing`` goes on).
        Before the passes, one read of 64 KiB of pipelined POP3 LISTs (~10,000) had the
        worker build every answer: 110 MB for a 1,000-message mailbox, per connection."""
        while self._pump_pass():
            pass

    def _pump_pass(self) -> bool:
        """One pass; True when it stopped at ``PUMP_FLUSH_AT`` and may go on at once."""
        engine = self.engine
        transport = self.transport
        if engine is None or transport is None:
            return False
        gathered: list[bytes] = []
        size = 0
        full = False
        while self.task is None:
            ev = engine.next_event()
            if ev is None:
                break
            self.handle(ev)
            if self.transport is None:
                return False
            out = engine.take_output()
            if out:
                gathered.append(out)
                size += len(out)
                if size >= PUMP_FLUSH_AT:
                    full = True
                    break
        gathered.append(engine.take_output())
        out = b"".join(gathered)
        full = full or len(out) >= PUMP_FLUSH_AT  # an engine stops parsing at its own limit
        hold = engine.take_hold()
        if out and hold > 0 and self.task is None:
            # Past the soft error limit: the reply waits, and so does everything the client
            # sent after it (the session reads nothing meanwhile).
            transport.pause_reading()
            self.run(self._send_later(out, hold))
            return False
        closed = engine.closed  # writing (below) cannot close it
        if closed and self.task is None:
            self._free_slot()  # before the last reply, which the client may act on at once
        if out:
            transport.write(out)
            self._progressed()
        if self.task is not None:
            transport.pause_reading()
        elif closed and not self.closing:
            self.closing = True
            if engine.internal_error is not None:  # the engine answered and closed; say why
                log.error("%s: protocol engine error: %r", self.peer_ip, engine.internal_error,
                          exc_info=engine.internal_error)
            self.on_closing()
            # close() waits for the last reply to be written; a client that does not read
            # must not keep the connection (and its buffers) forever, the less so as its
            # slot is already free (``_free_slot``).
            if self.write_paused or transport.get_write_buffer_size():
                asyncio.get_running_loop().call_later(CLOSE_GRACE, transport.abort)
            transport.close()
        return full and self.task is None and not self.closing and not self.write_paused

    def _progressed(self) -> None:
        """A reply went out: a command completed (stress mode's per-command deadline)."""
        self._unprogressed = 0
        if self._stress is not None:
            self._stress.progress(self)

    async def _send_later(self, out: bytes, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.engine is not None and self.engine.closed:
            self._free_slot()
        if self.transport is not None:
            self.transport.write(out)

    async def start_tls(self, ctx: ssl.SSLContext, on_failure: Callable[[], None]) -> bool:
        """STARTTLS/STLS: True once the connection speaks TLS (``self.transport`` is the
        new one). A failed handshake calls ``on_failure`` (the engine's last word) and
        ends the session; so does a connection lost meanwhile.

        While the handshake runs, the connection belongs to asyncio's TLS layer: a reset
        or a handshake timeout there is never reported to this protocol (issue 24: such
        sessions kept their slot for good). So whatever way the handshake ends without a
        TLS transport, the session ends here, through the one idempotent
        ``connection_lost``."""
        transport = self.transport
        assert transport is not None
        new: asyncio.Transport | None = None
        try:
            new = await asyncio.get_running_loop().start_tls(
                transport, self, ctx, server_side=True,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as exc:
            log.info("%s: TLS handshake failed: %s", self.peer_ip, exc or type(exc).__name__)
            on_failure()
        finally:
            if new is None:  # failed, lost, or this task cancelled
                transport.abort()
                self.connection_lost(None)
        self.transport = new
        return new is not None

    def run(self, coro: Awaitable[None]) -> None:
        """Run async work for the pending event; the engine waits until it is answered."""

        async def wrapper() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: internal error", self.peer_ip)
                self.task_failed()
            finally:
                self.task = None
            close, self._close_after_task = self._close_after_task, None
            if close is not None and self.engine is not None and not self.engine.closed:
                close()  # before the engine reads anything more the client pipelined
            if self.transport is not None:
                if not self.write_paused:
                    self.transport.resume_reading()
                self.pump()

        self.task = asyncio.get_running_loop().create_task(wrapper())
