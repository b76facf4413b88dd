"""Terminal text by display width: Japanese lines up in the same columns as English."""

from __future__ import annotations

from mailfort.report.text import cut, pad, width, wrap


def test_cjk_takes_two_columns() -> None:
    assert width("abc") == 3 and width("第三者") == 6
    assert pad("中継", 6) == "中継  " and pad("toolong", 3) == "toolong"


def test_cut_fills_or_shortens_to_the_columns() -> None:
    assert cut("abc", 5) == "abc  "
    assert cut("abcdef", 4) == "abc…"
    assert width(cut("第三者中継", 7)) <= 7


def test_wrap_by_words_or_by_characters() -> None:
    assert wrap("one two three", 7) == ["one two", "three"]
    assert all(width(line) <= 6 for line in wrap("第三者中継を拒否する", 6))
    assert "".join(wrap("第三者中継を拒否する", 6)) == "第三者中継を拒否する"
