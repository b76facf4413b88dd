"""Moves that never replace a file, and directory fsync."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailfort.store import durable


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
