"""Policy tests that need DNS get the project's real loopback DNS server, no mock."""

from __future__ import annotations

import pytest

from mailfort.config import DNSConfig
from mailfort.policy.dnslookup import Lookup
from tests.dnsserver import DNSServer


@pytest.fixture
def lookup(dns_server: DNSServer) -> Lookup:
    """A resolver on the test server; a short timeout for the names set to time out."""
    return Lookup(DNSConfig(nameservers=["127.0.0.1"], port=dns_server.port, timeout=0.5))
