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
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

from mailfort.store.syncfs import SYNCFS, syncfs

SUFFIX = ".links"
KEPT = "kept"  # spool/kept/: what a replay refused, for the administrator to look at
_MAGIC_V1 = "mailfort-links 1"  # targets as paths (absolute, or relative to the cwd)
_MAGIC = "mailfort-links 2"  # targets relative to the Maildir root: domain/local/new/NAME
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
log = logging.getLogger("mailfort.store")


@dataclass(frozen=True, slots=True)
class Entry:
    """One message of a batch: its spool file (a name in the spool directory), what the
    file holds, and where it is to be linked: ``domain/local/new/NAME`` below the Maildir
    root (paths, in records of the first format)."""

    spool: str
    size: int
    crc: int
    targets: tuple[str, ...]


class Refused(Exception):
    """A record's target that is not a Maildir name below the root, or is reached
    through a symlink: never linked, and its spool file is kept."""


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
    record = _decode(data)
    return None if record is None else (record[1], record[2])


def _decode(data: bytes) -> tuple[int, str, list[Entry]] | None:
    """(format 1 or 2, boot, entries), or None."""
    text, sep, tail = data.rstrip(b"\n").rpartition(b"\n")
    if not sep or len(tail) != 8:
        return None
    try:
        if int(tail, 16) != zlib.crc32(text + b"\n"):
            return None
        magic, _, body = text.decode("ascii").partition("\n")
        if magic not in (_MAGIC, _MAGIC_V1):
            return None
        record = json.loads(body)
        return (2 if magic == _MAGIC else 1, str(record["boot"]),
                [Entry(str(s), int(n), int(c), tuple(str(t) for t in ts))
                 for s, n, c, ts in record["messages"]])
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        return None


def write(path: Path, entries: list[Entry], *, reuse: bool = False) -> None:
    """Create the intent file (its durability comes with the batch's first flush);
    ``reuse``: write over ``path``, a spent record (emptied by ``spend`` or not), instead.

    Over a spent record the new one is written in place, cut to its length only when the
    old was longer: no truncation to nothing first, whose freed block ext4 gives back and
    takes again, and whose close then starts a flush of its own (``auto_da_alloc``).
    Until the batch's flush, a crash may leave the old record, the new one or a mix of
    the two: the old one's links are durable (it is spent), and a mix fails its
    checksum and is dropped, as any record of a batch never acknowledged."""
    data = encode(entries, BOOT_ID)
    flags = os.O_NOFOLLOW if reuse else os.O_CREAT | os.O_EXCL
    fd = os.open(path, os.O_WRONLY | flags | os.O_CLOEXEC, 0o600)
    try:
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        if reuse and os.fstat(fd).st_size > len(data):
            os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def spend(path: Path) -> None:
    """Empty the record at ``path``, whose links a flush has made durable, for the
    committer to write a later batch's record into (``write(reuse=True)``) instead of
    removing it and creating another. An unlink frees the inode, and on ext4 without a
    journal every later file creation scans past the inodes freed in the last minutes
    (six while their inode table block is dirty): one freed per batch made a lone
    sender's file creations the largest CPU cost of its message (bench/RESULTS.md).
    An empty record is what ``replay`` drops without a word; like the unlink it replaces,
    the truncation is made durable by the next flush, and until then a crash finds the
    spent record, whose links are durable already (its replay links nothing again).
    The committer empties all but the one record the next batch will write over at once
    (store/maildir.py ``_discard_covered``), and that one too when no batch comes."""
    os.truncate(path, 0)


def _plain(name: str) -> bool:
    """A single file name: not empty, not . or .., no slash, no NUL."""
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


