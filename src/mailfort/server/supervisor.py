"""Worker processes: one supervisor binds the listeners, N workers serve them.

``[server] workers = N`` (0, the default: one per CPU; 1: the single process of
``app.serve``). The supervisor (``mailfort serve``) binds every listener once (or takes
them from systemd socket activation), drops privileges, then forks the workers, which
inherit the listening sockets and each accept on all of them from their own event loop.

Why inherited sockets rather than SO_REUSEPORT: the port set is fixed by the one bind
(port 0 in tests and ``[listen]`` stay meaningful, and no other process of the same user
can join the group); connections waiting in the one accept queue are not lost when a
worker dies (with SO_REUSEPORT each socket has its own queue, reset when its worker
dies); and only a worker whose loop is idle calls accept(), so a busy worker takes fewer
new connections by itself. The cost is a shared wake-up of the idle workers per burst.

The supervisor itself runs no event loop and starts no thread before forking (a fork
copies only the calling thread). Once per node, it:

* decides about privileges (server/privileges.py, via ``Operations``), binds, gives the
  data directory to ``server.user`` and drops to it before any worker starts, and before
  it reads or writes anything in the data directory (all of it the service user's to
  change): nothing serves, recovers or writes there as root;
* recovers the spool (as the service user), before any worker could be writing to it;
* makes the self-signed certificate (workers would race to write it), in a short-lived
  child process so that the X.509 library never enters the memory the workers share;
* binds the metrics port (the primary worker serves it) and switches the metrics to
  prometheus_client's multiprocess files, so the endpoint reports the node's sums;
* talks to systemd: READY=1 once every worker serves, RELOADING=1 / READY=1 around
  SIGHUP, STOPPING=1 at SIGTERM;
* restarts a worker that dies, after a back-off that doubles while they keep dying
  (0.1 s up to 30 s, reset once a worker has lived a minute), and clears the dead
  worker's connection counts, spool files and session gauges;
* SIGTERM / SIGINT: closes its copies of the listeners and forwards the signal; each
  worker stops accepting, lets its sessions finish for ``server.shutdown_grace`` seconds,
  says 421 / -ERR to those still open, and exits; the supervisor exits 0;
* SIGKILL of the supervisor kills the workers too (the node is down, as after a crash of
  a single process; nothing acknowledged is lost);
* SIGHUP and SIGUSR1: forwarded; each worker reloads its certificate into its TLS
  context (new handshakes present the new certificate, open sessions keep theirs) and
  reopens the log file.
* SIGHUP also reads the configuration file again. If it changed, and only in what the
  workers decide (not the listeners, directories, workers, user, metrics, MTA-STS
  listener, ACME or log settings, fixed by the supervisor: those take a restart), a new
  generation of workers starts with it on the same sockets; once every one of them
  serves, the workers they replace retire (SIGQUIT): they stop accepting, the old primary
  hands outbound delivery and the queue over (the new primary starts delivering once the
  queue's lock is its own) and closes its control socket, and each lets its open sessions
  end as they would have (a SIGTERM meanwhile gives them ``shutdown_grace``, as to the
  others). Until then the old generation serves on: no moment without a worker accepting,
  and new workers that cannot start leave the old ones serving.
  A file that does not load is logged and changes nothing. The connection table has two
  rows per slot, one per generation; a second reload waits until the previous
  generation has finished.

Worker slot 0, the primary, runs outbound delivery (and its replacement, if it dies), so
no queued message is delivered twice, and what must run once per node: the control
socket (``mailfort queue retry`` / ``status`` / ``block remove``) and the metrics
endpoint. The others wake it through a pipe when they queue mail; it also scans the queue
on its own schedule, so a lost wake-up only delays.

ACME (``tls.acme``) runs in the supervisor, once for the node: ``Operations`` obtains the
certificate before anything is bound and keeps the HTTP-01 challenge listener (bound as
root if its port needs it); every ``ACME_CHECK_EVERY`` seconds, and at each SIGHUP, the
supervisor renews it if due and then has every worker load it (as a SIGHUP does). The
renewal blocks the supervisor's loop for the seconds it takes (a worker that dies then is
restarted after it); the workers serve on meanwhile.

Brute-force counters, per-user send rates and connection rates are shared through one
SQLite file in the data directory (``SQLiteCounters``); the connection limits through
memory that the supervisor maps before forking (``ConnectionTable``), checked at every
accept without a database write; the IMAP sessions per user likewise (``UserSessionTable``,
server/imap.py). The committers share their flushes
(store/shared_flush.py). Stress mode (server/stress.py) stays per worker: each
worker adapts and evicts its own sessions, against the node's shared connection count.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from mailfort import logsetup
from mailfort.config import Config, ConfigError
from mailfort.server import eventloop
from mailfort.server.acceptor import AcceptGate
from mailfort.server.node_plan import bind_address, bind_listeners
from mailfort.server.privileges import Account

if TYPE_CHECKING:
    from mailfort.server.app import Node
    from mailfort.server.connections import ConnectionTable
    from mailfort.server.imap import UserSessionTable
    from mailfort.server.operations import Operations
    from mailfort.server.session import Listener

log = logging.getLogger("mailfort.supervisor")

SHARED_STATE = "shared-state.sqlite3"
CONNECTIONS_LOCK = "connections.lock"
IMAP_USERS_LOCK = "imap-sessions.lock"
METRICS_DIR = "metrics"
BACKOFF_MIN = 0.1
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # seconds a worker must live for the back-off to start over
ACME_CHECK_EVERY = 12 * 3600.0  # seconds between checks whether to renew (tls.acme)
QUEUE_HANDOVER_WAIT = 120.0  # seconds a new primary waits for the queue (then warns)
# SIGUSR2: a worker tells that it serves (its slot number is in the ready pipe).
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1,
            signal.SIGUSR2}


def hold_signals() -> None:
    """Block the signals the supervisor takes with ``sigtimedwait``, in the calling thread
    and so in every thread started after it: a signal sent to the process goes to any
    thread that does not block it, and there it would take its default action."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)


