"""The lab's legacy profile: mailfort with its protections switched off, for teaching.

The server knows policies, not the lab: ``server.profile.Profile`` names the seams where
a node asks a policy (engine settings, recipients, disclosure, the enqueue hook, login
throttling), each defaulting to the hardened rule. ``LegacyProfile.compose()`` fills them
with the weakened ones, and the lab hands the result to ``Node(..., profile=...)`` in
Python; it is never read from a configuration file, and ``mailfort serve`` has no option
that leads to it (a test tries both). Each switch is a small hook at its own depth, so the
hardened path stays as it is:

* engine options (``protocol.smtp.EngineSettings``): AUTH offered on the MX port in the
  clear and never required (one door for submission and relay), no STARTTLS, VRFY/EXPN
  answered from the directory, bare LF taken as a line end in DATA, limits raised to what
  merely keeps the machine safe; POP3 without STLS and without a per-session failure limit;
  IMAP the same way: no STARTTLS, LOGIN and AUTHENTICATE PLAIN in the clear (``AUTH=PLAIN``
  where the hardened server says ``LOGINDISABLED``), no per-session failure limit. Banners
  stay as they are: the legacy POP3 and SMTP name no software either;
* policy objects: ``policy.recipients.LegacyRecipients`` (open relay, unknown users
  accepted) and ``policy.disclosure.DirectoryDisclosure`` (VRFY/EXPN);
* accept-then-bounce: the enqueue hook bounces mail for unknown local users to whatever
  sender the client gave, through the outbound queue (backscatter);
* an ``AuthConfig`` that configuration validation would refuse: no delay, no block;
* a vacation responder that answers any sender the message claims (no SPF/DKIM/AUTH).
"""

from __future__ import annotations

import dataclasses
import email.utils
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mailfort.config import AuthConfig
from mailfort.directory.base import Directory
from mailfort.policy.disclosure import DirectoryDisclosure
from mailfort.policy.recipients import LegacyRecipients
from mailfort.policy.vacation import Rules as VacationRules
from mailfort.protocol import imap as imap_engine
from mailfort.protocol import pop3 as pop3_engine
from mailfort.protocol import smtp as smtp_engine
from mailfort.server.profile import Profile

if TYPE_CHECKING:
    from mailfort.server.app import Node
    from mailfort.server.smtp import EnqueueHook, Envelope

log = logging.getLogger("mailfort.lab")

# "No limits beyond what keeps the machine safe": large, but still bounded.
SAFE_COMMAND_LINE = 1024 * 1024
SAFE_DATA_LINE = 1024 * 1024
SAFE_RECIPIENTS = 100_000
SAFE_ERRORS = 100_000
# The classic responder: it answers whatever sender the message claims (once per period).
LEGACY_VACATION = VacationRules(require_authenticated_sender=False)
NO_BRUTE_FORCE_LIMIT = AuthConfig(delay_after_failures=10**9, block_after_failures=10**9,
                                  block_seconds=1.0, failure_delay=0.0)


@dataclass(frozen=True)
class LegacyProfile:
    """What the lab's legacy server is; see the module docstring."""

    domain: str  # names without @ in VRFY/EXPN are taken as users of this domain
    auth: AuthConfig = NO_BRUTE_FORCE_LIMIT
    recipients: LegacyRecipients = dataclasses.field(default_factory=LegacyRecipients)

    def compose(self) -> Profile:
        """The weakened server, as the server's own seams (server/profile.py)."""
        return Profile(
            auth=self.auth,
            auth_on_every_port=True,  # AUTH on the one door (the MX)
            smtp_settings=self.engine_settings,
            disclosure=self.disclosure,
            pop3_settings=self.pop3_settings,
            imap_settings=self.imap_settings,
            recipients=self.recipients,
            enqueue=self.enqueue_hook,
            vacation=LEGACY_VACATION,
        )

    def smtp_settings(self, base: smtp_engine.EngineSettings,
                      directory: Directory) -> smtp_engine.EngineSettings:
        """Both SMTP seams at once: the engine's weakened settings and VRFY/EXPN."""
        return dataclasses.replace(self.engine_settings(base),
                                   legacy_accounts=self.disclosure(directory))

    def disclosure(self, directory: Directory) -> DirectoryDisclosure:
        return DirectoryDisclosure(directory, self.domain)

    def engine_settings(self, base: smtp_engine.EngineSettings) -> smtp_engine.EngineSettings:
        return dataclasses.replace(
            base,
            max_command_line=SAFE_COMMAND_LINE,
            max_data_line=SAFE_DATA_LINE,
            max_recipients=SAFE_RECIPIENTS,
            max_errors=SAFE_ERRORS,
            tls_available=False,
            auth_mechanisms=("PLAIN", "LOGIN"),
            auth_requires_tls=False,
            auth_required=False,
            legacy_bare_lf=True,
        )

    def pop3_settings(self, base: pop3_engine.EngineSettings) -> pop3_engine.EngineSettings:
        return dataclasses.replace(base, tls_available=False, allow_plaintext=True,
                                   max_errors=SAFE_ERRORS, max_auth_failures=SAFE_ERRORS)

    def imap_settings(self, base: imap_engine.EngineSettings) -> imap_engine.EngineSettings:
        return dataclasses.replace(base, tls_available=False, allow_plaintext=True,
                                   max_errors=SAFE_ERRORS, max_auth_failures=SAFE_ERRORS)

    def enqueue_hook(self, node: Node) -> EnqueueHook:
        """Queue foreign recipients as usual; for unknown local users, queue a bounce
        (with the whole message inside) to the envelope sender, whoever that really is."""
        directory, queue, hostname = node.directory, node.queue, node.cfg.server.hostname

        def enqueue(path: Path, env: Envelope, submitted_by: str | None) -> Callable[[], None]:
            sender = "" if env.sender is None else str(env.sender)
            unknown = [a for a in env.remote
                       if directory.is_local_domain(a.rpartition("@")[2])]
            foreign = [a for a in env.remote if a not in unknown]
            idents = []
            if foreign:
                idents.append(queue.enqueue(path, sender, foreign, submitted_by,
                                            ident=env.queue_id or None))
            if unknown and sender:
                bounce = legacy_bounce(hostname, sender, unknown, path.read_bytes())
                idents.append(queue.enqueue_bytes(bounce, "", [sender], None))
                log.info("legacy profile: bounce for %d unknown user(s) queued to <%s>",
                         len(unknown), sender)

            def undo() -> None:
                for ident in idents:
                    queue.delete(ident)

            return undo

        return enqueue


def legacy_bounce(hostname: str, to: str, unknown: list[str], original: bytes) -> bytes:
    """The old-style non-delivery report: the whole original message quoted back."""
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{to}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {email.utils.formatdate()}",
        f"Message-ID: <{secrets.token_hex(8)}@{hostname}>",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        "This is the mail system. Your message could not be delivered to:",
        *(f"  <{a}>: 550 5.1.1 user unknown" for a in unknown),
        "",
        "------ The original message follows ------",
        "",
    ]
    return "\r\n".join(lines).encode() + original.replace(b"\r\n", b"\n").replace(
        b"\n", b"\r\n")
