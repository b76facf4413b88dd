"""The TLS policy of one destination, from configuration, DANE and MTA-STS, and where its
outcomes are recorded (TLS-RPT). One instance per delivery worker.

Configured routes (smarthosts) get the configured level only: the destination's MX
records, and so its DANE and MTA-STS, are not where such mail goes. For MX delivery,
an MX host with usable, authenticated TLSA records is delivered to under DANE, which takes
precedence over MTA-STS for that host (RFC 8461 §2); the other hosts get the MTA-STS
policy (enforce: verify, listed MXs only; testing: check and report), never less than the
configured level.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import dns.asyncresolver

from mailfort.config import Config, Route
from mailfort.delivery import dane
from mailfort.delivery.mtasts import MTASTS
from mailfort.delivery.mx import Target
from mailfort.delivery.tlspolicy import TLSEvent, TLSPolicy, static_policy, stronger
from mailfort.delivery.tlsrpt import TLSReportStore

log = logging.getLogger(__name__)


class OutboundTLS:
    def __init__(self, cfg: Config, resolver: dns.asyncresolver.Resolver) -> None:
        self.cfg = cfg
        self.resolver = resolver
        self.sts = MTASTS(cfg, resolver)
        self.store = TLSReportStore(cfg.data_path / "tlsrpt")

    def report(self, event: TLSEvent) -> None:
        if event.result != "success":
            log.warning("TLS %s for %s at %s[%s]: %s", event.result, event.policy_domain,
                        event.mx_host, event.address, event.detail)
        if self.cfg.delivery.tls_reports:
            try:
                self.store.record(event)
            except OSError:
                log.exception("cannot record a TLS report event")

    async def policy_for(self, domain: str, route: Route | None,
                         targets: Sequence[Target]) -> TLSPolicy:
        base = static_policy(self.cfg, domain, route)
        if route is not None:
            return base
        d = base.domain
        tlsa: dict[str, tuple[dane.TLSA, ...]] = {}
        if self.cfg.delivery.dane:
            for t in targets:
                host = t.host.lower().rstrip(".")
                try:
                    records = await dane.tlsa_for(self.resolver, host)
                except dane.DANELookupError as exc:
                    # Cannot tell whether DANE applies: no delivery to it in the meantime
                    # (RFC 7672 §2.2); see TLSPolicy.plan.
                    log.warning("%s", exc)
                    records = (dane.TLSA(dane.INDETERMINATE, 0, 0, b""),)
                if records:
                    tlsa[host] = records
        policy = TLSPolicy(base.level, base.source, d, tlsa=tlsa, ca_file=base.ca_file,
                           floor=base.level)
        if not self.cfg.delivery.mta_sts:
            return policy
        sts, error = await self.sts.get(d)
        if error is not None:
            self.report(TLSEvent(error.result, "sts", d, detail=str(error)))
        if sts is None and error is not None:
            return dataclasses.replace(policy, lookup_error=str(error))
        if sts is None or sts.mode == "none":
            return policy
        return TLSPolicy(stronger(base.level, "verify"), "mta-sts", d, mx_patterns=sts.mx,
                         testing=sts.mode == "testing", sts_id=sts.id, tlsa=tlsa,
                         ca_file=base.ca_file, floor=base.level)