def worker_count(cfg: Config) -> int:
    return cfg.server.workers or os.cpu_count() or 1


def shared_state_path(cfg: Config) -> Path:
    return cfg.data_path / SHARED_STATE


# ------------------------------------------------------------------ binding
# (node_plan.py binds: the listeners are listed there.)

def describe(cfg: Config, sockets: dict[tuple[str, int], socket.socket], workers: int,
             no_domain: bool = False) -> str:
    """What ``serve`` prints at start, in the single-process format (tests read it)."""
    lines = ["mailfort is running:"]
    for (name, i), s in sockets.items():
        host = getattr(cfg.listen, name)[i].rpartition(":")[0]
        lines.append(f"  {name:<12} {host}:{s.getsockname()[1]}")
    lines.append(f"  workers      {workers}")
    lines.append(f"  data         {cfg.data_path.resolve()}")
    if no_domain:
        lines += [
            "No domain yet. Add one and a user (in another terminal, same directory):",
            "  mailfort domain add example.test",
            "  mailfort user add alice@example.test --password-file pw.txt",
        ]
    return "\n".join(lines)


# ------------------------------------------------------------------ the worker

@dataclass
class _Pipes:
    wake_r: int  # mail queued by a worker without delivery -> the primary
    wake_w: int
    ready_w: int  # a worker serves -> the supervisor


