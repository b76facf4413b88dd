"""Configuration: one TOML file, every key validated at start.

The schema is a tree of frozen dataclasses; the loader walks it generically, so a wrong
key or a wrong type is reported with its dotted name and what is allowed. Checks that
span several keys (open-relay networks) live in ``validate``; what serve would refuse
beyond the file itself (unreadable files, unknown accounts, missing extras, listeners that
clash) in ``preflight``, which ``serve`` and ``config check`` both run.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mailfort.protocol.errors import Slowdown


class ConfigError(ValueError):
    """A configuration key is unknown or its value is not allowed."""


def default_hostname() -> str:
    """The machine's fully qualified name (as an MTA's own name is by default); its short
    name when the resolver only knows it as localhost. Never the software's name."""
    fqdn = socket.getfqdn()
    if fqdn and not fqdn.startswith("localhost"):
        return fqdn
    return socket.gethostname() or fqdn or "localhost"


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = field(default_factory=default_hostname)
    data_dir: str = "./mailfort-data"
    # The Maildir root; empty: "mail" under data_dir. Several nodes point it at one shared
    # filesystem (Maildir's unique names and rename delivery need no lock across them).
    mail_dir: str = ""
    # Plaintext AUTH / USER+PASS may be allowed on loopback listeners only; off by default.
    allow_plaintext_auth_on_loopback: bool = False
    # Started as root, mailfort binds its listeners, then runs as this user (and group:
    # empty means the user's own group) for good. Empty: no switch (see server/privileges.py).
    user: str = ""
    group: str = ""
    # Worker processes sharing the listeners; 0: one per CPU. 1 runs a single process.
    workers: int = 0
    # Seconds that SIGTERM lets open sessions finish before they get a 421 / -ERR.
    shutdown_grace: float = 10.0


@dataclass(frozen=True)
class DirectoryConfig:
    # "sqlite": the embedded file in data_dir (one node); "postgresql": one database that
    # several nodes share (schema made by `mailfort db migrate`).
    backend: str = "sqlite"
    # postgresql://USER@HOST:PORT/DBNAME, without a password: that comes from
    # password_file, or from the environment variable MAILFORT_DIRECTORY_PASSWORD.
    url: str = ""
    password_file: str = ""
    pool_size: int = 10
    # Seconds to wait for a connection from the pool, and for one statement.
    timeout: float = 5.0


@dataclass(frozen=True)
class StoreConfig:
    # How a batch of messages is made durable before its 250s: "syncfs" (one flush of the
    # filesystem per batch: fastest where mailfort has its disk to itself) or "fsync" (each
    # file and directory on its own: flushes nothing of other programs on a shared disk).
    flush: str = "syncfs"
    # How IMAP sessions learn of changes made elsewhere (server/mailbox_watch.py): inotify on
    # this machine, Redis of [counters] across nodes, and a stat poll of subscribed mailboxes
    # as the last resort. "auto": poll what inotify cannot watch, and everything when
    # mail_dir is on a network file system without Redis; "always"; "never".
    watch_poll: str = "auto"
    watch_poll_interval: float = 0.5  # seconds between two polls


@dataclass(frozen=True)
class TLSConfig:
    # Empty: a self-signed certificate is generated in data_dir on first start.
    cert_file: str = ""
    key_file: str = ""
    min_version: str = "TLSv1.2"
    # ACME (RFC 8555): a certificate for server.hostname from a CA (Let's Encrypt by
    # default), HTTP-01 answered on acme_http_listen, renewed acme_renew_days before expiry.
    acme: bool = False
    acme_directory: str = "https://acme-v02.api.letsencrypt.org/directory"
    acme_email: str = ""
    acme_http_listen: str = "0.0.0.0:80"
    acme_ca_file: str = ""  # CA bundle to trust for the directory's HTTPS (tests, private CAs)
    acme_renew_days: int = 30


@dataclass(frozen=True)
class ListenConfig:
    mx: list[str] = field(default_factory=lambda: ["127.0.0.1:2525"])
    submission: list[str] = field(default_factory=lambda: ["127.0.0.1:2587"])
    submissions: list[str] = field(default_factory=lambda: ["127.0.0.1:2465"])
    pop3: list[str] = field(default_factory=lambda: ["127.0.0.1:2110"])
    pop3s: list[str] = field(default_factory=lambda: ["127.0.0.1:2995"])
    imap: list[str] = field(default_factory=lambda: ["127.0.0.1:2143"])
    imaps: list[str] = field(default_factory=lambda: ["127.0.0.1:2993"])
    # ManageSieve (RFC 5804): 4190 in production, STARTTLS before AUTHENTICATE.
    managesieve: list[str] = field(default_factory=lambda: ["127.0.0.1:24190"])


@dataclass(frozen=True)
class StressSettings:
    """What server/stress.py's guard runs with (``LimitsConfig.stress`` makes it). Here, not
    in server/, because settings are config's: config imports no layer above it."""

    threshold: float = 0.8  # fraction of max_connections; 0 disables stress mode
    idle_timeout: float = 10.0  # seconds without progress under stress
    max_errors: int = 3  # error limit of sessions opened under stress
    # A full table ends a session only once it has made no progress for this long. 0: the
    # least recently active one, however recent: a flood of fresh connections must not
    # keep a legitimate newcomer out (a session that is talking stays at the newest end).
    evict_after: float = 0.0


