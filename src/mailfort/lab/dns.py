"""The lab's own DNS: a few TXT records on 127.0.0.1, nothing else, no recursion.

Both lab servers resolve through it, so the hardened one's SPF and DMARC checks have the
lab domain's published policy to apply (``v=spf1 -all``, ``p=reject``: no host may send
as example.test from outside), and no lookup ever leaves the machine: every other name is
NXDOMAIN at once (a dead resolver port would cost each lookup its whole timeout).
Written on dnspython, a dependency already, because the lab must run without test packages.
"""

from __future__ import annotations

import asyncio
import contextlib
import typing

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, records: dict[dns.name.Name, list[str]]) -> None:
        self.records = records
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return  # not a DNS query: nothing to answer
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        if len(query.question) != 1:
            reply.set_rcode(dns.rcode.FORMERR)
        else:
            q = query.question[0]
            texts = self.records.get(q.name)
            if texts is None:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            elif q.rdtype == dns.rdatatype.TXT:
                quoted = ['"' + t.replace('"', '\\"') + '"' for t in texts]
                reply.answer.append(dns.rrset.from_text_list(
                    q.name, 60, dns.rdataclass.IN, dns.rdatatype.TXT, quoted))
            # a name we know but a type we do not: NOERROR with no answer (NODATA)
        assert self.transport is not None
        self.transport.sendto(reply.to_wire(), addr)


class LabDNS:
    """``await LabDNS({"example.test": ["v=spf1 -all"]}).start()``; then ``.port``."""

    def __init__(self, txt: dict[str, list[str]], address: str = "127.0.0.1") -> None:
        self.address = address
        self.records = {dns.name.from_text(name): texts for name, texts in txt.items()}
        self.port = 0
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> LabDNS:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self.records), local_addr=(self.address, 0))
        self._transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        return self

    async def close(self) -> None:
        if self._transport is not None:
            with contextlib.suppress(Exception):
                self._transport.close()
            self._transport = None
