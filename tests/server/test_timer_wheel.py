"""server/timer_wheel.py: session deadlines in buckets, one loop timer per bucket."""

from __future__ import annotations

import asyncio
import time

from mailfort.server import timer_wheel
from mailfort.server.timer_wheel import RESOLUTION, TimerWheel


class Session:
    def __init__(self, fired: list[tuple[Session, float]]) -> None:
        self.fired = fired

    def _timer_fired(self) -> None:
        self.fired.append((self, time.monotonic()))


async def test_a_deadline_fires_once_never_early_and_at_most_a_bucket_late() -> None:
    wheel = TimerWheel(asyncio.get_running_loop())
    fired: list[tuple[Session, float]] = []
    sessions = [Session(fired) for _ in range(3)]
    start = time.monotonic()
    for s, delay in zip(sessions, (0.2, 0.05, 0.12), strict=True):
        wheel.schedule(s, delay)
    await asyncio.sleep(0.2 + 3 * RESOLUTION)
    assert [s for s, _ in fired] == [sessions[1], sessions[2], sessions[0]]
    for (_, at), delay in zip(fired, (0.05, 0.12, 0.2), strict=True):
        # uvloop's clock is the loop's, cached per pass in milliseconds: a millisecond
        # of slack on the early side
        assert delay - 0.002 <= at - start <= delay + RESOLUTION + 0.05
    assert len(wheel) == 0 and wheel.timers() == 0


async def test_sessions_that_arrive_together_share_one_loop_timer() -> None:
    wheel = TimerWheel(asyncio.get_running_loop())
    fired: list[tuple[Session, float]] = []
    # a thousand sessions in a few milliseconds: one bucket (two, had a boundary passed)
    keys = {wheel.schedule(Session(fired), 0.1) for _ in range(1000)}
    assert len(wheel) == 1000 and wheel.timers() == len(keys) <= 2
    await asyncio.sleep(0.1 + 2 * RESOLUTION)
    assert len(fired) == 1000 and wheel.timers() == 0


async def test_cancelling_the_last_session_of_a_bucket_cancels_its_timer() -> None:
    wheel = TimerWheel(asyncio.get_running_loop())
    fired: list[tuple[Session, float]] = []
    a, b = Session(fired), Session(fired)
    ka, kb = wheel.schedule(a, 0.05), wheel.schedule(b, 5.0)
    assert wheel.timers() == 2
    wheel.cancel(b, kb)
    assert wheel.timers() == 1 and len(wheel) == 1
    wheel.cancel(b, kb)  # twice: nothing
    await asyncio.sleep(0.05 + 2 * RESOLUTION)
    assert [s for s, _ in fired] == [a]
    wheel.cancel(a, ka)  # after it fired: nothing
    assert wheel.timers() == 0 and len(wheel) == 0


async def test_a_failing_session_does_not_keep_the_others_from_their_deadline() -> None:
    wheel = TimerWheel(asyncio.get_running_loop())
    fired: list[tuple[Session, float]] = []

    class Broken:
        def _timer_fired(self) -> None:
            raise RuntimeError("boom")

    key = wheel.schedule(Broken(), 0.05)
    for _ in range(5):
        assert wheel.schedule(Session(fired), 0.05) in (key, key + 1)
    await asyncio.sleep(0.05 + 3 * RESOLUTION)
    assert len(fired) == 5


async def test_a_session_may_set_its_next_deadline_when_one_fires() -> None:
    wheel = TimerWheel(asyncio.get_running_loop())
    times: list[float] = []

    class Rearming:
        def _timer_fired(self) -> None:
            times.append(time.monotonic())
            if len(times) < 3:
                wheel.schedule(self, 0.05)

    wheel.schedule(Rearming(), 0.05)
    await asyncio.sleep(0.15 + 6 * RESOLUTION)
    assert len(times) == 3 and times[0] < times[1] < times[2]
    assert wheel.timers() == 0


async def test_each_loop_has_its_own_wheel() -> None:
    loop = asyncio.get_running_loop()
    assert timer_wheel.for_loop(loop) is timer_wheel.for_loop(loop)

    async def other() -> TimerWheel:
        return timer_wheel.for_loop(asyncio.get_running_loop())

    assert await asyncio.to_thread(asyncio.run, other()) is not timer_wheel.for_loop(loop)


async def test_a_deadline_cancelled_by_one_fired_before_it_in_its_bucket_does_not_fire() -> None:
    """Ending a session may end another (stress mode frees a slot): the bucket has been
    taken out already, so the session's own ``timer`` says it no longer waits."""
    wheel = TimerWheel(asyncio.get_running_loop())
    fired: list[str] = []

    class Named:
        def __init__(self, name: str) -> None:
            self.name = name
            self.timer: int | None = None
            self.other: Named | None = None

        def _timer_fired(self) -> None:
            fired.append(self.name)
            if self.other is not None and self.other.timer is not None:
                wheel.cancel(self.other, self.other.timer)
                self.other.timer = None

    a, b = Named("a"), Named("b")
    a.other, b.other = b, a
    a.timer = wheel.schedule(a, 0.05)
    b.timer = wheel.schedule(b, 0.05)
    assert a.timer == b.timer or wheel.timers() == 2
    await asyncio.sleep(0.05 + 3 * RESOLUTION)
    assert len(fired) == 1  # whichever came first ended the other
