"""Sender ownership on submission: who may use which address.

An authenticated user may send as their own address and, when the configuration lets
aliases grant sending, as any alias that leads to them. Everything else is a forged sender.
"""

from __future__ import annotations

from mailfort.directory.base import Directory
from mailfort.policy import headerfields
from mailfort.protocol.address import Mailbox
from mailfort.protocol.replies import Reply

NULL_SENDER_REFUSED = Reply(553, "5.7.1", "Null sender not allowed on submission")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by authenticated user")
FROM_NOT_OWNED = Reply(553, "5.7.1", "From: header address not owned by authenticated user")
FROM_MISSING = Reply(550, "5.6.0", "Message refused: no usable From: header")
FROM_NOT_ONE = Reply(550, "5.6.0", "Message refused: exactly one From: header field allowed")
SENDER_FIELD_NOT_OWNED = Reply(
    553, "5.7.1", "Sender: or Resent- header address not owned by authenticated user")
# The fields that name who sent the message (RFC 5322 §3.6.2, §3.6.6): each must be ours.
AUTHOR_FIELDS = ("from", "sender", "resent-from", "resent-sender")


def allowed_addresses(directory: Directory, user: str, *, aliases_grant: bool) -> frozenset[str]:
    own = user.lower()
    if not aliases_grant:
        return frozenset({own})
    return frozenset(a.lower() for a in directory.addresses_of(user)) | {own}


def check_envelope_sender(
    directory: Directory, user: str, sender: Mailbox | None, *, aliases_grant: bool,
    allowed: frozenset[str] | None = None,
) -> Reply | None:
    """None when the user may use ``sender`` in MAIL FROM, else the refusal. ``allowed``:
    the user's ``allowed_addresses`` when the caller already has them."""
    if sender is None:
        return NULL_SENDER_REFUSED
    if allowed is None:
        allowed = allowed_addresses(directory, user, aliases_grant=aliases_grant)
    if sender.literal or str(sender).lower() not in allowed:
        return SENDER_NOT_OWNED
    return None


def from_addresses(header_block: bytes) -> list[str] | None:
    """The addresses of the one From: field; None when there is not exactly one, or it
    names no address or cannot be read. The same field reader as DMARC's, which takes
    ``From :`` (obsolete syntax) for a From: field as mail readers do."""
    found = headerfields.values(header_block, "from")
    if len(found) != 1:
        return None
    parsed = headerfields.address_list(found[0])
    return parsed.mailboxes if parsed is not None and parsed.mailboxes else None


def check_header_from(
    directory: Directory, user: str, header_block: bytes, *, aliases_grant: bool,
    allowed: frozenset[str] | None = None,
) -> Reply | None:
    """Exactly one From: field, and every address of every From:, Sender: and Resent-
    field one the user may send as."""
    found = [(n, v) for n, v in headerfields.fields(header_block) if n in AUTHOR_FIELDS]
    froms = [v for n, v in found if n == "from"]
    if len(froms) > 1:
        return FROM_NOT_ONE
    addrs = from_addresses(header_block)
    if addrs is None:
        return FROM_MISSING
    if allowed is None:
        allowed = allowed_addresses(directory, user, aliases_grant=aliases_grant)
    if any(a.lower() not in allowed for a in addrs):
        return FROM_NOT_OWNED
    for name, value in found:
        parsed = headerfields.address_list(value)
        if parsed is None or any(a.lower() not in allowed for a in parsed.mailboxes):
            return FROM_NOT_OWNED if name == "from" else SENDER_FIELD_NOT_OWNED
    return None
