"""Assemble and run a mailfort node: directory, store, TLS and the listeners.

``Node`` is what ``mailfort serve`` runs and what the end-to-end tests start in-process
(with port 0 listeners, so each test gets free ports on 127.0.0.1). What a node is made
of, and in which order it starts and stops, is listed once in server/node_plan.py; this
module builds it that way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailfort.config import Config
from mailfort.directory import open_directory
from mailfort.directory.base import lookup
from mailfort.policy import srs
from mailfort.policy.authn import Authenticator
from mailfort.policy.counters import CounterStore, MemoryCounters
from mailfort.policy.msa import MSAPolicy
from mailfort.policy.senderauth import SenderAuth
from mailfort.queue import owner as queue_owner
from mailfort.queue.forward import enqueue_envelope
from mailfort.queue.store import Queue
from mailfort.queue.worker import DeliveryWorker, maildir_deliverer
from mailfort.server.connections import ConnectionLimiter, SharedConnectionLimiter
from mailfort.server.imap import IMAPServer, SharedUserSessions, UserSessions
from mailfort.server.mailbox_watch import MailboxWatcher
from mailfort.server.managesieve import ManageSieveServer
from mailfort.server.milters import Milters, processes
from mailfort.server.mtasts_http import PolicyServer
from mailfort.server.node_plan import (
    LISTENERS,
    connection_limiter,
    inbound_policy,
    make_counters,
)
from mailfort.server.operations import Operations
from mailfort.server.pop3 import POP3Server
from mailfort.server.profile import HARDENED, Profile
from mailfort.server.sieve_delivery import SieveDelivery
from mailfort.server.smtp import Envelope, ServiceOptions, SMTPService
from mailfort.server.stress import StressGuard
from mailfort.store.maildir import Committer, maildir_for

log = logging.getLogger("mailfort")


def directory_path(cfg: Config) -> Path:
    return cfg.data_path / "directory.sqlite3"


def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


class Node:
    """All services of one mailfort instance, sharing one directory and one committer."""

    def __init__(self, cfg: Config, *, ssl_context: ssl.SSLContext | None = None,
                 profile: Profile = HARDENED,
                 counters: CounterStore | None = None,
                 limiter: ConnectionLimiter | SharedConnectionLimiter | None = None,
                 shared_flush: bool = False) -> None:
        """``profile``: policies given in Python in place of the hardened ones
        (server/profile.py); no configuration key or ``serve`` option leads here.
        ``counters``, ``limiter``: the state that a worker process shares with the others
        (server/supervisor.py); by default in-process. ``shared_flush``: a worker
        process's committer shares its flushes with the other workers'
        (store/shared_flush.py)."""
        self.cfg = cfg
        self.profile = profile
        cfg.data_path.mkdir(mode=0o700, parents=True, exist_ok=True)  # mail is private
        # --- node_plan.py phase 7, the store (directory, committer; the queue below) ---
        # The embedded SQLite file, or the PostgreSQL database that several nodes share.
        self.directory = open_directory(cfg)
        self.committer = Committer(cfg.data_path, use_syncfs=cfg.store.flush == "syncfs",
                                   mail_root=cfg.mail_path, shared_flush=shared_flush)
        # Wakes IMAP sessions when a mailbox changes: in this process (the committer's
        # deliveries, sessions' changes), in other processes (inotify), on other nodes
        # (Redis of [counters], or the poll): server/mailbox_watch.py. Listeners get it.
        c = cfg.counters
        self.watcher = MailboxWatcher(
            cfg.mail_path, poll=cfg.store.watch_poll,
            poll_interval=cfg.store.watch_poll_interval,
            redis=(c.url, c.password(), c.key_prefix) if c.backend == "redis" else None)
        self.committer.delivered = self.watcher.changed_many
        if ssl_context is None:
            from mailfort.tls import server_context

            ssl_context = server_context(cfg)
        self.ssl_context = ssl_context
        # --- phase 8, the policies (the delivery worker and queue are built among them) ---
        # This node's own counts (the connection rate, and the fallback of throttles): in
        # this process, or the store a worker process shares with the others on this
        # machine (server/supervisor.py). The logins and throttles count there too, or in
        # Redis when [counters] says so.
        self.local_counters: CounterStore = counters if counters is not None else MemoryCounters()
        self.counters, self.throttles, self.maildrop_locks = make_counters(
            cfg, self.local_counters)
        self.authenticator = Authenticator(
            self.directory, self.counters, cfg.auth if profile.auth is None else profile.auth)
        self.queue = Queue(cfg.data_path / "queue")
        self._queue_lock: int | None = None
        # Seconds the node waits for the queue's owner lock before delivering anyway (with
        # a warning). Above 0 (the primary worker of a reloaded configuration, which waits
        # for the one it replaces to hand over, server/supervisor.py), it serves meanwhile
        # and delivery starts once the lock is its own: one process delivers at a time.
        self.queue_wait = 0.0
        self._delivery_start: asyncio.Task[None] | None = None
        self.worker = DeliveryWorker(
            self.queue,
            cfg,
            maildir_deliverer(self.committer, cfg.mail_path),
            mx_port=cfg.queue.mx_port,
            directory=self.directory,  # the owners of forwarding aliases (issue 24)
        )
        self.msa = MSAPolicy(cfg, self.directory, self.throttles)
        # SPF, DKIM and DMARC of the mail the MX receives ([sender_auth]).
        self.sender_auth = SenderAuth(cfg) if cfg.sender_auth.enabled else None
        # The [[milter]] content filters, with this process's share of the node's
        # limits.max_milter_connections (a worker process shares them with the others).
        self.milters = Milters(cfg, processes(cfg, shared_flush)) if cfg.milter else None
        # One count of connections for the whole node, shared by every listener (and by
        # every worker process: ``limiter``), decided at accept (node_plan.py).
        self.limiter: ConnectionLimiter | SharedConnectionLimiter = (
            limiter if limiter is not None else connection_limiter(cfg, self.local_counters))
        # This process's stress mode (server/stress.py), shared by every listener. In a
        # worker process it adapts this worker's sessions; the count it reads is the node's.
        self.stress = StressGuard(cfg.limits.stress)
        # The MX's DNSBL, pre-greeting and greylisting.
        self.inbound = inbound_policy(cfg, self.directory)
        # Sieve at local delivery ([sieve]): the global scripts are read here, before the
        # privilege drop (server/sieve_delivery.py).
        self.sieve = (SieveDelivery(cfg, self.directory, **(
            {"rules": profile.vacation} if profile.vacation is not None else {}))
            if cfg.sieve.enabled else None)
        # New outbound mail was queued: wake delivery (a worker process without delivery
        # tells the one that has it, server/supervisor.py).
        self.queued: Callable[[], None] = self.worker.wake
        self.services: dict[str, SMTPService] = {}
        self.pop3: dict[str, POP3Server] = {}
        self.imap: dict[str, IMAPServer] = {}
        self.managesieve: dict[str, ManageSieveServer] = {}
        # The IMAP sessions per user, shared by its IMAP listeners (which share ``watcher``
        # too): this process's, or in a worker process the node's (server/supervisor.py).
        self.imap_users: UserSessions | SharedUserSessions = UserSessions(
            cfg.limits.imap_sessions_per_user)
        self.ports: dict[str, list[int]] = {}
        # Called once every listener is bound, before delivery starts (privilege drop).
        self.after_bind: Callable[[], None] | None = None
        # (listen.* name, index) -> a socket already listening (systemd socket activation,
        # or a worker process's, inherited from its supervisor).
        self.inherited: dict[tuple[str, int], socket.socket] = {}
        self.mta_sts: PolicyServer | None = None  # [mta_sts] listen (not in ``ports``,
        self.mta_sts_port = 0  # which are the mail services of [listen]), its bound port
        # A worker process's listeners count their sessions where the node's metrics
        # endpoint sums them (metrics.CountedSessions); None: a plain set.
        self.session_set: Callable[[str], set[Any]] | None = None

    def _enqueue(
        self, path: Path, env: Envelope, submitted_by: str | None
    ) -> Callable[[], None]:
        """Runs on the committer thread, after the message data is flushed. Delivery is
        woken only once the client has its 250 (``queued``), never before."""
        sender = "" if env.sender is None else str(env.sender)
        idents = enqueue_envelope(self.queue, srs.for_config(self.cfg), self.cfg.srs.domain,
                                  path, sender, list(env.remote), env.forwards, submitted_by,
                                  requiretls=env.requiretls, ident=env.queue_id or None)

        def take_back() -> None:
            for ident in idents:
                self.queue.delete(ident)

        return take_back

    async def _auto_reply(self, message: bytes, to: str, about: str) -> None:
        """A message the server writes (a vacation reply), with the null sender: stored in
        the Maildirs of a local address, queued for a remote one."""
        domain = to.rpartition("@")[2]
        if await lookup(self.directory, self.directory.is_local_domain, domain):
            found = await lookup(self.directory, self.directory.resolve, to)
            if found is None:
                log.info("%s: auto-reply to <%s>: no such local user, not sent", about, to)
                return
            local, remote = list(found.local), list(found.remote)
        else:
            local, remote = [], [to]
        if local:
            spool = self.committer.new_spool()
            spool.write(message)
            await self.committer.commit(spool, [maildir_for(self.cfg.mail_path, u)
                                                for u in local])
        if remote:
            ident = await asyncio.to_thread(self.queue.enqueue_bytes, message, "", remote, None)
            log.info("%s: auto-reply queued as %s to %s", about, ident,
                     ", ".join(f"<{a}>" for a in remote))
            self.queued()

    async def _authenticate(
        self, username: str, password: str, client_ip: str
    ) -> tuple[str, str | None]:
        outcome = await self.authenticator.verify(username, password, client_ip)
        return outcome.status, outcome.user

    def _smtp_service(self, options: ServiceOptions) -> SMTPService:
        profile = self.profile
        return SMTPService(
            self.cfg,
            options,
            self.directory,
            self.committer,
            self.ssl_context,
            authenticate=(self._authenticate if options.auth or profile.auth_on_every_port
                          else None),
            enqueue=self._enqueue if profile.enqueue is None else profile.enqueue(self),
            queued=lambda: self.queued(),
            submission=self.msa if options.auth else None,
            profile=profile,
            sender_auth=self.sender_auth if options.name == "mx" else None,
            milters=self.milters,
        )

    async def start(self, *, recover: bool = True, deliver: bool = True) -> None:
        """Without arguments: a whole node in this process. A worker process of
        server/supervisor.py passes ``recover=False`` (the supervisor recovered the spool
        before any worker could be writing to it) and ``deliver`` only for the one worker
        that runs what a node runs once: outbound delivery and the queue's ownership, and
        the MTA-STS policy listener; its listening sockets are in ``inherited``."""
        if recover:
            removed = self.committer.recover()
            if removed:
                log.info("removed %d spool files left by a crash", removed)
        await self.watcher.start()  # before any listener: each can wake or be woken
        # --- phase 9, the engines; then phase 10, delivery ---
        loopback_plain = self.cfg.server.allow_plaintext_auth_on_loopback
        for plan in LISTENERS:  # node_plan.py: the services, in start order
            plain = plan.plaintext_on_loopback and loopback_plain
            if plan.engine == "smtp":
                service = self._smtp_service(ServiceOptions(
                    name=plan.name, implicit_tls=plan.implicit_tls, auth=plan.auth,
                    plaintext_auth_on_loopback=plain))
                if plan.inbound:
                    service.inbound = self.inbound
                service.sieve = self.sieve
                service.auto_reply = self._auto_reply
                self.services[plan.name] = service
                continue
            if plan.engine == "imap":
                self.imap[plan.name] = IMAPServer(
                    ssl_context=self.ssl_context,
                    authenticator=self.authenticator,
                    mail_dir=self.cfg.mail_path,
                    limits=self.cfg.limits,
                    implicit_tls=plan.implicit_tls,
                    allow_plaintext=plain,
                    watcher=self.watcher,
                    user_sessions=self.imap_users,
                )
                if self.profile.imap_settings is not None:  # server/profile.py
                    imap = self.imap[plan.name]
                    imap.settings = imap.loopback_settings = self.profile.imap_settings(
                        imap.settings)
                continue
            if plan.engine == "managesieve":
                self.managesieve[plan.name] = ManageSieveServer(
                    ssl_context=self.ssl_context,
                    authenticator=self.authenticator,
                    mail_dir=self.cfg.mail_path,
                    limits=self.cfg.limits,
                    sieve_config=self.cfg.sieve,
                    allow_plaintext=plain,
                )
                continue
            pop = self.pop3[plan.name] = POP3Server(
                ssl_context=self.ssl_context,
                authenticator=self.authenticator,
                mail_dir=self.cfg.mail_path,
                limits=self.cfg.limits,
                implicit_tls=plan.implicit_tls,
                allow_plaintext=plain,
                hostname=self.cfg.server.hostname,
                locks=self.maildrop_locks,
            )
            pop.changed = self.watcher.changed
            if self.profile.pop3_settings is not None:  # server/profile.py
                pop.settings = pop.loopback_settings = self.profile.pop3_settings(pop.settings)
        listeners: dict[str, SMTPService | POP3Server | IMAPServer | ManageSieveServer] = {
            **self.services, **self.pop3, **self.imap, **self.managesieve}
        for name, service in listeners.items():
            service.limiter = self.limiter  # type: ignore[assignment]
            service.stress = self.stress
            if self.session_set is not None:
                service.sessions = self.session_set(name)
            for i, hostport in enumerate(getattr(self.cfg.listen, name)):
                server = await service.start(*_split(hostport),
                                             sock=self.inherited.get((name, i)))
                for sock in server.sockets:
                    self.ports.setdefault(name, []).append(sock.getsockname()[1])
        if self.cfg.mta_sts.listen and deliver:  # our MTA-STS policy (RFC 8461 §3.3)
            if self.ssl_context is None:
                raise RuntimeError("mta_sts.listen needs a certificate ([tls])")
            self.mta_sts = PolicyServer(self.cfg, self.ssl_context, self.directory)
            self.mta_sts_port = await self.mta_sts.start(
                self.cfg.mta_sts.listen, sock=self.inherited.get(("mta_sts", 0)))
        if self.after_bind is not None:
            self.after_bind()
        if deliver and self.queue_wait > 0:
            self._delivery_start = asyncio.get_running_loop().create_task(self._deliver())
        elif deliver:
            await self._deliver()

    async def _deliver(self) -> None:
        # The queue's lock, held so that `mailfort queue adopt` refuses it while the node
        # runs, and so that a node's next primary waits for this one to hand it over.
        self._queue_lock = await self._hold_queue()
        await self.worker.start()

    async def _hold_queue(self) -> int | None:
        deadline = asyncio.get_running_loop().time() + self.queue_wait
        while True:
            try:
                return queue_owner.hold(self.queue.root)
            except queue_owner.QueueBusy as exc:
                if asyncio.get_running_loop().time() >= deadline:
                    log.warning("%s: another process delivers from this queue too", exc)
                    return None
            await asyncio.sleep(0.05)

    async def hand_over(self) -> None:
        """Stop outbound delivery and release the queue, for another process to take
        them (a new generation of workers after a configuration reload)."""
        await self._stop_delivery()
        if self._queue_lock is not None:
            queue_owner.release(self._queue_lock)
            self._queue_lock = None

    async def _stop_delivery(self) -> None:
        """Outbound delivery stopped, or its start (waiting for the queue) given up."""
        if self._delivery_start is not None:
            self._delivery_start.cancel()
            await asyncio.gather(self._delivery_start, return_exceptions=True)
            self._delivery_start = None
        await self.worker.stop()

    def port(self, name: str) -> int:
        return self.ports[name][0]

    async def stop(self) -> None:
        self.stress.stop()
        for service in self.services.values():
            await service.close()
        if self.milters is not None:
            await self.milters.close()  # its idle filter connections
        for pop in self.pop3.values():
            await pop.close()
        for imap in self.imap.values():
            await imap.close()
        for sieve in self.managesieve.values():
            await sieve.close()
        if self.mta_sts is not None:
            await self.mta_sts.close()
        await self._stop_delivery()
        await asyncio.to_thread(self.committer.stop)
        await self.watcher.close()  # after the committer: its last batch has reported
        self.authenticator.close()
        if self.sender_auth is not None:
            self.sender_auth.close()
        self.inbound.close()
        self.directory.close()
        if self._queue_lock is not None:
            queue_owner.release(self._queue_lock)
            self._queue_lock = None
        aclose = getattr(self.counters, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def describe(node: Node) -> str:
    lines = ["mailfort is running:"]
    for name, ports in node.ports.items():
        hosts = [hp.rpartition(":")[0] for hp in getattr(node.cfg.listen, name)]
        for host, port in zip(hosts, ports, strict=False):
            lines.append(f"  {name:<12} {host}:{port}")
    if node.mta_sts is not None:
        host = node.cfg.mta_sts.listen.rpartition(":")[0]
        lines.append(f"  mta-sts      https://{host}:{node.mta_sts_port}/.well-known/mta-sts.txt")
    lines.append(f"  data         {node.cfg.data_path.resolve()}")
    if node.cfg.server.mail_dir:
        lines.append(f"  mail         {node.cfg.mail_path.resolve()}")
    if node.cfg.directory.backend != "sqlite":
        from mailfort.directory.postgresql import safe_url

        lines.append(f"  directory    {safe_url(node.cfg.directory.url)}")
    if not node.directory.list_domains():
        lines += [
            "No domain yet. Add one and a user (in another terminal, same directory):",
            "  mailfort domain add example.test",
            "  mailfort user add alice@example.test --password-file pw.txt",
        ]
    return "\n".join(lines)


async def serve(cfg: Config, ops: Operations | None = None,
                ssl_context: ssl.SSLContext | None = None) -> None:
    ops = Operations(cfg) if ops is None else ops  # production: privileges, notify, metrics
    node = Node(cfg, ssl_context=ssl_context)
    node.after_bind = ops.after_bind
    node.inherited = ops.inherited
    await node.start()
    await ops.started(node)
    print(describe(node), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("mailfort: shutting down", flush=True)
    ops.stopping()
    await node.stop()
    await ops.stopped()