def maildir_target(target: str, entry: Entry, mail_root: Path,
                   version: int = 2) -> tuple[str, str, str]:
    """(domain, local, name in new/) of a record's target, checked by its text alone.

    Format 2: ``domain/local/new/NAME`` relative to the Maildir root. Format 1: a path
    that must lie lexically inside ``mail_root`` (as given, or made absolute), the rest
    then read as format 2. NAME must be the spool file's name (with its ``,S=`` suffix).
    Raises Refused. Symlinks are the walk's to refuse (``_open_below``)."""
    rel = target
    if version == 1:
        for root in dict.fromkeys((str(mail_root), os.path.abspath(mail_root))):
            prefix = root.rstrip("/") + "/"
            if target.startswith(prefix):
                rel = target[len(prefix):]
                break
        else:
            raise Refused(f"{target!r} is not inside the Maildir root {str(mail_root)!r}")
    parts = rel.split("/")
    if len(parts) != 4 or parts[2] != "new" or not all(map(_plain, parts)):
        raise Refused(f"{target!r} is not domain/local/new/NAME")
    domain, local, _, name = parts
    if domain.startswith(".") or local.startswith("."):
        raise Refused(f"{target!r}: a Maildir name starts with a dot")
    if name != entry.spool and not name.startswith(entry.spool + ","):
        raise Refused(f"{target!r} does not name the spool file {entry.spool!r}")
    return domain, local, name


def replay(spool_dir: Path, mail_root: Path, pattern: str = "*") -> int:
    """Make durable what the intents matching ``pattern`` (``<pattern>.links``) record,
    then remove them; returns the links made again. A record of this boot: its links are
    intact (only the kernel could have lost them), one ``syncfs`` makes them durable; of an
    earlier boot: what is missing is linked again (a message deleted from its Maildir in
    the moments between its 250 and the crash comes back: a duplicate, never a loss),
    below ``mail_root`` only and through no symlink. A record with a target refused is
    moved to ``spool/kept/`` with its spool files (logged), so that the caller, which
    removes the other spool files, leaves them."""
    linked = 0
    this_boot = False
    records = sorted(p for p in spool_dir.glob(pattern + SUFFIX) if not p.is_symlink())
    kept: list[tuple[Path, list[str]]] = []
    for path in records:
        record = _read_record(spool_dir, path.name)
        if record is None and _empty(path):
            continue  # a spent record kept for reuse (``spend``)
        if record is None:
            log.warning("dropped the unreadable link record %s (its batch was never "
                        "acknowledged)", path.name)
            continue
        version, boot, entries = record
        if boot and boot == BOOT_ID:
            this_boot = True
            continue
        n, refused = _replay_record(spool_dir, mail_root, version, entries)
        linked += n
        if refused:
            kept.append((path, refused))
    if this_boot:  # hard links, so on the spool's file system
        _syncfs(spool_dir)
    for path, spools in kept:
        _keep(spool_dir, path, spools)
    for path in records:
        path.unlink(missing_ok=True)
    if linked:
        log.warning("made %d Maildir links again after a crash (their messages were "
                    "acknowledged before the links were flushed)", linked)
    return linked


def _empty(path: Path) -> bool:
    try:
        return path.lstat().st_size == 0
    except OSError:
        return False


