"""The MSA policy on its own: sender ownership, limits and header completion (no sockets).

End-to-end submission over real TLS and real clients is in tests/server/test_submission.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import default
from pathlib import Path

import pytest

from mailfort.directory.sqlite import SQLiteDirectory
from mailfort.policy.counters import MemoryCounters
from mailfort.policy.msa import (
    RATE_LIMITED,
    RCPT_RATE_LIMITED,
    TOO_MANY_RCPT,
    MSAPolicy,
    append_header_lines,
)
from mailfort.policy.senders import FROM_MISSING, FROM_NOT_OWNED, SENDER_NOT_OWNED
from mailfort.protocol.address import Mailbox
from tests.conftest import make_config, seed_directory

ALICE = "alice@example.test"


@pytest.fixture
def policy(tmp_path: Path) -> Iterator[MSAPolicy]:
    cfg = make_config(tmp_path, submission={"messages_per_hour": 2, "max_recipients": 3})
    seed_directory(cfg)
    directory = SQLiteDirectory(cfg.data_path / "directory.sqlite3")
    yield MSAPolicy(cfg, directory, MemoryCounters())
    directory.close()


def mailbox(address: str) -> Mailbox:
    local, _, domain = address.partition("@")
    return Mailbox(local, domain)


async def test_envelope_sender_must_be_owned(policy: MSAPolicy) -> None:
    assert await policy.check_mail(ALICE, mailbox(ALICE)) is None
    assert await policy.check_mail(ALICE, mailbox("postmaster@example.test")) is None  # alias
    assert await policy.check_mail(ALICE, mailbox("bob@example.test")) == SENDER_NOT_OWNED
    refusal = await policy.check_mail(ALICE, None)
    assert refusal is not None and refusal.code == 553


async def test_rate_limit_reserves_messages_per_user(policy: MSAPolicy) -> None:
    """MAIL reserves one of the hour; a transaction without 250 gives it back."""
    for _ in range(2):
        assert await policy.check_mail(ALICE, mailbox(ALICE)) is None
    assert await policy.check_mail(ALICE, mailbox(ALICE)) == RATE_LIMITED
    assert await policy.check_mail("bob@example.test", mailbox("bob@example.test")) is None
    await policy.release(ALICE, 1, 0)
    assert await policy.check_mail(ALICE, mailbox(ALICE)) is None
    # a refused sender reserves nothing
    assert await policy.check_mail("bob@example.test", mailbox(ALICE)) == SENDER_NOT_OWNED
    assert await policy.check_mail("bob@example.test", mailbox("bob@example.test")) is None


async def test_recipients_per_hour_reserved_and_released(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, submission={"recipients_per_hour": 3})
    policy = MSAPolicy(cfg, None, MemoryCounters())  # type: ignore[arg-type]
    assert [await policy.reserve_recipient(ALICE) for _ in range(4)] == [None] * 3 + [
        RCPT_RATE_LIMITED]
    assert RCPT_RATE_LIMITED.code == RATE_LIMITED.code == 452
    await policy.release(ALICE, 0, 2)
    assert await policy.reserve_recipient(ALICE) is None
    assert await policy.reserve_recipient("bob@example.test") is None


def test_recipients_per_message(policy: MSAPolicy) -> None:
    assert policy.check_rcpt(ALICE, 2) is None
    assert policy.check_rcpt(ALICE, 3) == TOO_MANY_RCPT


@pytest.mark.parametrize(
    ("block", "refusal"),
    [(b"From: bob@example.test\r\n", FROM_NOT_OWNED), (b"Subject: x\r\n", FROM_MISSING)],
)
def test_header_from_must_be_owned(policy: MSAPolicy, block: bytes, refusal: object) -> None:
    assert policy.check_headers(ALICE, block)[0] == refusal


@pytest.mark.parametrize(
    "block",
    [
        b"From: alice@example.test\r\nSubject: cut",  # message ended inside the last line
        b"From: alice@example.test\r\nSubject: whole\r\n",
        b"Subject: folded\r\n\tcontinued\r\nFrom: alice@example.test",
    ],
)
def test_added_headers_stand_on_their_own_lines(policy: MSAPolicy, block: bytes) -> None:
    refusal, completed = policy.check_headers(ALICE, block)
    assert refusal is None
    assert completed.startswith(block)
    assert completed.endswith(b"\r\n")
    added = completed[len(block):].removeprefix(b"\r\n").split(b"\r\n")
    assert [line.split(b":")[0] for line in added] == [b"Message-ID", b"Date", b""]
    msg = BytesParser(policy=default).parsebytes(completed + b"\r\n")
    assert msg["From"] == ALICE
    assert msg["Message-ID"].endswith("@mx.example.test>")
    assert msg["Date"].datetime is not None


def test_existing_message_id_and_date_are_kept_unchanged(policy: MSAPolicy) -> None:
    block = b"From: alice@example.test\r\nMessage-ID: <a@b>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000"
    assert policy.check_headers(ALICE, block) == (None, block)


def test_append_header_lines() -> None:
    assert append_header_lines(b"", ["A: 1"]) == b"A: 1\r\n"
    assert append_header_lines(b"X: y", ["A: 1", "B: 2"]) == b"X: y\r\nA: 1\r\nB: 2\r\n"
    assert append_header_lines(b"X: y\r\n", ["A: 1"]) == b"X: y\r\nA: 1\r\n"
    assert append_header_lines(b"X: y", []) == b"X: y"
