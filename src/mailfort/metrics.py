"""Prometheus metrics of one mailfort process (``[metrics] listen``).

The counters are moved where the decisions are made (policy/decisionlog.py for
connections, refusals, accepted messages and AUTH; the queue worker for delivery outcomes;
the committer for flush latency), so what the log says and what the metrics count cannot
drift apart. Gauges that describe state (sessions open, queue length and age) are read at
scrape time from the running node (``NodeCollector``). The endpoint is plain HTTP and
meant for loopback: it says nothing secret but much about the traffic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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
DELIVERIES = Counter("mailfort_deliveries", "Recipient delivery attempts, by outcome",
                     ["outcome"], registry=REGISTRY)
FLUSH_SECONDS = Histogram(
    "mailfort_flush_seconds", "Time to make one batch of messages durable (syncfs/fsync)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY)


class NodeCollector(Collector):
    """Sessions open per service and the queue, read from the node at each scrape."""

    def __init__(self, sessions: Callable[[], dict[str, int]],
                 queue_created: Callable[[], Iterable[float]]) -> None:
        self.sessions = sessions
        self.queue_created = queue_created

    def collect(self) -> Iterator[Any]:
        open_ = GaugeMetricFamily("mailfort_sessions_open", "Sessions open now, by service",
                                  labels=["service"])
        for service, n in self.sessions().items():
            open_.add_metric([service], n)
        yield open_
        created = list(self.queue_created())
        yield GaugeMetricFamily("mailfort_queue_length", "Messages in the outbound queue",
                                value=len(created))
        oldest = time.time() - min(created) if created else 0.0
        yield GaugeMetricFamily("mailfort_queue_oldest_seconds",
                                "Age of the oldest queued message", value=max(oldest, 0.0))


def serve(hostport: str) -> Any:
    """Start the HTTP endpoint (a thread) on HOST:PORT; returns the server."""
    host, _, port = hostport.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=REGISTRY)
    log.info("metrics on http://%s/metrics", hostport)
    return server
