"""One registry of checks: id, the weakness it tests, the probe, its verdict.

A new check is one function decorated with :func:`check`. Probes return a
:class:`Verdict` whose ``note`` is a key into the language catalogues (with ``params``
to fill in), so probes stay free of prose and the same run reads in any language.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mailfort import weaknesses

if TYPE_CHECKING:
    from mailfort.audit.context import Context

PASS, FAIL, WARN, SKIP, INCONCLUSIVE = "PASS", "FAIL", "WARN", "SKIP", "INCONCLUSIVE"
STATUSES = (FAIL, WARN, INCONCLUSIVE, PASS, SKIP)  # also the order of the report


@dataclass
class Verdict:
    status: str
    note: str
    params: dict[str, Any] = field(default_factory=dict)


class Stop(Exception):
    """Raised by a probe to end with SKIP or INCONCLUSIVE and a note."""

    def __init__(self, status: str, note: str, **params: Any) -> None:
        super().__init__(note)
        self.verdict = Verdict(status, note, params)


def skip(note: str, **params: Any) -> Stop:
    return Stop(SKIP, note, **params)


def inconclusive(note: str, **params: Any) -> Stop:
    return Stop(INCONCLUSIVE, note, **params)


Part = tuple[str, dict[str, Any]]


def part(note: str, **params: Any) -> Part:
    """One piece of a note's list field (``[part(...), ...]``), itself a catalogue key:
    a finding made of several pieces is told in the report's language, piece by piece."""
    return note, params


Probe = Callable[["Context"], Verdict]


@dataclass(frozen=True)
class Check:
    id: str
    row: str  # the weakness's number in the one table, mailfort.weaknesses ("1", "+", ...)
    probe: Probe
    order: int


REGISTRY: dict[str, Check] = {}


def check(check_id: str, row: str, *, order: int = 50) -> Callable[[Probe], Probe]:
    """Register ``probe`` under ``check_id``; ``order`` places it in the run (liveness last)."""

    weaknesses.by_number(row)  # a row that is not in the table is a mistake: say so at import

    def register(probe: Probe) -> Probe:
        if check_id in REGISTRY:
            raise ValueError(f"duplicate check id {check_id}")
        REGISTRY[check_id] = Check(check_id, row, probe, order)
        return probe

    return register


def all_checks() -> list[Check]:
    """Every check, in run order (importing the check modules registers them)."""
    from mailfort.audit import checks  # noqa: F401  (registration side effect)

    return sorted(REGISTRY.values(), key=lambda c: (c.order, c.id))
