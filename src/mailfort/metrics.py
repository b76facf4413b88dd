"""Prometheus metrics of one mailfort process (``[metrics] listen``).

The counters are moved where the decisions are made (policy/decisionlog.py for
connections, refusals, accepted messages and AUTH; the queue worker for delivery outcomes;
the committer for flush latency), so what the log says and what the metrics count cannot
drift apart. Gauges that describe state (sessions open, queue length and age) are read at
scrape time from the running node (``NodeCollector``). The endpoint is plain HTTP and
meant for loopback: it says nothing secret but much about the traffic.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
    multiprocess,
    start_http_server,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mailfort import procid

log = logging.getLogger("mailfort")

REGISTRY = CollectorRegistry(auto_describe=True)

CONNECTIONS = Counter("mailfort_connections", "Connections accepted, by service",
                      ["service"], registry=REGISTRY)
ACCEPTED = Counter("mailfort_messages_accepted", "Messages stored or queued (250 sent)",
                   registry=REGISTRY)
ACCEPTED_BYTES = Counter("mailfort_message_bytes", "Size of the accepted messages",
                         registry=REGISTRY)
REFUSED = Counter("mailfort_refusals", "Refused connections and commands, by stage and "
                  "enhanced status code", ["stage", "code"], registry=REGISTRY)
AUTH = Counter("mailfort_auth", "AUTH / POP3 logins by result", ["result"],
               registry=REGISTRY)
BLOCKS = Counter("mailfort_blocks", "Clients blocked, by kind (auth brute force, dnsbl)",
                 ["kind"], registry=REGISTRY)
MILTER = Counter("mailfort_milter_verdicts", "Content filter (milter) verdicts, by action",
                 ["action"], registry=REGISTRY)
DELIVERIES = Counter("mailfort_deliveries", "Recipient delivery attempts, by outcome",
                     ["outcome"], registry=REGISTRY)
FLUSH_SECONDS = Histogram(
    "mailfort_flush_seconds", "Time to make one batch of messages durable (syncfs/fsync)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY)
# Worker processes only (``share_between_processes``): each worker counts its own open
# sessions here, the endpoint adds up those of the live workers. A single process reads
# them from its node instead (``NodeCollector``), so this one is in no registry.
SESSIONS_OPEN = Gauge("mailfort_sessions_open", "Sessions open now, by service",
                      ["service"], registry=None, multiprocess_mode="livesum")
_ALL = (CONNECTIONS, ACCEPTED, ACCEPTED_BYTES, REFUSED, AUTH, BLOCKS, DELIVERIES,
        FLUSH_SECONDS, SESSIONS_OPEN)


def share_between_processes(directory: Path) -> None:
    """From now on every metric of this module is kept in files in ``directory``
    (prometheus_client's multiprocess mode), so that the worker processes forked after
    this call each count their own and one endpoint (``MultiProcessCollector``) reports
    the node's sums. Called by the supervisor once, before it forks any worker; the
    directory is emptied first (counters start at zero with the node, as in one process).
    """
    _fresh_directory(directory)
    for metric in _ALL:
        if metric._labelnames:
            metric.clear()  # children are made, in the new mode, on their first use
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    # The pid names each process's files; the library would ask the kernel at every update.
    values.ValueClass = values.MultiProcessValue(process_identifier=procid.pid)
    for metric in _ALL:
        if not metric._labelnames:
            metric._metric_init()


def _fresh_directory(directory: Path) -> None:
    """``directory`` as a real directory of this process's user, without the files of a
    previous run. Called after the privilege drop (the data directory is the service
    user's to change); still, a symlink planted in its place is removed, not followed,
    and the ``*.db`` entries (files, or symlinks themselves) are unlinked by name in the
    directory opened."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(directory)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            log.warning("%s was not a directory: replaced by one", directory)
            directory.unlink()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            raise PermissionError(f"{directory} belongs to another user")
        with os.scandir(fd) as it:
            old = [e.name for e in it if e.name.endswith(".db")
                   and not e.is_dir(follow_symlinks=False)]
        for name in old:
            os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)


def forget_process(pid: int) -> None:
    """A worker ended: its open-session gauges no longer count (its counters still do)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)


def node_registry() -> CollectorRegistry:
    """The node's sums over every worker's files (after ``share_between_processes``)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


class CountedSessions(set[Any]):
    """A listener's set of sessions that keeps its service's SESSIONS_OPEN gauge."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._gauge = SESSIONS_OPEN.labels(service)

    def add(self, session: Any) -> None:
        if session not in self:
            super().add(session)
            self._gauge.inc()

    def discard(self, session: Any) -> None:
        if session in self:
            super().discard(session)
            self._gauge.dec()


class NodeCollector(Collector):
    """Sessions open per service and the queue, read from the node at each scrape
    (``sessions`` None: they come from the workers' gauges, not from here)."""

    def __init__(self, sessions: Callable[[], dict[str, int]] | None,
                 queue_created: Callable[[], Iterable[float]]) -> None:
        self.sessions = sessions
        self.queue_created = queue_created

    def collect(self) -> Iterator[Any]:
        if self.sessions is not None:
            open_ = GaugeMetricFamily("mailfort_sessions_open",
                                      "Sessions open now, by service", labels=["service"])
            for service, n in self.sessions().items():
                open_.add_metric([service], n)
            yield open_
        created = list(self.queue_created())
        yield GaugeMetricFamily("mailfort_queue_length", "Messages in the outbound queue",
                                value=len(created))
        oldest = time.time() - min(created) if created else 0.0
        yield GaugeMetricFamily("mailfort_queue_oldest_seconds",
                                "Age of the oldest queued message", value=max(oldest, 0.0))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_socket(sock: socket.socket, registry: CollectorRegistry) -> Any:
    """The endpoint on a socket already listening (bound by the supervisor before it
    dropped privileges, inherited by the worker that serves it), in a thread."""
    from wsgiref.simple_server import WSGIServer

    server = WSGIServer(("", 0), _QuietHandler, bind_and_activate=False)
    server.socket.close()
    sock.setblocking(True)
    server.socket = sock
    host, port = sock.getsockname()[:2]
    server.server_address = (host, port)
    server.server_name, server.server_port = host, port
    server.setup_environ()
    server.set_app(make_wsgi_app(registry))
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    return server


def serve(hostport: str) -> Any:
    """Start the HTTP endpoint (a thread) on HOST:PORT; returns the server."""
    host, _, port = hostport.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=REGISTRY)
    log.info("metrics on http://%s/metrics", hostport)
    return server
