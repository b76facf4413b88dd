"""The shared directory: domains, users, aliases and password hashes in PostgreSQL.

Several mailfort nodes use one database, so a user added through any node (or any host
running ``mailfort user add`` with the same configuration) can log in on all of them at
once. The same rules as the embedded directory apply (``directory/sqlite.py``: names are
normalized by the same functions, the same expansion limits); only the storage differs.

Connections come from a psycopg pool; every method borrows one for one transaction, so
the object is safe to share between threads. Reads are a round trip to the database: the
server calls them off the event loop (``blocking`` below, see ``server/smtp.py`` and
``policy/authn.py``). Writes take one transaction-level advisory lock, so that two admin
commands on two hosts cannot interleave their checks and inserts (the SQLite directory's
``BEGIN IMMEDIATE``). The password never appears in the URL, hence in no log line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailfort.directory import aliases
from mailfort.directory.aliases import MAX_ALIAS_DEPTH
from mailfort.directory.base import Resolution
from mailfort.directory.migrations import MIGRATIONS, current_version, migrate
from mailfort.directory.sqlite import (
    DirectoryError,
    _check_hash,
    _lookup_key,
    _normalize_remote,
    _split,
    normalize_domain,
    normalize_local_address,
)

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

    from mailfort.config import DirectoryConfig

log = logging.getLogger("mailfort.directory")

PASSWORD_ENV = "MAILFORT_DIRECTORY_PASSWORD"
_WRITE_LOCK = 0x6D61_696C_666F_7274  # "mailfort": one advisory lock for admin writes


def directory_password(cfg: DirectoryConfig) -> str | None:
    """The database password: ``password_file``'s first line, else the environment."""
    if cfg.password_file:
        text = Path(cfg.password_file).read_text(encoding="utf-8")
        return text.splitlines()[0] if text else ""
    return os.environ.get(PASSWORD_ENV)


