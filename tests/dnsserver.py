"""A small authoritative DNS server for tests (dnslib), on 127.0.0.1 UDP and TCP.

Every test sets the records it needs; nothing is forwarded anywhere, so no query ever
leaves the machine. A name with no records at all answers NXDOMAIN (which is also "not
listed" for a DNSBL); a name with records but none of the asked type answers NODATA.

    dns = DNSServer().start()
    dns.set_mx("remote.test", [(10, "mx1.remote.test")])
    dns.add_a("mx1.remote.test", "127.0.0.1")
    dns.add_txt("remote.test", "v=spf1 -all")
    dns.servfail("broken.test"); dns.timeout("slow.test")
    dns.list_ip("bl.test", "127.0.0.2")            # a DNSBL entry (A 127.0.0.2 and a TXT)
    dns.rfc5782_test_entries("bl.test")          # 127.0.0.2 and ::FFFF:7F00:2 listed
    ... cfg: dns.nameservers = ["127.0.0.1"], dns.port = dns.port
    dns.stop()
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from typing import Any

from dnslib import AAAA, CNAME, MX, QTYPE, RCODE, RR, SOA, SRV, TLSA, TXT, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger
from dnslib.server import DNSServer as _LibServer


def _key(name: str) -> str:
    return name.lower().rstrip(".")


class _Resolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, owner: DNSServer) -> None:
        self.owner = owner

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord | None:
        q = request.q
        name = _key(str(q.qname))
        qtype = QTYPE[q.qtype]
        o = self.owner
        with o.lock:
            o.queries.append((name, qtype))
            if name in o.timeouts:
                return None  # no reply at all: the client times out
            reply = request.reply()
            if name in o.rcodes:
                reply.header.rcode = o.rcodes[name]
                return reply
            records = o.records.get(name)
            if not records:
                reply.header.rcode = RCODE.NXDOMAIN if o.default_rcode is None else o.default_rcode
                o.add_negative_soa(reply, name)
                return reply
            owner = q.qname
            for _ in range(8):  # a CNAME is followed inside this server's names (RFC 1034 §3.6.2)
                alias = next(((ttl, rd) for rt, ttl, rd in records if rt == "CNAME"), None)
                if alias is None or qtype in ("CNAME", "ANY"):
                    break
                reply.add_answer(RR(owner, QTYPE.CNAME, rdata=alias[1], ttl=alias[0]))
                owner = alias[1].label
                records = o.records.get(_key(str(owner)), [])
            for rtype, ttl, rdata in records:
                if rtype == qtype or q.qtype == QTYPE.ANY:
                    reply.add_answer(RR(owner, getattr(QTYPE, rtype), rdata=rdata, ttl=ttl))
            if name in o.authentic:  # as a validating resolver would (DNSSEC, RFC 4035)
                reply.header.ad = 1
            if not reply.rr:
                o.add_negative_soa(reply, name)  # NODATA
            return reply


class _Handler(DNSHandler):  # type: ignore[misc]
    def handle(self) -> None:
        with contextlib.suppress(Exception):
            super().handle()


class DNSServer:
    """Records per name, set and changed while running; thread-safe."""

    def __init__(self, address: str = "127.0.0.1", default_rcode: int | None = None,
                 port: int = 0) -> None:
        """``default_rcode``: the answer for names without records (NXDOMAIN if None).
        ``port``: a fixed port (53 for resolvers that cannot be told another: a benchmark's
        daemons), else a free one."""
        self.address = address
        self.default_rcode = default_rcode
        self.fixed_port = port
        self.port = 0
        self.lock = threading.Lock()
        self.records: dict[str, list[tuple[str, int, Any]]] = {}
        self.rcodes: dict[str, int] = {}
        self.timeouts: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self.authentic: set[str] = set()  # names answered with the AD bit set
        self.negative_ttls: dict[str, int] = {}  # zone -> SOA TTL of its negative answers
        self._servers: list[Any] = []

    # ------------------------------------------------------------------ records

    def _add(self, name: str, rtype: str, rdata: Any, ttl: int) -> DNSServer:
        with self.lock:
            self.records.setdefault(_key(name), []).append((rtype, ttl, rdata))
        return self

    def add_a(self, name: str, ip: str, ttl: int = 60) -> DNSServer:
        return self._add(name, "A", A(ip), ttl)

    def add_aaaa(self, name: str, ip: str, ttl: int = 60) -> DNSServer:
        return self._add(name, "AAAA", AAAA(ip), ttl)

    def add_mx(self, domain: str, host: str, preference: int = 10, ttl: int = 60) -> DNSServer:
        """``host`` "." is the null MX of RFC 7505."""
        return self._add(domain, "MX", MX(host if host == "." else host + ".", preference), ttl)

    def set_mx(self, domain: str, mxs: list[tuple[int, str]]) -> DNSServer:
        self.remove(domain, "MX")
        for pref, host in mxs:
            self.add_mx(domain, host, pref)
        return self

    def add_txt(self, name: str, text: str, ttl: int = 60) -> DNSServer:
        chunks = [text[i : i + 255] for i in range(0, len(text), 255)] or [""]
        return self._add(name, "TXT", TXT(chunks), ttl)

    def add_srv(self, name: str, priority: int, weight: int, port: int, target: str,
                ttl: int = 60) -> DNSServer:
        """An SRV record (RFC 2782); ``target`` "." says the service is not offered."""
        return self._add(name, "SRV", SRV(priority, weight, port,
                                          target if target == "." else target + "."), ttl)

    def add_cname(self, name: str, target: str, ttl: int = 60) -> DNSServer:
        """``name`` is an alias of ``target``; queries of other types follow it."""
        return self._add(name, "CNAME", CNAME(target + "."), ttl)

    def add_tlsa(self, name: str, usage: int, selector: int, mtype: int, data: bytes,
                 ttl: int = 60, *, authentic: bool = True) -> DNSServer:
        """A TLSA record (RFC 6698); ``authentic`` sets AD on the name's answers, as a
        validating resolver would for a signed zone (DANE trusts only those)."""
        if authentic:
            self.set_authentic(name)
        return self._add(name, "TLSA", TLSA(usage, selector, mtype, data), ttl)

    def set_authentic(self, name: str, on: bool = True) -> DNSServer:
        """Answer ``name`` with the AD (authentic data) bit set, or not."""
        with self.lock:
            (self.authentic.add if on else self.authentic.discard)(_key(name))
        return self

    # ------------------------------------------------------------------ DNS blocklists

    @staticmethod
    def dnsbl_name(ip: str, zone: str) -> str:
        """RFC 5782 §2.1/§2.4: reversed octets, or reversed nibbles for any IPv6 address
        (written here independently of mailfort's own code, which the tests check)."""
        addr = ipaddress.ip_address(ip)
        if addr.version == 4:
            return ".".join(reversed(str(addr).split("."))) + "." + zone
        return ".".join(reversed(addr.exploded.replace(":", ""))) + "." + zone

    def list_ip(self, zone: str, ip: str, code: str = "127.0.0.2", ttl: int = 60,
                txt: str | None = None) -> DNSServer:
        """List ``ip`` in the DNSBL ``zone``: an A record (the listing code) and a TXT."""
        name = self.dnsbl_name(ip, zone)
        self.add_a(name, code, ttl)
        return self.add_txt(name, txt or f"{ip} listed in {zone}", ttl)

    def list_domain(self, zone: str, domain: str, code: str = "127.0.0.2",
                    ttl: int = 60) -> DNSServer:
        """List ``domain`` in the right-hand-side (domain) list ``zone``."""
        name = f"{domain}.{zone}"
        self.add_a(name, code, ttl)
        return self.add_txt(name, f"{domain} listed in {zone}", ttl)

    def rfc5782_test_entries(self, zone: str) -> DNSServer:
        """RFC 5782 §5: 127.0.0.2 (and IPv6 ::FFFF:7F00:2) listed, 127.0.0.1 (and
        ::FFFF:7F00:1) not; for a domain list, TEST listed and INVALID not."""
        self.list_ip(zone, "127.0.0.2", txt="RFC 5782 test entry")
        self.list_ip(zone, "::ffff:7f00:2", txt="RFC 5782 test entry")
        return self.list_domain(zone, "test")

    def set_negative_ttl(self, zone: str, ttl: int) -> DNSServer:
        """Negative answers (NXDOMAIN, NODATA) for names in ``zone`` carry its SOA in the
        authority section, TTL and MINIMUM ``ttl``: how long RFC 2308 lets them be cached.
        Without it they carry none, as before."""
        with self.lock:
            self.negative_ttls[_key(zone)] = ttl
        return self

    def add_negative_soa(self, reply: DNSRecord, name: str) -> None:
        """The SOA of the closest zone with ``set_negative_ttl`` (lock held by the caller)."""
        labels = name.split(".")
        for i in range(len(labels)):
            zone = ".".join(labels[i:])
            ttl = self.negative_ttls.get(zone)
            if ttl is not None:
                reply.add_auth(RR(zone, QTYPE.SOA, ttl=ttl, rdata=SOA(
                    f"ns.{zone}", f"hostmaster.{zone}", (1, 3600, 600, 86400, ttl))))
                return

    def remove(self, name: str, rtype: str | None = None) -> DNSServer:
        """Drop a name's records (of one type, or all), its rcode and timeout."""
        k = _key(name)
        with self.lock:
            if rtype is None:
                self.records.pop(k, None)
                self.rcodes.pop(k, None)
                self.timeouts.discard(k)
            else:
                self.records[k] = [r for r in self.records.get(k, []) if r[0] != rtype]
        return self

    def nxdomain(self, name: str) -> DNSServer:
        return self.rcode(name, RCODE.NXDOMAIN)

    def servfail(self, name: str) -> DNSServer:
        return self.rcode(name, RCODE.SERVFAIL)

    def rcode(self, name: str, rcode: int) -> DNSServer:
        with self.lock:
            self.rcodes[_key(name)] = rcode
        return self

    def timeout(self, name: str) -> DNSServer:
        """Never answer queries for ``name``."""
        with self.lock:
            self.timeouts.add(_key(name))
        return self

    def clear(self) -> None:
        with self.lock:
            self.records.clear()
            self.rcodes.clear()
            self.timeouts.clear()
            self.queries.clear()
            self.authentic.clear()
            self.negative_ttls.clear()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> DNSServer:
        """Bind UDP and TCP on the same free port."""
        resolver = _Resolver(self)
        for _ in range(20):
            quiet = DNSLogger(logf=lambda _msg: None)
            udp = _LibServer(resolver, port=self.fixed_port, address=self.address,
                             handler=_Handler,
                             logger=quiet)
            port = udp.server.server_address[1]
            try:
                tcp = _LibServer(resolver, port=port, address=self.address, tcp=True,
                                 handler=_Handler, logger=quiet)
            except OSError:
                udp.server.server_close()
                if self.fixed_port:
                    raise
                continue
            self.port = port
            self._servers = [udp, tcp]
            for s in self._servers:
                # Never wait for a handler thread at stop (a TCP client that went quiet
                # would otherwise hold up the test's teardown).
                s.server.daemon_threads = True
                s.server.block_on_close = False
                # A short poll: stop() waits for it, twice (UDP and TCP) per test.
                s.thread = threading.Thread(target=s.server.serve_forever,
                                            kwargs={"poll_interval": 0.05}, daemon=True)
                s.thread.start()
            return self
        raise OSError("no free port for the test DNS server")

    def stop(self) -> None:
        for s in self._servers:
            s.server.shutdown()
            s.server.server_close()
        self._servers = []

    def config(self, timeout: float = 2.0) -> dict[str, Any]:
        """The ``[dns]`` config table that points mailfort at this server."""
        return {"nameservers": [self.address], "port": self.port, "timeout": timeout}

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port_unused() -> int:
    """A TCP port on 127.0.0.1 nothing listens on (for connection-refused tests)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)
