"""The seams through which a node's policies can be set in Python, beyond its configuration.

A ``Profile`` names each place where the server asks a policy rather than hard-coding a
rule: the SMTP, POP3 and IMAP engine settings, who may be a recipient, what VRFY/EXPN
disclose, what happens to accepted mail (the enqueue hook), how logins are throttled, and
whether AUTH is offered on every SMTP port, whom a vacation reply may answer. Every
field's default (``None``, ``False``) is the hardened rule that the configuration builds,
so ``Profile()`` is what ``mailfort serve`` runs. A different profile is only ever passed
to ``Node(..., profile=...)`` in Python: ``Config`` holds plain values only, and no key or
``serve`` option leads here (the teaching lab composes its weakened server from these
seams; tests/lab/test_profile.py tries the other ways in).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailfort.config import AuthConfig
from mailfort.directory.base import Directory
from mailfort.policy.recipients import RecipientPolicy
from mailfort.policy.vacation import Rules as VacationRules
from mailfort.protocol import imap as imap_engine
from mailfort.protocol import pop3 as pop3_engine
from mailfort.protocol import smtp as smtp_engine

if TYPE_CHECKING:
    from mailfort.server.app import Node
    from mailfort.server.smtp import EnqueueHook


@dataclass(frozen=True)
class Profile:
    """A node's policies where they differ from the hardened ones; see the module docstring."""

    # Login throttling in place of ``cfg.auth`` (values that validation would refuse).
    auth: AuthConfig | None = None
    # AUTH checked on every SMTP listener, the MX too (one door for submission and relay).
    auth_on_every_port: bool = False
    # Every SMTP listener's engine settings, from the ones the configuration gives.
    smtp_settings: Callable[[smtp_engine.EngineSettings], smtp_engine.EngineSettings] | None \
        = None
    # What VRFY/EXPN answer from the node's directory (none: 252 and 502 for everything).
    disclosure: Callable[[Directory], smtp_engine.AccountLookup] | None = None
    # Every POP3 listener's engine settings, from the ones the configuration gives.
    pop3_settings: Callable[[pop3_engine.EngineSettings], pop3_engine.EngineSettings] | None \
        = None
    # Every IMAP listener's engine settings, from the ones the configuration gives (the
    # loopback ones too: the profile decides for every client).
    imap_settings: Callable[[imap_engine.EngineSettings], imap_engine.EngineSettings] | None \
        = None
    # Who may be a recipient at RCPT (none: policy.recipients.StrictRecipients with SRS).
    recipients: RecipientPolicy | None = None
    # What accepted mail for remote addresses becomes, given the built node (none: queued
    # for delivery, forwards with SRS; an accept-then-bounce hook goes here).
    enqueue: Callable[[Node], EnqueueHook] | None = None
    # Who a Sieve vacation may answer (none: policy.vacation.HARDENED, only an
    # authenticated sender; the lab's legacy profile answers whoever the sender claims).
    vacation: VacationRules | None = None

    def smtp(self, settings: smtp_engine.EngineSettings,
             directory: Directory) -> smtp_engine.EngineSettings:
        """``settings`` with this profile's engine seams applied (the same object if none)."""
        if self.smtp_settings is not None:
            settings = self.smtp_settings(settings)
        if self.disclosure is not None:
            settings = dataclasses.replace(settings,
                                           legacy_accounts=self.disclosure(directory))
        return settings


HARDENED = Profile()  # what every configuration runs
