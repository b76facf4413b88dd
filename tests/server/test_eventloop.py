"""server/eventloop.py: which loop mailfort serves on, and that the suite runs on it."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from mailfort.server import eventloop


def _serves_on_uvloop() -> bool:
    return eventloop.loop_factory() is uvloop.new_event_loop


async def test_the_suite_runs_on_the_loop_mailfort_serves_on() -> None:
    """tests/conftest.py's policy: the in-process nodes of every test meet uvloop's
    transports, as ``mailfort serve``'s workers do (asyncio's under
    ``MAILFORT_EVENT_LOOP=asyncio``, both sides alike)."""
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop) == _serves_on_uvloop()


def test_uvloop_unless_asyncio_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILFORT_EVENT_LOOP", raising=False)
    assert eventloop.loop_factory() is uvloop.new_event_loop
    monkeypatch.setenv("MAILFORT_EVENT_LOOP", "asyncio")
    assert eventloop.loop_factory() is asyncio.new_event_loop


def test_run_returns_what_the_coroutine_returns_on_that_loop() -> None:
    async def which() -> type:
        return type(asyncio.get_running_loop())

    assert (eventloop.run(which()) is uvloop.Loop) == _serves_on_uvloop()
