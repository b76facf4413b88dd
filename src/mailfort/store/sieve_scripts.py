"""A user's Sieve scripts on disk, beside the Maildir they filter.

Layout, under the user's Maildir root (``<mail_root>/<domain>/<local>/sieve/``), so that
every node sharing ``mail_dir`` sees the same scripts without a database round trip at
each delivery:

- ``<encoded name>.sieve``: one file per script (RFC 5804 names are UTF-8; the file name
  encodes every byte outside ``[A-Za-z0-9_-]`` as ``%XX``, so no name can climb out of
  the directory, hide as a dot file or clash by case on a case-folding file system);
- ``active``: a symbolic link to the active script's file, replaced by an atomic rename,
  so a delivery reads either the old script or the new one, never half of one.

The directory is not a Maildir++ folder (no leading dot), so IMAP and POP3 never list it.
Every write goes to a temporary file, is fsynced, then renamed into place: a crash leaves
the old script or the new one. Limits (``[sieve]``) are checked here, before any byte is
written, so ManageSieve and any later writer share them.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mailfort.store.durable import fsync_dir, make_dirs

ACTIVE = "active"
SUFFIX = ".sieve"
MAX_NAME_CHARS = 128  # RFC 5804 lets servers limit names; Dovecot-like clients stay short
_SAFE = re.compile(rb"[A-Za-z0-9_-]")


class ScriptError(Exception):
    """Refused: ``code`` is the ManageSieve response code (RFC 5804 section 1.3)."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        # "QUOTA/MAXSCRIPTS", "QUOTA/MAXSIZE", "NONEXISTENT", "ALREADYEXISTS", "ACTIVE", ""
        self.code = code
        self.text = text


@dataclass(frozen=True, slots=True)
class Quota:
    max_script_size: int = 65536
    max_scripts: int = 16
    max_storage: int = 262144


def check_name(name: str) -> None:
    """RFC 5804 section 1.6: no controls, no line breaks; not empty; bounded here."""
    if not name or len(name) > MAX_NAME_CHARS:
        raise ScriptError("", f"a script name has 1 to {MAX_NAME_CHARS} characters")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in name):
        raise ScriptError("", "a script name may not contain control characters")


def encode_name(name: str) -> str:
    """The file name of script ``name`` (reversible, safe on any POSIX file system)."""
    check_name(name)
    out = []
    for b in name.encode("utf-8"):
        ch = bytes((b,))
        out.append(ch.decode() if _SAFE.fullmatch(ch) else f"%{b:02X}")
    return "".join(out) + SUFFIX


def decode_name(filename: str) -> str | None:
    """The script name of a file in the directory, or None for anything else."""
    if not filename.endswith(SUFFIX) or filename.startswith("."):
        return None
    stem = filename[: -len(SUFFIX)]
    raw = bytearray()
    i = 0
    while i < len(stem):
        c = stem[i]
        if c == "%":
            try:
                raw.append(int(stem[i + 1:i + 3], 16))
            except ValueError:
                return None
            i += 3
        else:
            raw += c.encode()
            i += 1
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


class ScriptStore:
    """The scripts of one user. Blocking file I/O: call it off the event loop."""

    def __init__(self, maildir: Path, quota: Quota = Quota()) -> None:
        self.dir = maildir / "sieve"
        self.quota = quota

    def _path(self, name: str) -> Path:
        return self.dir / encode_name(name)

    def list(self) -> list[tuple[str, bool]]:
        """Every script as (name, is_active), sorted by name."""
        active = self.active_name()
        try:
            files = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        names = sorted(n for n in (decode_name(f) for f in files) if n is not None)
        return [(n, n == active) for n in names]

    def get(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise ScriptError("NONEXISTENT", "there is no script by that name") from None

    def active_name(self) -> str | None:
        try:
            target = os.readlink(self.dir / ACTIVE)
        except (FileNotFoundError, OSError):
            return None
        name = decode_name(os.path.basename(target))
        if name is None or not self._path(name).exists():
            return None  # a dangling link (the script deleted by hand) means no script
        return name

    def active_script(self) -> tuple[str, bytes, os.stat_result] | None:
        """The active script's name, text and stat (for a compiled-script cache keyed on
        inode, size and mtime), or None. One open through the link: no race with SETACTIVE."""
        link = self.dir / ACTIVE
        try:
            with open(link, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_size > self.quota.max_script_size:
                    return None  # grown by hand beyond the limit: not run (the caller logs)
                text = f.read(self.quota.max_script_size + 1)
            name = decode_name(os.path.basename(os.readlink(link))) or ""
        except (FileNotFoundError, NotADirectoryError):
            return None
        return name, text, st

    def put(self, name: str, text: bytes) -> None:
        """Store (or replace) a script, within the quota, durably."""
        self.check_room(name, len(text))
        make_dirs(self.dir)
        os.chmod(self.dir, 0o700)
        target = self._path(name)
        tmp = self.dir / f".tmp.{os.getpid()}.{target.name}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, text)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        fsync_dir(self.dir)

    def check_room(self, name: str, size: int) -> None:
        """HAVESPACE (RFC 5804 section 2.5): would a script of this size fit?"""
        q = self.quota
        check_name(name)
        if size > q.max_script_size:
            raise ScriptError("QUOTA/MAXSIZE", f"a script is at most {q.max_script_size} bytes")
        existing = {n: self._size(n) for n, _ in self.list()}
        if name not in existing and len(existing) >= q.max_scripts:
            raise ScriptError("QUOTA/MAXSCRIPTS", f"at most {q.max_scripts} scripts")
        if sum(existing.values()) - existing.get(name, 0) + size > q.max_storage:
            raise ScriptError("QUOTA/MAXSIZE", f"all scripts together are at most "
                              f"{q.max_storage} bytes")

    def _size(self, name: str) -> int:
        try:
            return self._path(name).stat().st_size
        except FileNotFoundError:
            return 0

    def set_active(self, name: str | None) -> None:
        """Make ``name`` the active script; None (SETACTIVE "") deactivates."""
        link = self.dir / ACTIVE
        if name is None:
            try:
                os.unlink(link)
                fsync_dir(self.dir)
            except FileNotFoundError:
                pass
            return
        target = self._path(name)
        if not target.exists():
            raise ScriptError("NONEXISTENT", "there is no script by that name")
        tmp = self.dir / f".active.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(target.name, tmp)
        os.replace(tmp, link)
        fsync_dir(self.dir)

    def delete(self, name: str) -> None:
        if self.active_name() == name:
            raise ScriptError("ACTIVE", "the active script cannot be deleted")
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            raise ScriptError("NONEXISTENT", "there is no script by that name") from None
        fsync_dir(self.dir)

    def rename(self, old: str, new: str) -> None:
        src, dst = self._path(old), self._path(new)
        if not src.exists():
            raise ScriptError("NONEXISTENT", "there is no script by that name")
        if dst.exists():
            raise ScriptError("ALREADYEXISTS", "a script by the new name exists")
        was_active = self.active_name() == old
        os.link(src, dst)  # never replaces: a concurrent PUTSCRIPT of `new` is not lost
        if was_active:
            self.set_active(new)
        os.unlink(src)
        fsync_dir(self.dir)
