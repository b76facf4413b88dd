"""What a client that pipelines self-answered commands and does not read makes the worker
hold.

    python bench/pop3_pipelined_memory.py [--protocol pop3] [--commands 20000]
        [--messages 1000] [--connections 1]

Starts ``mailfort serve`` (bench/mfproc.py, plaintext login on loopback, IMAP on), then
``--connections`` clients with a 4 KB receive buffer each send ``--commands`` commands
the engine answers itself and read nothing; prints the worker's RSS before and 3 s after.
``--protocol``: ``pop3`` (LIST after login, ``--messages`` small messages delivered to
alice first), ``smtp`` (VRFY at the MX), ``imap`` (CAPABILITY after login) or
``managesieve`` (CAPABILITY). The logins' argon2 working memory (19 MiB, kept 5 s:
passwords._Memory) is part of the "after" figure of pop3 and imap.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mfproc import MailfortServer, proc_status  # noqa: E402

COMMANDS = {"pop3": b"LIST\r\n", "smtp": b"VRFY\r\n", "imap": b"a CAPABILITY\r\n",
            "managesieve": b"CAPABILITY\r\n"}


def read_until(sock: socket.socket, end: bytes) -> bytes:
    got = b""
    while not got.endswith(end):
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError(f"closed; got {got!r}")
        got += chunk
    return got


def connect(mf: MailfortServer, protocol: str) -> socket.socket:
    """A logged-in (pop3, imap) or greeted (smtp, managesieve) slow-reading client."""
    port = mf.ports["mx" if protocol == "smtp" else protocol]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(30)
    user, password = "alice@example.test", mf.passwords["alice@example.test"]
    if protocol == "pop3":
        read_until(sock, b"\r\n")
        sock.sendall(f"USER {user}\r\n".encode())
        read_until(sock, b"\r\n")
        sock.sendall(f"PASS {password}\r\n".encode())
        print(read_until(sock, b"\r\n").decode().strip())
    elif protocol == "imap":
        read_until(sock, b"\r\n")
        sock.sendall(f"l LOGIN {user} {password}\r\n".encode())
        print(read_until(sock, b"\r\n").decode().strip()[:60])
    elif protocol == "managesieve":
        read_until(sock, b'"ManageSieve ready"\r\n')
    else:
        read_until(sock, b"\r\n")
    return sock


def send_without_reading(sock: socket.socket, data: bytes) -> int:
    sock.setblocking(False)
    sent, start = 0, time.monotonic()
    while sent < len(data) and time.monotonic() - start < 10:
        try:
            sent += sock.send(data[sent:])
        except BlockingIOError:
            time.sleep(0.01)
    return sent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", choices=sorted(COMMANDS), default="pop3")
    ap.add_argument("--commands", type=int, default=20000)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--connections", type=int, default=1)
    args = ap.parse_args()
    command = COMMANDS[args.protocol]
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="mailfort-pipelist-") as tmp:
        mf = MailfortServer(Path(tmp), port_base=15500, plaintext_pop3=True, imap=True)
        mf.start()
        socks: list[socket.socket] = []
        try:
            if args.protocol == "pop3":
                subprocess.run(["smtp-source", "-c", "-l", "200", "-m", str(args.messages),
                                "-s", "5", "-f", "a@example.org", "-t", "alice@example.test",
                                f"127.0.0.1:{mf.ports['mx']}"], check=True,
                               stdout=subprocess.DEVNULL)
            time.sleep(1)
            before = proc_status(mf.pid)["VmRSS"]
            socks = [connect(mf, args.protocol) for _ in range(args.connections)]
            time.sleep(1)
            sent = sum(send_without_reading(s, command * args.commands) for s in socks)
            time.sleep(3)
            after = proc_status(mf.pid)["VmRSS"]
            print(f"{args.protocol}: {sent // len(command)} commands sent on "
                  f"{args.connections} connection(s); worker RSS {before / 1024:.1f} MB "
                  f"before, {after / 1024:.1f} MB after")
        finally:
            for s in socks:
                s.close()
            mf.stop()


if __name__ == "__main__":
    main()
