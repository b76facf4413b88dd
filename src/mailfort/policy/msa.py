"""The MSA policy of the submission services (RFC 6409): ownership, limits, completion.

Plugged into the same SMTP service as the MX; only what differs lives here. No I/O: the
session asks and stores, this module decides (and says which header lines to add).
"""

from __future__ import annotations

import secrets
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import formatdate

from mailfort.config import Config
from mailfort.directory.base import Directory
from mailfort.policy.counters import Counters, CounterStore, LocalCounters, as_async
from mailfort.policy.dkim import KeyStore
from mailfort.policy.dmarc import from_domains
from mailfort.policy.senderauth import header_block
from mailfort.policy.senders import allowed_addresses, check_envelope_sender, check_header_from
from mailfort.protocol.address import Mailbox
from mailfort.protocol.replies import Reply

# 452 at MAIL and at RCPT alike: temporary (the client tries later), and at RCPT the reply
# a client takes as "these recipients in a later transaction" (RFC 5321 §4.5.3.1.10).
RATE_LIMITED = Reply(452, "4.7.1", "Message rate limit exceeded, try again later")
RCPT_RATE_LIMITED = Reply(452, "4.7.1", "Recipient rate limit exceeded, try again later")
TOO_MANY_RCPT = Reply(452, "4.7.1", "Too many recipients for one message")
_HOUR = 3600.0


