"""Worker processes: one supervisor binds the listeners, N workers serve them.

``[server] workers = N`` (0: one per CPU; 1: the single process of ``app.serve``). The
supervisor (``mailfort serve``) binds every listener once, then forks the workers, which
inherit the listening sockets and each accept on all of them from their own event loop.

Why inherited sockets rather than SO_REUSEPORT: the port set is fixed by the one bind
(port 0 in tests and ``[listen]`` stay meaningful, and no other process of the same user
can join the group); connections waiting in the one accept queue are not lost when a
worker dies (with SO_REUSEPORT each socket has its own queue, reset when its worker
dies); and only a worker whose loop is idle calls accept(), so a busy worker takes fewer
new connections by itself. The cost is a shared wake-up of the idle workers per burst.

The supervisor itself runs no event loop and starts no thread before forking (a fork
copies only the calling thread). It:

* recovers the spool once, before any worker could be writing to it;
* makes the self-signed certificate once (workers would race to write it);
* restarts a worker that dies, after a back-off that doubles while they keep dying
  (0.1 s up to 30 s, reset once a worker has lived a minute), and clears the dead
  worker's connection counts;
* SIGTERM / SIGINT: closes its copies of the listeners and forwards the signal; each
  worker stops accepting, lets its sessions finish for ``server.shutdown_grace`` seconds,
  says 421 / -ERR to those still open, and exits; the supervisor exits 0;
* SIGKILL of the supervisor kills the workers too (the node is down, as after a crash of
  a single process; nothing acknowledged is lost);
* SIGHUP: forwarded; each worker loads the certificate and key again into its TLS context
  (new handshakes present the new certificate, open sessions keep theirs).

Exactly one worker, slot 0, runs outbound delivery (and its replacement, if it dies), so
no queued message is delivered twice. The others wake it through a pipe when they queue
mail; it also scans the queue on its own schedule, so a lost wake-up only delays.

Brute-force counters, per-user send rates and connection limits are shared through one
SQLite file in the data directory (``SQLiteCounters``, ``SharedConnectionLimiter``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sqlite3
import ssl
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mailfort.config import Config

if TYPE_CHECKING:
    from mailfort.server.app import Node

log = logging.getLogger("mailfort.supervisor")

SHARED_STATE = "shared-state.sqlite3"
BACKOFF_MIN = 0.1
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # seconds a worker must live for the back-off to start over
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}


def worker_count(cfg: Config) -> int:
    return cfg.server.workers or os.cpu_count() or 1


def shared_state_path(cfg: Config) -> Path:
    return cfg.data_path / SHARED_STATE


def reload_certificate(ctx: ssl.SSLContext, cfg: Config) -> None:
    """Load the configured (or generated) certificate and key again into ``ctx``.

    The context is changed in place: the listeners with implicit TLS hold it, and
    STARTTLS reads it per session, so every new handshake presents the new certificate,
    while each open session keeps the one it negotiated. A bad pair is logged and the old
    one stays in force.
    """
    from mailfort.tls import ensure_certificate

    try:
        cert, key = ensure_certificate(cfg)
        ctx.load_cert_chain(cert, key)
    except Exception as exc:  # a reload must never stop the server
        log.error("certificate reload failed, keeping the current one: %s", exc)
        return
    log.info("certificate reloaded from %s", cert)


# ------------------------------------------------------------------ binding

def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


def bind_listeners(cfg: Config) -> dict[str, list[socket.socket]]:
    """Every ``[listen]`` address, bound and listening, in the order of the config."""
    out: dict[str, list[socket.socket]] = {}
    try:
        for name in ("mx", "submission", "submissions", "pop3", "pop3s"):
            for hostport in getattr(cfg.listen, name):
                host, port = _split(hostport)
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                sock = socket.create_server((host, port), family=family, backlog=1024,
                                            reuse_port=False)
                sock.setblocking(False)
                out.setdefault(name, []).append(sock)
    except BaseException:
        for socks in out.values():
            for s in socks:
                s.close()
        raise
    return out


def describe(cfg: Config, sockets: dict[str, list[socket.socket]], workers: int,
             no_domain: bool = False) -> str:
    """What ``serve`` prints at start, in the single-process format (tests read it)."""
    lines = ["mailfort is running:"]
    for name, socks in sockets.items():
        for s in socks:
            host, port = s.getsockname()[:2]
            lines.append(f"  {name:<12} {host}:{port}")
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

async def _worker_main(cfg: Config, slot: int, sockets: dict[str, list[socket.socket]],
                       wake_r: int, wake_w: int) -> int:
    from mailfort.policy.shared_counters import SQLiteCounters
    from mailfort.server.app import Node
    from mailfort.server.connections import SharedConnectionLimiter

    path = shared_state_path(cfg)
    counters = SQLiteCounters(path)
    limiter = SharedConnectionLimiter(path, slot, cfg.limits.max_connections,
                                      cfg.limits.max_connections_per_ip)
    limiter.reset_slot()
    loop = asyncio.get_running_loop()
    deliver = slot == 0

    def tell_delivery() -> None:
        with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
            os.write(wake_w, b"w")

    node = Node(cfg, counters=counters, limiter=limiter)
    await node.start(sockets=sockets, deliver=deliver,
                     queued=None if deliver else tell_delivery)
    if deliver:
        def woken() -> None:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 4096):
                    pass
            node.worker.wake()

        loop.add_reader(wake_r, woken)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_certificate, node.ssl_context, cfg)
    log.info("worker %d (pid %d) serving%s", slot, os.getpid(),
             ", with outbound delivery" if deliver else "")
    await stop.wait()
    await drain(node, cfg.server.shutdown_grace)
    await node.stop()
    counters.close()
    limiter.reset_slot()
    limiter.close()
    return 0


async def drain(node: Node, grace: float) -> None:
    """Stop accepting; wait up to ``grace`` seconds for the open sessions to end."""
    listeners = [*node.services.values(), *node.pop3.values()]
    for listener in listeners:
        for server in listener.servers:
            server.close()
    deadline = time.monotonic() + grace
    while any(listener.sessions for listener in listeners) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def _die_with_parent() -> None:
    """A worker dies with its supervisor (Linux PR_SET_PDEATHSIG): a SIGKILLed
    supervisor then leaves no orphan holding the ports, and the node is down as a
    single-process node would be (what it acknowledged is on disk; the next start
    recovers the rest)."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)


