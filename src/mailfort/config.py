"""Configuration: one TOML file, every key validated at start.

The schema is a tree of frozen dataclasses; the loader walks it generically, so a wrong
key or a wrong type is reported with its dotted name and what is allowed. Checks that
span several keys (open-relay networks, listener clashes) live in ``validate``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailfort.protocol.errors import Slowdown


class ConfigError(ValueError):
    """A configuration key is unknown or its value is not allowed."""


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = "mailfort.localhost"
    data_dir: str = "./mailfort-data"
    # Plaintext AUTH / USER+PASS may be allowed on loopback listeners only; off by default.
    allow_plaintext_auth_on_loopback: bool = False
    # Worker processes sharing the listeners; 0: one per CPU. 1 runs a single process.
    workers: int = 0
    # Seconds that SIGTERM lets open sessions finish before they get a 421 / -ERR.
    shutdown_grace: float = 10.0


@dataclass(frozen=True)
class StoreConfig:
    # How a batch of messages is made durable before its 250s: "syncfs" (one flush of the
    # filesystem per batch: fastest where mailfort has its disk to itself) or "fsync" (each
    # file and directory on its own: flushes nothing of other programs on a shared disk).
    flush: str = "syncfs"


@dataclass(frozen=True)
class TLSConfig:
    # Empty: a self-signed certificate is generated in data_dir on first start.
    cert_file: str = ""
    key_file: str = ""
    min_version: str = "TLSv1.2"


@dataclass(frozen=True)
class ListenConfig:
    mx: list[str] = field(default_factory=lambda: ["127.0.0.1:2525"])
    submission: list[str] = field(default_factory=lambda: ["127.0.0.1:2587"])
    submissions: list[str] = field(default_factory=lambda: ["127.0.0.1:2465"])
    pop3: list[str] = field(default_factory=lambda: ["127.0.0.1:2110"])
    pop3s: list[str] = field(default_factory=lambda: ["127.0.0.1:2995"])


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
    pop3_idle_timeout: float = 600.0

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
    messages_per_hour: int = 200
    max_recipients: int = 50
    # Whether an alias whose targets include the user lets that user send as the alias.
    aliases_grant_sending: bool = True


@dataclass(frozen=True)
class RelayConfig:
    # Networks allowed to relay without AUTH. Empty by default; 0.0.0.0/0 and ::/0 are refused.
    trusted_networks: list[str] = field(default_factory=list)


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
class QueueConfig:
    max_lifetime: float = 5 * 86400.0
    delay_warning_after: float = 4 * 3600.0
    initial_retry: float = 300.0
    max_retry: float = 4 * 3600.0
    workers: int = 20
    connect_timeout: float = 30.0
    # Port of the MX hosts found in DNS: 25 on the Internet; tests and the lab use another.
    mx_port: int = 25


@dataclass(frozen=True)
class Route:
    """Where to deliver mail for one domain instead of its MX (smarthost or fixed host)."""

    host: str
    port: int = 25
    require_tls: bool = False


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    sender_auth: SenderAuthConfig = field(default_factory=SenderAuthConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    # domain -> route; "*" is the default route for every remote domain.
    routes: dict[str, Route] = field(default_factory=dict)
    # domains on which delivery must use STARTTLS (defer instead of sending in clear).
    require_tls_domains: list[str] = field(default_factory=list)

    @property
    def data_path(self) -> Path:
        return Path(self.server.data_dir)


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


def validate(cfg: Config) -> Config:
    """Cross-key checks; raises ConfigError naming the key."""
    for name in ("mx", "submission", "submissions", "pop3", "pop3s"):
        for i, hp in enumerate(getattr(cfg.listen, name)):
            _check_hostport(f"listen.{name}[{i}]", hp)
    for i, net in enumerate(cfg.relay.trusted_networks):
        key = f"relay.trusted_networks[{i}]"
        try:
            n = ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"{key}: {net!r} is not a network (e.g. 192.0.2.0/24)") from None
        if n.prefixlen < (8 if n.version == 4 else 32):
            raise ConfigError(
                f"{key}: {net} would make this server an open relay; "
                "list only the networks of your own hosts"
            )
    lim = cfg.limits
    for k in ("max_message_size", "max_recipients", "max_errors", "max_received_headers",
              "max_connections", "max_connections_per_ip"):
        if getattr(lim, k) <= 0:
            raise ConfigError(f"limits.{k}: must be a positive integer")
    for k in ("idle_timeout", "session_timeout", "pop3_idle_timeout"):
        if getattr(lim, k) <= 0:
            raise ConfigError(f"limits.{k}: must be a positive number of seconds")
    if not 0 <= lim.soft_errors <= lim.max_errors:
        raise ConfigError("limits.soft_errors: must be between 0 and limits.max_errors")
    for k in ("error_delay", "max_error_delay"):
        if getattr(lim, k) < 0:
            raise ConfigError(f"limits.{k}: must be zero or a positive number of seconds")
    if cfg.store.flush not in ("syncfs", "fsync"):
        raise ConfigError("store.flush: allowed values are syncfs and fsync")
    if cfg.tls.min_version not in ("TLSv1.2", "TLSv1.3"):
        raise ConfigError("tls.min_version: allowed values are TLSv1.2 and TLSv1.3")
    if bool(cfg.tls.cert_file) != bool(cfg.tls.key_file):
        raise ConfigError("tls.cert_file / tls.key_file: give both or neither")
    for dom, route in cfg.routes.items():
        if not 0 < route.port < 65536:
            raise ConfigError(f"routes.{dom}.port: must be 1-65535")
    if not cfg.server.hostname or " " in cfg.server.hostname:
        raise ConfigError("server.hostname: must be a host name without spaces")
    if not cfg.server.data_dir:
        raise ConfigError("server.data_dir: must not be empty")
    if not 0 <= cfg.server.workers <= 256:
        raise ConfigError("server.workers: 0 (one per CPU) to 256")
    if not 0 <= cfg.server.shutdown_grace <= 3600:
        raise ConfigError("server.shutdown_grace: must be between 0 and 3600 seconds")
    _validate_auth(cfg.auth)
    for k in ("messages_per_hour", "max_recipients"):
        if getattr(cfg.submission, k) <= 0:
            raise ConfigError(f"submission.{k}: must be a positive integer")
    if not 0 < cfg.dns.port < 65536:
        raise ConfigError("dns.port: must be 1-65535")
    _validate_sender_auth(cfg.sender_auth)
    return cfg


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
