"""The reply to a message that could not be stored: full disk or another failure.

RFC 5321 §4.2.3 and RFC 3463: 452 4.3.1 says "insufficient system storage", which tells
the client (and the operator reading its log) that retrying later will help once space
is freed; any other failure (read-only, EIO...) is the generic 451 4.3.0. Both are
temporary: the client keeps the message and retries, and nothing was acknowledged.
"""

from __future__ import annotations

import errno

from mailfort.protocol.replies import TEMP_LOCAL_ERROR, Reply

INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage, try again later")
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def storage_refusal(err: int | None) -> Reply:
    """452 4.3.1 for a full disk or quota, else 451 4.3.0."""
    return INSUFFICIENT_STORAGE if err in _FULL else TEMP_LOCAL_ERROR
