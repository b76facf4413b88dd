"""Write-ahead records of the Maildir links a batch makes: one flush before a 250, not two.

A hard link into ``new/`` may only become durable after the message's data (a name in
``new/`` must never point at a partial file, after a power loss included), so making a batch
durable takes two flushes: the data, then the names. The 250 need not wait for the second
one if the first also made durable a record of the links to come: after a crash, the record
is replayed. The committer (store/maildir.py) writes, beside the batch's spool files, one
*intent* file listing each message's spool file, its size and CRC-32, and the paths it is
to be linked as; the first flush covers the data and the intent together; the links follow;
the 250s go out; the next flush (that of the next batch, or one made when none came for a
few milliseconds) covers the links, after which the spool files and the intent go.

Recovery (``replay``), at start and for a worker that died: an intent whose own checksum
holds names messages whose data is on disk whole (size and CRC-32 as recorded: a flush cut
short by a power loss can leave a file of the right size full of zeros) and each target
that is neither in ``new/`` nor in ``cur/`` is linked again; the directories touched are
fsynced before anything is removed. An intent or a message that does not check out was
never acknowledged (its 250 waited for the flush that would have made it whole): it is
dropped. A message whose first flush completed but whose 250 never reached the client is
delivered by the replay, and the client sends it again: a duplicate, which SMTP accepts
over a loss (RFC 5321, section 6.1), and the same window the committer always had between
its last flush and the 250 leaving.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from mailfort.store.durable import fsync_dir
from mailfort.store.syncfs import SYNCFS, syncfs

SUFFIX = ".links"
_MAGIC = "mailfort-links 1"
log = logging.getLogger("mailfort.store")


@dataclass(frozen=True, slots=True)
class Entry:
    """One message of a batch: its spool file (a name in the spool directory), what the
    file holds, and the paths (in ``new/`` of Maildirs) it is to be linked as."""

    spool: str
    size: int
    crc: int
    targets: tuple[str, ...]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


# The kernel's identity for this boot: a record written in this boot names links that are
# still in the page cache (a process that dies loses none of them); only a record from an
# earlier boot can name links that were lost.
BOOT_ID = _boot_id()


def encode(entries: list[Entry], boot: str) -> bytes:
    body = json.dumps({"boot": boot,
                       "messages": [[e.spool, e.size, e.crc, list(e.targets)] for e in entries]},
                      ensure_ascii=True, separators=(",", ":"))
    text = f"{_MAGIC}\n{body}\n"
    return f"{text}{zlib.crc32(text.encode()):08x}\n".encode()


def decode(data: bytes) -> tuple[str, list[Entry]] | None:
    """The boot that wrote the record and its entries, or None for a record that is torn,
    altered or not one of ours."""
    text, sep, tail = data.rstrip(b"\n").rpartition(b"\n")
    if not sep or len(tail) != 8:
        return None
    try:
        if int(tail, 16) != zlib.crc32(text + b"\n"):
            return None
        magic, _, body = text.decode("ascii").partition("\n")
        if magic != _MAGIC:
            return None
        record = json.loads(body)
        return str(record["boot"]), [Entry(str(s), int(n), int(c), tuple(str(t) for t in ts))
                                     for s, n, c, ts in record["messages"]]
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        return None


def write(path: Path, entries: list[Entry]) -> None:
    """Create the intent file (its durability comes with the batch's first flush)."""
    data = encode(entries, BOOT_ID)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
    finally:
        os.close(fd)


def replay(spool_dir: Path, pattern: str = "*") -> int:
    """Make durable what the intents matching ``pattern`` (``<pattern>.links``) record,
    then remove them; returns the links made again. A record of this boot: its links are
    intact (only the kernel could have lost them), one ``syncfs`` makes them durable; of an
    earlier boot: what is missing is linked again (a message deleted from its Maildir in
    the moments between its 250 and the crash comes back: a duplicate, never a loss).
    The spool files themselves are left to the caller, which removes them all."""
    linked = 0
    touched: set[Path] = set()
    this_boot = False
    records = sorted(spool_dir.glob(pattern + SUFFIX))
    for path in records:
        try:
            record = decode(path.read_bytes())
        except OSError:
            record = None
        if record is None:
            log.warning("dropped the unreadable link record %s (its batch was never "
                        "acknowledged)", path.name)
            continue
        boot, entries = record
        if boot and boot == BOOT_ID:
            this_boot = True
            continue
        for entry in entries:
            spool = spool_dir / entry.spool
            if "/" in entry.spool or not _whole(spool, entry):
                continue
            for target in map(Path, entry.targets):
                if _relink(spool, target, entry.spool):
                    linked += 1
                    touched.add(target.parent)
    if this_boot:  # hard links, so on the spool's file system
        _syncfs(spool_dir)
    for d in touched:  # the links are durable before the records go
        fsync_dir(d)
    for path in records:
        path.unlink(missing_ok=True)
    if linked:
        log.warning("made %d Maildir links again after a crash (their messages were "
                    "acknowledged before the links were flushed)", linked)
    return linked


def _syncfs(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if SYNCFS is None:
            os.sync()  # every file system, which includes this one
        else:
            syncfs(fd)
    finally:
        os.close(fd)


def _whole(spool: Path, entry: Entry) -> bool:
    """Whether the spool file holds what was written (size and CRC-32)."""
    try:
        with open(spool, "rb") as f:
            crc, size = 0, 0
            while chunk := f.read(1 << 20):
                crc = zlib.crc32(chunk, crc)
                size += len(chunk)
    except OSError:
        return False
    return size == entry.size and crc == entry.crc


def _relink(spool: Path, target: Path, name: str) -> bool:
    """Link ``spool`` as ``target`` unless the message (by its unique name) is already in
    that Maildir's new/ or cur/; True when a link was made."""
    from mailfort.store.maildir import ensure_maildir, in_maildir

    maildir = target.parent.parent
    if target.parent.name != "new" or in_maildir(maildir, name):
        return False
    try:
        ensure_maildir(maildir)
        os.link(spool, target)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno == errno.EXDEV:  # a copy: its batch flushed it before any 250
            return False
        log.error("could not link %s again after a crash: %s", target, exc)
        return False
    return True
