"""Delivery status notifications (RFC 3464): bounces and delay warnings.

Built as bytes by hand rather than with ``email.message`` so that every header line is
under our control: the diagnostic text comes from remote servers and is reduced to one
printable line before it goes anywhere near a header. Who may receive a DSN is decided by
the worker (only the authenticated local submitter); this module only formats one.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate
from typing import Literal

MAX_ORIGINAL_HEADERS = 64 * 1024


@dataclass(frozen=True)
class RecipientReport:
    """One per-recipient block of the message/delivery-status part."""

    recipient: str
    action: Literal["failed", "delayed"]
    status: str  # RFC 3463, e.g. "5.1.1"
    diagnostic: str = ""  # the remote reply, "550 5.1.1 no such user"
    remote_mta: str = ""
    last_attempt: float | None = None
    will_retry_until: float | None = None


def _clean(text: str, limit: int = 900) -> str:
    text = " ".join(text.split())
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


def _status(status: str, action: str) -> str:
    if re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", status):
        return status
    return "4.0.0" if action == "delayed" else "5.0.0"


def original_headers(message: bytes) -> bytes:
    """The header block of a message (up to the first empty line), CRLF, bounded."""
    lines = []
    size = 0
    for line in message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"):
        if not line:
            break
        size += len(line) + 2
        if size > MAX_ORIGINAL_HEADERS:
            break
        lines.append(line + b"\r\n")
    return b"".join(lines)


def _header(message: bytes, name: str) -> str | None:
    """One header's unfolded value from the original header block, or None."""
    head = original_headers(message).decode("utf-8", "replace")
    unfolded = re.sub(r"\r\n[ \t]+", " ", head)
    for line in unfolded.split("\r\n"):
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == name.lower():
            return value.strip()
    return None


def build_dsn(
    *,
    reporting_mta: str,
    to: str,
    original: bytes,
    reports: Sequence[RecipientReport],
    queue_id: str = "",
    arrival: float | None = None,
    now: float | None = None,
    forwarded_by: str = "",
    forwarded_from: str = "",
) -> bytes:
    """A complete multipart/report message (CRLF) ready for local delivery.

    ``forwarded_by``: the report goes to the owner of that alias, about mail it forwarded
    (from ``forwarded_from``, who is not told: the sender of mail from outside may be
    forged, and a bounce to it would be backscatter).

    ``Return-Path: <>`` records the null envelope sender of a DSN (RFC 3464 §2, RFC 5321
    §4.5.5), so no reply to it can bounce back in a loop.
    """
    if not reports:
        raise ValueError("a DSN needs at least one recipient report")
    now = time.time() if now is None else now
    delayed = all(r.action == "delayed" for r in reports)
    host = _clean(reporting_mta, 200)
    boundary = f"=_mailfort_{secrets.token_hex(12)}"
    msgid = f"<{int(now)}.{secrets.token_hex(8)}@{host}>"
    subject = (
        "Delayed Mail (still being retried)" if delayed
        else f"Undelivered forwarded mail (alias {_clean(forwarded_by, 300)})" if forwarded_by
        else "Undelivered Mail Returned to Sender"
    )
    orig_id = _header(original, "Message-ID")
    orig_subject = _header(original, "Subject")

    lines = [
        "Return-Path: <>",
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{_clean(to, 300)}>",
        f"Subject: {subject}",
        f"Date: {formatdate(now, localtime=False)}",
        f"Message-ID: {msgid}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ]
    if orig_id and re.fullmatch(r"<[^<>\s]{1,900}>", orig_id):
        lines += [f"In-Reply-To: {orig_id}", f"References: {orig_id}"]
    lines += ["", "This is a MIME-encapsulated message.", ""]

    # 1. the human-readable part
    lines += [f"--{boundary}", "Content-Type: text/plain; charset=utf-8",
              "Content-Transfer-Encoding: 8bit", ""]
    if forwarded_by and not delayed:
        lines += [
            f"This is the mail system at {host}.",
            "",
            f"Mail that the alias <{_clean(forwarded_by, 300)}> forwarded could not be "
            "delivered to the recipients below. It will not be retried.",
            f"It came from <{_clean(forwarded_from, 300)}>, who was not told: the sender "
            "of mail from outside may be forged, and a bounce to it would be backscatter.",
            "You receive this as postmaster of the alias's domain.",
        ]
    elif delayed:
        lines += [
            f"This is the mail system at {host}.",
            "",
            "Your message could not be delivered yet to the recipients below.",
            "The mail system will keep trying; you do not need to send it again.",
        ]
    else:
        lines += [
            f"This is the mail system at {host}.",
            "",
            "Your message could not be delivered to the recipients below.",
            "It will not be retried.",
        ]
    if orig_subject:
        lines += ["", f"Subject of your message: {_clean(orig_subject, 200)}"]
    lines.append("")
    for r in reports:
        lines.append(f"<{_clean(r.recipient, 300)}>:")
        if r.diagnostic:
            lines.append(f"    {_clean(r.diagnostic)}")
        if r.action == "delayed" and r.will_retry_until:
            lines.append(f"    (will retry until {formatdate(r.will_retry_until)})")
        lines.append("")

    # 2. the machine-readable part
    lines += [f"--{boundary}", "Content-Type: message/delivery-status", ""]
    lines.append(f"Reporting-MTA: dns; {host}")
    if queue_id:
        lines.append(f"X-Mailfort-Queue-ID: {_clean(queue_id, 64)}")
    if arrival is not None:
        lines.append(f"Arrival-Date: {formatdate(arrival)}")
    for r in reports:
        lines.append("")
        lines.append(f"Final-Recipient: rfc822; {_clean(r.recipient, 300)}")
        lines.append(f"Action: {r.action}")
        lines.append(f"Status: {_status(r.status, r.action)}")
        if r.remote_mta:
            lines.append(f"Remote-MTA: dns; {_clean(r.remote_mta, 255)}")
        if r.diagnostic:
            kind = "smtp" if re.match(r"[245]\d\d[ -]", r.diagnostic) else "X-mailfort"
            lines.append(f"Diagnostic-Code: {kind}; {_clean(r.diagnostic)}")
        if r.last_attempt:
            lines.append(f"Last-Attempt-Date: {formatdate(r.last_attempt)}")
        if r.action == "delayed" and r.will_retry_until:
            lines.append(f"Will-Retry-Until: {formatdate(r.will_retry_until)}")
    lines.append("")

    # 3. the original headers
    lines += [f"--{boundary}", "Content-Type: text/rfc822-headers", ""]
    body = ("\r\n".join(lines) + "\r\n").encode("utf-8")
    body += original_headers(original)
    body += f"\r\n--{boundary}--\r\n".encode("ascii")
    return body
