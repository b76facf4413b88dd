"""``mailfort serve`` for the soak, plus what only the process itself can see.

    python bench/soak_server.py CONFIG STATS_FILE

Runs the node as ``mailfort serve`` does and, once a second, writes its live asyncio task
count to STATS_FILE (one number, replaced atomically), which bench/soak.py samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from mailfort.config import load
from mailfort.server.app import Node
from mailfort.server.main import raise_file_limit


async def main(config: str, stats: Path) -> None:
    cfg = load(config)
    raise_file_limit(cfg)
    node = Node(cfg)
    await node.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tmp = stats.with_suffix(".tmp")
    while not stop.is_set():
        tmp.write_text(f"{len(asyncio.all_tasks())}\n")
        os.replace(tmp, stats)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    await node.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2])))