def _child(cfg: Config, slot: int, sockets: dict[str, list[socket.socket]],
           wake_r: int, wake_w: int) -> None:
    """In the forked worker: never returns."""
    code = 1
    try:
        _die_with_parent()
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        code = asyncio.run(_worker_main(cfg, slot, sockets, wake_r, wake_w))
    except BaseException:  # report, then leave through _exit
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# ------------------------------------------------------------------ the supervisor

@dataclass
class _Slot:
    pid: int = 0
    started: float = 0.0
    failures: int = 0  # consecutive short lives
    restart_at: float | None = None


@dataclass
class Supervisor:
    cfg: Config
    workers: int
    sockets: dict[str, list[socket.socket]] = field(default_factory=dict)
    slots: list[_Slot] = field(default_factory=list)
    stopping: bool = False

    def start(self) -> None:
        from mailfort.store.maildir import make_dirs
        from mailfort.tls import ensure_certificate

        cfg = self.cfg
        cfg.data_path.mkdir(mode=0o700, parents=True, exist_ok=True)
        spool = cfg.data_path / "spool"
        make_dirs(spool)
        removed = 0
        for p in spool.iterdir():  # Committer.recover, before any worker writes there
            p.unlink(missing_ok=True)
            removed += 1
        if removed:
            log.info("removed %d unacknowledged spool files left by a crash", removed)
        ensure_certificate(cfg)
        path = shared_state_path(cfg)
        with contextlib.suppress(FileNotFoundError):
            from mailfort.policy.shared_counters import open_shared_db

            conn = open_shared_db(path)  # connection counts of a previous run are void
            with contextlib.suppress(sqlite3.Error):
                conn.execute("DELETE FROM connections")
            with contextlib.suppress(sqlite3.Error):
                conn.execute("DELETE FROM slot_totals")
            conn.close()
        self.sockets = bind_listeners(cfg)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.slots = [_Slot() for _ in range(self.workers)]
        for i in range(self.workers):
            self._spawn(i)

    def _spawn(self, i: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(self.cfg, i, self.sockets, self.wake_r, self.wake_w)
        slot = self.slots[i]
        slot.pid, slot.started, slot.restart_at = pid, time.monotonic(), None

    def _reap(self) -> None:
        from mailfort.server.connections import clear_slot

        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for i, slot in enumerate(self.slots):
                if slot.pid != pid:
                    continue
                slot.pid = 0
                with contextlib.suppress(Exception):
                    clear_slot(shared_state_path(self.cfg), i)
                removed = remove_spool_of(self.cfg.data_path / "spool", pid)
                if removed:
                    log.info("removed %d unacknowledged spool files of worker %d", removed, i)
                if self.stopping:
                    break
                lived = time.monotonic() - slot.started
                slot.failures = 0 if lived >= STABLE_AFTER else slot.failures + 1
                delay = restart_delay(slot.failures)
                slot.restart_at = time.monotonic() + delay
                log.warning("worker %d (pid %d) ended (%s); restarting in %.1f s",
                            i, pid, _status(status), delay)

    def _forward(self, sig: int) -> None:
        for slot in self.slots:
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, sig)

    def run(self) -> int:
        """The supervisor's loop: signals and restarts, until the workers have stopped."""
        kill_at: float | None = None
        while True:
            now = time.monotonic()
            due = [s.restart_at for s in self.slots if s.restart_at is not None]
            timeout = max(0.0, min(due) - now) if due else 1.0
            if kill_at is not None:
                timeout = min(timeout, max(0.0, kill_at - now))
            info = signal.sigtimedwait(_SIGNALS, min(timeout, 1.0))
            sig = info.si_signo if info is not None else None
            if sig in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                self.stopping = True
                for socks in self.sockets.values():  # the workers' copies close as they go
                    for s in socks:
                        s.close()
                self._forward(signal.SIGTERM)
                for slot in self.slots:
                    slot.restart_at = None
                kill_at = time.monotonic() + self.cfg.server.shutdown_grace + 15.0
            elif sig == signal.SIGHUP and not self.stopping:
                from mailfort.tls import ensure_certificate

                with contextlib.suppress(Exception):
                    ensure_certificate(self.cfg)  # a self-signed one renewed here, once
                self._forward(signal.SIGHUP)
            self._reap()
            if self.stopping:
                if not any(s.pid for s in self.slots):
                    return 0
                if kill_at is not None and time.monotonic() >= kill_at:
                    log.error("workers did not stop in time: killing them")
                    self._forward(signal.SIGKILL)
                    kill_at = None
                continue
            for i, slot in enumerate(self.slots):
                if slot.pid == 0 and slot.restart_at is not None \
                        and time.monotonic() >= slot.restart_at:
                    self._spawn(i)


