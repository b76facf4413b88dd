"""Alias expansion, the same for every directory backend.

An alias may point at other aliases, remote addresses or itself; expansion must end and
must stay small whatever the table holds, so it is breadth-first, visits each address once
(loops end), goes at most ``MAX_ALIAS_DEPTH`` levels deep and returns at most
``MAX_TARGETS`` addresses. The backends supply only their queries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

MAX_ALIAS_DEPTH = 10
MAX_TARGETS = 1000


def expand(start: str, local_domains: set[str], is_user: Callable[[str], bool],
           targets: Callable[[str], Iterable[str]]) -> tuple[list[str], list[str]]:
    """(local users, remote addresses) that mail for ``start`` goes to. ``targets(addr)``:
    the alias targets of ``addr`` in their stored order (none for an unknown address)."""
    local: dict[str, None] = {}
    remote: dict[str, None] = {}
    seen = {start}
    level = [start]
    for depth in range(MAX_ALIAS_DEPTH + 1):
        nxt: list[str] = []
        for addr in level:
            if addr.rpartition("@")[2].lower() not in local_domains:
                remote[addr] = None
            elif is_user(addr):
                local[addr] = None
            elif depth < MAX_ALIAS_DEPTH:
                for target in targets(addr):
                    if target not in seen:
                        seen.add(target)
                        nxt.append(target)
            # else: an unknown local address (dangling target) or too deep: dropped.
        if len(local) + len(remote) >= MAX_TARGETS or not nxt:
            break
        level = nxt
    return list(local)[:MAX_TARGETS], list(remote)[: max(0, MAX_TARGETS - len(local))]