async def _worker_main(sup: Supervisor, slot: int) -> int:
    from mailfort import metrics
    from mailfort.policy.shared_counters import SQLiteCounters
    from mailfort.server.app import Node
    from mailfort.server.imap import SharedUserSessions
    from mailfort.server.node_plan import shared_connection_limiter
    from mailfort.server.operations import Operations, WorkerRole

    cfg, pipes = sup.cfg, sup.pipes
    path = shared_state_path(cfg)
    counters = SQLiteCounters(path)
    assert sup.connections is not None
    limiter = shared_connection_limiter(cfg, sup.connections, sup.slots[slot].row, counters)
    limiter.reset_slot()
    assert sup.imap_users is not None
    imap_users = SharedUserSessions(sup.imap_users, sup.slots[slot].row,
                                    cfg.limits.imap_sessions_per_user)
    imap_users.reset_slot()
    loop = asyncio.get_running_loop()
    role = WorkerRole(slot, sup.workers, sup.main_pid, sup.sockets,
                      sup.metrics_socket if slot == 0 else None)
    once_per_node = [x for x in (sup.metrics_socket, sup.mta_sts_socket) if x is not None]
    if not role.primary:
        for sock in once_per_node:
            sock.close()  # only the primary serves them
    ops = Operations(cfg, sup.log_handler, role=role)

    def tell_delivery() -> None:
        with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
            os.write(pipes.wake_w, b"w")

    node = Node(cfg, counters=counters, limiter=limiter, shared_flush=True)
    node.imap_users = imap_users  # the node's count of IMAP sessions per user
    if sup.generation > 0:  # the primary it replaces hands the queue over first
        node.queue_wait = QUEUE_HANDOVER_WAIT
    node.inherited = dict(role.sockets)
    if role.primary and sup.mta_sts_socket is not None:
        node.inherited[("mta_sts", 0)] = sup.mta_sts_socket
    node.session_set = metrics.CountedSessions
    if not role.primary:
        node.queued = tell_delivery
    await node.start(recover=False, deliver=role.primary)
    await ops.started(node)
    # The first worker takes every connection while the node is quiet; the others join
    # when it is busy (server/acceptor.py: one sender alone has warm caches).
    acceptors = [a for listener in _listeners(node) for a in listener.servers]
    gate = None if role.primary else AcceptGate(acceptors, lambda: limiter.total)
    if len(sup.slots) > 1:  # a burst of long sessions shared out, not kept by one worker
        workers = len(sup.slots)
        for a in acceptors:
            a.balance = lambda waiting: limiter.share_left(waiting, workers)

        def released() -> None:
            for a in acceptors:
                a.share_changed()
        limiter.released = released
    if role.primary:
        def woken() -> None:
            with contextlib.suppress(BlockingIOError):
                while os.read(pipes.wake_r, 4096):
                    pass
            node.worker.wake()

        loop.add_reader(pipes.wake_r, woken)
    stop, retire = asyncio.Event(), asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGQUIT, retire.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGQUIT})  # held since the fork
    log.info("worker %d (pid %d) serving%s", slot, os.getpid(),
             ", with outbound delivery, control socket and metrics" if role.primary else "")
    with contextlib.suppress(OSError):
        os.write(pipes.ready_w, bytes([slot]))
        os.kill(sup.main_pid, signal.SIGUSR2)
    waits = [asyncio.ensure_future(e.wait()) for e in (stop, retire)]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    handed_over = False
    if gate is not None:
        gate.stop()
    if retire.is_set() and not stop.is_set():
        log.info("worker %d (pid %d) retiring: workers with the new configuration serve; "
                 "its open sessions end as they would", slot, os.getpid())
        stop_accepting(node)
        if role.primary:  # what runs once per node is the next primary's from now on
            loop.remove_reader(pipes.wake_r)
            await node.hand_over()
            await ops.stopped()
            handed_over = True
        await drain(node, None, stop, cfg.server.shutdown_grace)
    else:
        await drain(node, cfg.server.shutdown_grace)
    await node.stop()
    if not handed_over:
        await ops.stopped()
    counters.close()
    limiter.reset_slot()
    limiter.close()
    imap_users.reset_slot()
    imap_users.close()
    return 0


