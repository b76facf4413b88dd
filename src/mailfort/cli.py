"""The ``mailfort`` command: serve, manage domains/users/aliases, check the configuration.

Passwords are read from a prompt (twice) or from a file, never from the command line,
where any local user could read them in the process list or the shell history. Errors
are one line on stderr and a non-zero exit status, never a traceback.

Started as root with ``server.user`` configured, every command but those in
``KEEPS_PRIVILEGES`` switches to that user for good right after reading the configuration
(``drop_for_data_dir``), before it opens anything in the data directory: that directory is
the service user's to change, and root must not follow what it planted there (issue 24).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import importlib
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mailfort import config as config_mod
from mailfort.config import Config, ConfigError
from mailfort.directory import open_directory
from mailfort.directory.postgresql import PostgreSQLDirectory
from mailfort.directory.sqlite import DirectoryError, SQLiteDirectory, normalize_local_address
from mailfort.queue.store import QueueError

MIN_PASSWORD_LENGTH = 8


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


# -- helpers ---------------------------------------------------------------------------


def config_of(args: argparse.Namespace) -> Config:
    """The configuration, read once: as root, before the switch to the service user (the
    file may be readable by root only); the commands use this copy afterwards."""
    cfg: Config | None = getattr(args, "loaded_config", None)
    if cfg is None:
        cfg = config_mod.load(getattr(args, "config", None))
        args.loaded_config = cfg
    return cfg


def _directory(args: argparse.Namespace) -> SQLiteDirectory | PostgreSQLDirectory:
    return open_directory(config_of(args))


def _password_file_text(args: argparse.Namespace) -> str:
    """The ``--password-file``: a file the admin named, read as the admin (before the
    switch, when there is one) and kept for the command."""
    text: str | None = getattr(args, "password_text", None)
    if text is None:
        text = Path(args.password_file).read_text(encoding="utf-8")
        args.password_text = text
    return text


def _read_password(args: argparse.Namespace) -> str:
    if args.password_file:
        text = _password_file_text(args)
        password = text.removesuffix("\n").removesuffix("\r")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Password (again): ") != password:
            raise CLIError("the passwords do not match")
    if "\n" in password or "\r" in password:
        raise CLIError("the password file must hold one line")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise CLIError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    return password


def _hash(password: str) -> str:
    from mailfort.passwords import hash_password

    return hash_password(password)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot render {type(v).__name__}")


def _toml_key(k: str) -> str:
    bare = k and all(c.isascii() and (c.isalnum() or c in "-_") for c in k)
    return k if bare else json.dumps(k)


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Render the effective settings as TOML (loadable again with tomllib)."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for k, v in data.items():
        if isinstance(v, dict) and (v or not prefix):
            tables.append((k, v))
        else:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    out = "\n".join(lines)
    for k, v in tables:
        name = f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k)
        inner = to_toml(v, name)
        block = f"[{name}]\n{inner}" if not inner.startswith("[") else inner
        if not v:
            block = f"[{name}]"
        out = f"{out}\n\n{block}" if out else block
    return out


# -- commands ----------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    from mailfort.server.app import run

    # A reload reads the file again (config_of keeps the first reading).
    run(cfg, reload_config=lambda: config_mod.load(getattr(args, "config", None)))
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    eff = config_mod.effective(cfg)
    print(json.dumps(eff, indent=2) if args.json else to_toml(eff))
    return 0


def cmd_domain_add(args: argparse.Namespace) -> int:
    print(f"domain {_directory(args).add_domain(args.domain)} added")
    return 0


def cmd_domain_list(args: argparse.Namespace) -> int:
    d = _directory(args)
    for name in d.list_domains():
        target = d.catchall(name)
        print(f"{name}\tcatch-all -> {target}" if target else name)
    return 0


def cmd_domain_remove(args: argparse.Namespace) -> int:
    _directory(args).remove_domain(args.domain)
    print(f"domain {args.domain.lower()} removed")
    return 0


def cmd_domain_catchall(args: argparse.Namespace) -> int:
    if args.off == (args.target is not None):
        raise CLIError("give either a TARGET address or --off")
    _directory(args).set_catchall(args.domain, None if args.off else args.target)
    print(f"catch-all for {args.domain.lower()}: {'off' if args.off else args.target}")
    return 0


def _local_user(d: SQLiteDirectory | PostgreSQLDirectory, address: str) -> str:
    addr = normalize_local_address(address)
    domain = addr.rpartition("@")[2]
    if not d.is_local_domain(domain):
        raise CLIError(
            f"{domain} is not a local domain (add it with: mailfort domain add {domain})"
        )
    return addr


def cmd_user_add(args: argparse.Namespace) -> int:
    d = _directory(args)
    addr = _local_user(d, args.address)  # checked before asking for a password
    if d.password_hash(addr) is not None:
        raise CLIError(f"user {addr} already exists")
    d.add_user(addr, _hash(_read_password(args)))
    print(f"user {addr} added")
    return 0


def cmd_user_passwd(args: argparse.Namespace) -> int:
    d = _directory(args)
    addr = _local_user(d, args.address)
    if d.password_hash(addr) is None:
        raise CLIError(f"no such user: {addr}")
    d.set_password(addr, _hash(_read_password(args)))
    print(f"password of {addr} changed")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    for user in _directory(args).list_users(args.domain):
        print(user)
    return 0


def cmd_user_remove(args: argparse.Namespace) -> int:
    addr = normalize_local_address(args.address)
    _directory(args).remove_user(addr)
    print(f"user {addr} removed (its Maildir is kept)")
    return 0


def cmd_alias_add(args: argparse.Namespace) -> int:
    src = _directory(args).add_alias(args.source, args.targets)
    print(f"alias {src} -> {', '.join(args.targets)}")
    return 0


def cmd_alias_list(args: argparse.Namespace) -> int:
    for source, targets in _directory(args).list_aliases(args.domain).items():
        print(f"{source}\t{', '.join(targets)}")
    return 0


def cmd_alias_remove(args: argparse.Namespace) -> int:
    _directory(args).remove_alias(args.source, args.targets or None)
    print(f"alias {args.source.lower()} updated" if args.targets else
          f"alias {args.source.lower()} removed")
    return 0


# -- privileges ------------------------------------------------------------------------

# The commands that keep the privileges they were started with, and why. Every other
# command opens something in the data directory (directory.sqlite3, queue/, dkim/, tls/,
# control.sock, ...) and, started as root with server.user set, switches to that user first.
KEEPS_PRIVILEGES: dict[tuple[str, ...], str] = {
    ("serve",): "binds as root, then drops itself before the data directory (server/app.py)",
    ("config", "check"): "reads the configuration only",
    ("mta-sts", "policy"): "reads the configuration only",
    ("audit",): "a client of some mail server: no configuration, no data directory",
    ("lab",): "its own scratch servers in a fresh temporary directory, no configuration",
}

# Imported before the switch whatever the command: what the PostgreSQL directory loads.
_POSTGRESQL = ("psycopg", "psycopg_pool", "mailfort.directory.postgresql")


def command_path(args: argparse.Namespace) -> tuple[str, ...]:
    """("user", "add") for ``mailfort user add ...``; ("serve",) for ``mailfort serve``."""
    action = getattr(args, "action", None)
    return (args.command, action) if isinstance(action, str) else (args.command,)


def _all_theirs(data_dir: Path, owner: tuple[int, int]) -> bool:
    """Whether the data directory exists and it and its entries are ``owner``'s (lstat:
    nothing followed). An entry that is not (directory.sqlite3 made as root by an earlier
    version, say) would be unwritable after the switch: then the tree is given away, once;
    the walk is not done at every command (the Maildirs may be below)."""
    try:
        top = os.stat(data_dir)
        with os.scandir(data_dir) as it:
            entries = [e.stat(follow_symlinks=False) for e in it]
    except FileNotFoundError:
        return False
    return all((st.st_uid, st.st_gid) == owner for st in [top, *entries])


def drop_for_data_dir(args: argparse.Namespace) -> None:
    """As root with ``server.user`` set, switch to that user for good unless the command
    is in ``KEEPS_PRIVILEGES``; as anyone else, nothing to do.

    Before the switch, as root, and on nothing the service user can change: the
    configuration and a ``--password-file`` are read; the data directory is made and given
    to the user as ``serve`` does (``own_data_dir``: no symlink followed) when it is missing
    or not all the user's yet (``_all_theirs``), so that what the command creates there is
    the server's own and it can write what is there; and
    the modules the command loads later are imported (a Python installed in root's home
    is unreadable afterwards)."""
    if os.geteuid() != 0 or command_path(args) in KEEPS_PRIVILEGES:
        return
    cfg = config_of(args)
    if not cfg.server.user:
        return  # root's own data directory: nobody else can change it
    from mailfort.server import privileges

    acct = privileges.account(cfg)
    if getattr(args, "password_file", None):
        _password_file_text(args)
    if not _all_theirs(cfg.data_path, (acct.uid, acct.gid)):
        privileges.own_data_dir(cfg.data_path, acct)
    needs: tuple[str | Callable[[], object], ...] = getattr(args, "needs", ())
    if cfg.directory.backend == "postgresql":
        needs += _POSTGRESQL
    for need in needs:
        if callable(need):
            need()
        else:
            # An optional package not installed: the command says so itself.
            with contextlib.suppress(ImportError):
                importlib.import_module(need)
    privileges.drop(acct)


def cmd_queue(args: argparse.Namespace) -> int:
    from mailfort.queue import admin

    root = admin.queue_root(config_of(args))
    if args.action == "adopt":
        from mailfort.queue.adopt import adopt
        from mailfort.queue.store import Queue

        r = adopt(Queue(root), Path(args.dir))
        print(f"adopted {r.adopted} message(s) from {args.dir} into {root}"
              + (f"; {r.finished} finished from an earlier run" if r.finished else "")
              + (f"; {r.left} never-acknowledged file(s) left in {args.dir}/msg"
                 if r.left else "")
              + ("; a running server sends them at its next queue scan" if r.adopted else ""))
        return 0
    if args.action == "list":
        print(admin.queue_list(root))
    elif args.action == "show":
        print(admin.queue_show(root, args.id))
    elif args.action == "retry":  # the running server retries at once (control socket)
        from mailfort.ops_commands import queue_retry

        print(queue_retry(config_of(args), args.id))
    else:
        print(admin.queue_delete(root, args.id))
    return 0


# -- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: "--password" must never be taken for "--password-file".
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="TOML configuration (default: embedded, data in ./mailfort-data)")
    parser = argparse.ArgumentParser(
        prog="mailfort", description="secure-by-default mail server", allow_abbrev=False
    )
    parser.add_argument("--config", metavar="FILE", default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def leaf(group: Any, name: str, func: Callable[[argparse.Namespace], int],
             help_: str, needs: Sequence[str | Callable[[], object]] = ()
             ) -> argparse.ArgumentParser:
        """A command; ``needs``: what it imports (or loads) later, for when it runs as the
        service user (``drop_for_data_dir``)."""
        p: argparse.ArgumentParser = group.add_parser(
            name, parents=[common], help=help_, allow_abbrev=False
        )
        p.set_defaults(func=func, needs=tuple(needs))
        return p

    leaf(sub, "serve", cmd_serve, "run the mail server")

    cfg_p = sub.add_parser("config", help="configuration", allow_abbrev=False)
    cfg_sub = cfg_p.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = leaf(cfg_sub, "check", cmd_config_check, "validate and print effective settings")
    check.add_argument("--json", action="store_true", help="print JSON instead of TOML")

    dom = sub.add_parser("domain", help="local domains", allow_abbrev=False)
    dom_sub = dom.add_subparsers(dest="action", required=True, metavar="ACTION")
    leaf(dom_sub, "add", cmd_domain_add, "add a local domain").add_argument("domain")
    leaf(dom_sub, "list", cmd_domain_list, "list local domains")
    leaf(dom_sub, "remove", cmd_domain_remove, "remove an empty domain").add_argument("domain")
    ca = leaf(dom_sub, "catchall", cmd_domain_catchall, "catch-all address (off by default)")
    ca.add_argument("domain")
    ca.add_argument("target", nargs="?")
    ca.add_argument("--off", action="store_true", help="turn the catch-all off")

    usr = sub.add_parser("user", help="mail accounts", allow_abbrev=False)
    usr_sub = usr.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, func, help_ in (("add", cmd_user_add, "add a user (asks for the password)"),
                              ("passwd", cmd_user_passwd, "change a user's password")):
        p = leaf(usr_sub, name, func, help_, needs=("mailfort.passwords",))
        p.add_argument("address")
        p.add_argument("--password-file", metavar="FILE",
                       help="read the password from the first line of FILE")
    leaf(usr_sub, "list", cmd_user_list, "list users").add_argument("domain", nargs="?")
    leaf(usr_sub, "remove", cmd_user_remove, "remove a user").add_argument("address")

    al = sub.add_parser("alias", help="aliases and forwards", allow_abbrev=False)
    al_sub = al.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = leaf(al_sub, "add", cmd_alias_add, "add targets to an alias")
    p.add_argument("source")
    p.add_argument("targets", nargs="+", metavar="TARGET")
    leaf(al_sub, "list", cmd_alias_list, "list aliases").add_argument("domain", nargs="?")
    p = leaf(al_sub, "remove", cmd_alias_remove, "remove an alias or some of its targets")
    p.add_argument("source")
    p.add_argument("targets", nargs="*", metavar="TARGET")

    qu = sub.add_parser("queue", help="the outbound queue", allow_abbrev=False)
    qu_sub = qu.add_subparsers(dest="action", required=True, metavar="ACTION")
    queue_needs = ("mailfort.queue.admin", "mailfort.ops_commands")
    leaf(qu_sub, "list", cmd_queue, "list queued messages", queue_needs)
    leaf(qu_sub, "show", cmd_queue, "show one entry and its recipients",
         queue_needs).add_argument("id")
    leaf(qu_sub, "retry", cmd_queue, "retry now (one entry or all)", queue_needs).add_argument(
        "id", nargs="?"
    )
    leaf(qu_sub, "delete", cmd_queue, "delete an entry", queue_needs).add_argument("id")
    leaf(qu_sub, "adopt", cmd_queue,
         "take over the queue directory of a node that is gone for good",
         (*queue_needs, "mailfort.queue.adopt")).add_argument(
        "dir", metavar="DIR", help="that node's queue directory (its data_dir/queue)")

    from mailfort.ops_commands import add_parser as add_ops_parser

    add_ops_parser(sub, leaf)  # status, tls show
    from mailfort.db_command import add_parser as add_db_parser

    add_db_parser(sub, leaf)  # db migrate, db import
    from mailfort.dkim_command import add_parser as add_dkim_parser

    add_dkim_parser(sub, leaf)
    from mailfort.dns_command import add_parser as add_dns_parser

    add_dns_parser(sub, leaf)

    from mailfort.delivery.mtasts_command import add_parser as add_mta_sts_parser

    add_mta_sts_parser(sub, leaf)

    from mailfort.audit.command import add_parser as add_audit_parser

    add_audit_parser(sub)
    from mailfort.lab.command import add_parser as add_lab_parser

    add_lab_parser(sub)
    return parser


def _is_database_error(exc: Exception) -> bool:
    """A PostgreSQL error or pool timeout (psycopg is only imported when configured)."""
    mod = type(exc).__module__
    return mod.startswith(("psycopg.", "psycopg_pool")) or mod == "psycopg"


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        drop_for_data_dir(args)
        return int(args.func(args))
    except ConfigError as exc:
        print(f"mailfort: config error: {exc}", file=sys.stderr)
    except (CLIError, DirectoryError, QueueError) as exc:
        print(f"mailfort: {exc}", file=sys.stderr)
    except sqlite3.Error as exc:
        print(f"mailfort: directory database error: {exc}", file=sys.stderr)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"mailfort: {exc.strerror or exc}{where}", file=sys.stderr)
    except (ValueError, EOFError) as exc:
        print(f"mailfort: {exc or 'no input'}", file=sys.stderr)
    except KeyboardInterrupt:
        print("mailfort: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # last: only a database error is expected here
        if not _is_database_error(exc):
            raise
        print(f"mailfort: directory database error: {_first_line(exc)}", file=sys.stderr)
    return 1
