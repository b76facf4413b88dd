"""The PostgreSQL directory on a real server (tests/pgserver.py): the same contract as the
SQLite one (its generic tests are run here again), the schema migrations, the password
from a file or the environment, and the import of an embedded installation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailfort.directory.migrations import MIGRATIONS
from mailfort.directory.postgresql import PASSWORD_ENV, PostgreSQLDirectory
from mailfort.directory.sqlite import DirectoryError, SQLiteDirectory
from mailfort.directory.transfer import import_from_sqlite
from tests.directory.test_sqlite import (  # the backend-independent contract
    H,
    test_addresses_of,
    test_alias_loops_terminate,
    test_alias_to_users_and_remote,
    test_alias_validation,
    test_catchall_off_by_default_and_only_for_unknown,
    test_catchall_to_remote,
    test_depth_limit,
    test_domains_case_insensitive_and_trailing_dot,
    test_pure_loop_is_undeliverable,
    test_remove_alias_whole_and_partial,
    test_remove_domain_refused_while_in_use,
    test_removed_user_leaves_no_inheritance,
    test_resolve_user_unknown_and_foreign,
    test_set_password_and_remove_user,
    test_threads_have_their_own_connection,
    test_unsafe_local_parts_refused,
    test_user_needs_local_domain_and_argon2_hash,
    test_users_lowercase_and_lookup_any_case,
)
from tests.pgserver import PASSWORD

CONTRACT = [test_addresses_of, test_alias_loops_terminate, test_alias_to_users_and_remote,
            test_alias_validation, test_catchall_off_by_default_and_only_for_unknown,
            test_catchall_to_remote, test_depth_limit,
            test_domains_case_insensitive_and_trailing_dot, test_pure_loop_is_undeliverable,
            test_remove_alias_whole_and_partial, test_remove_domain_refused_while_in_use,
            test_removed_user_leaves_no_inheritance, test_resolve_user_unknown_and_foreign,
            test_set_password_and_remove_user, test_threads_have_their_own_connection,
            test_unsafe_local_parts_refused, test_user_needs_local_domain_and_argon2_hash,
            test_users_lowercase_and_lookup_any_case]


@pytest.fixture(scope="module")
def shared_db(postgres_server: Any) -> Iterator[PostgreSQLDirectory]:
    """One migrated database for this module's contract tests (emptied before each)."""
    url = postgres_server.url(postgres_server.create_database())
    directory = PostgreSQLDirectory(url, password=PASSWORD, check_schema=False)
    directory.migrate()
    yield directory
    directory.close()


@pytest.fixture
def d(shared_db: PostgreSQLDirectory) -> PostgreSQLDirectory:
    with shared_db._write() as conn:
        conn.execute("TRUNCATE aliases, users, domains")
    shared_db.add_domain("Example.TEST")
    shared_db.add_user("alice@example.test", H)
    shared_db.add_user("bob@example.test", H)
    return shared_db


@pytest.fixture
def fresh_url(postgres_server: Any) -> str:
    return str(postgres_server.url(postgres_server.create_database()))


def test_contract_is_complete() -> None:
    """Every contract test named above is collected here (a rename would drop it)."""
    assert all(t.__name__ in globals() for t in CONTRACT)


def test_migrate_creates_schema_once(fresh_url: str) -> None:
    with pytest.raises(DirectoryError, match=r"version 0.*mailfort db migrate"):
        PostgreSQLDirectory(fresh_url, password=PASSWORD)
    with PostgreSQLDirectory(fresh_url, password=PASSWORD, check_schema=False) as d:
        assert d.migrate() == [v for v, _ in MIGRATIONS]
        assert d.migrate() == []  # a second run (or a second host) has nothing to do
        with d._read() as conn:
            tables = {r[0] for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"domains", "users", "aliases", "mailfort_schema"} <= tables
    with PostgreSQLDirectory(fresh_url, password=PASSWORD) as d:  # now accepted
        assert d.schema_version() == MIGRATIONS[-1][0]
        with d._write() as conn, pytest.raises(Exception, match="check"):
            conn.execute("INSERT INTO domains VALUES ('x.test', NULL)")
            conn.execute("INSERT INTO users VALUES ('a@x.test', 'x.test', 'plaintext')")


def test_wrong_password_is_a_clear_error_without_the_secret(fresh_url: str) -> None:
    with pytest.raises(DirectoryError) as err:
        PostgreSQLDirectory(fresh_url, password="wrong-" + PASSWORD, timeout=2)
    assert "password authentication failed" in str(err.value)
    assert PASSWORD not in str(err.value)


def test_password_from_environment(fresh_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailfort.config import DirectoryConfig

    cfg = DirectoryConfig(backend="postgresql", url=fresh_url)
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    with PostgreSQLDirectory.from_config(cfg, check_schema=False) as d:
        assert d.schema_version() == 0
    monkeypatch.delenv(PASSWORD_ENV)
    with pytest.raises(DirectoryError, match="password"):
        PostgreSQLDirectory.from_config(DirectoryConfig(backend="postgresql", url=fresh_url,
                                                        timeout=2))


def _embedded(path: Path) -> SQLiteDirectory:
    s = SQLiteDirectory(path)
    s.add_domain("example.test")
    s.add_domain("other.test")
    s.add_user("alice@example.test", H)
    s.add_user("bob@example.test", H.replace("aGFzaA", "Ym9i"))
    s.add_alias("team@example.test", ["bob@example.test", "alice@example.test", "x@far.test"])
    s.add_alias("all@other.test", ["team@example.test"])
    s.set_catchall("example.test", "alice@example.test")
    return s


def test_import_from_sqlite_round_trips_and_is_idempotent(tmp_path: Path,
                                                          d: PostgreSQLDirectory) -> None:
    with d._write() as conn:
        conn.execute("TRUNCATE aliases, users, domains")
    src = _embedded(tmp_path / "directory.sqlite3")
    r = import_from_sqlite(d, src.path)
    assert (r.domains, r.users, r.aliases, r.skipped) == (2, 2, 4, 0)
    for method in ("list_domains", "list_users", "list_aliases"):
        assert getattr(d, method)() == getattr(src, method)(), method
    for user in src.list_users():
        assert d.password_hash(user) == src.password_hash(user)
    assert d.catchall("example.test") == "alice@example.test"
    assert d.resolve("all@other.test") == src.resolve("all@other.test")
    assert d.resolve("nobody@example.test") == src.resolve("nobody@example.test")
    again = import_from_sqlite(d, src.path)
    assert (again.domains, again.users, again.aliases, again.skipped) == (0, 0, 0, 8)
    assert d.list_aliases() == src.list_aliases()


def test_import_refuses_conflicts_and_changes_nothing(tmp_path: Path,
                                                      d: PostgreSQLDirectory) -> None:
    src = _embedded(tmp_path / "directory.sqlite3")
    before = (d.list_domains(), d.list_users(), d.list_aliases())
    with pytest.raises(DirectoryError, match=r"nothing changed.*bob@example.test.*password"):
        import_from_sqlite(d, src.path)  # bob's hash differs from the one in PostgreSQL
    assert (d.list_domains(), d.list_users(), d.list_aliases()) == before


# Run the SQLite directory's contract tests against PostgreSQL too.
for _t in CONTRACT:
    globals()[_t.__name__] = _t
