"""Operator commands that talk to the running server: ``status``, ``tls show`` and the
server side of ``queue retry``.

Each says truthfully whether a running server answered (control socket, see
server/control.py): a retry done on the queue files alone is attempted only when a server
next reads them, and the command says so instead of promising "now".
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailfort import tlsinfo
from mailfort.config import Config
from mailfort.server import control


def _cfg(args: argparse.Namespace) -> Config:
    from mailfort.cli import config_of

    return config_of(args)


def queue_retry(cfg: Config, ident: str | None) -> str:
    """Ask the running server to retry now; without one, mark the files due. A damaged
    entry is refused here (the files say so), never sent to the server."""
    from mailfort.queue import admin

    root = admin.queue_root(cfg)
    if ident is not None:
        found = admin.Queue(root).damaged_entry(ident)
        if found is not None:
            raise admin.DamagedEntry(ident, found.reason)
    line = "retry" + (f" {ident}" if ident else "")
    try:
        reply = control.request(cfg.data_path, line)
    except control.NotRunning:
        return _retry_offline(cfg, ident)
    status, _, rest = reply.partition(" ")
    if status != "ok":
        raise ValueError(rest or reply)
    n = int(rest)
    what = f"{ident}: " if ident else ""
    if ident is not None and n == 0:
        return f"{ident}: nothing to retry"
    return (f"{what}{n} message(s) being retried now by the running server"
            f" (pid answering on {control.socket_path(cfg.data_path)})"
            + ("" if ident else admin.damaged_note(root)))


def _retry_offline(cfg: Config, ident: str | None) -> str:
    from mailfort.queue import admin

    # Started as root with server.user, the command runs as that user by now (cli.py):
    # the files stay the server's own.
    text = admin.queue_retry(admin.queue_root(cfg), ident)
    return (f"{text}; no mailfort server is running (nothing answers on "
            f"{control.socket_path(cfg.data_path)}): delivery is attempted when it starts")


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _cfg(args)
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


def cmd_tls_show(args: argparse.Namespace) -> int:
    cfg = _cfg(args)
    path = tlsinfo.served_certificate_path(cfg)
    if not path.is_file():
        raise ValueError(f"no certificate at {path}: set tls.cert_file, or start mailfort "
                         "once to generate a self-signed one")
    info = tlsinfo.describe(Path(path))
    print(json.dumps(info, indent=2) if args.json else tlsinfo.format_description(info))
    return 0


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
    cfg = _cfg(args)
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
    cfg = _cfg(args)
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


def add_parser(sub: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    # A configured certificate is parsed (X.509), after the switch to the service user.
    x509 = ("cryptography.x509",)
    st = leaf(sub, "status", cmd_status, "is the server running: listeners, queue, certificate",
              x509)
    st.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    tls = sub.add_parser("tls", help="the served certificate", allow_abbrev=False)
    tls_sub = tls.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = leaf(tls_sub, "show", cmd_tls_show, "subject, names, issuer and expiry", x509)
    show.add_argument("--json", action="store_true", help="print JSON")
    blk = sub.add_parser("block", help="brute-force blocks of the running server",
                         allow_abbrev=False)
    blk_sub = blk.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = leaf(blk_sub, "list", cmd_block_list,
              "blocked clients and slowed-down accounts, with the time left")
    ls.add_argument("--json", action="store_true", help="print JSON")
    rm = leaf(blk_sub, "remove", cmd_block_remove,
              "lift the block of a client address, or forget an account's failures")
    rm.add_argument("target", metavar="IP|USER")
