"""Crash campaign: mixed load against ``mailfort serve``, SIGKILLed at random moments.

Every round starts ``mailfort serve`` (a subprocess, fixed loopback ports, one data
directory for the whole run), drives at once

* MX mail to the local users alice and bob,
* submissions by alice (AUTH PLAIN, plaintext allowed on loopback) to bob (local), to
  ``r-…@remote.test`` (delivered through a ``[routes]`` entry to a loopback test MX run by
  this script, which survives the kills) and to ``reject-…@remote.test`` (that test MX
  answers 550, so alice gets a bounce),
* POP3 sessions of bob that RETR and DELE a few messages, then QUIT,

then kills the server with SIGKILL after a random delay and starts it again. At the end the
server runs once more until its queue is empty, is stopped, and the ledger is checked:

* every message that got a 250 is, exactly once: in its Maildir (MX, local submission),
  or received by the test MX (remote), or in alice's bounces (rejected);
* every message whose POP3 DELE was followed by ``+OK`` to QUIT is gone; a message deleted
  in a session whose QUIT got no answer may be either; nothing else is gone;
* a message that never got its 250 appears at most once, and nothing stored is partial.

A loss, a duplicate in a Maildir or a partial message is a failure. A duplicate at the test
MX or in the bounces is the one window the SMTP protocol itself leaves open (the remote
said 250, the kill came before the queue recorded it; RFC 1047): it is counted and its
width reported (time from the remote's 250 to the kill that followed), not hidden.

    python bench/crash_campaign.py --kills 25            # the long run (bench/RESULTS.md)
    python bench/crash_campaign.py --kills 3 --load 0.4  # what the test suite runs
    python bench/crash_campaign.py --kills 25 --workers 2 --reloads   # and a reload in each

With ``--workers 2`` each round also SIGKILLs one worker halfway through its load; with
``--reloads`` too, a quarter of the way through the configuration file changes and the
supervisor gets SIGHUP: a new generation of workers takes over while the old one finishes
the sessions it holds (and the old primary hands the queue over), all under load.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "src"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from mailfort import config as config_mod  # noqa: E402
from tests.conftest import (  # noqa: E402  (alice, bob; alice-pw, bob-pw)
    refusing_dns_port,
    seed_directory,
)
from tests.delivery.receiver import Receiver  # noqa: E402

ALICE, BOB = "alice@example.test", "bob@example.test"
END = b"END-OF-MESSAGE\r\n"
TOKEN = re.compile(rb"Subject: (tok-[0-9a-z-]+)")
SERVICES = ("mx", "submission", "pop3")


@dataclass
class Ledger:
    """What the clients were told, and what the kills did."""

    sent: set[str] = field(default_factory=set)  # every token a DATA was started for
    acked: dict[str, str] = field(default_factory=dict)  # token -> where it must end up
    deleted: set[str] = field(default_factory=set)  # DELE, then +OK to QUIT
    maybe_deleted: set[str] = field(default_factory=set)  # DELE, QUIT not answered
    kills: list[float] = field(default_factory=list)  # monotonic time of each SIGKILL
    kills_wall: list[float] = field(default_factory=list)  # the same, wall clock
    worker_kills: int = 0  # of them, kills of one worker (the node went on)
    reloads: int = 0  # SIGHUPs with a changed configuration (a new generation of workers)
    counter: int = 0

    def token(self, kind: str) -> str:
        self.counter += 1
        return f"tok-{kind}-{self.counter:06d}"


# ------------------------------------------------------------------ clients


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line


async def smtp_send(port: int, auth: bool, sender: str, rcpts: list[str], msg: bytes,
                    host: str = "127.0.0.1") -> bool:
    """One transaction on a fresh connection; True only for a 250 after the data."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    try:
        await _reply(reader)
        writer.write(b"EHLO campaign.test\r\n")
        await _reply(reader)
        if auth:
            cred = base64.b64encode(f"\0{ALICE}\0alice-pw".encode())
            writer.write(b"AUTH PLAIN " + cred + b"\r\n")
            if not (await _reply(reader)).startswith(b"235"):
                return False
        writer.write(f"MAIL FROM:<{sender}>\r\n".encode())
        if not (await _reply(reader)).startswith(b"250"):
            return False
        for r in rcpts:
            writer.write(f"RCPT TO:<{r}>\r\n".encode())
            if not (await _reply(reader)).startswith(b"250"):
                return False
        writer.write(b"DATA\r\n")
        if not (await _reply(reader)).startswith(b"354"):
            return False
        writer.write(msg + b".\r\n")
        ok = (await _reply(reader)).startswith(b"250")
        writer.write(b"QUIT\r\n")
        return ok
    except (OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError):
        return False
    finally:
        writer.close()


