"""TLS-RPT (RFC 8460): record each TLS outcome per policy domain, build the daily report.

Events are appended as JSON lines to ``DATA_DIR/tlsrpt/YYYY-MM-DD.jsonl`` (UTC day), one
per delivery attempt under a policy: cheap to write from the delivery path, and a crash
loses at most the line being written. ``build_report`` turns one day of one domain into the
aggregate report of RFC 8460 §4 (JSON), ``gzip_report`` compresses it for sending (§5.3).
``rua_of`` reads the destinations from the domain's ``_smtp._tls`` TXT record (§3).
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.resolver

from mailfort.delivery.tlspolicy import TLSEvent

_lock = threading.Lock()


def _day(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


class TLSReportStore:
    """Append-only daily files of TLS outcomes."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def record(self, event: TLSEvent, now: float | None = None) -> None:
        ts = time.time() if now is None else now
        line = json.dumps({"t": ts, "result": event.result, "policy_type": event.policy_type,
                           "domain": event.policy_domain, "mx": event.mx_host,
                           "ip": event.address, "detail": event.detail[:300]},
                          separators=(",", ":")) + "\n"
        with _lock:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / f"{_day(ts)}.jsonl",
                         os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def events(self, day: str) -> list[dict[str, Any]]:
        path = self.root / f"{day}.jsonl"
        if not path.exists():
            return []
        out = []
        for raw in path.read_text().splitlines():
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue  # a torn last line after a crash
        return out

    def domains(self, day: str) -> set[str]:
        return {e["domain"] for e in self.events(day)}


def build_report(store: TLSReportStore, day: str, domain: str, *, organization: str,
                 contact: str, policy_strings: dict[str, list[str]] | None = None
                 ) -> dict[str, Any]:
    """The RFC 8460 §4.4 aggregate report of ``domain`` for the UTC day ``day``.

    ``policy_strings``: per policy type, the policy as published (the MTA-STS file lines
    or the TLSA records), when known.
    """
    events = [e for e in store.events(day) if e["domain"] == domain]
    start = dt.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=dt.UTC)
    end = start + dt.timedelta(days=1) - dt.timedelta(seconds=1)
    by_type: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_type.setdefault(e["policy_type"], []).append(e)
    policies = []
    for ptype, evs in sorted(by_type.items()):
        ok = sum(1 for e in evs if e["result"] == "success")
        fails = Counter((e["result"], e["ip"], e["mx"]) for e in evs if e["result"] != "success")
        policy: dict[str, Any] = {"policy-type": ptype, "policy-domain": domain}
        if policy_strings and ptype in policy_strings:
            policy["policy-string"] = policy_strings[ptype]
        if ptype == "sts" and policy_strings and "sts" in policy_strings:
            # §4.4: the mx patterns of the policy in force
            policy["mx-host"] = [ln.split(":", 1)[1].strip()
                                 for ln in policy_strings["sts"] if ln.startswith("mx:")]
        policies.append({
            "policy": policy,
            "summary": {"total-successful-session-count": ok,
                        "total-failure-session-count": sum(fails.values())},
            "failure-details": [
                {"result-type": rt, "receiving-ip": ip, "receiving-mx-hostname": mx,
                 "failed-session-count": n}
                for (rt, ip, mx), n in sorted(fails.items())
            ],
        })
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                       "end-datetime": end.strftime("%Y-%m-%dT%H:%M:%SZ")},
        "contact-info": contact,
        "report-id": f"{day}_{domain}@{organization}",
        "policies": policies,
    }


def gzip_report(report: dict[str, Any]) -> bytes:
    """The report as sent (RFC 8460 §5.3): JSON, gzip, media type application/tlsrpt+gzip."""
    return gzip.compress(json.dumps(report, separators=(",", ":")).encode(), mtime=0)


def report_filename(sender_domain: str, domain: str, day: str) -> str:
    """RFC 8460 §5.3 file name: receiver!policy-domain!begin!end!unique.json.gz."""
    start = int(dt.datetime.strptime(day, "%Y-%m-%d")
                .replace(tzinfo=dt.UTC).timestamp())
    return f"{sender_domain}!{domain}!{start}!{start + 86399}.json.gz"


async def rua_of(resolver: dns.asyncresolver.Resolver, domain: str) -> list[str]:
    """The ``rua`` URIs of ``_smtp._tls.DOMAIN`` (``v=TLSRPTv1; rua=...``), else []."""
    try:
        answer = await resolver.resolve(f"_smtp._tls.{domain}", "TXT", search=False)
    except dns.exception.DNSException:
        return []
    records = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
    records = [r for r in records if r.replace(" ", "").startswith("v=TLSRPTv1")]
    if len(records) != 1:
        return []  # none, or ambiguous (RFC 8460 §3: more than one: no reporting)
    for part in records[0].split(";"):
        k, _, v = part.strip().partition("=")
        if k.strip() == "rua":
            return [u.strip() for u in v.split(",") if u.strip()]
    return []
