"""The vacation policy: every rule that keeps an auto-reply from being backscatter, the
once-per-period state shared by processes, and the reply's form (RFC 5230, RFC 3834)."""

from __future__ import annotations

import email
import multiprocessing
from pathlib import Path

import pytest

from mailfort.policy import vacation
from mailfort.policy.vacation import (
    Request,
    Rules,
    VacationState,
    build_reply,
    decide,
    parse_headers,
    sender_authenticated,
)

USER = "alice@example.test"
MINE = frozenset({USER, "a.smith@example.test"})


def request(sender: str = "friend@pass.test", *, headers: str = "", to: str = USER,
            authenticated: bool = True, addresses: tuple[str, ...] = ()) -> Request:
    block = f"From: <{sender}>\r\nTo: {to}\r\nSubject: hi\r\n{headers}".encode()
    return Request(sender, USER, MINE, parse_headers(block), authenticated, "h", 86400,
                   addresses)


def test_an_authenticated_personal_message_is_answered() -> None:
    assert decide(request()) == vacation.Decision(True, "sent")
    assert decide(request(to="Alice <A.Smith@example.test>")).send  # any address of hers


@pytest.mark.parametrize(("req", "why"), [
    (request(""), "null sender"),
    (request("MAILER-DAEMON@x.test"), "system or list address"),
    (request("owner-list@x.test"), "system or list address"),
    (request("list-request@x.test"), "system or list address"),
    (request(USER), "sender is the user"),
    (request(headers="Auto-Submitted: auto-replied\r\n"), "Auto-Submitted"),
    (request(headers="Precedence: list\r\n"), "Precedence: list"),
    (request(headers="List-Unsubscribe: <mailto:u@x.test>\r\n"), "mailing list"),
    (request(headers="List-Id: <l.x.test>\r\n"), "mailing list"),
    (request(headers="X-Auto-Response-Suppress: OOF\r\n"), "X-Auto-Response-Suppress"),
    (request(to="someone-else@example.test"), "user not in To/Cc"),
    (request(authenticated=False), "sender not authenticated"),
])
def test_never_answered(req: Request, why: str) -> None:
    d = decide(req)
    assert not d.send and why in d.reason


def test_auto_submitted_no_and_addresses_and_cc() -> None:
    assert decide(request(headers="Auto-Submitted: no\r\n")).send
    assert decide(request(to="list@x.test", addresses=("list@x.test",))).send
    assert decide(request(to="x@y.test", headers=f"Cc: {USER}\r\n")).send


def test_the_legacy_rules_answer_an_unauthenticated_sender() -> None:
    assert decide(request(authenticated=False), Rules(require_authenticated_sender=False)).send


def test_sender_authenticated() -> None:
    assert sender_authenticated(submitted_by=USER, sender="x@anything.test")
    assert sender_authenticated(submitted_by=None, sender="a@pass.test",
                                spf_pass_domain="PASS.test")
    assert sender_authenticated(submitted_by=None, sender="a@mail.pass.test",
                                dkim_pass_domains=["pass.test"])
    assert not sender_authenticated(submitted_by=None, sender="a@pass.test",
                                    spf_pass_domain="other.test",
                                    dkim_pass_domains=["evilpass.test", "sub.pass.test"])
    assert not sender_authenticated(submitted_by=None, sender="")


def test_period_is_clamped() -> None:
    assert vacation.clamp(60, 1, 30) == 86400
    assert vacation.clamp(100 * 86400, 1, 30) == 30 * 86400


def test_once_per_sender_and_handle_per_period(tmp_path: Path) -> None:
    state = VacationState(tmp_path / "sieve")
    assert state.claim("a@x.test", "h", 100, now=1000)
    assert not state.claim("A@X.test", "h", 100, now=1050)  # case of the address
    assert state.claim("a@x.test", "other handle", 100, now=1050)
    assert state.claim("a@x.test", "h", 100, now=1101)  # the period is over
    assert b"a@x.test" not in (tmp_path / "sieve" / ".vacation").read_bytes()


def _claim(path: str) -> bool:
    return VacationState(Path(path)).claim("a@x.test", "h", 1000)


def test_concurrent_processes_answer_once(tmp_path: Path) -> None:
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(_claim, [str(tmp_path)] * 8)
    assert results.count(True) == 1


def test_sliding_counter(tmp_path: Path) -> None:
    c = VacationState(tmp_path, ".redirects")
    assert [c.count_recent(2, 100, now=0) for _ in range(3)] == [True, True, False]
    assert c.count_recent(2, 100, now=101)


def test_reply_form() -> None:
    headers = parse_headers(b"From: <f@pass.test>\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n"
                            b"Message-ID: <m1@pass.test>\r\nReferences: <m0@pass.test>\r\n")
    raw = build_reply(hostname="mx.example.test", user=USER, from_="Alice <A.Smith@example.test>",
                      to="f@pass.test", headers=headers, reason="Away.\nBack Monday.",
                      subject=None, mime=False, user_addresses=MINE)
    msg = email.message_from_bytes(raw)
    assert msg["Auto-Submitted"] == "auto-replied (vacation)"
    assert msg["From"] == "Alice <A.Smith@example.test>" and msg["To"] == "<f@pass.test>"
    assert msg["In-Reply-To"] == "<m1@pass.test>"
    assert msg["References"] == "<m0@pass.test> <m1@pass.test>"
    assert msg["Subject"].startswith("Auto: ")
    assert msg.get_payload() == "Away.\r\nBack Monday.\r\n"
    assert b"\n" not in raw.replace(b"\r\n", b"")


def test_reply_from_is_never_a_foreign_address_and_no_header_injection() -> None:
    raw = build_reply(hostname="h", user=USER, from_="boss@elsewhere.test", to="f@x.test",
                      headers=[], reason="r", subject="x\r\nBcc: victim@x.test",
                      mime=False, user_addresses=MINE)
    msg = email.message_from_bytes(raw)
    assert msg["From"] == USER and msg["Bcc"] is None
