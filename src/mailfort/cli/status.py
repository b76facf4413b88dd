"""``mailfort status`` and ``mailfort block list|remove``: ask the running server over its
control socket (server/control.py), and say truthfully when none answers.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from mailfort import tlsinfo
from mailfort.cli.common import config_of, reads_only
from mailfort.config import Config
from mailfort.server import control


def cmd_status(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    try:
        status = control.parse_status(control.request(cfg.data_path, "status"))
    except control.NotRunning as exc:
        print(f"mailfort is not running ({exc})")
        _print_certificate(cfg)
        return 3  # as LSB status: program is not running
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"mailfort is running: pid {status['pid']} as {status['user']}, "
          f"up {status['uptime']}s, {status.get('workers', 1)} worker process(es)")
    listeners: dict[str, list[str]] = status["listeners"]  # type: ignore[assignment]
    sessions: dict[str, int] = status["sessions"]  # type: ignore[assignment]
    for name, addrs in listeners.items():
        print(f"  {name:<12} {', '.join(addrs)}  ({sessions.get(name, 0)} session(s) open)")
    if status.get("metrics"):
        print(f"  metrics      http://{status['metrics']}/metrics")
    q: dict[str, Any] = status["queue"]  # type: ignore[assignment]
    print(f"queue: {q['messages']} message(s), {q['recipients']} recipient(s) pending, "
          f"oldest {q['oldest_seconds']}s"
          + (f", {q['damaged']} DAMAGED (set aside, not delivered: `mailfort queue list`)"
             if q.get("damaged") else ""))
    print(f"accepted since start: {int(status.get('accepted') or 0)}")
    cert: dict[str, Any] = status["certificate"]  # type: ignore[assignment]
    if "error" in cert:
        print(f"certificate: {cert['error']}")
    else:
        print(f"certificate: {cert['subject']}, expires {cert['not_after']} "
              f"({cert['days_left']} days left)")
    return 0


def _print_certificate(cfg: Config) -> None:
    path = tlsinfo.served_certificate_path(cfg)
    if path.is_file():
        info = tlsinfo.describe(path)
        print(f"certificate: {info['subject']}, expires {info['not_after']} "
              f"({info['days_left']} days left)")


def _blocks_not_running(cfg: Config, what: str) -> int:
    """Blocks are asked of the running server (one way, whatever [counters] says)."""
    if cfg.counters.backend == "redis":
        print(f"mailfort is not running here: the blocks are in Redis, shared by every "
              f"node; run `mailfort block {what}` on a node that is running")
    else:
        print(f"mailfort is not running: blocks live in the running server only, "
              f"nothing to {what}")
    return 3


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def cmd_block_list(args: argparse.Namespace) -> int:
    """The blocked clients and the accounts slowed down by failures, with time left."""
    cfg = config_of(args)
    try:
        reply = control.request(cfg.data_path, "blocks")
    except control.NotRunning:
        return _blocks_not_running(cfg, "list")
    status, _, payload = reply.partition(" ")
    if status != "ok":
        raise ValueError(payload or reply)
    blocks: list[dict[str, Any]] = json.loads(payload)
    if args.json:
        print(json.dumps(blocks, indent=2))
        return 0
    if not blocks:
        print("no blocks")
        return 0
    for b in blocks:
        if b["kind"] == "client":
            print(f"client   {b['key']:<40} blocked, {_duration(b['remaining'])} left")
        else:
            print(f"account  {b['key']:<40} {b['failures']} recent failures (logins slowed),"
                  f" {_duration(b['remaining'])} left")
    return 0


def cmd_block_remove(args: argparse.Namespace) -> int:
    """Lift a brute-force block (client address) or forget an account's failures."""
    cfg = config_of(args)
    if any(c.isspace() for c in args.target) or not args.target:
        raise ValueError("give one IP address or user name")
    try:
        reply = control.request(cfg.data_path, f"unblock {args.target}")
    except control.NotRunning:
        return _blocks_not_running(cfg, "remove")
    status, _, text = reply.partition(" ")
    if status != "ok":
        raise ValueError(text or reply)
    print(text)
    return 0


# A configured certificate is parsed (X.509), after the switch to the service user.
X509 = ("cryptography.x509",)


def add_status_parser(sub: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    st = reads_only(leaf(sub, "status", cmd_status,
                         "is the server running: listeners, queue, certificate", X509),
                    "status")
    st.add_argument("--json", action="store_true", help="print the server's answer as JSON")


def add_block_parser(sub: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    blk = sub.add_parser("block", help="brute-force blocks of the running server",
                         allow_abbrev=False)
    blk_sub = blk.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = reads_only(leaf(blk_sub, "list", cmd_block_list,
                         "blocked clients and slowed-down accounts, with the time left"))
    ls.add_argument("--json", action="store_true", help="print JSON")
    rm = reads_only(leaf(blk_sub, "remove", cmd_block_remove,
                         "lift the block of a client address, or forget an account's "
                         "failures"))
    rm.add_argument("target", metavar="IP|USER")
