"""The SQLite directory on a real file: admin operations, lookups and alias expansion."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from mailfort.directory.base import Resolution
from mailfort.directory.sqlite import (
    LOOKUP_CACHE_MAX,
    MAX_ALIAS_DEPTH,
    DirectoryError,
    SQLiteDirectory,
)

H = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA"  # shape of a hash; never verified here


@pytest.fixture
def d(tmp_path: Path) -> SQLiteDirectory:
    directory = SQLiteDirectory(tmp_path / "directory.sqlite3")
    directory.add_domain("Example.TEST")
    directory.add_user("alice@example.test", H)
    directory.add_user("bob@example.test", H)
    return directory


def test_file_is_private_and_in_wal_mode(d: SQLiteDirectory) -> None:
    assert stat.S_IMODE(os.stat(d.path).st_mode) == 0o600
    mode = d._conn().execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_domains_case_insensitive_and_trailing_dot(d: SQLiteDirectory) -> None:
    assert d.list_domains() == ["example.test"]
    assert d.is_local_domain("EXAMPLE.test.")
    assert not d.is_local_domain("other.test")
    with pytest.raises(DirectoryError, match="already exists"):
        d.add_domain("example.TEST")
    for bad in ("", "nodot", "bad_char.test", "-lead.test", "a..b.test"):
        with pytest.raises(DirectoryError, match="not a valid domain"):
            d.add_domain(bad)


def test_persisted_across_reopen(tmp_path: Path, d: SQLiteDirectory) -> None:
    d.close()
    again = SQLiteDirectory(tmp_path / "directory.sqlite3")
    assert again.list_users() == ["alice@example.test", "bob@example.test"]


def test_users_lowercase_and_lookup_any_case(d: SQLiteDirectory) -> None:
    d.add_user("Carol.X+tag@EXAMPLE.test", H)
    assert "carol.x+tag@example.test" in d.list_users("example.test")
    assert d.password_hash("CAROL.x+TAG@example.TEST.") == H
    assert d.canonical_user("ALICE@Example.Test") == "alice@example.test"
    assert d.password_hash("nobody@example.test") is None
    with pytest.raises(DirectoryError, match="already exists"):
        d.add_user("ALICE@example.test", H)


@pytest.mark.parametrize(
    "bad", [".hidden@example.test", "a/b@example.test", "../x@example.test", "a b@example.test",
            "x" * 65 + "@example.test", "a..b@example.test", '"q"@example.test', "noat"],
)
def test_unsafe_local_parts_refused(d: SQLiteDirectory, bad: str) -> None:
    with pytest.raises(DirectoryError):
        d.add_user(bad, H)
    assert d.password_hash(bad) is None


def test_user_needs_local_domain_and_argon2_hash(d: SQLiteDirectory) -> None:
    with pytest.raises(DirectoryError, match="not a local domain"):
        d.add_user("eve@other.test", H)
    with pytest.raises(DirectoryError, match="argon2"):
        d.add_user("eve@example.test", "plaintext-password")
    assert d.list_users() == ["alice@example.test", "bob@example.test"]


def test_set_password_and_remove_user(d: SQLiteDirectory) -> None:
    h2 = H + "x"
    d.set_password("ALICE@example.test", h2)
    assert d.password_hash("alice@example.test") == h2
    d.remove_user("alice@example.test")
    assert d.password_hash("alice@example.test") is None
    assert d.resolve("alice@example.test") is None
    with pytest.raises(DirectoryError, match="no such user"):
        d.set_password("alice@example.test", H)
    with pytest.raises(DirectoryError, match="no such user"):
        d.remove_user("alice@example.test")


def test_resolve_user_unknown_and_foreign(d: SQLiteDirectory) -> None:
    assert d.resolve("Alice@EXAMPLE.test") == Resolution(("alice@example.test",), ())
    assert d.resolve("nobody@example.test") is None
    assert d.resolve("alice@other.test") is None
    assert d.resolve("alice@[127.0.0.1]") is None
    assert d.resolve("alice%other.test@example.test") is None


def test_alias_to_users_and_remote(d: SQLiteDirectory) -> None:
    d.add_alias("Team@example.test", ["alice@example.test", "BOB@example.test"])
    d.add_alias("fwd@example.test", ["Someone@Remote.Test", "team@example.test"])
    assert d.resolve("team@example.test") == Resolution(
        ("alice@example.test", "bob@example.test"), ()
    )
    res = d.resolve("FWD@example.test")
    assert res is not None
    assert set(res.local) == {"alice@example.test", "bob@example.test"}
    assert res.remote == ("Someone@remote.test",)  # remote local part keeps its case
    assert d.list_aliases() == {
        "fwd@example.test": ["Someone@remote.test", "team@example.test"],
        "team@example.test": ["alice@example.test", "bob@example.test"],
    }


def test_alias_validation(d: SQLiteDirectory) -> None:
    with pytest.raises(DirectoryError, match="neither a user nor an alias"):
        d.add_alias("x@example.test", ["ghost@example.test"])
    with pytest.raises(DirectoryError, match="is a user"):
        d.add_alias("alice@example.test", ["bob@example.test"])
    with pytest.raises(DirectoryError, match="not a local domain"):
        d.add_alias("x@other.test", ["bob@example.test"])
    with pytest.raises(DirectoryError, match="at least one"):
        d.add_alias("x@example.test", [])
    with pytest.raises(DirectoryError):
        d.add_alias("x@example.test", ['"a b"@remote.test'])
    d.add_alias("x@example.test", ["bob@example.test"])
    with pytest.raises(DirectoryError, match="already an alias"):
        d.add_user("x@example.test", H)
    assert d.list_aliases() == {"x@example.test": ["bob@example.test"]}


def test_alias_loops_terminate(d: SQLiteDirectory) -> None:
    d.add_alias("a@example.test", ["alice@example.test"])
    d.add_alias("b@example.test", ["a@example.test"])
    d.add_alias("a@example.test", ["b@example.test"])  # a -> b -> a
    assert d.resolve("a@example.test") == Resolution(("alice@example.test",), ())
    assert d.resolve("b@example.test") == Resolution(("alice@example.test",), ())


def test_pure_loop_is_undeliverable(d: SQLiteDirectory) -> None:
    d.add_alias("p@example.test", ["bob@example.test"])
    d.add_alias("q@example.test", ["p@example.test"])
    d.add_alias("p@example.test", ["q@example.test"])
    d.remove_alias("p@example.test", ["bob@example.test"])
    assert d.resolve("p@example.test") is None
    assert d.resolve("q@example.test") is None


def test_depth_limit(d: SQLiteDirectory) -> None:
    prev = "alice@example.test"
    for i in range(MAX_ALIAS_DEPTH + 1):
        d.add_alias(f"l{i}@example.test", [prev])
        prev = f"l{i}@example.test"
    # l{MAX-1} is MAX levels above alice: still reached; l{MAX} is one too deep.
    assert d.resolve(f"l{MAX_ALIAS_DEPTH - 1}@example.test") == Resolution(
        ("alice@example.test",), ()
    )
    assert d.resolve(f"l{MAX_ALIAS_DEPTH}@example.test") is None
    mine = d.addresses_of("alice@example.test")
    assert f"l{MAX_ALIAS_DEPTH - 1}@example.test" in mine
    assert f"l{MAX_ALIAS_DEPTH}@example.test" not in mine


def test_catchall_off_by_default_and_only_for_unknown(d: SQLiteDirectory) -> None:
    assert d.resolve("random@example.test") is None
    d.add_alias("team@example.test", ["bob@example.test"])
    d.set_catchall("EXAMPLE.test", "alice@example.test")
    assert d.catchall("example.test") == "alice@example.test"
    assert d.resolve("random@example.test") == Resolution(("alice@example.test",), ())
    assert d.resolve("bob@example.test") == Resolution(("bob@example.test",), ())
    assert d.resolve("team@example.test") == Resolution(("bob@example.test",), ())
    # Odd local parts are never ours, catch-all or not.
    assert d.resolve("a%b@example.test") is None
    d.set_catchall("example.test", None)
    assert d.resolve("random@example.test") is None
    with pytest.raises(DirectoryError, match="neither a user"):
        d.set_catchall("example.test", "ghost@example.test")


def test_catchall_to_remote(d: SQLiteDirectory) -> None:
    d.set_catchall("example.test", "archive@remote.test")
    assert d.resolve("x@example.test") == Resolution((), ("archive@remote.test",))


def test_addresses_of(d: SQLiteDirectory) -> None:
    d.add_alias("team@example.test", ["alice@example.test", "bob@example.test"])
    d.add_alias("all@example.test", ["team@example.test"])
    d.add_alias("ext@example.test", ["someone@remote.test"])
    assert d.addresses_of("ALICE@example.test") == {
        "alice@example.test", "team@example.test", "all@example.test"
    }
    assert d.addresses_of("nobody@example.test") == frozenset()


def test_removed_user_leaves_no_inheritance(d: SQLiteDirectory) -> None:
    d.add_alias("team@example.test", ["alice@example.test", "bob@example.test"])
    d.set_catchall("example.test", "alice@example.test")
    d.remove_user("alice@example.test")
    d.add_user("alice@example.test", H)  # a new person gets the old address
    assert d.addresses_of("alice@example.test") == {"alice@example.test"}
    assert d.resolve("team@example.test") == Resolution(("bob@example.test",), ())
    assert d.catchall("example.test") is None


def test_remove_alias_whole_and_partial(d: SQLiteDirectory) -> None:
    d.add_alias("team@example.test", ["alice@example.test", "bob@example.test"])
    d.remove_alias("team@example.test", ["ALICE@example.test"])
    assert d.list_aliases() == {"team@example.test": ["bob@example.test"]}
    with pytest.raises(DirectoryError, match="not a target"):
        d.remove_alias("team@example.test", ["alice@example.test"])
    d.remove_alias("team@example.test")
    assert d.list_aliases() == {}
    with pytest.raises(DirectoryError, match="no such alias"):
        d.remove_alias("team@example.test")


def test_remove_domain_refused_while_in_use(d: SQLiteDirectory) -> None:
    with pytest.raises(DirectoryError, match="still has 2 user"):
        d.remove_domain("example.test")
    d.remove_user("alice@example.test")
    d.remove_user("bob@example.test")
    d.remove_domain("EXAMPLE.test")
    assert d.list_domains() == []
    with pytest.raises(DirectoryError, match="not a local domain"):
        d.remove_domain("example.test")


def test_threads_have_their_own_connection(d: SQLiteDirectory) -> None:
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            d.add_user(f"t{i}@example.test", H)
            for _ in range(20):
                assert d.password_hash(f"t{i}@example.test") == H
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(d.list_users()) == 10


def test_second_process_view_sees_writes(tmp_path: Path, d: SQLiteDirectory) -> None:
    other = SQLiteDirectory(tmp_path / "directory.sqlite3")
    other.add_user("dave@example.test", H)
    assert d.password_hash("dave@example.test") == H


def _statements(d: SQLiteDirectory) -> list[str]:
    """The SQL statements this thread's connection runs from now on."""
    seen: list[str] = []
    d._conn().set_trace_callback(seen.append)
    return seen