def message(token: str, sender: str, size: int) -> bytes:
    head = f"From: {sender}\r\nTo: someone\r\nSubject: {token}\r\n\r\n".encode()
    return head + (b"x" * 70 + b"\r\n") * (size // 72) + END


async def mx_load(port: int, ledger: Ledger, stop: asyncio.Event, rng: random.Random) -> None:
    while not stop.is_set():
        user = rng.choice((ALICE, BOB))
        token = ledger.token("mx")
        ledger.sent.add(token)
        size = rng.choice((200, 2000, 90_000))  # 90 KB: spooled to a file while it streams
        if await smtp_send(port, False, "s@sender.test", [user], message(token, "s@x", size)):
            ledger.acked[token] = user
        else:
            await asyncio.sleep(0.05)


async def submission_load(port: int, rx: Receiver, ledger: Ledger, stop: asyncio.Event,
                          rng: random.Random) -> None:
    while not stop.is_set():
        kind = rng.choice(("local", "remote", "reject"))
        token = ledger.token(kind)
        rcpt = {"local": BOB, "remote": f"r-{token}@remote.test",
                "reject": f"reject-{token}@remote.test"}[kind]
        if kind == "reject":
            rx.rcpt_replies[rcpt] = ["550 5.1.1 no such user"] * 100
        ledger.sent.add(token)
        if await smtp_send(port, True, ALICE, [rcpt], message(token, ALICE, 1000)):
            ledger.acked[token] = {"local": BOB, "remote": "remote", "reject": "bounce"}[kind]
        else:
            await asyncio.sleep(0.05)


async def pop3_load(port: int, ledger: Ledger, stop: asyncio.Event, rng: random.Random) -> None:
    """bob: log in, RETR and DELE up to three messages, QUIT; record what QUIT confirmed."""

    async def line(reader: asyncio.StreamReader) -> bytes:
        got = await asyncio.wait_for(reader.readline(), 10)
        if not got:
            raise ConnectionError("closed")
        return got

    while not stop.is_set():
        dele: list[str] = []
        quit_sent = False
        writer = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await line(reader)
            for cmd in (b"USER " + BOB.encode(), b"PASS bob-pw"):
                writer.write(cmd + b"\r\n")
                if not (await line(reader)).startswith(b"+OK"):
                    raise ConnectionError("login refused")
            writer.write(b"STAT\r\n")
            count = int((await line(reader)).split()[1])
            for n in rng.sample(range(1, count + 1), min(3, count)):
                writer.write(b"RETR %d\r\n" % n)
                if not (await line(reader)).startswith(b"+OK"):
                    continue
                body = b""
                while (ln := await line(reader)) != b".\r\n":
                    body += ln
                m = TOKEN.search(body)
                writer.write(b"DELE %d\r\n" % n)
                if (await line(reader)).startswith(b"+OK") and m:
                    dele.append(m.group(1).decode())
            writer.write(b"QUIT\r\n")
            quit_sent = True
            if (await line(reader)).startswith(b"+OK"):
                ledger.deleted.update(dele)
                dele = []
        except (OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError,
                ValueError, IndexError):
            await asyncio.sleep(0.05)
        finally:
            if quit_sent:
                ledger.maybe_deleted.update(dele)  # QUIT sent, its answer lost
            if writer is not None:
                writer.close()
        await asyncio.sleep(rng.uniform(0.05, 0.2))


# ------------------------------------------------------------------ the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(root: Path, ports: dict[str, int], rx_port: int, flush: str,
                 workers: int = 1, max_recipients: int = 100) -> Path:
    data = root / "data"
    lines = [
        "[server]", 'hostname = "mx.example.test"', f"data_dir = {json.dumps(str(data))}",
        "allow_plaintext_auth_on_loopback = true", f"workers = {workers}",
        "[store]", f'flush = "{flush}"',
        "[limits]", f"max_recipients = {max_recipients}",  # what a reload changes
        "[listen]", *(f'{k} = ["127.0.0.1:{ports[k]}"]' for k in SERVICES),
        "submissions = []", "pop3s = []", "managesieve = []",
        # A loopback DNS server that refuses everything: lookups (SPF, DMARC, MX) fail at
        # once instead of costing each restarted server a timeout per new domain.
        "[dns]", 'nameservers = ["127.0.0.1"]', f"port = {refusing_dns_port()}",
        "timeout = 1.0",
        "[queue]", "initial_retry = 0.5", "max_retry = 2.0", "connect_timeout = 2.0",
        "command_timeout = 5.0",
        '[routes."remote.test"]', 'host = "127.0.0.1"', f"port = {rx_port}",
    ]
    path = root / "mailfort.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_server(cfg_path: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "mailfort", "serve", "--config", str(cfg_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=f, env=env)


