"""Mail by SMTP held to each user's quota ([limits] mailbox_quota, mailbox_quota_messages).

IMAP APPEND, COPY and MOVE enforce the quota themselves (server/imap_commands.py); this is
the same limit at RCPT, on MX and submission alike, for local recipients: one whose Maildir
is full, or whom the message's announced size (``MAIL ... SIZE=``, RFC 1870) would take
over, gets ``452 4.2.2 Mailbox full``: temporary (RFC 3463: X.2.2 is "mailbox full", a
condition the user can clear), so the sender's queue retries and the mail arrives once
the user has deleted some. Without ``SIZE=`` a recipient is refused only when the Maildir
is already at or over the octet quota: a message may then take it over once, by its own
size (refusing after DATA would refuse every recipient of the transaction, or bounce).
An alias that reaches several users is refused when any of them is full.

The usage is read from the Maildir itself (``store.listing.MaildirUsage``: the names'
sizes, directories listed again only when they changed), not from a counter the writers
keep: MX, IMAP, POP3 and other Maildir tools all change it, and a count any one of them
forgot would refuse mail for ever.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from mailfort.protocol.replies import Reply
from mailfort.store.listing import MaildirUsage

MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox full")


class MailboxQuota:
    """The check at RCPT; blocking (disk): the SMTP session runs it in a thread."""

    def __init__(self, octets: int, messages: int, maildir: Callable[[str], Path]) -> None:
        self.octets = octets  # 0: no quota in octets
        self.messages = messages  # 0: no quota in messages
        self.maildir = maildir  # canonical user -> the root of their Maildir
        self.usage = MaildirUsage()

    def refusal(self, users: Iterable[str], size: int | None) -> Reply | None:
        """``MAILBOX_FULL`` if one of ``users`` cannot take a message of ``size`` octets
        (None: not announced), else None."""
        for user in users:
            used, count = self.usage.usage(self.maildir(user))
            if self.octets and used + max(size or 0, 1) > self.octets:
                return MAILBOX_FULL
            if self.messages and count + 1 > self.messages:
                return MAILBOX_FULL
        return None
