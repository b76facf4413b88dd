"""What a message asks of the TLS of its onward hops (RFC 8689): the REQUIRETLS MAIL
parameter (verified TLS to a server that also offers REQUIRETLS, or a bounce) and the
``TLS-Required: No`` header field (the sender opts out of the destination's MTA-STS and
DANE enforcement: deliver even when that policy fails).

RFC 8689 §4.1: when the REQUIRETLS parameter was given, the header field is ignored, so
the two never combine; REQUIRETLS wins. The tags are decided once, at enqueue, and kept in
the queue entry (so a restart does not lose them).

RFC 8689 §5 asks that the bounce of such a message be protected like the message itself.
mailfort's bounces are only ever delivered locally, to the authenticated submitter's
mailbox (queue/worker.py): they cross no network hop, and they quote the original header
section, never the body.
"""

from __future__ import annotations

import re

# The header field, unfolded value "No" (case-insensitive), RFC 8689 §5 ABNF: no comments.
_FIELD = re.compile(rb"^tls-required[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
# RFC 8689 §4.2.1, RFC 5248: the codes a REQUIRETLS message is refused or bounced with.
NEEDS_REQUIRETLS = "5.7.30"


def header_opts_out(header_block: bytes) -> bool:
    """True when the header block has exactly one ``TLS-Required`` field and it says "No".

    Anything else (absent, another value, several fields) keeps the normal policy: the
    opt-out lowers security, so only an unambiguous request counts.
    """
    fields = _FIELD.findall(header_block)
    if len(fields) != 1:
        return False
    value = b" ".join(fields[0].split())
    return value.lower() == b"no"


def tags(requiretls: bool, header_block: bytes) -> tuple[bool, bool]:
    """(requiretls, tls_optional) for the queue entry; REQUIRETLS wins (RFC 8689 §4.1)."""
    if requiretls:
        return True, False
    return False, header_opts_out(header_block)
