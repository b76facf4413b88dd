"""Resource limits (the old buffer-overflow and exhaustion row): long lines, SIZE,
recipients, NUL bytes, idle connections, and liveness after all of them."""

from __future__ import annotations

import contextlib
import time

from mailfort.audit.checks.common import accepted, foreign
from mailfort.audit.client import BudgetSpent, NoReply, ProbeError, RawClient
from mailfort.audit.context import IMAP_SERVICES, Context, ext_arg, has_ext, imap_greeting
from mailfort.audit.registry import FAIL, PASS, WARN, Verdict, check, inconclusive, skip


@check("limits.long-line", "6", order=60)
def long_line(ctx: Context) -> Verdict:
    """A command line far past RFC 5321's 512 octets. A refusal is a PASS. A normal answer
    is a WARN, not a FAIL: a server that cuts the line and skips its tail (Postfix, at
    line_length_limit) answers exactly like one that holds every octet in memory, and no
    reply tells them apart from outside."""
    n = ctx.target.long_line
    with ctx.session("smtp") as (c, _):
        try:
            c.send(b"NOOP " + b"A" * n + b"\r\n", note=f"NOOP <{n} octets>")
            code, _ = c.reply()
        except NoReply:
            return Verdict(WARN, "line.silent", {"n": n})
        except ProbeError:
            return Verdict(PASS, "line.closed", {"n": n})
    if accepted(code):
        return Verdict(WARN, "line.accepted", {"n": n, "code": code})
    return Verdict(PASS, "line.refused", {"n": n, "code": code})


def _stream(ctx: Context, c: RawClient, size: int, sender: str) -> None:
    """Send a message of ``size`` octets and the end of data; stops when the budget is
    spent. It has a From: so that only its size can be what a server refuses (a server may
    refuse a message without one, as mailfort's MX does)."""
    line = b"x" * 998 + b"\r\n"
    head = f"From: <{sender}>\r\nSubject: mailfort audit: over-size probe\r\n\r\n".encode()
    c.send(head, note=f"<message body of {size} octets>")
    sent = len(head)
    chunk = line * 64
    while sent < size:
        if ctx.remaining() <= 0:
            raise BudgetSpent("the run's time budget ran out while streaming")
        c.send_raw(chunk)
        sent += len(chunk)
    c.send_raw(b".\r\n")


@check("limits.size", "6", order=61)
def size(ctx: Context) -> Verdict:
    t = ctx.target
    with ctx.session("smtp") as (c, lines):
        arg = ext_arg(lines, "SIZE")
        if not has_ext(lines, "SIZE") or not (arg or "").strip().isdigit() or int(arg or 0) == 0:
            return Verdict(WARN, "size.none", {})
        limit = int(arg or 0)
        code, _ = c.cmd(f"MAIL FROM:<{foreign(ctx, 'sender')}> SIZE={limit + 1}")
        if accepted(code):
            return Verdict(FAIL, "size.declared-accepted", {"limit": limit})
        c.cmd("RSET")
        if not t.known_address or limit + 1 > t.max_size_probe:
            return Verdict(PASS, "size.declared-refused", {"limit": limit})
        m, _ = c.cmd(f"MAIL FROM:<{foreign(ctx, 'sender')}>")
        r, _ = c.cmd(f"RCPT TO:<{t.known_address}>")
        d, _ = c.cmd("DATA") if accepted(m) and accepted(r) else (0, [])
        if d != 354:
            return Verdict(PASS, "size.declared-refused", {"limit": limit})
        try:
            _stream(ctx, c, limit + 1, foreign(ctx, "sender"))
        except (ProbeError, OSError):  # it stopped reading: the message cannot be stored
            return Verdict(PASS, "size.closed", {"limit": limit})
        try:
            final, _ = c.reply()
        except NoReply as exc:  # it has the whole message and may still store it
            raise inconclusive("probe.no-reply", what="the over-size message",
                               error=str(exc)) from exc
        except ProbeError:
            return Verdict(PASS, "size.closed", {"limit": limit})
    if accepted(final):
        return Verdict(FAIL, "size.accepted", {"limit": limit})
    return Verdict(PASS, "size.refused", {"limit": limit, "code": final})


