"""The event loop every mailfort process serves on: uvloop's, where it is installed.

uvloop runs asyncio's protocols and transports on libuv, in compiled code: the loop's own
pass, the socket reads and writes and the transports' bookkeeping cost less Python per
event than asyncio's selector loop. A lone SMTP sender's connection, which waits for every
step in turn, took 13 % less wall time and CPU with it (bench/RESULTS.md, "uvloop, session
deadlines in buckets"); under many sessions the two are even. Nothing in mailfort depends
on which loop runs it: the test suite runs on the same one (tests/conftest.py), and
``MAILFORT_EVENT_LOOP=asyncio`` chooses asyncio's own, for a comparison or a platform
without uvloop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


try:  # imported with this module, by the supervisor before it forks: the workers share it
    import uvloop
except ImportError:  # pragma: no cover - a platform without it: asyncio's loop
    uvloop = None


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes a new loop: uvloop's unless asyncio's is asked for or uvloop is missing."""
    if uvloop is not None and os.environ.get("MAILFORT_EVENT_LOOP", "uvloop") != "asyncio":
        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the loop of ``loop_factory``."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