def _listeners(node: Node) -> list[Listener]:
    return [*node.services.values(), *node.pop3.values(), *node.imap.values(),
            *node.managesieve.values()]


def stop_accepting(node: Node) -> None:
    for listener in _listeners(node):
        for server in listener.servers:
            server.close()


async def drain(node: Node, grace: float | None, stop: asyncio.Event | None = None,
                stop_grace: float = 0.0) -> None:
    """Stop accepting; wait up to ``grace`` seconds (None: for as long as they last) for
    the open sessions to end; ``stop`` set meanwhile leaves them ``stop_grace`` more."""
    stop_accepting(node)
    listeners = _listeners(node)
    deadline = None if grace is None else time.monotonic() + grace
    while any(listener.sessions for listener in listeners):
        if stop is not None and stop.is_set():
            stop = None
            later = time.monotonic() + stop_grace
            deadline = later if deadline is None else min(deadline, later)
        if deadline is not None and time.monotonic() >= deadline:
            return
        await asyncio.sleep(0.05)


def _die_with_parent(parent: int) -> None:
    """A worker dies with its supervisor (Linux PR_SET_PDEATHSIG): a SIGKILLed
    supervisor then leaves no orphan holding the ports, and the node is down as a
    single-process node would be (what it acknowledged is on disk; the next start
    recovers the rest)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)


def _child(sup: Supervisor, slot: int) -> None:
    """In the forked worker: never returns."""
    code = 1
    try:
        _die_with_parent(sup.main_pid)
        for sig in _SIGNALS:
            # A reload (SIGHUP, SIGUSR1) that comes while this worker starts must not end
            # it; its loop takes them over once it serves.
            ignore = sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
            signal.signal(sig, signal.SIG_IGN if ignore else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        # SIGQUIT (retire, after a reload) stays held, from the fork (``_spawn``) until the
        # loop takes it (``_worker_main``); the threads this worker starts hold it too.
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
        os.close(sup.ready_r)
        if sup.ops.acme is not None:  # the supervisor's: the worker has no thread for it
            sup.ops.acme.httpd.socket.close()
        code = eventloop.run(_worker_main(sup, slot))
    except BaseException:  # report, then leave through _exit
        traceback.print_exc()
    finally:
        logsetup.flush_all()  # the lines of the loop's last pass (logsetup._Batching)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# ------------------------------------------------------------------ the supervisor

@dataclass
class _Slot:
    pid: int = 0
    row: int = 0  # its row in the connection table (slot, or slot + workers: generation)
    started: float = 0.0
    failures: int = 0  # consecutive short lives
    restart_at: float | None = None


@dataclass
class Supervisor:
    cfg: Config
    workers: int
    ops: Operations
    sockets: dict[tuple[str, int], socket.socket] = field(default_factory=dict)
    slots: list[_Slot] = field(default_factory=list)
    stopping: bool = False
    metrics_socket: socket.socket | None = None
    mta_sts_socket: socket.socket | None = None
    ready: set[int] = field(default_factory=set)
    announced: bool = False
    connections: ConnectionTable | None = None  # made in ``start``, before any fork
    imap_users: UserSessionTable | None = None  # likewise (IMAP sessions per user)
    reload_config: Callable[[], Config] | None = None  # reads the file again (SIGHUP)
    generation: int = 0  # configurations loaded since the start
    # The previous generation, pid -> row: serving until the new one does, then retiring.
    outgoing: dict[int, int] = field(default_factory=dict)
    retiring: dict[int, int] = field(default_factory=dict)
    awaited: set[int] = field(default_factory=set)  # new generation's slots not serving yet
    no_domain: bool = False  # the directory has no domain yet (read in ``start``)

    def __post_init__(self) -> None:
        self.main_pid = os.getpid()
        self.log_handler = self.ops.log_handler

    def start(self) -> None:
        # Imported while root: after the drop, a Python in root's home is unreadable.
        import mailfort.directory.sqlite  # noqa: F401
        from mailfort import metrics
        from mailfort.policy.shared_counters import SQLiteCounters
        from mailfort.server.connections import ConnectionTable
        from mailfort.server.imap import UserSessionTable
        from mailfort.server.operations import load_lazy_data
        from mailfort.store.maildir import make_dirs, recover_spool
        cfg = self.cfg
        # Root binds, and nothing else: whatever is in the data directory is the service
        # user's to change, so it is read and written only after the drop (issue 24).
        self.sockets = bind_listeners(cfg, self.ops.inherited)
        if cfg.metrics.listen:
            self.metrics_socket = bind_address(cfg.metrics.listen)
        if cfg.mta_sts.listen:  # port 443 in production: bound before the drop too
            self.mta_sts_socket = bind_address(cfg.mta_sts.listen)
        certificate_around_drop(cfg, self.ops)  # nothing served or recovered as root
        # What the libraries load on first use (DNS record types, the public suffix list,
        # OpenSSL's tables), loaded once here rather than by each worker: the workers share
        # the supervisor's pages (the drop above did it already when there was one to do).
        load_lazy_data()
        spool = cfg.data_path / "spool"
        make_dirs(spool)
        removed = recover_spool(spool, mail_root=cfg.mail_path)  # before any worker writes
        if removed:
            log.info("removed %d spool files left by a crash", removed)
        # The shared counters' file is made (in WAL mode, its table created) before the
        # workers open it: two of them switching a new file to WAL at once would have one
        # fail with "database is locked" (SQLite does not wait for that lock).
        SQLiteCounters(shared_state_path(cfg)).close()
        self.connections = ConnectionTable(2 * self.workers, cfg.data_path / CONNECTIONS_LOCK)
        self.imap_users = UserSessionTable(2 * self.workers, cfg.limits.max_connections,
                                           cfg.data_path / IMAP_USERS_LOCK)
        metrics.share_between_processes(cfg.data_path / METRICS_DIR)
        self.no_domain = _no_domain(cfg)  # the directory closed again before the forks
        self.wake_r, self.wake_w = os.pipe()
        self.ready_r, ready_w = os.pipe()
        for fd in (self.wake_r, self.wake_w, self.ready_r):
            os.set_blocking(fd, False)
        self.pipes = _Pipes(self.wake_r, self.wake_w, ready_w)
        self.slots = [_Slot(row=i) for i in range(self.workers)]
        # What the supervisor has loaded (modules, configuration) is shared with every
        # worker until someone writes to its pages. A collection in a worker writes to the
        # header of every object it scans: frozen objects are never scanned, so the pages
        # stay shared (issue 12: the node's memory with 10,000 idle sessions).
        gc.collect()
        gc.freeze()
        for i in range(self.workers):
            self._spawn(i)

    def _spawn(self, i: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # The child starts with SIGQUIT (retire) held: one that comes before its loop can
        # take it waits, and is not the default action (a core dump).
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGQUIT})
        pid = os.fork()
        if pid == 0:
            _child(self, i)
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        slot = self.slots[i]
        slot.pid, slot.started, slot.restart_at = pid, time.monotonic(), None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            row = self.retiring.pop(pid, None)
            if row is None:
                row = self.outgoing.pop(pid, None)  # it died before it could retire
            if row is not None:  # a worker of the previous configuration has finished
                self._forget(pid, row)
                log.info("worker pid %d of the previous configuration ended (%s)", pid,
                         _status(status))
                continue
            for i, slot in enumerate(self.slots):
                if slot.pid != pid:
                    continue
                slot.pid = 0
                self._forget(pid, slot.row)
                if self.stopping:
                    break
                lived = time.monotonic() - slot.started
                slot.failures = 0 if lived >= STABLE_AFTER else slot.failures + 1
                delay = restart_delay(slot.failures)
                slot.restart_at = time.monotonic() + delay
                log.warning("worker %d (pid %d) ended (%s); restarting in %.1f s",
                            i, pid, _status(status), delay)

    def _forget(self, pid: int, row: int) -> None:
        """What a worker that ended leaves: its connection counts, its gauges, its spool
        files (never acknowledged)."""
        from mailfort import metrics

        with contextlib.suppress(Exception):
            if self.connections is not None:
                self.connections.clear(row)
        with contextlib.suppress(Exception):
            if self.imap_users is not None:
                self.imap_users.clear(row)
        with contextlib.suppress(Exception):
            metrics.forget_process(pid)
        removed = remove_spool_of(self.cfg.data_path / "spool", pid, self.cfg.mail_path)
        if removed:
            log.info("removed %d spool files of worker pid %d", removed, pid)

    def _forward(self, sig: int, retiring: bool = False) -> None:
        """To the current workers (and, with ``retiring``, to the previous generation's:
        only SIGTERM and SIGKILL, as they no longer take reloads)."""
        pids = [slot.pid for slot in self.slots if slot.pid]
        for pid in [*pids, *((*self.outgoing, *self.retiring) if retiring else ())]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _changed_configuration(self) -> Config | None:
        """SIGHUP: the configuration file again, if it changed only what workers decide
        (otherwise None, and the log says why)."""
        if self.reload_config is None:
            return None
        try:
            new = self.reload_config()
        except ConfigError as exc:
            log.error("configuration not reloaded (the running one stays): %s", exc)
            return None
        if new == self.cfg:
            return None
        fixed = fixed_settings_changed(self.cfg, new)
        if fixed:
            log.error("configuration not reloaded: %s changed, which takes a restart",
                      ", ".join(fixed))
            return None
        if self.outgoing or self.retiring:
            log.error("configuration not reloaded: %d worker(s) of the previous one still "
                      "serve (the new ones have not all started: see why above) or finish "
                      "their sessions; send SIGHUP again once they have",
                      len(self.outgoing) + len(self.retiring))
            return None
        return new

    def _start_generation(self, cfg: Config) -> None:
        """New workers with ``cfg`` in every slot; the current ones serve on until all of
        the new ones do (``_collect_ready``), then retire."""
        self.cfg = cfg
        self.generation += 1
        log.info("configuration reloaded: starting %d new workers; the previous ones retire "
                 "once they serve", self.workers)
        self.awaited = set(range(self.workers))
        for i, slot in enumerate(self.slots):
            if slot.pid:
                self.outgoing[slot.pid] = slot.row
            slot.pid, slot.failures = 0, 0
            slot.row = i + self.workers * (self.generation % 2)
            self._spawn(i)

    def _retire_outgoing(self) -> None:
        for pid, row in self.outgoing.items():
            self.retiring[pid] = row
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGQUIT)
        self.outgoing.clear()

    def _collect_ready(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while data := os.read(self.ready_r, 256):
                self.ready.update(data)
                self.awaited.difference_update(data)
        if self.outgoing and not self.awaited and not self.stopping:
            self._retire_outgoing()
        if not self.announced and len(self.ready) >= self.workers:
            self.announced = True
            self.ops.notifier.notify(READY="1", STATUS=f"serving, {self.workers} workers",
                                     MAINPID=str(self.main_pid))

    def _renew_acme(self) -> bool:
        """Renew the ACME certificate if due (blocking); True if there is a new one."""
        self.acme_check_at = time.monotonic() + ACME_CHECK_EVERY
        if self.ops.acme is None:
            return False
        from mailfort import acmecert  # only with ACME: it loads the X.509 library

        try:
            return acmecert.renew_if_due(self.cfg, self.ops.acme)
        except Exception:  # try again at the next check; the old certificate serves
            log.exception("acme: renewal failed")
            return False

    def _reload(self) -> None:
        """SIGHUP: the log file reopened; the ACME certificate renewed if due; the
        configuration file read again. If it changed what the workers decide, a new
        generation of workers starts with it (the self-signed certificate made first if the
        new one needs another); otherwise the certificate is checked here, once, and each
        worker reloads it and reopens its log."""
        self.ops.notifier.notify(
            RELOADING="1",
            MONOTONIC_USEC=str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000))
        if self.log_handler is not None:
            logsetup.reopen(self.log_handler)
        self._renew_acme()
        new = self._changed_configuration()
        try:  # the certificate the new workers, if any, will load
            ensure_certificate_apart(new or self.cfg)
        except Exception as exc:  # the workers keep the one they have
            log.error("certificate reload: %s", exc)
            new = None
        if new is not None:
            self._start_generation(new)
        else:
            self._forward(signal.SIGHUP)
        self.ops.notifier.notify(READY="1", STATUS=f"serving, {self.workers} workers")

    def run(self) -> int:
        """The supervisor's loop: signals and restarts, until the workers have stopped."""
        kill_at: float | None = None
        self.acme_check_at = time.monotonic() + ACME_CHECK_EVERY
        while True:
            now = time.monotonic()
            if self.ops.acme is not None and now >= self.acme_check_at \
                    and not self.stopping and self._renew_acme():
                self._forward(signal.SIGHUP)  # every worker loads the new certificate
                now = time.monotonic()
            due = [s.restart_at for s in self.slots if s.restart_at is not None]
            timeout = max(0.0, min(due) - now) if due else 1.0
            if kill_at is not None:
                timeout = min(timeout, max(0.0, kill_at - now))
            info = signal.sigtimedwait(_SIGNALS, min(timeout, 1.0))
            sig = info.si_signo if info is not None else None
            if sig in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                self.stopping = True
                self.ops.notifier.notify(STOPPING="1")
                for s in self.sockets.values():  # the workers' copies close as they go
                    s.close()
                self._forward(signal.SIGTERM, retiring=True)
                for slot in self.slots:
                    slot.restart_at = None
                kill_at = time.monotonic() + self.cfg.server.shutdown_grace + 15.0
            elif sig == signal.SIGHUP and not self.stopping:
                self._reload()
            elif sig == signal.SIGUSR1:
                if self.log_handler is not None:
                    logsetup.reopen(self.log_handler)
                self._forward(signal.SIGUSR1)
            self._collect_ready()
            self._reap()
            if self.stopping:
                if not any(s.pid for s in self.slots) and not self.retiring \
                        and not self.outgoing:
                    return 0
                if kill_at is not None and time.monotonic() >= kill_at:
                    log.error("workers did not stop in time: killing them")
                    self._forward(signal.SIGKILL, retiring=True)
                    kill_at = None
                continue
            for i, slot in enumerate(self.slots):
                if slot.pid == 0 and slot.restart_at is not None \
                        and time.monotonic() >= slot.restart_at:
                    self._spawn(i)


