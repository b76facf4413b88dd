"""The JSON report's schema is enforced by its validator (which can say no)."""

from __future__ import annotations

import copy
from typing import Any

from mailfort.audit.schema import SCHEMA, validate

GOOD: dict[str, Any] = {
    "schema": "mailfort-audit/1", "tool": "mailfort audit", "lang": "en",
    "target": {"host": "127.0.0.1", "ports": {"smtp": 25}, "open_ports": {"smtp": 25},
               "domain": None, "user": None, "software": None},
    "started": "2026-01-01T00:00:00+00:00", "duration_s": 1.5,
    "summary": {"FAIL": 1, "WARN": 0, "INCONCLUSIVE": 0, "PASS": 0, "SKIP": 0},
    "exit_status": 1,
    "checks": [{"id": "relay.open", "row": "2", "title": "t", "status": "FAIL",
                "result": "r", "note_key": "relay.accepted", "evidence": ["> RCPT"],
                "why": "w", "fix": "f", "fix_postfix": None, "duration_s": 0.1}],
}


def test_a_good_report_validates() -> None:
    assert validate(GOOD) == []
    assert SCHEMA["properties"]["schema"]["const"] == "mailfort-audit/1"


def test_the_validator_finds_each_kind_of_error() -> None:
    bad = copy.deepcopy(GOOD)
    del bad["summary"]
    bad["checks"][0]["status"] = "MAYBE"
    bad["checks"][0]["evidence"] = "not a list"
    bad["checks"][0]["extra"] = 1
    bad["target"]["ports"]["smtp"] = "25"
    bad["exit_status"] = True  # a bool is not an integer status
    errors = validate(bad)
    assert "$: missing summary" in errors
    assert any(e.startswith("$.checks[0].status:") for e in errors)
    assert any(e.startswith("$.checks[0].evidence: expected array") for e in errors)
    assert "$.checks[0]: unexpected extra" in errors
    assert any(e.startswith("$.target.ports.smtp: expected integer") for e in errors)
    assert any(e.startswith("$.exit_status") for e in errors)
