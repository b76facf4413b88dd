"""Server tests reuse the outbound-delivery fixtures: SMTP receivers."""

from __future__ import annotations

from tests.delivery.conftest import receiver_tls, receivers

__all__ = ["receiver_tls", "receivers"]
