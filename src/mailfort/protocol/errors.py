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

Between a soft limit and that hard one (a ``Slowdown``), each negative reply is held back a
little longer than the one before: a scanner or guesser pays in time, while a client that
makes one mistake too many is not cut off. A hard limit alone had to be low enough to stop
probing and so ended sessions that a standard relay test (16 probes in one session) needs
to reach its verdict. The engines stay clock-free: they only say how long their pending
output should be held (``take_hold``); the server does the waiting.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Slowdown:
    """Past ``after`` errors, the n-th further negative reply is held ``n * step`` seconds,
    at most ``cap``."""

    after: int
    step: float
    cap: float


class ErrorCounter:
    """Counts a session's errors against its limit, and the hold its replies have earned."""

    __slots__ = ("_hold", "count", "limit", "slowdown")

    def __init__(self, limit: int, slowdown: Slowdown | None = None) -> None:
        self.limit = limit
        self.slowdown = slowdown
        self.count = 0
        self._hold = 0.0

    def record(self) -> bool:
        """Count one error; True when it goes past the limit and the session must close."""
        self.count += 1
        if self.count > self.limit:
            self._hold = 0.0  # the closing reply goes out at once
            return True
        sd = self.slowdown
        if sd is not None and self.count > sd.after:
            self._hold = min(self._hold + (self.count - sd.after) * sd.step, sd.cap)
        return False

    @property
    def holding(self) -> bool:
        """Whether output produced since the last ``take_hold`` must be held."""
        return self._hold > 0

    def take_hold(self) -> float:
        """Seconds to hold the output produced since the last call (0: send it now)."""
        hold, self._hold = self._hold, 0.0
        return hold