@dataclass(frozen=True)
class LimitsConfig:
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    # Errors in a session: past soft_errors each negative reply is held error_delay seconds
    # longer than the last (at most max_error_delay); past max_errors the session ends.
    max_errors: int = 20
    soft_errors: int = 10
    error_delay: float = 0.5
    max_error_delay: float = 5.0
    max_received_headers: int = 50
    idle_timeout: float = 300.0
    session_timeout: float = 3600.0
    max_connections: int = 5000
    max_connections_per_ip: int = 50
    # New connections per client (IPv4 address, IPv6 /64) per minute, node-wide; 0: no limit.
    max_connection_rate_per_ip: int = 0
    # Clients the two per-address limits above do not count (as Postfix's
    # smtpd_client_connection_limit_exceptions): networks, or "loopback" and
    # "trusted_networks" (relay.trusted_networks). The node-wide max_connections still holds.
    connection_limit_exceptions: list[str] = field(
        default_factory=lambda: ["loopback", "trusted_networks"])
    pop3_idle_timeout: float = 600.0
    # IMAP: seconds without a command before login, once logged in (RFC 9051 §5.4: at least
    # 30 minutes after login), and during IDLE (RFC 2177: clients re-IDLE within 29 minutes).
    imap_login_timeout: float = 60.0
    imap_timeout: float = 1800.0
    imap_idle_timeout: float = 1800.0
    # ManageSieve: seconds without a command before login, and once logged in.
    managesieve_login_timeout: float = 60.0
    managesieve_timeout: float = 600.0
    # IMAP sessions one user may hold on a node at once; past it LOGIN gets NO [LIMIT].
    imap_sessions_per_user: int = 20
    # The largest message APPEND takes (APPENDLIMIT); larger is refused NO [TOOBIG] before
    # a byte of it is sent.
    imap_append_limit: int = 25 * 1024 * 1024
    # Each user's quota over all their mailboxes, in octets and in messages (0: none):
    # reported over IMAP (GETQUOTAROOT, RFC 9208) and enforced for APPEND, COPY and MOVE
    # ([OVERQUOTA]), and at RCPT on MX and submission (452 4.2.2, policy/quota.py).
    mailbox_quota: int = 0
    mailbox_quota_messages: int = 0
    # Stress mode (server/stress.py): past stress_threshold of max_connections (0: never),
    # a session must make progress every stress_idle_timeout seconds, new sessions get
    # stress_max_errors, and a full table ends its oldest idle session before refusing.
    stress_threshold: float = 0.8
    stress_idle_timeout: float = 10.0
    stress_max_errors: int = 3
    # Milter conversations at once on this node (its worker processes share them out); a
    # message over it waits up to milter_wait seconds for one, then its milter's on_error.
    max_milter_connections: int = 64
    milter_wait: float = 2.0

    @property
    def stress(self) -> StressSettings:
        return StressSettings(self.stress_threshold, self.stress_idle_timeout,
                              self.stress_max_errors)

    @property
    def error_slowdown(self) -> Slowdown | None:
        if self.error_delay == 0 or self.max_error_delay == 0:
            return None
        return Slowdown(self.soft_errors, self.error_delay, self.max_error_delay)


@dataclass(frozen=True)
class AuthConfig:
    # Failures (per client, and per account) before delays start; per client before a
    # block. An account is only ever slowed down, never blocked (policy/authn.py).
    delay_after_failures: int = 3
    block_after_failures: int = 10
    block_seconds: float = 900.0
    failure_delay: float = 1.0


@dataclass(frozen=True)
class SubmissionConfig:
    # Per user, each taken at MAIL / RCPT and given back unless the message gets its 250;
    # past either: 452 4.7.1 (a compromised account sends no more than this).
    messages_per_hour: int = 200
    recipients_per_hour: int = 500
    max_recipients: int = 50  # per message
    # Whether an alias whose targets include the user lets that user send as the alias.
    aliases_grant_sending: bool = True


@dataclass(frozen=True)
class RelayConfig:
    # Networks allowed to relay without AUTH. Empty by default. Only private, loopback and
    # link-local space (10/8, 172.16/12, 192.168/16, 127/8, 169.254/16, fc00::/7, fe80::/10,
    # ::1), written without host bits; 0.0.0.0/0 and ::/0 are refused.
    trusted_networks: list[str] = field(default_factory=list)
    # Public networks of trusted_networks, named a second time: trusted all the same (a
    # typo such as 11.0.0.0/8 for 10.0.0.0/8 is refused, not trusted).
    i_know_these_are_public: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DNSConfig:
    # Empty: the system resolver. Tests point this at their own DNS server on loopback.
    nameservers: list[str] = field(default_factory=list)
    port: int = 53
    timeout: float = 5.0


@dataclass(frozen=True)
class SenderAuthConfig:
    # SPF, DKIM and DMARC of mail received on the MX, reported in one Authentication-Results
    # field. DNS failures never refuse mail: the result is temperror and the mail is accepted.
    enabled: bool = True
    # An SPF "fail" (-all) of MAIL FROM or HELO: "mark" (reported only) or "reject" (550 5.7.23
    # at MAIL FROM). "mark" by default: DMARC decides on the whole (RFC 7489 §10.1).
    spf_fail: str = "mark"
    # Honour the sender domain's DMARC policy: p=reject -> 550 5.7.1 at end of data,
    # p=quarantine -> as below. false: only report.
    dmarc_enforce: bool = True
    # p=quarantine: "header" (add quarantine_header) or "junk" (that too, and file the mail
    # into the recipient's Maildir++ folder .Junk).
    quarantine: str = "header"
    quarantine_header: str = "X-Quarantine"
    # Seconds of DNS one SPF evaluation may take in all (RFC 7208 §4.6.4 suggests 20).
    spf_time_budget: float = 20.0
    # Messages larger than this are not DKIM-verified (dkim=neutral) nor signed: dkimpy holds
    # the message in memory while it works.
    dkim_max_bytes: int = 10 * 1024 * 1024
    # DKIM-sign what authenticated users submit, with every key of the From: domain
    # (``mailfort dkim keygen``); a domain without keys is sent unsigned.
    sign_submissions: bool = True


@dataclass(frozen=True)
class DNSBLZoneConfig:
    zone: str
    weight: int = 1
    # Answers that count as a listing: "127.0.0.2", "127.0.0.2-127.0.0.11", "127.0.0.0/29".
    # Empty: any 127.0.0.0/8 answer but 127.0.0.1 and the 127.255.255.x error codes.
    codes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DNSBLConfig:
    """DNS blocklists (RFC 5782) checked for MX clients; none by default."""

    zones: list[DNSBLZoneConfig] = field(default_factory=list)
    threshold: int = 1  # a client is refused when the weights of its listings reach this
    reject_at: str = "greeting"  # or "rcpt": postmaster@ and abuse@ still accepted
    timeout: float = 2.0  # for all the lookups of one client; then fail open
    cache_size: int = 10000
    # Right-hand-side (domain) lists for the MAIL FROM domain and the HELO name, at RCPT.
    sender_zones: list[DNSBLZoneConfig] = field(default_factory=list)
    helo_zones: list[DNSBLZoneConfig] = field(default_factory=list)


@dataclass(frozen=True)
class ScreenConfig:
    """Before the MX banner: how long a client is watched (one that talks is refused)."""

    greeting_delay: float = 0.0
    # Clients never screened: no DNSBL, no delay, no greylisting (relay.trusted_networks too).
    allow_networks: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class GreylistConfig:
    """Greylisting (RFC 6647) of MX recipients; off by default."""

    enabled: bool = False
    delay: float = 300.0
    retry_window: float = 2 * 86400.0
    pass_lifetime: float = 36 * 86400.0
    auto_allow_after: int = 5  # passed triplets before a client network is allowed; 0: never


@dataclass(frozen=True)
class QueueConfig:
    max_lifetime: float = 5 * 86400.0
    delay_warning_after: float = 4 * 3600.0
    initial_retry: float = 300.0
    max_retry: float = 4 * 3600.0
    workers: int = 20
    # Connections at once to one destination domain: a slow or silent destination then
    # holds at most this many of the ``workers``, and the other domains keep flowing.
    destination_concurrency: int = 5
    connect_timeout: float = 30.0  # TCP connect and the greeting
    # Each reply after the greeting (RFC 5321 §4.5.3.2 gives 5 minutes for most, 10 for
    # the end of data); a host that stops answering is given up after this long.
    command_timeout: float = 300.0
    # Port of the MX hosts found in DNS: 25 on the Internet; tests and the lab use another.
    mx_port: int = 25


