"""The control socket's file belongs to the server that made it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mailfort.server.control import ControlServer, request, socket_path


async def test_a_closing_server_leaves_its_successors_socket_in_place(tmp_path: Path) -> None:
    """After a configuration reload the next primary worker may put its socket at the
    path before the one it replaces has closed: that close must not remove it."""

    async def answer(name: str) -> dict[str, object]:
        async def status(args: list[str]) -> str:
            return f"ok {name}"

        return {"status": status}

    path = socket_path(tmp_path)
    first = ControlServer(path, await answer("first"))  # type: ignore[arg-type]
    await first.start()
    assert await asyncio.to_thread(request, tmp_path, "status") == "ok first"
    second = ControlServer(path, await answer("second"))  # type: ignore[arg-type]
    await second.start()
    await first.close()
    assert path.exists()
    assert await asyncio.to_thread(request, tmp_path, "status") == "ok second"
    await second.close()
    assert not path.exists()
