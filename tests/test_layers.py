"""The layers read bottom-up (ARCHITECTURE.md): a module never imports one it must not.

The imports are read from the source with ``ast`` (every ``import``/``from ... import``,
including the ones under ``if TYPE_CHECKING:`` and inside functions), so a forbidden edge
fails here even when it is only taken at run time on some path. Each rule is one row of
``RULES``: the packages (or modules) it applies to, and the ones they must not import.
Add a row for a new rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mailfort

PKG = Path(mailfort.__file__).resolve().parent

# (importers, forbidden): a module under one of ``importers`` imports nothing under one
# of ``forbidden``. Names are dotted, relative to ``mailfort``; a name covers the module
# and everything under it.
RULES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    # 26.1: the production server knows policies (server/profile.py), not the lab.
    (("server", "policy", "protocol"), ("lab",)),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` names in an import statement, as absolute dotted names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            found.add(stem)
            found.update(f"{stem}.{alias.name}" for alias in node.names)  # from pkg import mod
    return found


def _under(name: str, prefix: str) -> bool:
    full = f"mailfort.{prefix}"
    return name == full or name.startswith(full + ".")


def _sources() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize(("importers", "forbidden"), RULES,
                         ids=[f"{'+'.join(i)}-not-{'+'.join(f)}" for i, f in RULES])
def test_no_forbidden_import(importers: tuple[str, ...], forbidden: tuple[str, ...]) -> None:
    bad = []
    for path in _sources():
        name = _module_name(path)
        if not any(_under(name, i) for i in importers):
            continue
        for imported in sorted(_imports(path)):
            if any(_under(imported, f) for f in forbidden):
                bad.append(f"{name} imports {imported}")
    assert not bad, "\n".join(bad)


def test_the_walk_sees_an_import() -> None:
    """The rule can fail: the walk finds the lab's own import of the server."""
    assert "mailfort.server.app" in _imports(PKG / "lab" / "harness.py")
    assert any(_under(n, "server") for n in _imports(PKG / "lab" / "profile.py"))


def test_the_plan_lists_every_listener() -> None:
    """server/node_plan.py is the one list of services: the keys privileges and socket
    activation check are the same, in the same order."""
    from mailfort.server.node_plan import LISTENERS
    from mailfort.server.privileges import LISTEN_KEYS

    assert tuple(p.name for p in LISTENERS) == LISTEN_KEYS
