"""One lab (legacy and hardened servers with their capture points) for the lab's tests.

Starting it takes well under a second; it is shared by the module's tests because the
attacks are written to leave each other alone (unique markers, the password guesser on
its own loopback address).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mailfort.lab.harness import Lab


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as running:
        yield running
