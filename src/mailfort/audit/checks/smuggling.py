"""SMTP smuggling: does any end-of-data sequence other than <CRLF>.<CRLF> end DATA?

Each probe sends one message to the known local user whose body holds a non-standard
end-of-data sequence followed by a second, smuggled transaction (also to the known user)
and then the real <CRLF>.<CRLF>. A safe server answers once (250, or 5xx for the bare
line ending); a vulnerable one answers the smuggled MAIL, RCPT and DATA as commands.
Replies are counted up to the reply to a QUIT sent after the message, never up to a
pause: a server that answers MAIL late (an SPF check, a sender callout) is still counted,
and one that does not answer QUIT in time leaves the check INCONCLUSIVE.
"""

from __future__ import annotations

from mailfort.audit.checks.common import accepted, foreign
from mailfort.audit.client import NoReply
from mailfort.audit.context import Context
from mailfort.audit.registry import FAIL, INCONCLUSIVE, PASS, Verdict, check, inconclusive, skip

VARIANTS: tuple[tuple[str, bytes], ...] = (
    ("<LF>.<LF>", b"\n.\n"),
    ("<CR>.<CR>", b"\r.\r"),
    ("<LF>.<CR><LF>", b"\n.\r\n"),
    ("<CR><LF>.<LF>", b"\r\n.\n"),
    ("<CR><LF>.<CR>", b"\r\n.\r"),
    ("<CR>.<CR><LF>", b"\r.\r\n"),
    ("<LF>.<CR>", b"\n.\r"),
)


def payload(sender: str, rcpt: str, label: str, seq: bytes) -> bytes:
    head = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\n"
            f"Subject: mailfort audit: smuggling probe {label}\r\n\r\n"
            "smuggling probe, first message").encode()
    smuggled = (f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n"
                f"From: <{sender}>\r\nSubject: mailfort audit: smuggled {label}\r\n\r\n"
                "smuggled\r\n").encode()
    return head + seq + smuggled + b"\r\n.\r\n"


@check("smuggling.end-of-data", "+", order=50)
def smuggling(ctx: Context) -> Verdict:
    t = ctx.target
    ctx.port("smtp")
    if not t.known_address:
        raise skip("need.user")
    sender = foreign(ctx, "sender")
    smuggled: list[str] = []
    uncounted: list[tuple[str, str]] = []
    for label, seq in VARIANTS:
        with ctx.session("smtp") as (c, _):
            mail, _ = c.cmd(f"MAIL FROM:<{sender}>")
            rcpt, _ = c.cmd(f"RCPT TO:<{t.known_address}>")
            if not (accepted(mail) and accepted(rcpt)):
                raise inconclusive("control.known-refused", address=t.known_address)
            code, _ = c.cmd("DATA")
            if code != 354:
                raise inconclusive("smuggle.no-data", code=code)
            c.send(payload(sender, t.known_address, label, seq),
                   note=f"<message with {label}, then MAIL/RCPT/DATA, then <CRLF>.<CRLF>>")
            try:
                codes = [int(code) for code in c.replies_before_quit()]
            except NoReply as exc:  # one variant not counted does not hide another's FAIL
                uncounted.append((label, str(exc)))
                continue
            finally:
                c.close()
            if any(200 <= code < 400 for code in codes[1:]):
                smuggled.append(f"{label}: replies {' '.join(map(str, codes))}")
    if smuggled:
        return Verdict(FAIL, "smuggle.answered", {"what": "; ".join(smuggled)})
    if uncounted:
        what = f"{len(uncounted)} of {len(VARIANTS)} probes, first {uncounted[0][0]}"
        return Verdict(INCONCLUSIVE, "replies.uncounted", {"what": what,
                                                           "error": uncounted[0][1]})
    return Verdict(PASS, "smuggle.one-reply", {"n": len(VARIANTS)})
