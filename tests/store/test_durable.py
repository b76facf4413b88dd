"""Moves that never replace a file, and directory fsync."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailfort.store import durable


def test_rename_no_replace_moves_and_refuses_to_overwrite(tmp_path: Path) -> None:
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


def test_fallback_without_renameat2_behaves_the_same(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durable, "_RENAMEAT2", None)  # as on a libc without renameat2
    test_rename_no_replace_moves_and_refuses_to_overwrite(tmp_path)


def test_fsync_dir(tmp_path: Path) -> None:
    durable.fsync_dir(tmp_path)
    with pytest.raises(NotADirectoryError):
        (tmp_path / "f").write_bytes(b"")
        durable.fsync_dir(tmp_path / "f")
