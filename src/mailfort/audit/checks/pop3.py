"""POP3 in the clear: USER/PASS or SASL accepted before STLS."""

from __future__ import annotations

from mailfort.audit.context import Context
from mailfort.audit.registry import FAIL, PASS, Verdict, check


@check("pop3.plaintext-auth", "4", order=45)
def plaintext_auth(ctx: Context) -> Verdict:
    ctx.port("pop3")
    bad: list[str] = []
    c = ctx.pop3("pop3")
    try:
        c.send(b"CAPA\r\n")
        ok, _ = c.status()
        caps = c.multiline() if ok else []
        for cap in caps:
            word = cap.split(" ")[0].upper()
            if word == "USER" or (word == "SASL" and len(cap.split()) > 1):
                bad.append(f"CAPA {cap} before STLS")
        c.send(b"USER mailfort-audit-probe\r\n")
        ok, _ = c.status()
        if ok:
            bad.append("USER answered +OK before STLS")
    finally:
        c.quit(pop3=True)
    if bad:
        return Verdict(FAIL, "pop3.cleartext", {"what": "; ".join(bad)})
    return Verdict(PASS, "pop3.refused", {})
