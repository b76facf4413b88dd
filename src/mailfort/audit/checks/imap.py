"""IMAP authentication before TLS: LOGINDISABLED, no AUTH= mechanism, LOGIN refused."""

from __future__ import annotations

import secrets

from mailfort.audit.context import Context, imap_capabilities
from mailfort.audit.registry import FAIL, PASS, Part, Verdict, check, part


@check("imap.plaintext-auth", "4", order=45)
def plaintext_auth(ctx: Context) -> Verdict:
    """Before STARTTLS on 143: LOGINDISABLED advertised (RFC 9051 §6.2.3), no AUTH=
    mechanism offered, and a LOGIN refused with NO or BAD. The LOGIN carries a made-up
    user and a throw-away password, never a real one. A ``NO [AUTHENTICATIONFAILED]``
    means the server checked the password it was sent in the clear: a FAIL too."""
    ctx.port("imap")
    bad: list[Part] = []
    c = ctx.imap("imap")
    try:
        caps = imap_capabilities(c)
        if "LOGINDISABLED" not in caps:
            bad.append(part("imap.why.no-logindisabled"))
        mechs = [w for w in caps if w.startswith("AUTH=")]
        if mechs:
            bad.append(part("imap.why.auth", mechs=" ".join(mechs)))
        probe = f"mailfort-audit-probe-{secrets.token_hex(4)}"
        c.send(f'L LOGIN {probe} "dummy-{secrets.token_hex(6)}"\r\n'.encode(),
               note=f"L LOGIN {probe} <dummy password>")
        status, _ = c.tagged("L")
        last = c.transcript[-1].upper()
        if status == "OK":
            bad.append(part("imap.why.login-ok"))
        elif status == "NO" and "[AUTHENTICATIONFAILED]" in last:
            bad.append(part("imap.why.login-checked"))
    finally:
        c.quit(imap=True)
    if bad:
        return Verdict(FAIL, "imap.cleartext", {"what": bad})
    return Verdict(PASS, "imap.refused", {})
