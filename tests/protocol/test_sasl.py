"""The shared SASL pieces (protocol/sasl.py): response decoding and PLAIN, one rule for
SMTP AUTH and POP3 AUTH."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from hypothesis import given, settings
from hypothesis import strategies as st

from mailfort.directory.sqlite import SQLiteDirectory
from mailfort.passwords import hash_password
from mailfort.protocol.sasl import (
    PlainCredentials,
    SaslError,
    decode_response,
    decode_text,
    identity_key,
    parse_plain,
)
from tests.fuzzing import examples

ALICE = "alice@example.test"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"*", SaslError.CANCELLED),
        (b"=", b""),
        (b"", b""),
        (base64.b64encode(b"\0a\0b"), b"\0a\0b"),
        (b"AGFsaWNlAHB3", b"\0alice\0pw"),
        (b"AGFsaWNlAHB3\xc3\xa9", SaslError.BAD_BASE64),  # UTF-8 after valid base64
        ("\u00e9".encode(), SaslError.BAD_BASE64),
        (b"\xff\xfe", SaslError.BAD_BASE64),
        (b"AGFs aWNl", SaslError.BAD_BASE64),  # no white space inside
        (b"AGFsaWNlAHB", SaslError.BAD_BASE64),  # bad padding
        (b"**", SaslError.BAD_BASE64),
    ],
)
def test_decode_response(line: bytes, expected: bytes | SaslError) -> None:
    assert decode_response(line) == expected


def test_decode_text_wants_utf8() -> None:
    assert decode_text(base64.b64encode("j\u00fcrgen".encode())) == "j\u00fcrgen"
    assert decode_text(base64.b64encode(b"\xff")) is SaslError.BAD_BASE64
    assert decode_text(b"*") is SaslError.CANCELLED


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (b"\0alice@example.test\0pw", PlainCredentials(ALICE, "pw")),
        (b"alice@example.test\0alice@example.test\0pw", PlainCredentials(ALICE, "pw")),
        # the same account in another spelling: the directory would find the same user
        (b"ALICE@Example.TEST.\0alice@example.test\0pw", PlainCredentials(ALICE, "pw")),
        (b"alice@example.test\0Alice@EXAMPLE.test\0pw",
         PlainCredentials("Alice@EXAMPLE.test", "pw")),
        ("\0j\u00fcrgen@example.test\0p\u00e4ss".encode(),
         PlainCredentials("j\u00fcrgen@example.test", "p\u00e4ss")),
        # another account: no proxy authorization
        (b"bob@example.test\0alice@example.test\0pw", SaslError.NOT_AUTHORIZED),
        (b"alice@example.org\0alice@example.test\0pw", SaslError.NOT_AUTHORIZED),
        (b"alice\0alice@example.test\0pw", SaslError.NOT_AUTHORIZED),
        # malformed
        (b"", SaslError.MALFORMED),
        (b"\0alice@example.test", SaslError.MALFORMED),
        (b"\0\0pw", SaslError.MALFORMED),  # empty authcid
        (b"\0alice@example.test\0", SaslError.MALFORMED),  # empty password
        (b"\0alice@example.test\0pw\0x", SaslError.MALFORMED),  # four parts
        (b"\0al\xffice@example.test\0pw", SaslError.MALFORMED),  # not UTF-8
    ],
)
def test_parse_plain(message: bytes, expected: PlainCredentials | SaslError) -> None:
    assert parse_plain(message) == expected


def test_password_is_not_in_repr() -> None:
    assert "hunter2" not in repr(PlainCredentials(ALICE, "hunter2"))


# ------------------------------------------------------------------ against the directory

@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SQLiteDirectory]:
    d = SQLiteDirectory(Path(tmp_path_factory.mktemp("dir")) / "directory.sqlite3")
    d.add_domain("example.test")
    d.add_user(ALICE, hash_password("pw", hasher=PasswordHasher(1, 1024, 1)))
    yield d
    d.close()


# What a client can send: names come from decoding UTF-8, so never a lone surrogate.
_CHAR = st.characters(exclude_categories=("Cs",))


def _spellings() -> st.SearchStrategy[str]:
    """ALICE with its case changed, white space around, a trailing dot, or a few edits."""
    flips = st.lists(st.booleans(), min_size=len(ALICE), max_size=len(ALICE)).map(
        lambda bs: "".join(c.upper() if b else c for c, b in zip(ALICE, bs, strict=True)))
    pad = st.sampled_from(["", " ", "\t", "  "])
    dot = st.sampled_from(["", ".", ".."])
    variant = st.tuples(pad, flips, dot, pad).map("".join)
    edited = st.tuples(flips, st.integers(0, len(ALICE) - 1), _CHAR).map(
        lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + 1:])
    return st.one_of(variant, edited, st.text(max_size=25))


@settings(max_examples=examples(300), deadline=None)
@given(_spellings())
def test_identity_key_is_the_directory_s_idea_of_the_same_account(
    directory: SQLiteDirectory, name: str
) -> None:
    """An authzid passes exactly when the real directory finds the authcid's account by it."""
    same_key = identity_key(name) == identity_key(ALICE)
    assert same_key == (directory.canonical_user(name) == ALICE), name
    creds = parse_plain(f"{name}\0{ALICE}\0pw".encode()) if name and "\0" not in name else None
    if creds is not None and name.strip():
        assert (creds == PlainCredentials(ALICE, "pw")) == same_key