@check("limits.recipients", "6", order=62)
def recipients(ctx: Context) -> Verdict:
    t = ctx.target
    ctx.port("smtp")
    if not t.known_address:
        raise skip("need.user")
    want = t.rcpt_count
    ok = refused = 0
    with ctx.session("smtp") as (c, lines):
        code, _ = c.cmd(f"MAIL FROM:<{foreign(ctx, 'sender')}>")
        if not accepted(code):
            return Verdict(PASS, "rcpt.mail-refused", {"code": code})
        batch = 50 if has_ext(lines, "PIPELINING") else 1
        line = f"RCPT TO:<{t.known_address}>\r\n".encode()
        sent = 0
        try:
            while sent < want:
                k = min(batch, want - sent)
                c.send(line * k, note=f"RCPT TO:<{t.known_address}> ×{k}")
                sent += k
                for _ in range(k):
                    code, _ = c.reply()
                    if accepted(code):
                        ok += 1
                    else:
                        refused += 1
                    if code == 421:
                        raise ProbeError("dropped")
        except NoReply as exc:
            if not refused:  # slow, not refusing: a limit is not shown
                raise inconclusive("probe.no-reply", what=f"{ok} accepted recipients",
                                   error=str(exc)) from exc
        except ProbeError:
            pass
        del c.transcript[12:-4]  # a thousand RCPT lines are not evidence
        if not c.closed:
            with contextlib.suppress(ProbeError):
                c.cmd("RSET")
    if ok >= want:
        return Verdict(FAIL, "rcpt.all", {"n": want})
    return Verdict(PASS, "rcpt.limited", {"n": want, "ok": ok})


@check("limits.nul", "6", order=63)
def nul(ctx: Context) -> Verdict:
    with ctx.session("smtp") as (c, _):
        try:
            code, _ = c.cmd(f"MAIL FROM:<mailfort-audit\0probe@{ctx.target.foreign_domain}>")
        except NoReply as exc:
            raise inconclusive("probe.no-reply", what="MAIL with a NUL",
                               error=str(exc)) from exc
        except ProbeError:
            return Verdict(PASS, "nul.closed", {})
        if not c.closed:
            c.cmd("RSET")
    if accepted(code):
        return Verdict(FAIL, "nul.accepted", {"code": code})
    return Verdict(PASS, "nul.refused", {"code": code})


@check("limits.idle-connections", "6", order=64)
def idle_connections(ctx: Context) -> Verdict:
    """Hold N idle connections and one byte-at-a-time writer open, then ask for a greeting."""
    t = ctx.target
    port = ctx.port("smtp")
    greeting = ctx.greetings.get("smtp", "220")
    if greeting[:1] in ("4", "5"):  # it refuses everyone: a refusal here shows no limit
        raise inconclusive("greeting.refused", service="smtp", code=greeting[:3],
                           text=greeting[4:84])
    held: list[RawClient] = []
    try:
        for _ in range(t.idle_connections):
            try:
                held.append(ctx.raw(port, evidence=False))
            except ProbeError:
                break
        ctx.note(f"{len(held)} idle connections open")
        try:
            slow = ctx.raw(port, evidence=False)
            held.append(slow)
            for b in b"NOO":
                slow.sock.sendall(bytes([b]))
                time.sleep(0.05)
            ctx.note("one client writing a byte at a time")
        except (ProbeError, OSError):
            pass
        started = time.monotonic()
        try:
            fresh = ctx.connect("smtp")
            code, _ = fresh.reply()
            fresh.quit()
        except ProbeError as exc:
            return Verdict(FAIL, "idle.starved", {"n": len(held), "error": str(exc)})
        waited = time.monotonic() - started
    finally:
        for h in held:
            h.close()
    if code == 220:
        return Verdict(PASS, "idle.served", {"n": len(held), "s": f"{waited:.2f}"})
    return Verdict(PASS, "idle.refused", {"n": len(held), "code": code})


HUGE_LITERAL = 4294967295  # 2^32 - 1: a server that sizes a buffer from it is done for


def _imap_service(ctx: Context) -> str:
    found = [s for s in IMAP_SERVICES if s in ctx.open_ports]
    if not found:
        raise skip("port.none-of", services=", ".join(IMAP_SERVICES))
    return found[0]


def _closed(c: RawClient, since: int, service: str) -> Verdict:
    """The session ended: politely (an untagged BYE first, RFC 9051 §7.1.5) is a PASS; a
    bare close may be a crashed session process, so it is a WARN."""
    if any(ln.upper().startswith("< * BYE") for ln in c.transcript[since:]):
        return Verdict(PASS, "literal.closed", {"service": service})
    return Verdict(WARN, "literal.dropped", {"service": service})


