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
