"""Assemble and run a mailfort node: directory, store, TLS and the listeners.

``Node`` is what ``mailfort serve`` runs and what the end-to-end tests start in-process
(with port 0 listeners, so each test gets free ports on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mailfort.config import Config
from mailfort.directory.sqlite import SQLiteDirectory
from mailfort.policy.authn import Authenticator
from mailfort.policy.counters import Counters, MemoryCounters
from mailfort.policy.msa import MSAPolicy
from mailfort.policy.senderauth import SenderAuth
from mailfort.queue.store import Queue
from mailfort.queue.worker import DeliveryWorker, maildir_deliverer
from mailfort.server.connections import ConnectionLimiter, SharedConnectionLimiter
from mailfort.server.pop3 import POP3Server
from mailfort.server.smtp import Envelope, ServiceOptions, SMTPService
from mailfort.store.maildir import Committer

if TYPE_CHECKING:
    from mailfort.lab.profile import LegacyProfile

log = logging.getLogger("mailfort")


def directory_path(cfg: Config) -> Path:
    return cfg.data_path / "directory.sqlite3"


def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


class Node:
    """All services of one mailfort instance, sharing one directory and one committer."""

    def __init__(self, cfg: Config, *, ssl_context: ssl.SSLContext | None = None,
                 legacy: LegacyProfile | None = None,
                 counters: Counters | None = None,
                 limiter: ConnectionLimiter | SharedConnectionLimiter | None = None) -> None:
        """``legacy``: the lab's weakened profile. Only ``mailfort.lab`` passes one; no
        configuration key or ``serve`` option leads here. ``counters``, ``limiter``: the
        state that a worker process shares with the others (server/supervisor.py); by
        default in-process."""
        self.cfg = cfg
        self.legacy = legacy
        cfg.data_path.mkdir(mode=0o700, parents=True, exist_ok=True)  # mail is private
        self.directory = SQLiteDirectory(directory_path(cfg))
        self.committer = Committer(cfg.data_path, use_syncfs=cfg.store.flush == "syncfs")
        if ssl_context is None:
            from mailfort.tls import server_context

            ssl_context = server_context(cfg)
        self.ssl_context = ssl_context
        self.counters: Counters = counters if counters is not None else MemoryCounters()
        self.authenticator = Authenticator(
            self.directory, self.counters, cfg.auth if legacy is None else legacy.auth)
        self.queue = Queue(cfg.data_path / "queue")
        self.worker = DeliveryWorker(
            self.queue,
            cfg,
            maildir_deliverer(self.committer, cfg.data_path),
            mx_port=cfg.queue.mx_port,
        )
        self.msa = MSAPolicy(cfg, self.directory, self.counters)
        # SPF, DKIM and DMARC of the mail the MX receives ([sender_auth]).
        self.sender_auth = SenderAuth(cfg) if cfg.sender_auth.enabled else None
        # One count of connections for the whole node, shared by every listener.
        self.limiter = limiter if limiter is not None else ConnectionLimiter(
            cfg.limits.max_connections, cfg.limits.max_connections_per_ip)
        # --- worker processes (server/supervisor.py): set by start() --------------------
        self.queued: Callable[[], None] = self.worker.wake  # new outbound mail was queued
        # --- end worker processes -------------------------------------------------------
        self.services: dict[str, SMTPService] = {}
        self.pop3: dict[str, POP3Server] = {}
        self.ports: dict[str, list[int]] = {}

    def _enqueue(
        self, path: Path, env: Envelope, submitted_by: str | None
    ) -> Callable[[], None]:
        """Runs on the committer thread, after the message data is flushed. Delivery is
        woken only once the client has its 250 (``queued``), never before."""
        sender = "" if env.sender is None else str(env.sender)
        ident = self.queue.enqueue(path, sender, list(env.remote), submitted_by)
        return lambda: self.queue.delete(ident)

    async def _authenticate(
        self, username: str, password: str, client_ip: str
    ) -> tuple[str, str | None]:
        outcome = await self.authenticator.verify(username, password, client_ip)
        return outcome.status, outcome.user

    def _smtp_service(self, options: ServiceOptions) -> SMTPService:
        legacy = self.legacy  # lab only: AUTH on the one door, accept-then-bounce
        return SMTPService(
            self.cfg,
            options,
            self.directory,
            self.committer,
            self.ssl_context,
            authenticate=self._authenticate if options.auth or legacy else None,
            enqueue=self._enqueue if legacy is None else legacy.enqueue_hook(self),
            queued=lambda: self.queued(),
            submission=self.msa if options.auth else None,
            legacy=legacy,
            sender_auth=self.sender_auth if options.name == "mx" else None,
        )

    async def start(self, *, sockets: dict[str, list[socket.socket]] | None = None,
                    deliver: bool = True, queued: Callable[[], None] | None = None) -> None:
        """Without arguments: a whole node in this process. A worker process of
        server/supervisor.py passes the listening ``sockets`` it inherited (the spool was
        recovered by the supervisor, before any worker could be writing to it), runs
        delivery only if it is the one delivery worker, and otherwise tells that worker
        through ``queued``."""
        if sockets is None:
            removed = self.committer.recover()
            if removed:
                log.info("removed %d unacknowledged spool files left by a crash", removed)
        if queued is not None:
            self.queued = queued
        loopback_plain = self.cfg.server.allow_plaintext_auth_on_loopback
        self.services["mx"] = self._smtp_service(ServiceOptions(name="mx"))
        self.services["submission"] = self._smtp_service(
            ServiceOptions(name="submission", auth=True, plaintext_auth_on_loopback=loopback_plain)
        )
        self.services["submissions"] = self._smtp_service(
            ServiceOptions(name="submissions", implicit_tls=True, auth=True)
        )
        for name, implicit in (("pop3", False), ("pop3s", True)):
            self.pop3[name] = POP3Server(
                ssl_context=self.ssl_context,
                authenticator=self.authenticator,
                data_dir=self.cfg.data_path,
                limits=self.cfg.limits,
                implicit_tls=implicit,
                allow_plaintext=loopback_plain,
                hostname=self.cfg.server.hostname,
            )
            if self.legacy is not None:  # lab only: no TLS, unlimited tries per session
                pop = self.pop3[name]
                pop.settings = pop.loopback_settings = self.legacy.pop3_settings(pop.settings)
        if deliver:
            await self.worker.start()
        listeners: dict[str, SMTPService | POP3Server] = {**self.services, **self.pop3}
        for name, service in listeners.items():
            service.limiter = self.limiter  # type: ignore[assignment]
            inherited = iter(sockets.get(name, [])) if sockets is not None else None
            for hostport in getattr(self.cfg.listen, name):
                given = next(inherited) if inherited is not None else None
                server = await service.start(*_split(hostport), sock=given)
                for sock in server.sockets:
                    self.ports.setdefault(name, []).append(sock.getsockname()[1])

    def port(self, name: str) -> int:
        return self.ports[name][0]

    async def stop(self) -> None:
        for service in self.services.values():
            await service.close()
        for pop in self.pop3.values():
            await pop.close()
        await self.worker.stop()
        await asyncio.to_thread(self.committer.stop)
        self.authenticator.close()
        if self.sender_auth is not None:
            self.sender_auth.close()

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def describe(node: Node) -> str:
    lines = ["mailfort is running:"]
    for name, ports in node.ports.items():
        hosts = [_split(hp)[0] for hp in getattr(node.cfg.listen, name)]
        for host, port in zip(hosts, ports, strict=False):
            lines.append(f"  {name:<12} {host}:{port}")
    lines.append(f"  data         {node.cfg.data_path.resolve()}")
    if not node.directory.list_domains():
        lines += [
            "No domain yet. Add one and a user (in another terminal, same directory):",
            "  mailfort domain add example.test",
            "  mailfort user add alice@example.test --password-file pw.txt",
        ]
    return "\n".join(lines)


async def serve(cfg: Config) -> None:
    node = Node(cfg)
    await node.start()
    print(describe(node), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    # --- worker processes: SIGHUP reloads the certificate here too (server/supervisor.py)
    from mailfort.server.supervisor import reload_certificate

    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, reload_certificate, node.ssl_context, cfg)
    # --- end worker processes ----------------------------------------------------------
    await stop.wait()
    print("mailfort: shutting down", flush=True)
    await node.stop()


def raise_file_limit(cfg: Config) -> None:
    """Each session is a descriptor: lift the soft limit to the hard one, warn if short.

    Without this, a server at the soft limit can no longer accept() at all, so clients
    hang instead of getting the 421 that the connection limits promise.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    needed = cfg.limits.max_connections + 256
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "open-file limit %d is below limits.max_connections + 256 (%d): "
            "raise it (ulimit -n) or lower limits.max_connections", soft, needed,
        )


def run(cfg: Config) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    raise_file_limit(cfg)
    # --- worker processes: [server] workers > 1 runs a supervisor (server/supervisor.py)
    from mailfort.server.supervisor import run_supervisor, worker_count

    if worker_count(cfg) > 1:
        raise SystemExit(run_supervisor(cfg))
    # --- end worker processes ----------------------------------------------------------
    asyncio.run(serve(cfg))
