"""argon2id hashing with real argon2-cffi."""

from __future__ import annotations

import time

import pytest
from argon2 import PasswordHasher, extract_parameters
from argon2.low_level import Type

from mailfort.passwords import (
    DEFAULT_HASHER,
    DUMMY_HASH,
    MAX_PASSWORD_LENGTH,
    dummy_hash,
    hash_password,
    needs_rehash,
    verify_password,
)

CHEAP = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def test_hash_is_argon2id_salted_and_verifies() -> None:
    h1 = hash_password("correct horse", hasher=CHEAP)
    h2 = hash_password("correct horse", hasher=CHEAP)
    assert h1.startswith("$argon2id$") and h1 != h2
    assert verify_password(h1, "correct horse", hasher=CHEAP)
    assert not verify_password(h1, "correct horsE", hasher=CHEAP)
    assert verify_password(h1, "correct horse")  # parameters come from the hash


def test_unicode_password() -> None:
    h = hash_password("пароль-パスワード", hasher=CHEAP)
    assert verify_password(h, "пароль-パスワード")
    assert not verify_password(h, "пароль")


def test_malformed_hash_and_oversized_password_are_mismatches() -> None:
    assert not verify_password("not-a-hash", "x")
    assert not verify_password("", "x")
    h = hash_password("p" * 10, hasher=CHEAP)
    assert not verify_password(h, "p" * (MAX_PASSWORD_LENGTH + 1))


def test_default_parameters_are_production_strength() -> None:
    p = extract_parameters(hash_password("x"))
    assert p.type is Type.ID
    # at least the OWASP argon2id minimum (19 MiB, 2 passes)
    assert p.memory_cost >= 19456 and p.time_cost >= 2


def test_dummy_hash_matches_default_parameters_and_nothing_verifies() -> None:
    assert extract_parameters(DUMMY_HASH) == DEFAULT_HASHER._parameters
    assert dummy_hash() == DUMMY_HASH
    for guess in ("", "dummy", "password", "mailfort-dummy-password"):
        assert not verify_password(DUMMY_HASH, guess)


def test_dummy_hash_for_cheap_hasher_costs_the_same() -> None:
    d = dummy_hash(CHEAP)
    assert extract_parameters(d) == extract_parameters(hash_password("x", hasher=CHEAP))
    assert dummy_hash(CHEAP) == d  # made once


def test_dummy_costs_about_a_real_check() -> None:
    real = hash_password("secret")

    def timed(h: str) -> float:
        t0 = time.perf_counter()
        for _ in range(3):
            verify_password(h, "wrong")
        return time.perf_counter() - t0

    t_real, t_dummy = timed(real), timed(DUMMY_HASH)
    assert 0.5 < t_dummy / t_real < 2.0


def test_needs_rehash() -> None:
    assert needs_rehash(hash_password("x", hasher=CHEAP))
    assert not needs_rehash(DUMMY_HASH)
    assert needs_rehash("garbage")


def test_empty_password_refused() -> None:
    with pytest.raises(ValueError):
        hash_password("")


_FAULTS = """
import resource, sys
from mailfort.passwords import DEFAULT_HASHER, verify_password
from mailfort.server.malloc import fix_mmap_threshold
assert fix_mmap_threshold()  # as every worker runs
h = DEFAULT_HASHER.hash("pw")
assert verify_password(h, "pw")
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    assert verify_password(h, "pw") and not verify_password(h, "wrong")
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


def test_back_to_back_logins_reuse_the_hash_memory_without_page_faults() -> None:
    """With the worker's fixed mmap threshold (server/malloc.py) every hash mapped 19 MiB
    afresh: ~4,860 page faults and ~10 ms of CPU a login, a third of the hash. Logins
    close together now reuse the block (passwords._Memory)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True,
                         check=True)
    assert int(out.stdout) < 500, out.stdout  # 19 MiB of 4 KiB pages would be ~4,860


def test_kept_hash_memory_is_given_back_when_logins_stop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mailfort import passwords

    monkeypatch.setattr(passwords._Memory, "KEEP", 0.1)
    assert verify_password(hash_password("pw", hasher=CHEAP), "pw")
    assert passwords._MEMORY.spare() >= 1
    deadline = time.monotonic() + 5
    while passwords._MEMORY.spare() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert passwords._MEMORY.spare() == 0


@pytest.mark.parametrize("hasher", [
    PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1),
    PasswordHasher(time_cost=2, memory_cost=2048, parallelism=2, hash_len=16, salt_len=8),
    PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1, type=Type.I),
])
def test_verify_agrees_with_argon2_cffi(hasher: PasswordHasher) -> None:
    h = hasher.hash("s3cret")
    for password in ("s3cret", "s3creT", "", "s3cret\0"):
        try:
            expected = hasher.verify(h, password)
        except Exception:
            expected = False
        assert verify_password(h, password) is expected, (h, password)
    for broken in (h[:-2], h.replace("$argon2", "$argon3"), h + "$", h.replace("m=", "m=x")):
        assert verify_password(broken, "s3cret") is False
