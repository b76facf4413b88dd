"""Server tests reuse the outbound-delivery fixtures: a test DNS server and SMTP receivers."""

from __future__ import annotations

from tests.delivery.conftest import dns_server, receiver_tls, receivers

__all__ = ["dns_server", "receiver_tls", "receivers"]