def _imap_alive(c: RawClient) -> str:
    """After a refusal: "alive" when a NOOP is answered, "closed" when the server ended
    the session (politely or not); NoReply when it is silent."""
    try:
        status, _ = c.imap("N", "NOOP")
    except NoReply:
        raise
    except ProbeError:
        return "closed"
    return "alive" if status in ("OK", "NO", "BAD") else "closed"


@check("limits.imap-literal", "6", order=65)
def imap_literal(ctx: Context) -> Verdict:
    """A synchronizing literal of 4 GiB must be refused (tagged NO or BAD) without the
    ``+`` that asks for its bytes, and the session must go on or end cleanly. No literal
    byte is ever sent."""
    service = _imap_service(ctx)
    c = ctx.imap(service)
    try:
        since = len(c.transcript)
        c.send(f"A LOGIN {{{HUGE_LITERAL}}}\r\n".encode())
        try:
            status, _ = c.tagged("A")
        except NoReply:
            return Verdict(WARN, "literal.silent", {"service": service})
        except ProbeError:
            return _closed(c, since, service)
        if status == "+":
            c.close()  # it now reads literal bytes: a LOGOUT would be taken as some of them
            return Verdict(FAIL, "literal.continued", {"service": service, "n": HUGE_LITERAL})
        try:
            state = _imap_alive(c)
        except NoReply:
            return Verdict(FAIL, "literal.wedged", {"service": service})
        if state == "closed":
            return _closed(c, since, service)
        return Verdict(PASS, "literal.refused", {"service": service})
    finally:
        c.quit(imap=True)


@check("limits.imap-line", "6", order=66)
def imap_line(ctx: Context) -> Verdict:
    """A command line of ``--long-line`` octets, nearly all of it the tag, with the command
    (NOOP) at its end. Unlike SMTP's long line, an answer here proves the line was held
    whole: a server that cut it would have lost the command, and its tagged reply echoes
    the tag. A refusal (BAD, an untagged BAD) or a close is a PASS; a close with or without
    BYE cannot be told apart here, unlike after the literal: the server closes while the
    line is still coming, and the reset that follows may take its BYE with it."""
    service = _imap_service(ctx)
    n = ctx.target.long_line
    c = ctx.imap(service)
    try:
        try:
            c.send(b"T" * n + b" NOOP\r\n", note=f"<{n}-octet tag> NOOP")
            _, untagged = c.imap("N", "NOOP")
        except NoReply:
            return Verdict(WARN, "line.silent", {"n": n})
        except ProbeError:
            return Verdict(PASS, "imap-line.closed", {"service": service, "n": n})
        if "T OK " in "".join(untagged) + " ":  # a long reply line may come in pieces
            return Verdict(FAIL, "imap-line.held", {"service": service, "n": n})
        return Verdict(PASS, "imap-line.refused", {"service": service, "n": n})
    finally:
        c.quit(imap=True)


@check("limits.liveness", "6", order=99)
def liveness(ctx: Context) -> Verdict:
    # A port whose implicit TLS handshake failed already at the start (greeting "") did
    # not die of the probes: tls.starttls reports it.
    services = [s for s in ("smtp", "submission", "submissions", "pop3", "pop3s", "imap",
                            "imaps")
                if s in ctx.open_ports and ctx.greetings.get(s) != ""]
    if not services:
        raise skip("port.none-of",
                   services="smtp, submission, submissions, pop3, pop3s, imap, imaps")
    dead = []
    for service in services:
        try:
            c = ctx.connect(service)
            if service.startswith("pop3"):
                ok = c.status()[0]
                c.quit(pop3=True)
            elif service.startswith("imap"):
                ok = imap_greeting(c).upper().startswith(("* OK", "* PREAUTH"))
                c.quit(imap=True)
            else:  # greeting as at the start (a 554 greeting is a greeting too)
                code = c.reply()[0]
                ok = code == 220 or str(code) == ctx.greetings.get(service, "")[:3]
                c.quit()
            if not ok:
                dead.append(f"{service}: no greeting")
        except ProbeError as exc:
            dead.append(f"{service}: {exc}")
    if dead:
        return Verdict(FAIL, "live.dead", {"where": "; ".join(dead)})
    return Verdict(PASS, "live.ok", {"services": ", ".join(services)})
