"""Open relay (third-party relay) and backscatter: what the MX accepts at RCPT.

No message is ever sent: each trial stops after RCPT and resets the transaction.
"""

from __future__ import annotations

from mailfort.audit.checks.common import (
    PROBE_LOCAL,
    Trials,
    accepted,
    foreign,
    ip_literal,
    unknown_local,
)
from mailfort.audit.context import Context
from mailfort.audit.registry import FAIL, INCONCLUSIVE, PASS, WARN, Verdict, check, skip


def relay_patterns(local: str | None, foreign_domain: str,
                   ip: str) -> list[tuple[str, bool]]:
    """(RCPT argument, aimed at the server's own domain) for every classic relay form.

    Forms aimed at the server's own domain or address literal are ambiguous on a server
    that accepts every local recipient (backscatter): they are then weighed as WARN.
    """
    u, f = PROBE_LOCAL, foreign_domain
    out: list[tuple[str, bool]] = [
        (f"<{u}@{f}>", False),
        (f"<{u}@{f.upper()}>", False),
        (f"<{u}@{f}.>", False),
        (f'<"{u}@{f}">', True),
        (f'<"{u}%{f}">', True),
        (f"<{u}%{f}>", True),
        (f"<{f}!{u}>", True),
        (f"<{u}%{f}@{ip}>", True),
        (f"<{u}@{f}@{ip}>", True),
        (f'<"{u}@{f}"@{ip}>', True),
        (f"<@{ip}:{u}@{f}>", False),
        (f"<{f}!{u}@{ip}>", True),
    ]
    if local:
        out += [
            (f"<{u}%{f}@{local}>", True),
            (f"<{u}%{f}@{local.upper()}>", True),
            (f"<{u}%{f}@{local}.>", True),
            (f"<{u}@{f}@{local}>", True),
            (f'<"{u}@{f}"@{local}>', True),
            (f"<@{local}:{u}@{f}>", False),
            (f"<{f}!{u}@{local}>", True),
            (f"<{u}@{local}.{f}>", False),  # look-alike: the local name under a foreign one
            (f"<{u}@mail{local}>", False),  # look-alike: a foreign name ending like local
        ]
    return out


def _controls(ctx: Context, trials: Trials) -> tuple[bool | None, bool | None]:
    """(known user accepted, unknown user accepted); None where not testable."""
    t = ctx.target
    known = unknown = None
    sender = foreign(ctx, "sender")
    if t.known_address:
        known = accepted(trials.rcpt(sender, f"<{t.known_address}>")[1])
    nobody = unknown_local(ctx)
    if nobody:
        unknown = accepted(trials.rcpt(sender, f"<{nobody}>")[1])
    return known, unknown


@check("relay.open", "2", order=10)
def open_relay(ctx: Context) -> Verdict:
    t = ctx.target
    ctx.port("smtp")
    trials = Trials(ctx)
    try:
        known, unknown = _controls(ctx, trials)
        ip = ip_literal(ctx)
        senders = ["", foreign(ctx, "sender"), f"{PROBE_LOCAL}@{t.domain or ip}",
                   f"{PROBE_LOCAL}@{ip}"]
        relayed: list[str] = []
        ambiguous: list[str] = []
        tried = 0
        for rcpt, aimed_local in relay_patterns(t.domain, t.foreign_domain, ip):
            # Every form with the foreign sender; the plain form with each sender.
            for sender in (senders if rcpt == f"<{PROBE_LOCAL}@{t.foreign_domain}>"
                           else senders[1:2]):
                tried += 1
                _, code = trials.rcpt(sender, rcpt)
                if accepted(code):
                    trial = f"MAIL FROM:<{sender}> RCPT TO:{rcpt}"
                    (ambiguous if aimed_local and unknown else relayed).append(trial)
                    ctx.note(f"accepted: {trial}")
    finally:
        trials.close()
    n = trials.reconnects
    if relayed:
        return Verdict(FAIL, "relay.accepted", {"n": len(relayed), "tried": tried,
                                                "first": relayed[0]})
    if ambiguous:
        return Verdict(WARN, "relay.ambiguous", {"n": len(ambiguous), "first": ambiguous[0]})
    if known is None:
        return Verdict(INCONCLUSIVE, "control.none", {"tried": tried})
    if not known:
        return Verdict(INCONCLUSIVE, "control.known-refused", {"address": t.known_address})
    return Verdict(PASS, "relay.refused", {"tried": tried, "reconnects": n})


@check("backscatter.unknown-user", "3", order=11)
def backscatter(ctx: Context) -> Verdict:
    t = ctx.target
    ctx.port("smtp")
    if not t.domain:
        raise skip("need.domain")
    trials = Trials(ctx)
    try:
        known, unknown = _controls(ctx, trials)
    finally:
        trials.close()
    if unknown:
        return Verdict(FAIL, "backscatter.accepted", {"domain": t.domain})
    if known is None:
        return Verdict(INCONCLUSIVE, "control.none", {"tried": 1})
    if not known:
        return Verdict(INCONCLUSIVE, "control.known-refused", {"address": t.known_address})
    return Verdict(PASS, "backscatter.refused", {})