TLS_LEVELS = ("may", "encrypt", "verify")


@dataclass(frozen=True)
class DeliveryConfig:
    """Outbound TLS: how much protection each destination's mail gets on the way."""

    # The least every outbound delivery gets: "may" (STARTTLS when offered), "encrypt"
    # (no TLS: defer, never send in clear) or "verify" (certificate must chain to a trusted
    # CA and match the MX host name, else defer).
    tls_floor: str = "may"
    # destination domain -> "may" | "encrypt" | "verify"; never weaker than tls_floor.
    tls_policy: dict[str, str] = field(default_factory=dict)
    # PEM CA bundle for "verify" and MTA-STS checks; empty: the system's trust store.
    ca_file: str = ""
    # MTA-STS (RFC 8461): fetch and honour the destination's policy.
    mta_sts: bool = True
    # PEM CA bundle for fetching MTA-STS policies over HTTPS; empty: ca_file, else system.
    mta_sts_ca_file: str = ""
    # FOR TESTS AND THE LAB ONLY: the HTTPS port of mta-sts.DOMAIN (443 on the Internet)
    # and fixed addresses for policy hosts (host -> IP; only loopback is accepted).
    mta_sts_port: int = 443
    mta_sts_addresses: dict[str, str] = field(default_factory=dict)
    # DANE (RFC 7672): TLSA records trusted when the configured resolver sets AD.
    dane: bool = True
    # TLS-RPT (RFC 8460): record TLS failures per policy domain in data_dir.
    tls_reports: bool = True
    # FOR TESTS AND THE LAB ONLY: deliver to an MX (or A/AAAA fallback, or address literal)
    # of a foreign domain that resolves to a loopback, private, link-local or other
    # non-public address. Off, such mail is refused (5.4.4), so the queue cannot be used to
    # reach internal services; a configured [routes] entry may always point inward.
    allow_private_destinations: bool = False


@dataclass(frozen=True)
class LogConfig:
    # "text": one readable line per event; "json": one JSON object per line.
    format: str = "text"
    # Empty: stderr (journald under systemd). A file is reopened on SIGUSR1 and when it is
    # moved away (logrotate without copytruncate).
    file: str = ""
    level: str = "info"


@dataclass(frozen=True)
class CountersConfig:
    # Where brute-force, rate and connection counts live: "memory" (this node: in the
    # process, or with [server] workers above 1 in one SQLite file that its worker
    # processes share) or "redis" (shared by every node that names the same Redis).
    backend: str = "memory"
    # redis://HOST:PORT/DB (or rediss:// for TLS), without a password in it.
    url: str = ""
    # The Redis password: read from this file, or from this environment variable; never
    # in the configuration itself, on a command line or in a log.
    password_file: str = ""
    password_env: str = ""
    # Every key of this node group starts with it (one Redis may serve several groups).
    key_prefix: str = "mailfort:"
    # Seconds a POP3 maildrop lease lives without renewal (renewed every third of it): how
    # long a maildrop stays locked after the node holding it died.
    pop3_lease_seconds: float = 30.0

    def password(self) -> str | None:
        """The secret, read when connecting (so a rotated file is picked up on restart)."""
        if self.password_file:
            try:
                return Path(self.password_file).read_text().strip() or None
            except OSError as exc:
                raise ConfigError(f"counters.password_file: cannot read: {exc.strerror}") \
                    from None
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(f"counters.password_env: {self.password_env} is not set")
            return value or None
        return None


@dataclass(frozen=True)
class MetricsConfig:
    # HOST:PORT of the Prometheus endpoint (e.g. "127.0.0.1:9465"); empty: no endpoint.
    listen: str = ""


@dataclass(frozen=True)
class MTASTSConfig:
    """Serving our own MTA-STS policy (RFC 8461 §3.3) at
    ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``, with the certificate of [tls] (which
    must then name mta-sts.DOMAIN for each domain). ``mailfort mta-sts policy`` prints the
    matching TXT record."""

    # HOST:PORT of the HTTPS listener (e.g. "0.0.0.0:443"); empty: the policy is not served
    # (nor the mail clients' autoconfig file of [client_setup]).
    listen: str = ""
    mode: str = "enforce"  # "enforce" | "testing" | "none"
    mx: list[str] = field(default_factory=list)  # MX names or *.patterns; empty: hostname
    max_age: int = 604800


@dataclass(frozen=True)
class ClientSetupConfig:
    """What mail clients are told so that a user types only an address and a password:
    the autoconfig file (served on the [mta_sts] listen HTTPS listener, which must then be
    set, with a certificate naming autoconfig.DOMAIN) and the RFC 6186 SRV records that
    ``mailfort dns check`` asks for. These are the public name and ports, which may differ
    from [listen]'s (a firewall forwards 993 to the embedded 2993). A service is told only
    when its port here is not 0 and its [listen] list is not empty."""

    hostname: str = ""  # the name clients connect to; empty: server.hostname
    autoconfig: bool = True  # serve config-v1.1.xml when [mta_sts] listen is set
    imaps: int = 993  # implicit TLS (RFC 8314: preferred)
    imap: int = 143  # STARTTLS
    pop3s: int = 995
    pop3: int = 110
    submissions: int = 465
    submission: int = 587
    managesieve: int = 4190


@dataclass(frozen=True)
class SRSConfig:
    """Forwarded mail (an alias to a remote address) leaves with an SRS envelope sender of
    ours (policy/srs.py), so that SPF passes at its destination; bounces to it come back."""

    enabled: bool = True
    # The domain of the rewritten senders (its MX must be this server); empty: the domain
    # of the alias that forwarded the mail.
    domain: str = ""
    # Days a bounce to a rewritten sender is accepted (at most 1000).
    max_age_days: int = 21


MILTER_SERVICES = ("mx", "submission", "submissions")


@dataclass(frozen=True)
class MilterConfig:
    """One content filter spoken to through the milter protocol (rspamd's proxy worker in
    milter mode, clamav-milter...), asked at the end of DATA/BDAT before the 250, in the
    order of the ``[[milter]]`` entries."""

    # "inet:HOST:PORT" (IPv6 as inet:[::1]:PORT) or "unix:/absolute/path"
    address: str
    # The filter unreachable, too slow or broken: "tempfail" (451 4.7.1: the client retries,
    # nothing goes in unfiltered) or "accept" (the message goes on without this filter).
    on_error: str = "tempfail"
    # The SMTP listeners where it acts.
    services: list[str] = field(default_factory=lambda: list(MILTER_SERVICES))
    connect_timeout: float = 5.0  # TCP or unix connect
    command_timeout: float = 30.0  # each reply (a filter's "progress" restarts it)
    message_timeout: float = 120.0  # the whole conversation about one message
    # Keep a filter connection for the next message (QUIT_NC, then the next client):
    # "continue" after a message the filter ended with CONTINUE (every libmilter filter
    # takes QUIT_NC there), "always" after any verdict (rspamd: it resets in any state),
    # "never" (a connection per message).
    reuse: str = "continue"


