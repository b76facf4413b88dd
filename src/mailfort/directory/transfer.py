"""``mailfort db import --from-sqlite``: copy an embedded directory into PostgreSQL.

Idempotent: a row already there with the same content is skipped, so an interrupted or
repeated import can simply be run again. A row that is there with *different* content (a
user with another password hash, a domain with another catch-all) is a conflict: the whole
import is refused and nothing is written, since which side is right is the admin's call.
Everything happens in one transaction.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mailfort.directory.sqlite import DirectoryError

if TYPE_CHECKING:
    from mailfort.directory.postgresql import PostgreSQLDirectory


@dataclass
class ImportResult:
    domains: int = 0
    users: int = 0
    aliases: int = 0  # alias targets (source -> target pairs)
    skipped: int = 0  # rows already present, identical


def import_from_sqlite(target: PostgreSQLDirectory, path: Path) -> ImportResult:
    """Copy every domain, user (with its password hash) and alias of the SQLite file."""
    if not path.is_file():
        raise DirectoryError(f"{path}: no such SQLite directory file")
    src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        domains = src.execute("SELECT name, catchall FROM domains ORDER BY name").fetchall()
        users = src.execute(
            "SELECT address, domain, password_hash FROM users ORDER BY address").fetchall()
        aliases = src.execute(
            "SELECT source, domain, target FROM aliases ORDER BY rowid").fetchall()
    finally:
        src.close()
    result = ImportResult()
    conflicts: list[str] = []
    with target._write() as conn:
        for name, catchall in domains:
            row = conn.execute("SELECT catchall FROM domains WHERE name = %s", (name,)).fetchone()
            if row is None:
                # The catch-all is set below, once its target (a user or alias) exists.
                conn.execute("INSERT INTO domains (name) VALUES (%s)", (name,))
                result.domains += 1
            elif row[0] is not None and row[0] != catchall:
                conflicts.append(f"domain {name}: catch-all {row[0]} here, {catchall} there")
            else:
                result.skipped += 1
        for address, domain, pw_hash in users:
            row = conn.execute("SELECT password_hash FROM users WHERE address = %s",
                               (address,)).fetchone()
            if row is None:
                if conn.execute("SELECT 1 FROM aliases WHERE source = %s LIMIT 1",
                                (address,)).fetchone():
                    conflicts.append(f"user {address}: an alias here")
                    continue
                conn.execute("INSERT INTO users (address, domain, password_hash) "
                             "VALUES (%s, %s, %s)", (address, domain, pw_hash))
                result.users += 1
            elif row[0] != pw_hash:
                conflicts.append(f"user {address}: a different password here")
            else:
                result.skipped += 1
        for source, domain, tgt in aliases:
            if conn.execute("SELECT 1 FROM users WHERE address = %s", (source,)).fetchone():
                conflicts.append(f"alias {source}: a user here")
                continue
            cur = conn.execute("INSERT INTO aliases (source, domain, target) "
                               "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                               (source, domain, tgt))
            if cur.rowcount:
                result.aliases += 1
            else:
                result.skipped += 1
        for name, catchall in domains:
            if catchall is not None:
                conn.execute("UPDATE domains SET catchall = %s WHERE name = %s "
                             "AND catchall IS NULL", (catchall, name))
        if conflicts:
            # Raising inside the transaction rolls every insert above back.
            shown = "; ".join(conflicts[:5]) + ("; ..." if len(conflicts) > 5 else "")
            raise DirectoryError(f"import refused, nothing changed: {len(conflicts)} "
                                 f"conflict(s) with what is already there: {shown}")
    return result
