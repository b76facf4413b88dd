"""ManageSieve (RFC 5804, port 4190) authentication before TLS: no SASL mechanism offered,
AUTHENTICATE refused before it asks for credentials."""

from __future__ import annotations

from mailfort.audit.client import NoReply, ProbeError
from mailfort.audit.context import Context
from mailfort.audit.registry import FAIL, PASS, Part, Verdict, check, inconclusive, part


@check("managesieve.plaintext-auth", "4", order=45)
def plaintext_auth(ctx: Context) -> Verdict:
    """Before STARTTLS: the SASL capability empty (RFC 5804 §1.7 allows an empty list only
    with STARTTLS, which then must come first) and ``AUTHENTICATE "PLAIN"`` refused
    rather than answered with a challenge, which would ask the client for its password in
    the clear. Nothing is sent after a challenge but ``"*"``, which cancels (§2.1); no
    credentials are ever sent. An AUTHENTICATE never answered is INCONCLUSIVE unless the
    capabilities already FAIL on their own."""
    ctx.port("managesieve")
    bad: list[Part] = []
    c, caps = ctx.managesieve()
    try:
        mechs = caps.get("SASL", "").split()
        if mechs:
            bad.append(part("sieve.why.sasl", mechs=" ".join(mechs)))
        c.send(b'AUTHENTICATE "PLAIN"\r\n')
        try:
            status, _ = c.sieve(challenge=True)
        except NoReply as exc:
            c.close()
            if not bad:
                raise inconclusive("probe.no-reply", what="AUTHENTICATE before STARTTLS",
                                   error=str(exc)) from exc
            return Verdict(FAIL, "sieve.cleartext", {"what": bad})
        if status == '""':
            bad.append(part("sieve.why.authenticate"))
            try:
                c.send(b'"*"\r\n')
                c.sieve()
            except ProbeError:
                c.close()
        elif status == "OK":  # authenticated without credentials: worse still
            bad.append(part("sieve.why.authenticate"))
    finally:
        c.quit(sieve=True)
    if bad:
        return Verdict(FAIL, "sieve.cleartext", {"what": bad})
    return Verdict(PASS, "sieve.refused", {})