def test_repeated_rcpt_lookups_run_only_the_change_check(d: SQLiteDirectory) -> None:
    """The MX asks is_local_domain + resolve for every RCPT (five indexed queries); a
    repeat of the same lookup, with nothing changed since, costs one PRAGMA data_version."""
    d.add_alias("team@example.test", ["alice@example.test", "bob@example.test"])
    first = (d.is_local_domain("example.test"), d.resolve("Team@Example.test"),
             d.resolve("nobody@example.test"))
    seen = _statements(d)
    again = (d.is_local_domain("EXAMPLE.test."), d.resolve("team@example.test"),
             d.resolve("nobody@example.test"))
    assert again == first
    assert first[1] == Resolution(local=("alice@example.test", "bob@example.test"), remote=())
    assert seen == ["PRAGMA data_version"] * 3


def test_cached_lookups_see_writes_from_another_connection_at_once(
        tmp_path: Path, d: SQLiteDirectory) -> None:
    """``mailfort user add/del`` from another process: the next RCPT sees it."""
    assert d.resolve("dave@example.test") is None
    assert d.resolve("alice@example.test") is not None
    assert not d.is_local_domain("other.test")
    admin = SQLiteDirectory(tmp_path / "directory.sqlite3")
    admin.add_user("dave@example.test", H)
    admin.remove_user("alice@example.test")
    admin.add_domain("other.test")
    assert d.resolve("dave@example.test") == Resolution(local=("dave@example.test",), remote=())
    assert d.resolve("alice@example.test") is None
    assert d.is_local_domain("other.test")


def test_cached_lookups_see_writes_through_the_same_connection(d: SQLiteDirectory) -> None:
    """A connection's own commits do not move its data_version: they clear the cache."""
    assert d.resolve("carol@example.test") is None
    d.add_user("carol@example.test", H)
    assert d.resolve("carol@example.test") == Resolution(local=("carol@example.test",), remote=())
    assert d.resolve("help@example.test") is None
    d.add_alias("help@example.test", ["carol@example.test"])
    assert d.resolve("help@example.test") == Resolution(local=("carol@example.test",), remote=())
    d.remove_user("carol@example.test")
    assert d.resolve("carol@example.test") is None


def test_lookup_cache_is_bounded(d: SQLiteDirectory) -> None:
    """A client probing random recipients cannot grow the cache without bound."""
    for i in range(3 * LOOKUP_CACHE_MAX):
        d.resolve(f"probe{i}@example.test")
    assert len(d._local.cache) <= LOOKUP_CACHE_MAX