def _read_record(spool_dir: Path, name: str) -> tuple[int, str, list[Entry]] | None:
    try:
        fd = os.open(spool_dir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            return _decode(f.read(1 << 24))
    except OSError:
        return None


def _replay_record(spool_dir: Path, mail_root: Path, version: int,
                   entries: list[Entry]) -> tuple[int, list[str]]:
    """Links made, and the spool files of the entries with a refused target."""
    linked, refused = 0, []
    spool_fd = os.open(spool_dir, _DIR & ~os.O_NOFOLLOW)
    try:
        for entry in entries:
            if not _plain(entry.spool) or entry.spool.endswith(SUFFIX) \
                    or not _whole(spool_fd, entry):
                continue
            for target in entry.targets:
                try:
                    where = maildir_target(target, entry, mail_root, version)
                    if _relink(spool_fd, entry.spool, mail_root, where):
                        linked += 1
                except Refused as exc:
                    log.error("link record: refused to link the message %s as %s (%s); "
                              "its spool file is kept in %s", entry.spool, target, exc,
                              spool_dir / KEPT)
                    refused.append(entry.spool)
                except OSError as exc:
                    log.error("could not link %s again after a crash: %s; its spool file "
                              "is kept in %s", target, exc, spool_dir / KEPT)
                    refused.append(entry.spool)
    finally:
        os.close(spool_fd)
    return linked, refused


def _keep(spool_dir: Path, record: Path, spools: list[str]) -> None:
    """Move a record and the spool files of its refused entries to ``spool/kept/``."""
    kept = spool_dir / KEPT
    spool_fd = os.open(spool_dir, _DIR & ~os.O_NOFOLLOW)
    try:
        kept_fd = _open_below(spool_fd, KEPT)
        try:
            for name in [*dict.fromkeys(spools), record.name]:
                os.rename(name, name, src_dir_fd=spool_fd, dst_dir_fd=kept_fd)
        finally:
            os.close(kept_fd)
    except (OSError, Refused) as exc:
        log.error("could not keep %s and its spool files in %s: %s", record.name, kept, exc)
    finally:
        os.close(spool_fd)


def _syncfs(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if SYNCFS is None:
            os.sync()  # every file system, which includes this one
        else:
            syncfs(fd)
    finally:
        os.close(fd)


def _whole(spool_fd: int, entry: Entry) -> bool:
    """Whether the spool file is a regular file that holds what was written (size and
    CRC-32); a symlink is not opened."""
    try:
        fd = os.open(entry.spool, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=spool_fd)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        crc, size = 0, 0
        while chunk := os.read(fd, 1 << 20):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    except OSError:
        return False
    finally:
        os.close(fd)
    return size == entry.size and crc == entry.crc


def _open_below(dir_fd: int, name: str) -> int:
    """The directory ``name`` in ``dir_fd``, made (and its parent flushed) when missing;
    Refused if it is a symlink or not a directory."""
    for _ in range(2):
        try:
            return os.open(name, _DIR, dir_fd=dir_fd)
        except FileNotFoundError:
            try:
                os.mkdir(name, dir_fd=dir_fd)
                os.fsync(dir_fd)
            except FileExistsError:
                pass
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise Refused(f"{name!r} is a symlink or not a directory") from None
            raise
    return os.open(name, _DIR, dir_fd=dir_fd)


def _present(name: str, *dir_fds: int) -> bool:
    """Whether a message with this unique name is in one of the directories (new/, cur/)
    with any size or flag suffix."""
    for fd in dir_fds:
        with os.scandir(fd) as it:
            for e in it:
                n = e.name
                if n == name or (n.startswith(name) and n[len(name)] in ",:"):
                    return True
    return False


def _relink(spool_fd: int, spool: str, mail_root: Path, where: tuple[str, str, str]) -> bool:
    """Link the spool file as ``mail_root/domain/local/new/NAME``, each directory opened
    below the (resolved) root without following a symlink, unless the message is already
    in that Maildir's new/ or cur/; True when a link was made. Refused, OSError."""
    domain, local, name = where
    root = Path(os.path.realpath(mail_root))
    root.mkdir(parents=True, exist_ok=True)
    fds: list[int] = []
    try:
        fds.append(os.open(root, _DIR & ~os.O_NOFOLLOW))
        for part in (domain, local):
            fds.append(_open_below(fds[-1], part))
        maildir = fds[-1]
        os.close(_open_below(maildir, "tmp"))
        new, cur = _open_below(maildir, "new"), _open_below(maildir, "cur")
        fds += [new, cur]
        if _present(spool, new, cur):
            return False
        try:
            os.link(spool, name, src_dir_fd=spool_fd, dst_dir_fd=new, follow_symlinks=False)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno == errno.EXDEV:  # a copy: its batch flushed it before any 250
                return False
            raise
        os.fsync(new)  # durable before the record goes
        return True
    finally:
        for fd in fds:
            os.close(fd)
