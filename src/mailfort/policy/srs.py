"""SRS, the Sender Rewriting Scheme: forwarded mail leaves with an envelope sender of ours.

A forward (an alias of ours pointing at a remote address) that kept the outside sender
would fail SPF at the destination: we are not that sender's domain's server. So its
envelope sender is rewritten to an address of our forwarding domain that encodes the
original one, with a keyed hash and a day stamp::

    SRS0=HHHHHH=TT=origdomain=origlocal@forwarding.domain

``HHHHHH`` is HMAC-SHA256 (key from a secret file) over the rest, truncated to 30 bits in
base32; ``TT`` is the day (base32, modulo 1024). A bounce to that address comes back to us,
and only when the hash verifies with one of our keys and the day is at most
``max_age_days`` old does the MX accept it (for a null sender only) and send it on to the
original sender. Anything else is an unknown user: the address is never an open relay and
never a way to reach arbitrary addresses (backscatter).

Re-forwarding mail whose sender is already SRS (another forwarder's ``SRS0``, or an
``SRS1``) gives ``SRS1=HHHHHH=firsthop==HHH=TT=origdomain=origlocal@us``: only the first
forwarder's domain and its opaque part are kept, so the address does not grow per hop; a
bounce to it goes back to the first forwarder, which checks its own hash.

The key file (``<data_dir>/srs.key``, mode 0600) holds one base64 key per line: the first
signs, every line verifies. It is created on first use (by the service user, after the
privilege drop) and read again when it changes. To rotate: put a new key on the first line
and keep the old one below it for ``max_age_days`` (``rotate`` does both).

Written here rather than taken from PyPI: ``pysrs`` (last release 2018) and ``srslib`` are
single-maintainer packages built on HMAC-SHA1 with case-sensitive base64 hashes, without
key files, rotation or a bound on the local part's length; the scheme is about a hundred
lines, and every line of it is tested here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("mailfort.srs")

HASH_CHARS = 6  # base32 characters of the HMAC: 30 bits
DAY = 86400
STAMP_MODULUS = 1024  # two base32 characters
MAX_LOCAL_PART = 64  # RFC 5321 §4.5.3.1.1; our own MX refuses longer (a bounce could not return)
_B32 = "abcdefghijklmnopqrstuvwxyz234567"
_SRS = re.compile(r"srs[01]=", re.IGNORECASE)
# What may be carried inside an SRS local part unquoted: the dot-atom characters (ASCII).
_LOCAL_OK = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+")
_DOMAIN_OK = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


def is_srs(local_part: str) -> bool:
    """Whether a local part has the SRS0/SRS1 form (case does not matter)."""
    return _SRS.match(local_part) is not None


def _stamp(day: int) -> str:
    day %= STAMP_MODULUS
    return _B32[day >> 5] + _B32[day & 31]


def _stamp_day(text: str) -> int | None:
    text = text.lower()
    if len(text) != 2 or any(c not in _B32 for c in text):
        return None
    return (_B32.index(text[0]) << 5) | _B32.index(text[1])


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def _write_new(path: Path, text: str) -> None:
    """``text`` in a new file at ``path`` (0600), atomically; FileExistsError if there
    already is one (another worker process made it first: theirs is kept)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)  # fails if it exists: never replaces a key in use
    finally:
        tmp.unlink(missing_ok=True)


def rotate(path: Path) -> None:
    """A new signing key on the first line; the previous one kept (for bounces to addresses
    it signed); older ones dropped."""
    keys = _read_keys(path) if path.exists() else []
    text = "\n".join([new_key(), *keys[:1]]) + "\n"
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_keys(path: Path) -> list[str]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        text = f.read(64 * 1024).decode("ascii", "replace")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


