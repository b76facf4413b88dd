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
    milter [192.0.2.1] id=1a2b filter=inet:127.0.0.1:11332 action=reject \
        detail=<5.7.1 Gtube pattern>

What the client chose (addresses, HELO name, user name) is quoted after the address and
cleaned of control characters and brackets, so it can neither forge a line nor put another
address where a filter looks for the client's. The format is part of mailfort's interface:
change it only together with the fail2ban example in the README and its test.

Each function also moves the matching Prometheus counter (mailfort/metrics.py), and hands
its fields to the logger (``extra={"fields": ...}``) for the JSON log format. Nothing here
takes a password or message content: none can reach the log or the metrics. A line is
formatted (and its values cleaned, once for the text and the fields alike) only when the
logger would emit it: the MX writes two of these per message.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

from mailfort import metrics
from mailfort.protocol.replies import Reply

log = logging.getLogger("mailfort.decision")

_MAX_FIELD = 200
_UNSAFE = re.compile(r"[\x00-\x1f\x7f\[\]]")  # controls and the brackets around the client


def clean(value: object) -> str:
    """A client-chosen value made safe for one log line."""
    text = "" if value is None else str(value)
    if _UNSAFE.search(text) is not None:
        text = _UNSAFE.sub("?", text)
    return text if len(text) <= _MAX_FIELD else text[:_MAX_FIELD] + "..."


def reply_text(reply: Reply) -> str:
    text = " ".join(reply.lines)
    return f"{reply.code} {reply.enhanced} {text}".replace("  ", " ").strip()


def _on() -> bool:
    return log.isEnabledFor(logging.INFO)


def _cleaned(fields: dict[str, object]) -> dict[str, str]:
    """The fields that were given (not None), named without the trailing ``_`` that
    keeps ``from_`` a valid keyword, cleaned."""
    return {k.rstrip("_"): clean(v) for k, v in fields.items() if v is not None}


def _emit(event: str, ip: str, fields: dict[str, str], msg: str, *args: object) -> None:
    log.info(msg, *args, extra={"fields": {"event": event, "client": ip, **fields}})


def connect(service: str, ip: str) -> None:
    """A connection accepted by a listener (before any limit or screening)."""
    metrics.CONNECTIONS.labels(service).inc()
    if _on():
        c_ip, c_service = clean(ip), clean(service)
        _emit("connect", c_ip, {"service": c_service}, "connect from [%s] service=%s",
              c_ip, c_service)


def reject(stage: str, ip: str, reply: Reply, **fields: object) -> None:
    """A refused connection (stage CONNECT) or command (HELO, MAIL, RCPT, DATA, AUTH)."""
    metrics.REFUSED.labels(stage, reply.enhanced or str(reply.code)).inc()
    if not _on():
        return
    c_ip, text, given = clean(ip), reply_text(reply), _cleaned(fields)
    tail = "; " + " ".join(f"{k}=<{v}>" for k, v in given.items()) if given else ""
    _emit("reject", c_ip, {"stage": clean(stage), "code": str(reply.code),
                           "status": clean(reply.enhanced), "reply": clean(text), **given},
          "reject: %s from [%s]: %s%s", stage, c_ip, text, tail)


def accept(ip: str, reply: Reply, sender: object, nrcpt: int, size: int,
           tls: str = "") -> None:
    """A message stored or queued (its 250 is earned); ``tls``: the protocol version."""
    metrics.ACCEPTED.inc()
    metrics.ACCEPTED_BYTES.inc(size)
    if not _on():
        return
    c_ip, text, c_from, c_tls = clean(ip), reply_text(reply), clean(sender), clean(tls or "none")
    fields = {"reply": clean(text), "from": c_from, "nrcpt": str(nrcpt), "size": str(size),
              "tls": c_tls}
    if sender is None:
        del fields["from"]
    _emit("accept", c_ip, fields, "accept: DATA from [%s]: %s; from=<%s> nrcpt=%d size=%d tls=%s",
          c_ip, text, c_from, nrcpt, size, c_tls)


