"""The one weakness table: README's table says what ``mailfort.weaknesses`` says, and the
audit's checks and the lab's attacks name only its rows."""

from __future__ import annotations

import re
from itertools import takewhile
from pathlib import Path

from mailfort import weaknesses

README = Path(__file__).resolve().parents[1] / "README.md"
SRC = Path(weaknesses.__file__).resolve().parent


def _readme_table() -> list[tuple[str, str]]:
    """(number, weakness) of each row of the README's weakness table."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## What mailfort does about each weakness\n", 1)[1]
    lines = section.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = list(takewhile(lambda line: line.startswith("|"), lines[first:]))
    assert re.split(r"\s*(?<!\\)\|\s*", table[0])[1:4] == ["#", "weakness", "behaviour"]
    rows = []
    for line in table[2:]:
        cells = re.split(r"\s*(?<!\\)\|\s*", line)  # a cell's own '|' is written '\|'
        rows.append((cells[1], cells[2]))
    return rows


def test_readme_table_is_the_module_table() -> None:
    assert _readme_table() == [(w.number, w.en) for w in weaknesses.TABLE]


def test_numbers_and_keys_are_unique_and_named_in_both_languages() -> None:
    assert len({w.number for w in weaknesses.TABLE}) == len(weaknesses.TABLE)
    assert len({w.key for w in weaknesses.TABLE}) == len(weaknesses.TABLE)
    assert all(w.en and w.ja for w in weaknesses.TABLE)
    assert weaknesses.by_number("3").key == "backscatter"
    assert weaknesses.by_key("smuggling").mark == "+"
    assert weaknesses.by_number("2").mark == "②"


def test_audit_checks_name_rows_of_the_table() -> None:
    from mailfort.audit.registry import all_checks

    numbers = {w.number for w in weaknesses.TABLE}
    assert {c.row for c in all_checks()} <= numbers


def test_no_design_notes_outside_the_repository_are_cited() -> None:
    """The table lives here; nothing points readers to a DESIGN.md they do not have."""
    cited = [p for p in [README, *SRC.rglob("*.py")]
             if re.search(r"DESIGN\.md", p.read_text(encoding="utf-8"))]
    assert cited == []
