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

import secrets
from functools import lru_cache

from argon2 import PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError

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
    """True only when ``password`` matches; a malformed hash is simply a mismatch."""
    if len(password) > MAX_PASSWORD_LENGTH:
        return False
    try:
        return (hasher or DEFAULT_HASHER).verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


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