def certificate_around_drop(cfg: Config, ops: Operations) -> None:
    """At start, as root: give the data directory away, make the self-signed certificate
    there as the service user (``ensure_certificate_apart`` with the account), drop
    privileges (``ops``: the ACME order is written then), and look for a configured or
    ACME certificate. Nothing in the data directory is written or read as root."""
    apart = not (cfg.tls.cert_file or cfg.tls.acme)
    ops.give_away()
    if apart:
        ensure_certificate_apart(cfg, ops.account)
    ops.drop_privileges()
    if not apart:
        ensure_certificate_apart(cfg)


def ensure_certificate_apart(cfg: Config, account: Account | None = None) -> None:
    """``tls.ensure_certificate`` in a short-lived child process.

    Making a certificate loads the X.509 library (~15 MB, see tls.py); made in the process
    that serves (or in the supervisor, whose memory every worker inherits), it would stay
    there for the process's life. The child makes it (and its record, which the serving
    processes read instead) and exits. Called before the loop and its threads exist; a
    configured or ACME certificate is only looked for, here (no X.509 work, and ACME's
    challenge thread may be running). ConfigError with the child's message when it fails.
    ``account``: the caller is root, the data directory already the service user's; the
    child makes a certificate in memory (as root: a Python installed in root's home is
    unreadable after the switch), then switches to the account for good before it looks
    at anything in the data directory, and writes it there if the one there will not do."""
    from mailfort.tls import ensure_certificate

    if cfg.tls.cert_file or cfg.tls.acme:
        ensure_certificate(cfg)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child (its effects are tested)
        code = 1
        try:
            os.close(r)
            made = None
            if account is not None:
                from mailfort.server.privileges import drop
                from mailfort.tls import make_self_signed

                made = make_self_signed(cfg)  # in memory, as root: no file touched
                drop(account)
            ensure_certificate(cfg, made)
            code = 0
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(w, f"{exc}".encode(errors="replace")[:4000])
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        message = pipe.read()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise ConfigError(message.decode(errors="replace")
                          or f"certificate: the child process ended ({_status(status)})")


