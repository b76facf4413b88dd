"""Pieces several checks share: RCPT trials that survive dropped sessions, addresses."""

from __future__ import annotations

import base64
import secrets
import socket

from mailfort.audit.client import ProbeError, RawClient
from mailfort.audit.context import Context
from mailfort.audit.registry import inconclusive

PROBE_LOCAL = "mailfort-audit"
MAX_RECONNECTS = 30


def accepted(code: int | None) -> bool:
    return code is not None and 200 <= code < 300


def foreign(ctx: Context, local: str = PROBE_LOCAL) -> str:
    return f"{local}@{ctx.target.foreign_domain}"


def unknown_local(ctx: Context) -> str | None:
    """An address at the local domain that surely does not exist."""
    d = ctx.target.domain
    return f"no-such-user-{secrets.token_hex(4)}@{d}" if d else None


def ip_literal(ctx: Context) -> str:
    """The server's address as an RFC 5321 address literal."""
    try:
        ip = socket.getaddrinfo(ctx.target.host, None, type=socket.SOCK_STREAM)[0][4][0]
    except OSError:
        ip = ctx.target.host
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


def auth_plain(c: RawClient, user: str, password: str) -> int:
    """AUTH PLAIN with an initial response; the transcript never shows the credentials."""
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    c.send(f"AUTH PLAIN {token}\r\n".encode(), note="AUTH PLAIN <credentials hidden>")
    code, _ = c.reply()
    return code


class Trials:
    """MAIL/RCPT/RSET trials on one SMTP service, reconnecting when the server drops us.

    A strict server closes the session after N errors (mailfort after 20, Postfix after
    20), and every refused relay attempt is an error: the trials reconnect and go on, so
    that neither a drop nor a tarpit turns into a false PASS. Servers that slow down their
    replies past a soft error limit (mailfort and Postfix after 10) are spared the wait:
    after ``FRESH_AFTER_ERRORS`` refusals the trials start a new session of their own, and
    after a drop they start one before the number of refusals the server allowed, so that
    a strict limit costs one drop, not one per session.
    """

    FRESH_AFTER_ERRORS = 8

    def __init__(self, ctx: Context, service: str = "smtp", *, tls: bool = False) -> None:
        self.ctx, self.service, self.tls = ctx, service, tls
        self.c: RawClient | None = None
        self.reconnects = 0
        self.errors = 0  # refusals in the current session
        self.fresh_after = self.FRESH_AFTER_ERRORS

    def _session(self) -> RawClient:
        if self.c is not None and not self.c.closed and self.errors >= self.fresh_after:
            self.c.quit()
            self.c = None
        if self.c is None or self.c.closed:
            if self.c is not None and self.errors:  # dropped after this many refusals:
                # stay below that next time (each further drop lowers it by one more)
                self.fresh_after = max(1, min(self.fresh_after, self.errors) - 1)
            self.errors = 0
            if self.c is not None:
                self.reconnects += 1
                if self.reconnects > MAX_RECONNECTS:
                    raise inconclusive("probe.drops", n=self.reconnects)
                last = self.ctx.evidence[-1].strip() if self.ctx.evidence else "-"
                self.ctx.note(f"reconnect: the server ended the session ({last[:60]})")
            self.c, _ = self.ctx.smtp(self.service, tls=self.tls)
        return self.c

    def rcpt(self, sender: str, rcpt: str) -> tuple[int, int | None]:
        """(MAIL code, RCPT code or None when MAIL was refused); RSET after."""
        for _ in range(3):
            c = self._session()
            try:
                mail, _ = c.cmd(f"MAIL FROM:<{sender}>")
                if mail == 421:
                    c.close()
                    continue
                code: int | None = None
                self.errors += mail >= 400
                if accepted(mail):
                    code, _ = c.cmd(f"RCPT TO:{rcpt}")
                    if code == 421:
                        c.close()
                        continue
                    self.errors += code >= 400
                if c.cmd("RSET")[0] == 421:
                    c.close()  # dropped after the error count: the next trial reconnects
                return mail, code
            except ProbeError:
                c.close()
        raise ProbeError("the server keeps dropping the session")

    def rcpts(self, sender: str, rcpts: list[str]) -> tuple[int, list[int | None]]:
        """One MAIL and several RCPTs, RSET after: (MAIL code, RCPT codes; None where
        MAIL was refused). Fewer sessions than one trial per RCPT; a session that ends
        or reaches ``fresh_after`` refusals is replaced and the rest tried anew."""
        codes: list[int | None] = []
        mail, stalls = 0, 0
        while len(codes) < len(rcpts):
            c = self._session()
            before = len(codes)
            try:
                mail, _ = c.cmd(f"MAIL FROM:<{sender}>")
                if mail == 421:
                    raise ProbeError("MAIL answered 421")
                self.errors += mail >= 400
                if not accepted(mail):
                    return mail, codes + [None] * (len(rcpts) - len(codes))
                while len(codes) < len(rcpts) and self.errors < self.fresh_after:
                    code, _ = c.cmd(f"RCPT TO:{rcpts[len(codes)]}")
                    if code == 421:
                        raise ProbeError("RCPT answered 421")
                    self.errors += code >= 400
                    codes.append(code)
                if c.cmd("RSET")[0] == 421:
                    c.close()
            except ProbeError:
                c.close()  # the next round reconnects and goes on where this one stopped
            stalls = 0 if len(codes) > before else stalls + 1
            if stalls >= 3:
                raise ProbeError("the server keeps dropping the session")
        return mail, codes

    def close(self) -> None:
        if self.c is not None:
            self.c.quit()
