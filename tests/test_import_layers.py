"""The house plan of src/mailfort, read from the code's own imports (ast, nothing imported).

Layers, bottom-up (issue 26): protocol, config, store/directory/policy, delivery, queue,
server, commands. A module imports its own layer or lower ones, never a higher one, and no
set of modules imports itself round. A new module is placed in ``LAYERS`` (the test says
where it is missing); an exception is a named row in ``KNOWN`` with the reason it remains.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# (layer, module prefixes), bottom-up; the longest prefix that matches places a module.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("protocol", ("mailfort.protocol",)),  # wire formats and engines: no I/O, no settings
    ("config", (  # settings, and the leaf helpers every floor above may use
        "mailfort", "mailfort.config", "mailfort.passwords", "mailfort.procid",
        "mailfort.logsetup", "mailfort.metrics", "mailfort.tls", "mailfort.acmecert",
        # a library (which certificate is served, described), read by `mailfort status`
        # in server/operations.py too: not a command module, whatever its folder
        "mailfort.tlsinfo",
        # the weakness table and what audit and lab share to print reports: data and text
        "mailfort.weaknesses", "mailfort.report",
    )),
    ("store", ("mailfort.store", "mailfort.directory", "mailfort.policy")),
    # delivery sends one message; the queue decides when and runs it (Postfix's qmgr and
    # smtp): a delivery module that must enqueue is handed a callable
    ("delivery", ("mailfort.delivery",)),
    ("queue", ("mailfort.queue",)),
    ("server", ("mailfort.server",)),
    ("commands", (
        "mailfort.__main__", "mailfort.cli", "mailfort.audit", "mailfort.lab",
    )),
]

# Circles allowed: a registry's own package (the checks register into audit/registry, which
# loads them). Any module of such a group may sit in one circle with the others.
ALLOWED_CYCLES: list[tuple[str, ...]] = [("mailfort.audit.checks", "mailfort.audit.context",
                                          "mailfort.audit.registry")]

# (importer, imported): upward imports that remain, each with the reason it may. None now.
KNOWN: dict[tuple[str, str], str] = {}
# Circles that remain besides the allowed ones. None now.
KNOWN_CYCLES: list[tuple[str, ...]] = []

# (importers, forbidden): beyond the floors, a module under one of ``importers`` imports
# nothing under one of ``forbidden`` (prefixes of dotted names).
RULES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    # 26.1: the production server knows policies (server/profile.py), not the lab, which
    # composes its legacy profile from them.
    (("mailfort.server", "mailfort.policy", "mailfort.protocol"), ("mailfort.lab",)),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "mailfort").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module that ``name`` (a module, or a name inside one) is defined in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _type_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``: names for annotations, never
    executed (every module has ``from __future__ import annotations``)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name | ast.Attribute) \
                and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def _imports(module: str, path: Path, *, typing: bool = True) -> dict[str, int]:
    """mailfort modules that ``module`` imports (anywhere: top level or in a function),
    with a line number of one such import; without ``typing``, those under
    ``if TYPE_CHECKING:`` left out."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}
    tree = ast.parse(path.read_text(), str(path))
    skip = set() if typing else _type_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                     for a in node.names]
        for name in names:
            if name.split(".")[0] == "mailfort" and (target := _resolve(name)) != module:
                found.setdefault(target or name, node.lineno)
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}
# What runs: the graph whose circles count. An annotation may name a module above (a
# policy's callback takes the Node that a composition root builds) without importing it.
RUN_GRAPH = {m: _imports(m, p, typing=False) for m, p in MODULES.items()}


def layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            hit = module == prefix or (prefix != "mailfort" and module.startswith(prefix + "."))
            if hit and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    return None if best is None else best[0]


def _cycles(graph: dict[str, dict[str, int]] = RUN_GRAPH) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next((w for w in edges if w in graph), None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(graph[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    group.append(w)
                    if w == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def _within(group: list[str], prefixes: tuple[str, ...]) -> bool:
    return all(any(m == p or m.startswith(p + ".") for p in prefixes) for m in group)


def test_every_module_has_a_layer() -> None:
    missing = sorted(m for m in MODULES if layer_of(m) is None)
    assert not missing, f"place these in LAYERS (tests/test_import_layers.py): {missing}"


def test_no_module_imports_a_higher_layer() -> None:
    upward = []
    for module, targets in sorted(GRAPH.items()):
        mine = layer_of(module)
        for target, line in targets.items():
            theirs = layer_of(target)
            if mine is None or theirs is None or theirs <= mine or (module, target) in KNOWN:
                continue
            upward.append(f"{module}:{line} ({LAYERS[mine][0]}) imports {target} "
                          f"({LAYERS[theirs][0]})")
    assert not upward, "\n".join(upward)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize(("importers", "forbidden"), RULES,
                         ids=[f"{'+'.join(i)}-not-{'+'.join(f)}" for i, f in RULES])
def test_no_forbidden_import(importers: tuple[str, ...], forbidden: tuple[str, ...]) -> None:
    bad = [f"{module}:{line} imports {target}"
           for module, targets in sorted(GRAPH.items())
           if any(_under(module, i) for i in importers)
           for target, line in targets.items() if any(_under(target, f) for f in forbidden)]
    assert not bad, "\n".join(bad)


def test_no_import_circle() -> None:
    allowed = [*ALLOWED_CYCLES, *KNOWN_CYCLES]
    circles = [g for g in _cycles() if not any(_within(g, a) for a in allowed)]
    assert not circles, circles


@pytest.mark.parametrize(("importer", "imported", "layers"), [
    ("mailfort.config", "mailfort.server.stress", ("config", "server")),
    ("mailfort.delivery.tlsrpt_send", "mailfort.queue.store", ("delivery", "queue")),
    ("mailfort.tls", "mailfort.acmecert", ("config", "config")),
    ("mailfort.store.intents", "mailfort.store.maildir", ("store", "store")),
    ("mailfort.config", "mailfort.policy.dnsbl", ("config", "store")),
])
def test_the_knots_of_issue_26_stay_untied(importer: str, imported: str,
                                           layers: tuple[str, str]) -> None:
    """The imports issue 26.2 removed (an upward one, or one half of a pair) stay removed;
    and the table places both ends where the issue says they live."""
    assert imported not in GRAPH[importer]
    ranks = [layer_of(m) for m in (importer, imported)]
    assert tuple(LAYERS[r][0] for r in ranks if r is not None) == layers


def test_the_reader_sees_every_kind_of_import() -> None:
    """The checks would pass vacuously if the reader missed imports: it sees one at the
    top, one inside a function, and one of a name from a package."""
    assert "mailfort.tls" in GRAPH["mailfort.acmecert"]
    assert "mailfort.protocol.dnsbl_codes" in GRAPH["mailfort.config"]  # inside a function
    assert "mailfort.delivery.tlsrpt_send" in GRAPH["mailfort.queue.worker"]  # from pkg import
    assert "mailfort.server.app" in GRAPH["mailfort.lab.harness"]  # the lab uses the server
    # under TYPE_CHECKING: seen for the floors, not for the circles
    assert "mailfort.server.app" in GRAPH["mailfort.server.operations"]
    assert "mailfort.server.app" not in RUN_GRAPH["mailfort.server.operations"]
