"""Stress mode: how one process's sessions adapt when its connection table fills.

With the normal limits (thousands of connections, a long idle timeout that any byte renews)
a crowd of idle sessions, byte-at-a-time writers and clients that never read can hold every
slot, and a legitimate client is refused. Past ``threshold`` of the connection cap this
process goes into stress mode:

- a session must make *progress* every ``idle_timeout`` seconds (the stressed one, e.g. 10 s
  instead of 300 s). Progress is a reply we sent (a command completed) or ``PROGRESS_BYTES``
  octets received, so a byte-at-a-time writer cannot renew its deadline: that is a per-command
  deadline and a minimum data rate in one rule;
- new sessions get a lower error limit (``max_errors``);
- when the table is full, the session with the oldest progress that has no work in flight is
  ended (``421 4.7.0``) to make room, before a new client is refused.

Sessions are kept in order of their last progress (a dict, in which a session that makes
progress is taken out and put back at the end: half the memory of an ``OrderedDict``'s
links for every idle session), so both the sweep and the eviction look only at the oldest
few. This is the
per-process mechanism; the connection counts themselves stay with ``ConnectionLimiter``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Protocol

from mailfort.config import StressSettings

log = logging.getLogger("mailfort.stress")

PROGRESS_BYTES = 1024  # octets received that count as progress without a reply
SWEEP_INTERVAL = 1.0  # seconds between sweeps while under stress


class StressedSession(Protocol):
    """What the guard needs of a session (``EngineSession`` provides it)."""

    task: Any
    closing: bool
    last_progress: float

    def stress_close(self) -> None: ...


class CountsConnections(Protocol):
    total: int
    max_total: int


class StressGuard:
    """One per process, shared by every listener of a node."""

    def __init__(self, settings: StressSettings | None = None) -> None:
        self.settings = settings or StressSettings()
        self.sessions: dict[StressedSession, None] = {}
        self.evicted = 0  # sessions ended to make room for a new client
        self.timed_out = 0  # sessions ended for making no progress under stress
        self._sweeper: asyncio.Task[None] | None = None
        self._stressed: dict[Any, Any] = {}  # engine settings -> their stressed copy

    # ------------------------------------------------------------------ state

    def active(self, limiter: CountsConnections) -> bool:
        t = self.settings.threshold
        return t > 0 and limiter.total >= t * limiter.max_total

    def add(self, session: StressedSession) -> None:
        session.last_progress = time.monotonic()
        self.sessions[session] = None

    def discard(self, session: StressedSession) -> None:
        self.sessions.pop(session, None)

    def progress(self, session: StressedSession) -> None:
        session.last_progress = time.monotonic()
        if self.sessions.pop(session, True) is None:  # it was there: now at the end
            self.sessions[session] = None

    def engine_settings(self, limiter: CountsConnections, settings: Any) -> Any:
        """The engine settings for a new session: under stress, a lower error limit."""
        if not self.active(limiter) or settings.max_errors <= self.settings.max_errors:
            return settings
        stressed = self._stressed.get(settings)
        if stressed is None:
            stressed = dataclasses.replace(settings, max_errors=self.settings.max_errors)
            self._stressed[settings] = stressed
        return stressed

    # ------------------------------------------------------------------ actions

    def make_room(self, limiter: CountsConnections) -> bool:
        """The table is full: end the session idle longest (no work in flight). True if
        one was ended (its slot is free now)."""
        if self.settings.threshold <= 0:
            return False
        quiet_since = time.monotonic() - self.settings.evict_after
        for session in list(self.sessions):
            if session.last_progress > quiet_since and self.settings.evict_after > 0:
                return False  # ordered by progress: none older is left
            if session.task is None and not session.closing:
                total = limiter.total
                session.stress_close()
                self.evicted += 1
                return limiter.total < total
        return False

    def check(self, limiter: CountsConnections) -> None:
        """After an admission: start sweeping when the table passes the threshold."""
        if self._sweeper is None and self.active(limiter):
            log.warning("connection table at %d of %d: stress mode on",
                        limiter.total, limiter.max_total)
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(limiter))

    def sweep_once(self) -> int:
        """End every session without progress for the stressed idle timeout."""
        deadline = time.monotonic() - self.settings.idle_timeout
        ended = 0
        for session in list(self.sessions):
            if session.last_progress > deadline:
                break  # ordered by progress: the rest are newer
            if session.task is None and not session.closing:
                session.stress_close()
                ended += 1
        self.timed_out += ended
        return ended

    async def _sweep(self, limiter: CountsConnections) -> None:
        try:
            while self.active(limiter):
                self.sweep_once()
                await asyncio.sleep(min(SWEEP_INTERVAL, self.settings.idle_timeout / 2))
            log.warning("connection table at %d of %d: stress mode off",
                        limiter.total, limiter.max_total)
        finally:
            self._sweeper = None

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
