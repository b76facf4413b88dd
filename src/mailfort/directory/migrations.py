"""Versioned schema of the PostgreSQL directory, applied by ``mailfort db migrate``.

Each migration is applied once, in order, in its own transaction, and recorded in
``mailfort_schema``; an advisory lock lets two hosts run ``migrate`` at the same time
safely (the second finds nothing left to do). A migration is never edited once released:
a change of schema is a new entry at the end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

_MIGRATE_LOCK = 0x6D66_6D69_6772_6174  # "mfmigrat"

MIGRATIONS: list[tuple[int, str]] = [
    (1, """
CREATE TABLE domains (
    name text PRIMARY KEY,
    catchall text
);
CREATE TABLE users (
    address text PRIMARY KEY,
    domain text NOT NULL REFERENCES domains(name),
    password_hash text NOT NULL CHECK (password_hash LIKE '$argon2%')
);
CREATE INDEX users_domain ON users(domain);
CREATE TABLE aliases (
    id bigserial UNIQUE,  -- insertion order: targets are tried in the order given
    source text NOT NULL,
    domain text NOT NULL REFERENCES domains(name),
    target text NOT NULL,
    PRIMARY KEY (source, target)
);
CREATE INDEX aliases_target ON aliases(target);
CREATE INDEX aliases_domain ON aliases(domain);
"""),
    (2, """
-- Greylisting (policy/greylist_pg.py): shared, so a retry through another node passes.
CREATE TABLE greylist_triplets (
    network text NOT NULL,
    sender text NOT NULL,
    recipient text NOT NULL,
    first_seen double precision NOT NULL,
    last_seen double precision NOT NULL,
    passed boolean NOT NULL DEFAULT false,
    PRIMARY KEY (network, sender, recipient)
);
CREATE TABLE greylist_networks (
    network text PRIMARY KEY,
    passes integer NOT NULL,
    last_seen double precision NOT NULL
);
"""),
]


def current_version(conn: psycopg.Connection[Any]) -> int:
    """The highest applied migration, 0 for a database that was never migrated."""
    exists = conn.execute("SELECT to_regclass('mailfort_schema') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM mailfort_schema").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: psycopg.Connection[Any]) -> list[int]:
    """Bring the schema up to date; returns the versions applied now."""
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS mailfort_schema ("
                     "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        have = current_version(conn)
        if have > MIGRATIONS[-1][0]:
            raise ValueError(f"the directory's schema (version {have}) is newer than this "
                             f"mailfort knows ({MIGRATIONS[-1][0]}): upgrade mailfort")
        for version, sql in MIGRATIONS:
            if version <= have:
                continue
            with conn.transaction():  # a savepoint: one migration is all or nothing
                conn.execute(sql.encode())
                conn.execute("INSERT INTO mailfort_schema (version) VALUES (%s)", (version,))
            applied.append(version)
    return applied
