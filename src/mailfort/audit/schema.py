"""The documented, stable shape of ``mailfort audit --json`` and a small validator.

The schema is a JSON Schema (draft 2020-12 subset) kept as a dict, so that it can be
published as-is; :func:`validate` checks the subset it uses (type, required, properties,
additionalProperties, items, enum, const) without a dependency.
"""

from __future__ import annotations

from typing import Any

from mailfort import weaknesses
from mailfort.audit.registry import STATUSES

_STR_OR_NULL = {"type": ["string", "null"]}

CHECK = {
    "type": "object",
    "required": ["id", "row", "title", "status", "result", "note_key", "evidence", "why",
                 "fix", "fix_postfix", "duration_s"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string"},
        "row": {"enum": list(weaknesses.NUMBERS)},  # the number in the one weakness table
        "title": {"type": "string"},
        "status": {"enum": list(STATUSES)},
        "result": {"type": "string"},
        "note_key": {"type": "string"},
        "evidence": {"type": "array", "items": {"type": "string"}},
        "why": {"type": "string"},
        "fix": {"type": "string"},
        "fix_postfix": _STR_OR_NULL,
        "duration_s": {"type": "number"},
    },
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "mailfort audit report",
    "type": "object",
    "required": ["schema", "tool", "lang", "target", "started", "duration_s", "summary",
                 "exit_status", "checks"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": "mailfort-audit/1"},
        "tool": {"const": "mailfort audit"},
        "lang": {"enum": ["en", "ja"]},
        "target": {
            "type": "object",
            "required": ["host", "ports", "open_ports", "domain", "user", "software"],
            "additionalProperties": False,
            "properties": {
                "host": {"type": "string"},
                "ports": {"type": "object", "additionalProperties": {"type": "integer"}},
                "open_ports": {"type": "object", "additionalProperties": {"type": "integer"}},
                "domain": _STR_OR_NULL,
                "user": _STR_OR_NULL,
                "software": _STR_OR_NULL,
            },
        },
        "started": {"type": "string"},
        "duration_s": {"type": "number"},
        "summary": {
            "type": "object",
            "required": list(STATUSES),
            "additionalProperties": False,
            "properties": {s: {"type": "integer"} for s in STATUSES},
        },
        "exit_status": {"enum": [0, 1, 3]},  # 2 (usage) never gets a report
        "checks": {"type": "array", "items": CHECK},
    },
}

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "integer": (int,),
    "number": (int, float), "null": (type(None),), "boolean": (bool,),
}


def validate(doc: Any, schema: dict[str, Any] = SCHEMA, path: str = "$") -> list[str]:
    """Every way ``doc`` departs from ``schema``, as 'path: problem' lines."""
    errors: list[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(isinstance(doc, _TYPES[t]) and not (t in ("integer", "number")
                                                       and isinstance(doc, bool))
                 for t in types)
        if not ok:
            return [f"{path}: expected {'/'.join(types)}, got {type(doc).__name__}"]
    if "const" in schema and doc != schema["const"]:
        errors.append(f"{path}: expected {schema['const']!r}")
    if "enum" in schema and not any(doc == v and type(doc) is type(v)
                                    for v in schema["enum"]):  # True is not 1
        errors.append(f"{path}: {doc!r} not one of {schema['enum']}")
    if isinstance(doc, dict):
        for key in schema.get("required", []):
            if key not in doc:
                errors.append(f"{path}: missing {key}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, value in doc.items():
            if key in props:
                errors += validate(value, props[key], f"{path}.{key}")
            elif extra is False:
                errors.append(f"{path}: unexpected {key}")
            elif isinstance(extra, dict):
                errors += validate(value, extra, f"{path}.{key}")
    if isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            errors += validate(item, schema["items"], f"{path}[{i}]")
    return errors