class MSAPolicy:
    def __init__(self, cfg: Config, directory: Directory,
                 counters: Counters | CounterStore) -> None:
        """``counters``: with shared ones, a ``FallbackCounters`` (the hourly rate is a
        throttle: counted on this node alone while the shared store is down)."""
        self.cfg = cfg
        self.directory = directory
        self.counters = as_async(counters)
        # The counts in this process's reach (memory, the node's SQLite file): MAIL and
        # RCPT are then answered in the turn of the loop that read them, so that their
        # replies leave with DATA's in one write (one TLS record, one send), as on the MX,
        # instead of one task and one write each (``check_mail_now``).
        self.store: CounterStore | None = (
            self.counters.store if isinstance(self.counters, LocalCounters) else None)
        self.keys = KeyStore(cfg.data_path)

    def _key(self, user: str) -> str:
        return f"sent-per-hour:{user.lower()}"

    def _rcpt_key(self, user: str) -> str:
        return f"rcpts-per-hour:{user.lower()}"

    def sender_rights(self, user: str) -> frozenset[str]:
        """The addresses ``user`` may send as (a directory lookup: the session fetches them
        off the event loop once per transaction when the directory is networked)."""
        return allowed_addresses(self.directory, user,
                                 aliases_grant=self.cfg.submission.aliases_grant_sending)

    async def check_mail(self, user: str, sender: Mailbox | None,
                         rights: frozenset[str] | None = None) -> Reply | None:
        """A refusal, or None with one of the user's messages of the hour reserved for
        this transaction: the caller ``release``s it unless the message gets its 250.

        Reserved, not read: the check and the count are one atomic step in the shared
        counters, so N sessions at once get at most the limit. At MAIL rather than at the
        end of DATA: a sender over the limit hears so before sending the message, as a
        temporary reply its client retries. ``rights``: ``sender_rights(user)`` if already
        known, else looked up here."""
        refusal = self._sender_refusal(user, sender, rights)
        if refusal is not None:
            return refusal
        if not await self.counters.reserve(self._key(user), self.cfg.submission.messages_per_hour,
                                           _HOUR):
            return RATE_LIMITED
        return None

    def check_mail_now(self, user: str, sender: Mailbox | None,
                       rights: frozenset[str] | None = None) -> Reply | None:
        """``check_mail`` without awaiting, on the counts in reach (``store`` not None)."""
        assert self.store is not None
        refusal = self._sender_refusal(user, sender, rights)
        if refusal is not None:
            return refusal
        if not self.store.reserve(self._key(user), self.cfg.submission.messages_per_hour, _HOUR):
            return RATE_LIMITED
        return None

    def _sender_refusal(self, user: str, sender: Mailbox | None,
                        rights: frozenset[str] | None) -> Reply | None:
        return check_envelope_sender(
            self.directory, user, sender, aliases_grant=self.cfg.submission.aliases_grant_sending,
            allowed=rights)

    async def reserve_recipient(self, user: str) -> Reply | None:
        """RCPT already accepted otherwise: one of the user's recipients of the hour
        reserved (None), as ``check_mail`` reserves a message, or a refusal."""
        if not await self.counters.reserve(self._rcpt_key(user),
                                           self.cfg.submission.recipients_per_hour, _HOUR):
            return RCPT_RATE_LIMITED
        return None

    def reserve_recipient_now(self, user: str) -> Reply | None:
        """``reserve_recipient`` without awaiting, on the counts in reach."""
        assert self.store is not None
        if not self.store.reserve(self._rcpt_key(user), self.cfg.submission.recipients_per_hour,
                                  _HOUR):
            return RCPT_RATE_LIMITED
        return None

    async def release(self, user: str, messages: int, recipients: int) -> None:
        """Give back what a transaction reserved and did not spend (no 250)."""
        if messages:
            await self.counters.release(self._key(user), messages)
        if recipients:
            await self.counters.release(self._rcpt_key(user), recipients)

    def check_rcpt(self, user: str, count: int) -> Reply | None:
        if count >= self.cfg.submission.max_recipients:
            return TOO_MANY_RCPT
        return None

    def check_headers(self, user: str, header_block: bytes,
                      rights: frozenset[str] | None = None) -> tuple[Reply | None, bytes]:
        """A refusal, or the header block to store in place of the client's.

        ``header_block`` is the client's header lines without the blank line that ends
        them, or the whole message when it ended first (BDAT: possibly not even in CRLF).
        What is returned is that block with Message-ID and Date added when missing
        (RFC 6409 §8.2, §8.3), each on a line of its own.
        """
        refusal = check_header_from(
            self.directory, user, header_block,
            aliases_grant=self.cfg.submission.aliases_grant_sending, allowed=rights,
        )
        if refusal is not None:
            return refusal, header_block
        msg = BytesHeaderParser(policy=compat32).parsebytes(header_block)
        extra = []
        if msg.get("Message-ID") is None:
            extra.append(f"Message-ID: <{secrets.token_hex(12)}@{self.cfg.server.hostname}>")
        if msg.get("Date") is None:
            extra.append(f"Date: {formatdate(localtime=False)}")
        return None, append_header_lines(header_block, extra)

    def signs(self, message: bytes) -> bool:
        """Whether ``sign`` has a key for the message's From: domain (a look at the key
        folder: keys made by ``mailfort dkim keygen`` count from the next message)."""
        domains = from_domains(header_block(message)) or []
        return bool(domains) and self.keys.has_keys(domains[0])

    def sign(self, user: str, message: bytes) -> bytes:
        """DKIM-Signature fields for a submitted message, one per key of its From: domain
        (RSA and Ed25519 side by side, RFC 8463 §3). The From: address was already checked
        to be the user's own (``check_headers``), so the domain is one of ours."""
        domains = from_domains(header_block(message)) or []
        fields = b""
        for domain in domains[:1]:
            for key in self.keys.keys(domain):
                fields = key.sign(message) + fields
        return fields


def append_header_lines(header_block: bytes, lines: list[str]) -> bytes:
    """``header_block`` with ``lines`` after it. A block that does not end in CRLF (a
    message cut inside its last header line) gets one first: an added header must never
    continue a line of the client's."""
    if not lines:
        return header_block
    if header_block and not header_block.endswith(b"\r\n"):
        header_block += b"\r\n"
    return header_block + "".join(line + "\r\n" for line in lines).encode()
