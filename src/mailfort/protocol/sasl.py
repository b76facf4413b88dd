"""SASL for both engines: client responses (RFC 4954 §4, RFC 5034 §4) and PLAIN (RFC 4616).

One implementation, so that SMTP AUTH and POP3 AUTH accept exactly the same things:

* A response line is strict base64 (RFC 4648, no whitespace or other characters); ``=``
  alone, and an empty line, are the empty response; ``*`` cancels the exchange. Anything
  else, non-ASCII octets included, is ``BAD_BASE64``: a reply, never an exception.
* PLAIN is ``[authzid] NUL authcid NUL passwd``, all UTF-8, with a non-empty authcid and
  passwd (RFC 4616 §2); anything else is ``MALFORMED``.
* mailfort grants no proxy authorization, so an authzid must name the authenticating user
  itself (RFC 4616 §2: the server fails the exchange when the client may not act as the
  authzid). "Itself" means what the directory means by the same account: both names are
  compared after ``identity_key``, the normalisation the directory applies to addresses
  before a lookup (surrounding white space dropped, local part and domain lower-cased, a
  trailing dot of the domain dropped). An exact comparison would refuse a client that
  writes the same account in two spellings; a looser one could let an authzid name an
  account other than the one whose password was checked. Otherwise ``NOT_AUTHORIZED``.

SASLprep (RFC 4013) is not applied: the directory stores and compares addresses without
it, and passwords are checked as the UTF-8 the client sent.
"""

from __future__ import annotations

import base64
import binascii
import enum
from dataclasses import dataclass, field

# A SASL response line may be this long, CRLF included (RFC 4954 §4: 12288 octets). POP3
# takes the same bound: a response line is not a command, so the 255-octet command limit
# does not fit it, and one bound for both keeps the engines alike.
MAX_SASL_LINE = 12288


class SaslError(enum.Enum):
    CANCELLED = "cancelled"  # the client sent "*"
    BAD_BASE64 = "bad base64"
    MALFORMED = "malformed"  # not authzid NUL authcid NUL passwd in UTF-8
    NOT_AUTHORIZED = "not authorized"  # an authzid other than the authcid


@dataclass(frozen=True, slots=True)
class PlainCredentials:
    authcid: str
    password: str = field(repr=False)


def decode_response(line: bytes) -> bytes | SaslError:
    """The octets of one client response (a continuation line or an initial response)."""
    if line == b"*":
        return SaslError.CANCELLED
    if line == b"=":
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        return SaslError.BAD_BASE64


def decode_text(line: bytes) -> str | SaslError:
    """A response that carries UTF-8 text (the LOGIN user name and password)."""
    data = decode_response(line)
    if isinstance(data, SaslError):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return SaslError.BAD_BASE64


def parse_plain(message: bytes) -> PlainCredentials | SaslError:
    """A decoded PLAIN message, by the rules in the module docstring."""
    parts = message.split(b"\0")
    if len(parts) != 3:
        return SaslError.MALFORMED
    try:
        authzid, authcid, password = (p.decode("utf-8") for p in parts)
    except UnicodeDecodeError:
        return SaslError.MALFORMED
    if not authcid or not password:
        return SaslError.MALFORMED
    if authzid and identity_key(authzid) != identity_key(authcid):
        return SaslError.NOT_AUTHORIZED
    return PlainCredentials(authcid, password)


def identity_key(name: str) -> str:
    """A user name as the directory compares it: ``local@domain`` lower-cased, trimmed,
    without the domain's trailing dot. Two names with the same key are one account."""
    local, at, domain = name.strip().rpartition("@")
    if not at:
        return name.strip().lower()
    return f"{local.lower()}@{domain.lower().removesuffix('.')}"
