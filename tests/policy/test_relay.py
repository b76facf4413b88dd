"""The recipient decision at RCPT, against a real SQLite directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailfort.directory.sqlite import SQLiteDirectory
from mailfort.passwords import hash_password
from mailfort.policy.relay import decide_recipient
from mailfort.protocol.address import parse_mail_argument


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> SQLiteDirectory:
    d = SQLiteDirectory(Path(tmp_path_factory.mktemp("dir")) / "directory.sqlite3")
    d.add_domain("local.test")
    h = hash_password("a long password")
    d.add_user("u@local.test", h)
    d.add_user("v@local.test", h)
    d.add_alias("team@local.test", ["u@local.test", "v@local.test", "x@remote.test"])
    return d


def decide(directory: SQLiteDirectory, path: str, *, may_relay: bool = False) -> tuple[str, ...]:
    mbox, _ = parse_mail_argument(f"TO:{path}", prefix="TO:", null_allowed=False,
                                  smtputf8_allowed=False)
    assert mbox is not None
    d = decide_recipient(mbox, directory, may_relay=may_relay)
    r = d.reply
    return (str(r.code), r.enhanced, *(d.resolution.local if d.resolution else ()))


@pytest.mark.parametrize(
    "path",
    [
        "<victim@foreign.test>",
        "<victim@FOREIGN.TEST>",
        "<@local.test:victim@foreign.test>",
        "<victim@evil-local.test>",
        "<victim@local.test.foreign>",
        "<u@sub.local.test>",
    ],
)
def test_foreign_domains_are_not_relayed(directory: SQLiteDirectory, path: str) -> None:
    assert decide(directory, path) == ("554", "5.7.1")


@pytest.mark.parametrize(
    "path",
    [
        "<victim%foreign.test@local.test>",
        '<"victim@foreign.test"@local.test>',
        '<"victim%foreign.test"@local.test>',
        "<foreign.test!victim@local.test>",
        "<nobody@local.test>",
    ],
)
def test_tricks_on_local_domain_are_unknown_users(directory: SQLiteDirectory, path: str) -> None:
    assert decide(directory, path) == ("550", "5.1.1")


def test_address_literal_never_accepted(directory: SQLiteDirectory) -> None:
    assert decide(directory, "<u@[127.0.0.1]>") == ("554", "5.7.1")
    assert decide(directory, "<u@[127.0.0.1]>", may_relay=True) == ("554", "5.7.1")


def test_case_resolves_to_the_local_user(directory: SQLiteDirectory) -> None:
    assert decide(directory, "<U@LOCAL.TEST>") == ("250", "2.1.5", "u@local.test")


def test_alias_expands_to_local_and_remote(directory: SQLiteDirectory) -> None:
    mbox, _ = parse_mail_argument("TO:<team@local.test>", prefix="TO:", null_allowed=False,
                                  smtputf8_allowed=False)
    assert mbox is not None
    d = decide_recipient(mbox, directory, may_relay=False)
    assert d.reply.code == 250 and not d.relay
    assert d.resolution is not None
    assert set(d.resolution.local) == {"u@local.test", "v@local.test"}
    assert d.resolution.remote == ("x@remote.test",)


def test_authenticated_relay(directory: SQLiteDirectory) -> None:
    mbox, _ = parse_mail_argument("TO:<x@remote.test>", prefix="TO:", null_allowed=False,
                                  smtputf8_allowed=False)
    assert mbox is not None
    d = decide_recipient(mbox, directory, may_relay=True)
    assert d.relay and d.reply.code == 250
    assert d.resolution is not None and d.resolution.remote == ("x@remote.test",)
