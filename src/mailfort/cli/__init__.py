"""The ``mailfort`` command: one module per command group, each a thin adapter over a
library function; here the parser that gathers them, the dispatch, and the one rule every
command shares.

Errors are one line on stderr and a non-zero exit status, never a traceback.

Started as root with ``server.user`` configured, every command but those in
``KEEPS_PRIVILEGES`` switches to that user for good right after reading the configuration
(``drop_for_data_dir``), before it opens anything in the data directory: that directory is
the service user's to change, and root must not follow what it planted there (issue 24).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mailfort.cli import (
    accounts,
    audit,
    db,
    dkim,
    dns,
    lab,
    mtasts,
    queue,
    serve,
    status,
    tls,
)
from mailfort.cli.common import CLIError, config_of, password_file_text, require_data_dir
from mailfort.config import ConfigError
from mailfort.directory.sqlite import DirectoryError
from mailfort.queue.store import QueueError

__all__ = [
    "KEEPS_PRIVILEGES",
    "CLIError",
    "build_parser",
    "command_path",
    "config_of",
    "drop_for_data_dir",
    "main",
]


# -- privileges ------------------------------------------------------------------------

# The commands that keep the privileges they were started with, and why. Every other
# command opens something in the data directory (directory.sqlite3, queue/, dkim/, tls/,
# control.sock, ...) and, started as root with server.user set, switches to that user first.
KEEPS_PRIVILEGES: dict[tuple[str, ...], str] = {
    ("serve",): "binds as root, then drops itself before the data directory (server/app.py)",
    ("config", "check"): "reads the configuration only",
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
        password_file_text(args)
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

    # In the order of ``mailfort --help``.
    serve.add_parser(sub, leaf)  # serve, config check
    accounts.add_parser(sub, leaf)  # domain, user, alias
    queue.add_parser(sub, leaf)
    status.add_status_parser(sub, leaf)
    tls.add_parser(sub, leaf)  # tls show
    status.add_block_parser(sub, leaf)  # block list, block remove
    db.add_parser(sub, leaf)  # db migrate, db import
    dkim.add_parser(sub, leaf)
    dns.add_parser(sub, leaf)
    mtasts.add_parser(sub, leaf)
    audit.add_parser(sub)
    lab.add_parser(sub)
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
        require_data_dir(args)  # before the switch, which would make it
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
        print(f"mailfort: {str(exc) or 'no input'}", file=sys.stderr)
    except KeyboardInterrupt:
        print("mailfort: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # last: only a database error is expected here
        if not _is_database_error(exc):
            raise
        print(f"mailfort: directory database error: {_first_line(exc)}", file=sys.stderr)
    return 1
