"""IMAP authentication before TLS: LOGINDISABLED, no AUTH= mechanism, LOGIN and
AUTHENTICATE refused."""

from __future__ import annotations

import secrets

from mailfort.audit.client import NoReply, ProbeError, RawClient
from mailfort.audit.context import Context, imap_capabilities
from mailfort.audit.registry import FAIL, PASS, Part, Verdict, check, inconclusive, part


def _authenticate_asks(c: RawClient) -> bool | None:
    """Whether ``AUTHENTICATE PLAIN`` (no initial response) is answered with ``+``: the
    server asks for credentials, which a client would then send in the clear. Nothing is
    sent after the ``+`` but ``*``, which cancels (RFC 9051 §6.2.2). None: no answer."""
    c.send(b"P AUTHENTICATE PLAIN\r\n")
    try:
        status, _ = c.tagged("P")
    except NoReply:
        c.close()  # it may still answer: the session is out of step
        return None
    if status != "+":
        return False
    try:
        c.send(b"*\r\n")
        c.tagged("P")
    except ProbeError:
        c.close()
    return True


@check("imap.plaintext-auth", "4", order=45)
def plaintext_auth(ctx: Context) -> Verdict:
    """Before STARTTLS on 143: LOGINDISABLED advertised (RFC 9051 §6.2.3), no AUTH=
    mechanism offered, a LOGIN refused with NO or BAD, and an AUTHENTICATE PLAIN refused
    too, before the ``+`` that would ask for credentials. The LOGIN carries a made-up user
    and a throw-away password, never a real one; the AUTHENTICATE carries nothing. A
    ``NO [AUTHENTICATIONFAILED]`` to the LOGIN means the server checked the password it was
    sent in the clear: a FAIL too, while ``NO [PRIVACYREQUIRED]`` (RFC 5530) or BAD is the
    refusal asked for. A server may get the capabilities and LOGIN right and still let
    AUTHENTICATE through, so both are tried. A LOGIN answered late (a server that slows
    failed logins, as Dovecot does) hides nothing the capabilities already showed: those
    FAIL on their own; alone, it is INCONCLUSIVE, as is an AUTHENTICATE never answered."""
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
        if status == "OK":  # logged in: an AUTHENTICATE now would be refused for that
            bad.append(part("imap.why.login-ok"))
        else:
            if status == "NO" and "[AUTHENTICATIONFAILED]" in last:
                bad.append(part("imap.why.login-checked"))
            if c.closed:  # the session ended after the refused LOGIN: a new one
                c = ctx.imap("imap")
            asks = _authenticate_asks(c)
            if asks:
                bad.append(part("imap.why.authenticate"))
            elif asks is None and not bad:
                raise inconclusive("probe.no-reply", error="no reply",
                                   what="AUTHENTICATE PLAIN before STARTTLS")
    finally:
        c.quit(imap=True)
    if bad:
        return Verdict(FAIL, "imap.cleartext", {"what": bad})
    return Verdict(PASS, "imap.refused", {})
