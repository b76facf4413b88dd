"""Wakes IMAP sessions (IDLE, NOOP) when a mailbox they watch may have changed.

One ``MailboxWatcher`` per worker process. A session ``subscribe``s to the directory of its
selected mailbox (INBOX: the Maildir root; ``.Sent`` etc.); subscriptions are counted per
directory, so 10,000 sessions on 1,000 mailboxes cost 1,000 sets of watches. A change is
learnt four ways, cheapest first:

1. **This process says so**: ``changed(dir)`` after an IMAP STORE/EXPUNGE/APPEND/COPY/MOVE,
   a POP3 UPDATE, and from the committer thread for each Maildir a batch delivered into
   (``Committer.delivered``, wired by server/app.py; ``changed`` is thread-safe).
2. **Another process of this machine**: Linux inotify, one descriptor per process on the
   event loop (``add_reader``), watches on ``new/`` and ``cur/`` (delivery, flag renames,
   expunges, POP3 DELE, other Maildir tools) and on the mailbox directory itself, whose only
   event that counts is one on the UID log (store/uidmap.py ``LOG_NAME``: keyword changes and
   MODSEQ rename no file). Watches are added and removed with the subscriptions;
   ``IN_Q_OVERFLOW`` wakes everyone; a watch that cannot be added (``max_user_watches``
   reached, a directory not there yet) or is lost (the mailbox deleted or renamed) makes that
   directory polled until it can be watched again.
3. **Another node that shares ``mail_dir``** (NFS and the like: no inotify across machines):
   with ``[counters] backend = "redis"``, each ``changed`` is published on one channel
   (``<key_prefix>mailbox-changed``, the paths relative to ``mail_dir``, which nodes may mount
   in different places) and every process listens on one pub/sub connection. One channel for
   all mailboxes rather than one per mailbox: no SUBSCRIBE churn as sessions come and go,
   at the price of every process reading every change of the group (a few hundred bytes each).
4. **The stat poll, the last resort**: every ``[store] watch_poll_interval`` seconds, three
   ``stat`` calls per polled mailbox (``new/``, ``cur/``, the UID log: mtime, size, inode),
   in a thread (a stat on NFS can block), only while the mailbox is subscribed. With
   ``watch_poll = "auto"`` (the default) a mailbox is polled when inotify cannot watch it,
   and every subscribed mailbox when ``mail_dir`` is on a network or cluster file system
   (read from /proc/self/mountinfo) and Redis is not configured or not reachable; "always"
   polls every subscribed mailbox (sharing that detection misses), "never" never. On NFS a
   poll sees a change only once the client's attribute cache lets it (mount with
   ``actimeo=1`` or lower for the one-second promise): Redis is the way for several nodes.

Coalescing: a subscription holds one "may have changed" bit, so any number of changes
before the session looks are one wake-up. Spurious wake-ups happen (a session's own change,
the same change seen by two ways, the first scan's own move to ``cur/``) and cost one rescan
per mailbox per process: ``wait`` returns the wake-up's time, and the sessions woken
together take one scan begun after it (``Mailbox.scan(since)``).

Why inotify through ctypes and no library: three system calls and a fixed-size record are
all that is needed, and the descriptor must sit on our event loop with our error handling
(ENOSPC per watch, one descriptor per process). ``asyncinotify`` (PyPI, maintained) is
asyncio-friendly, but hands out an event object with a built ``Path`` per event through
its own iterator and hides the descriptor; ``inotify_simple`` is the same thin layer as
below without asyncio; neither is worth a dependency for ~40 lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import logging
import os
import secrets
import struct
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mailfort.store.uidmap import LOG_NAME

log = logging.getLogger("mailfort.imap.watch")

# <linux/inotify.h>
IN_MODIFY = 0x00000002
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_MASK_ADD = 0x20000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name
# The mailbox directory: the UID log appended to or replaced; the directory itself gone.
ROOT_MASK = (IN_MODIFY | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
             | IN_ONLYDIR | IN_MASK_ADD)
# new/ and cur/: a message arrives, is renamed (flags, new/ -> cur/) or removed.
DIR_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ONLYDIR | IN_MASK_ADD
_LOST = IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT  # re-watch the path
_LOG = LOG_NAME.encode()
_READS_PER_WAKE = 16  # 64 KiB reads per loop callback, so a storm cannot starve the loop
NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p",
                        "afs", "lustre", "gpfs", "ocfs2", "gfs2", "beegfs", "cephfs"})
POLL_MODES = ("auto", "always", "never")
REDIS_RETRY = 1.0  # seconds between tries of an unreachable Redis
# A quiet pub/sub connection is PINGed; one that stays silent is taken for dead (a peer gone
# without a FIN: a partition), so that the poll covers while it is reconnected.
REDIS_PING_AFTER = 5.0
REDIS_DEAD_AFTER = 12.0


class Inotify:
    """One inotify descriptor (non-blocking, close-on-exec) through libc."""

    _libc: Any = None

    def __init__(self) -> None:
        if Inotify._libc is None:
            # The process's own symbols: libc is linked in (find_library would run ldconfig).
            Inotify._libc = ctypes.CDLL(None, use_errno=True)
            for name in ("inotify_init1", "inotify_add_watch", "inotify_rm_watch"):
                getattr(Inotify._libc, name).restype = ctypes.c_int
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise _oserror("inotify_init1")
        self.fd: int = fd

    def add(self, path: str, mask: int) -> int:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), ctypes.c_uint32(mask))
        if wd < 0:
            raise _oserror(path)
        return int(wd)

    def remove(self, wd: int) -> None:
        self._libc.inotify_rm_watch(self.fd, wd)  # EINVAL: the kernel dropped it already

    def read(self) -> list[tuple[int, int, bytes]]:
        """Queued events as (wd, mask, name without padding); [] when none."""
        out: list[tuple[int, int, bytes]] = []
        for _ in range(_READS_PER_WAKE):
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            off = 0
            while off + _EVENT.size <= len(data):
                wd, mask, _cookie, n = _EVENT.unpack_from(data, off)
                off += _EVENT.size
                out.append((wd, mask, data[off:off + n].rstrip(b"\0")))
                off += n
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _oserror(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code), what)


def mount_fstype(path: Path) -> str:
    """The file system type of the mount holding ``path`` ("" if unknown)."""
    try:
        target = os.path.realpath(path)
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    best, fstype = -1, ""
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right:
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best:
            best, fstype = len(point), right.split()[0]
    return fstype


def is_network_fs(fstype: str) -> bool:
    return fstype in NETWORK_FS or fstype.startswith("fuse.") or fstype == "fuse"


class Subscription:
    """One session's interest in one mailbox directory; ``close`` when done with it."""

    __slots__ = ("_box", "_pending", "_waiter", "_watcher", "_woken")

    def __init__(self, watcher: MailboxWatcher, box: _Box) -> None:
        self._watcher: MailboxWatcher | None = watcher
        self._box = box
        self._pending = False
        self._woken = 0.0  # time.monotonic() of the latest wake-up
        self._waiter: asyncio.Future[None] | None = None

    @property
    def path(self) -> Path:
        return Path(self._box.key)

    async def wait(self) -> float:
        """Return once the mailbox may have changed since the last return (at once if it
        already may have; at once too once closed). Cancelling it is fine (IDLE's DONE).
        Returns the ``time.monotonic()`` of the latest wake-up it stands for: every change
        it signals was made before then, so a scan begun after it sees them all (the
        sessions woken together share one: ``Mailbox.scan(since)``)."""
        if not self._pending and self._watcher is not None:
            fut = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await fut
            finally:
                self._waiter = None
        self._pending = False
        return self._woken

    def _wake(self, now: float | None = None) -> None:
        self._woken = time.monotonic() if now is None else now
        self._pending = True
        fut = self._waiter
        if fut is not None and not fut.done():
            fut.set_result(None)

    def close(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher._unsubscribe(self)
        self._wake()  # a task still waiting returns


class _Box:
    """One subscribed directory: its subscriptions, inotify watches and poll baseline."""

    __slots__ = ("key", "stat", "subs", "wds")

    def __init__(self, key: str) -> None:
        self.key = key
        self.subs: set[Subscription] = set()
        self.wds: tuple[int, ...] = ()  # (root, new, cur) while watched
        self.stat: tuple[Any, ...] | None = None  # the last poll's, None: no baseline


class MailboxWatcher:
    """Per node (per worker process): wakes IMAP sessions when a mailbox changes.

    ``mail_root``: ``Config.mail_path`` (Redis messages name mailboxes relative to it).
    ``redis``: (url, password, key prefix) of ``[counters]`` when its backend is Redis.
    ``inotify``: False to do without (tests of the poll; systems without it)."""

    def __init__(self, mail_root: Path, *, poll: str = "auto", poll_interval: float = 0.5,
                 redis: tuple[str, str | None, str] | None = None,
                 inotify: bool = True) -> None:
        if poll not in POLL_MODES:
            raise ValueError(f"poll: one of {', '.join(POLL_MODES)}")
        self.mail_root = Path(os.path.abspath(mail_root))
        self.poll_mode = poll
        self.poll_interval = poll_interval
        self._redis_cfg = redis
        self._use_inotify = inotify
        self._boxes: dict[str, _Box] = {}
        self._wds: dict[int, list[tuple[_Box, bool]]] = {}  # wd -> (box, is the root)
        self._ino: Inotify | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._network_fs = False
        self._redis: Any = None
        self._redis_up = False
        self._channel = (redis[2] if redis else "mailfort:") + "mailbox-changed"
        self._me = secrets.token_hex(8)  # this watcher's messages come back to it: skipped
        self._outbox: set[str] = set()
        self._publishing = False
        self._closed = False
        self._enospc_logged = False
        self.inotify_error: str | None = None  # why there is no inotify, for the log/tests
        self.wakeups = 0  # subscriptions woken (tests, metrics)

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Open the inotify descriptor, connect Redis, start the poll (after a fork: the
        worker process's own)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        if self._use_inotify:
            try:
                self._ino = Inotify()
            except (OSError, AttributeError) as exc:  # no inotify here (or instances used up)
                self.inotify_error = str(exc)
                log.warning("no inotify (%s): other processes' changes to mailboxes are %s",
                            exc, "never seen (watch_poll = never)" if self.poll_mode == "never"
                            else f"seen by a poll every {self.poll_interval:g}s")
            else:
                self._loop.add_reader(self._ino.fd, self._on_inotify)
                for box in self._boxes.values():  # subscribed before the start
                    self._watch(box)
        else:
            self.inotify_error = "disabled"
        fstype = mount_fstype(self.mail_root)
        self._network_fs = is_network_fs(fstype)
        if self._network_fs and self._redis_cfg is None and self.poll_mode == "auto":
            log.info("mail_dir is on %s and [counters] has no Redis: subscribed mailboxes are "
                     "polled every %gs for other nodes' changes", fstype, self.poll_interval)
        self._tasks.append(self._loop.create_task(self._poll_loop()))
        if self._redis_cfg is not None:
            from mailfort.policy.redis_counters import connect

            self._redis = connect(self._redis_cfg[0], self._redis_cfg[1])
            self._tasks.append(self._loop.create_task(self._listen()))

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._outbox and self._redis is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._publish_now(), 1.0)
        if self._ino is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._ino.fd)
            self._ino.close()
            self._ino = None
        self._wds.clear()
        for box in list(self._boxes.values()):
            for sub in list(box.subs):
                sub._watcher = None
                sub._wake()
            box.wds = ()
        self._boxes.clear()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None

    # ------------------------------------------------------------------ the API

    def subscribe(self, mailbox_dir: Path) -> Subscription:
        """Watch a mailbox directory. Subscribe before reading its state (SELECT's scan):
        a change between the two is then a wake-up, never lost."""
        if self._closed:
            raise RuntimeError("mailbox watcher is closed")
        key = os.path.abspath(mailbox_dir)
        box = self._boxes.get(key)
        if box is None:
            box = self._boxes[key] = _Box(key)
            self._watch(box)
        sub = Subscription(self, box)
        box.subs.add(sub)
        return sub

    def changed(self, mailbox_dir: Path | str) -> None:
        """A writer of this process changed the mailbox: wake its subscribers here, and
        tell the other nodes. From any thread (the committer's)."""
        self.changed_many((mailbox_dir,))

    def changed_many(self, dirs: Iterable[Path | str]) -> None:
        """``changed`` for several directories at once (a committer batch)."""
        loop = self._loop
        if loop is None or self._closed:
            return
        keys = [os.path.abspath(d) for d in dirs]
        if not keys:
            return
        if threading.get_ident() != self._thread:
            # Nobody here watches these and no other node is told: no wake-up of the loop
            # (the committer's every batch, a lone sender's every message). No change is
            # missed: a session subscribes before it scans, and the change is made before
            # this call, so one that subscribes after this look sees it in its scan.
            if self._redis_cfg is None and not any(k in self._boxes for k in keys):
                return
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._changed_here, keys)
            return
        self._changed_here(keys)

    @property
    def subscribed(self) -> int:
        """Directories watched (tests, metrics)."""
        return len(self._boxes)

    # ------------------------------------------------------------------ wake-ups

    def _changed_here(self, keys: list[str]) -> None:
        if self._closed:
            return
        for key in keys:
            box = self._boxes.get(key)
            if box is not None:
                self._wake(box)
        if self._redis is not None:
            self._outbox.update(keys)
            if not self._publishing:
                self._publishing = True
                assert self._loop is not None
                self._tasks.append(self._loop.create_task(self._publish()))

    def _wake(self, box: _Box) -> None:
        now = time.monotonic()  # after the change: every way of learning of one comes later
        for sub in box.subs:
            sub._wake(now)
        self.wakeups += len(box.subs)

    def _wake_all(self) -> None:
        for box in self._boxes.values():
            self._wake(box)

    def _unsubscribe(self, sub: Subscription) -> None:
        box = sub._box
        box.subs.discard(sub)
        if not box.subs and self._boxes.get(box.key) is box:
            del self._boxes[box.key]
            self._unwatch(box)

    # ------------------------------------------------------------------ inotify

    def _watch(self, box: _Box) -> bool:
        """Add the three watches of ``box``; False (none kept) if one cannot be added."""
        ino = self._ino
        if ino is None:
            return False
        added: list[int] = []
        try:
            for sub, mask in (("", ROOT_MASK), ("new", DIR_MASK), ("cur", DIR_MASK)):
                added.append(ino.add(os.path.join(box.key, sub) if sub else box.key, mask))
        except OSError as exc:
            for wd in added:
                self._drop_wd(wd, box)
                if wd not in self._wds:
                    ino.remove(wd)
            if exc.errno == errno.ENOSPC and not self._enospc_logged:
                self._enospc_logged = True
                log.warning("inotify watches used up (fs.inotify.max_user_watches; first "
                            "left out: %s): mailboxes left out are polled (watch_poll = %s)",
                            box.key, self.poll_mode)
            return False
        for i, wd in enumerate(added):
            self._wds.setdefault(wd, []).append((box, i == 0))
        box.wds = tuple(added)
        return True

    def _drop_wd(self, wd: int, box: _Box) -> None:
        users = self._wds.get(wd)
        if users is None:
            return
        users[:] = [u for u in users if u[0] is not box]
        if not users:
            del self._wds[wd]

    def _unwatch(self, box: _Box) -> None:
        for wd in box.wds:
            self._drop_wd(wd, box)
            if wd not in self._wds and self._ino is not None:
                self._ino.remove(wd)
        box.wds = ()

    def _on_inotify(self) -> None:
        ino = self._ino
        if ino is None:
            return
        try:
            events = ino.read()
        except OSError as exc:
            log.error("inotify read failed: %s", exc)
            return
        woken: set[_Box] = set()
        lost: set[_Box] = set()
        for wd, mask, name in events:
            if mask & IN_Q_OVERFLOW:
                log.warning("inotify queue overflowed: every IMAP session rescans")
                self._wake_all()
                continue
            for box, root in self._wds.get(wd, ()):
                if mask & _LOST:
                    lost.add(box)  # deleted or renamed: what the path is now is unknown
                elif root and name != _LOG:
                    continue  # the lock file, subfolders, the validity file
                woken.add(box)
        for box in lost:
            self._unwatch(box)
            if self._boxes.get(box.key) is box:
                self._watch(box)  # the path as it is now; polled if it is gone
        for box in woken:
            self._wake(box)

    # ------------------------------------------------------------------ the poll

    def _polled(self, box: _Box) -> bool:
        if self.poll_mode == "never":
            return False
        if self.poll_mode == "always" or not box.wds:
            return True
        return self._network_fs and not self._redis_up

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            boxes = []
            for box in list(self._boxes.values()):
                if not box.wds and self._ino is not None and box.subs and self._watch(box):
                    self._wake(box)  # there now, or watches freed: unwatched until now
                if self._polled(box):
                    boxes.append(box)
                else:
                    box.stat = None
            if not boxes:
                continue
            stats = await asyncio.to_thread(_stat_all, [b.key for b in boxes])
            for box, st in zip(boxes, stats, strict=True):
                if not box.subs:
                    continue
                if box.stat != st:
                    # No baseline yet: a change since the subscription would be missed, so
                    # the first look wakes too (spurious at worst).
                    box.stat = st
                    self._wake(box)

    # ------------------------------------------------------------------ Redis

    def _relative(self, key: str) -> str:
        root = str(self.mail_root)
        if key.startswith(root.rstrip("/") + "/"):
            return key[len(root.rstrip("/")) + 1:]
        return key

    async def _publish(self) -> None:
        try:
            await asyncio.sleep(0)  # whatever else this loop turn changes goes along
            while self._outbox:
                await self._publish_now()
        finally:
            self._publishing = False
            task = asyncio.current_task()
            if task in self._tasks:
                self._tasks.remove(task)  # type: ignore[arg-type]

    async def _publish_now(self) -> None:
        paths, self._outbox = sorted(self._outbox), set()
        payload = json.dumps([self._me, [self._relative(p) for p in paths]])
        try:
            await self._redis.publish(self._channel, payload)
        except Exception as exc:  # the listener notices and logs the outage
            log.debug("redis publish of mailbox changes failed: %s", exc)

    async def _listen(self) -> None:
        """The pub/sub connection: other nodes' changes, for as long as the watcher runs."""
        down_logged = False
        loop = asyncio.get_running_loop()
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                if down_logged:
                    log.warning("redis reachable again: mailbox changes of other nodes "
                                "arrive through it")
                    down_logged = False
                self._redis_up = True
                self._wake_all()  # whatever was published while we were not listening
                heard = pinged = loop.time()
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True,
                                                   timeout=min(1.0, REDIS_PING_AFTER / 2))
                    now = loop.time()
                    if msg is not None:
                        heard = now
                        if msg.get("type") == "message":
                            self._received(msg.get("data"))
                    elif now - heard >= REDIS_DEAD_AFTER:  # no pong: a half-open connection
                        raise TimeoutError("no answer to PING")
                    elif now - heard >= REDIS_PING_AFTER and now - pinged >= REDIS_PING_AFTER:
                        pinged = now
                        await pubsub.ping()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not down_logged:
                    log.warning("redis unreachable for mailbox changes (%s): polled meanwhile "
                                "where mail_dir is shared", type(exc).__name__)
                    down_logged = True
                self._redis_up = False
            finally:
                self._redis_up = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(REDIS_RETRY)

    def _received(self, data: Any) -> None:
        try:
            sender, paths = json.loads(data)
            if sender == self._me:
                return
            for rel in paths:
                box = self._boxes.get(os.path.abspath(os.path.join(self.mail_root, str(rel))))
                if box is not None:
                    self._wake(box)
        except (ValueError, TypeError) as exc:
            log.debug("malformed mailbox change message: %s", exc)


def _stat_all(keys: list[str]) -> list[tuple[Any, ...]]:
    """What a change would alter: ``new/`` and ``cur/`` (entries), the UID log (records)."""
    out = []
    for key in keys:
        st: list[Any] = []
        for name in ("new", "cur", LOG_NAME):
            try:
                s = os.stat(os.path.join(key, name))
            except OSError as exc:
                st.append(exc.errno)
            else:
                st.append((s.st_mtime_ns, s.st_size, s.st_ino))
        out.append(tuple(st))
    return out
