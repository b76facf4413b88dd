"""Submission (587, 465): no MAIL without AUTH, no AUTH in the clear, no forged senders."""

from __future__ import annotations

from mailfort.audit.checks.common import accepted, auth_plain, foreign
from mailfort.audit.client import NoReply, ProbeError
from mailfort.audit.context import Context, has_ext
from mailfort.audit.registry import (
    FAIL,
    PASS,
    WARN,
    Verdict,
    check,
    inconclusive,
    skip,
)

SUBMIT = ("submission", "submissions")
# Fake credentials: sent in the clear on purpose, so they must never be real ones.
FAKE_USER, FAKE_PASSWORD = "mailfort-audit-probe", "not-a-password"


def _open(ctx: Context, services: tuple[str, ...]) -> list[str]:
    found = [s for s in services if s in ctx.open_ports]
    if not found:
        raise skip("port.none-of", services=", ".join(services))
    return found


@check("submission.no-auth", "1", order=20)
def mail_without_auth(ctx: Context) -> Verdict:
    relayed, mail_ok = [], []
    for service in _open(ctx, SUBMIT):
        with ctx.session(service, tls="opportunistic") as (c, _):
            code, _ = c.cmd(f"MAIL FROM:<{foreign(ctx, 'sender')}>")
            if accepted(code):
                mail_ok.append(service)
                rc, _ = c.cmd(f"RCPT TO:<{foreign(ctx)}>")
                if accepted(rc):
                    relayed.append(service)
            c.cmd("RSET")
    if relayed:
        return Verdict(FAIL, "submission.relayed", {"services": ", ".join(relayed)})
    if mail_ok:
        return Verdict(WARN, "submission.mail-accepted", {"services": ", ".join(mail_ok)})
    return Verdict(PASS, "submission.mail-refused", {})


@check("submission.auth-before-tls", "4", order=21)
def auth_before_tls(ctx: Context) -> Verdict:
    bad: list[str] = []
    for service in _open(ctx, ("smtp", "submission")):
        with ctx.session(service) as (c, lines):
            if has_ext(lines, "AUTH"):
                bad.append(f"{service}: AUTH advertised")
            code = auth_plain(c, FAKE_USER, FAKE_PASSWORD)
            if code in (235, 334, 535):  # the credentials were read in the clear
                bad.append(f"{service}: AUTH answered {code}")
    if bad:
        return Verdict(FAIL, "auth.cleartext", {"where": "; ".join(bad)})
    return Verdict(PASS, "auth.refused", {})


def _message(sender_header: str, to: str) -> bytes:
    return (f"From: <{sender_header}>\r\nTo: <{to}>\r\n"
            "Subject: mailfort audit: forged From: probe\r\n\r\n"
            "This message tests whether the server lets a user forge From:.\r\n.\r\n"
            ).encode()


@check("submission.sender-forgery", "2", order=22)
def sender_forgery(ctx: Context) -> Verdict:
    t = ctx.target
    services = _open(ctx, SUBMIT)
    if not (t.auth_user and t.auth_password):
        raise skip("need.auth")
    service = services[0]
    findings: list[str] = []
    warnings: list[str] = []
    with ctx.session(service, tls=True) as (c, _):
        if auth_plain(c, t.auth_user, t.auth_password) != 235:
            raise inconclusive("auth.failed", user=t.auth_user)
        for sender, bucket in ((foreign(ctx, "ceo"), findings), ("", warnings)):
            code, _ = c.cmd(f"MAIL FROM:<{sender}>")
            if accepted(code):
                rc, _ = c.cmd(f"RCPT TO:<{t.auth_user}>")
                if accepted(rc):
                    bucket.append(f"MAIL FROM:<{sender}>")
            c.cmd("RSET")
        # A forged From: header with an honest envelope; completed only to the user.
        code, _ = c.cmd(f"MAIL FROM:<{t.auth_user}>")
        rc, _ = c.cmd(f"RCPT TO:<{t.auth_user}>")
        if not (accepted(code) and accepted(rc)):
            raise inconclusive("control.own-refused", user=t.auth_user)
        dc, _ = c.cmd("DATA")
        if dc == 354:
            c.send(_message(foreign(ctx, "ceo"), t.auth_user), note="<message, From: forged>")
            try:
                final, _ = c.reply()
            except NoReply as exc:  # it has the message and may still send it on
                raise inconclusive("probe.no-reply", what="the message with a forged From:",
                                   error=str(exc)) from exc
            except ProbeError:
                final = 0
            if accepted(final):
                findings.append(f"From: <{foreign(ctx, 'ceo')}>")
    if findings:
        return Verdict(FAIL, "forgery.accepted", {"what": "; ".join(findings)})
    if warnings:
        return Verdict(WARN, "forgery.null-sender", {})
    return Verdict(PASS, "forgery.refused", {})

