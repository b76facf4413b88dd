"""The lab's explanations as data: one catalogue per language (``en``, ``ja``).

Each module defines ``ATTACKS`` (per attack: ``title``; ``summary`` for ``--list``;
``attack``, what the attacker does; ``counter``, the countermeasure and where in mailfort
it lives), ``NOTES`` (consequence sentences with ``{named}`` fields, read from the capture
points) and ``UI`` (words of the reports). A test keeps the languages' keys identical.
Loading and filling are shared with the audit (:mod:`mailfort.report.catalogue`).
"""

from __future__ import annotations

from types import ModuleType

from mailfort import weaknesses
from mailfort.report.catalogue import LANGUAGES, loader, note

__all__ = ["LANGUAGES", "WEAKNESS", "load", "note"]

# Which weakness of the one table (mailfort.weaknesses) each attack shows. Not language
# data, so it is said once here; ``load`` gives each attack its ``row``, the weakness's
# number, which the reports mark ①, ②, ...
WEAKNESS: dict[str, str] = {
    "one-door": "one-door",
    "open-relay": "open-relay",
    "spoofing": "open-relay",
    "backscatter": "backscatter",
    "vacation-backscatter": "backscatter",
    "sniff": "plaintext",
    "vrfy": "disclosure",
    "smuggling": "smuggling",
    "overflow": "overflow",
    "guessing": "guessing",
}

_load = loader(__name__)


def load(lang: str) -> ModuleType:
    cat = _load(lang)
    for name, text in cat.ATTACKS.items():
        text["row"] = weaknesses.by_key(WEAKNESS[name]).number
    return cat
