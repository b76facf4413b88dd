"""The recipient decision at RCPT: deliver locally, relay, or refuse — decided now.

Deciding at RCPT time is what keeps mailfort off both sides of the old abuse: an
unauthenticated client can never make it relay (554 5.7.1), and an unknown local user is
refused before any data is accepted (550 5.1.1), so no bounce ever goes to a forged sender.

The decision looks only at the parsed domain. The local part is opaque (the parser never
reads ``%``, ``!`` or a quoted ``@`` as a next hop), so ``u%foreign@local`` is simply an
unknown user of ``local``, and a domain is local only if the directory says so exactly:
``evil-local.test`` or ``local.test.foreign`` are foreign, whatever they look like.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailfort.directory.base import Directory, Resolution
from mailfort.protocol.address import Mailbox
from mailfort.protocol.replies import NO_SUCH_USER, RELAY_DENIED, Reply

RCPT_OK = Reply(250, "2.1.5", "Recipient OK")
LITERAL_REFUSED = Reply(554, "5.7.1", "Relay access denied: address literals are not accepted")


@dataclass(frozen=True)
class RecipientDecision:
    """The RCPT reply, and when positive where the mail goes; ``relay`` marks foreign mail."""

    reply: Reply
    resolution: Resolution | None  # None exactly when the reply is negative
    relay: bool = False


def decide_recipient(rcpt: Mailbox, directory: Directory, *, may_relay: bool) -> RecipientDecision:
    """Decide one RCPT. ``may_relay`` is true only for an authenticated submission.

    Address literals (``u@[192.0.2.1]``) are refused even when relaying is allowed: a bare
    IP names a host, not a mail domain we serve, bypasses MX and the per-domain TLS policy,
    and is how spam engines probe for relays; no legitimate user needs it.
    """
    if rcpt.literal:
        return RecipientDecision(LITERAL_REFUSED, None)
    if directory.is_local_domain(rcpt.domain):
        resolution = directory.resolve(str(rcpt))
        if resolution is None:
            return RecipientDecision(NO_SUCH_USER, None)
        return RecipientDecision(RCPT_OK, resolution)
    if may_relay:
        return RecipientDecision(RCPT_OK, Resolution(local=(), remote=(str(rcpt),)), relay=True)
    return RecipientDecision(RELAY_DENIED, None)
