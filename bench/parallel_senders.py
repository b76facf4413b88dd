"""Issue 24, item 9: one sender with many parallel sessions never meets the per-address cap.

Starts ``mailfort serve`` (two workers, the default ``max_connections_per_ip`` of 50, the
loopback exemption turned off so that the client is counted like a remote MTA), then
sends ``--messages`` messages over ``--sessions`` parallel clients, one connection per
message ending with QUIT (as ``smtp-source -s 45 -m 20000``). Prints how each attempt
ended; exit status 1 if any was not a 250 (before the fix: a few 421 "Too many connections
from your address" per thousand messages). The default test suite runs a shorter version
(tests/server/test_connections.py). Loopback only.

    python bench/parallel_senders.py --sessions 45 --messages 20000
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
from pathlib import Path

from mfproc import MailfortServer, bench_tmpdir

BODY = b"From: <s@remote.test>\r\nTo: <alice@example.test>\r\nSubject: load\r\n\r\nhello\r\n.\r\n"


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed by the server")
        if line[3:4] != b"-":
            return line


async def one(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        greeting = await _reply(reader)
        if not greeting.startswith(b"220 "):
            return greeting[:60].decode(errors="replace").strip()
        writer.write(b"EHLO client.remote.test\r\nMAIL FROM:<s@remote.test>\r\n"
                     b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
        for _ in range(4):
            await _reply(reader)
        writer.write(BODY)
        end = await _reply(reader)
        writer.write(b"QUIT\r\n")
        await _reply(reader)
        return "250" if end.startswith(b"250 ") else end[:60].decode(errors="replace").strip()
    finally:
        writer.close()


async def run(port: int, sessions: int, messages: int) -> collections.Counter[str]:
    left = messages
    outcomes: collections.Counter[str] = collections.Counter()

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            try:
                outcomes[await asyncio.wait_for(one(port), 60)] += 1
            except (OSError, TimeoutError) as exc:
                outcomes[repr(exc)[:60]] += 1

    await asyncio.gather(*(client() for _ in range(sessions)))
    return outcomes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sessions", type=int, default=45)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--port-base", type=int, default=14500)
    args = ap.parse_args()
    with bench_tmpdir("mf-parallel-") as root, MailfortServer(
            Path(root), port_base=args.port_base, workers=args.workers, max_connections=5000,
            max_connections_per_ip=50,
            extra_limits="connection_limit_exceptions = []\n") as server:
        start = time.monotonic()
        outcomes = asyncio.run(run(server.ports["mx"], args.sessions, args.messages))
        elapsed = time.monotonic() - start
    print(f"{args.sessions} sessions, {args.messages} messages, {args.workers} workers, "
          f"{elapsed:.1f} s: {dict(outcomes)}")
    return 0 if set(outcomes) == {"250"} else 1


if __name__ == "__main__":
    sys.exit(main())
