"""Explanations, fixes and result notes as data: one catalogue per language.

Each catalogue module defines ``CHECKS`` (per check id: title, why, fix, and a
Postfix-specific ``postfix`` fix), ``NOTES`` (result sentences with ``{named}`` fields)
and ``UI`` (words of the reports). A test keeps the languages' keys identical. Loading and
filling are shared with the lab (:mod:`mailfort.report.catalogue`).
"""

from __future__ import annotations

from mailfort.report.catalogue import LANGUAGES, loader, note

__all__ = ["LANGUAGES", "load", "note"]

load = loader(__name__)
