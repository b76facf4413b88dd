"""The on-disk Sieve script store: names that cannot escape, quotas, atomic activation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailfort.store.sieve_scripts import (
    Quota,
    ScriptError,
    ScriptStore,
    decode_name,
    encode_name,
)


@given(st.text(min_size=1, max_size=40).filter(
    lambda s: not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029"
                      for c in s)))
def test_every_name_encodes_to_one_plain_file_name_and_back(name: str) -> None:
    enc = encode_name(name)
    assert "/" not in enc and not enc.startswith(".") and enc.isascii()
    assert decode_name(enc) == name


@pytest.mark.parametrize("name", ["", "a\r\nb", "x" * 129, "tab\there"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ScriptError):
        encode_name(name)


def test_put_activate_read_rename_delete(tmp_path: Path) -> None:
    s = ScriptStore(tmp_path / "u")
    assert s.list() == [] and s.active_script() is None
    s.put("../../etc/passwd", b"keep;\r\n")
    s.put("vacation", b"discard;\r\n")
    assert sorted(os.listdir(s.dir)) == ["%2E%2E%2F%2E%2E%2Fetc%2Fpasswd.sieve",
                                         "vacation.sieve"]
    s.set_active("vacation")
    name, text, _ = s.active_script() or ("", b"", None)
    assert (name, text) == ("vacation", b"discard;\r\n")
    with pytest.raises(ScriptError) as e:
        s.delete("vacation")
    assert e.value.code == "ACTIVE"
    s.rename("vacation", "away")
    assert s.list() == [("../../etc/passwd", False), ("away", True)]
    with pytest.raises(ScriptError) as e:
        s.rename("away", "../../etc/passwd")
    assert e.value.code == "ALREADYEXISTS"
    s.set_active(None)
    assert s.active_script() is None
    s.delete("away")
    assert s.list() == [("../../etc/passwd", False)]
    with pytest.raises(ScriptError) as e:
        s.get("away")
    assert e.value.code == "NONEXISTENT"


def test_quotas_refuse_before_writing(tmp_path: Path) -> None:
    s = ScriptStore(tmp_path / "u", Quota(max_script_size=10, max_scripts=2, max_storage=15))
    with pytest.raises(ScriptError) as e:
        s.put("a", b"x" * 11)
    assert e.value.code == "QUOTA/MAXSIZE" and s.list() == []
    s.put("a", b"x" * 10)
    with pytest.raises(ScriptError) as e:
        s.put("b", b"x" * 6)
    assert e.value.code == "QUOTA/MAXSIZE"
    s.put("b", b"x" * 5)
    s.put("a", b"y" * 10)  # replacing counts the new size, not both
    with pytest.raises(ScriptError) as e:
        s.put("c", b"")
    assert e.value.code == "QUOTA/MAXSCRIPTS"


def test_a_script_grown_past_the_limit_by_hand_is_not_run(tmp_path: Path) -> None:
    s = ScriptStore(tmp_path / "u", Quota(max_script_size=10, max_storage=100))
    s.put("a", b"keep;")
    s.set_active("a")
    (s.dir / "a.sieve").write_bytes(b"x" * 11)
    assert s.active_script() is None
