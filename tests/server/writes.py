"""Counting a session's writes: its transport wrapped, since uvloop's transports (the loop
mailfort serves on, server/eventloop.py) take no attribute assigned to them."""

from __future__ import annotations

from typing import Any


class CountingTransport:
    """Forwards everything to the transport it wraps, noting the size of each write."""

    def __init__(self, transport: Any, writes: list[int]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(len(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def count_writes(session: Any) -> list[int]:
    """The sizes of ``session``'s writes from now on, in order."""
    writes: list[int] = []
    session.transport = CountingTransport(session.transport, writes)
    return writes
