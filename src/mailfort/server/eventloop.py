"""The event loop mailfort runs on: uvloop where it is installed, asyncio's own otherwise.

Sessions are ``asyncio.Protocol`` objects driven by sans-I/O engines, so in a short
request/response exchange (a POP3 download of many small messages, an SMTP dialogue) the
loop's own cost per wake-up is a large share of the server's time. uvloop does that part in
C: measured in ``bench/pop3_bench.py`` on the 2-core test machine, a 2,000-message POP3
download is about 15% faster (see bench/RESULTS.md). Nothing in mailfort depends on which
loop runs it, and the test suite runs on the same loop as production (tests/conftest.py).
``MAILFORT_EVENT_LOOP=asyncio`` in the environment selects asyncio's loop, for comparison.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """What creates mailfort's event loops."""
    if os.environ.get("MAILFORT_EVENT_LOOP", "").lower() != "asyncio":
        try:
            import uvloop
        except ImportError:  # not on this platform: asyncio's loop does the same job
            pass
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
