"""The recipient decision at RCPT, against an in-test directory and the real SQLite one.

``DictDirectory`` is a minimal implementation of our own ``Directory`` protocol, so the
policy is tested on its own; the same tests then run against ``SQLiteDirectory``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailfort.directory.base import Directory, Resolution
from mailfort.directory.sqlite import SQLiteDirectory
from mailfort.passwords import hash_password
from mailfort.policy.relay import RecipientDecision, decide_recipient
from mailfort.protocol.address import Mailbox, parse_mail_argument


class DictDirectory:
    """Domains and addresses in dicts; lookups case-insensitive as the protocol asks."""

    def __init__(self, domains: set[str], entries: dict[str, Resolution]) -> None:
        self.domains = {d.lower() for d in domains}
        self.entries = {k.lower(): v for k, v in entries.items()}

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self.domains

    def resolve(self, address: str) -> Resolution | None:
        return self.entries.get(address.lower())

    def password_hash(self, user: str) -> str | None:
        return None

    def addresses_of(self, user: str) -> frozenset[str]:
        return frozenset({user.lower()}) if user.lower() in self.entries else frozenset()


def _dict_directory() -> DictDirectory:
    return DictDirectory(
        {"local.test"},
        {
            "u@local.test": Resolution(local=("u@local.test",), remote=()),
            "v@local.test": Resolution(local=("v@local.test",), remote=()),
            "team@local.test": Resolution(
                local=("u@local.test", "v@local.test"), remote=("x@remote.test",)
            ),
        },
    )


@pytest.fixture(scope="module", params=["dict", "sqlite"])
def directory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Directory]:
    if request.param == "dict":
        yield _dict_directory()
        return
    d = SQLiteDirectory(Path(tmp_path_factory.mktemp("dir")) / "directory.sqlite3")
    d.add_domain("local.test")
    h = hash_password("a long password")
    d.add_user("u@local.test", h)
    d.add_user("v@local.test", h)
    d.add_alias("team@local.test", ["u@local.test", "v@local.test", "x@remote.test"])
    yield d
    d.close()


def mailbox(path: str, *, utf8: bool = False) -> Mailbox:
    mbox, _ = parse_mail_argument(
        f"TO:{path}", prefix="TO:", null_allowed=False, smtputf8_allowed=utf8
    )
    assert mbox is not None
    return mbox


def decide(directory: Directory, path: str, *, may_relay: bool = False) -> RecipientDecision:
    return decide_recipient(mailbox(path), directory, may_relay=may_relay)


def summary(d: RecipientDecision) -> tuple[str, ...]:
    return (str(d.reply.code), d.reply.enhanced, *(d.resolution.local if d.resolution else ()))


FOREIGN = [
    "<victim@foreign.test>",
    "<victim@FOREIGN.TEST>",
    "<@local.test:victim@foreign.test>",  # the route names us; it is ignored
    "<@local.test,@local.test:victim@foreign.test>",
    "<victim@evil-local.test>",
    "<victim@local.test.foreign>",
    "<victim@local.test.evil.test>",
    "<victim@xlocal.test>",
    "<victim@local.tes>",
    "<u@sub.local.test>",
    "<victim@localtest>",
]


@pytest.mark.parametrize("path", FOREIGN)
def test_foreign_and_look_alike_domains_are_not_relayed(directory: Directory, path: str) -> None:
    d = decide(directory, path)
    assert summary(d) == ("554", "5.7.1")
    assert d.reply.lines == ("Relay access denied",)
    assert d.resolution is None and not d.relay


TRICKS = [
    "<victim%foreign.test@local.test>",
    '<"victim@foreign.test"@local.test>',
    '<"victim%foreign.test"@local.test>',
    "<foreign.test!victim@local.test>",
    "<u%foreign.test@local.test>",  # even with a real user's name in front
    '<"u@foreign.test"@local.test>',
    "<foreign.test!u@local.test>",
    "<nobody@local.test>",
    "<NOBODY@LOCAL.TEST>",
]


@pytest.mark.parametrize("path", TRICKS)
@pytest.mark.parametrize("may_relay", [False, True])
def test_tricks_on_local_domain_are_unknown_users(
    directory: Directory, path: str, may_relay: bool
) -> None:
    # Never relayed, not even for an authenticated user: the local part is opaque.
    d = decide(directory, path, may_relay=may_relay)
    assert summary(d) == ("550", "5.1.1")
    assert d.resolution is None and not d.relay


@pytest.mark.parametrize(
    "path", ["<u@[127.0.0.1]>", "<u@[192.0.2.1]>", "<u@[IPv6:::1]>", "<@local.test:u@[192.0.2.1]>"]
)
@pytest.mark.parametrize("may_relay", [False, True])
def test_address_literal_never_accepted(directory: Directory, path: str, may_relay: bool) -> None:
    d = decide(directory, path, may_relay=may_relay)
    assert summary(d) == ("554", "5.7.1")
    assert d.resolution is None and not d.relay


@pytest.mark.parametrize(
    "path", ["<u@local.test>", "<U@LOCAL.TEST>", "<u@Local.Test>", "<@foreign.test:U@local.test>"]
)
def test_case_and_route_resolve_to_the_same_local_user(directory: Directory, path: str) -> None:
    d = decide(directory, path)
    assert summary(d) == ("250", "2.1.5", "u@local.test")
    assert not d.relay


def test_unknown_local_user_is_refused_at_rcpt(directory: Directory) -> None:
    d = decide(directory, "<nobody@local.test>")
    assert (d.reply.code, d.reply.enhanced) == (550, "5.1.1")
    assert d.reply.encode() == b"550 5.1.1 No such user here\r\n"


def test_alias_expands_to_local_and_remote(directory: Directory) -> None:
    d = decide(directory, "<team@local.test>")
    assert d.reply.code == 250 and not d.relay
    assert d.resolution is not None
    assert set(d.resolution.local) == {"u@local.test", "v@local.test"}
    assert d.resolution.remote == ("x@remote.test",)


@pytest.mark.parametrize(
    ("path", "remote"),
    [
        ("<x@remote.test>", "x@remote.test"),
        ("<X@REMOTE.TEST>", "X@remote.test"),
        ("<@local.test:x@remote.test>", "x@remote.test"),
        ('<"a b"@remote.test>', '"a b"@remote.test'),
        ("<victim@evil-local.test>", "victim@evil-local.test"),
    ],
)
def test_authenticated_relay(directory: Directory, path: str, remote: str) -> None:
    d = decide(directory, path, may_relay=True)
    assert d.relay and (d.reply.code, d.reply.enhanced) == (250, "2.1.5")
    assert d.resolution == Resolution(local=(), remote=(remote,))


def test_authenticated_user_to_local_domain_is_local_not_relay(directory: Directory) -> None:
    d = decide(directory, "<v@local.test>", may_relay=True)
    assert summary(d) == ("250", "2.1.5", "v@local.test")
    assert not d.relay


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("<u@local.test>", ("250", "2.1.5", "u@local.test")),
        ("<nobody@local.test>", ("550", "5.1.1")),
        ("<victim%foreign.test@local.test>", ("550", "5.1.1")),
        ("<victim@foreign.test>", ("554", "5.7.1")),
        ("<u@[192.0.2.1]>", ("554", "5.7.1")),
    ],
)
def test_null_sender_context_does_not_matter(
    directory: Directory, path: str, expected: tuple[str, ...]
) -> None:
    # The decision takes no sender at all, so a null or forged MAIL FROM cannot sway it.
    sender, _ = parse_mail_argument(
        "FROM:<>", prefix="FROM:", null_allowed=True, smtputf8_allowed=False
    )
    assert sender is None
    assert set(inspect.signature(decide_recipient).parameters) == {
        "rcpt",
        "directory",
        "may_relay",
    }
    assert summary(decide(directory, path)) == expected


def test_utf8_foreign_domain_is_not_local(directory: Directory) -> None:
    d = decide_recipient(mailbox("<u@lócal.test>", utf8=True), directory, may_relay=False)
    assert summary(d) == ("554", "5.7.1")
