"""``mailfort lab``: run the attacks against a legacy and a hardened server, side by side."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from mailfort.lab import catalogue, report
from mailfort.lab.attacks import ATTACKS, run_attack
from mailfort.lab.harness import LOOPBACK, Lab, LabError, check_address

DESCRIPTION = """\
Start two mailfort servers on 127.0.0.1 (free ports, scratch data removed at the end):
a legacy profile with its protections switched off and the hardened default, with the
same domain and users, plus capture points (the victim's remote server, the forged
sender's mailbox, a recording proxy in front of each server). Then run each attack
against both and show the replies side by side, what the capture points saw, and the
countermeasure. Nothing leaves this machine. Ctrl-C or SIGTERM stops cleanly.

The legacy profile exists only inside this command: no configuration file and no
option of `mailfort serve` can select it.
"""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, systemd, a closing tmux pane): stop as Ctrl-C does, scratch removed.

    A KeyboardInterrupt, so that no ``except Exception`` in an attack can swallow it."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup
    raise Terminated


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "lab", help="watch each weakness exploited on a legacy server and stopped on mailfort",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)
    p.add_argument("--attack", action="append", choices=list(ATTACKS), metavar="NAME",
                   help="run only this attack (repeatable; default: all; see --list)")
    p.add_argument("--list", action="store_true", help="list the attacks and exit")
    p.add_argument("--lang", choices=catalogue.LANGUAGES, default="en")
    p.add_argument("--html", metavar="FILE", help="also write the session as one HTML page")
    p.add_argument("--pace", type=float, default=0.0, metavar="SECONDS",
                   help="pause before each command sent (live demonstrations)")
    p.add_argument("--address", default=LOOPBACK,
                   help="listening address; only 127.0.0.1 is accepted")
    p.set_defaults(func=cmd_lab)
    return p


def cmd_lab(args: argparse.Namespace) -> int:
    cat = catalogue.load(args.lang)
    if args.list:
        print(cat.UI["list"])
        width = max(map(len, ATTACKS)) + 2
        for name in ATTACKS:
            a = cat.ATTACKS[name]
            print(f"  {name:<{width}}{report.ROW_MARKS[a['row']]} {a['summary']}")
        return 0
    if not 0 <= args.pace <= 10:
        print("mailfort lab: --pace must be between 0 and 10 seconds", file=sys.stderr)
        return 2
    try:
        check_address(args.address)
    except LabError as exc:
        print(f"mailfort lab: {exc}", file=sys.stderr)
        return 2
    names = args.attack or list(ATTACKS)
    colour = sys.stdout.isatty()
    print(cat.UI["starting"], flush=True)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    lab: Lab | None = None
    runs = []
    try:
        lab = Lab(args.address)  # makes the scratch directory: from here on, stop() removes it
        lab.start()
        for name in names:
            run = run_attack(lab, name, args.pace)
            runs.append(run)
            one = report.session([run], args.lang)
            print(report.terminal_attack(one["attacks"][0], cat.UI, colour=colour), flush=True)
    except KeyboardInterrupt as stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the cleanup runs to its end
        if lab is not None:
            lab.stop()
        print(f"\n{cat.UI['stopped_lab']}", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(stop, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if lab is not None:
            lab.stop()
        signal.signal(signal.SIGTERM, previous)
    full = report.session(runs, args.lang)
    print(report.terminal_summary(full, colour=colour))
    if args.html:
        Path(args.html).write_text(report.html_page(full), encoding="utf-8")
    print(cat.UI["stopped_lab"])
    # 1 only if something got through the hardened server: that would be a mailfort bug.
    return 1 if any(r.sides["hardened"].succeeded for r in runs) else 0
