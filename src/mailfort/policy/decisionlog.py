"""One log line per decision, in a stable format that fail2ban and log tools can match.

Every line is logged by the ``mailfort.decision`` logger and starts with a fixed word, then
the client address in brackets, before anything the client chose (folded here, not in the
log)::

    reject: CONNECT from [192.0.2.1]: 554 5.7.1 Service unavailable; client [192.0.2.1] \
        blocked using bl.example
    reject: RCPT from [192.0.2.1]: 554 5.7.1 Relay access denied; from=<a@x.test> \
        to=<b@y.test> helo=<h>
    connect from [192.0.2.1] service=mx
    accept: DATA from [192.0.2.1]: 250 2.0.0 OK queued as 1a2b; from=<a@x.test> nrcpt=1 \
        size=420 tls=TLSv1.3
    auth ok from [192.0.2.1] user=alice@example.test
    auth failed from [192.0.2.1] user=alice@example.test
    auth blocked from [192.0.2.1] user=alice@example.test
    dnsbl [192.0.2.1] listed in zen.example (127.0.0.2) weight=2

What the client chose (addresses, HELO name, user name) is quoted after the address and
cleaned of control characters and brackets, so it can neither forge a line nor put another
address where a filter looks for the client's. The format is part of mailfort's interface:
change it only together with the fail2ban example in the README and its test.

Each function also moves the matching Prometheus counter (mailfort/metrics.py), and hands
its fields to the logger (``extra={"fields": ...}``) for the JSON log format. Nothing here
takes a password or message content: none can reach the log or the metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from mailfort import metrics
from mailfort.protocol.replies import Reply

log = logging.getLogger("mailfort.decision")

_MAX_FIELD = 200


def clean(value: object) -> str:
    """A client-chosen value made safe for one log line."""
    text = "" if value is None else str(value)
    out = "".join(
        "?" if (ord(c) < 0x20 or ord(c) == 0x7F or c in "[]") else c for c in text
    )
    return out if len(out) <= _MAX_FIELD else out[:_MAX_FIELD] + "..."


def reply_text(reply: Reply) -> str:
    text = " ".join(reply.lines)
    return f"{reply.code} {reply.enhanced} {text}".replace("  ", " ").strip()


def _fields(fields: dict[str, object]) -> str:
    parts = [f"{k.rstrip('_')}=<{clean(v)}>" for k, v in fields.items() if v is not None]
    return "; " + " ".join(parts) if parts else ""


def _extra(event: str, ip: str, **fields: object) -> dict[str, object]:
    clean_fields = {k.rstrip("_"): clean(v) for k, v in fields.items() if v is not None}
    return {"fields": {"event": event, "client": clean(ip), **clean_fields}}


def connect(service: str, ip: str) -> None:
    """A connection accepted by a listener (before any limit or screening)."""
    metrics.CONNECTIONS.labels(service).inc()
    log.info("connect from [%s] service=%s", clean(ip), clean(service),
             extra=_extra("connect", ip, service=service))


def reject(stage: str, ip: str, reply: Reply, **fields: object) -> None:
    """A refused connection (stage CONNECT) or command (HELO, MAIL, RCPT, DATA, AUTH)."""
    metrics.REFUSED.labels(stage, reply.enhanced or str(reply.code)).inc()
    log.info("reject: %s from [%s]: %s%s", stage, clean(ip), reply_text(reply), _fields(fields),
             extra=_extra("reject", ip, stage=stage, code=reply.code, status=reply.enhanced,
                          reply=reply_text(reply), **fields))


def accept(ip: str, reply: Reply, sender: object, nrcpt: int, size: int,
           tls: str = "") -> None:
    """A message stored or queued (its 250 is earned); ``tls``: the protocol version."""
    metrics.ACCEPTED.inc()
    metrics.ACCEPTED_BYTES.inc(size)
    log.info("accept: DATA from [%s]: %s; from=<%s> nrcpt=%d size=%d tls=%s",
             clean(ip), reply_text(reply), clean(sender), nrcpt, size, clean(tls or "none"),
             extra=_extra("accept", ip, reply=reply_text(reply), from_=sender, nrcpt=nrcpt,
                          size=size, tls=tls or "none"))


def auth_ok(ip: str, user: str) -> None:
    metrics.AUTH.labels("ok").inc()
    log.info("auth ok from [%s] user=%s", clean(ip), clean(user),
             extra=_extra("auth_ok", ip, user=user))


def auth_failed(ip: str, user: str, service: str = "") -> None:
    metrics.AUTH.labels("failed").inc()
    svc = f" service={clean(service)}" if service else ""
    log.info("auth failed from [%s] user=%s%s", clean(ip), clean(user), svc,
             extra=_extra("auth_failed", ip, user=user, service=service or None))


def auth_blocked(ip: str, user: str) -> None:
    """A client over the failure limit: its attempt was not even checked."""
    metrics.AUTH.labels("blocked").inc()
    metrics.BLOCKS.labels("auth").inc()
    log.info("auth blocked from [%s] user=%s", clean(ip), clean(user),
             extra=_extra("auth_blocked", ip, user=user))


def auth_unavailable(ip: str, user: str) -> None:
    """A login refused for now: the shared counters cannot be reached (policy/authn.py)."""
    metrics.AUTH.labels("unavailable").inc()
    log.warning("auth temporarily refused from [%s] user=%s: shared counters unavailable",
                clean(ip), clean(user), extra=_extra("auth_unavailable", ip, user=user))


def connection_refused(ip: str, text: str, reason: str) -> None:
    """A refusal at greeting by a service whose replies are not SMTP replies (POP3)."""
    metrics.REFUSED.labels("CONNECT", clean(reason)).inc()
    log.info("reject: CONNECT from [%s]: %s; reason=%s", clean(ip), clean(text), clean(reason),
             extra=_extra("reject", ip, stage="CONNECT", reply=text, reason=reason))


def dnsbl_listed(ip: str, zone: str, codes: Iterable[str], weight: int) -> None:
    metrics.BLOCKS.labels("dnsbl").inc()
    codes = list(codes)
    log.info("dnsbl [%s] listed in %s (%s) weight=%d", clean(ip), clean(zone),
             ",".join(codes), weight,
             extra=_extra("dnsbl", ip, zone=zone, codes=",".join(codes), weight=weight))
