"""``mailfort queue list|show|retry|delete|adopt``: the outbound queue.

``retry`` says truthfully whether a running server answered (control socket, see
server/control.py): a retry done on the queue files alone is attempted only when a server
next reads them, and the command says so instead of promising "now".
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailfort.cli.common import config_of, reads_only
from mailfort.config import Config
from mailfort.server import control


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

    # Started as root with server.user, the command runs as that user by now (mailfort.cli):
    # the files stay the server's own.
    text = admin.queue_retry(admin.queue_root(cfg), ident)
    return (f"{text}; no mailfort server is running (nothing answers on "
            f"{control.socket_path(cfg.data_path)}): delivery is attempted when it starts")


def cmd_queue(args: argparse.Namespace) -> int:
    from mailfort.queue import admin

    root = admin.queue_root(config_of(args))
    if args.action == "adopt":
        from mailfort.queue.adopt import adopt
        from mailfort.queue.store import Queue

        r = adopt(Queue(root), Path(args.dir))
        print(f"adopted {r.adopted} message(s) from {args.dir} into {root}"
              + (f"; {r.finished} finished from an earlier run" if r.finished else "")
              + (f"; {r.left} never-acknowledged file(s) left in {args.dir}/msg"
                 if r.left else "")
              + ("; a running server sends them at its next queue scan" if r.adopted else ""))
        return 0
    if args.action == "list":
        print(admin.queue_list(root))
    elif args.action == "show":
        print(admin.queue_show(root, args.id))
    elif args.action == "retry":  # the running server retries at once (control socket)
        print(queue_retry(config_of(args), args.id))
    else:
        print(admin.queue_delete(root, args.id))
    return 0


def add_parser(sub: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    qu = sub.add_parser("queue", help="the outbound queue", allow_abbrev=False)
    qu_sub = qu.add_subparsers(dest="action", required=True, metavar="ACTION")
    queue_needs = ("mailfort.queue.admin",)
    # All but adopt work on what is there: where there is no data directory, they say so.
    reads_only(leaf(qu_sub, "list", cmd_queue, "list queued messages", queue_needs))
    reads_only(leaf(qu_sub, "show", cmd_queue, "show one entry and its recipients",
                    queue_needs)).add_argument("id")
    reads_only(leaf(qu_sub, "retry", cmd_queue, "retry now (one entry or all)",
                    queue_needs)).add_argument("id", nargs="?")
    reads_only(leaf(qu_sub, "delete", cmd_queue, "delete an entry",
                    queue_needs)).add_argument("id")
    leaf(qu_sub, "adopt", cmd_queue,
         "take over the queue directory of a node that is gone for good",
         (*queue_needs, "mailfort.queue.adopt")).add_argument(
        "dir", metavar="DIR", help="that node's queue directory (its data_dir/queue)")
