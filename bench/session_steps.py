"""Where one SMTP session's time goes: the median wall time of each step, one message per
connection, one connection at a time, against any server on a loopback port.

    python bench/session_steps.py PORT [--messages 1000] [--rcpt alice@example.test]

Point it at a running mailfort (bench/mfproc.py starts one) or at the reference Postfix of
../shared/anchors/postfix-reference.sh (port 10025); warm both up first (run it once).
Loopback only: the address is 127.0.0.1.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

STEPS = ("connect + greeting", "EHLO", "MAIL", "RCPT", "DATA", "message + dot", "QUIT")
BODY = (b"From: <bench@example.org>\r\nSubject: steps\r\n\r\n"  # about 1 KB
        + (b"x" * 98 + b"\r\n") * 10 + b".\r\n")


def _reply(f: socket.SocketIO | object) -> bytes:
    while True:
        line = f.readline()  # type: ignore[attr-defined]
        if not line:
            raise SystemExit("the server closed the connection")
        if line[3:4] != b"-":
            return line


CLOSE = "close (QUIT to EOF)"


def one(port: int, rcpt: str, times: dict[str, list[float]]) -> float:
    """One connection, as smtp-source sends it; each step's time into ``times`` (and the
    wait for the server's close when ``times`` has a ``CLOSE`` entry); its wall time."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")
        _reply(f)
        times[STEPS[0]].append(time.perf_counter() - t0)
        commands = (b"EHLO client.bench.test\r\n", b"MAIL FROM:<bench@example.org>\r\n",
                    f"RCPT TO:<{rcpt}>\r\n".encode(), b"DATA\r\n", BODY, b"QUIT\r\n")
        for step, command in zip(STEPS[1:], commands, strict=True):
            t = time.perf_counter()
            s.sendall(command)
            reply = _reply(f)
            times[step].append(time.perf_counter() - t)
            if reply[:1] not in b"23":
                raise SystemExit(f"{step}: {reply!r}")
        if CLOSE in times:
            t = time.perf_counter()
            f.read()  # the server closes after 221
            times[CLOSE].append(time.perf_counter() - t)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("port", type=int)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--rcpt", default="alice@example.test")
    args = ap.parse_args()
    times: dict[str, list[float]] = {step: [] for step in STEPS}
    for _ in range(args.messages):
        one(args.port, args.rcpt, times)
    total = 0.0
    for step in STEPS:
        median = statistics.median(times[step]) * 1e6
        total += median
        print(f"{step:20s} {median:7.0f} µs")
    print(f"{'sum of medians':20s} {total:7.0f} µs")


if __name__ == "__main__":
    main()