def restart_delay(failures: int) -> float:
    """Seconds before restarting a worker after ``failures`` short lives in a row."""
    return min(BACKOFF_MAX, BACKOFF_MIN * 2 ** max(0, failures - 1))


def remove_spool_of(spool: Path, pid: int) -> int:
    """Remove the spool files of a dead worker (named ``...P<pid>Q...`` by
    ``store.maildir.unique_name``): never acknowledged, and no one else writes them."""
    n = 0
    with contextlib.suppress(OSError):
        for p in spool.glob(f"*P{pid}Q*"):
            p.unlink(missing_ok=True)
            n += 1
    return n


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def run_supervisor(cfg: Config) -> int:
    """``mailfort serve`` with workers > 1. Returns the exit status (0 after SIGTERM)."""
    import mailfort.server.app  # noqa: F401 - imported once, before the forks

    workers = worker_count(cfg)
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    from mailfort.directory.sqlite import SQLiteDirectory
    from mailfort.server.app import directory_path

    cfg.data_path.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory = SQLiteDirectory(directory_path(cfg))  # closed before the forks
    no_domain = not directory.list_domains()
    directory.close()
    sup = Supervisor(cfg, workers)
    try:
        sup.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"mailfort: cannot listen: {exc.strerror}", file=sys.stderr)
            return 1
        raise
    print(describe(cfg, sup.sockets, workers, no_domain), flush=True)
    code = sup.run()
    print("mailfort: shut down", flush=True)
    return code
