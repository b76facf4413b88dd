"""The recipient policy a service asks at RCPT: hardened (the only one a config can give)
or the lab's legacy one.

``STRICT`` is mailfort's rule (``relay.decide_recipient``): relay only for an authenticated
or trusted client, unknown local users refused at RCPT. ``LegacyRecipients`` is what the
lab's legacy profile swaps in to show what that rule prevents: it relays for anyone (open
relay, 第三者中継) and accepts unknown local users, to bounce later (backscatter). Only
``mailfort.lab`` builds one; no configuration key or command-line flag can select it.
"""

from __future__ import annotations

from typing import Protocol

from mailfort.directory.base import Directory, Resolution
from mailfort.policy.relay import RCPT_OK, RecipientDecision, decide_recipient
from mailfort.protocol.address import Mailbox


class RecipientPolicy(Protocol):
    def decide(self, rcpt: Mailbox, directory: Directory, *, may_relay: bool
               ) -> RecipientDecision: ...


class StrictRecipients:
    """mailfort's rule; see ``relay.decide_recipient``."""

    def decide(self, rcpt: Mailbox, directory: Directory, *, may_relay: bool
               ) -> RecipientDecision:
        return decide_recipient(rcpt, directory, may_relay=may_relay)


STRICT = StrictRecipients()


class LegacyRecipients:
    """The lab's legacy server: every recipient accepted at RCPT.

    A foreign recipient is relayed whoever asks; an unknown local user is accepted and
    handed on as if remote, where the legacy profile's delivery bounces it (to whatever
    sender the client gave).
    """

    def decide(self, rcpt: Mailbox, directory: Directory, *, may_relay: bool
               ) -> RecipientDecision:
        if directory.is_local_domain(rcpt.domain):
            found = directory.resolve(str(rcpt))
            if found is not None:
                return RecipientDecision(RCPT_OK, found)
        return RecipientDecision(RCPT_OK, Resolution(local=(), remote=(str(rcpt),)),
                                 relay=True)
