"""The loop choice: uvloop where installed (tests run on it too), asyncio on request."""

from __future__ import annotations

import asyncio

import pytest

from mailfort.server import eventloop


async def test_tests_run_on_the_production_loop() -> None:
    fresh = eventloop.loop_factory()()
    try:
        assert type(asyncio.get_running_loop()) is type(fresh)
    finally:
        fresh.close()


def test_uvloop_by_default_asyncio_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    uvloop = pytest.importorskip("uvloop")
    monkeypatch.delenv("MAILFORT_EVENT_LOOP", raising=False)
    assert eventloop.loop_factory() is uvloop.new_event_loop
    monkeypatch.setenv("MAILFORT_EVENT_LOOP", "asyncio")
    assert eventloop.loop_factory() is asyncio.new_event_loop


def test_run_returns_the_result_and_closes_its_loop() -> None:
    seen: list[asyncio.AbstractEventLoop] = []

    async def main() -> int:
        seen.append(asyncio.get_running_loop())
        await asyncio.sleep(0)
        return 42

    assert eventloop.run(main()) == 42
    assert seen[0].is_closed()
