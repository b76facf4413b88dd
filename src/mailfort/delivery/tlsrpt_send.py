"""Sending the daily TLS-RPT reports (RFC 8460 §5): to each ``rua`` of the policy domain's
``_smtp._tls`` record, by mail (``mailto:``, through our own outbound queue, so the
report gets the same TLS policy and retries as any mail) or by HTTPS POST (``https:``,
certificate verified, only to a public address: the same rule as delivery). Reports go
only to domains whose events are recorded, once a day.
"""

from __future__ import annotations

import asyncio
import email.utils
import http.client
import ssl
import urllib.parse
from collections.abc import Callable
from email.message import EmailMessage

import dns.asyncresolver

from mailfort.config import Config
from mailfort.delivery.outward import PinnedHTTPS, outward_address
from mailfort.delivery.tlsrpt import (
    TLSReportStore,
    build_report,
    gzip_report,
    report_filename,
    rua_of,
)

MEDIA_TYPE = "application/tlsrpt+gzip"

# How a report mail is queued: (message, sender, recipients, submitted_by), e.g. the
# queue's ``enqueue_bytes``. Passed in by whoever runs the reports (queue/worker.py), so
# that delivery, which the queue uses, does not import the queue back.
Enqueue = Callable[[bytes, str, list[str], str | None], object]


def report_mail(cfg: Config, domain: str, rcpt: str, report: dict[str, object],
                body: bytes, day: str) -> bytes:
    """The report message of RFC 8460 §5.3 (multipart/report, report-type=tlsrpt)."""
    me = cfg.server.hostname
    msg = EmailMessage()
    msg["From"] = f"TLS reporting <postmaster@{me}>"
    msg["To"] = rcpt
    msg["Subject"] = f"Report Domain: {domain} Submitter: {me} Report-ID: <{report['report-id']}>"
    msg["Date"] = email.utils.formatdate(usegmt=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=me)
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = me
    msg.set_content(f"TLS report for {domain}, {day} (RFC 8460).\n")
    msg.add_attachment(body, maintype="application", subtype="tlsrpt+gzip",
                       filename=report_filename(me, domain, day))
    msg.replace_header("Content-Type", 'multipart/report; report-type="tlsrpt"')
    # replace_header dropped the boundary parameter: put it back
    msg.set_boundary(msg.get_boundary() or email.utils.make_msgid().strip("<>@."))
    return msg.as_bytes().replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")


def _known_policies(cfg: Config, domain: str) -> dict[str, list[str]]:
    """The MTA-STS policy text cached for ``domain`` (delivery/mtasts.py), if any."""
    import json

    try:
        raw = json.loads((cfg.data_path / "mta-sts" / f"{domain}.json").read_text())
        return {"sts": [str(x) for x in raw["text"]]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _post(url: urllib.parse.SplitResult, address: str, body: bytes, ctx: ssl.SSLContext,
          timeout: float) -> int:
    """POST to the checked ``address``; a redirect is an answer, not followed."""
    host = url.hostname or ""
    conn = PinnedHTTPS(host, address, url.port or 443, ctx, timeout)
    try:
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        conn.request("POST", path, body=body,
                     headers={"Content-Type": MEDIA_TYPE, "Host": url.netloc})
        resp = conn.getresponse()
        resp.read(64 * 1024)
        return int(resp.status)
    finally:
        conn.close()


async def send_reports(cfg: Config, enqueue: Enqueue, resolver: dns.asyncresolver.Resolver,
                       day: str, *, ctx: ssl.SSLContext | None = None) -> list[str]:
    """Send ``day``'s reports; returns what was done, one line per destination."""
    store = TLSReportStore(cfg.data_path / "tlsrpt")
    ctx = ctx or ssl.create_default_context(cafile=cfg.delivery.ca_file or None)
    done: list[str] = []
    for domain in sorted(store.domains(day)):
        uris = await rua_of(resolver, domain)
        if not uris:
            continue
        report = build_report(store, day, domain, organization=cfg.server.hostname,
                              contact=f"postmaster@{cfg.server.hostname}",
                              policy_strings=_known_policies(cfg, domain))
        body = gzip_report(report)
        for uri in uris:
            parsed = urllib.parse.urlsplit(uri)
            if parsed.scheme == "mailto":
                rcpt = urllib.parse.unquote(parsed.path)
                if "@" not in rcpt or any(c in rcpt for c in "\r\n<> "):
                    done.append(f"{domain}: skipped bad rua {uri!r}")
                    continue
                msg = report_mail(cfg, domain, rcpt, report, body, day)
                # Null sender: a report is never bounced back (RFC 8460 §5.3 allows it).
                await asyncio.to_thread(enqueue, msg, "", [rcpt], None)
                done.append(f"{domain}: queued for {rcpt}")
            elif parsed.scheme == "https":
                try:
                    # A rua is anyone's to publish: never POST to an internal service.
                    address = await outward_address(
                        resolver, parsed.hostname or "",
                        allow_private=cfg.delivery.allow_private_destinations)
                    status = await asyncio.to_thread(_post, parsed, address, body, ctx, 30.0)
                    done.append(f"{domain}: POST {uri} -> {status}")
                except (OSError, ValueError, http.client.HTTPException) as exc:
                    done.append(f"{domain}: POST {uri} failed: {exc}")
            else:
                done.append(f"{domain}: skipped rua scheme {parsed.scheme!r}")
    return done


async def daily(cfg: Config, enqueue: Enqueue, resolver: dns.asyncresolver.Resolver,
                wake: object = None, clock: object = None) -> None:
    """Forever: once per UTC day, send the previous day's reports (a marker file in the
    report directory makes it once, across restarts). Cancel to stop."""
    import datetime as dt
    import logging
    import time

    log = logging.getLogger("mailfort.tlsrpt")
    now_fn = clock or time.time
    root = cfg.data_path / "tlsrpt"
    while True:
        now = float(now_fn())  # type: ignore[operator]
        yesterday = dt.datetime.fromtimestamp(now - 86400, dt.UTC).strftime("%Y-%m-%d")
        marker = root / f"sent-{yesterday}"
        if (root / f"{yesterday}.jsonl").exists() and not marker.exists():
            try:
                for line in await send_reports(cfg, enqueue, resolver, yesterday):
                    log.info("TLS report %s", line)
                marker.touch()
                if wake is not None:
                    wake()  # type: ignore[operator]
            except Exception:  # never let reporting stop for good; retry in an hour
                log.exception("sending the TLS reports of %s failed", yesterday)
        await asyncio.sleep(3600)
