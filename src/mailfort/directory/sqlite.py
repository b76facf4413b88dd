"""The embedded directory: domains, users, aliases and password hashes in one SQLite file.

WAL mode lets the server read while ``mailfort user add`` writes from another process.
Each thread gets its own connection; reads are single indexed lookups, cheap enough to
run on the asyncio loop. What the MX asks at every RCPT (``is_local_domain``, ``resolve``:
five queries) is cached per thread and checked with one ``PRAGMA data_version`` per
lookup, which changes as soon as any other connection (another process) commits; the
connection's own commits clear the cache. So a change is seen by the next lookup, as
without the cache. Addresses are stored lowercase, and a user's local part is
limited to a safe set because it becomes a Maildir directory name. The file holds
password hashes, so it is created readable by its owner only.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

from mailfort.directory import aliases
from mailfort.directory.aliases import MAX_ALIAS_DEPTH
from mailfort.directory.base import Resolution

LOOKUP_CACHE_MAX = 4096  # cached lookups per thread; a full cache starts over
_MISS = object()

_LOCAL_RE = re.compile(r"[a-z0-9_+\-][a-z0-9._+\-]{0,63}")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# A remote target's local part: RFC 5321 dot-atom characters, no quoting, no routing.
_REMOTE_LOCAL_RE = re.compile(r"[A-Za-z0-9!#$&'*+/=?^_`{|}~.\-]{1,64}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS domains (
    name TEXT PRIMARY KEY,
    catchall TEXT
);
CREATE TABLE IF NOT EXISTS users (
    address TEXT PRIMARY KEY,
    domain TEXT NOT NULL REFERENCES domains(name),
    password_hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS users_domain ON users(domain);
CREATE TABLE IF NOT EXISTS aliases (
    source TEXT NOT NULL,
    domain TEXT NOT NULL REFERENCES domains(name),
    target TEXT NOT NULL,
    PRIMARY KEY (source, target)
);
CREATE INDEX IF NOT EXISTS aliases_target ON aliases(target);
CREATE INDEX IF NOT EXISTS aliases_domain ON aliases(domain);
PRAGMA user_version = 1;
"""


class DirectoryError(ValueError):
    """An admin operation was refused (bad name, unknown domain, duplicate...)."""


def normalize_domain(domain: str) -> str:
    """Lowercase, without a trailing dot; DirectoryError unless a plain DNS name."""
    d = domain.strip().lower().removesuffix(".")
    if not d or len(d) > 253 or "." not in d or not all(
        _LABEL_RE.fullmatch(label) for label in d.split(".")
    ):
        raise DirectoryError(f"{domain!r} is not a valid domain name (e.g. example.org)")
    return d


def _split(address: str) -> tuple[str, str]:
    local, at, domain = address.strip().rpartition("@")
    if not at or not local:
        raise DirectoryError(f"{address!r} is not an address (expected local@domain)")
    return local, domain


def normalize_local_address(address: str) -> str:
    """``local@domain`` lowercased, with the local part in the Maildir-safe set."""
    local, domain = _split(address)
    low = local.lower()
    if not _LOCAL_RE.fullmatch(low) or ".." in low:
        raise DirectoryError(
            f"{address!r}: the local part may only use a-z 0-9 . _ + - (no leading dot, "
            "no '..', at most 64 characters)"
        )
    return f"{low}@{normalize_domain(domain)}"


def _normalize_remote(address: str) -> str:
    local, domain = _split(address)
    if not _REMOTE_LOCAL_RE.fullmatch(local) or local.startswith(".") or ".." in local:
        raise DirectoryError(f"{address!r}: unsupported local part for a forwarding target")
    return f"{local}@{normalize_domain(domain)}"


def _lookup_key(address: str) -> tuple[str, str] | None:
    """(local@domain lowercased, domain) for lookups, or None when it cannot be ours."""
    local, at, domain = address.strip().rpartition("@")
    if not at:
        return None
    local = local.lower()
    domain = domain.lower().removesuffix(".")
    if not _LOCAL_RE.fullmatch(local) or ".." in local:
        return None
    return f"{local}@{domain}", domain


