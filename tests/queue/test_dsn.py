"""Bounce and delay-warning structure, parsed back with the email package."""

from __future__ import annotations

import email
import email.policy
from email.message import Message

from mailfort.queue.dsn import RecipientReport, build_dsn, original_headers

ORIGINAL = (b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\n"
            b"Subject: quarterly report\r\nMessage-ID: <abc.123@example.test>\r\n"
            b"\r\nsecret body text\r\n")


def parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def test_bounce_structure() -> None:
    raw = build_dsn(
        reporting_mta="mailfort.example.test",
        to="alice@example.test",
        original=ORIGINAL,
        reports=[RecipientReport("bob@remote.test", "failed", "5.1.1",
                                 "550 5.1.1 no such user\r\nInjected: header",
                                 "mx.remote.test", 1_700_000_000.0)],
        queue_id="ABC123DEF",
        arrival=1_699_999_000.0,
    )
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    msg = parse(raw)
    assert msg["Return-Path"] == "<>"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mailfort.example.test>"
    assert msg["To"] == "<alice@example.test>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<abc.123@example.test>"
    assert msg["Injected"] is None
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    human, status, headers = msg.get_payload()
    assert human.get_content_type() == "text/plain"
    assert "bob@remote.test" in human.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    per_msg, per_rcpt = status.get_payload()
    assert per_msg["Reporting-MTA"] == "dns; mailfort.example.test"
    assert per_msg["Arrival-Date"]
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@remote.test"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.remote.test"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user Injected: header"
    assert headers.get_content_type() == "text/rfc822-headers"
    text = headers.get_payload()
    assert "Subject: quarterly report" in text
    assert "secret body text" not in raw.decode()  # headers only, never the body


def test_delay_warning() -> None:
    raw = build_dsn(
        reporting_mta="mx.example.test",
        to="alice@example.test",
        original=ORIGINAL,
        reports=[RecipientReport("a@r.test", "delayed", "4.4.1", "connection refused",
                                 will_retry_until=1_700_400_000.0),
                 RecipientReport("b@r.test", "delayed", "bogus", "")],
    )
    msg = parse(raw)
    assert msg["Subject"].startswith("Delayed Mail")
    _, status, _ = msg.get_payload()
    _, a, b = status.get_payload()
    assert a["Action"] == "delayed" and a["Status"] == "4.4.1"
    assert a["Diagnostic-Code"] == "X-mailfort; connection refused"
    assert a["Will-Retry-Until"]
    assert b["Status"] == "4.0.0"  # an invalid status is never copied through


def test_original_headers_bounded_and_crlf() -> None:
    big = b"".join(b"X-Pad-%d: %s\n" % (i, b"y" * 70) for i in range(2000)) + b"\nbody"
    head = original_headers(big)
    assert len(head) <= 64 * 1024
    assert head.endswith(b"\r\n") and b"body" not in head
