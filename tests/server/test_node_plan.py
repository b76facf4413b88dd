"""server/node_plan.py: the one list of what a node is made of."""

from __future__ import annotations

from mailfort.server.node_plan import LISTENERS
from mailfort.server.privileges import LISTEN_KEYS


def test_the_plan_lists_every_listener() -> None:
    """node_plan is the one list of services: the keys privileges and socket activation
    check are the same, in the same order."""
    assert tuple(p.name for p in LISTENERS) == LISTEN_KEYS
