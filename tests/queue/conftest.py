"""Queue tests reuse the delivery fixtures and add a local-delivery sink for bounces."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.delivery.conftest import outbound_config, receiver_tls, receivers

__all__ = ["LocalSink", "outbound_config", "receiver_tls", "receivers"]


class LocalSink:
    """Stands in for the integrator's local delivery: one file per message per user."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.delivered: list[tuple[str, bytes]] = []
        self.fail = False

    async def __call__(self, user: str, message: bytes, key: str = "") -> None:
        if self.fail:
            raise OSError("local delivery unavailable")
        d = self.root / user / "new"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{len(self.delivered)}.eml").write_bytes(message)
        self.delivered.append((user, message))

    def files(self, user: str) -> list[Path]:
        d = self.root / user / "new"
        return sorted(d.iterdir()) if d.exists() else []


@pytest.fixture
def sink(tmp_path: Path) -> LocalSink:
    return LocalSink(tmp_path / "local")