@dataclass(frozen=True)
class SieveConfig:
    """Server-side filtering (RFC 5228) of mail delivered to local users, scripts managed
    over ManageSieve (RFC 5804). Per-user scripts live beside each Maildir
    (store/sieve_scripts.py); ``before``/``after`` are the administrator's scripts, run for
    every local recipient before and after the user's own (paths read as root at start)."""

    enabled: bool = True
    before: str = ""  # path of a global script run before the user's ("" = none)
    after: str = ""  # path of a global script run after the user's ("" = none)
    max_script_size: int = 65536  # bytes of one script (PUTSCRIPT over it: NO (QUOTA/MAXSIZE))
    max_scripts: int = 16  # scripts per user
    max_storage: int = 262144  # bytes of all of a user's scripts
    max_actions: int = 32  # actions one run may take (fileinto, redirect, vacation...)
    max_redirects: int = 4  # redirect actions one run may take
    redirects_per_day: int = 100  # redirects one user's scripts may send in 24 hours
    max_cpu_ms: int = 200  # time one run may take (regex and body tests included)
    vacation_min_days: int = 1  # the smallest :days (or :seconds) a script may ask
    vacation_max_days: int = 30
    vacation_default_days: int = 7


ROUTE_TLS = ("may", "starttls", "implicit")


