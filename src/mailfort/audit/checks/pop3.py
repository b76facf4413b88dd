"""POP3 authentication: USER/PASS or SASL before STLS, and APOP offered at all."""

from __future__ import annotations

import re

from mailfort.audit.client import ProbeError
from mailfort.audit.context import Context
from mailfort.audit.registry import FAIL, INCONCLUSIVE, PASS, Part, Verdict, check, part, skip

# RFC 1939 §7: a server that supports APOP puts a msg-id-like timestamp in its greeting.
APOP_STAMP = re.compile(r"<[^<>\s]+@[^<>\s]+>")


@check("pop3.plaintext-auth", "4", order=45)
def plaintext_auth(ctx: Context) -> Verdict:
    ctx.port("pop3")
    bad: list[Part] = []
    c = ctx.pop3("pop3")
    try:
        c.send(b"CAPA\r\n")
        ok, _ = c.status()
        caps = c.multiline() if ok else []
        for cap in caps:
            word = cap.split(" ")[0].upper()
            if word == "USER" or (word == "SASL" and len(cap.split()) > 1):
                bad.append(part("pop3.why.capa", cap=cap))
        c.send(b"USER mailfort-audit-probe\r\n")
        ok, _ = c.status()
        if ok:
            bad.append(part("pop3.why.user-ok"))
    finally:
        c.quit(pop3=True)
    if bad:
        return Verdict(FAIL, "pop3.cleartext", {"what": bad})
    return Verdict(PASS, "pop3.refused", {})


@check("pop3.apop", "4", order=47)
def apop(ctx: Context) -> Verdict:
    """APOP offered at all is a FAIL, in the clear or inside TLS: its MD5 challenge-response
    falls to practical attacks (2007) and makes the server keep every password in a form
    it can use as is. The greeting's timestamp is the offer (RFC 1939 §7); no password is
    sent, so the check needs no credentials."""
    found = [s for s in ("pop3", "pop3s") if s in ctx.open_ports]
    if not found:
        raise skip("port.none-of", services="pop3, pop3s")
    offered: list[str] = []
    unread: list[str] = []
    for service in found:
        try:
            c = ctx.connect(service)
        except ProbeError as exc:
            unread.append(f"{service}: {exc}")
            continue
        try:
            _, greeting = c.status()
            stamp = APOP_STAMP.search(greeting)
            if stamp:
                offered.append(f"{service}: greeting {stamp.group(0)}")
        except ProbeError as exc:
            unread.append(f"{service}: {exc}")
        finally:
            c.quit(pop3=True)
    if offered:
        return Verdict(FAIL, "apop.offered", {"where": "; ".join(offered)})
    if unread:
        return Verdict(INCONCLUSIVE, "probe.error", {"error": "; ".join(unread)[:200]})
    return Verdict(PASS, "apop.none", {"services": ", ".join(found)})
