"""What a mailfort node is made of, in the order it starts and stops: the one plan.

Like Postfix's ``master.cf``, this is where a reader sees the whole node; the modules named
do the work. ``main.run`` (one process) and ``supervisor.Supervisor`` (a supervisor and its
worker processes) follow the same phases; ``app.Node`` builds the parts below with the
builders of this module, and ``Operations`` (server/operations.py) wraps them.

Start::

    phase          as       what                                    where
    1 preflight    root     [server] user checked, systemd sockets  Operations(cfg)
                            taken, ACME challenge port
    2 bind         root     LISTENERS, metrics, MTA-STS sockets     bind_listeners
    3 certificate  root     tls.cert_file outside the data dir      main.configured_context
    4 give away    root     data dir, Maildir root, log file        Operations.give_away
    5 lazy data    root     DNS record types, public suffixes       operations.load_lazy_data
                            [sieve] before/after scripts            sieve_delivery.preload
    6 drop         -> user  setgid/setuid, then the ACME order and  privileges.drop
                            the self-signed certificate (a child)   certificate_around_drop
    ---- below, the service user: the data directory is theirs to change ----
    7 store        user     directory, committer (spool recovered), Node.__init__
                            queue
    8 policies     user     counters (make_counters), logins        Node.__init__
                            (authenticator), MSA, sender auth,
                            milters (server/milters.py),
                            connection_limiter,
                            stress guard, inbound_policy, and the
                            profile's seams (server/profile.py)
    9 engines      user     LISTENERS in order: SMTP (server/smtp), Node.start
                            POP3 (server/pop3), IMAP
                            (server/imap) and ManageSieve
                            (server/managesieve) over those parts
    10 delivery    user     MTA-STS policy listener, queue owner    Node.start
                            lock, delivery worker (once per node:
                            the primary worker)
    11 operations  user     metrics endpoint, control socket,       Operations.started
                            SIGHUP/SIGUSR1, systemd READY=1

Stop, the reverse: STOPPING=1; listeners stop accepting and drain (``shutdown_grace``);
SMTP, POP3, IMAP, MTA-STS closed; delivery stopped; committer flushed; authenticator, sender
auth, inbound, directory closed; queue released; counters closed; then the operations
(control socket, metrics, signal handlers) in ``Operations.stopped``.

Why the split at the drop: a compromised service account must not get root's power, so
root binds, reads the configuration and a certificate that may be root's alone, hands the
data directory over, loads what libraries read lazily (a Python in root's home is
unreadable afterwards) and drops; nothing in the data directory is opened as root
(tests/server/test_privilege_drop.py).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailfort.config import Config
from mailfort.delivery.mx import make_resolver
from mailfort.policy.counters import (
    Counters,
    CounterStore,
    FallbackCounters,
    LocalCounters,
)
from mailfort.policy.dnsbl import DNSBLChecker
from mailfort.policy.greylist import Greylist, GreylistSettings, GreylistStore
from mailfort.policy.inbound import InboundPolicy, zones
from mailfort.server.acceptor import bind
from mailfort.server.connections import (
    ConnectionLimiter,
    SharedConnectionLimiter,
    limit_exceptions,
)
from mailfort.store.maildrop_lock import MaildropLocks, NodeLocks

if TYPE_CHECKING:
    from mailfort.server.connections import ConnectionTable


# ------------------------------------------------------------------ 9 engines: the listeners

@dataclass(frozen=True)
class ListenerPlan:
    """One row of the node's services: a ``[listen]`` key and how its engine is set."""

    name: str  # the [listen] key (addresses), the metrics and log name
    engine: str  # "smtp", "pop3", "imap" or "managesieve"
    implicit_tls: bool = False  # TLS from the first octet (465, 995, 993)
    auth: bool = False  # SMTP: AUTH offered and required before MAIL (submission)
    plaintext_on_loopback: bool = False  # server.allow_plaintext_auth_on_loopback applies
    inbound: bool = False  # SMTP: DNSBL, pre-greeting, greylisting, SPF/DKIM/DMARC (MX)


# In start order. privileges.LISTEN_KEYS names the same keys (test_node_plan.py checks).
LISTENERS: tuple[ListenerPlan, ...] = (
    ListenerPlan("mx", "smtp", inbound=True),
    ListenerPlan("submission", "smtp", auth=True, plaintext_on_loopback=True),
    ListenerPlan("submissions", "smtp", implicit_tls=True, auth=True),
    ListenerPlan("pop3", "pop3", plaintext_on_loopback=True),
    ListenerPlan("pop3s", "pop3", implicit_tls=True, plaintext_on_loopback=True),
    ListenerPlan("imap", "imap", plaintext_on_loopback=True),
    ListenerPlan("imaps", "imap", implicit_tls=True, plaintext_on_loopback=True),
    ListenerPlan("managesieve", "managesieve", plaintext_on_loopback=True),
)


