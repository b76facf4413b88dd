"""SMTP load generator with smtp-source's parameters, for servers on loopback only.

By default every message uses its own connection (like ``smtp-source -c``): connect, EHLO,
MAIL, RCPT, DATA, QUIT. With ``--keep-session`` each of the sessions connects (and
authenticates) once and sends its share of the messages over that connection, as a mail
client does. Reports accepted messages per second. Optional AUTH over STARTTLS for the
submission benchmark. With ``--message-dir`` the messages are that folder's files (sent in
turn, each as it is: already CRLF and dot-stuffed, e.g. DKIM-signed ones made beforehand by
bench/senderauth_bench.py) instead of a generated body.

    python bench/smtp_load.py --port 2525 --size 1024 --sessions 50 --messages 2000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ssl
import sys
import time
from pathlib import Path


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            return line


async def open_session(
    host: str, port: int, auth: tuple[str, str] | None, tls: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    reader, writer = await asyncio.open_connection(host, port)
    await _reply(reader)
    writer.write(b"EHLO bench.client\r\n")
    await _reply(reader)
    if tls is not None:
        writer.write(b"STARTTLS\r\n")
        if not (await _reply(reader)).startswith(b"220"):
            return None
        await writer.start_tls(tls)
        writer.write(b"EHLO bench.client\r\n")
        await _reply(reader)
    if auth is not None:
        token = base64.b64encode(f"\0{auth[0]}\0{auth[1]}".encode()).decode()
        writer.write(f"AUTH PLAIN {token}\r\n".encode())
        if not (await _reply(reader)).startswith(b"235"):
            return None
    return reader, writer


async def send_in_session(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes, rcpt: str,
    sender: str,
) -> bool:
    writer.write(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
    r1, r2, r3 = await _reply(reader), await _reply(reader), await _reply(reader)
    if not (r1.startswith(b"250") and r2.startswith(b"250") and r3.startswith(b"354")):
        return False
    writer.write(body + b".\r\n")
    return (await _reply(reader)).startswith(b"250")


async def one_message(
    host: str, port: int, body: bytes, rcpt: str, sender: str,
    auth: tuple[str, str] | None, tls: ssl.SSLContext | None,
) -> bool:
    session = await open_session(host, port, auth, tls)
    if session is None:
        return False
    reader, writer = session
    try:
        ok = await send_in_session(reader, writer, body, rcpt, sender)
        writer.write(b"QUIT\r\n")
        await _reply(reader)
        return ok
    finally:
        writer.close()


def make_body(size: int, sender: str, rcpt: str) -> bytes:
    head = f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: bench\r\n\r\n".encode()
    line = b"x" * 78 + b"\r\n"
    n = max(0, size - len(head)) // len(line) + 1
    return head + line * n


def load_bodies(folder: str) -> list[bytes]:
    """The messages in ``folder`` (sorted by name), each ending with CRLF, for DATA."""
    bodies = [p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()]
    if not bodies:
        raise SystemExit(f"no messages in {folder}")
    return [b if b.endswith(b"\r\n") else b + b"\r\n" for b in bodies]


async def run(args: argparse.Namespace) -> dict[str, float]:
    message_dir = getattr(args, "message_dir", None)  # callers building a Namespace
    bodies = (load_bodies(message_dir) if message_dir
              else [make_body(args.size, args.sender, args.rcpt)])
    sent = 0

    def next_body() -> bytes:
        nonlocal sent
        sent += 1
        return bodies[sent % len(bodies)]

    tls = None
    if args.starttls:
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    auth = (args.user, args.password) if args.user else None
    remaining = args.messages
    accepted = failed = 0

    async def session_worker() -> None:
        nonlocal remaining, accepted, failed
        session = await open_session(args.host, args.port, auth, tls)
        if session is None:
            failed += 1
            return
        reader, writer = session
        while remaining > 0:
            remaining -= 1
            try:
                ok = await send_in_session(reader, writer, next_body(), args.rcpt,
                                           args.sender)
            except (OSError, ConnectionError, ssl.SSLError):
                ok = False
            if ok:
                accepted += 1
            else:
                failed += 1
        writer.write(b"QUIT\r\n")
        writer.close()

    async def worker() -> None:
        nonlocal remaining, accepted, failed
        while remaining > 0:
            remaining -= 1
            try:
                ok = await one_message(args.host, args.port, next_body(), args.rcpt,
                                       args.sender, auth, tls)
            except (OSError, ConnectionError, ssl.SSLError):
                ok = False
            if ok:
                accepted += 1
            else:
                failed += 1

    start = time.perf_counter()
    work = session_worker if args.keep_session else worker
    await asyncio.gather(*(work() for _ in range(args.sessions)))
    elapsed = time.perf_counter() - start
    return {"accepted": accepted, "failed": failed, "seconds": elapsed,
            "rate": accepted / elapsed if elapsed else 0.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=2525)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--sender", default="bench@example.org")
    p.add_argument("--rcpt", default="alice@example.test")
    p.add_argument("--starttls", action="store_true")
    p.add_argument("--user", default="")
    p.add_argument("--password", default="")
    p.add_argument("--message-dir", default="",
                   help="send these files (CRLF, dot-stuffed) in turn instead of a generated body")
    p.add_argument("--keep-session", action="store_true",
                   help="one connection (and AUTH) per session, messages sent over it")
    args = p.parse_args(argv)
    if not args.host.startswith("127.") and args.host not in ("::1", "localhost"):
        print("refusing: benchmarks only target loopback", file=sys.stderr)
        return 2
    r = asyncio.run(run(args))
    print(f"accepted={r['accepted']} failed={r['failed']} seconds={r['seconds']:.2f} "
          f"rate={r['rate']:.1f}/s")
    return 0 if r["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