async def wait_ports(ports: dict[str, int], proc: subprocess.Popen[bytes]) -> None:
    for port in ports.values():
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"mailfort serve exited with {proc.returncode}")
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"port {port} did not open")


# ------------------------------------------------------------------ the check


@dataclass
class Report:
    kills: int
    worker_kills: int
    reloads: int
    acked: Counter[str]
    lost: list[str]
    duplicates: list[str]  # Maildir duplicates, or of unacknowledged messages: failures
    window_duplicates: list[str]  # remote/bounce duplicates: the protocol's own window
    window_widths: list[float]  # seconds from the first copy's acceptance to the next kill
    deleted: int
    undeleted: list[str]  # DELE +OK'd by QUIT, still there
    partial: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.undeleted or self.partial)

    def lines(self) -> list[str]:
        return [
            f"kills: {self.kills} (of one worker: {self.worker_kills})   "
            f"reloads: {self.reloads}   "
            f"run: {self.seconds:.1f} s",
            "acknowledged: " + ", ".join(f"{k} {v}" for k, v in sorted(self.acked.items())),
            f"POP3 deletions confirmed by QUIT: {self.deleted}",
            f"lost: {len(self.lost)} {self.lost[:5]}",
            f"duplicated (failure): {len(self.duplicates)} {self.duplicates[:5]}",
            f"undeleted after +OK QUIT: {len(self.undeleted)} {self.undeleted[:5]}",
            f"partial messages: {len(self.partial)} {self.partial[:5]}",
            f"duplicates in the delivered-to-queue-update window: "
            f"{len(self.window_duplicates)} {self.window_duplicates[:5]}"
            + (f", widths {[round(w * 1000, 2) for w in self.window_widths]} ms"
               if self.window_widths else ""),
            "RESULT: " + ("OK" if self.ok else "FAILED"),
        ]


def _delivered_at(name: str) -> float:
    """The wall-clock time in a Maildir unique name (``<sec>.M<usec>P…``)."""
    m = re.match(r"(\d+)\.M(\d+)", name)
    return int(m.group(1)) + int(m.group(2)) / 1e6 if m else 0.0


def _maildir_tokens(
    mail_root: Path, user: str, first: dict[str, float] | None = None
) -> tuple[Counter[str], Counter[str], list[str]]:
    """(messages, bounces, partial files) of one user, by token; ``first`` gets the
    delivery time of each token's first bounce."""
    local, domain = user.split("@")
    md = mail_root / domain / local
    msgs: Counter[str] = Counter()
    bounces: Counter[str] = Counter()
    partial: list[str] = []
    for sub in ("new", "cur"):
        d = md / sub
        if not d.is_dir():
            continue
        for f in d.iterdir():
            raw = f.read_bytes()
            if b"multipart/report" in raw:
                for tok in {m.decode() for m in TOKEN.findall(raw)}:
                    bounces[tok] += 1
                    if first is not None:
                        at = _delivered_at(f.name)
                        first[tok] = min(first.get(tok, at), at)
                continue
            m = TOKEN.search(raw)
            if m is None or not raw.endswith(END):
                partial.append(f.name)
                continue
            msgs[m.group(1).decode()] += 1
    return msgs, bounces, partial


def check(mail_root: Path, ledger: Ledger, rx: Receiver, seconds: float) -> Report:
    where: dict[str, Counter[str]] = {}
    partial: list[str] = []
    bounces: Counter[str] = Counter()
    first_bounce: dict[str, float] = {}
    for user in (ALICE, BOB):
        msgs, b, p = _maildir_tokens(mail_root, user, first_bounce)
        where[user] = msgs
        bounces += b
        partial += p
    remote: Counter[str] = Counter()
    first_accept: dict[str, float] = {}
    for m in rx.messages:
        t = TOKEN.search(m.data)
        if t is None or not m.data.endswith(END):
            partial.append(f"remote:{m.recipients}")
            continue
        tok = t.group(1).decode()
        remote[tok] += 1
        first_accept.setdefault(tok, m.accepted_at)
    where["remote"] = remote
    where["bounce"] = bounces

    lost, dups, window, undeleted = [], [], [], []
    for tok in sorted(ledger.sent):
        dest = ledger.acked.get(tok)
        n_all = sum(c[tok] for c in where.values())
        if dest is None:
            if n_all > 1:
                dups.append(tok)
            continue
        n = where[dest][tok]
        if tok in ledger.deleted:
            if n:
                undeleted.append(tok)
            continue
        if n == 0 and tok not in ledger.maybe_deleted:
            lost.append(tok)
        elif n > 1:
            (window if dest in ("remote", "bounce") else dups).append(tok)
    widths = []
    for tok in window:
        if tok in first_accept:
            t0, kills = first_accept[tok], ledger.kills
        else:
            t0, kills = first_bounce.get(tok, 0.0), ledger.kills_wall
        after = [k for k in kills if k >= t0]
        if after:
            widths.append(after[0] - t0)
    return Report(len(ledger.kills), ledger.worker_kills, ledger.reloads,
                  Counter(ledger.acked.values()),
                  lost, dups, window, widths, len(ledger.deleted), undeleted, partial, seconds)


