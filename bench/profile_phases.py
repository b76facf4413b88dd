"""Split a py-spy profile of ``mailfort serve`` into the phases of an MX message.

    python bench/cpu_per_message.py --profile prof.txt   # prints the next command
    python bench/profile_phases.py prof.txt [prof2.txt...] --main-us 390 --other-us 90

Only the event loop's thread is split: each of its samples goes to the first phase whose
rule matches (see ``PHASES``), samples waiting in ``select`` are idle and left out, and
the shares are scaled to ``--main-us``, that thread's CPU per message measured from /proc
by ``cpu_per_message.py``. The other threads (the committer: spool writes, links, flushes)
are one row, ``--other-us``, from /proc too: a sampling profiler cannot tell a thread
waiting in ``syncfs`` for the disk from one using a CPU. A sample of a thread that waits
for a CPU counts as busy as well, so the split is an estimate; the totals are not.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

# (phase, substrings any of which in a frame puts the sample there), checked in order:
# the first rules catch work that happens inside several phases (a reply write, a log line).
PHASES: list[tuple[str, tuple[str, ...]]] = [
    ("logging", ("logging/", "decisionlog.py")),
    ("reply writes (send)", ("_SelectorSocketTransport.write ",)),
    ("accept + greeting", ("_accept_connection", "connection_made", "socket.accept",
                           "_SelectorTransport.__init__", "_SelectorSocketTransport.__init__",
                           "EngineSession.admit")),
    ("close (connection lost)", ("connection_lost", "_call_connection_lost", "eof_received",
                                 "socket._real_close", "socket.close")),
    ("MAIL/RCPT: directory lookups", ("directory/sqlite.py", "policy/recipients.py",
                                      "policy/relay.py")),
    ("EHLO/HELO", ("_cmd_ehlo", "_cmd_helo", "_hello")),
    ("MAIL/RCPT: parse + policy", ("_cmd_mail", "_cmd_rcpt", "_on_mail", "_decide_rcpt",
                                   "_answer_rcpt", "address.py", "may_relay", "trusted")),
    ("DATA: start (spool, trace header)", ("_cmd_data", "_start_spool", "_trace_headers",
                                           "new_spool", "unique_name")),
    ("DATA receive (body parse, spool write)", ("_step_data", "BodyChecker", "Spool.write",
                                                "_emit_body", "_finish_body")),
    ("header/policy checks at end of data", ("_sender_auth", "senderauth.py")),
    ("store: hand-off on the loop (commit, settle)", ("_store", "Committer.commit", "_settle",
                                                      "_read_from_self", "_process_self_data",
                                                      "maildir.py")),
    ("engine: other commands (QUIT...)", ("protocol/smtp.py", "protocol/lines.py")),
    ("session plumbing (pump, timers, stress)", ("server/session.py", "server/smtp.py",
                                                 "server/stress.py", "connections.py")),
]
IDLE = ("EpollSelector.select", "Condition.wait", "concurrent/futures/thread.py")
OTHER = "event loop, socket reads, other"


def classify(frames: list[str]) -> str | None:
    """The phase of one event-loop-thread sample, None when idle or another thread.
    (``py-spy --subprocesses`` puts the process frames first: a worker's samples too.)"""
    while frames and frames[0].startswith("process "):
        frames = frames[1:]
    if not frames or "MainThread" not in frames[0] or any(idle in frames[-1] for idle in IDLE):
        return None
    for phase, keys in PHASES:
        if any(k in f for f in frames for k in keys):
            return phase
    return OTHER


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("profile", nargs="+", help="py-spy raw profiles (pooled: more samples)")
    ap.add_argument("--main-us", type=float, default=0.0,
                    help="event loop thread CPU microseconds per message (from /proc)")
    ap.add_argument("--other-us", type=float, default=0.0,
                    help="other threads' CPU microseconds per message (from /proc)")
    args = ap.parse_args()
    counts: collections.Counter[str] = collections.Counter()
    for profile in args.profile:
        for line in Path(profile).read_text(encoding="utf-8").splitlines():
            stack, _, n = line.rpartition(" ")
            phase = classify(stack.split(";"))
            if phase is not None:
                counts[phase] += int(n)
    total = sum(counts.values())
    if not total:
        print("no samples", file=sys.stderr)
        return 1
    print("| phase | share of the event loop's busy samples | µs CPU per message |")
    print("|---|---|---|")
    for phase in [p for p, _ in PHASES] + [OTHER]:
        share = counts[phase] / total
        print(f"| {phase} | {share * 100:.1f} % | {share * args.main_us:.0f} |")
    print(f"| event loop thread, in all | {total} samples | {args.main_us:.0f} |")
    print(f"| committer thread (spool write, fsync/syncfs, link) and others | — | "
          f"{args.other_us:.0f} |")
    print(f"| **total** | | **{args.main_us + args.other_us:.0f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
