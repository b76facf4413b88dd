"""MX 1 KB / 50 sessions to a user with a 50-rule Sieve script against the same without a
script (issue 31: the script may cost at most 10 % of the MX rate).

    python bench/sieve_bench.py                   # 3 alternating pairs of 2,000 messages
    python bench/sieve_bench.py --pairs 5 --messages 2000

One mailfort server (``bench/mfproc.MailfortServer``, workers = 1, sender authentication
off as in run_all.py's MX row), two users: alice with an active script of 50 rules (header,
address and envelope tests of the kinds clients generate, each with a ``fileinto``; none
matches the benchmark's message, so it is kept in INBOX, as bob's is: the store's work is
the same) and bob without one. Each pair sends ``--messages`` to one user and then to the
other (alice first in even pairs), each measurement on a quiet disk after an unmeasured
warm-up, counting the messages stored in the user's Maildir. Reported: each rate, the
median ratio script/none, and the server's CPU per message for each.

Loopback only; every wait is bounded; the data directory is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
from mfproc import MailfortServer, bench_tmpdir, wait_disk_quiet  # noqa: E402
from smtp_load import run as smtp_run  # noqa: E402

from mailfort.protocol.sieve import compile_script  # noqa: E402
from mailfort.store.sieve_scripts import ScriptStore  # noqa: E402

ALICE, BOB = "alice@example.test", "bob@example.test"


def fifty_rules() -> str:
    """A script of 50 rules as a mail client writes them; none matches the bench's mail."""
    rules = ['require ["fileinto", "envelope", "imap4flags", "mailbox"];']
    for i in range(50):
        kind = i % 5
        if kind == 0:
            test = f'header :contains "Subject" "project-{i}"'
        elif kind == 1:
            test = f'address :is "from" "sender{i}@partner{i}.example"'
        elif kind == 2:
            test = f'header :contains "List-Id" "<list{i}.lists.example>"'
        elif kind == 3:
            test = f'envelope :domain :is "from" "vendor{i}.example"'
        else:
            test = (f'anyof (header :matches "X-Mailer" "tool{i}*", '
                    f'address :domain :is "to" "team{i}.example")')
        rules.append(f'if {test} {{\n  fileinto :create "Folder{i}";\n  stop;\n}}')
    return "\n".join(rules) + "\n"


def stored(server: MailfortServer, user: str) -> int:
    md = server.maildir(user.partition("@")[0])
    return sum(len(list((md / sub).iterdir())) for sub in ("new", "cur") if (md / sub).is_dir())


def measure(server: MailfortServer, user: str, messages: int, sessions: int,
            size: int) -> tuple[float, float]:
    """(messages stored per second, server CPU seconds per message) for one run."""
    wait_disk_quiet(server.data)
    before, cpu0 = stored(server, user), server.cpu_seconds()
    args = argparse.Namespace(host="127.0.0.1", port=server.ports["mx"], size=size,
                              sessions=sessions, messages=messages,
                              sender="sender@remote.example", rcpt=user, starttls=False,
                              user=None, password=None, keep_session=False)
    t0 = time.perf_counter()
    result = asyncio.run(smtp_run(args))
    deadline = time.monotonic() + 30
    while stored(server, user) - before < result["accepted"] and time.monotonic() < deadline:
        time.sleep(0.01)
    elapsed = time.perf_counter() - t0
    got = stored(server, user) - before
    if result["failed"] or got != messages:
        raise RuntimeError(f"{user}: {got} of {messages} stored, {result['failed']} failed\n"
                           f"{server.log_tail()}")
    return got / elapsed, (server.cpu_seconds() - cpu0) / got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--port-base", type=int, default=13700)
    args = ap.parse_args(argv)
    script = fifty_rules()
    compile_script(script)  # the script is valid Sieve: a broken one would measure INBOX
    with bench_tmpdir("mailfort-sieve-bench-") as tmp:
        server = MailfortServer(Path(tmp), port_base=args.port_base, imap=True)
        store = ScriptStore(server.maildir("alice"))
        store.put("rules", script.encode())
        store.set_active("rules")
        with server:
            for user in (ALICE, BOB):  # warm-up, unmeasured
                measure(server, user, min(200, args.messages), args.sessions, args.size)
            rates: dict[str, list[float]] = {ALICE: [], BOB: []}
            cpus: dict[str, list[float]] = {ALICE: [], BOB: []}
            for pair in range(args.pairs):
                order = (ALICE, BOB) if pair % 2 == 0 else (BOB, ALICE)
                for user in order:
                    rate, cpu = measure(server, user, args.messages, args.sessions, args.size)
                    rates[user].append(rate)
                    cpus[user].append(cpu)
                    print(f"pair {pair + 1} {'50 rules' if user == ALICE else 'no script'}: "
                          f"{rate:8.1f} msg/s, {cpu * 1e3:6.2f} ms CPU/msg", flush=True)
            ratios = [a / b for a, b in zip(rates[ALICE], rates[BOB], strict=True)]
            print(f"median rate: 50 rules {statistics.median(rates[ALICE]):.1f} msg/s, "
                  f"no script {statistics.median(rates[BOB]):.1f} msg/s; "
                  f"ratio {statistics.median(ratios):.3f} (target >= 0.90)")
            print(f"median CPU/msg: 50 rules {statistics.median(cpus[ALICE]) * 1e3:.2f} ms, "
                  f"no script {statistics.median(cpus[BOB]) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