class PostgreSQLDirectory:
    """The ``Directory`` protocol over PostgreSQL, plus the admin methods the CLI uses."""

    blocking = True  # each lookup is a network round trip: keep it off the event loop

    def __init__(self, url: str, *, password: str | None = None, pool_size: int = 10,
                 timeout: float = 5.0, check_schema: bool = True) -> None:
        """Connects at once (a wrong URL or a stopped server is reported here, not at the
        first mail). ``check_schema``: refuse a database that ``mailfort db migrate`` has
        not brought to this version (the migrate command itself passes False)."""
        from psycopg_pool import ConnectionPool

        kwargs: dict[str, Any] = {
            # Reads are single statements (one round trip each); writes open a transaction.
            "autocommit": True,
            "connect_timeout": max(1, round(timeout)),
            # A stuck statement must not hold a session (or the admin's shell) forever.
            "options": f"-c statement_timeout={int(timeout * 1000)}",
            "application_name": "mailfort",
        }
        if password is not None:
            kwargs["password"] = password
        # One direct connection first: a wrong URL, password or a stopped server is
        # reported at once and precisely (the pool would only time out).
        import psycopg

        try:
            psycopg.connect(url, **kwargs).close()
        except psycopg.Error as exc:
            raise DirectoryError(f"cannot connect to the PostgreSQL directory at "
                                 f"{safe_url(url)}: {_last_line(exc)}") from None
        self._pool: ConnectionPool[Any] = ConnectionPool(
            url, min_size=1, max_size=pool_size, kwargs=kwargs, timeout=timeout,
            open=True, name="mailfort-directory")
        if check_schema:
            try:
                self.require_schema()
            except BaseException:
                self._pool.close()  # its worker threads must not outlive the refusal
                raise

    @classmethod
    def from_config(cls, cfg: DirectoryConfig, *, check_schema: bool = True
                    ) -> PostgreSQLDirectory:
        return cls(cfg.url, password=directory_password(cfg), pool_size=cfg.pool_size,
                   timeout=cfg.timeout, check_schema=check_schema)

    # -- connections and schema ----------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[psycopg.Connection[Any]]:
        with self._pool.connection() as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[psycopg.Connection[Any]]:
        with self._pool.connection() as conn, conn.transaction():  # all or nothing
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
            yield conn

    @property
    def pool(self) -> ConnectionPool[Any]:
        """The connection pool, for the other shared state kept in this database
        (greylisting: ``policy/greylist_pg.py``)."""
        return self._pool

    def schema_version(self) -> int:
        with self._read() as conn:
            return current_version(conn)

    def require_schema(self) -> None:
        have, want = self.schema_version(), MIGRATIONS[-1][0]
        if have != want:
            raise DirectoryError(
                f"the PostgreSQL directory's schema is at version {have}, this mailfort "
                f"needs {want}: run `mailfort db migrate` first")

    def migrate(self) -> list[int]:
        """Apply the missing migrations; the versions applied (empty: already current)."""
        with self._pool.connection() as conn:
            return migrate(conn)

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> PostgreSQLDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- Directory protocol ------------------------------------------------------------

    def is_local_domain(self, domain: str) -> bool:
        d = domain.strip().lower().removesuffix(".")
        with self._read() as conn:
            return _one(conn, "SELECT 1 FROM domains WHERE name = %s", d) is not None

    def password_hash(self, user: str) -> str | None:
        key = _lookup_key(user)
        if key is None:
            return None
        with self._read() as conn:
            row = _one(conn, "SELECT password_hash FROM users WHERE address = %s", key[0])
        return row[0] if row else None

    def canonical_user(self, user: str) -> str | None:
        key = _lookup_key(user)
        if key is None:
            return None
        with self._read() as conn:
            row = _one(conn, "SELECT address FROM users WHERE address = %s", key[0])
        return row[0] if row else None

    def resolve(self, address: str) -> Resolution | None:
        key = _lookup_key(address)
        if key is None:
            return None
        addr, domain = key
        with self._read() as conn:
            row = _one(conn, "SELECT catchall FROM domains WHERE name = %s", domain)
            if row is None:
                return None
            start = addr
            if not _is_user(conn, addr) and not _is_alias(conn, addr):
                if row[0] is None:
                    return None
                start = row[0]
            local, remote = _expand(conn, start)
        if not local and not remote:
            return None
        return Resolution(local=tuple(local), remote=tuple(remote))

    def addresses_of(self, user: str) -> frozenset[str]:
        key = _lookup_key(user)
        if key is None:
            return frozenset()
        with self._read() as conn:
            if not _is_user(conn, key[0]):
                return frozenset()
            found = {key[0]}
            frontier = [key[0]]
            for _ in range(MAX_ALIAS_DEPTH):
                rows = conn.execute(
                    "SELECT DISTINCT source FROM aliases WHERE target = ANY(%s)", (frontier,)
                ).fetchall()
                frontier = [s for (s,) in rows if s not in found]
                if not frontier:
                    break
                found.update(frontier)
        return frozenset(found)

    # -- domains -----------------------------------------------------------------------

    def add_domain(self, domain: str) -> str:
        d = normalize_domain(domain)
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO domains (name) VALUES (%s) ON CONFLICT DO NOTHING", (d,))
            if cur.rowcount == 0:
                raise DirectoryError(f"domain {d} already exists")
        return d

    def remove_domain(self, domain: str) -> None:
        """Refused while users or aliases remain: removing mail accounts is explicit."""
        d = normalize_domain(domain)
        with self._write() as conn:
            _require_domain(conn, d)
            users = _one(conn, "SELECT count(*) FROM users WHERE domain = %s", d)
            aliases = _one(conn, "SELECT count(DISTINCT source) FROM aliases WHERE domain = %s",
                           d)
            assert users is not None and aliases is not None
            if users[0] or aliases[0]:
                raise DirectoryError(
                    f"domain {d} still has {users[0]} user(s) and {aliases[0]} alias(es); "
                    "remove them first")
            conn.execute("DELETE FROM domains WHERE name = %s", (d,))

    def list_domains(self) -> list[str]:
        with self._read() as conn:
            return [r[0] for r in conn.execute("SELECT name FROM domains ORDER BY name")]

    def catchall(self, domain: str) -> str | None:
        d = domain.strip().lower().removesuffix(".")
        with self._read() as conn:
            row = _one(conn, "SELECT catchall FROM domains WHERE name = %s", d)
        return row[0] if row else None

    def set_catchall(self, domain: str, target: str | None) -> None:
        """Send mail for unknown addresses of ``domain`` to ``target``; None turns it off."""
        d = normalize_domain(domain)
        with self._write() as conn:
            _require_domain(conn, d)
            t = None if target is None else _check_target(conn, target)
            conn.execute("UPDATE domains SET catchall = %s WHERE name = %s", (t, d))

    # -- users -------------------------------------------------------------------------

    def add_user(self, address: str, password_hash: str) -> str:
        addr = normalize_local_address(address)
        _check_hash(password_hash)
        domain = addr.rpartition("@")[2]
        with self._write() as conn:
            _require_domain(conn, domain)
            if _is_alias(conn, addr):
                raise DirectoryError(f"{addr} is already an alias")
            cur = conn.execute(
                "INSERT INTO users (address, domain, password_hash) VALUES (%s, %s, %s) "
                "ON CONFLICT DO NOTHING", (addr, domain, password_hash))
            if cur.rowcount == 0:
                raise DirectoryError(f"user {addr} already exists")
        return addr

    def set_password(self, address: str, password_hash: str) -> None:
        addr = normalize_local_address(address)
        _check_hash(password_hash)
        with self._write() as conn:
            cur = conn.execute("UPDATE users SET password_hash = %s WHERE address = %s",
                               (password_hash, addr))
            if cur.rowcount == 0:
                raise DirectoryError(f"no such user: {addr}")

    def upgrade_password_hash(self, address: str, old_hash: str, new_hash: str) -> bool:
        """Replace ``old_hash`` by ``new_hash`` unless the password changed meanwhile."""
        addr = normalize_local_address(address)
        _check_hash(new_hash)
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE users SET password_hash = %s WHERE address = %s AND password_hash = %s",
                (new_hash, addr, old_hash))
            return cur.rowcount == 1

    def remove_user(self, address: str) -> None:
        """Remove the account; its Maildir stays on disk (mail is never deleted silently)."""
        addr = normalize_local_address(address)
        with self._write() as conn:
            if conn.execute("DELETE FROM users WHERE address = %s", (addr,)).rowcount == 0:
                raise DirectoryError(f"no such user: {addr}")
            _forget_target(conn, addr)

    def list_users(self, domain: str | None = None) -> list[str]:
        with self._read() as conn:
            if domain is None:
                rows = conn.execute("SELECT address FROM users ORDER BY domain, address")
            else:
                rows = conn.execute(
                    "SELECT address FROM users WHERE domain = %s ORDER BY address",
                    (normalize_domain(domain),))
            return [r[0] for r in rows]

    # -- aliases -----------------------------------------------------------------------

    def add_alias(self, source: str, targets: list[str]) -> str:
        """Add targets to the alias ``source`` (created if new); returns the source."""
        if not targets:
            raise DirectoryError("an alias needs at least one target")
        src = normalize_local_address(source)
        domain = src.rpartition("@")[2]
        with self._write() as conn:
            _require_domain(conn, domain)
            if _is_user(conn, src):
                raise DirectoryError(f"{src} is a user; an alias cannot have the same address")
            for target in targets:
                t = _check_target(conn, target)
                if t == src:
                    raise DirectoryError(f"{src} cannot be an alias of itself")
                conn.execute(
                    "INSERT INTO aliases (source, domain, target) VALUES (%s, %s, %s) "
                    "ON CONFLICT DO NOTHING", (src, domain, t))
        return src

    def remove_alias(self, source: str, targets: list[str] | None = None) -> None:
        """Remove the whole alias, or only the given targets of it."""
        src = normalize_local_address(source)
        with self._write() as conn:
            if not _is_alias(conn, src):
                raise DirectoryError(f"no such alias: {src}")
            if not targets:
                conn.execute("DELETE FROM aliases WHERE source = %s", (src,))
            for target in targets or ():
                _, domain = _split(target)
                local = _one(conn, "SELECT 1 FROM domains WHERE name = %s",
                             domain.strip().lower().removesuffix(".")) is not None
                t = normalize_local_address(target) if local else _normalize_remote(target)
                cur = conn.execute("DELETE FROM aliases WHERE source = %s AND target = %s",
                                   (src, t))
                if cur.rowcount == 0:
                    raise DirectoryError(f"{t} is not a target of {src}")
            if not _is_alias(conn, src):
                _forget_target(conn, src)

    def list_aliases(self, domain: str | None = None) -> dict[str, list[str]]:
        with self._read() as conn:
            if domain is None:
                rows = conn.execute("SELECT source, target FROM aliases ORDER BY source, id")
            else:
                rows = conn.execute(
                    "SELECT source, target FROM aliases WHERE domain = %s ORDER BY source, id",
                    (normalize_domain(domain),))
            out: dict[str, list[str]] = {}
            for source, target in rows:
                out.setdefault(source, []).append(target)
        return out


