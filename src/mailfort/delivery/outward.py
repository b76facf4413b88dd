"""HTTPS to a host outside: the name resolved by our resolver, the address checked.

Two things fetch or send over HTTPS on a destination's say-so: the MTA-STS policy fetch
(``mta-sts.DOMAIN``) and the TLS-RPT report POST (the ``rua`` of ``_smtp._tls.DOMAIN``).
Both names come from DNS that anyone can publish, so both must not reach loopback, private
or link-local services (the same rule as delivery, delivery/mx.py ``is_public``), and the
address connected to must be the one that was checked: the connection is pinned to it, not
left to the system resolver to look the name up again.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl

import dns.asyncresolver
import dns.exception
import dns.resolver

from mailfort.delivery.mx import is_public


class NotOutward(OSError):
    """The host has no address, or only addresses that are not public."""


async def outward_address(resolver: dns.asyncresolver.Resolver, host: str, *,
                          allow_private: bool = False) -> str:
    """The first public A/AAAA address of ``host`` (or an address literal, checked)."""
    try:
        literal = str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        literal = None
    if literal is not None:
        if allow_private or is_public(literal):
            return literal
        raise NotOutward(f"{host} is not a public address")
    refused: list[str] = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(host, rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers,
                dns.exception.Timeout):
            continue
        for rr in answer:
            address = str(rr.address)
            if allow_private or is_public(address):
                return address
            refused.append(address)
    if refused:
        raise NotOutward(f"{host} resolves only to non-public {', '.join(refused[:4])}")
    raise NotOutward(f"{host} has no address")


class PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a host name at a given address; the certificate is checked for the name."""

    def __init__(self, host: str, address: str, port: int, ctx: ssl.SSLContext,
                 timeout: float) -> None:
        super().__init__(host, port, context=ctx, timeout=timeout)
        self._address = address
        self._ctx = ctx

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self.host)
