"""IMAP, one session: mailfort against the reference Dovecot on an identical Maildir.

    python bench/imap_bench.py                       # 2,000 x 1 KB and 10,000 to search, 5 reps
    python bench/imap_bench.py --messages 500 --search-messages 2000 --reps 2
    python bench/imap_bench.py --no-mailfort          # Dovecot alone (a dry run)

The issue's rows (issue 28, Performance): SELECT INBOX of 2,000 x 1 KB messages, then
``UID FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE)``, then ``UID FETCH 1:* BODY.PEEK[]``, in one
session, >= 1.0x Dovecot; ``UID SEARCH`` on a header and on body text over 10,000 messages,
>= 1.0x. Each figure is the wall time of one command, from sending it to its tagged OK,
the whole answer read (one client, the same for both servers).

Both servers get the same files (same names, same bytes, LF line endings as Postfix
writes them, Maildir++ S=/W= sizes in the names) in alice's Maildir: mailfort's fresh data
directory, and /var/mail/vhosts/example.test/alice/ (owned by vmail) for Dovecot on
127.0.0.1:11143 (``../shared/anchors/dovecot-reference.sh start``). Each repetition refills
both (with names of its own: no cache by file name outlives it), each server's index or UID
map removed first, then runs a "cold" session (messages in new/, no index: SELECT assigns
the UIDs) and a "warm" one (right after); the servers
alternate (Dovecot first in even repetitions, mailfort first in odd ones). The search rows
fill 10,000 messages (a word in 1 in 1,000 bodies, a unique subject each) and time each
search three times in one session after an untimed SELECT.

LOGIN in plaintext on loopback where the server allows it (Dovecot reference: ssl = no;
mailfort: ``server.allow_plaintext_auth_on_loopback = true``); if mailfort refuses, its
session does STARTTLS first (outside the timed commands) and the table says so. Until
mailfort has an IMAP server its config refuses ``[listen] imap``: its rows are then
skipped with that message. Loopback only; every loop bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mfproc import MailfortServer, bench_tmpdir, wait_port

HERE = Path(__file__).resolve().parent
ANCHORS = HERE.parent.parent / "shared" / "anchors"
DOVECOT_PORT = 11143
DOVECOT_ROOT = Path("/var/mail/vhosts/example.test")
VMAIL = (5000, 5000)
NEEDLE = "zebrafish"
TIMEOUT = 120.0


def message(i: int, size: int, needle: bool = False) -> bytes:
    """A message of exactly ``size`` bytes (LF endings), subject unique per ``i``."""
    head = (
        f"Return-Path: <bench@example.org>\nFrom: Bench <bench@example.org>\n"
        f"To: alice@example.test\nSubject: imap bench {i}\n"
        f"Date: Thu, 27 Nov 2025 12:00:00 +0000\nMessage-ID: <imap-{i}@bench.test>\n"
        "MIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n\n"
    ).encode()
    body = bytearray(head)
    if needle:
        body += f"a line with the {NEEDLE} in it\n".encode()
    line = b"the quick brown fox jumps over the lazy dog, again and again and again\n"
    while len(body) + len(line) <= size:
        body += line
    pad = size - len(body)
    if pad:
        body += b"y" * (pad - 1) + b"\n" if pad > 1 else b"\n"
    return bytes(body)


def clear_maildir(path: Path) -> None:
    """Empty new/, cur/, tmp/ and drop each server's index or UID map (Dovecot's
    ``dovecot*`` files, mailfort's ``mailfort-imap.*`` but its lock files)."""
    for sub in ("new", "cur", "tmp"):
        if (path / sub).exists():
            shutil.rmtree(path / sub)
    if path.exists():
        for f in path.iterdir():
            if f.is_file() and (f.name.startswith("dovecot") or (
                    f.name.startswith("mailfort-imap.") and not f.name.endswith(".lock"))):
                f.unlink()