@dataclass
class SRS:
    """Rewrites senders of forwarded mail and checks the addresses it made."""

    key_file: Path
    max_age_days: int = 21
    clock: Callable[[], float] = time.time
    _keys: list[bytes] = field(default_factory=list, repr=False)
    _seen: tuple[int, int] | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ keys

    def keys(self) -> list[bytes]:
        """The keys, first the signing one; the file is made on first use and read again
        whenever it changed (a rotation needs no restart)."""
        try:
            st = self.key_file.stat()
        except FileNotFoundError:
            self.key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                _write_new(self.key_file, new_key() + "\n")
                log.info("created the SRS key %s", self.key_file)
            except FileExistsError:
                pass
            st = self.key_file.stat()
        mark = (st.st_ino, st.st_mtime_ns)
        if mark != self._seen or not self._keys:
            keys = [k.encode() for k in _read_keys(self.key_file)]
            if not keys:
                raise ValueError(f"{self.key_file}: no SRS key in it")
            self._keys, self._seen = keys, mark
        return self._keys

    def _hash(self, key: bytes, data: str) -> str:
        digest = hmac.new(key, data.lower().encode("utf-8"), hashlib.sha256).digest()
        return base64.b32encode(digest).decode()[:HASH_CHARS].lower()

    def _verify(self, given: str, data: str) -> bool:
        given = given.lower()
        ok = False
        for key in self.keys():  # every key compared, in constant time each
            ok |= hmac.compare_digest(self._hash(key, data), given)
        return ok

    # ------------------------------------------------------------------ forward

    def forward(self, sender: str, domain: str) -> str | None:
        """The envelope sender for ``sender``'s mail forwarded through ``domain``; None
        when it stays as it is: the null sender, a sender that cannot be carried (not a
        plain ASCII dot-atom), or a result over 64 octets."""
        local, at, sdomain = sender.rpartition("@")
        if not sender or not at or not local:
            return None
        if not _LOCAL_OK.fullmatch(local) or not _DOMAIN_OK.fullmatch(sdomain):
            return None
        sign = self.keys()[0]
        if is_srs(local):
            if local[3] == "0":  # another forwarder's SRS0: SRS1 naming that forwarder
                first, opaque = sdomain, local[4:]  # opaque: "=HHH=TT=dom=local"
            else:  # SRS1=HHH=first==opaque: keep its first hop, sign it ourselves
                parts = local[5:].split("=", 2)
                if len(parts) < 3 or not parts[1] or not parts[2].startswith("="):
                    return None
                first, opaque = parts[1], parts[2]
            data = f"SRS1={first}={opaque}"
            out = f"SRS1={self._hash(sign, data)}={first}={opaque}"
        else:
            tt = _stamp(int(self.clock() // DAY))
            data = f"SRS0={tt}={sdomain}={local}"
            out = f"SRS0={self._hash(sign, data)}={tt}={sdomain}={local}"
        if len(out.encode()) > MAX_LOCAL_PART:
            return None
        return f"{out}@{domain}"

    # ------------------------------------------------------------------ reverse

    def reverse(self, local_part: str) -> str | None:
        """Where a bounce to our SRS address ``local_part@<ours>`` goes, or None unless its
        hash verifies with one of our keys (and, for SRS0, its day is recent enough)."""
        if not is_srs(local_part):
            return None
        kind, rest = local_part[3], local_part[5:]
        if kind == "0":
            parts = rest.split("=", 3)
            if len(parts) != 4 or not all(parts):
                return None
            given, tt, sdomain, local = parts
            day = _stamp_day(tt)
            if day is None or not _DOMAIN_OK.fullmatch(sdomain):
                return None
            age = (int(self.clock() // DAY) - day) % STAMP_MODULUS
            if age > self.max_age_days:
                return None
            if not self._verify(given, f"SRS0={tt}={sdomain}={local}"):
                return None
            return f"{local}@{sdomain}"
        parts = rest.split("=", 2)
        if len(parts) != 3 or not parts[0] or not parts[1] or not parts[2].startswith("="):
            return None
        given, first, opaque = parts
        if not _DOMAIN_OK.fullmatch(first) or len(opaque) < 2:
            return None
        if not self._verify(given, f"SRS1={first}={opaque}"):
            return None
        return f"SRS0{opaque}@{first}"


_INSTANCES: dict[tuple[str, int], SRS] = {}


def for_config(cfg: object) -> SRS | None:
    """The node's SRS (one per key file and age, shared by its services), None when
    ``srs.enabled`` is off."""
    from mailfort.config import Config

    assert isinstance(cfg, Config)
    if not cfg.srs.enabled:
        return None
    path = cfg.data_path / "srs.key"
    key = (str(path), cfg.srs.max_age_days)
    found = _INSTANCES.get(key)
    if found is None:
        found = _INSTANCES[key] = SRS(path, cfg.srs.max_age_days)
    return found
