"""Session deadlines kept in buckets: one loop timer per bucket, not one per session.

Every session holds a deadline (its idle or session time limit; sessions re-arm lazily, so
activity only moves ``last_activity`` and the deadline fires once per idle period). A loop
timer per session is memory held by every idle session for nothing: asyncio's
``TimerHandle`` and its heap entry, and under uvloop a libuv timer with its handles,
about 600 bytes a session, 6 MB for the 10,000 idle sessions a node is sized for
(bench/idle_sessions.py). Here a deadline is rounded up to the next multiple of
``RESOLUTION`` and the session joins that bucket's set; the loop has one timer per bucket
in use. Sessions that arrive together share a bucket, so thousands of them cost a few
dozen timers. A deadline fires at most ``RESOLUTION`` late and never early.
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from typing import Protocol

log = logging.getLogger("mailfort.session")

RESOLUTION = 0.05  # seconds: the coarsest a session deadline may be late


class Timed(Protocol):
    """A session: ``timer`` is the bucket it waits in (None once cancelled)."""

    def _timer_fired(self) -> None: ...


class TimerWheel:
    """The buckets of one event loop (``for_loop``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.proxy(loop)  # the wheel is the loop's (``_wheels``), not its owner
        self._buckets: dict[int, set[Timed]] = {}
        self._handles: dict[int, asyncio.TimerHandle] = {}

    def schedule(self, session: Timed, delay: float) -> int:
        """Have ``session._timer_fired()`` called once, ``delay`` seconds from now (up to
        ``RESOLUTION`` later); returns the bucket, which ``cancel`` takes."""
        key = math.ceil((self._loop.time() + max(delay, 0.0)) / RESOLUTION)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = set()
            self._handles[key] = self._loop.call_at(key * RESOLUTION, self._fire, key)
        bucket.add(session)
        return key

    def cancel(self, session: Timed, key: int) -> None:
        bucket = self._buckets.get(key)
        if bucket is None:
            return
        bucket.discard(session)
        if not bucket:  # the last of its sessions: no timer left waiting for nobody
            del self._buckets[key]
            self._handles.pop(key).cancel()

    def __len__(self) -> int:
        """Sessions waiting (for tests and the curious)."""
        return sum(map(len, self._buckets.values()))

    def timers(self) -> int:
        """Loop timers in use: one per bucket."""
        return len(self._handles)

    def _fire(self, key: int) -> None:
        self._handles.pop(key, None)
        for session in self._buckets.pop(key, ()):
            if getattr(session, "timer", key) != key:
                continue  # its deadline cancelled or moved by one fired before it
            try:
                session._timer_fired()
            except Exception:  # one session's failure must not skip the others' deadlines
                log.exception("session timer failed")


_wheels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TimerWheel] = (
    weakref.WeakKeyDictionary())


def for_loop(loop: asyncio.AbstractEventLoop) -> TimerWheel:
    """The wheel of ``loop``, made on first use (it goes with the loop)."""
    wheel = _wheels.get(loop)
    if wheel is None:
        wheel = _wheels[loop] = TimerWheel(loop)
    return wheel
