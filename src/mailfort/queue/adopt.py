"""``mailfort queue adopt DIR``: take over the outbound queue of a node that is gone.

Each node delivers what it accepted, from its own queue; when a node will not come back,
its queue directory (on its disk, mounted or copied here) is moved into this node's queue.
For each entry of DIR, in order:

1. its message goes into this queue's ``msg/`` (a hard link, or a copy through ``tmp/``
   across file systems) and is fsynced with the directory;
2. its state file is written into this queue's ``env/`` (tmp, fsync, rename, fsync of
   ``env/``): the commit point, as for any new entry; active recipients become due now;
3. then only is it removed from DIR: state file first (DIR's commit point), then message.

A crash at any point leaves every entry in at least one of the two queues, complete; run
the command again and it finishes (an entry already here is only removed from DIR). An
entry is never in both queues *and* still deliverable from DIR by a running node: the
command refuses while DIR's node runs (its owner lock, ``queue/owner.py``) and holds that
lock itself while it works. Message files in DIR without a state file were never
acknowledged (a crash of that node mid-enqueue) and are left where they are.

The one window: killed between step 2 and step 3, and this node delivers and removes
the entry before the command is run again, that rerun adopts it a second time. Mail is
then delivered twice, never lost (SMTP's own rule when in doubt).
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

from mailfort.queue import owner
from mailfort.queue.store import Queue, QueueError, StateError, _fsync_file, parse_state
from mailfort.store.durable import fsync_dir


@dataclass
class AdoptResult:
    adopted: int = 0  # entries moved into this queue now
    finished: int = 0  # entries already here from an interrupted run, removed from DIR
    left: int = 0  # message files in DIR without a state file (never acknowledged)


def adopt(queue: Queue, source: Path) -> AdoptResult:
    src = Queue.__new__(Queue)  # no make_dirs: DIR must be a queue already, and stay as is
    src.root, src.msg_dir, src.env_dir = source, source / "msg", source / "env"
    if not src.env_dir.is_dir() or not src.msg_dir.is_dir():
        raise QueueError(f"{source} is not a mailfort queue directory (no env/ and msg/)")
    if source.resolve() == queue.root.resolve():
        raise QueueError(f"{source} is this node's own queue")
    try:
        lock = owner.hold(source)
    except owner.QueueBusy as exc:
        raise QueueError(f"{exc}: stop that node first (adopt is for a node gone for good)"
                         ) from None
    try:
        result = AdoptResult()
        for state in sorted(src.env_dir.glob("*.json")):
            ident = Queue.check_id(state.name[:-5])
            if _move(queue, src, ident):
                result.adopted += 1
            else:
                result.finished += 1
        known = {p.name[:-5] for p in src.env_dir.glob("*.json")}
        result.left = sum(1 for p in src.msg_dir.iterdir() if p.name not in known)
        return result
    finally:
        owner.release(lock)


def _move(queue: Queue, src: Queue, ident: str) -> bool:
    """One entry, steps 1-3; False when it was already here (an earlier run's)."""
    mine = queue.env_dir / f"{ident}.json"
    moved = not mine.exists()
    if moved:
        state = src.env_dir / f"{ident}.json"
        try:
            entry = parse_state(state.read_bytes(), ident)
        except StateError as exc:  # nothing moved yet: repair or remove it, run again
            raise QueueError(f"{state}: damaged ({exc}); nothing of it was adopted") from None
        target = queue.msg_dir / ident
        target.unlink(missing_ok=True)  # an earlier run's copy that never got its state
        _place(src.msg_dir / ident, target, queue.tmp_dir / f"{ident}.adopt")
        _fsync_file(target)
        fsync_dir(queue.msg_dir)
        now = time.time()
        for r in entry.active:
            r.next_attempt = min(r.next_attempt, now)  # this node has not tried them yet
        queue._write_state(entry)  # the commit point here (fsyncs env/)
    (src.env_dir / f"{ident}.json").unlink(missing_ok=True)
    fsync_dir(src.env_dir)
    (src.msg_dir / ident).unlink(missing_ok=True)
    return moved


def _place(source: Path, target: Path, tmp: Path) -> None:
    """``target`` becomes the message: a hard link, or a copy on another file system."""
    if not source.exists():
        raise QueueError(f"{source}: the message of a queued entry is missing")
    try:
        os.link(source, target)
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):  # copy instead
            raise
    with open(source, "rb") as f_in, open(tmp, "wb") as f_out:
        while chunk := f_in.read(1 << 20):
            f_out.write(chunk)
        f_out.flush()
        os.fsync(f_out.fileno())
    os.rename(tmp, target)
