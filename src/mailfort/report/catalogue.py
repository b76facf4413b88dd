"""Explanations as data: one module per language in a catalogue package, loaded by name.

The audit and the lab each keep a catalogue package (``en``, ``ja``) of their own words;
they share the languages, how a module is found and how a sentence's fields are filled.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from importlib import import_module
from types import ModuleType
from typing import Any

LANGUAGES = ("en", "ja")


def loader(package: str) -> Callable[[str], ModuleType]:
    """``load(lang)`` for the catalogue package ``package`` (its modules named by language)."""

    def load(lang: str) -> ModuleType:
        if lang not in LANGUAGES:
            raise ValueError(f"unknown language {lang!r} (have: {', '.join(LANGUAGES)})")
        return import_module(f"{package}.{lang}")

    return load


class _Missing(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "?"


def _word(cat: ModuleType, value: Any) -> Any:
    """A field's value in the catalogue's language: a bool is the catalogue's yes/no (never
    Python's ``True``), a list of parts ``(key, params)`` is each part's sentence, joined."""
    if isinstance(value, bool):
        return cat.UI["yes" if value else "no"]
    if isinstance(value, list) and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        return cat.UI["list_sep"].join(note(cat, k, p) for k, p in value)
    return value


def note(cat: ModuleType, key: str, params: dict[str, Any]) -> str:
    """The sentence for ``key`` with its fields filled; the key itself if unknown.

    A field the probe did not give reads ``?``: a report is never lost to a missing value.
    Every word comes from the catalogue: bools and sentence parts are told in its language.
    """
    template = cat.NOTES.get(key, key)
    filled = {name: _word(cat, value) for name, value in params.items()}
    return string.Formatter().vformat(template, (), _Missing(filled))
