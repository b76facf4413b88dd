"""Sender ownership on submission: who may use which address.

An authenticated user may send as their own address and, when the configuration lets
aliases grant sending, as any alias that leads to them. Everything else is a forged sender.
"""

from __future__ import annotations

from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses

from mailfort.directory.base import Directory
from mailfort.protocol.address import Mailbox
from mailfort.protocol.replies import Reply

NULL_SENDER_REFUSED = Reply(553, "5.7.1", "Null sender not allowed on submission")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by authenticated user")
FROM_NOT_OWNED = Reply(553, "5.7.1", "From: header address not owned by authenticated user")
FROM_MISSING = Reply(550, "5.6.0", "Message refused: no usable From: header")


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
    """The addresses of every From: header, or None when there is none parseable."""
    msg = BytesHeaderParser(policy=compat32).parsebytes(header_block)
    values = msg.get_all("From") or []
    if not values:
        return None
    addrs = [addr for _, addr in getaddresses([str(v) for v in values])]
    if not addrs or any("@" not in a for a in addrs):
        return None
    return addrs


def check_header_from(
    directory: Directory, user: str, header_block: bytes, *, aliases_grant: bool,
    allowed: frozenset[str] | None = None,
) -> Reply | None:
    addrs = from_addresses(header_block)
    if addrs is None:
        return FROM_MISSING
    if allowed is None:
        allowed = allowed_addresses(directory, user, aliases_grant=aliases_grant)
    if any(a.lower() not in allowed for a in addrs):
        return FROM_NOT_OWNED
    return None
