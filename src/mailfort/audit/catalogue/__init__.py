"""Explanations, fixes and result notes as data: one catalogue per language.

Each catalogue module defines ``CHECKS`` (per check id: title, why, fix, and a
Postfix-specific ``postfix`` fix), ``NOTES`` (result sentences with ``{named}`` fields)
and ``UI`` (words of the reports). A test keeps the languages' keys identical.
"""

from __future__ import annotations

import string
from types import ModuleType
from typing import Any

LANGUAGES = ("en", "ja")


def load(lang: str) -> ModuleType:
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r} (have: {', '.join(LANGUAGES)})")
    from importlib import import_module

    return import_module(f"mailfort.audit.catalogue.{lang}")


class _Missing(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "?"


def note(cat: ModuleType, key: str, params: dict[str, Any]) -> str:
    """The sentence for ``key`` with its fields filled; the key itself if unknown."""
    template = cat.NOTES.get(key, key)
    return string.Formatter().vformat(template, (), _Missing(params))
