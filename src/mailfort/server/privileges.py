"""Least privilege: bind as root, then run as ``server.user`` with no way back.

A mail server needs root for one thing only, the ports below 1024. ``preflight`` decides
before anything is opened: started as root with ``server.user`` set, the listeners are bound
as root and ``drop`` switches for good (supplementary groups, gid, uid, then a check that
uid 0 cannot be regained); started as root without it, privileged ports are refused (the
error names the setting) and unprivileged ones run with a loud warning. Started as the
service user itself (systemd ``User=`` with CAP_NET_BIND_SERVICE) nothing is switched.

The rule between the bind and the drop (issue 24): nothing runs as root on a path the
service user can change. The data directory is that user's, so root only gives it away
(``own_data_dir``: descriptors, no symlink followed, no file with extra hard links given);
everything else in it is read and written after the drop.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from mailfort.config import Config, ConfigError, service_ids

log = logging.getLogger("mailfort")

PRIVILEGED_BELOW = 1024
LISTEN_KEYS = ("mx", "submission", "submissions", "pop3", "pop3s", "imap", "imaps",
               "managesieve")


class PrivilegeError(RuntimeError):
    """The switch to the service user did not happen, or could be undone."""


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


def account(cfg: Config) -> Account:
    """The configured service user and group, looked up (ConfigError when unknown)."""
    uid, gid = service_ids(cfg)
    return Account(cfg.server.user, uid, gid)


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


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


def check_place(path: Path, acct: Account, setting: str) -> None:
    """ConfigError unless every directory above ``path`` is out of the account's reach:
    root gives ``path`` (the account's) away by its name, so no directory on the way may
    let the account put a symlink there (owned by it, writable by its group or by anyone;
    a sticky directory holding only others' entries excepted)."""
    for named in dict.fromkeys((os.path.abspath(path), os.path.realpath(path))):
        _check_parents(Path(named), acct, setting)


def _check_parents(path: Path, acct: Account, setting: str) -> None:
    child_is_theirs = True  # ``path`` itself is, or is about to be, the account's
    for parent in path.parents:
        try:
            st = os.stat(parent)
        except FileNotFoundError:  # made by root's mkdir: root's
            child_is_theirs = False
            continue
        others = st.st_mode & stat.S_IWOTH and (child_is_theirs
                                                or not st.st_mode & stat.S_ISVTX)
        if st.st_uid == acct.uid or (st.st_mode & stat.S_IWGRP and st.st_gid == acct.gid) \
                or others:
            raise ConfigError(
                f"{setting}: {parent} can be changed by {acct.name} (its owner, group or "
                f"mode), who could put a symlink on the way to {path} for root to follow; "
                f"keep it in a directory root owns (e.g. /var/lib)")
        child_is_theirs = False


def own_data_dir(data_dir: Path, acct: Account) -> None:
    """Give the data directory and everything in it to the account (files an admin
    command made as root, for one); 0700 at the top, the TLS keys 0600.

    Runs as root, before the switch, on a tree the account may have changed since it last
    ran (issue 24): nothing here follows a symlink. The walk (``os.fwalk``) opens each
    directory below the top by name without following a symlink; owners and modes are
    changed on descriptors, or by name in the directory opened with no symlink followed;
    a file that already is the account's is not touched, and one with several links that
    is not (a hard link to a file elsewhere) is left to root, with a warning. ConfigError
    when a directory above it is the account's to change (``check_place``)."""
    check_place(data_dir, acct, "server.data_dir")
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # The top's own name is in a directory root owns (the admin's path, followed).
    top = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fchown(top, acct.uid, acct.gid)
        os.fchmod(top, 0o700)
        for _root, dirs, files, fd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
            os.fchown(fd, acct.uid, acct.gid)
            for name in dirs + files:
                _own_entry(fd, name, acct, data_dir)
        _tighten_keys(top)
    finally:
        os.close(top)


def _own_entry(dir_fd: int, name: str, acct: Account, data_dir: Path) -> None:
    """One entry of a walked directory (subdirectories get theirs from the walk)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if (st.st_uid, st.st_gid) == (acct.uid, acct.gid) or stat.S_ISDIR(st.st_mode):
        return
    if stat.S_ISREG(st.st_mode):
        try:
            fd = os.open(name, _FILE, dir_fd=dir_fd)
        except OSError:  # replaced meanwhile: whatever it is now stays as it is
            return
        try:
            now = os.fstat(fd)
            if now.st_nlink > 1:
                log.warning("%s: not given to %s: it has %d links (one may be a file "
                            "outside the data directory)", data_dir / name, acct.name,
                            now.st_nlink)
                return
            os.fchown(fd, acct.uid, acct.gid)
        finally:
            os.close(fd)
        return
    # A symlink (its own owner), a socket or a FIFO: by name, never followed.
    os.chown(name, acct.uid, acct.gid, dir_fd=dir_fd, follow_symlinks=False)


def _tighten_keys(top: int) -> None:
    """``tls/`` 0700 and its ``*key*.pem`` files 0600, each opened without following a
    symlink (a symlink there is left as it is: the server will refuse what it names)."""
    try:
        tls = os.open("tls", _DIR, dir_fd=top)
    except OSError:
        return
    try:
        os.fchmod(tls, 0o700)
        with os.scandir(tls) as it:
            keys = [e.name for e in it if fnmatch.fnmatch(e.name, "*key*.pem")
                    and e.is_file(follow_symlinks=False)]
        for name in keys:
            try:
                fd = os.open(name, _FILE, dir_fd=tls)
            except OSError:
                continue
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
    finally:
        os.close(tls)


def own_mail_root(cfg: Config, acct: Account) -> None:
    """A ``server.mail_dir`` outside the data directory: its top is made (0700) and given
    to the account, not the tree below it, which on shared storage is every node's and
    may be large; the nodes' accounts must have the same uid there."""
    root = cfg.mail_path
    if root.resolve().is_relative_to(cfg.data_path.resolve()):
        return  # owned with the data directory
    check_place(root, acct, "server.mail_dir")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fchown(fd, acct.uid, acct.gid)
    except PermissionError:  # e.g. NFS with root squashed: the admin set it up
        log.warning("cannot give %s to %s; it must be writable by that account",
                    root, acct.name)
    finally:
        os.close(fd)


def own_log_file(path: Path, acct: Account) -> None:
    """Give the log file to the account, so that a reopen after rotation can write; only
    a regular file with one link, opened without following a symlink (the file may sit
    where the account can plant one)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        log.warning("log file %s not given to %s: %s", path, acct.name, exc)
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            log.warning("log file %s not given to %s: not a regular file with one link",
                        path, acct.name)
            return
        os.fchown(fd, acct.uid, acct.gid)
    finally:
        os.close(fd)


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
