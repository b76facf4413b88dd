"""``mailfort db migrate`` and ``mailfort db import --from-sqlite FILE``: the shared
PostgreSQL directory's schema and the move of an embedded installation onto it."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailfort import config as config_mod
from mailfort.cli.common import config_of
from mailfort.directory.sqlite import DirectoryError


def _postgresql(args: argparse.Namespace, *, check_schema: bool) -> Any:
    cfg = config_of(args)
    if cfg.directory.backend != "postgresql":
        raise DirectoryError('this needs [directory] backend = "postgresql" in the '
                             "configuration (the embedded SQLite directory has no migrations)")
    config_mod.require_directory_extra(cfg)  # one line, not psycopg's ImportError
    from mailfort.directory.postgresql import PostgreSQLDirectory

    return PostgreSQLDirectory.from_config(cfg.directory, check_schema=check_schema)


def cmd_migrate(args: argparse.Namespace) -> int:
    with _postgresql(args, check_schema=False) as d:
        applied = d.migrate()
        version = d.schema_version()
    if applied:
        print(f"directory schema migrated to version {version} "
              f"(applied {', '.join(map(str, applied))})")
    else:
        print(f"directory schema already at version {version}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from mailfort.directory.transfer import import_from_sqlite

    with _postgresql(args, check_schema=True) as d:
        r = import_from_sqlite(d, Path(args.from_sqlite))
    print(f"imported {r.domains} domain(s), {r.users} user(s), {r.aliases} alias target(s); "
          f"{r.skipped} already there")
    return 0


def add_parser(sub: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    db = sub.add_parser("db", help="the shared PostgreSQL directory", allow_abbrev=False)
    db_sub = db.add_subparsers(dest="action", required=True, metavar="ACTION")
    leaf(db_sub, "migrate", cmd_migrate, "create or upgrade the directory's schema")
    imp = leaf(db_sub, "import", cmd_import,
               "copy an embedded (SQLite) directory in; refused on any conflict",
               ("mailfort.directory.transfer",))
    imp.add_argument("--from-sqlite", metavar="FILE", required=True,
                     help="the embedded directory, e.g. mailfort-data/directory.sqlite3")
