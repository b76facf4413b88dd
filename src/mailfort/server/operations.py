"""What ``mailfort serve`` adds around a Node to run in production (phases 1-6 and 11 of
server/node_plan.py, the one list of what a node is made of and in which order).

In order: ``Operations(cfg)`` decides about privileges before anything is opened (see
server/privileges.py) and connects to the service manager's notify socket; ``bind`` binds
every listener, ``give_away`` gives the data directory to the service user and
``drop_privileges`` drops to it, all before the node is made: nothing in the data
directory, which that user can change, is opened as root (issue 24). (A node made
without ``bind``, as in tests, binds itself and calls ``after_bind``, which drops.)
``started`` opens the
metrics endpoint and the control socket, installs SIGHUP (reload the certificate and
reopen the log file, RELOADING=1 then READY=1) and SIGUSR1 (reopen the log file) and tells
systemd READY=1; ``stopping``/``stopped`` undo it, STOPPING=1 first.

In a worker process (``[server] workers`` > 1, server/supervisor.py) the supervisor did the
first part (privileges, binding, systemd) once for the node; ``Operations(cfg, handler,
role=...)`` then only does what each worker must (SIGHUP, SIGUSR1), and in the primary
worker, the one that also delivers, what must run once per node: the control socket and
the metrics endpoint (on the socket the supervisor bound, summing every worker's counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import pwd
import signal
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailfort import logsetup, metrics, tls, tlsinfo
from mailfort.config import Config, ConfigError
from mailfort.server import activation, privileges
from mailfort.server.control import ControlServer, socket_path
from mailfort.server.sdnotify import Notifier

if TYPE_CHECKING:
    # Imported where used: ACME needs the X.509 library, which a node without ACME never
    # loads (tls.py says why).
    from mailfort import acmecert
    from mailfort.server.app import Node

log = logging.getLogger("mailfort")


ACME_CHECK_EVERY = 12 * 3600.0
CERT_WATCH_EVERY = 30.0  # seconds between looks at tls.cert_file / tls.key_file


def _file_stamp(paths: tuple[Path, ...]) -> tuple[tuple[int, int, int], ...] | None:
    """What changes when a tool writes or replaces the files (inode, size, mtime)."""
    try:
        return tuple((st.st_ino, st.st_size, st.st_mtime_ns)
                     for st in (p.stat() for p in paths))
    except OSError:
        return None


def _acme_start(cfg: Config) -> acmecert.ChallengeServer:
    from mailfort import acmecert

    try:
        return acmecert.ensure(cfg)
    except (ConfigError, OSError):
        raise
    except Exception as exc:  # the CA's refusal, a network error: one line, not a trace
        raise ConfigError(f"tls.acme: no certificate from {cfg.tls.acme_directory}: "
                          f"{exc}") from None


def load_lazy_data() -> None:
    """What the libraries read from their own files on first use, read now, as root: after
    the drop, a Python in root's home is unreadable, and a record type or the public suffix
    list loaded then would fail every DNS check of the node (dnspython loads each record
    type's module when first met; publicsuffixlist reads its data file when first built;
    the asyncio backend of dnspython's async resolver, which every outbound MX and route
    lookup uses, is imported at its first query)."""
    import dns.asyncbackend
    import dns.rdata

    from mailfort.policy import dmarc
    from mailfort.tls import CIPHERS

    dns.rdata.load_all_types()
    dns.asyncbackend.get_backend("asyncio")
    dmarc.organizational_domain("example.com")  # builds and caches the list
    # OpenSSL's first context loads its algorithms and cipher tables (about 1 MB, then
    # ~10 kB a context): loaded here, before a supervisor forks, the workers share them.
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(CIPHERS)


def _acme_listen(cfg: Config) -> acmecert.ChallengeServer:
    """Root's part of ACME: the challenge listener (port 80), and the ACME client's modules
    imported (after the drop, a Python in root's home is unreadable)."""
    from mailfort import acmecert

    acmecert.load_client()
    return acmecert.ChallengeServer(cfg.tls.acme_http_listen)


def _acme_order(cfg: Config, server: acmecert.ChallengeServer) -> None:
    """The first certificate, if due, written into the data directory (as the service
    user: the directory is that user's to change)."""
    from mailfort import acmecert

    try:
        acmecert.renew_if_due(cfg, server)
    except (ConfigError, OSError):
        raise
    except Exception as exc:
        raise ConfigError(f"tls.acme: no certificate from {cfg.tls.acme_directory}: "
                          f"{exc}") from None


def listener_addresses(node: Node) -> dict[str, list[str]]:
    """service -> ["HOST:PORT", ...] as bound (port 0 resolved), IPv6 in brackets."""
    out: dict[str, list[str]] = {}
    for name, ports in node.ports.items():
        hosts = [hp.rpartition(":")[0] for hp in getattr(node.cfg.listen, name)]
        out[name] = [f"{h}:{p}" for h, p in zip(hosts, ports, strict=False)]
    return out


def sessions_open(node: Node) -> dict[str, int]:
    services: dict[str, Any] = {**node.services, **node.pop3, **node.imap,
                                **node.managesieve}
    return {name: len(svc.sessions) for name, svc in services.items()}


@dataclass
class WorkerRole:
    """What a worker process is told by its supervisor."""

    slot: int
    workers: int
    main_pid: int  # the supervisor: the pid systemd and ``mailfort status`` know
    sockets: dict[tuple[str, int], socket.socket]  # (listen.* name, index) -> listening
    metrics_socket: socket.socket | None = None  # the primary worker serves the endpoint

    @property
    def primary(self) -> bool:
        """Slot 0 delivers, and runs what must run once per node."""
        return self.slot == 0


class Operations:
    def __init__(self, cfg: Config, log_handler: logging.Handler | None = None, *,
                 role: WorkerRole | None = None) -> None:
        self.cfg = cfg
        self.log_handler = log_handler
        self.role = role
        self.acme: acmecert.ChallengeServer | None = None
        self.renewal: asyncio.Task[None] | None = None
        self.cert_watch: asyncio.Task[None] | None = None
        self.registry = metrics.REGISTRY
        if role is not None:  # the supervisor bound, dropped privileges, talks to systemd
            self.inherited = role.sockets
            self.account: privileges.Account | None = None
            self.notifier = Notifier({})
        else:
            # Sockets from systemd socket activation need no bind (nor root); ConfigError
            # for any that the configuration does not name, and (preflight) before
            # anything opens.
            self.inherited = activation.assign(cfg, activation.inherited_sockets())
            self.account = privileges.preflight(cfg, set(self.inherited))
            if cfg.tls.acme:  # before the node: its TLS context needs the certificate
                if self.account is None:
                    self.acme = _acme_start(cfg)
                else:  # its listener bound as root; the order written after the drop
                    self.acme = _acme_listen(cfg)
            self.notifier = Notifier()
        self.dropped = False  # drop_privileges has switched to the service user
        self.given = False  # give_away has given the data directory to it
        self.metrics_socket: socket.socket | None = None  # bound by ``bind``
        self.started_at = time.time()
        self.node: Node | None = None
        self.control: ControlServer | None = None
        self.metrics_server: Any = None
        self.collector: metrics.NodeCollector | None = None

    # ------------------------------------------------------------------ start

    def bind(self) -> dict[tuple[str, int], socket.socket]:
        """``mailfort serve`` in one process: every listener, the metrics endpoint's and
        the MTA-STS listener's sockets, bound now (as root when started so), so that the
        node, made after ``drop_privileges``, opens nothing in the data directory as root.
        Returns the listeners, for ``Node.inherited``."""
        from mailfort.server.node_plan import bind_address, bind_listeners

        sockets = bind_listeners(self.cfg, self.inherited)
        try:
            if self.cfg.metrics.listen:
                self.metrics_socket = bind_address(self.cfg.metrics.listen)
            if self.cfg.mta_sts.listen:
                sockets[("mta_sts", 0)] = bind_address(self.cfg.mta_sts.listen)
        except BaseException:
            for sock in sockets.values():
                sock.close()
            raise
        self.inherited = sockets
        return sockets

    def after_bind(self) -> None:
        """Listeners are bound; nothing has been served or delivered yet."""
        if self.role is not None:
            return
        if self.metrics_socket is not None:
            self.metrics_server = metrics.serve_socket(self.metrics_socket, self.registry)
            log.info("metrics on http://%s/metrics", self.cfg.metrics.listen)
        elif self.cfg.metrics.listen:
            self.metrics_server = metrics.serve(self.cfg.metrics.listen)
        self.drop_privileges()

    def give_away(self) -> None:
        """Root, before the switch: the data directory, the Maildir root and the log file
        become the service user's (nothing in them followed through a symlink). Once."""
        if self.account is None or self.given:
            return
        privileges.own_data_dir(self.cfg.data_path, self.account)
        privileges.own_mail_root(self.cfg, self.account)
        if self.cfg.log.file:  # so a reopen after rotation can write
            privileges.own_log_file(Path(self.cfg.log.file), self.account)
        self.given = True

    def drop_privileges(self) -> None:
        """Give the data directory (and log file) to the service user, then become it;
        then what was put off until now: the ACME order, written into the data directory.
        Once only (``mailfort serve`` calls it before making the node, which calls it again
        once bound)."""
        if self.account is None or self.dropped:
            return
        self.give_away()
        load_lazy_data()
        from mailfort.server import sieve_delivery

        sieve_delivery.preload(self.cfg)  # the administrator's scripts, read as root
        privileges.drop(self.account)
        self.dropped = True
        if self.acme is not None:
            _acme_order(self.cfg, self.acme)

    async def started(self, node: Node) -> None:
        self.node = node
        loop = asyncio.get_running_loop()
        handler = self.log_handler
        if handler is not None:
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signal.SIGUSR1, logsetup.reopen, handler)
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        if self.cfg.tls.cert_file and node.ssl_context is not None:
            self.cert_watch = asyncio.create_task(self._watch_certificate(node),
                                                  name="certificate-watch")
        role = self.role
        if role is not None and not role.primary:
            return
        queue_created = lambda: [e.created for e in node.queue.list()]  # noqa: E731
        if role is None:
            self.collector = metrics.NodeCollector(lambda: sessions_open(node), queue_created)
            metrics.REGISTRY.register(self.collector)
        else:  # the node's sums over every worker; the sessions are in their gauges
            self.registry = metrics.node_registry()
            self.registry.register(metrics.NodeCollector(None, queue_created))
            if role.metrics_socket is not None:
                self.metrics_server = metrics.serve_socket(role.metrics_socket,
                                                           self.registry)
        self.control = ControlServer(socket_path(self.cfg.data_path),
                                     {"retry": self._retry, "status": self._status,
                                      "unblock": self._unblock, "blocks": self._blocks})
        await self.control.start()
        if self.acme is not None:
            self.renewal = asyncio.create_task(self._renew_loop(node), name="acme-renewal")
        self.notifier.notify(READY="1", STATUS="serving", MAINPID=str(os.getpid()))

    def reload(self) -> None:
        """SIGHUP: the certificate again from its files (new handshakes present it, open
        sessions keep theirs) and the log file reopened (logrotate)."""
        self.notifier.notify(RELOADING="1",
                             MONOTONIC_USEC=str(time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                                                // 1000))
        if self.log_handler is not None:
            logsetup.reopen(self.log_handler)
        if self.node is not None and self.node.ssl_context is not None:
            tls.reload_certificate(self.node.ssl_context, self.cfg)
        self.notifier.notify(READY="1", STATUS="serving")

    # ------------------------------------------------------------------ stop

    def stopping(self) -> None:
        self.notifier.notify(STOPPING="1")

    async def stopped(self) -> None:
        if self.renewal is not None:
            self.renewal.cancel()
        if self.cert_watch is not None:
            self.cert_watch.cancel()
        if self.acme is not None:
            self.acme.close()
        if self.control is not None:
            await self.control.close()
        if self.collector is not None:
            metrics.REGISTRY.unregister(self.collector)
            self.collector = None
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        self.notifier.close()

    async def _watch_certificate(self, node: Node) -> None:
        """tls.cert_file / key_file changed on disk (a renewal by another tool): load them,
        as SIGHUP would, without waiting for one. A pair caught half-written fails to load
        (the old one stays) and is tried again at its next change."""
        assert node.ssl_context is not None
        paths = (Path(self.cfg.tls.cert_file), Path(self.cfg.tls.key_file))
        seen = _file_stamp(paths)
        while True:
            await asyncio.sleep(CERT_WATCH_EVERY)
            now = _file_stamp(paths)
            if now is not None and now != seen:
                seen = now
                log.info("certificate files changed on disk")
                tls.reload_certificate(node.ssl_context, self.cfg)

    async def _renew_loop(self, node: Node) -> None:
        """Renew when due; the live TLS context loads the new files, so new handshakes get
        the new certificate and open sessions keep theirs."""
        from mailfort import acmecert

        assert self.acme is not None
        while True:
            await asyncio.sleep(ACME_CHECK_EVERY)
            try:
                renewed = await asyncio.to_thread(acmecert.renew_if_due, self.cfg, self.acme)
                if renewed and node.ssl_context is not None:
                    node.ssl_context.load_cert_chain(*acmecert.paths(self.cfg))
            except Exception:  # try again at the next check; the old certificate serves
                log.exception("acme: renewal failed")

    # ------------------------------------------------------------------ control commands

    async def _retry(self, args: list[str]) -> str:
        assert self.node is not None
        ident = args[0] if args else None
        n = await asyncio.to_thread(self.node.queue.retry, ident)
        self.node.worker.rescan()
        return f"ok {n}"

    async def _unblock(self, args: list[str]) -> str:
        assert self.node is not None
        if len(args) != 1:
            raise ValueError("unblock takes one IP address or user name")
        return "ok " + await self.node.authenticator.unblock(args[0])

    async def _blocks(self, args: list[str]) -> str:
        """The brute-force blocks as this node sees them (with [counters] in Redis: those
        of every node)."""
        assert self.node is not None
        blocks = await self.node.authenticator.blocks()
        return "ok " + json.dumps([dataclasses.asdict(b) for b in blocks])

    async def _status(self, args: list[str]) -> str:
        assert self.node is not None
        node = self.node
        entries = await asyncio.to_thread(node.queue.list)
        damaged = len(await asyncio.to_thread(node.queue.damaged))
        now = time.time()
        cert: dict[str, Any]
        try:
            cert = tlsinfo.describe(tlsinfo.served_certificate_path(self.cfg))
        except (OSError, ValueError) as exc:
            cert = {"error": str(exc)}
        role = self.role
        sessions = sessions_open(node) if role is None else {
            name: int(self.registry.get_sample_value(
                "mailfort_sessions_open", {"service": name}) or 0)
            for name in sessions_open(node)}
        status = {
            "pid": os.getpid() if role is None else role.main_pid,
            "workers": 1 if role is None else role.workers,
            "user": pwd.getpwuid(os.geteuid()).pw_name,
            "uptime": round(now - self.started_at),
            "listeners": listener_addresses(node),
            "metrics": self.cfg.metrics.listen,
            "sessions": sessions,
            "queue": {
                "messages": len(entries),
                "recipients": sum(len(e.active) for e in entries),
                "oldest_seconds": round(now - min(e.created for e in entries))
                if entries else 0,
                "damaged": damaged,  # set aside in queue/corrupt/, not delivered
            },
            "certificate": cert,
            "accepted": self.registry.get_sample_value("mailfort_messages_accepted_total"),
        }
        return "ok " + json.dumps(status)
