"""argon2id password hashing (argon2-cffi) for the directory and the authenticator.

Production uses argon2id with m=19 MiB, t=2 (the OWASP minimum for argon2id) in two lanes
(p=2). A mail server checks a password at every POP3 login and SMTP AUTH, often from many
clients at once; this profile keeps that close to what other mail servers spend while still
costing an offline attacker a memory-hard hash per guess. Why two lanes: an attacker's cost
per guess is the same memory x passes whatever the lane count (lanes are just work that can
run side by side, and an attacker runs guesses side by side anyway), while the server gets
its answer in about 11 ms instead of 17 ms on two cores, for about 15% more CPU per check.
Hashes made with other parameters still verify and are upgraded at the next successful
login (``needs_rehash``). Tests pass a cheaper ``PasswordHasher``. ``DUMMY_HASH`` lets a
login for an unknown user cost exactly what a wrong password costs, so response time does
not reveal which accounts exist.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import mmap
import secrets
import threading
import time
from functools import lru_cache

from argon2 import PasswordHasher, Type, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError
from argon2.low_level import core, ffi, lib  # argon2_ctx itself: it takes an allocator

DEFAULT_HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=2)

# Made once with DEFAULT_HASHER from a random throw-away password; nobody can log in with
# it, and verifying against it costs what a real check costs.
DUMMY_HASH = (
    "$argon2id$v=19$m=19456,t=2,p=2$O6kaoa3oOwh0bx+m2w6fHg$"
    "gqg3lC/HxP/Pb6Wdx5vGawvEqB54uKkbXUDPp4eMYmA"
)

# Longer "passwords" are refused before hashing: no real password is this long and it
# keeps one request from buying unbounded CPU.
MAX_PASSWORD_LENGTH = 4096


def hash_password(password: str, *, hasher: PasswordHasher | None = None) -> str:
    """An argon2id hash of ``password`` (encoded with its salt and parameters)."""
    if not password:
        raise ValueError("empty password")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise ValueError(f"password longer than {MAX_PASSWORD_LENGTH} characters")
    return (hasher or DEFAULT_HASHER).hash(password)


def verify_password(
    password_hash: str, password: str, *, hasher: PasswordHasher | None = None
) -> bool:
    """True only when ``password`` matches; a malformed hash is simply a mismatch.

    An argon2id hash is computed in working memory kept between logins (``_Memory``);
    anything else goes through argon2-cffi's own ``verify``."""
    if len(password) > MAX_PASSWORD_LENGTH:
        return False
    matched = _verify_argon2id(password_hash, password.encode())
    if matched is not None:
        return matched
    try:
        return (hasher or DEFAULT_HASHER).verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


class _Memory:
    """argon2's working memory (19 MiB a hash with the default parameters), kept for
    ``KEEP`` seconds after a hash ends and reused by the next one.

    Why: the worker fixes glibc's mmap threshold (server/malloc.py), so that the 19 MiB
    go back to the kernel after each login instead of staying in an authenticator
    thread's arena for good; but then every hash maps fresh pages, and touching them
    took ~4,860 page faults and ~10 ms of CPU, about a third of a login's hash (bench/
    RESULTS.md, 2026-12-08). Logins come in runs (a client polling, a pool of sessions
    at once), so a block kept for a moment serves the next ones without a fault, and a
    node without logins still gives it back within ``KEEP`` seconds. At most ``SPARE``
    blocks are kept. What a block held is wiped by libargon2 before it hands the block
    back (its internal memory clearing, on by default), and a hash writes every block
    before reading it.
    """

    KEEP = 5.0  # seconds a spare block outlives its last use (an idle node: none kept)
    SPARE = 2  # blocks kept at most

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spare: list[tuple[float, int, mmap.mmap]] = []  # (freed at, size, block)
        self._lent: dict[int, tuple[mmap.mmap, object]] = {}  # address -> block, view
        self._timer: threading.Timer | None = None
        # An exception in the callback answers "no memory": the hash fails, never runs
        # without its memory.
        self.allocate = ffi.callback("int(uint8_t **, size_t)", self._allocate,
                                     error=lib.ARGON2_MEMORY_ALLOCATION_ERROR)
        self.free = ffi.callback("void(uint8_t *, size_t)", self._free)

    def _allocate(self, out: object, size: int) -> int:
        with self._lock:
            found = next((i for i, (_, n, _) in enumerate(self._spare) if n == size), None)
            block = self._spare.pop(found)[2] if found is not None else None
        try:
            if block is None:
                block = mmap.mmap(-1, size)
            view = ffi.from_buffer(block)
        except (OSError, ValueError, MemoryError):
            return lib.ARGON2_MEMORY_ALLOCATION_ERROR
        address = int(ffi.cast("uintptr_t", view))
        with self._lock:
            self._lent[address] = (block, view)
        out[0] = ffi.cast("uint8_t *", view)  # type: ignore[index]
        return lib.ARGON2_OK

    def _free(self, memory: object, size: int) -> None:
        with self._lock:
            block, view = self._lent.pop(int(ffi.cast("uintptr_t", memory)))
            del view
            evicted = self._spare.pop(0)[2] if len(self._spare) >= self.SPARE else None
            self._spare.append((time.monotonic(), size, block))
            block = evicted  # the oldest makes room: the latest size is the likeliest next
            if self._timer is None:
                self._timer = threading.Timer(self.KEEP, self._expire)
                self._timer.daemon = True
                self._timer.start()
        if block is not None:
            block.close()

    def _expire(self) -> None:
        """Give back the blocks unused for ``KEEP`` seconds; look again while any stay."""
        now = time.monotonic()
        with self._lock:
            old = [b for t, _, b in self._spare if now - t >= self.KEEP]
            self._spare = [e for e in self._spare if now - e[0] < self.KEEP]
            self._timer = None
            if self._spare:  # again when the oldest left is due
                self._timer = threading.Timer(
                    max(0.05, self._spare[0][0] + self.KEEP - now), self._expire)
                self._timer.daemon = True
                self._timer.start()
        for b in old:
            b.close()

    def spare(self) -> int:
        """Blocks kept now (tests)."""
        with self._lock:
            return len(self._spare)


