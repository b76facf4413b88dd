"""Content filtering: does the MX refuse GTUBE at the end of DATA?

GTUBE (the Generic Test for Unsolicited Bulk Email) is one line that every spam filter
people run (rspamd, SpamAssassin and the milters built on them) takes for certain spam. A
server with a content filter refuses it in the session, at the end of DATA; one without
takes it, and so takes every spam that gets past the envelope checks.

The only recipient is the known local user (``--user`` at ``--domain``): no message is
ever offered to a foreign domain. The envelope sender is the null sender, so that nothing
the server does with the message can bounce anywhere, and the From: header names the
reserved ``.invalid`` domain of the auditor's EHLO, which has no SPF or DMARC record for a
server to refuse the message on. A refusal is weighed against a control, the same message
without the GTUBE line: a server that refuses the probe for another
reason is not mistaken for a content filter. The control is sent only after a refusal, so
a server without a filter gets one message, and one with a filter gets one (the control);
both land in the local user's mailbox, the operator's own, who asked for the audit.
"""

from __future__ import annotations

import email.utils
import secrets

from mailfort.audit.checks.common import accepted
from mailfort.audit.client import NoReply, RawClient
from mailfort.audit.context import EHLO_NAME, Context
from mailfort.audit.registry import INCONCLUSIVE, PASS, WARN, Verdict, check, inconclusive, skip

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
SENDER_HEADER = f"mailfort-audit@{EHLO_NAME}"


def message(rcpt: str, *, gtube: bool) -> bytes:
    """The probe (``gtube``) or its control: a well-formed message either way (Date,
    Message-ID, one From:), so that a header rule has no reason to refuse one of them."""
    what = "GTUBE probe" if gtube else "control (no GTUBE)"
    body = ("This message tests whether the server refuses spam at the end of DATA.\r\n"
            + (f"{GTUBE}\r\n" if gtube else "It is the control: a server should accept it.\r\n"))
    return (f"From: <{SENDER_HEADER}>\r\nTo: <{rcpt}>\r\n"
            f"Subject: mailfort audit: content filter {what}\r\n"
            f"Date: {email.utils.formatdate(usegmt=True)}\r\n"
            f"Message-ID: <{secrets.token_hex(8)}@{EHLO_NAME}>\r\n\r\n{body}.\r\n").encode()


def _send(c: RawClient, rcpt: str, *, gtube: bool) -> tuple[int, str]:
    """One transaction to ``rcpt`` alone: the reply at the end of DATA, (code, text).

    A refused MAIL, RCPT or DATA ends the check INCONCLUSIVE: no message, nothing to judge.
    """
    mail, lines = c.cmd("MAIL FROM:<>")
    if accepted(mail):
        code, lines = c.cmd(f"RCPT TO:<{rcpt}>")
        if not accepted(code):
            raise inconclusive("content.rcpt-refused", address=rcpt,
                               reply=f"{code} {' '.join(lines)}")
    else:
        raise inconclusive("content.mail-refused", reply=f"{mail} {' '.join(lines)}")
    code, lines = c.cmd("DATA")
    if code != 354:
        raise inconclusive("content.no-data", reply=f"{code} {' '.join(lines)}")
    what = "the GTUBE probe" if gtube else "the control"
    c.send(message(rcpt, gtube=gtube), note=f"<{what}, To: {rcpt}>")
    try:
        final, lines = c.reply()
    except NoReply as exc:  # it has the message and may still take it
        raise inconclusive("probe.no-reply", what=f"{what} message", error=str(exc)) from exc
    return final, f"{final} {' '.join(lines)}".strip()


@check("content.gtube", "7", order=51)
def gtube(ctx: Context) -> Verdict:
    """GTUBE to the known local user: refused at the end of DATA (and the control taken)
    is a PASS, taken is a WARN (no content filter), a 4xx is a WARN of its own (the filter
    unreachable, most likely: every message waits)."""
    t = ctx.target
    ctx.port("smtp")
    rcpt = t.known_address
    if not rcpt:
        raise skip("need.user")
    with ctx.session("smtp") as (c, _):
        code, reply = _send(c, rcpt, gtube=True)
        if accepted(code):
            return Verdict(WARN, "content.accepted", {"address": rcpt, "reply": reply})
        if 400 <= code < 500:
            return Verdict(WARN, "content.tempfail", {"reply": reply})
        if not 500 <= code < 600:
            raise inconclusive("content.odd-reply", reply=reply)
    with ctx.session("smtp") as (c, _):  # a fresh session: some servers end one on a 5xx
        control, control_reply = _send(c, rcpt, gtube=False)
    if not accepted(control):
        return Verdict(INCONCLUSIVE, "content.control-refused",
                       {"reply": reply, "control": control_reply})
    return Verdict(PASS, "content.refused", {"reply": reply})