def fill_maildir(path: Path, count: int, size: int, owner: tuple[int, int] | None,
                 needle_every: int = 0, rep: int = 0) -> None:
    """``count`` messages into new/, the same bytes every time, the same names for both
    servers in one repetition and other names in the next: a Maildir never reuses a name,
    so a server's cache by file name (mailfort's per-process header and ENVELOPE caches)
    must not answer a later repetition's "cold" rows."""
    clear_maildir(path)
    for sub in ("new", "cur", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    base = 1764244800
    for i in range(count):
        data = message(i, size, bool(needle_every) and i % needle_every == 7)
        wire = len(data) + data.count(b"\n") - data.count(b"\r\n")
        f = path / "new" / f"{base + i}.M{i:06d}P{4343 + rep}.bench.test,S={len(data)},W={wire}"
        f.write_bytes(data)
        if owner:
            os.chown(f, *owner)
    if owner:
        for d in (path, path / "new", path / "cur", path / "tmp"):
            os.chown(d, *owner)


class Client:
    """A minimal IMAP client: one command at a time, the answer read in full (literals
    included) with no per-item parsing beyond what finds the end; the same for both."""

    def __init__(self, port: int, user: str, password: str, starttls: bool) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.file = self.sock.makefile("rb")
        self.n = 0
        self.line()  # greeting
        if starttls:
            status, _ = self.cmd("STARTTLS")
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")
            self.file = self.sock.makefile("rb")
        status, _ = self.cmd(f'LOGIN "{user}" "{password}"')
        if status != "OK":
            raise RuntimeError(f"127.0.0.1:{port} LOGIN {status}")

    def line(self) -> bytes:
        out = self.file.readline()
        if not out:
            raise RuntimeError("connection closed")
        return out

    def cmd(self, text: str) -> tuple[str, list[bytes]]:
        """(status, untagged responses with their literals)."""
        self.n += 1
        tag = b"b%d" % self.n
        self.sock.sendall(tag + b" " + text.encode() + b"\r\n")
        got: list[bytes] = []
        while True:
            line = self.line()
            if line.startswith(tag + b" "):
                return line.split(b" ", 2)[1].decode(), got
            while (m := re.search(rb"\{(\d+)\}\r\n$", line)) is not None:
                line += self.file.read(int(m.group(1)))
                line += self.line()
            got.append(line)

    def timed(self, text: str) -> tuple[float, list[bytes]]:
        t0 = time.perf_counter()
        status, got = self.cmd(text)
        took = time.perf_counter() - t0
        if status != "OK":
            raise RuntimeError(f"{text}: {status} {got[-1:]!r}")
        return took, got

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self.cmd("LOGOUT")
        self.sock.close()


@dataclass
class Server:
    name: str
    port: int
    password: str
    maildir: Path
    owner: tuple[int, int] | None
    starttls: bool = False

    def login(self) -> Client:
        return Client(self.port, "alice@example.test", self.password, self.starttls)


FETCH_META = "UID FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE)"
FETCH_BODY = "UID FETCH 1:* BODY.PEEK[]"


def fetch_session(s: Server, count: int, phase: str, samples: dict[str, list[float]]) -> None:
    """SELECT INBOX, the two UID FETCHes; times in ``samples`` under "<server> <row>"."""
    c = s.login()
    try:
        t, got = c.timed("SELECT INBOX")
        exists = [g for g in got if g.rstrip().endswith(b" EXISTS")]
        if exists != [b"* %d EXISTS\r\n" % count]:
            raise RuntimeError(f"{s.name}: SELECT says {exists}, {count} expected "
                               "(is something else delivering to alice?)")
        samples.setdefault(f"{s.name} select {phase}", []).append(t)
        for key, command in (("meta", FETCH_META), ("body", FETCH_BODY)):
            t, got = c.timed(command)
            if len(got) < count:
                raise RuntimeError(f"{s.name}: {command} gave {len(got)} responses")
            samples.setdefault(f"{s.name} {key} {phase}", []).append(t)
    finally:
        c.close()


def searches(count: int) -> dict[str, str]:
    """The two searches over ``count`` messages: one subject (no other subject contains
    it: 3/4 of ``count``, times ten, is past the last), and the word in 1 body in 1,000."""
    return {"header": f"UID SEARCH HEADER Subject \"imap bench {count * 3 // 4}\"",
            "body": f"UID SEARCH BODY {NEEDLE}"}


def search_session(s: Server, count: int, samples: dict[str, list[float]],
                   found: dict[str, set[int]]) -> None:
    """An untimed SELECT, then each search three times: the first on its own row (a
    server may build a cache then: Dovecot's header cache), the other two together."""
    c = s.login()
    try:
        c.timed("SELECT INBOX")
        for key, command in searches(count).items():
            for n in range(3):
                t, got = c.timed(command)
                hits = [int(u) for g in got if g.startswith(b"* SEARCH")
                        for u in g.split()[2:]]
                want = 1 if key == "header" else len(range(7, count, 1000))
                if len(hits) != want:
                    raise RuntimeError(f"{s.name}: {command} found {len(hits)}, {want} expected")
                samples.setdefault(f"{s.name} search {key} {'first' if n == 0 else 'again'}",
                                   []).append(t)
                found.setdefault(f"{s.name} {key}", set()).update(hits)
    finally:
        c.close()


def mailfort_server(root: Path, port_base: int) -> tuple[MailfortServer | None, str]:
    """A mailfort with IMAP listeners, or None and why not (the config loader's words)."""
    try:
        return MailfortServer(root, port_base=port_base, plaintext_pop3=True, imap=True), ""
    except subprocess.CalledProcessError:
        check = subprocess.run([sys.executable, "-m", "mailfort", "config", "check",
                                "--config", str(root / "mailfort.toml")],
                               capture_output=True, text=True, timeout=60)
        why = (check.stderr or check.stdout).strip().splitlines()
        return None, why[-1] if why else "mailfort refused the configuration"


def plaintext_login_ok(port: int, password: str) -> bool:
    try:
        Client(port, "alice@example.test", password, starttls=False).close()
        return True
    except RuntimeError:
        return False


def summary(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"{statistics.median(ms):.1f} ms ({min(ms):.1f}–{max(ms):.1f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--search-messages", type=int, default=10000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--port-base", type=int, default=14800)
    ap.add_argument("--no-mailfort", action="store_true", help="Dovecot alone")
    args = ap.parse_args()
    if not 1 <= args.messages <= 100_000 or not 1 <= args.reps <= 20 \
            or not 1_000 <= args.search_messages <= 100_000:
        ap.error("--messages 1..100000, --search-messages 1000..100000, --reps 1..20")

    try:
        wait_port(DOVECOT_PORT, 1)
    except RuntimeError:
        subprocess.run(["bash", str(ANCHORS / "dovecot-reference.sh"), "start"], check=True)
    samples: dict[str, list[float]] = {}
    found: dict[str, set[int]] = {}
    notes: list[str] = []
    with bench_tmpdir("mailfort-imap-bench-") as tmp:
        mf, why = (None, "--no-mailfort") if args.no_mailfort else \
            mailfort_server(Path(tmp), args.port_base)
        servers = [Server("Dovecot", DOVECOT_PORT, "alicepw", DOVECOT_ROOT / "alice", VMAIL)]
        if mf is None:
            print(f"# mailfort rows skipped: {why}", flush=True)
            notes.append(f"mailfort skipped: {why}")
        else:
            mf.start()
            password = mf.passwords["alice@example.test"]
            starttls = not plaintext_login_ok(mf.ports["imap"], password)
            if starttls:
                notes.append("mailfort refused LOGIN in plaintext on loopback: its sessions "
                             "do STARTTLS first (not timed)")
            servers.append(Server("mailfort", mf.ports["imap"], password, mf.maildir("alice"),
                                  None, starttls))
        try:
            for rep in range(args.reps):
                order = servers if rep % 2 == 0 else servers[::-1]
                for s in order:
                    fill_maildir(s.maildir, args.messages, args.size, s.owner, rep=rep)
                    for phase in ("cold", "warm"):
                        fetch_session(s, args.messages, phase, samples)
                    print(f"#   rep {rep + 1} {s.name}: " + ", ".join(
                        f"{k} {samples[f'{s.name} {k}'][-1] * 1000:.1f} ms" for k in (
                            "select cold", "meta cold", "body cold", "select warm",
                            "meta warm", "body warm")), flush=True)
            for rep in range(max(1, args.reps // 2)):
                order = servers if rep % 2 == 0 else servers[::-1]
                for s in order:
                    fill_maildir(s.maildir, args.search_messages, args.size, s.owner,
                                 needle_every=1000, rep=100 + rep)
                    search_session(s, args.search_messages, samples, found)
                    print(f"#   search rep {rep + 1} {s.name}: " + ", ".join(
                        f"{k} {samples[f'{s.name} search {k}'][-1] * 1000:.1f} ms" for k in (
                            "header first", "header again", "body first", "body again")),
                          flush=True)
        finally:
            if mf is not None:
                mf.stop()
            clear_maildir(DOVECOT_ROOT / "alice")
            for sub in ("new", "cur", "tmp"):
                (DOVECOT_ROOT / "alice" / sub).mkdir(exist_ok=True)
                os.chown(DOVECOT_ROOT / "alice" / sub, *VMAIL)
    if len(servers) == 2:
        for key in ("header", "body"):
            if found[f"Dovecot {key}"] != found[f"mailfort {key}"]:
                notes.append(f"SEARCH {key}: the servers found different messages "
                             f"(Dovecot {sorted(found[f'Dovecot {key}'])}, mailfort "
                             f"{sorted(found[f'mailfort {key}'])})")
    kb = args.size // 1024 or 1
    rows: list[tuple[str, str]] = []
    for phase, what in (("cold", "messages in new/, no index"), ("warm", "right after")):
        rows += [(f"select {phase}", f"SELECT INBOX, {args.messages} x {kb} KB, {phase} "
                                     f"({what})"),
                 (f"meta {phase}", f"{FETCH_META}, {phase}"),
                 (f"body {phase}", f"{FETCH_BODY}, {phase}")]
    hits = len(range(7, args.search_messages, 1000))
    for when in ("first", "again"):
        what = "first in the session" if when == "first" else "repeated"
        rows += [(f"search header {when}", f"UID SEARCH HEADER Subject over "
                                           f"{args.search_messages} messages (1 hit), {what}"),
                 (f"search body {when}", f"UID SEARCH BODY over {args.search_messages} "
                                         f"messages ({hits} hits), {what}")]
    print(f"# median (range) of {args.reps} sessions per server, alternating; search rows: "
          f"{max(1, args.reps // 2)} sessions, each search once then twice more")
    for note in notes:
        print(f"# {note}")
    print("| measure | reference | mailfort | target |\n|---|---|---|---|")
    for key, what in rows:
        ref = samples[f"Dovecot {key}"]
        ours = samples.get(f"mailfort {key}")
        if not ours:
            print(f"| {what} | Dovecot {summary(ref)} | — (skipped) | ≥ 1.0× |")
            continue
        ratio = statistics.median(ref) / statistics.median(ours)
        verdict = "OK" if ratio >= 1.0 else "BELOW TARGET"
        print(f"| {what} | Dovecot {summary(ref)} | mailfort {summary(ours)} "
              f"({ratio:.2f}×) | ≥ 1.0× {verdict} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
