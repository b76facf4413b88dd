"""Open relay (third-party relay) and backscatter: what the MX accepts at RCPT.

No message is ever sent to a foreign domain: each relay trial stops after RCPT and
resets the transaction. Only a server that accepts an unknown local user at RCPT gets one
message, to that local address with the null sender, to see what it does at DATA.
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
from mailfort.audit.client import NoReply, ProbeError
from mailfort.audit.context import Context
from mailfort.audit.registry import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    WARN,
    Verdict,
    check,
    inconclusive,
    skip,
)


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
    addresses = [a for a in (t.known_address, unknown_local(ctx)) if a]
    _, codes = trials.rcpts(foreign(ctx, "sender"), [f"<{a}>" for a in addresses])
    got = dict(zip(addresses, map(accepted, codes), strict=True))
    return got.get(t.known_address or ""), got.get(addresses[-1]) if t.domain else None


def relay_senders(ctx: Context) -> list[str]:
    """The envelope senders to try relaying for: the null sender, a foreign one, a made-up
    local one, and the known local user. A server that relays "for its own domain's
    senders" trusts a MAIL FROM that anyone can forge; some trust only real users."""
    t = ctx.target
    local = t.domain or ip_literal(ctx)
    out = ["", foreign(ctx, "sender"), f"{PROBE_LOCAL}@{local}"]
    if t.known_address:
        out.append(t.known_address)
    return out


@check("relay.open", "2", order=10)
def open_relay(ctx: Context) -> Verdict:
    """Every relay form with every sender: one MAIL per sender and all forms as RCPTs
    (RSET after), so four senders cost a few sessions, not one per trial."""
    t = ctx.target
    ctx.port("smtp")
    trials = Trials(ctx)
    relayed: list[str] = []
    ambiguous: list[str] = []
    senders: list[str] = []
    tried = 0
    try:
        known, unknown = _controls(ctx, trials)
        forms = relay_patterns(t.domain, t.foreign_domain, ip_literal(ctx))
        for sender in relay_senders(ctx):
            _, codes = trials.rcpts(sender, [rcpt for rcpt, _ in forms])
            tried += len(forms)
            for (rcpt, aimed_local), code in zip(forms, codes, strict=True):
                if accepted(code):
                    trial = f"MAIL FROM:<{sender}> RCPT TO:{rcpt}"
                    if aimed_local and unknown:
                        ambiguous.append(trial)
                    else:
                        relayed.append(trial)
                        if f"<{sender}>" not in senders:
                            senders.append(f"<{sender}>")
                    ctx.note(f"accepted: {trial}")
    finally:
        trials.close()
    n = trials.reconnects
    if relayed:
        return Verdict(FAIL, "relay.accepted", {"n": len(relayed), "tried": tried,
                                                "senders": ", ".join(senders),
                                                "first": relayed[0]})
    if ambiguous:
        return Verdict(WARN, "relay.ambiguous", {"n": len(ambiguous), "first": ambiguous[0]})
    if known is None:
        return Verdict(INCONCLUSIVE, "control.none", {"tried": tried})
    if not known:
        return Verdict(INCONCLUSIVE, "control.known-refused", {"address": t.known_address})
    return Verdict(PASS, "relay.refused", {"tried": tried, "reconnects": n,
                                           "senders": len(relay_senders(ctx))})


def _data_for_unknown(ctx: Context, nobody: str) -> tuple[str, int]:
    """What the server does with a message for the unknown user it accepted at RCPT:
    ("accepted" | "refused" | "rcpt-only", code). The null sender keeps any bounce from
    going anywhere, and the message never leaves the local domain. A drop on the way
    leaves "rcpt-only": the RCPT acceptance was seen all the same."""
    try:
        return _send_to_unknown(ctx, nobody)
    except ProbeError:
        return "rcpt-only", 0


def _send_to_unknown(ctx: Context, nobody: str) -> tuple[str, int]:
    with ctx.session("smtp") as (c, _):
        mail, _ = c.cmd("MAIL FROM:<>")
        rcpt, _ = c.cmd(f"RCPT TO:<{nobody}>") if accepted(mail) else (0, [])
        if not accepted(rcpt):
            return "rcpt-only", rcpt or mail
        code, _ = c.cmd("DATA")
        if code != 354:
            return "rcpt-only", code
        c.send((f"From: <mailfort-audit@{ctx.target.foreign_domain}>\r\nTo: <{nobody}>\r\n"
                "Subject: mailfort audit: unknown-recipient probe\r\n\r\n"
                "This message tests whether mail for a user that does not exist is accepted."
                "\r\n.\r\n").encode(), note="<message for the unknown user>")
        try:
            final, _ = c.reply()
        except NoReply as exc:  # it has the message and may still accept it
            raise inconclusive("probe.no-reply", what="the message for the unknown user",
                               error=str(exc)) from exc
    return ("accepted" if accepted(final) else "refused"), final


@check("backscatter.unknown-user", "3", order=11)
def backscatter(ctx: Context) -> Verdict:
    """An unknown user accepted at RCPT is a FAIL; a message to them (null sender) then
    says whether the server took it (and must bounce or drop it) or refused it at DATA,
    so that the result says what was seen."""
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
        nobody = unknown_local(ctx) or ""
        what, code = _data_for_unknown(ctx, nobody)
        key = {"refused": "backscatter.data-refused"}.get(what, f"backscatter.{what}")
        return Verdict(FAIL, key, {"domain": t.domain, "code": code})
    if known is None:
        return Verdict(INCONCLUSIVE, "control.none", {"tried": 1})
    if not known:
        return Verdict(INCONCLUSIVE, "control.known-refused", {"address": t.known_address})
    return Verdict(PASS, "backscatter.refused", {})