class SQLiteDirectory:
    """The ``Directory`` protocol over SQLite, plus the admin methods the CLI uses."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            # Create it 0600 ourselves: sqlite would honour the umask (often world-readable).
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        conn = self._conn()
        conn.executescript(_SCHEMA)

    # -- connections ------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10.0
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")
        finally:
            # data_version does not move for a connection's own commits: drop the cache.
            self._local.cache = None

    def _lookup_cache(self) -> dict[tuple[str, str], object]:
        """This thread's cache of lookups, emptied when the database changed since."""
        local = self._local
        version = self._conn().execute("PRAGMA data_version").fetchone()[0]
        cache: dict[tuple[str, str], object] | None = getattr(local, "cache", None)
        if cache is None or local.version != version or len(cache) >= LOOKUP_CACHE_MAX:
            cache = local.cache = {}
            local.version = version
        return cache

    def close(self) -> None:
        """Close every connection this object opened (call when no thread uses it)."""
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    def __enter__(self) -> SQLiteDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- Directory protocol ---------------------------------------------------------

    def is_local_domain(self, domain: str) -> bool:
        d = domain.strip().lower().removesuffix(".")
        cache = self._lookup_cache()
        found = cache.get(("domain", d), _MISS)
        if found is _MISS:
            row = self._conn().execute("SELECT 1 FROM domains WHERE name = ?", (d,)).fetchone()
            found = cache["domain", d] = row is not None
        return bool(found)

    def password_hash(self, user: str) -> str | None:
        key = _lookup_key(user)
        if key is None:
            return None
        row = self._conn().execute(
            "SELECT password_hash FROM users WHERE address = ?", (key[0],)
        ).fetchone()
        return row[0] if row else None

    def canonical_user(self, user: str) -> str | None:
        """The stored address of a user given in any case, None when unknown."""
        key = _lookup_key(user)
        if key is None:
            return None
        row = self._conn().execute(
            "SELECT address FROM users WHERE address = ?", (key[0],)
        ).fetchone()
        return row[0] if row else None

    def resolve(self, address: str) -> Resolution | None:
        key = _lookup_key(address)
        if key is None:
            return None
        cache = self._lookup_cache()
        found = cache.get(("resolve", key[0]), _MISS)
        if found is _MISS:
            found = cache["resolve", key[0]] = self._resolve(*key)
        return cast(Resolution | None, found)

    def _resolve(self, addr: str, domain: str) -> Resolution | None:
        conn = self._conn()
        row = conn.execute("SELECT catchall FROM domains WHERE name = ?", (domain,)).fetchone()
        if row is None:
            return None
        catchall: str | None = row[0]
        start = addr
        if not self._is_user(conn, addr) and not self._is_alias(conn, addr):
            if catchall is None:
                return None
            start = catchall
        local, remote = self._expand(conn, start)
        if not local and not remote:
            return None
        return Resolution(local=tuple(local), remote=tuple(remote))

    def addresses_of(self, user: str) -> frozenset[str]:
        canonical = self.canonical_user(user)
        if canonical is None:
            return frozenset()
        conn = self._conn()
        found = {canonical}
        frontier = [canonical]
        for _ in range(MAX_ALIAS_DEPTH):
            nxt: list[str] = []
            for target in frontier:
                for (source,) in conn.execute(
                    "SELECT source FROM aliases WHERE target = ?", (target,)
                ):
                    if source not in found:
                        found.add(source)
                        nxt.append(source)
            if not nxt:
                break
            frontier = nxt
        return frozenset(found)

    # -- expansion ---------------------------------------------------------------------

    @staticmethod
    def _is_user(conn: sqlite3.Connection, addr: str) -> bool:
        return conn.execute("SELECT 1 FROM users WHERE address = ?", (addr,)).fetchone() is not None

    @staticmethod
    def _is_alias(conn: sqlite3.Connection, addr: str) -> bool:
        row = conn.execute("SELECT 1 FROM aliases WHERE source = ? LIMIT 1", (addr,)).fetchone()
        return row is not None

    def _expand(self, conn: sqlite3.Connection, start: str) -> tuple[list[str], list[str]]:
        return aliases.expand(
            start, {r[0] for r in conn.execute("SELECT name FROM domains")},
            lambda addr: self._is_user(conn, addr),
            lambda addr: [t for (t,) in conn.execute(
                "SELECT target FROM aliases WHERE source = ? ORDER BY rowid", (addr,))])

    # -- domains -----------------------------------------------------------------------

    def add_domain(self, domain: str) -> str:
        d = normalize_domain(domain)
        with self._write() as conn:
            try:
                conn.execute("INSERT INTO domains (name) VALUES (?)", (d,))
            except sqlite3.IntegrityError:
                raise DirectoryError(f"domain {d} already exists") from None
        return d

    def remove_domain(self, domain: str) -> None:
        """Refused while users or aliases remain: removing mail accounts is explicit."""
        d = normalize_domain(domain)
        with self._write() as conn:
            self._require_domain(conn, d)
            users = conn.execute("SELECT count(*) FROM users WHERE domain = ?", (d,)).fetchone()
            aliases = conn.execute(
                "SELECT count(DISTINCT source) FROM aliases WHERE domain = ?", (d,)
            ).fetchone()
            if users[0] or aliases[0]:
                raise DirectoryError(
                    f"domain {d} still has {users[0]} user(s) and {aliases[0]} alias(es); "
                    "remove them first"
                )
            conn.execute("DELETE FROM domains WHERE name = ?", (d,))

    def list_domains(self) -> list[str]:
        return [r[0] for r in self._conn().execute("SELECT name FROM domains ORDER BY name")]

    def catchall(self, domain: str) -> str | None:
        d = domain.strip().lower().removesuffix(".")
        row = self._conn().execute("SELECT catchall FROM domains WHERE name = ?", (d,)).fetchone()
        return row[0] if row else None

    def set_catchall(self, domain: str, target: str | None) -> None:
        """Send mail for unknown addresses of ``domain`` to ``target``; None turns it off.

        Off by default: a catch-all accepts everything, including spam to guessed names.
        """
        d = normalize_domain(domain)
        with self._write() as conn:
            self._require_domain(conn, d)
            t = None if target is None else self._check_target(conn, target)
            conn.execute("UPDATE domains SET catchall = ? WHERE name = ?", (t, d))

    @staticmethod
    def _require_domain(conn: sqlite3.Connection, d: str) -> None:
        if conn.execute("SELECT 1 FROM domains WHERE name = ?", (d,)).fetchone() is None:
            raise DirectoryError(
                f"{d} is not a local domain (add it with: mailfort domain add {d})"
            )

    # -- users ------------------------------------------------------------------------

    def add_user(self, address: str, password_hash: str) -> str:
        addr = normalize_local_address(address)
        _check_hash(password_hash)
        domain = addr.rpartition("@")[2]
        with self._write() as conn:
            self._require_domain(conn, domain)
            if self._is_alias(conn, addr):
                raise DirectoryError(f"{addr} is already an alias")
            try:
                conn.execute(
                    "INSERT INTO users (address, domain, password_hash) VALUES (?, ?, ?)",
                    (addr, domain, password_hash),
                )
            except sqlite3.IntegrityError:
                raise DirectoryError(f"user {addr} already exists") from None
        return addr

    def set_password(self, address: str, password_hash: str) -> None:
        addr = normalize_local_address(address)
        _check_hash(password_hash)
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE users SET password_hash = ? WHERE address = ?", (password_hash, addr)
            )
            if cur.rowcount == 0:
                raise DirectoryError(f"no such user: {addr}")

    def upgrade_password_hash(self, address: str, old_hash: str, new_hash: str) -> bool:
        """Replace ``old_hash`` by ``new_hash`` (same password, current parameters), unless
        the password was changed meanwhile; True if it was replaced."""
        addr = normalize_local_address(address)
        _check_hash(new_hash)
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE users SET password_hash = ? WHERE address = ? AND password_hash = ?",
                (new_hash, addr, old_hash),
            )
        return cur.rowcount == 1

    def remove_user(self, address: str) -> None:
        """Remove the account; its Maildir stays on disk (mail is never deleted silently)."""
        addr = normalize_local_address(address)
        with self._write() as conn:
            if conn.execute("DELETE FROM users WHERE address = ?", (addr,)).rowcount == 0:
                raise DirectoryError(f"no such user: {addr}")
            self._forget_target(conn, addr)

    def list_users(self, domain: str | None = None) -> list[str]:
        conn = self._conn()
        if domain is None:
            rows = conn.execute("SELECT address FROM users ORDER BY domain, address")
        else:
            d = normalize_domain(domain)
            rows = conn.execute("SELECT address FROM users WHERE domain = ? ORDER BY address", (d,))
        return [r[0] for r in rows]

    # -- aliases ------------------------------------------------------------------------

    def _check_target(self, conn: sqlite3.Connection, target: str) -> str:
        """Normalize a target; a target on a local domain must be a user or an alias."""
        _, domain = _split(target)
        d = normalize_domain(domain)
        if conn.execute("SELECT 1 FROM domains WHERE name = ?", (d,)).fetchone() is None:
            return _normalize_remote(target)
        t = normalize_local_address(target)
        if not self._is_user(conn, t) and not self._is_alias(conn, t):
            raise DirectoryError(f"{t} is neither a user nor an alias here")
        return t

    def add_alias(self, source: str, targets: list[str]) -> str:
        """Add targets to the alias ``source`` (created if new); returns the source."""
        if not targets:
            raise DirectoryError("an alias needs at least one target")
        src = normalize_local_address(source)
        domain = src.rpartition("@")[2]
        with self._write() as conn:
            self._require_domain(conn, domain)
            if self._is_user(conn, src):
                raise DirectoryError(f"{src} is a user; an alias cannot have the same address")
            for target in targets:
                t = self._check_target(conn, target)
                if t == src:
                    raise DirectoryError(f"{src} cannot be an alias of itself")
                conn.execute(
                    "INSERT OR IGNORE INTO aliases (source, domain, target) VALUES (?, ?, ?)",
                    (src, domain, t),
                )
        return src

    def remove_alias(self, source: str, targets: list[str] | None = None) -> None:
        """Remove the whole alias, or only the given targets of it."""
        src = normalize_local_address(source)
        with self._write() as conn:
            if not self._is_alias(conn, src):
                raise DirectoryError(f"no such alias: {src}")
            if not targets:
                conn.execute("DELETE FROM aliases WHERE source = ?", (src,))
            for target in targets or ():
                _, domain = _split(target)
                local = self.is_local_domain(domain)
                t = normalize_local_address(target) if local else _normalize_remote(target)
                cur = conn.execute(
                    "DELETE FROM aliases WHERE source = ? AND target = ?", (src, t)
                )
                if cur.rowcount == 0:
                    raise DirectoryError(f"{t} is not a target of {src}")
            if not self._is_alias(conn, src):
                self._forget_target(conn, src)

    @staticmethod
    def _forget_target(conn: sqlite3.Connection, addr: str) -> None:
        """Drop references to an address that no longer exists, so that whoever gets the
        address next does not inherit its aliases (mail, and the right to send as them)."""
        conn.execute("DELETE FROM aliases WHERE target = ?", (addr,))
        conn.execute("UPDATE domains SET catchall = NULL WHERE catchall = ?", (addr,))

    def list_aliases(self, domain: str | None = None) -> dict[str, list[str]]:
        conn = self._conn()
        if domain is None:
            rows = conn.execute("SELECT source, target FROM aliases ORDER BY source, rowid")
        else:
            rows = conn.execute(
                "SELECT source, target FROM aliases WHERE domain = ? ORDER BY source, rowid",
                (normalize_domain(domain),),
            )
        out: dict[str, list[str]] = {}
        for source, target in rows:
            out.setdefault(source, []).append(target)
        return out


def _check_hash(password_hash: str) -> None:
    # Guards against storing a plaintext password by mistake.
    if not password_hash.startswith("$argon2"):
        raise DirectoryError("password_hash must be an argon2 hash (see mailfort.passwords)")