# ------------------------------------------------------------------ 2 bind (root)

def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


def bind_address(hostport: str) -> socket.socket:
    """A listening socket on HOST:PORT (IPv6 in brackets)."""
    return bind(*_split(hostport))


def bind_listeners(cfg: Config, inherited: dict[tuple[str, int], socket.socket]
                   ) -> dict[tuple[str, int], socket.socket]:
    """Every ``[listen]`` address of LISTENERS, listening: the ``inherited`` ones (systemd
    socket activation) as they are, the others bound here."""
    out: dict[tuple[str, int], socket.socket] = {}
    try:
        for plan in LISTENERS:
            for i, hostport in enumerate(getattr(cfg.listen, plan.name)):
                given = inherited.get((plan.name, i))
                if given is not None:
                    given.setblocking(False)
                out[(plan.name, i)] = given if given is not None else bind_address(hostport)
    except BaseException:
        for s in out.values():
            s.close()
        raise
    return out


# ------------------------------------------------------------------ 8 policies

def make_counters(
    cfg: Config, local: CounterStore
) -> tuple[Counters, Counters, MaildropLocks]:
    """(counters of the logins, counters of the throttles, POP3 maildrop locks).

    With ``[counters] backend = "redis"`` the logins count in Redis alone (refused for
    now while it is down: policy/authn.py says why), the throttles fall back to ``local``
    (``FallbackCounters``), and the maildrop lock holds across nodes."""
    c = cfg.counters
    if c.backend != "redis":
        mine = LocalCounters(local)
        return mine, mine, NodeLocks()
    from mailfort.policy.redis_counters import RedisCounters, connect
    from mailfort.store.maildrop_lock import RedisLocks

    client = connect(c.url, c.password())
    shared = RedisCounters(client, prefix=c.key_prefix)
    return shared, FallbackCounters(shared, local), RedisLocks(client, prefix=c.key_prefix,
                                                              ttl=c.pop3_lease_seconds)


def connection_limiter(cfg: Config, counters: CounterStore) -> ConnectionLimiter:
    """One count of connections for the whole node (a single process), shared by every
    listener. Decided at accept, without a network round trip: per node even with
    [counters] in Redis (each node protects its own sockets; the logins are shared)."""
    lim = cfg.limits
    return ConnectionLimiter(
        lim.max_connections, lim.max_connections_per_ip,
        rate_per_minute=lim.max_connection_rate_per_ip, counters=counters,
        exempt=limit_exceptions(lim.connection_limit_exceptions, cfg.relay.trusted_networks))


def shared_connection_limiter(cfg: Config, table: ConnectionTable, row: int,
                              counters: CounterStore) -> SharedConnectionLimiter:
    """The same count for a worker process: its ``row`` of the table the supervisor
    mapped before forking, summed with the other workers' at every accept."""
    lim = cfg.limits
    return SharedConnectionLimiter(
        table, row, lim.max_connections, lim.max_connections_per_ip,
        rate_per_minute=lim.max_connection_rate_per_ip, counters=counters,
        exempt=limit_exceptions(lim.connection_limit_exceptions, cfg.relay.trusted_networks))


def inbound_policy(cfg: Config, directory: object = None) -> InboundPolicy:
    """The MX's anti-abuse checks as configured (each part only when switched on).
    Greylisting state lives with a PostgreSQL ``directory`` when there is one (shared by
    the nodes), else in ``<data_dir>/greylist.sqlite3``."""
    bl = cfg.dnsbl
    checker = None
    if bl.zones or bl.sender_zones or bl.helo_zones:
        checker = DNSBLChecker(make_resolver(cfg), zones(bl.zones), threshold=bl.threshold,
                               timeout=bl.timeout, cache_size=bl.cache_size)
    greylist: GreylistStore | None = None
    if cfg.greylist.enabled:
        g = cfg.greylist
        settings = GreylistSettings(g.delay, g.retry_window, g.pass_lifetime,
                                    g.auto_allow_after)
        pool = getattr(directory, "pool", None)
        if pool is not None:
            from mailfort.policy.greylist_pg import PostgreSQLGreylist

            greylist = PostgreSQLGreylist(pool, settings)
        else:
            greylist = Greylist(cfg.data_path / "greylist.sqlite3", settings)
    return InboundPolicy(cfg, checker, greylist)