_MEMORY = _Memory()
_MAX_MEMORY_KIB = 1 << 20  # a stored hash asking for more than 1 GiB is refused, not run


def _b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _verify_argon2id(password_hash: str, password: bytes) -> bool | None:
    """``password`` against an ``$argon2id$v=19$m=,t=,p=$salt$hash`` hash, in memory from
    ``_MEMORY``; None when the hash is not of that form (the caller's path decides)."""
    parts = password_hash.split("$")
    if len(parts) != 6 or parts[1] != "argon2id":
        return None
    try:
        params = extract_parameters(password_hash)
        salt, expected = _b64(parts[4]), _b64(parts[5])
    except (InvalidHashError, binascii.Error, ValueError):
        return None
    if params.type is not Type.ID or params.memory_cost > _MAX_MEMORY_KIB or not expected:
        return None
    out = ffi.new("uint8_t[]", len(expected))
    pwd = ffi.new("uint8_t[]", password)
    csalt = ffi.new("uint8_t[]", salt)
    ctx = ffi.new("argon2_context *", {
        "out": out, "outlen": len(expected), "pwd": pwd, "pwdlen": len(password),
        "salt": csalt, "saltlen": len(salt), "secret": ffi.NULL, "secretlen": 0,
        "ad": ffi.NULL, "adlen": 0, "t_cost": params.time_cost, "m_cost": params.memory_cost,
        "lanes": params.parallelism, "threads": params.parallelism, "version": params.version,
        "allocate_cbk": _MEMORY.allocate, "free_cbk": _MEMORY.free,
        "flags": lib.ARGON2_DEFAULT_FLAGS})
    if core(ctx, Type.ID.value) != lib.ARGON2_OK:
        return None  # parameters libargon2 refuses: argon2-cffi's verify says the same
    return hmac.compare_digest(ffi.buffer(out)[:], expected)


def needs_rehash(password_hash: str, *, hasher: PasswordHasher | None = None) -> bool:
    """Whether the hash was made with other parameters than the hasher's current ones."""
    try:
        return (hasher or DEFAULT_HASHER).check_needs_rehash(password_hash)
    except InvalidHashError:
        return True


@lru_cache(maxsize=8)
def _dummy_for(time_cost: int, memory_cost: int, parallelism: int, hash_len: int,
               salt_len: int) -> str:
    ph = PasswordHasher(time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism,
                        hash_len=hash_len, salt_len=salt_len)
    return ph.hash(secrets.token_urlsafe(32))


def dummy_hash(hasher: PasswordHasher | None = None) -> str:
    """A hash with the hasher's parameters to verify against when the user is unknown."""
    if hasher is None or hasher is DEFAULT_HASHER:
        return DUMMY_HASH
    p = extract_parameters(DUMMY_HASH)
    if (hasher.time_cost, hasher.memory_cost, hasher.parallelism) == (
        p.time_cost, p.memory_cost, p.parallelism
    ):
        return DUMMY_HASH
    return _dummy_for(hasher.time_cost, hasher.memory_cost, hasher.parallelism,
                      hasher.hash_len, hasher.salt_len)