# What the supervisor fixed at start (sockets, directories, processes, privileges, log
# handler, ACME): a change to any of these takes a restart, not a reload.
_FIXED = {"listen": None, "metrics": None, "log": None, "mta_sts": ("listen",),
          "server": ("data_dir", "mail_dir", "workers", "user", "group"),
          "tls": ("acme", "acme_email", "acme_directory", "acme_http_listen", "acme_ca_file",
                  "acme_renew_days")}


def fixed_settings_changed(old: Config, new: Config) -> list[str]:
    """The fixed settings (``section`` or ``section.key``) that differ between two."""
    out = []
    for section, keys in _FIXED.items():
        a, b = getattr(old, section), getattr(new, section)
        if keys is None:
            if a != b:
                out.append(section)
            continue
        names = {f.name for f in fields(a)}
        out += [f"{section}.{k}" for k in keys if k in names and getattr(a, k) != getattr(b, k)]
    return out


def restart_delay(failures: int) -> float:
    """Seconds before restarting a worker after ``failures`` short lives in a row."""
    return min(BACKOFF_MAX, BACKOFF_MIN * 2 ** max(0, failures - 1))


def remove_spool_of(spool: Path, pid: int, mail_root: Path | None = None) -> int:
    """What a dead worker left in the spool (``store.maildir.recover_spool``: its link
    records replayed below ``mail_root``, default ``<spool>/../mail``, then its spool files
    removed; no one else writes them)."""
    from mailfort.store.maildir import recover_spool

    try:
        return recover_spool(spool, pid,
                             mail_root=spool.parent / "mail" if mail_root is None else mail_root)
    except OSError as exc:
        log.error("recovery of the spool of worker pid %d failed: %s", pid, exc)
        return 0


def _no_domain(cfg: Config) -> bool:
    """Whether the embedded directory has no domain yet (what ``serve`` prints), read as
    the service user."""
    from mailfort.directory.sqlite import SQLiteDirectory
    from mailfort.server.app import directory_path

    directory = SQLiteDirectory(directory_path(cfg))
    try:
        return not directory.list_domains()
    finally:
        directory.close()


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def run_supervisor(cfg: Config, ops: Operations,
                   reload_config: Callable[[], Config] | None = None) -> int:
    """``mailfort serve`` with workers > 1. Returns the exit status (0 after SIGTERM).
    ``reload_config`` reads the configuration file again, at SIGHUP."""
    import mailfort.server.app  # noqa: F401 - imported once, before the forks

    workers = worker_count(cfg)
    hold_signals()
    sup = Supervisor(cfg, workers, ops, reload_config=reload_config)
    try:
        sup.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"mailfort: cannot listen: {exc.strerror}", file=sys.stderr)
            return 1
        raise
    print(describe(cfg, sup.sockets, workers, sup.no_domain), flush=True)
    code = sup.run()
    print("mailfort: shut down", flush=True)
    return code
