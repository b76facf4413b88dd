"""Least privilege: bind as root, then run as ``server.user`` with no way back.

A mail server needs root for one thing only, the ports below 1024. ``preflight`` decides
before anything is opened: started as root with ``server.user`` set, the listeners are bound
as root and ``drop`` switches for good (supplementary groups, gid, uid, then a check that
uid 0 cannot be regained); started as root without it, privileged ports are refused (the
error names the setting) and unprivileged ones run with a loud warning. Started as the
service user itself (systemd ``User=`` with CAP_NET_BIND_SERVICE) nothing is switched.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from mailfort.config import Config, ConfigError

log = logging.getLogger("mailfort")

PRIVILEGED_BELOW = 1024
LISTEN_KEYS = ("mx", "submission", "submissions", "pop3", "pop3s")


class PrivilegeError(RuntimeError):
    """The switch to the service user did not happen, or could be undone."""


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


def account(cfg: Config) -> Account:
    """The configured service user and group, looked up (ConfigError when unknown)."""
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
    return Account(cfg.server.user, pw.pw_uid, gid)


def privileged_listeners(cfg: Config,
                         inherited: Collection[tuple[str, int]] = ()) -> list[str]:
    """``listen.X[i] (HOST:PORT)`` for each listener on a port below 1024 that is to be
    bound here (not one ``inherited`` from socket activation)."""
    out = []
    for key in LISTEN_KEYS:
        for i, hostport in enumerate(getattr(cfg.listen, key)):
            port = int(hostport.rpartition(":")[2])
            if 0 < port < PRIVILEGED_BELOW and (key, i) not in inherited:
                out.append(f"listen.{key}[{i}] ({hostport})")
    return out


def preflight(cfg: Config, inherited: Collection[tuple[str, int]] = ()) -> Account | None:
    """Decide before anything is opened; the account to switch to, or None.

    Raises ConfigError: root without ``server.user`` on privileged ports; ``server.user``
    set while started as another unprivileged user (no switch is possible)."""
    if os.geteuid() != 0:
        if cfg.server.user:
            acct = account(cfg)
            if acct.uid != os.geteuid():
                raise ConfigError(
                    f"server.user: mailfort runs as uid {os.geteuid()}, not as root nor "
                    f"as {acct.name}: it cannot switch users (start it as root or as "
                    f"{acct.name})")
        return None
    if cfg.server.user:
        return account(cfg)
    low = privileged_listeners(cfg, inherited)
    if low:
        raise ConfigError(
            "server.user: started as root without server.user, mailfort would serve as "
            f"root: {', '.join(low)} need root to bind. Set server.user (e.g. "
            '"mailfort") so that it drops to that account once bound, or run it as that '
            "user with CAP_NET_BIND_SERVICE (contrib/mailfort.service)")
    log.warning(
        "WARNING: mailfort is running as ROOT. Anything that goes wrong in it is root's. "
        'Set server.user = "mailfort" in the configuration (the README\'s Production '
        "section), or start it as an unprivileged user.")
    return None


def own_data_dir(data_dir: Path, acct: Account) -> None:
    """Give the data directory and everything in it to the account; 0700 at the top, keys
    0600. Runs as root, before the switch, so the server can write its own files."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chown(data_dir, acct.uid, acct.gid)
    os.chmod(data_dir, 0o700)
    for root, dirs, files in os.walk(data_dir):
        for name in dirs + files:
            path = os.path.join(root, name)
            os.chown(path, acct.uid, acct.gid, follow_symlinks=False)
    tls_dir = data_dir / "tls"
    if tls_dir.is_dir():
        os.chmod(tls_dir, 0o700)
        for key in tls_dir.glob("*key*.pem"):
            os.chmod(key, 0o600)


def own_mail_root(cfg: Config, acct: Account) -> None:
    """A ``server.mail_dir`` outside the data directory: its top is made (0700) and given
    to the account, not the tree below it, which on shared storage is every node's and
    may be large; the nodes' accounts must have the same uid there."""
    root = cfg.mail_path
    if root.resolve().is_relative_to(cfg.data_path.resolve()):
        return  # owned with the data directory
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.chown(root, acct.uid, acct.gid)
    except PermissionError:  # e.g. NFS with root squashed: the admin set it up
        log.warning("cannot give %s to %s; it must be writable by that account",
                    root, acct.name)


def drop(acct: Account) -> None:
    """Switch the whole process (every thread: glibc applies set*id to all) for good."""
    os.setgroups([])
    os.setgid(acct.gid)  # gid first: once the uid is gone, setgid is no longer allowed
    os.setuid(acct.uid)
    verify_dropped(acct)
    log.info("running as %s (uid %d, gid %d)", acct.name, acct.uid, acct.gid)


def verify_dropped(acct: Account) -> None:
    """Raise PrivilegeError unless real, effective and saved ids are the account's and
    root cannot be regained."""
    if os.getresuid() != (acct.uid,) * 3 or os.getresgid() != (acct.gid,) * 3:
        raise PrivilegeError(f"ids after the switch: uid {os.getresuid()} gid {os.getresgid()}")
    if os.getgroups() not in ([], [acct.gid]):
        raise PrivilegeError(f"supplementary groups remain: {os.getgroups()}")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise PrivilegeError("setuid(0) succeeded after the switch: refusing to serve")
