"""What a POP3 client that pipelines and does not read makes the worker hold.

    python bench/pop3_pipelined_memory.py [--commands 20000] [--messages 1000]

Starts ``mailfort serve`` (bench/mfproc.py, plaintext POP3 on a bench port), delivers
``--messages`` small messages to alice, then a client with a 4 KB receive buffer logs in,
sends ``--commands`` LIST commands and reads nothing; prints the worker's RSS before and
3 s after. The login's argon2 working memory (19 MiB, kept 5 s: passwords._Memory) is part
of the "after" figure.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commands", type=int, default=20000)
    ap.add_argument("--messages", type=int, default=1000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="mailfort-pipelist-") as tmp:
        mf = MailfortServer(Path(tmp), port_base=15500, plaintext_pop3=True)
        mf.start()
        try:
            subprocess.run(["smtp-source", "-c", "-l", "200", "-m", str(args.messages), "-s",
                            "5", "-f", "a@example.org", "-t", "alice@example.test",
                            f"127.0.0.1:{mf.ports['mx']}"], check=True,
                           stdout=subprocess.DEVNULL)
            time.sleep(1)
            before = proc_status(mf.pid)["VmRSS"]
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", mf.ports["pop3"]))
            sock.recv(1000)
            password = mf.passwords["alice@example.test"]
            sock.sendall(f"USER alice@example.test\r\nPASS {password}\r\n".encode())
            time.sleep(1)
            print(sock.recv(1000).decode().strip())
            sock.setblocking(False)
            data, sent, start = b"LIST\r\n" * args.commands, 0, time.monotonic()
            while sent < len(data) and time.monotonic() - start < 10:
                try:
                    sent += sock.send(data[sent:])
                except BlockingIOError:
                    time.sleep(0.01)
            time.sleep(3)
            after = proc_status(mf.pid)["VmRSS"]
            print(f"commands sent {sent // 6}; worker RSS {before / 1024:.1f} MB before, "
                  f"{after / 1024:.1f} MB after")
            sock.close()
        finally:
            mf.stop()


if __name__ == "__main__":
    main()
