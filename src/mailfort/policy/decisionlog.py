"""One log line per decision, in a stable format that fail2ban and log tools can match.

Every line is logged by the ``mailfort.decision`` logger and starts with a fixed word, then
the client address in brackets, before anything the client chose (folded here, not in the
log)::

    reject: CONNECT from [192.0.2.1]: 554 5.7.1 Service unavailable; client [192.0.2.1] \
        blocked using bl.example
    reject: RCPT from [192.0.2.1]: 554 5.7.1 Relay access denied; from=<a@x.test> \
        to=<b@y.test> helo=<h>
    accept: DATA from [192.0.2.1]: 250 2.0.0 OK queued as 1a2b; from=<a@x.test> nrcpt=1 size=420
    auth failed from [192.0.2.1] user=alice@example.test
    auth blocked from [192.0.2.1] user=alice@example.test
    dnsbl [192.0.2.1] listed in zen.example (127.0.0.2) weight=2

What the client chose (addresses, HELO name, user name) is quoted after the address and
cleaned of control characters and brackets, so it can neither forge a line nor put another
address where a filter looks for the client's. The format is part of mailfort's interface:
change it only together with the fail2ban example in the README and its test.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

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


def reject(stage: str, ip: str, reply: Reply, **fields: object) -> None:
    """A refused connection (stage CONNECT) or command (HELO, MAIL, RCPT, DATA, AUTH)."""
    log.info("reject: %s from [%s]: %s%s", stage, clean(ip), reply_text(reply), _fields(fields))


def accept(ip: str, reply: Reply, sender: object, nrcpt: int, size: int) -> None:
    """A message stored or queued (its 250 is earned)."""
    log.info("accept: DATA from [%s]: %s; from=<%s> nrcpt=%d size=%d",
             clean(ip), reply_text(reply), clean(sender), nrcpt, size)


def auth_failed(ip: str, user: str, service: str = "") -> None:
    svc = f" service={clean(service)}" if service else ""
    log.info("auth failed from [%s] user=%s%s", clean(ip), clean(user), svc)


def auth_blocked(ip: str, user: str) -> None:
    """A client over the failure limit: its attempt was not even checked."""
    log.info("auth blocked from [%s] user=%s", clean(ip), clean(user))


def connection_refused(ip: str, text: str, reason: str) -> None:
    """A refusal at greeting by a service whose replies are not SMTP replies (POP3)."""
    log.info("reject: CONNECT from [%s]: %s; reason=%s", clean(ip), clean(text), clean(reason))


def dnsbl_listed(ip: str, zone: str, codes: Iterable[str], weight: int) -> None:
    log.info("dnsbl [%s] listed in %s (%s) weight=%d", clean(ip), clean(zone),
             ",".join(codes), weight)