@dataclass(frozen=True)
class Route:
    """Where to deliver mail for one domain instead of its MX (smarthost or fixed host).

    ``tls``: "starttls" (STARTTLS required) or "implicit" (TLS from the first byte, port
    465), both with the certificate verified against ``host`` (``cafile``, else the
    system's trust store); "may" is STARTTLS when offered, unverified, as for any MX.
    Unset: "starttls" when ``require_tls`` or ``auth_user`` is set (a password never
    leaves without verified TLS), else "may" (what a route was before these keys).
    ``auth_password_file`` is read by the service user at each connection that logs in.
    """

    host: str
    port: int = 25
    require_tls: bool = False  # the older spelling of tls = "starttls"
    tls: str = ""
    auth_user: str = ""
    auth_password_file: str = ""
    cafile: str = ""

    @property
    def tls_mode(self) -> str:
        """The effective ``tls`` (see the class docstring for the default)."""
        if self.tls:
            return self.tls
        return "starttls" if self.require_tls or self.auth_user else "may"

    @property
    def verified(self) -> bool:
        return self.tls_mode in ("starttls", "implicit")


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    sender_auth: SenderAuthConfig = field(default_factory=SenderAuthConfig)
    dnsbl: DNSBLConfig = field(default_factory=DNSBLConfig)
    screen: ScreenConfig = field(default_factory=ScreenConfig)
    greylist: GreylistConfig = field(default_factory=GreylistConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    counters: CountersConfig = field(default_factory=CountersConfig)
    # domain -> route; "*" is the default route for every remote domain.
    routes: dict[str, Route] = field(default_factory=dict)
    # domains on which delivery must use STARTTLS (defer instead of sending in clear).
    require_tls_domains: list[str] = field(default_factory=list)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    mta_sts: MTASTSConfig = field(default_factory=MTASTSConfig)
    client_setup: ClientSetupConfig = field(default_factory=ClientSetupConfig)
    srs: SRSConfig = field(default_factory=SRSConfig)
    # [[milter]] entries: content filters asked in order at the end of data.
    milter: list[MilterConfig] = field(default_factory=list)
    sieve: SieveConfig = field(default_factory=SieveConfig)

    @property
    def data_path(self) -> Path:
        return Path(self.server.data_dir)

    @property
    def mail_path(self) -> Path:
        """The Maildir root: ``server.mail_dir``, else ``<data_dir>/mail``."""
        return Path(self.server.mail_dir) if self.server.mail_dir else self.data_path / "mail"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(item)}")
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table")
        return {str(k): _convert(v, item, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: unsupported schema type")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: Any, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            allowed = ", ".join(sorted(names))
            raise ConfigError(f"{key}: unknown key (allowed here: {allowed})")
        kwargs[k] = _convert(v, hints[k], key)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required key (e.g. routes.X.host) is missing
        raise ConfigError(f"{prefix or 'config'}: {exc}") from None


def _check_hostport(key: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{key}: expected HOST:PORT (e.g. 127.0.0.1:2525), got {value!r}")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ConfigError(f"{key}: {host!r} is not an IP address") from None


def _validate_route(dom: str, route: Route) -> None:
    key = f"routes.{dom}"
    if not 0 < route.port < 65536:
        raise ConfigError(f"{key}.port: must be 1-65535")
    if not route.host or any(c.isspace() for c in route.host):
        raise ConfigError(f"{key}.host: must be a host name or IP address without spaces")
    if route.auth_user and not route.verified:
        raise ConfigError(f"{key}.auth_user: needs tls = \"starttls\" or \"implicit\" "
                          "(a password is never sent without verified TLS)")
    if route.tls and route.tls not in ROUTE_TLS:
        raise ConfigError(f"{key}.tls: allowed values are " + ", ".join(ROUTE_TLS)
                          + " (\"none\" is not one: nothing leaves in clear on request)")
    if route.require_tls and route.tls == "may":
        raise ConfigError(f"{key}: require_tls = true contradicts tls = \"may\"; "
                          "use tls = \"starttls\"")
    if bool(route.auth_user) != bool(route.auth_password_file):
        raise ConfigError(f"{key}: auth_user and auth_password_file: give both or neither")
    if any(c in route.auth_user for c in "\r\n\0"):
        raise ConfigError(f"{key}.auth_user: must not contain control characters")
    # The well-known ports speak one way only: the other one would fail at every attempt.
    if route.tls_mode == "implicit" and route.port in (25, 587):
        raise ConfigError(f"{key}: port {route.port} speaks STARTTLS, not implicit TLS "
                          "(use port = 465, or tls = \"starttls\")")
    if route.tls_mode != "implicit" and route.port == 465:
        raise ConfigError(f"{key}: port 465 speaks implicit TLS (set tls = \"implicit\")")
    if route.cafile and not route.verified:
        raise ConfigError(f"{key}.cafile: only used with tls = \"starttls\" or \"implicit\"")


def validate(cfg: Config) -> Config:
    """Cross-key checks; raises ConfigError naming the key."""
    for name in LISTEN_NAMES:
        for i, hp in enumerate(getattr(cfg.listen, name)):
            _check_hostport(f"listen.{name}[{i}]", hp)
    _validate_relay(cfg.relay)
    lim = cfg.limits
    for k in ("max_message_size", "max_recipients", "max_errors", "max_received_headers",
              "max_connections", "max_connections_per_ip"):
        if getattr(lim, k) <= 0:
            raise ConfigError(f"limits.{k}: must be a positive integer")
    if not 0 <= lim.stress_threshold <= 1:
        raise ConfigError("limits.stress_threshold: must be between 0 (off) and 1")
    if lim.stress_idle_timeout <= 0:
        raise ConfigError("limits.stress_idle_timeout: must be a positive number of seconds")
    if lim.stress_max_errors < 1:
        raise ConfigError("limits.stress_max_errors: must be 1 or more")
    if lim.max_connection_rate_per_ip < 0:
        raise ConfigError("limits.max_connection_rate_per_ip: must be 0 (no limit) or more")
    _validate_limit_exceptions(lim.connection_limit_exceptions)
    for k in ("idle_timeout", "session_timeout", "pop3_idle_timeout", "imap_login_timeout",
              "imap_timeout", "imap_idle_timeout", "managesieve_login_timeout",
              "managesieve_timeout"):
        if getattr(lim, k) <= 0:
            raise ConfigError(f"limits.{k}: must be a positive number of seconds")
    for k in ("imap_sessions_per_user", "imap_append_limit"):
        if getattr(lim, k) <= 0:
            raise ConfigError(f"limits.{k}: must be a positive integer")
    for k in ("mailbox_quota", "mailbox_quota_messages"):
        if getattr(lim, k) < 0:
            raise ConfigError(f"limits.{k}: must be 0 (no quota) or a positive integer")
    if not 0 <= lim.soft_errors <= lim.max_errors:
        raise ConfigError("limits.soft_errors: must be between 0 and limits.max_errors")
    for k in ("error_delay", "max_error_delay"):
        if getattr(lim, k) < 0:
            raise ConfigError(f"limits.{k}: must be zero or a positive number of seconds")
    if cfg.store.flush not in ("syncfs", "fsync"):
        raise ConfigError("store.flush: allowed values are syncfs and fsync")
    if cfg.store.watch_poll not in ("auto", "always", "never"):
        raise ConfigError("store.watch_poll: allowed values are auto, always and never")
    if not 0.05 <= cfg.store.watch_poll_interval <= 60:
        raise ConfigError("store.watch_poll_interval: between 0.05 and 60 seconds")
    if cfg.tls.min_version not in ("TLSv1.2", "TLSv1.3"):
        raise ConfigError("tls.min_version: allowed values are TLSv1.2 and TLSv1.3")
    if bool(cfg.tls.cert_file) != bool(cfg.tls.key_file):
        raise ConfigError("tls.cert_file / tls.key_file: give both or neither")
    if cfg.tls.acme:
        if cfg.tls.cert_file:
            raise ConfigError("tls.acme: the certificate comes from ACME; remove "
                              "tls.cert_file / tls.key_file, or set acme = false")
        _check_hostport("tls.acme_http_listen", cfg.tls.acme_http_listen)
        if not cfg.tls.acme_directory.startswith("https://"):
            raise ConfigError("tls.acme_directory: must be an https:// URL")
        if not 0 < cfg.tls.acme_renew_days < 90:
            raise ConfigError("tls.acme_renew_days: must be between 1 and 89")
    _validate_delivery(cfg.delivery)
    for dom, route in cfg.routes.items():
        _validate_route(dom, route)
        # The default made explicit: ``config check`` shows the TLS each route gets.
        cfg.routes[dom] = dataclasses.replace(route, tls=route.tls_mode)
    if not cfg.server.hostname or " " in cfg.server.hostname:
        raise ConfigError("server.hostname: must be a host name without spaces")
    if not cfg.server.data_dir:
        raise ConfigError("server.data_dir: must not be empty")
    _validate_directory(cfg.directory)
    if not 0 <= cfg.server.workers <= 256:
        raise ConfigError("server.workers: 0 (one per CPU) to 256")
    if not 0 <= cfg.server.shutdown_grace <= 3600:
        raise ConfigError("server.shutdown_grace: must be between 0 and 3600 seconds")
    _validate_auth(cfg.auth)
    for k in ("messages_per_hour", "recipients_per_hour", "max_recipients"):
        if getattr(cfg.submission, k) <= 0:
            raise ConfigError(f"submission.{k}: must be a positive integer")
    if not 0 < cfg.dns.port < 65536:
        raise ConfigError("dns.port: must be 1-65535")
    _validate_nameservers(cfg.dns)
    for k in ("workers", "destination_concurrency"):
        if getattr(cfg.queue, k) <= 0:
            raise ConfigError(f"queue.{k}: must be a positive integer")
    for k in ("connect_timeout", "command_timeout"):
        if getattr(cfg.queue, k) <= 0:
            raise ConfigError(f"queue.{k}: must be a positive number of seconds")
    _validate_sender_auth(cfg.sender_auth)
    _validate_milters(cfg)
    _validate_sieve(cfg.sieve)
    _validate_antiabuse(cfg)
    _validate_operations(cfg)
    _validate_counters(cfg.counters)
    if not 1 <= cfg.srs.max_age_days <= 1000:  # the day stamp wraps after 1024 days
        raise ConfigError("srs.max_age_days: must be between 1 and 1000")
    if cfg.srs.domain and not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?",
                                           cfg.srs.domain):
        raise ConfigError(f"srs.domain: {cfg.srs.domain!r} is not a domain name")
    return cfg


# Address space no stranger on the Internet sends from: private (RFC 1918, RFC 4193),
# loopback and link-local. Not 100.64.0.0/10 (RFC 6598): a carrier shares it among all its
# customers behind one NAT, so trusting it trusts them. Nor documentation or NAT64 space.
_OWN_V4 = tuple(ipaddress.IPv4Network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16"))
_OWN_V6 = tuple(ipaddress.IPv6Network(n) for n in ("fc00::/7", "fe80::/10", "::1/128"))
_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _relay_network(key: str, net: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``net`` parsed; one too large to be anyone's own is refused, and so are host bits
    (``10.0.0.1/8`` is a typo, or a host meant as /32: either way not what the operator
    believes is trusted)."""
    try:
        loose = ipaddress.ip_network(net, strict=False)
    except ValueError:
        raise ConfigError(f"{key}: {net!r} is not a network (e.g. 192.168.1.0/24)") from None
    if loose.prefixlen < (8 if loose.version == 4 else 32) and _is_public(loose):
        raise ConfigError(f"{key}: {net} would make this server an open relay; "
                          "list only the networks of your own hosts")
    try:
        return ipaddress.ip_network(net, strict=True)
    except ValueError:
        host = net.split("/", 1)[0]
        raise ConfigError(f"{key}: {net} has host bits set; did you mean {loose} "
                          f"(or {host}/{loose.max_prefixlen} for that host alone)?") from None


def _is_public(n: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    """Whether any address of ``n`` lies outside private, loopback and link-local space
    (an IPv4-mapped IPv6 network is judged by its IPv4 addresses)."""
    if isinstance(n, ipaddress.IPv6Network):
        if not n.subnet_of(_V4_MAPPED):
            return not any(n.subnet_of(own) for own in _OWN_V6)
        n = ipaddress.IPv4Network((int(n.network_address) & 0xFFFFFFFF, n.prefixlen - 96))
    return not any(n.subnet_of(own) for own in _OWN_V4)


def _validate_relay(relay: RelayConfig) -> None:
    """The open-relay guard: only our own (non-public) networks relay without AUTH,
    unless a public one is named twice, and never one too large to be anyone's own."""
    trusted = [_relay_network(f"relay.trusted_networks[{i}]", net)
               for i, net in enumerate(relay.trusted_networks)]
    public = set()
    for i, net in enumerate(relay.i_know_these_are_public):
        n = _relay_network(f"relay.i_know_these_are_public[{i}]", net)
        if n not in trusted:
            raise ConfigError(f"relay.i_know_these_are_public[{i}]: {net} is not in "
                              "relay.trusted_networks (name each public entry as written there)")
        public.add(n)
    for i, (net, n) in enumerate(zip(relay.trusted_networks, trusted, strict=True)):
        key = f"relay.trusted_networks[{i}]"
        if _is_public(n) and n not in public:
            raise ConfigError(
                f"{key}: {net} is public address space (not private, loopback or link-local):"
                " every host in it could relay through this server; list only your own "
                "networks, or name it in relay.i_know_these_are_public if you mean it")


_PG_URL = re.compile(r"postgres(?:ql)?://(?P<auth>[^@/]*@)?[^/]*(?:/[^?#]*)?(?:\?.*)?")


LIMIT_EXCEPTION_WORDS = ("loopback", "trusted_networks")
MIN_EXCEPTION_PREFIX = {4: 8, 6: 16}  # 10.0.0.0/8 is the largest a site needs


def _validate_limit_exceptions(entries: list[str]) -> None:
    for i, entry in enumerate(entries):
        if entry in LIMIT_EXCEPTION_WORDS:
            continue
        try:
            net = ipaddress.ip_network(entry)
        except ValueError:
            raise ConfigError(
                f"limits.connection_limit_exceptions[{i}]: {entry!r} is neither a network "
                "(e.g. 192.0.2.0/24, no host bits) nor one of "
                + ", ".join(f'"{w}"' for w in LIMIT_EXCEPTION_WORDS)) from None
        # An exception is for one's own hosts: a prefix this short (0.0.0.0/0 at worst)
        # would lift the limits for a large part of the Internet, which is no exception.
        if net.prefixlen < MIN_EXCEPTION_PREFIX[net.version]:
            raise ConfigError(
                f"limits.connection_limit_exceptions[{i}]: {entry} is too large an "
                f"exception (shortest prefix /{MIN_EXCEPTION_PREFIX[net.version]}); list "
                "your own networks")


def _validate_directory(d: DirectoryConfig) -> None:
    if d.backend not in ("sqlite", "postgresql"):
        raise ConfigError("directory.backend: allowed values are sqlite and postgresql")
    if d.backend == "sqlite":
        if d.url or d.password_file:
            raise ConfigError("directory.url / directory.password_file: only for "
                              'backend = "postgresql"')
        return
    m = _PG_URL.fullmatch(d.url)
    if m is None:
        raise ConfigError("directory.url: expected postgresql://USER@HOST:PORT/DBNAME")
    if ":" in (m.group("auth") or "") or "password=" in d.url.lower():
        # A URL is printed by `config check` and may reach logs: no secret in it.
        raise ConfigError("directory.url: must not hold the password; put it in "
                          "directory.password_file or MAILFORT_DIRECTORY_PASSWORD")
    if d.pool_size < 1:
        raise ConfigError("directory.pool_size: must be 1 or more")
    if d.timeout <= 0:
        raise ConfigError("directory.timeout: must be a positive number of seconds")


def _validate_counters(c: CountersConfig) -> None:
    if c.backend not in ("memory", "redis"):
        raise ConfigError("counters.backend: allowed values are memory and redis")
    if c.backend == "redis":
        if not c.url:
            raise ConfigError("counters.url: required with backend = \"redis\" "
                              "(e.g. redis://127.0.0.1:6379/0)")
        parsed = urlsplit(c.url)
        if parsed.scheme not in ("redis", "rediss", "unix"):
            raise ConfigError("counters.url: must start with redis://, rediss:// or unix://")
        if parsed.password is not None:
            raise ConfigError("counters.url: no password in the URL (it would show in "
                              "`config check` and logs); use counters.password_file or "
                              "counters.password_env")
    if c.password_file and c.password_env:
        raise ConfigError("counters.password_file / counters.password_env: give one")
    if c.pop3_lease_seconds < 1:
        raise ConfigError("counters.pop3_lease_seconds: must be 1 or more (renewed every "
                          "third of it)")


def _validate_operations(cfg: Config) -> None:
    """[log], [metrics] and the service user."""
    if cfg.log.format not in ("text", "json"):
        raise ConfigError("log.format: allowed values are text and json")
    if cfg.log.level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log.level: allowed values are debug, info, warning and error")
    if cfg.metrics.listen:
        _check_hostport("metrics.listen", cfg.metrics.listen)
    m = cfg.mta_sts
    if m.listen:
        _check_hostport("mta_sts.listen", m.listen)
    if m.mode not in ("enforce", "testing", "none"):
        raise ConfigError("mta_sts.mode: allowed values are enforce, testing and none")
    if not 0 < m.max_age <= 31557600:
        raise ConfigError("mta_sts.max_age: must be 1-31557600 seconds (RFC 8461 §3.2)")
    for i, mx in enumerate(m.mx):
        if not mx or any(c.isspace() or not c.isprintable() for c in mx) or len(mx) > 253:
            raise ConfigError(f"mta_sts.mx[{i}]: not a host name or *.pattern: {mx!r}")
    cs = cfg.client_setup
    for name in ("imaps", "imap", "pop3s", "pop3", "submissions", "submission"):
        if not 0 <= getattr(cs, name) < 65536:
            raise ConfigError(f"client_setup.{name}: a port 1-65535, or 0 (not told)")
    if cs.hostname and not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?",
                                        cs.hostname.rstrip(".")):
        raise ConfigError(f"client_setup.hostname: {cs.hostname!r} is not a host name")
    if cfg.server.group and not cfg.server.user:
        raise ConfigError("server.group: set server.user too (the group alone is not a drop)")
    if cfg.server.user == "root" or cfg.server.user == "0":
        raise ConfigError("server.user: must be an unprivileged account, not root")


def _validate_milters(cfg: Config) -> None:
    from mailfort.protocol.milter import parse_address

    lim = cfg.limits
    if cfg.milter and lim.max_milter_connections < 1:
        raise ConfigError("limits.max_milter_connections: must be 1 or more")
    if not 0 <= lim.milter_wait <= 60:
        raise ConfigError("limits.milter_wait: must be between 0 and 60 seconds")
    for i, m in enumerate(cfg.milter):
        key = f"milter[{i}]"
        try:
            kind, where, _ = parse_address(m.address)
        except ValueError:
            raise ConfigError(f"{key}.address: expected inet:HOST:PORT (e.g. "
                              f"inet:127.0.0.1:11332) or unix:/path, got {m.address!r}") from None
        if kind == "unix" and not where.startswith("/"):
            raise ConfigError(f"{key}.address: the unix socket path must be absolute")
        if kind == "inet":
            try:
                ipaddress.ip_address(where)
            except ValueError:
                raise ConfigError(f"{key}.address: {where!r} is not an IP address (a name "
                                  "would be resolved at every message)") from None
        if m.on_error not in ("tempfail", "accept"):
            raise ConfigError(f"{key}.on_error: allowed values are tempfail and accept")
        if m.reuse not in ("continue", "always", "never"):
            raise ConfigError(f"{key}.reuse: allowed values are continue, always and never")
        if not m.services or len(set(m.services)) != len(m.services) or any(
                s not in MILTER_SERVICES for s in m.services):
            raise ConfigError(f"{key}.services: a non-empty list of distinct names among "
                              + ", ".join(MILTER_SERVICES))
        for k in ("connect_timeout", "command_timeout", "message_timeout"):
            if not 0 < getattr(m, k) <= 3600:
                raise ConfigError(f"{key}.{k}: must be between 0 and 3600 seconds")
        if m.message_timeout < m.command_timeout:
            raise ConfigError(f"{key}.message_timeout: must be at least command_timeout")


def _validate_sieve(sv: SieveConfig) -> None:
    for k in ("max_script_size", "max_scripts", "max_storage", "max_actions", "max_cpu_ms"):
        if getattr(sv, k) < 1:
            raise ConfigError(f"sieve.{k}: must be 1 or more")
    if sv.max_script_size > 1 << 20:
        raise ConfigError("sieve.max_script_size: at most 1048576 (1 MiB)")
    if sv.max_storage < sv.max_script_size:
        raise ConfigError("sieve.max_storage: must be at least max_script_size")
    if sv.max_redirects < 0 or sv.redirects_per_day < 0:
        raise ConfigError("sieve.max_redirects, redirects_per_day: 0 or more")
    if not 1 <= sv.vacation_min_days <= sv.vacation_default_days <= sv.vacation_max_days:
        raise ConfigError("sieve: 1 <= vacation_min_days <= vacation_default_days "
                          "<= vacation_max_days")
    for k in ("before", "after"):
        if getattr(sv, k) and not Path(getattr(sv, k)).is_absolute():
            raise ConfigError(f"sieve.{k}: must be an absolute path")


def _validate_sender_auth(sa: SenderAuthConfig) -> None:
    if sa.spf_fail not in ("mark", "reject"):
        raise ConfigError("sender_auth.spf_fail: allowed values are mark and reject")
    if sa.quarantine not in ("header", "junk"):
        raise ConfigError("sender_auth.quarantine: allowed values are header and junk")
    if not re.fullmatch(r"[!-9;-~]{1,76}", sa.quarantine_header):
        raise ConfigError("sender_auth.quarantine_header: must be a header field name")
    if not 0 < sa.spf_time_budget <= 60:
        raise ConfigError("sender_auth.spf_time_budget: must be between 0 and 60 seconds")
    if sa.dkim_max_bytes <= 0:
        raise ConfigError("sender_auth.dkim_max_bytes: must be a positive integer")


def _check_network(key: str, net: str) -> None:
    try:
        ipaddress.ip_network(net, strict=False)
    except ValueError:
        raise ConfigError(f"{key}: {net!r} is not an address or network") from None


def _validate_zones(key: str, zones: list[DNSBLZoneConfig]) -> None:
    from mailfort.protocol.dnsbl_codes import parse_code_range

    for i, z in enumerate(zones):
        k = f"{key}[{i}]"
        name = z.zone.strip(".")
        if not name or " " in name or "." not in name:
            raise ConfigError(f"{k}.zone: expected a DNS zone (e.g. zen.example.org)")
        if z.weight <= 0:
            raise ConfigError(f"{k}.weight: must be a positive integer")
        for j, code in enumerate(z.codes):
            try:
                parse_code_range(code)
            except ValueError:
                raise ConfigError(
                    f"{k}.codes[{j}]: {code!r} is not 127.x.y.z, a range A-B or a network "
                    "in 127.0.0.0/8") from None


def _validate_antiabuse(cfg: Config) -> None:
    bl = cfg.dnsbl
    _validate_zones("dnsbl.zones", bl.zones)
    _validate_zones("dnsbl.sender_zones", bl.sender_zones)
    _validate_zones("dnsbl.helo_zones", bl.helo_zones)
    if bl.threshold <= 0:
        raise ConfigError("dnsbl.threshold: must be a positive integer")
    if bl.reject_at not in ("greeting", "rcpt"):
        raise ConfigError("dnsbl.reject_at: allowed values are greeting and rcpt")
    if not 0 < bl.timeout <= 60:
        raise ConfigError("dnsbl.timeout: must be between 0 and 60 seconds")
    if bl.cache_size < 0:
        raise ConfigError("dnsbl.cache_size: must be 0 (no cache) or more")
    if not 0 <= cfg.screen.greeting_delay <= 60:
        raise ConfigError("screen.greeting_delay: must be between 0 and 60 seconds")
    for i, net in enumerate(cfg.screen.allow_networks):
        _check_network(f"screen.allow_networks[{i}]", net)
    gl = cfg.greylist
    for k in ("retry_window", "pass_lifetime"):
        if getattr(gl, k) <= 0:
            raise ConfigError(f"greylist.{k}: must be a positive number of seconds")
    if gl.delay < 0 or gl.delay >= gl.retry_window:
        raise ConfigError("greylist.delay: must be 0 or more and below greylist.retry_window")
    if gl.auto_allow_after < 0:
        raise ConfigError("greylist.auto_allow_after: must be 0 (never) or more")


def _validate_auth(auth: AuthConfig) -> None:
    """Brute-force protection can be tuned, not switched off by a zero or a typo."""
    if auth.delay_after_failures < 0:
        raise ConfigError("auth.delay_after_failures: must be 0 or more")
    if auth.block_after_failures <= 0:
        raise ConfigError("auth.block_after_failures: must be a positive integer")
    if auth.block_after_failures > 1000:
        raise ConfigError("auth.block_after_failures: at most 1000 (it bounds password guessing)")
    if auth.block_seconds <= 0:
        raise ConfigError("auth.block_seconds: must be a positive number of seconds")
    if not 0 <= auth.failure_delay <= 60:
        raise ConfigError("auth.failure_delay: must be between 0 and 60 seconds")


def _validate_delivery(d: DeliveryConfig) -> None:
    allowed = ", ".join(TLS_LEVELS)
    if d.tls_floor not in TLS_LEVELS:
        raise ConfigError(f"delivery.tls_floor: allowed values are {allowed}")
    for dom, level in d.tls_policy.items():
        if level not in TLS_LEVELS:
            raise ConfigError(f"delivery.tls_policy.{dom}: allowed values are {allowed}")
    if not 0 < d.mta_sts_port < 65536:
        raise ConfigError("delivery.mta_sts_port: must be 1-65535")
    for host, ip in d.mta_sts_addresses.items():
        try:
            loopback = ipaddress.ip_address(ip).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(f"delivery.mta_sts_addresses.{host}: only loopback addresses "
                              "(this override exists for tests and the lab)")


def from_dict(data: dict[str, Any]) -> Config:
    return validate(_build(Config, data, ""))


def load(path: str | Path | None) -> Config:
    """Load and validate a TOML file; ``None`` gives the embedded default."""
    if path is None:
        return validate(Config())
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return from_dict(data)


def effective(cfg: Config) -> dict[str, Any]:
    """The settings in force, as a plain dict (for ``mailfort config check``)."""
    return dataclasses.asdict(cfg)


# -- serve's own refusals (issue 27) ------------------------------------------------------
#
# What the TOML alone cannot tell: files, accounts, installed extras, listeners that clash.
# ``preflight`` is run by both ``mailfort serve`` (before anything is bound) and
# ``mailfort config check``, so that the check refuses exactly what serve would, in the
# same words. Only what is known without binding: a port taken by another program shows at
# serve's bind (server/acceptor.py names the address).

LISTEN_NAMES = ("mx", "submission", "submissions", "pop3", "pop3s", "imap", "imaps",
                "managesieve")

EXTRAS: dict[str, tuple[str, ...]] = {
    # extra -> the modules it installs that mailfort imports
    "postgresql": ("psycopg", "psycopg_pool"),
    "acme": ("josepy", "acme"),
}


def _validate_nameservers(d: DNSConfig) -> None:
    """dnspython takes addresses only; a name there failed at the first lookup."""
    for i, ns in enumerate(d.nameservers):
        try:
            ipaddress.ip_address(ns)
        except ValueError:
            raise ConfigError(f"dns.nameservers[{i}]: {ns!r} must be an IP address "
                              "(e.g. 127.0.0.53 or 2001:db8::53), not a host name") from None


def require_extra(extra: str, why: str) -> None:
    """ConfigError in one line when an optional extra is not installed (never the
    ImportError's traceback, wherever the first import would have happened)."""
    import importlib

    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(f"{why} needs the optional package {module}: install it with: "
                              f"pip install 'mailfort[{extra}]'") from None


def require_directory_extra(cfg: Config) -> None:
    if cfg.directory.backend == "postgresql":
        require_extra("postgresql", 'directory.backend = "postgresql"')


def _listen_address(hostport: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    host, _, port = hostport.rpartition(":")
    return ipaddress.ip_address(host.strip("[]")), int(port)


def _listener_clash(cfg: Config) -> None:
    """Two listeners on one address and port (or one on the wildcard address of the same
    family and port, which Linux refuses as well): the second bind would fail."""
    seen: list[tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = []
    keys = [(f"listen.{name}[{i}]", hp) for name in LISTEN_NAMES
            for i, hp in enumerate(getattr(cfg.listen, name))]
    keys += [(k, v) for k, v in (("metrics.listen", cfg.metrics.listen),
                                 ("mta_sts.listen", cfg.mta_sts.listen),
                                 ("tls.acme_http_listen",
                                  cfg.tls.acme_http_listen if cfg.tls.acme else ""))
             if v]
    for key, hp in keys:
        addr, port = _listen_address(hp)
        if port == 0:  # any free port: never a clash
            continue
        for other, oaddr, oport in seen:
            if port == oport and addr.version == oaddr.version and (
                    addr == oaddr or addr.is_unspecified or oaddr.is_unspecified):
                raise ConfigError(f"{key}: {hp} is already taken by {other} "
                                  "(two listeners cannot share an address and port)")
        seen.append((key, addr, port))


def _readable(key: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None


def hostname_warnings(cfg: Config) -> list[str]:
    name = cfg.server.hostname.rstrip(".")
    if "." in name:
        return []
    return [f"server.hostname: {name!r} is not fully qualified (no dot): other servers see "
            "it in HELO and the certificate must name it; set server.hostname to this "
            "host's name in DNS (e.g. mail.example.org)"]



def service_ids(cfg: Config) -> tuple[int, int]:
    """(uid, gid) of ``server.user`` / ``server.group``; ConfigError when unknown or root."""
    import grp
    import pwd

    try:
        pw = pwd.getpwnam(cfg.server.user)
    except KeyError:
        raise ConfigError(
            f"server.user: no such user {cfg.server.user!r} (create it, e.g. "
            f"useradd --system --home-dir /var/lib/mailfort --shell /usr/sbin/nologin "
            f"{cfg.server.user})") from None
    gid = pw.pw_gid
    if cfg.server.group:
        try:
            gid = grp.getgrnam(cfg.server.group).gr_gid
        except KeyError:
            raise ConfigError(f"server.group: no such group {cfg.server.group!r}") from None
    if pw.pw_uid == 0 or gid == 0:
        raise ConfigError("server.user / server.group: must not be root (uid or gid 0)")
    return pw.pw_uid, gid


def preflight(cfg: Config) -> list[str]:
    """What ``serve`` would refuse, checked without binding or writing anything: raises
    ConfigError with the first problem; returns the warnings (served all the same)."""
    if not any(getattr(cfg.listen, name) for name in LISTEN_NAMES):
        raise ConfigError("listen: every listener (" + ", ".join(LISTEN_NAMES) + ") "
                          "is empty: the server would serve nothing")
    _listener_clash(cfg)
    if cfg.tls.cert_file and not cfg.tls.acme:
        _readable("tls.cert_file", cfg.tls.cert_file)
        _readable("tls.key_file", cfg.tls.key_file)
    if cfg.server.user:
        service_ids(cfg)  # ConfigError naming the missing user or group
    if cfg.log.file:
        parent = Path(cfg.log.file).parent
        if not parent.is_dir():
            raise ConfigError(f"log.file: the directory {parent} does not exist")
    require_directory_extra(cfg)
    if cfg.tls.acme:
        require_extra("acme", "tls.acme = true")
    return hostname_warnings(cfg)
