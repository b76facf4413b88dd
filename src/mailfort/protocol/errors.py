"""The per-session error limit of both engines.

The rule: a session may make ``max_errors`` errors (``limits.max_errors`` in the config);
the next one is still answered, then the session is closed. The limit is the number
tolerated, so ``max_errors = 1`` forgives one typing mistake and the configured number
means what it says.

What counts is the same in SMTP and POP3: every negative reply to what the client sent
(a command line or a SASL response), whoever decided it (the engine, or the server through
an event: an unknown recipient, failed credentials, a mailbox in use). A client that keeps
being refused is broken or probing, and either way is better disconnected. Replies that
close the session themselves (SMTP 421, the POP3 closing ``-ERR``) are not counted.
"""

from __future__ import annotations


class ErrorCounter:
    """Counts a session's errors against its limit."""

    __slots__ = ("count", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def record(self) -> bool:
        """Count one error; True when it goes past the limit and the session must close."""
        self.count += 1
        return self.count > self.limit
