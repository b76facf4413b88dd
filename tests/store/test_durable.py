"""Moves that never replace a file, and directory fsync."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailfort.store import durable
from tests.store.fsyncs import fsynced

__all__ = ["fsynced"]


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "link-unlink"])
def test_rename_no_replace_moves_and_refuses_to_overwrite(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renameat2: bool) -> None:
    if not renameat2:
        monkeypatch.setattr(durable, "_RENAMEAT2", None)  # as on a libc without renameat2
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a.write_bytes(b"A")
    b.write_bytes(b"B")
    with pytest.raises(FileExistsError):
        durable.rename_no_replace(str(a), str(b))
    assert a.read_bytes() == b"A" and b.read_bytes() == b"B"
    durable.rename_no_replace(str(a), str(c))
    assert not a.exists() and c.read_bytes() == b"A"
    with pytest.raises(FileNotFoundError):
        durable.rename_no_replace(str(a), str(tmp_path / "d"))


def test_fsync_dir(tmp_path: Path) -> None:
    durable.fsync_dir(tmp_path)
    with pytest.raises(NotADirectoryError):
        (tmp_path / "f").write_bytes(b"")
        durable.fsync_dir(tmp_path / "f")


def test_make_dirs_fsyncs_the_parent_of_every_directory_it_creates(
        tmp_path: Path, fsynced: list[Path]) -> None:
    (tmp_path / "a").mkdir()
    created = durable.make_dirs(tmp_path / "a" / "b" / "c")
    assert created == [tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"]
    assert (tmp_path / "a" / "b" / "c").is_dir()
    # a/b's name lives in a/, c's in a/b/: both must be on disk before anything relies on them
    assert set(fsynced) >= {tmp_path / "a", tmp_path / "a" / "b"}
    fsynced.clear()
    assert durable.make_dirs(tmp_path / "a" / "b" / "c") == []  # nothing new, nothing to sync
    assert fsynced == []
