"""IMAP authentication before TLS: LOGINDISABLED, no AUTH= mechanism, LOGIN refused."""

from __future__ import annotations

import secrets

from mailfort.audit.client import NoReply
from mailfort.audit.context import Context, imap_capabilities
from mailfort.audit.registry import FAIL, PASS, Part, Verdict, check, inconclusive, part


@check("imap.plaintext-auth", "4", order=45)
def plaintext_auth(ctx: Context) -> Verdict:
    """Before STARTTLS on 143: LOGINDISABLED advertised (RFC 9051 §6.2.3), no AUTH=
    mechanism offered, and a LOGIN refused with NO or BAD. The LOGIN carries a made-up
    user and a throw-away password, never a real one. A ``NO [AUTHENTICATIONFAILED]``
    means the server checked the password it was sent in the clear: a FAIL too, while
    ``NO [PRIVACYREQUIRED]`` (RFC 5530) or BAD is the refusal asked for. A LOGIN answered
    late (a server that slows failed logins, as Dovecot does) hides nothing the
    capabilities already showed: those FAIL on their own; alone, it is INCONCLUSIVE."""
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
        try:
            status, _ = c.tagged("L")
        except NoReply as exc:
            c.close()  # the LOGIN may still be answered: a LOGOUT now would wait for it
            if not bad:
                raise inconclusive("probe.no-reply", what="LOGIN before STARTTLS",
                                   error=str(exc)) from exc
            return Verdict(FAIL, "imap.cleartext", {"what": bad})
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
