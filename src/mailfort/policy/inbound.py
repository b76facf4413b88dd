"""The MX's anti-abuse decisions about a client, put together: at connect and at RCPT.

At connect, before the banner: the allow-list, the DNS blocklists (all zones at once) and
the optional greeting delay run together; a listed client is refused at once, or (when
``dnsbl.reject_at = "rcpt"``) at each RCPT except to postmaster@ and abuse@, which must
still reach us (RFC 5321 §4.5.1, RFC 2142). At RCPT, after the recipient is known to be
ours: the right-hand-side lists for the sender domain and the HELO name, then greylisting.

Each piece is its own unit (policy/dnsbl.py, policy/greylist.py); this module only orders
them and words the replies. It never touches a socket, so it is tested with none.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from mailfort.config import Config, DNSBLZoneConfig
from mailfort.policy.dnsbl import (
    NOT_LISTED,
    CodeFilter,
    DNSBLChecker,
    Verdict,
    Zone,
    client_address,
)
from mailfort.policy.greylist import GREYLISTED, GreylistStore, Outcome
from mailfort.protocol.address import Mailbox
from mailfort.protocol.replies import Reply

log = logging.getLogger("mailfort.inbound")

PREGREET = Reply(554, "5.5.1", "Protocol error: client spoke before the greeting")
ALWAYS_ACCEPTED = ("postmaster", "abuse")  # RFC 5321 §4.5.1, RFC 2142


def blocked(ip: str, zone: str) -> Reply:
    return Reply(554, "5.7.1", f"Service unavailable; client [{ip}] blocked using {zone}")


def domain_blocked(what: str, domain: str, zone: str) -> Reply:
    return Reply(554, "5.7.1", f"Service unavailable; {what} {domain} blocked using {zone}")


def zones(configs: Sequence[DNSBLZoneConfig]) -> list[Zone]:
    return [Zone(z.zone.strip(".").lower(), z.weight, CodeFilter(z.codes)) for z in configs]


@dataclass(frozen=True)
class ConnectionVerdict:
    """What the connect-time checks found; ``refusal`` is the greeting's refusal, if any."""

    allowed: bool = False
    dnsbl: Verdict = NOT_LISTED
    refusal: Reply | None = None


ALLOWED = ConnectionVerdict(allowed=True)


class InboundPolicy:
    """Connect-time and RCPT-time anti-abuse decisions of the MX."""

    def __init__(
        self,
        cfg: Config,
        checker: DNSBLChecker | None,
        greylist: GreylistStore | None,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.cfg = cfg
        self.checker = checker
        self.greylist = greylist
        self._sleep = sleep
        nets = [*cfg.screen.allow_networks, *cfg.relay.trusted_networks]
        self.allow = [ipaddress.ip_network(n, strict=False) for n in nets]
        self.reject_at_rcpt = cfg.dnsbl.reject_at == "rcpt"
        self.sender_zones = zones(cfg.dnsbl.sender_zones)
        self.helo_zones = zones(cfg.dnsbl.helo_zones)

    @property
    def greeting_delay(self) -> float:
        return self.cfg.screen.greeting_delay

    @property
    def screens_connections(self) -> bool:
        """Whether there is anything to do before the banner."""
        return self.greeting_delay > 0 or bool(self.checker and self.checker.zones)

    def checks_rcpt(self, conn: ConnectionVerdict) -> bool:
        """Whether ``check_rcpt`` has anything to do for this connection."""
        return not conn.allowed and (conn.dnsbl.listed or bool(self.sender_zones)
                                     or bool(self.helo_zones) or self.greylist is not None)

    def allowed(self, ip: str) -> bool:
        addr = client_address(ip)
        return addr is not None and any(addr in net for net in self.allow)

    async def screen_connection(self, ip: str) -> ConnectionVerdict:
        """The blocklist lookups and the greeting delay, side by side."""
        addr = client_address(ip)
        if addr is None or self.allowed(ip):
            return ALLOWED
        checker = self.checker if self.checker is not None and self.checker.zones else None
        if self.greeting_delay <= 0:
            verdict = await checker.check_client(addr) if checker else NOT_LISTED
        else:
            lookups = checker.check_client(addr) if checker else _done(NOT_LISTED)
            verdict, _ = await asyncio.gather(lookups, self._sleep(self.greeting_delay))
        refusal = None
        if verdict.listed and not self.reject_at_rcpt:
            refusal = blocked(str(addr), verdict.zone)
        return ConnectionVerdict(dnsbl=verdict, refusal=refusal)

    async def check_rcpt(
        self,
        ip: str,
        conn: ConnectionVerdict,
        helo: str | None,
        sender: Mailbox | None,
        rcpt: Mailbox,
    ) -> Reply | None:
        """A refusal of a recipient the relay rules accepted, or None to accept it."""
        if conn.allowed or self.allowed(ip):
            return None
        exempt = rcpt.local_part.lower() in ALWAYS_ACCEPTED
        if not exempt:
            refusal = await self._blocklists(ip, conn, helo, sender)
            if refusal is not None:
                return refusal
        if self.greylist is not None:
            mail_from = "" if sender is None else str(sender)
            outcome = await asyncio.to_thread(self.greylist.check, ip, mail_from, str(rcpt))
            if outcome is Outcome.DEFER:
                return GREYLISTED
        return None

    async def _blocklists(
        self, ip: str, conn: ConnectionVerdict, helo: str | None, sender: Mailbox | None
    ) -> Reply | None:
        if conn.dnsbl.listed:  # only here when reject_at = "rcpt"
            return blocked(ip, conn.dnsbl.zone)
        if self.checker is None:
            return None
        if self.sender_zones and sender is not None and not sender.literal:
            v = await self.checker.check_domain(sender.domain, self.sender_zones)
            if v.listed:
                return domain_blocked("sender domain", sender.domain, v.zone)
        if self.helo_zones and helo:
            v = await self.checker.check_domain(helo, self.helo_zones)
            if v.listed:
                return Reply(554, "5.7.1", f"Service unavailable; HELO name blocked using {v.zone}")
        return None

    def close(self) -> None:
        if self.greylist is not None:
            self.greylist.close()


async def _done(value: Verdict) -> Verdict:
    return value
