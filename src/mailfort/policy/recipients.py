"""The recipient policy a service asks at RCPT: hardened (the only one a config can give)
or the lab's legacy one.

``STRICT`` is mailfort's rule (``relay.decide_recipient``): relay only for an authenticated
or trusted client, unknown local users refused at RCPT. ``LegacyRecipients`` is what the
lab's legacy profile swaps in to show what that rule prevents: it relays for anyone (open
relay, 第三者中継) and accepts unknown local users, to bounce later (backscatter). It is
set in Python only (server/profile.py); no configuration key or command-line flag can select it.

SRS addresses (policy/srs.py) of our domains are decided before the directory: a bounce
(null sender) to one whose hash and day verify goes back to the original sender
(``BounceReturn``); any other mail to one, or a forged one, is an unknown user (550 5.1.1),
the same reply as for any address we do not have. Only bounces: the envelope sender of a
forward is where DSNs go (RFC 5321 §4.5.5, null sender), and accepting other mail there
would let whoever saw the address send anything to the original sender through us.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from mailfort.directory.base import Directory, Resolution
from mailfort.policy import srs as srs_mod
from mailfort.policy.relay import RCPT_OK, RecipientDecision, decide_recipient
from mailfort.protocol.address import Mailbox
from mailfort.protocol.replies import NO_SUCH_USER, TEMP_LOCAL_ERROR

log = logging.getLogger("mailfort.srs")


class RecipientPolicy(Protocol):
    def decide(self, rcpt: Mailbox, directory: Directory, *, may_relay: bool,
               bounce: bool = False) -> RecipientDecision:
        """``bounce``: the transaction's sender is null (MAIL FROM:<>)."""


@dataclass(frozen=True)
class BounceReturn(RecipientDecision):
    """A bounce to a verified SRS address: it goes back to the original sender, not as a
    forward (no sender rewriting, no notice to an alias owner)."""


class StrictRecipients:
    """mailfort's rule (``relay.decide_recipient``), with SRS addresses when ``srs``."""

    def __init__(self, srs: srs_mod.SRS | None = None, srs_domain: str = "") -> None:
        self.srs = srs
        self.srs_domain = srs_domain.lower().rstrip(".")

    def decide(self, rcpt: Mailbox, directory: Directory, *, may_relay: bool,
               bounce: bool = False) -> RecipientDecision:
        if self.srs is not None and not rcpt.literal and srs_mod.is_srs(rcpt.local_part) \
                and (rcpt.domain == self.srs_domain or directory.is_local_domain(rcpt.domain)):
            return self._srs(rcpt, directory, bounce)
        return decide_recipient(rcpt, directory, may_relay=may_relay)

    def _srs(self, rcpt: Mailbox, directory: Directory, bounce: bool) -> RecipientDecision:
        assert self.srs is not None
        if not bounce:
            return RecipientDecision(NO_SUCH_USER, None)
        try:
            original = self.srs.reverse(rcpt.local_part)
        except (OSError, ValueError):  # the key file: a local fault, the bounce may retry
            log.exception("SRS key unavailable; %s deferred", rcpt)
            return RecipientDecision(TEMP_LOCAL_ERROR, None)
        if original is None:
            log.info("SRS address %s does not verify (forged, altered or expired)", rcpt)
            return RecipientDecision(NO_SUCH_USER, None)
        domain = original.rpartition("@")[2].lower()
        if directory.is_local_domain(domain):  # a sender of ours: delivered here
            found = directory.resolve(original)
            if found is None:
                return RecipientDecision(NO_SUCH_USER, None)
            return BounceReturn(RCPT_OK, found)
        return BounceReturn(RCPT_OK, Resolution(local=(), remote=(original,)))


STRICT = StrictRecipients()


class LegacyRecipients:
    """The lab's legacy server: every recipient accepted at RCPT.

    A foreign recipient is relayed whoever asks; an unknown local user is accepted and
    handed on as if remote, where the legacy profile's delivery bounces it (to whatever
    sender the client gave).
    """

    def decide(self, rcpt: Mailbox, directory: Directory, *, may_relay: bool,
               bounce: bool = False) -> RecipientDecision:
        if directory.is_local_domain(rcpt.domain):
            found = directory.resolve(str(rcpt))
            if found is not None:
                return RecipientDecision(RCPT_OK, found)
        return RecipientDecision(RCPT_OK, Resolution(local=(), remote=(str(rcpt),)),
                                 relay=True)
