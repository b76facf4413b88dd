"""Several IMAP sessions on one mailbox stay consistent, across worker processes and nodes.

In the manner of Dovecot's imaptest (not packaged in Debian: tests/server/imapcheck.py is
the checker): real ``mailfort serve`` processes, (a) one node with two workers, sessions
spread over both, (b) two nodes sharing ``mail_dir`` and Redis. While MX deliveries arrive
over SMTP and POP3 sessions DELE, the IMAP sessions STORE keywords and flags, FETCH,
SEARCH and EXPUNGE concurrently; after each round every session does NOOP and all must
agree (UIDs, flags, EXISTS), each keyword must be what its owner's last STORE made it (no
change lost), and no session may ever have been told what RFC 9051 forbids (imapcheck).
Then: a delivery reaches an IDLE session on the other worker / node within one second; a
worker SIGKILLed during APPEND/COPY/STORE never costs a UID (no reuse, UIDVALIDITY kept);
``limits.imap_sessions_per_user`` holds across the workers of a node.

A longer run of the same rounds: bench/imap_soak.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import poplib
import random
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mailfort import config as config_mod
from tests.conftest import HOSTNAME, refusing_dns_port, seed_directory
from tests.server.imapcheck import Checked, ImapError, Resync, UidRegistry, message_ids
from tests.server.test_workers import SRC, _ports, children, worker_of

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")

ALICE, ALICE_PW = "alice@example.test", "alice-pw"
SERVICES = ("mx", "submission", "submissions", "pop3", "pop3s", "imap", "imaps",
            "managesieve")
SESSIONS_PER_USER = 6  # limits.imap_sessions_per_user of these nodes
SEED = int(os.environ.get("MAILFORT_IMAPCHECK_SEED", "28"))  # another run: another seed


# ------------------------------------------------------------------ the servers


@dataclass
class Served:
    """One ``mailfort serve`` (a node): its process, ports and log."""

    proc: subprocess.Popen[str]
    root: Path
    ports: dict[str, int]
    log: Path

    def workers(self) -> list[int]:
        return children(self.proc.pid)


def start_node(root: Path, *, workers: int = 1, mail_dir: Path | None = None,
               redis_url: str | None = None, per_user: int = SESSIONS_PER_USER) -> Served:
    root.mkdir(parents=True)
    lines = [
        "[server]", f"hostname = {json.dumps(HOSTNAME)}",
        f"data_dir = {json.dumps(str(root / 'data'))}", f"workers = {workers}",
        "shutdown_grace = 2.0", "allow_plaintext_auth_on_loopback = true",
        *([f"mail_dir = {json.dumps(str(mail_dir))}"] if mail_dir else []),
        "[dns]", 'nameservers = ["127.0.0.1"]', f"port = {refusing_dns_port()}",
        "timeout = 1.0",
        "[sender_auth]", "enabled = false",
        "[limits]", f"imap_sessions_per_user = {per_user}",
        "[listen]", *(f'{k} = ["127.0.0.1:0"]' for k in SERVICES),
    ]
    if redis_url:
        lines += ["[counters]", 'backend = "redis"', f"url = {json.dumps(redis_url)}"]
    cfg_path = root / "mailfort.toml"
    cfg_path.write_text("\n".join(lines) + "\n")
    seed_directory(config_mod.load(cfg_path))
    log = root / "serve.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailfort", "serve", "--config", str(cfg_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True,
            env={**os.environ, "PYTHONPATH": str(SRC)}, cwd=root)
    served = Served(proc, root, _ports(proc, log), log)  # type: ignore[arg-type]
    deadline = time.monotonic() + 30
    while workers > 1 and log.read_text().count(" serving") < workers:
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
        time.sleep(0.05)
    return served


def stop_node(served: Served) -> str:
    served.proc.send_signal(signal.SIGTERM)
    try:
        served.proc.wait(30)
    except subprocess.TimeoutExpired:
        served.proc.kill()
        served.proc.wait()
    return served.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = start_node(tmp_path_factory.mktemp("imapc") / "node", workers=2)
    try:
        yield served
    finally:
        text = stop_node(served)
        assert "Traceback" not in text, text


@pytest.fixture
def two_nodes(tmp_path: Path, redis_server: Any) -> Iterator[list[Served]]:
    shared = tmp_path / "shared-mail"
    nodes: list[Served] = []
    try:
        for name in ("a", "b"):
            nodes.append(start_node(tmp_path / name, mail_dir=shared,
                                    redis_url=redis_server.url))
        yield nodes
    finally:
        for n in nodes:
            text = stop_node(n)
            assert "Traceback" not in text, text


# ------------------------------------------------------------------ clients


_COUNTER = iter(range(1, 1 << 30))
_COUNTER_LOCK = threading.Lock()


def next_id(tag: str) -> str:
    with _COUNTER_LOCK:
        return f"{tag}-{next(_COUNTER)}-{os.getpid()}@remote.test"


def mx_deliver(port: int, count: int = 1, tag: str = "mx") -> list[str]:
    """``count`` messages to alice over SMTP; their Message-IDs."""
    ids = []
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        for _ in range(count):
            ident = next_id(tag)
            body = (f"From: <sender@remote.test>\r\nTo: <{ALICE}>\r\n"
                    f"Message-ID: <{ident}>\r\nSubject: {ident}\r\n\r\n"
                    + "line of text\r\n" * 40)
            smtp.sendmail("sender@remote.test", [ALICE], body)
            ids.append(ident)
    return ids


def mx_deliver_to(port: int, user: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.sendmail("sender@remote.test", [user],
                      f"From: <sender@remote.test>\r\nMessage-ID: <{next_id('idle')}>\r\n"
                      "\r\nx\r\n")


def pop3_dele_first(port: int) -> bool:
    """A POP3 session that RETRs the last message and DELEs the first; False if the
    maildrop was in use."""
    pop = poplib.POP3("127.0.0.1", port, timeout=20)
    try:
        pop.user(ALICE)
        try:
            pop.pass_(ALICE_PW)
        except poplib.error_proto:
            return False  # in use (another POP3 session): the next round tries again
        count, _ = pop.stat()
        if count:
            pop.retr(count)  # POP3 marks it seen (S in the file name): IMAP's \Seen
            pop.dele(1)
        pop.quit()
        return True
    finally:
        with contextlib.suppress(OSError):
            pop.close()


def imap_session(port: int, name: str, *, condstore: bool = False, qresync: bool = False,
                 user: str = ALICE, password: str = ALICE_PW, select: bool = True) -> Checked:
    s = Checked("127.0.0.1", port, name)
    r = s.login(user, password)
    if r.status != "OK":
        s.close()
        raise ImapError(f"login: {r.status} {r.text}")
    if qresync:
        s.ok("ENABLE QRESYNC")
    elif condstore:
        s.ok("ENABLE CONDSTORE")
    if select:
        s.select("INBOX")
    return s


def spread(node: Served, per_worker: int) -> dict[int, list[Checked]]:
    """Connections to ``node``'s IMAP port (greeting read, not logged in): worker pid ->
    ``per_worker`` of them (connect until both workers hold that many)."""
    port = node.ports["imap"]
    held: dict[int, list[Checked]] = {}
    extra: list[Checked] = []
    for i in range(80):
        s = Checked("127.0.0.1", port, f"s{i}")
        mine = held.setdefault(worker_of(node.proc.pid, port, s.sock), [])
        # the extra ones stay open meanwhile: the node looks busy, both gates open
        (mine if len(mine) < per_worker else extra).append(s)
        if len(held) == 2 and all(len(v) >= per_worker for v in held.values()):
            break
    for s in extra:
        s.close()
    assert len(held) == 2 and all(len(v) >= per_worker for v in held.values()), \
        {k: len(v) for k, v in held.items()}
    return held


def on_both_workers(node: Served, count: int, user: str = ALICE,
                    password: str = ALICE_PW) -> list[Checked]:
    """``count`` logged-in sessions on INBOX, spread over both workers of ``node``; some
    with CONDSTORE, some with QRESYNC (whose expunges come as VANISHED)."""
    held = spread(node, (count + 1) // 2)
    got = [s for pair in zip(*held.values(), strict=True) for s in pair]
    out = []
    for i, s in enumerate(got[:count]):
        s.name = f"s{i}"
        assert s.login(user, password).status == "OK"
        if i % 3 == 1:
            s.ok("ENABLE CONDSTORE")
        elif i % 3 == 2:
            s.ok("ENABLE QRESYNC")
        s.select("INBOX")
        out.append(s)
    for s in got[count:]:
        s.close()
    return out


# ------------------------------------------------------------------ the rounds


@dataclass
class Expectation:
    """The keyword each session owns, and its last successful STORE per UID."""

    last: dict[str, dict[int, str]] = field(default_factory=dict)  # keyword -> uid -> +/-
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, keyword: str, uids: list[int], op: str) -> None:
        with self.lock:
            mine = self.last.setdefault(keyword, {})
            for u in uids:
                mine[u] = op


def session_work(s: Checked, rng: random.Random, owned: list[str], exp: Expectation,
                 steps: int) -> None:
    """Random STORE of the flags this session owns (by UID and by sequence number), FETCH
    and SEARCH by sequence number: the commands during which no EXPUNGE may come. A STORE
    of a system flag renames the file, which POP3's lock forbids while a POP3 session runs
    (NO [INUSE]: not done, so not expected)."""
    for _ in range(steps):
        known = [u for u in s.uids if u is not None]
        if not known:
            return
        flag = rng.choice(owned)
        op = rng.choice(("+FLAGS", "-FLAGS"))
        what = rng.random()
        if what < 0.45:
            uids = rng.sample(known, min(len(known), rng.randint(1, 4)))
            r = s.store(uids, op, flag)
            if r.status == "OK":
                exp.note(flag, uids, op[0])
            elif "[INUSE]" not in r.text or not flag.startswith("\\"):
                raise ImapError(f"{s.name}: STORE {r.status} {r.text}")
        elif what < 0.6:
            n = rng.randint(1, len(s.uids))
            uid = s.uids[n - 1]
            r = s.command(f"STORE {n} {op}.SILENT ({flag})")
            if r.status == "OK" and uid is not None:
                exp.note(flag, [uid], op[0])
                if uid in s.flags:  # .SILENT: the client applies the change itself
                    have = s.flags[uid]
                    s.flags[uid] = have | {flag} if op[0] == "+" else have - {flag}
            elif r.status != "OK" and ("[INUSE]" not in r.text or not flag.startswith("\\")):
                raise ImapError(f"{s.name}: STORE {n} {r.status} {r.text}")
        elif what < 0.8:
            before = list(s.uids)
            r = s.ok(f"FETCH 1:{len(before)} (UID FLAGS RFC822.SIZE BODY.PEEK[])")
            answered = {int(resp.split()[1]) for resp in r.untagged
                        if resp.startswith(b"* ") and b" FETCH (" in resp and b"BODY[]" in resp}
            # a message not answered for must turn out expunged (checkpoint)
            s.unanswered.update(u for n, u in enumerate(before, 1)
                                if n not in answered and u is not None)
        elif what < 0.85:  # BODY[] sets \Seen (no one owns it: only agreement is checked)
            s.ok(f"FETCH {rng.randint(1, len(s.uids))} (BODY[HEADER])")
        else:
            s.ok(f"SEARCH 1:{len(s.uids)} KEYWORD {owned[0]}")


def expunger_work(s: Checked, rng: random.Random) -> None:
    """\\Deleted on one or two messages, then EXPUNGE (NO [INUSE] while POP3 holds the
    maildrop: tried again)."""
    for _ in range(5):
        known = [u for u in s.uids if u is not None]
        if len(known) < 8:
            return
        doomed = rng.sample(known, 2)
        if rng.random() < 0.3:  # a MOVE expunges too
            r = s.command(f"UID MOVE {doomed[0]} Archive")
            if r.status == "OK":
                return
        else:
            r = s.store(doomed, "+FLAGS", "\\Deleted", silent=True)
            if r.status == "OK":
                r = s.command("EXPUNGE")
                if r.status == "OK":
                    return
        if "INUSE" not in r.text:
            raise ImapError(f"{s.name}: {r.status} {r.text}")
        time.sleep(0.05)


_DEATHS = (ImapError, OSError, smtplib.SMTPException, poplib.error_proto)


def run_rounds(sessions: list[Checked], mx_ports: list[int], pop3_ports: list[int],
               rounds: int, steps: int, seed: int, exp: Expectation | None = None,
               registry: UidRegistry | None = None, resync: Resync | None = None,
               kill: Callable[[], None] | None = None) -> dict[str, Any]:
    """The concurrent rounds and their checkpoints; the figures (for the soak, which
    carries ``exp`` and ``registry`` over from one set of sessions to the next).

    ``kill`` (the soak's SIGKILL of a worker) is called at a random moment of the first
    round: the sessions it cuts off are dropped from ``sessions``, and so is what their
    flags were expected to be (their last STORE may or may not have been made); the
    others go on and must still agree, with each other and with the files."""
    rng = random.Random(seed)
    exp = exp if exp is not None else Expectation()
    registry = registry if registry is not None else UidRegistry()
    system = ["\\Flagged", "\\Answered", "\\Draft"]
    owned = {s.name: [f"kw{s.name}"] + ([system[i]] if i < len(system) else [])
             for i, s in enumerate(sessions[1:])}
    figures = {"rounds": 0, "mx_sessions": 0, "expunged": 0, "pop3_dele": 0}
    for sess in sessions:
        sess.registry = registry  # each BODY[] fetched: its Message-ID noted for its UID
    for rnd in range(rounds):
        errors: list[BaseException] = []
        dead: list[Checked] = []
        killing = kill is not None and rnd == 0

        def guarded(fn: Callable[..., Any], *args: Any, errors: list[BaseException] = errors,
                    dead: list[Checked] = dead, killing: bool = killing) -> Callable[[], None]:
            def run() -> None:
                try:
                    fn(*args)
                except _DEATHS as exc:
                    if not killing:
                        errors.append(exc)
                    elif isinstance(args[0], Checked):
                        dead.append(args[0])
                except BaseException as exc:  # reported by the main thread
                    errors.append(exc)
            return run

        def deliver(r: random.Random) -> None:
            for _ in range(3):
                mx_deliver(r.choice(mx_ports), r.randint(1, 2))
                figures["mx_sessions"] += 1
                time.sleep(r.random() * 0.1)

        def pop3(r: random.Random) -> None:
            time.sleep(r.random() * 0.2)
            if pop3_dele_first(r.choice(pop3_ports)):
                figures["pop3_dele"] += 1

        def killer(r: random.Random) -> None:
            time.sleep(r.random() * 0.5)
            assert kill is not None
            kill()

        threads = [threading.Thread(target=guarded(
            session_work, s, random.Random(rng.random()), owned[s.name], exp, steps))
            for s in sessions[1:]]
        threads.append(threading.Thread(target=guarded(
            expunger_work, sessions[0], random.Random(rng.random()))))
        threads += [threading.Thread(target=guarded(deliver, random.Random(rng.random()))),
                    threading.Thread(target=guarded(pop3, random.Random(rng.random())))]
        if killing:
            threads.append(threading.Thread(target=guarded(killer, random.Random(rng.random()))))
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        if errors:
            raise errors[0]
        if killing:  # a session that finished its work before the kill dies at its NOOP
            for sess in sessions:
                if sess not in dead:
                    try:
                        sess.noop()
                    except _DEATHS:
                        dead.append(sess)
            for sess in dead:
                figures["expunged"] += sess.expunges
                sessions.remove(sess)
                sess.close()
                with exp.lock:
                    for flag in owned.get(sess.name, ()):
                        exp.last.pop(flag, None)
            if resync is not None:
                try:
                    resync.sess.ok("NOOP")
                except _DEATHS:
                    resync = None
            if len(sessions) < 2:
                break
            owned = {s.name: owned.get(s.name, [f"kw{s.name}"]) for s in sessions[1:]}
        checkpoint(sessions, exp, registry, rnd, resync)
        figures["rounds"] += 1
    figures["expunged"] += sum(s.expunges for s in sessions)
    return figures


def checkpoint(sessions: list[Checked], exp: Expectation, registry: UidRegistry,
               rnd: int, resync: Resync | None = None) -> None:
    """Every session NOOPs; then they agree, and each keyword is its owner's last STORE;
    ``resync``, away since the last checkpoint, catches up by QRESYNC to the same state."""
    for s in sessions:
        s.noop()
    for s in sessions:
        s.noop()  # a change another session made during the first NOOPs
    views = {s.name: s.view() for s in sessions}
    problems = [v for s in sessions for v in s.violations]
    for s in sessions:
        alive = s.unanswered & set(s.uids)
        if alive:
            problems.append(f"round {rnd}: {s.name}'s FETCH 1:n BODY.PEEK[] gave nothing for "
                            f"UIDs {sorted(alive)}, which were not expunged")
        s.unanswered.clear()
    first = sessions[0].name
    uids0, flags0 = views[first]
    for name, (uids, flags) in views.items():
        if None in uids:
            problems.append(f"round {rnd}: {name} has unknown UIDs")
        if uids != sorted(u for u in uids if u is not None):
            problems.append(f"round {rnd}: {name}'s UIDs not ascending: {uids}")
        if uids != uids0:
            problems.append(f"round {rnd}: {name} sees UIDs {uids}, {first} sees {uids0}")
        for u in uids0:
            if u is not None and flags.get(u) != flags0.get(u):
                problems.append(f"round {rnd}: UID {u}: {name} sees {sorted(flags.get(u, ()))}"
                                f", {first} sees {sorted(flags0.get(u, ()))}")
    for kw, last in exp.last.items():
        for u, op in last.items():
            if u in flags0 and (kw in flags0[u]) != (op == "+"):
                problems.append(f"round {rnd}: UID {u}: {kw} should be "
                                f"{'set' if op == '+' else 'clear'}, is {sorted(flags0[u])}")
    ids = message_ids(sessions[0], "INBOX", registry)
    if sorted(ids) != uids0:
        problems.append(f"round {rnd}: UID FETCH 1:* gives {sorted(ids)}, the views {uids0}")
    problems += registry.problems
    if resync is not None:
        caught_up = resync.resync()
        problems += resync.sess.violations
        want = {u: flags0.get(u) for u in uids0 if u is not None}
        for u in sorted(set(caught_up) | set(want)):
            if caught_up.get(u) != want.get(u):
                problems.append(f"round {rnd}: after QRESYNC UID {u} is "
                                f"{sorted(caught_up[u]) if u in caught_up else 'absent'}, "
                                f"the sessions see "
                                f"{sorted(want[u] or ()) if u in want else 'none'}")
    assert not problems, "\n".join(problems[:30])


# ------------------------------------------------------------------ the tests


def test_sessions_on_two_workers_agree_under_concurrent_changes(two_workers: Served) -> None:
    node = two_workers
    mx_deliver(node.ports["mx"], 12, "seed")
    sessions = on_both_workers(node, 5)
    away = imap_session(node.ports["imap"], "q", qresync=True, select=False)
    sessions.append(away)  # closed with the others
    try:
        figures = run_rounds(sessions[:-1], [node.ports["mx"]], [node.ports["pop3"]],
                             rounds=4, steps=6, seed=SEED, resync=Resync(away))
        assert figures["expunged"] > 0
    finally:
        for s in sessions:
            s.close()


def test_sessions_on_two_nodes_agree_under_concurrent_changes(two_nodes: list[Served]) -> None:
    a, b = two_nodes
    mx_deliver(a.ports["mx"], 12, "seed")
    sessions = [imap_session(n.ports["imap"], f"n{i}", condstore=i % 3 == 1,
                             qresync=i % 3 == 2)
                for i, n in enumerate([a, b, a, b, a])]
    away = imap_session(b.ports["imap"], "q", qresync=True, select=False)
    sessions.append(away)  # closed with the others
    try:
        figures = run_rounds(sessions[:-1], [a.ports["mx"], b.ports["mx"]],
                             [a.ports["pop3"], b.ports["pop3"]], rounds=4, steps=6,
                             seed=SEED + 1, resync=Resync(away))
        assert figures["expunged"] > 0
    finally:
        for s in sessions:
            s.close()


# ------------------------------------------------------------------ what the rounds found
# Deterministic forms of the defects the rounds above found, on bob's INBOX (the rounds use
# alice's). Each runs inside the one-second window in which a session does not rescan after
# a command (MailSessionSettings.sync_interval), which is where the rounds met them.

BOB, BOB_PW = "bob@example.test", "bob-pw"


def bob_with(node: Served, count: int) -> tuple[Checked, Checked, list[int]]:
    """Two sessions on bob's INBOX, emptied and given ``count`` fresh messages."""
    a = Checked("127.0.0.1", node.ports["imap"], "a")
    b = Checked("127.0.0.1", node.ports["imap"], "b")
    for s in (a, b):
        assert s.login(BOB, BOB_PW).status == "OK"
    b.select()
    if b.uids:
        b.ok("STORE 1:* +FLAGS.SILENT (\\Deleted)")
        b.ok("EXPUNGE")
    with smtplib.SMTP("127.0.0.1", node.ports["mx"], timeout=20) as smtp:
        for n in range(count):
            smtp.sendmail("sender@remote.test", [BOB],
                          f"From: <sender@remote.test>\r\nMessage-ID: <bob{n}@x>\r\n\r\nx\r\n")
    b.noop()
    a.select()
    assert a.uids == b.uids and len(a.uids) == count
    return a, b, [u for u in a.uids if u is not None]


def test_uid_store_on_a_message_expunged_elsewhere_shows_no_stale_flags(
        two_workers: Served) -> None:
    """B expunges a message; A, not yet told, stores a keyword on it by UID. The server
    used to answer ``* n FETCH (UID u FLAGS ())``, flags without the keyword just added,
    as if the STORE had been undone; now no FETCH for it, and the EXPUNGE in the same
    response (a UID command may carry one)."""
    a, b, uids = bob_with(two_workers, 3)
    try:
        b.ok(f"UID STORE {uids[1]} +FLAGS.SILENT (\\Deleted)")
        b.ok("EXPUNGE")
        r = a.store([uids[1]], "+FLAGS", "mine")
        assert r.status == "OK", r
        assert not a.violations, a.violations
        assert a.uids == [uids[0], uids[2]], (a.uids, r.untagged)
    finally:
        a.close()
        b.close()


def test_silent_store_leaves_another_sessions_change_for_the_next_noop(
        two_workers: Served) -> None:
    """B adds a keyword; A, not yet told, adds another with .SILENT. The view of A used to
    take the message's whole new flag list, B's keyword included, so its NOOP had nothing
    to report and A's client never learnt of B's keyword."""
    a, b, uids = bob_with(two_workers, 2)
    try:
        b.store([uids[0]], "+FLAGS", "theirs")
        a.store([uids[0]], "+FLAGS", "mine", silent=True)
        assert a.flags[uids[0]] == {"mine"}
        a.noop()
        assert a.flags[uids[0]] == {"mine", "theirs"}, a.flags
        assert not a.violations, a.violations
    finally:
        a.close()
        b.close()


# ------------------------------------------------------------------ IDLE across processes


def idle_latencies(idlers: list[Checked], deliver: Callable[[], None],
                   timeout: float = 3.0) -> list[float | None]:
    """Every session IDLEs; one message is delivered; the seconds from the start of the
    delivery to each session's EXISTS (None: none within ``timeout``)."""
    came: list[float | None] = [None] * len(idlers)
    ready = [threading.Event() for _ in idlers]

    def idle(i: int) -> None:
        came[i] = idlers[i].idle_until("EXISTS", timeout, ready[i])

    threads = [threading.Thread(target=idle, args=(i,)) for i in range(len(idlers))]
    for t in threads:
        t.start()
    for e in ready:
        assert e.wait(10)
    time.sleep(0.2)  # the sessions are waiting on their watcher, not on IDLE's first look
    start = time.monotonic()
    deliver()
    for t in threads:
        t.join(timeout + 10)
    return [None if c is None else max(0.0, c - start) for c in came]


def test_mx_delivery_reaches_idle_sessions_on_both_workers_within_a_second(
        two_workers: Served) -> None:
    """An IDLE session on each worker: whichever worker the MX connection lands on, the
    other one learns of the new message from the file system (inotify), within 1 s."""
    held = spread(two_workers, 1)
    idlers = [s for v in held.values() for s in v]
    try:
        for s in idlers:
            assert s.login(BOB, BOB_PW).status == "OK"
            s.select()
        for _ in range(2):
            took = idle_latencies(idlers, lambda: mx_deliver_to(two_workers.ports["mx"], BOB))
            assert all(t is not None and t < 1.0 for t in took), took
        assert not [v for s in idlers for v in s.violations]
    finally:
        for s in idlers:
            s.close()


def test_mx_delivery_on_one_node_reaches_an_idle_session_on_the_other_within_a_second(
        two_nodes: list[Served]) -> None:
    a, b = two_nodes
    idlers = [imap_session(n.ports["imap"], f"i{i}") for i, n in enumerate((a, b))]
    try:
        for via in (a, b, a):
            took = idle_latencies(idlers, lambda via=via: mx_deliver_to(via.ports["mx"], ALICE))
            assert all(t is not None and t < 1.0 for t in took), took
        assert not [v for s in idlers for v in s.violations]
    finally:
        for s in idlers:
            s.close()


# ------------------------------------------------------------------ UIDs across a SIGKILL


def churn(s: Checked, registry: UidRegistry, done: list[int]) -> None:
    """APPEND into Kill, COPY to KillCopy, STORE, until the connection dies; every
    APPENDUID and COPYUID is noted (what the client was told is what must hold). ``done``
    gets the number of commands answered, or -1 if something else than the connection's
    end stopped it."""
    import re

    n = 0
    try:
        while True:
            ident = next_id("kill")
            data = f"From: <x@remote.test>\r\nMessage-ID: <{ident}>\r\n\r\n{ident}\r\n".encode()
            r = s.command("APPEND Kill (\\Seen)", literal=data)
            m = re.search(r"\[APPENDUID (\d+) (\d+)\]", r.text)
            if r.status != "OK" or m is None:
                raise AssertionError(f"APPEND: {r.status} {r.text}")
            registry.note(f"Kill/{m.group(1)}", int(m.group(2)), ident)
            s.noop()
            known = [u for u in s.uids if u is not None]
            if known:
                s.command(f"UID STORE {known[-1]} +FLAGS.SILENT (\\Flagged)")
                r = s.command(f"UID COPY {known[-1]} KillCopy")
                m = re.search(r"\[COPYUID (\d+) (\S+) (\d+)\]", r.text)
                if r.status == "OK" and m is not None:
                    src_uid = int(m.group(2))
                    with registry.lock:
                        src = registry.seen.get((f"Kill/{s.uidvalidity}", src_uid))
                    if src is not None:
                        registry.note(f"KillCopy/{m.group(1)}", int(m.group(3)), src)
            n += 1
    except (ImapError, OSError):
        done.append(n)
    except BaseException:
        done.append(-1)
        raise


def test_uids_are_never_reused_across_a_sigkilled_worker(two_workers: Served) -> None:
    """The worker serving a session that APPENDs, COPYs and STOREs is SIGKILLed at a
    random moment, twice; after the supervisor's restart UIDVALIDITY is the same, every UID
    a client was told still names the same message, and new messages get UIDs above every
    UID seen before (none given twice)."""
    node = two_workers
    registry = UidRegistry()
    setup = imap_session(node.ports["imap"], "k", user=BOB, password=BOB_PW, select=False)
    for box in ("Kill", "KillCopy"):
        setup.command(f"CREATE {box}")
    setup.close()
    rng = random.Random(SEED)
    validity: dict[str, int] = {}
    for round_ in range(2):
        s = imap_session(node.ports["imap"], f"k{round_}", user=BOB, password=BOB_PW,
                         select=False)
        s.select("Kill")
        victim = worker_of(node.proc.pid, node.ports["imap"], s.sock)
        done: list[int] = []
        t = threading.Thread(target=churn, args=(s, registry, done))
        t.start()
        time.sleep(0.3 + rng.random() * 0.5)
        os.kill(victim, signal.SIGKILL)
        t.join(20)
        assert not t.is_alive() and done and done[0] > 0, done
        s.close()
        deadline = time.monotonic() + 20
        while not (len(node.workers()) == 2 and victim not in node.workers()
                   and node.log.read_text().count(" serving") >= 3 + round_):
            assert time.monotonic() < deadline, node.log.read_text()
            time.sleep(0.05)
        check = imap_session(node.ports["imap"], f"c{round_}", user=BOB, password=BOB_PW,
                             select=False)
        try:
            for box in ("Kill", "KillCopy"):
                check.select(box)
                v = check.uidvalidity
                assert validity.setdefault(box, v) == v, (box, validity[box], v)
                key = f"{box}/{v}"
                with registry.lock:
                    told = {u for (b, u) in registry.seen if b == key}
                ids = message_ids(check, key, registry)
                assert told <= set(ids), f"{box}: acknowledged UIDs lost: {told - set(ids)}"
                unseen = set(ids) - told  # numbered after the kill (an APPEND cut short)
                assert all(u > max(told, default=0) for u in unseen), (sorted(told), unseen)
                if box == "Kill":  # a new message goes above everything seen so far
                    ident = f"after-{round_}@x"
                    r = check.ok("APPEND Kill ()",
                                 literal=f"Message-ID: <{ident}>\r\n\r\nx\r\n".encode())
                    new_uid = int(r.text.split("APPENDUID ")[1].split()[1].rstrip("]"))
                    assert new_uid > max(ids, default=0), (new_uid, max(ids))
                    registry.note(key, new_uid, ident)
            assert not registry.problems, registry.problems
            assert not check.violations, check.violations
        finally:
            check.close()


# ------------------------------------------------------------------ sessions per user


def login_until_ok(node: Served, user: str, password: str, seconds: float = 3.0) -> Checked:
    """A logged-in session; NO [LIMIT] is retried for ``seconds`` (sessions closed just
    before give their slot back once the server has seen the connection end)."""
    deadline = time.monotonic() + seconds
    while True:
        s = Checked("127.0.0.1", node.ports["imap"], "u")
        r = s.login(user, password)
        if r.status == "OK":
            return s
        s.close()
        assert "[LIMIT]" in r.text and time.monotonic() < deadline, r
        time.sleep(0.1)


def test_imap_sessions_per_user_hold_across_the_workers_of_a_node(two_workers: Served) -> None:
    """limits.imap_sessions_per_user sessions, half on each worker: the next login is
    refused NO [LIMIT] on either worker (per-process counts let each worker take the whole
    limit: twice as many in all). A session that ends gives its slot back to the other
    worker; a worker SIGKILLed gives back all of its own (the supervisor clears its row)."""
    node = two_workers
    held = spread(node, SESSIONS_PER_USER // 2)
    sessions = [s for v in held.values() for s in v]
    try:
        deadline = time.monotonic() + 3
        for s in sessions:
            while (r := s.login(BOB, BOB_PW)).status != "OK":
                assert "[LIMIT]" in r.text and time.monotonic() < deadline, r
                time.sleep(0.1)
        for _ in range(2):  # on whichever worker it lands, at two tries
            extra = Checked("127.0.0.1", node.ports["imap"], "x")
            r = extra.login(BOB, BOB_PW)
            extra.close()
            assert r.status == "NO" and "[LIMIT]" in r.text, r
        # One ends on one worker: a login is taken again, wherever it lands.
        sessions.pop().close()
        sessions.append(login_until_ok(node, BOB, BOB_PW))
        # The other worker is killed: its sessions' slots are free again.
        victim = worker_of(node.proc.pid, node.ports["imap"], sessions[0].sock)
        gone = [s for s in sessions if worker_of(node.proc.pid, node.ports["imap"], s.sock)
                == victim]
        os.kill(victim, signal.SIGKILL)
        for s in gone:
            s.close()
            sessions.remove(s)
        deadline = time.monotonic() + 20
        while len(node.workers()) < 2 or victim in node.workers():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for _ in gone:
            sessions.append(login_until_ok(node, BOB, BOB_PW, 10.0))
        extra = Checked("127.0.0.1", node.ports["imap"], "x")
        r = extra.login(BOB, BOB_PW)
        extra.close()
        assert r.status == "NO" and "[LIMIT]" in r.text, r
    finally:
        for s in sessions:
            s.close()


def test_the_shared_count_per_user_is_exact_and_reuses_its_room(tmp_path: Path) -> None:
    """The table itself, two rows as two workers: each user's own limit (no sharing of a
    count between users, as hash buckets would), and a row that saw many more users than
    it has room for keeps working (users at 0 sessions are compacted away)."""
    from mailfort.server.imap import SharedUserSessions, UserSessionTable

    table = UserSessionTable(2, 8, tmp_path / "lock")
    w0, w1 = (SharedUserSessions(table, row, 3) for row in (0, 1))
    assert [w0.take("a"), w1.take("a"), w1.take("a"), w0.take("a")] == [True] * 3 + [False]
    assert w1.take("b") and w0.take("b")  # another user: a count of its own
    w1.give("a")
    assert w0.take("a") and not w1.take("a")
    for n in range(10 * table.cap):  # users come and go: the row never fills up
        user = f"user{n}"
        assert w0.take(user), n
        w0.give(user)
    assert not w1.take("a") and w0.take("b") and not w1.take("b")
    w1.reset_slot()  # the worker of row 1 died: its sessions no longer count
    assert w1.take("a") and w1.take("b")
    w0.close()
    w1.close()


def test_fetch_reads_a_message_renamed_again_during_the_same_command(tmp_path: Path) -> None:
    """The rounds met FETCH 1:n BODY.PEEK[] answering nothing for a message that was still
    there: another session's flag change renamed its file after this FETCH had refreshed
    its stale paths once (one refresh per command). Two sessions of one process, the
    FETCH pulled one response at a time as the driver does."""
    from tests.server.test_imap_commands import MSG, Client, deliver, parse

    root = tmp_path / "md"
    for n in range(3):
        deliver(root, f"100{n}.M{n}P1.host,S={len(MSG)},W={len(MSG)}")
    a, b = Client(root), Client(root)
    a.ok(b"s SELECT INBOX")
    b.ok(b"s SELECT INBOX")
    b.ok(b"t STORE 1:3 +FLAGS (\\Flagged)")  # every path A holds is stale now
    untagged = iter(a.session.execute(parse(b"f FETCH 1:3 (BODY.PEEK[])")).untagged)
    got = [next(untagged)]  # message 1, read once the paths were refreshed
    b.ok(b"t STORE 2 +FLAGS (\\Answered)")  # message 2 renamed once more
    got += list(untagged)
    assert [line.split()[1] for line in got if b"BODY[]" in line] == [b"1", b"2", b"3"], got