def auth_ok(ip: str, user: str) -> None:
    metrics.AUTH.labels("ok").inc()
    if _on():
        c_ip, c_user = clean(ip), clean(user)
        _emit("auth_ok", c_ip, {"user": c_user}, "auth ok from [%s] user=%s", c_ip, c_user)


def auth_failed(ip: str, user: str, service: str = "") -> None:
    metrics.AUTH.labels("failed").inc()
    if not _on():
        return
    c_ip, c_user = clean(ip), clean(user)
    fields = {"user": c_user}
    svc = ""
    if service:
        fields["service"] = clean(service)
        svc = f" service={fields['service']}"
    _emit("auth_failed", c_ip, fields, "auth failed from [%s] user=%s%s", c_ip, c_user, svc)


def auth_blocked(ip: str, user: str) -> None:
    """A client over the failure limit: its attempt was not even checked."""
    metrics.AUTH.labels("blocked").inc()
    metrics.BLOCKS.labels("auth").inc()
    if _on():
        c_ip, c_user = clean(ip), clean(user)
        _emit("auth_blocked", c_ip, {"user": c_user}, "auth blocked from [%s] user=%s",
              c_ip, c_user)


def auth_unavailable(ip: str, user: str) -> None:
    """A login refused for now: the shared counters cannot be reached (policy/authn.py)."""
    metrics.AUTH.labels("unavailable").inc()
    c_ip, c_user = clean(ip), clean(user)
    log.warning("auth temporarily refused from [%s] user=%s: shared counters unavailable",
                c_ip, c_user,
                extra={"fields": {"event": "auth_unavailable", "client": c_ip, "user": c_user}})


def connection_refused(ip: str, text: str, reason: str) -> None:
    """A refusal at greeting by a service whose replies are not SMTP replies (POP3)."""
    metrics.REFUSED.labels("CONNECT", clean(reason)).inc()
    if _on():
        c_ip, c_reason = clean(ip), clean(reason)
        _emit("reject", c_ip, {"stage": "CONNECT", "reply": clean(text), "reason": c_reason},
              "reject: CONNECT from [%s]: %s; reason=%s", c_ip, clean(text), c_reason)


def dnsbl_listed(ip: str, zone: str, codes: Iterable[str], weight: int) -> None:
    metrics.BLOCKS.labels("dnsbl").inc()
    if _on():
        c_ip, c_zone, joined = clean(ip), clean(zone), ",".join(codes)
        _emit("dnsbl", c_ip, {"zone": c_zone, "codes": clean(joined), "weight": str(weight)},
              "dnsbl [%s] listed in %s (%s) weight=%d", c_ip, c_zone, joined, weight)


_MILTER_COUNTERS: dict[str, Any] = {}  # action → its counter: ``labels`` costs a lock each


def milter(ip: str, queue_id: str, address: str, action: str, detail: object = "") -> None:
    """A content filter's verdict on one message (server/milters.py): accept, continue,
    reject, tempfail, discard, quarantine, or error (then ``detail`` says what the
    milter's on_error made of it)."""
    counter = _MILTER_COUNTERS.get(action)
    if counter is None:  # a handful of actions (milter_client.MilterVerdict): bounded
        counter = _MILTER_COUNTERS[action] = metrics.MILTER.labels(action)
    counter.inc()
    if _on():
        c_ip, c_id, c_addr, c_action = clean(ip), clean(queue_id), clean(address), clean(action)
        c_detail = clean(detail)
        tail = f" detail=<{c_detail}>" if c_detail else ""
        _emit("milter", c_ip, {"id": c_id, "filter": c_addr, "action": c_action,
                               "detail": c_detail},
              "milter [%s] id=%s filter=%s action=%s%s", c_ip, c_id, c_addr, c_action, tail)