# ------------------------------------------------------------------ the run


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's children (its workers)."""
    try:
        path = Path(f"/proc/{supervisor}/task/{supervisor}/children")
        return [int(p) for p in path.read_text().split()]
    except OSError:
        return []


async def campaign(root: Path, kills: int, load: tuple[float, float], seed: int,
                   flush: str = "fsync", drain_timeout: float = 60.0,
                   workers: int = 1, reloads: bool = False) -> Report:
    """``workers`` > 1: halfway through each round's load one worker is SIGKILLed (the
    supervisor replaces it, the others serve on), then at its end the supervisor (the
    workers die with it). ``reloads`` (with workers > 1): a quarter of the way, the
    configuration changes and the supervisor gets SIGHUP (a new generation of workers)."""
    rng = random.Random(seed)
    started = time.monotonic()
    rx = await Receiver().start()
    ports = {k: free_port() for k in SERVICES}
    cfg_path = write_config(root, ports, rx.port, flush, workers)
    cfg = config_mod.load(cfg_path)
    seed_directory(cfg)
    log = root / "serve.log"
    ledger = Ledger()
    try:
        for _ in range(kills):
            proc = start_server(cfg_path, log)
            try:
                await wait_ports(ports, proc)
                stop = asyncio.Event()
                tasks = [
                    *(asyncio.create_task(mx_load(ports["mx"], ledger, stop, rng))
                      for _ in range(4)),
                    *(asyncio.create_task(
                        submission_load(ports["submission"], rx, ledger, stop, rng))
                      for _ in range(3)),
                    asyncio.create_task(pop3_load(ports["pop3"], ledger, stop, rng)),
                ]
                duration = rng.uniform(*load)
                if workers > 1:
                    if reloads:
                        await asyncio.sleep(duration / 4)
                        write_config(root, ports, rx.port, flush, workers,
                                     max_recipients=100 - (ledger.reloads + 1) % 2)
                        proc.send_signal(signal.SIGHUP)
                        ledger.reloads += 1
                        await asyncio.sleep(duration / 4)
                    else:
                        await asyncio.sleep(duration / 2)
                    victims = worker_pids(proc.pid)
                    if victims:
                        os.kill(rng.choice(victims), signal.SIGKILL)
                        ledger.kills.append(time.monotonic())
                        ledger.kills_wall.append(time.time())
                        ledger.worker_kills += 1
                    await asyncio.sleep(duration / 2)
                else:
                    await asyncio.sleep(duration)
                proc.send_signal(signal.SIGKILL)
                ledger.kills.append(time.monotonic())
                ledger.kills_wall.append(time.time())
                await asyncio.to_thread(proc.wait)
                stop.set()
                await asyncio.gather(*tasks)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        # Last round: no load, no kill; let the queue deliver and bounce what it holds.
        proc = start_server(cfg_path, log)
        try:
            await wait_ports(ports, proc)
            env_dir = cfg.data_path / "queue" / "env"
            deadline = time.monotonic() + drain_timeout
            while any(env_dir.iterdir()) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        await rx.stop()
    return check(cfg.mail_path, ledger, rx, time.monotonic() - started)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=25)
    ap.add_argument("--load", type=float, nargs=2, default=(0.5, 2.5), metavar=("MIN", "MAX"),
                    help="seconds of load before each kill, drawn uniformly")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--flush", choices=("fsync", "syncfs"), default="fsync")
    ap.add_argument("--workers", type=int, default=1, help="[server] workers")
    ap.add_argument("--reloads", action="store_true",
                    help="with --workers 2: a configuration reload (SIGHUP) in each round")
    args = ap.parse_args()
    base = os.environ.get("MAILFORT_BENCH_DIR", "/var/tmp")
    with tempfile.TemporaryDirectory(prefix="mailfort-crash-", dir=base) as tmp:
        report = asyncio.run(campaign(Path(tmp), args.kills, tuple(args.load), args.seed,
                                      args.flush, workers=args.workers,
                                      reloads=args.reloads))
        print(f"seed {args.seed}, flush {args.flush}")
        print("\n".join(report.lines()))
        if not report.ok:
            tail = (Path(tmp) / "serve.log").read_text(errors="replace").splitlines()[-40:]
            print("server log (end):", *tail, sep="\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
