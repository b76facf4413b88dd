"""A client that goes away at any point of a transaction leaves nothing behind.

For every point (after MAIL, after RCPT, in DATA, in a large DATA that already went to a
spool file, between the last line and the dot, after the dot before reading the 250, in
BDAT), over MX and over submission, closed politely (FIN) or reset (RST): no partial
message is ever visible (Maildir as POP3 shows it, outbound queue), and the in-process
node ends with the same open descriptors, the same asyncio tasks and no spool file.
A message whose dot was sent may be stored (the server cannot know the client left), but
complete and once.
"""

from __future__ import annotations

import asyncio
import base64
import os
import poplib
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailfort.server.app import Node
from mailfort.store.maildir import maildir_for
from tests.conftest import make_config, seed_directory
from tests.server.test_mx import read_reply

ALICE = "alice@example.test"
END = b"END-OF-MESSAGE\r\n"
POINTS = ["connect", "mail", "rcpt", "354", "headers", "body", "large-body", "before-dot",
          "after-dot", "bdat-part", "bdat-last-unread"]


@pytest.fixture
async def plain_node(tmp_path: Path, server_ssl_context: ssl.SSLContext) -> AsyncIterator[Node]:
    cfg = make_config(tmp_path / "data", server={"allow_plaintext_auth_on_loopback": True},
                      store={"flush": "fsync"})
    seed_directory(cfg)
    async with Node(cfg, ssl_context=server_ssl_context) as n:
        yield n


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def stored_files(node: Node) -> list[Path]:
    """Every message file a reader could see: the Maildir (as POP3 lists it) and the queue."""
    md = maildir_for(node.cfg.mail_path, ALICE)
    dirs = [md / "new", md / "cur", node.cfg.data_path / "queue" / "msg"]
    return [p for d in dirs if d.is_dir() for p in d.iterdir()]


def leftovers(node: Node) -> list[Path]:
    data = node.cfg.data_path
    dirs = [data / "spool", maildir_for(data / "mail", ALICE) / "tmp", data / "queue" / "tmp"]
    return [p for d in dirs if d.is_dir() for p in d.iterdir()]


async def transaction(node: Node, service: str, point: str, token: str, rst: bool) -> None:
    """Run a transaction up to ``point``, then drop the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port(service))

    async def cmd(line: bytes) -> str:
        writer.write(line + b"\r\n")
        return await read_reply(reader)

    headers = (f"From: {ALICE}\r\nTo: {ALICE}\r\nSubject: {token}\r\n\r\n").encode()
    body = b"line of the body\r\n" * 20
    try:
        await read_reply(reader)
        if point == "connect":
            return
        assert (await cmd(b"EHLO client.test")).startswith("250")
        sender = b"someone@remote.test"
        if service == "submission":
            cred = base64.b64encode(f"\0{ALICE}\0alice-pw".encode())
            assert (await cmd(b"AUTH PLAIN " + cred)).startswith("235")
            sender = ALICE.encode()
        assert (await cmd(b"MAIL FROM:<" + sender + b">")).startswith("250")
        if point == "mail":
            return
        assert (await cmd(f"RCPT TO:<{ALICE}>".encode())).startswith("250")
        if service == "submission":
            assert (await cmd(b"RCPT TO:<bob@remote.test>")).startswith("250")
        if point == "rcpt":
            return
        if point.startswith("bdat"):
            msg = headers + body + END
            if point == "bdat-part":
                writer.write(b"BDAT %d LAST\r\n" % len(msg) + msg[: len(msg) // 2])
            else:
                writer.write(b"BDAT %d LAST\r\n" % len(msg) + msg)
            await writer.drain()
            return
        assert (await cmd(b"DATA")).startswith("354")
        if point == "354":
            return
        writer.write(headers[:-2] if point == "headers" else headers + body)
        if point == "large-body":
            writer.write(b"x" * 78 + b"\r\n" * 1 + (b"y" * 78 + b"\r\n") * 3000)
        if point in ("before-dot", "after-dot"):
            writer.write(END)
        if point == "after-dot":
            writer.write(b".\r\n")
        await writer.drain()
    finally:
        await asyncio.sleep(0.05)  # the server has read what was sent
        if rst:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()
        await asyncio.sleep(0)


async def settle(node: Node, tasks: int, fds: int) -> None:
    """Wait (briefly) until sessions, tasks and descriptors are back to the baseline."""
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        busy = any(s.sessions for s in node.services.values())
        quiet = len(asyncio.all_tasks()) <= tasks and open_fds() <= fds
        if not busy and quiet and not leftovers(node):
            return
        await asyncio.sleep(0.02)


def pop3_messages(node: Node) -> list[bytes]:
    c = poplib.POP3("127.0.0.1", node.port("pop3"), timeout=10)
    try:
        c.user(ALICE)
        c.pass_("alice-pw")
        count, _ = c.stat()
        out = [b"\r\n".join(c.retr(i)[1]) + b"\r\n" for i in range(1, count + 1)]
        c.quit()
        return out
    finally:
        c.close()


@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
@pytest.mark.parametrize("service", ["mx", "submission"])
async def test_disconnect_at_every_point_leaves_nothing(
    plain_node: Node, service: str, rst: bool
) -> None:
    node = plain_node
    # Warm up: one whole transaction, so that lazily made things (Maildir, queue, thread
    # pools) exist before the baseline is taken.
    await transaction(node, service, "after-dot", "warm-up", rst=False)
    await asyncio.sleep(0.3)
    await settle(node, 10**6, 10**6)
    tasks, fds = len(asyncio.all_tasks()), open_fds()
    base_files = {p.name for p in stored_files(node)}

    for point in POINTS:
        token = f"token-{service}-{point}"
        await transaction(node, service, point, token, rst)
        await settle(node, tasks, fds)
        assert not any(s.sessions for s in node.services.values()), point
        assert leftovers(node) == [], point
        assert open_fds() <= fds, f"{point}: descriptors {open_fds()} > {fds}"
        assert len(asyncio.all_tasks()) <= tasks, f"{point}: tasks {asyncio.all_tasks()}"
        new = [p for p in stored_files(node) if p.name not in base_files]
        base_files |= {p.name for p in new}
        for p in new:
            assert p.read_bytes().endswith(END), f"{point}: partial message {p}"
        if point in ("after-dot", "bdat-last-unread"):
            # Complete: it may have been stored, once per place (Maildir, and the queue
            # for submission's remote recipient).
            assert len(new) <= (2 if service == "submission" else 1), point
        else:
            assert new == [], f"{point}: stored without its end"

    for data in await asyncio.to_thread(pop3_messages, node):
        assert data.endswith(END)
