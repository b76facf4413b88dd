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

# (importer, imported): upward imports that remain, each with the item that removes it.
# The server importing the lab's legacy profile is issue 26 item 1 (done elsewhere).
KNOWN: dict[tuple[str, str], str] = {
    ("mailfort.server.app", "mailfort.lab.profile"): "issue 26.1",
    ("mailfort.server.smtp", "mailfort.lab.profile"): "issue 26.1",
}
# The circle that the same import closes (lab/profile imports the server back).
KNOWN_CYCLES: list[tuple[str, ...]] = [
    ("mailfort.lab.profile", "mailfort.server"),
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


def _imports(module: str, path: Path) -> dict[str, int]:
    """mailfort modules that ``module`` imports (anywhere: top level or in a function),
    with a line number of one such import."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
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


def layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            hit = module == prefix or (prefix != "mailfort" and module.startswith(prefix + "."))
            if hit and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    return None if best is None else best[0]


def _cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for root in GRAPH:
        if root in index:
            continue
        work = [(root, iter(GRAPH[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next((w for w in edges if w in GRAPH), None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(GRAPH[nxt])))
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
