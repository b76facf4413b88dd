"""Accepting on a listening socket from the event loop, with a gate a worker can close.

asyncio's ``Server`` cannot stop accepting without closing its socket, and a worker
process of a node must be able to (``AcceptGate``), so each listening socket is served by
an ``Acceptor``: a reader on the loop that accepts what is waiting and hands each
connection to ``loop.connect_accepted_socket`` (TLS from the first byte where given).

Why a gate. With several workers on one set of sockets, a client that sends one message
per connection, one after the other, lands on whichever worker is idle at that moment: as
the one that served the last connection is still closing it, that is the other one, and the
workers take turns. Each then serves every other message with cold caches, and the node
was measured taking 1.6 times the CPU per message of a single worker at one session (bench/
RESULTS.md, 2026-12-06). So every worker but the first keeps its gate closed while the
node is quiet. It opens at the first look that finds the node holding ``BUSY_AT``
connections or two waiting in the listeners' queues, and when ``PRESSED_AT`` are open or
one waits at ``PRESSED_LOOKS`` looks in a row (100 ms: a lone client shows that much only
for an instant, between closing a connection and opening the next; a first worker that is
frozen or restarting shows it for as long as it lasts, so this is also what keeps such a
node serving); it then stays open for ``HOLD`` seconds after the last time it had to be.

Why a share. Under load every worker accepts, and the first to wake takes what waits, up
to ``_ACCEPT_BATCH``: connections that each carry one message even out on their own, but a
burst of long sessions (50 submission clients connecting at once, IMAP clients coming back
after a restart) stayed where it landed, on one worker and one core, while the others
idled: the submission row ran at 0.47x the MX rate with one worker doing ~98 % of the work
(bench/RESULTS.md, 2026-12-08). So once the node is busy (``BALANCE_AT`` connections open
or waiting) a worker takes only up to an even share of the node's connections
(``balance``); over it, it leaves the listener for ``DEFER`` seconds for the others, and
after ``MAX_DEFERRALS`` turns in a row in which nobody took them (a worker frozen or
restarting) it takes them itself.

The looks are few on purpose: a look is a wake-up of an otherwise idle process, and at
5 ms apart (200 a second while a lone client was served) they cost that client about 7 %
of its rate on two cores (bench/RESULTS.md, 2026-12-06, third session). A load that
arrives on an empty node waits at most one ``IDLE_TICK`` for the second worker; the first
serves it meanwhile.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any

log = logging.getLogger("mailfort.session")

_ACCEPT_BATCH = 128  # connections accepted per wake-up at most (the others wait their turn)
DEFER = 0.02  # seconds a worker over its share leaves waiting connections to the others
MAX_DEFERRALS = 10  # turns in a row (0.2 s, two idle looks of a gate) before it takes them
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_RETRY = 1.0  # seconds without accepting after running out of descriptors or memory
# struct tcp_info (linux/tcp.h): eight one-byte fields, then u32 rto, ato, snd_mss,
# rcv_mss, unacked; on a listening socket ``tcpi_unacked`` is its accept queue's length.
_TCP_INFO = getattr(socket, "TCP_INFO", None)  # Linux
_TCP_INFO_UNACKED = 24
_TCP_INFO_SIZE = 104


class BindError(OSError):
    """A listener that cannot be bound (port taken, address not on this host); its
    ``strerror`` is ``HOST:PORT: reason``."""


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host`` (an address; IPv6 without brackets) and ``port``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:  # one line that names the address ("cannot listen: " + strerror)
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        raise BindError(exc.errno, f"{shown}:{port}: {os.strerror(exc.errno or 0)}") from None
    sock.setblocking(False)
    return sock


class Acceptor:
    """One listening socket served on the running loop."""

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.BaseProtocol],
                 tls: ssl.SSLContext | None, handshake_timeout: float | None) -> None:
        self._sock = sock
        self._factory = factory
        self._tls = tls
        self._handshake_timeout = handshake_timeout
        self._loop = asyncio.get_running_loop()
        # Plain TCP: the transport is made here, as asyncio's own Server does, rather than
        # by ``connect_accepted_socket``, whose task and waiter cost each connection two
        # more turns of the loop (about 25 us of a one-message session's 1.5 ms). The
        # selector loop's method is not public API; without it (uvloop), the public path serves.
        self._make_transport: Callable[[socket.socket, Any], object] | None = getattr(
            self._loop, "_make_socket_transport", None)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._gate_open = True
        self._resting = False  # after EMFILE and the like, for _RETRY seconds
        self._reading = False
        self._closed = False
        # How many of ``waiting`` connections this worker may take now (None: all; see the
        # module's text), and the turns in a row it left them to the others.
        self.balance: Callable[[int], int] | None = None
        self._deferrals = 0
        self._deferred: asyncio.TimerHandle | None = None  # a deferral's end (``DEFER``)
        sock.setblocking(False)
        self._update()

    @property
    def sockets(self) -> list[socket.socket]:
        return [] if self._closed else [self._sock]

    @property
    def gate_open(self) -> bool:
        return self._gate_open

    def set_gate(self, open_: bool) -> None:
        self._gate_open = open_
        self._update()

    def waiting(self) -> int:
        """How many connections wait in this socket's accept queue."""
        if self._closed or _TCP_INFO is None:
            return 0
        try:
            info = self._sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_SIZE)
        except OSError:
            return 0
        if len(info) < _TCP_INFO_UNACKED + 4:
            return 0
        return int(struct.unpack_from("I", info, _TCP_INFO_UNACKED)[0])

    def close(self) -> None:
        """Stop accepting and close this process's copy of the socket."""
        if self._closed:
            return
        self._closed = True
        self._update()
        self._sock.close()

    async def wait_closed(self) -> None:
        """Until the connections accepted have their transports (or failed)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    def _update(self) -> None:
        want = self._gate_open and not self._resting and not self._closed
        if want and not self._reading:
            self._loop.add_reader(self._sock.fileno(), self._accept)
        elif self._reading and not want:
            self._loop.remove_reader(self._sock.fileno())
        self._reading = want

    def _rested(self) -> None:
        self._deferred = None
        self._resting = False
        self._update()

    def share_changed(self) -> None:
        """One of this worker's connections ended: a deferral for being over its share
        ends now, not ``DEFER`` later. Without this, two workers took turns resting with
        connections waiting (each over its share while its short sessions ended), and 10
        senders of a message per connection ran at half their rate (bench/RESULTS.md,
        2026-12-08)."""
        if self._deferred is not None:
            self._deferred.cancel()
            self._rested()

    def _accept(self) -> None:
        batch = _ACCEPT_BATCH
        if self.balance is not None:
            # Connections accepted whose sessions have not started yet (uvloop's path, a
            # task each: ``_start``) are in no count: as waiting ones, and as this worker's.
            starting = len(self._tasks)
            batch = min(batch, self.balance(self.waiting() + starting) - starting)
            if batch <= 0 and self._deferrals < MAX_DEFERRALS:
                self._deferrals += 1
                self._resting = True
                self._update()
                self._deferred = self._loop.call_later(DEFER, self._rested)
                return
            self._deferrals = 0
            batch = max(batch, 1)
        for _ in range(batch):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    log.error("cannot accept on %s (%s): pausing %.0f s",
                              self._sock.getsockname(), exc, _RETRY)
                    self._resting = True
                    self._update()
                    self._loop.call_later(_RETRY, self._rested)
                return  # ECONNABORTED and the like: that connection is gone
            conn.setblocking(False)
            # Nagle off, as asyncio's own servers have it: its transports set TCP_NODELAY
            # only on sockets made with IPPROTO_TCP, and ``socket.create_server`` (bind)
            # makes them with 0. With Nagle on, a reply written in two parts (IMAP's
            # untagged lines, then the tagged one) waited for the client's delayed ACK.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is None and self._make_transport is not None:
                try:
                    self._make_transport(conn, self._factory())
                except Exception:  # the session could not be set up: drop this one only
                    log.exception("connection not started")
                    conn.close()
                continue
            task = self._loop.create_task(self._start(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _start(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(
                self._factory, conn, ssl=self._tls,
                ssl_handshake_timeout=self._handshake_timeout if self._tls else None)
        except OSError as exc:  # a reset, a failed or timed-out TLS handshake (SSLError)
            log.debug("connection not started: %s", exc)
            conn.close()


class AcceptGate:
    """Opens a worker's acceptors only while the node is busy (see the module's text)."""

    BUSY_AT = 3  # open connections in the node at which this worker accepts too, at once
    PRESSED_AT = 2  # ... or after ``PRESSED_LOOKS`` looks in a row with this many
    PRESSED_LOOKS = 4  # (one client alone shows two, or one waiting, for an instant)
    HOLD = 1.0  # seconds the gate stays open after the node was last busy
    TICK = 0.025  # seconds between looks while the node has connections open
    IDLE_TICK = 0.1  # and while it has none

    def __init__(self, acceptors: list[Acceptor], open_connections: Callable[[], int]) -> None:
        """``open_connections``: the node's, over every worker (the shared connection
        table)."""
        self._acceptors = acceptors
        self._open_connections = open_connections
        self._loop = asyncio.get_running_loop()
        self._until = 0.0
        self._pressed = 0  # looks in a row that found the node pressed
        self._open = True
        self._timer: asyncio.TimerHandle | None = None
        self._set(False)
        self._tick()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _set(self, open_: bool) -> None:
        if open_ != self._open:
            self._open = open_
            for a in self._acceptors:
                a.set_gate(open_)

    def _tick(self) -> None:
        now = self._loop.time()
        connections = self._open_connections()
        waiting = sum(a.waiting() for a in self._acceptors)
        pressed = connections >= self.PRESSED_AT or waiting >= 1
        self._pressed = self._pressed + 1 if pressed else 0
        if connections >= self.BUSY_AT or waiting >= 2 or self._pressed >= self.PRESSED_LOOKS:
            self._until = now + self.HOLD
        self._set(now < self._until)
        delay = self.TICK if connections or self._open else self.IDLE_TICK
        self._timer = self._loop.call_later(delay, self._tick)
