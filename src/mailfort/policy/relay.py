"""The recipient decision at RCPT: deliver locally, relay, or refuse — decided now.

Deciding at RCPT time is what keeps mailfort off both sides of the old abuse: an
unauthenticated client can never make it relay (554 5.7.1), and an unknown local user is
refused before any data is accepted (550 5.1.1), so no bounce ever goes to a forged sender.
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
    reply: Reply
    resolution: Resolution | None
    relay: bool = False


def decide_recipient(rcpt: Mailbox, directory: Directory, *, may_relay: bool) -> RecipientDecision:
    # An address literal names a host, not a mail domain: never local, and relaying to a
    # bare IP is how spam engines probe; refuse it even for authenticated users.
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
