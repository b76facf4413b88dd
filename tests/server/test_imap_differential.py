"""The differential IMAP test: the scripted sessions of tests/imapscript.py (LOGIN, SELECT,
FETCH of every kind, SEARCH, STORE, COPY/MOVE with UIDPLUS, EXPUNGE, STATUS, LIST with
special-use, APPEND, IDLE for a delivered message) against mailfort and the reference
Dovecot holding the same messages, compared after normalisation.

The runner is proven on Dovecot alone first: it compares equal with itself although each
run has another UIDVALIDITY (so the normalisation hides what it must), and unequal with a
mailbox that differs by one subject, one flag, one byte or one message (so it hides
nothing else). The mailfort side skips, with the config loader's reason, until this branch
has the IMAP server; it delivers over SMTP to the MX and gives Dovecot the very bytes
mailfort stored.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

from tests import imapscript as script
from tests.server import imapserve

ALICE = "alice@example.test"
# the reference Dovecot's Maildirs belong to vmail
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="writes Maildirs as vmail: root only")


@pytest.fixture(scope="module")
def baseline(reference_dovecot: int) -> dict[str, Any]:
    with script.dovecot_target(reference_dovecot, script.MESSAGES) as t:
        return script.run(t)


def test_the_script_compares_equal_with_itself(reference_dovecot: int,
                                               baseline: dict[str, Any]) -> None:
    with script.dovecot_target(reference_dovecot, script.MESSAGES) as t:
        again = script.run(t)
    assert script.compare(baseline, again) == []
    # what was normalised away really differed, and the results are not empty shells
    assert baseline["~uidvalidity"] != again["~uidvalidity"]
    assert baseline["idle/idle"] == {"status": "OK", "code": None, "untagged": ["EXISTS 5"]}
    assert baseline["search/uid-search BODY walrus"]["untagged"] == [("SEARCH", [2, 4, 8])]
    assert baseline["folders/move"]["untagged"] == ["OK [COPYUID * 3 1]", "EXPUNGE 3"]
    assert baseline["append/append"]["code"] == "APPENDUID * 3"
    fetched = baseline["fetch/uid-fetch-all"]["untagged"]
    assert len(fetched) == len(script.MESSAGES)
    assert all({"ENVELOPE", "BODYSTRUCTURE", "RFC822.SIZE", "FLAGS"} <= set(f[2])
               for f in fetched)


def _variant(kind: str) -> tuple[list[bytes], dict[int, str]]:
    msgs = list(script.MESSAGES)
    if kind == "subject":
        msgs[0] = msgs[0].replace(b"Subject: quarterly report", b"Subject: quarterly result")
    elif kind == "byte":
        msgs[6] = msgs[6].replace(b"lorem ipsum", b"lorem  ipsum", 1)
    elif kind == "missing":
        del msgs[-1]
    return msgs, ({0: "S"} if kind == "flag" else {})


# the keys that must show each difference (more may)
MUST_DIFFER = {
    "subject": {"fetch/uid-fetch-all", "search/uid-search HEADER Subject report",
                "search/esearch"},
    "flag": {"select/select", "search/uid-search SEEN", "fetch/after-seen"},
    "byte": {"fetch/uid-fetch-all", "folders/status-box"},  # RFC822.SIZE, STATUS SIZE
    "missing": {"select/select", "search/uid-search ALL", "idle/idle"},
}


@pytest.mark.parametrize("kind", sorted(MUST_DIFFER))
def test_a_different_mailbox_compares_unequal(reference_dovecot: int,
                                              baseline: dict[str, Any], kind: str) -> None:
    msgs, letters = _variant(kind)
    with script.dovecot_target(reference_dovecot, msgs, letters=letters) as t:
        other = script.run(t)
    differing = {d.split(":\n", 1)[0] for d in script.compare(baseline, other)}
    assert MUST_DIFFER[kind] <= differing, sorted(differing)


@pytest.fixture(scope="module")
def mailfort() -> Iterator[imapserve.Mailfort]:
    with imapserve.start(trustme.CA()) as mf:
        yield mf


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_mailfort_answers_the_script_as_dovecot_does(
        reference_dovecot: int, mailfort: imapserve.Mailfort, tls: str) -> None:
    user = ALICE if tls == "starttls" else "bob@example.test"
    stored = [mailfort.deliver(user, m) for m in script.MESSAGES]
    account = mailfort.account(user, tls)
    ours = script.run(script.Target(
        "mailfort", account.port, user, account.password, "INBOX", "mfd-x",
        lambda data: mailfort.deliver(user, data) and None, tls, account.cafile))
    idle_copy = mailfort.stored(user, "diff-20@remote.test")
    with script.dovecot_target(reference_dovecot, stored, idle_message=idle_copy) as t:
        theirs = script.run(t)
    assert ours["~special_use"] == {name: [f"\\{name}"] for name in script.SPECIAL}
    assert ours["~idle_seconds"] < 1.0  # issue 28: a delivery reaches IDLE within a second
    diffs = script.compare(ours, theirs)
    assert diffs == [], "mailfort (first) and Dovecot (second) differ:\n" + "\n".join(diffs)
