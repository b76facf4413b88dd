"""The lab's explanations as data: one catalogue per language (``en``, ``ja``).

Each module defines ``ATTACKS`` (per attack: ``title``; ``row``, the number of the
weakness in the syllabus, 1-5, or + for smuggling; ``summary`` for ``--list``; ``attack``,
what the attacker does; ``counter``, the countermeasure and where in mailfort it lives),
``NOTES`` (consequence sentences with ``{named}`` fields, read from the capture points) and
``UI`` (words of the reports). A test keeps the languages' keys identical.
"""

from __future__ import annotations

import string
from importlib import import_module
from types import ModuleType
from typing import Any

LANGUAGES = ("en", "ja")


def load(lang: str) -> ModuleType:
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r} (have: {', '.join(LANGUAGES)})")
    return import_module(f"mailfort.lab.catalogue.{lang}")


class _Missing(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "?"


def note(cat: ModuleType, key: str, params: dict[str, Any]) -> str:
    template = cat.NOTES.get(key, key)
    return string.Formatter().vformat(template, (), _Missing(params))
