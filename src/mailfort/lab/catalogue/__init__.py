"""The lab's explanations as data: one catalogue per language (``en``, ``ja``).

Each module defines ``ATTACKS`` (per attack: ``title``; ``row``, the number of the
weakness in the syllabus, 1-5, or + for smuggling; ``summary`` for ``--list``; ``attack``,
what the attacker does; ``counter``, the countermeasure and where in mailfort it lives),
``NOTES`` (consequence sentences with ``{named}`` fields, read from the capture points) and
``UI`` (words of the reports). A test keeps the languages' keys identical.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

# The same languages and the same sentence filling as the audit's catalogues.
from mailfort.audit.catalogue import LANGUAGES, note

__all__ = ["LANGUAGES", "load", "note"]


def load(lang: str) -> ModuleType:
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r} (have: {', '.join(LANGUAGES)})")
    return import_module(f"mailfort.lab.catalogue.{lang}")