# -- helpers on one connection (inside one transaction) -----------------------------------


def _one(conn: psycopg.Connection[Any], sql: str, *params: Any) -> tuple[Any, ...] | None:
    return conn.execute(sql, params).fetchone()


def _is_user(conn: psycopg.Connection[Any], addr: str) -> bool:
    return _one(conn, "SELECT 1 FROM users WHERE address = %s", addr) is not None


def _is_alias(conn: psycopg.Connection[Any], addr: str) -> bool:
    return _one(conn, "SELECT 1 FROM aliases WHERE source = %s LIMIT 1", addr) is not None


def _require_domain(conn: psycopg.Connection[Any], d: str) -> None:
    if _one(conn, "SELECT 1 FROM domains WHERE name = %s", d) is None:
        raise DirectoryError(f"{d} is not a local domain (add it with: mailfort domain add {d})")


def _check_target(conn: psycopg.Connection[Any], target: str) -> str:
    """Normalize a target; a target on a local domain must be a user or an alias."""
    _, domain = _split(target)
    d = normalize_domain(domain)
    if _one(conn, "SELECT 1 FROM domains WHERE name = %s", d) is None:
        return _normalize_remote(target)
    t = normalize_local_address(target)
    if not _is_user(conn, t) and not _is_alias(conn, t):
        raise DirectoryError(f"{t} is neither a user nor an alias here")
    return t


def _forget_target(conn: psycopg.Connection[Any], addr: str) -> None:
    """Drop references to an address that no longer exists (see the SQLite directory)."""
    conn.execute("DELETE FROM aliases WHERE target = %s", (addr,))
    conn.execute("UPDATE domains SET catchall = NULL WHERE catchall = %s", (addr,))


def _expand(conn: psycopg.Connection[Any], start: str) -> tuple[list[str], list[str]]:
    return aliases.expand(
        start, {r[0] for r in conn.execute("SELECT name FROM domains")},
        lambda addr: _is_user(conn, addr),
        lambda addr: [t for (t,) in conn.execute(
            "SELECT target FROM aliases WHERE source = %s ORDER BY id", (addr,))])


def safe_url(url: str) -> str:
    """The URL without anything between ``://`` and ``@`` (config forbids a password
    there, but a message or log line is no place to find out it was not followed)."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else "the configured URL"


def _last_line(exc: BaseException) -> str:
    """The reason of a connection error in one line (libpq's last line is the cause)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
