"""Deliver one message to the recipients of one domain over one SMTP connection.

TLS policy: STARTTLS whenever the server offers it. Without DANE or MTA-STS there is no
name to verify a certificate against that an attacker could not also forge, so the default
is opportunistic (encrypt, do not verify), as every MTA does. A ``TLSPolicy``
(delivery/tlspolicy.py) raises that per destination: under ``encrypt`` a server that does
not offer STARTTLS, refuses it or fails the handshake is a temporary failure (4.7.x) for
that host and the message is never sent in clear to it; ``verify`` also requires a
certificate that chains to a trusted CA and names the MX host; ``dane`` requires one that
matches the host's TLSA records. MTA-STS "testing" checks like ``verify`` and reports a
failure, then delivers over a fresh, opportunistic connection. Every TLS outcome under a
policy goes to the ``report`` callback (TLS-RPT).

REQUIRETLS (RFC 8689, ``deliver(requiretls=True)``): the message goes only to a host whose
name is vouched for (DANE, a matching MTA-STS policy, a configured route) over TLS verified
against that name, and that offers REQUIRETLS; the parameter is passed on. Any other host is
a final failure for this message, and when all are, its recipients fail (5.7.30, or 5.7.10
when TLS could not be set up): a bounce, never a send in clear or unverified.

Hosts are tried in order (all addresses of each MX) until one gives a definite answer to
the transaction; connection errors, timeouts and greeting/EHLO refusals move on to the next.
A server's limit of recipients per transaction (452, or 552 as RFC 821 had it, at a later
RCPT: RFC 5321 §4.5.3.1.10) ends the transaction there; the remaining recipients go in the
next one on the same connection, at once.

The message is streamed from its file during DATA (``_send_data``), a chunk at a time with
the transport's flow control, so a delivery holds one chunk of it in memory, not the whole.

SMTPUTF8 (RFC 6531): a transaction whose envelope addresses or headers are non-ASCII sends
the ``SMTPUTF8`` MAIL parameter, and only to a host that offers it. A host that does not is
skipped; when every host reached lacks it, the recipients fail with 5.6.7 (a bounce to the
submitter). There is no downgrade: rewriting addresses or headers would change (and break
the signatures of) a message we did not write.

Smarthost (a configured ``Route``, ``deliver(route=...)``): ``tls = "implicit"`` starts TLS
on connect (port 465), ``"starttls"`` requires STARTTLS; both verify the certificate
against the route's host (the policy's ``verify`` level, with the route's ``cafile``). With
``auth_user`` the client logs in (AUTH PLAIN, else LOGIN) only on a connection whose TLS
was verified: a handshake that fails, or a session without verified TLS, never gets the
password. The password is read from ``auth_password_file`` at each login, by the service
user (so a changed password needs no restart), and appears in no reply, log or DSN. A
refused login is a temporary failure carrying the provider's reply: the message stays
queued, and the bounce at expiry says why.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import errno
import functools
import os
import re
import socket
import ssl
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import aiosmtplib
from aiosmtplib import SMTPResponse

from mailfort.config import Route
from mailfort.delivery import dane
from mailfort.delivery.message import (
    CHUNK,
    DataEncoder,
    Outbound,
    ReturnPathFilter,
    needs_smtputf8,
)
from mailfort.delivery.mx import Target
from mailfort.delivery.requiretls import NEEDS_REQUIRETLS
from mailfort.delivery.tlspolicy import HostPlan, Reporter, TLSEvent, TLSPolicy, failure_type

Outcome = Literal["delivered", "temporary", "permanent"]

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass
class RcptResult:
    """What became of one recipient in this attempt."""

    recipient: str
    outcome: Outcome
    reply: str  # "250 2.0.0 ok" as the server said it, or a local diagnostic
    status: str  # RFC 3463 enhanced status, e.g. "5.1.1"
    remote_mta: str = ""


@dataclass
class DomainResult:
    results: dict[str, RcptResult] = field(default_factory=dict)
    host: str = ""  # the host that took the transaction, if any
    tls: bool = False
    tls_version: str = ""  # e.g. "TLSv1.3"
    verified: str = ""  # how the peer was authenticated: "", "dane", "mta-sts", "policy verify"
    # For the delivery log line: host[ip]:port of the host that answered last ("" when
    # none could be reached), and when its mail transaction began (time.monotonic(), 0:
    # never), which splits connection setup from the transaction in ``delays=``.
    relay: str = ""
    mail_at: float = 0.0

    @property
    def hop(self) -> str:
        """The TLS of the hop, for logs and DSNs: "TLSv1.3, verified by dane" / "no TLS"."""
        return hop_text(self.tls, self.tls_version, self.verified)


def hop_text(tls: bool, version: str, verified: str) -> str:
    if not tls:
        return "no TLS"
    return f"{version or 'TLS'}, verified by {verified}" if verified else \
        f"{version or 'TLS'}, not verified"


def _one_line(text: str, limit: int = 900) -> str:
    """Remote text goes into queue state and bounce headers: no control chars, bounded."""
    text = " ".join(text.split())
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


def status_of(code: int, message: str) -> str:
    """The enhanced status in a reply, or one derived from the basic code (RFC 3463)."""
    m = _ENHANCED.match(message.strip())
    if m and m.group(1) == str(code)[0]:
        return m.group(0)
    return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "4.0.0")


def _classify(code: int) -> Outcome:
    if 200 <= code < 300:
        return "delivered"
    return "permanent" if 500 <= code < 600 else "temporary"


def _reply(code: int, message: str) -> str:
    return _one_line(f"{code} {message}")


def _path(address: str) -> bytes:
    """An RFC 5321 path. Addresses were validated at submission; refuse CR/LF/<> anyway."""
    if any(c in address for c in "\r\n<>") or any(ord(c) < 32 for c in address):
        raise ValueError(f"unsafe address {address!r}")
    return b"<" + address.encode("utf-8") + b">"


class _HostFailure(Exception):
    """This host could not take the transaction; try the next one."""

    def __init__(self, status: str, reply: str, *, no_smtputf8: bool = False,
                 tls_result: str = "", final: bool = False) -> None:
        super().__init__(reply)
        self.status = status
        self.reply = reply
        self.no_smtputf8 = no_smtputf8  # reached, but it cannot take this message at all
        self.tls_result = tls_result  # RFC 8460 result-type when the required TLS failed
        self.final = final  # REQUIRETLS: this host can never take this message (RFC 8689)
        self.relay = ""  # host[ip]:port when the host was reached (the log's relay=)

    def for_requiretls(self) -> _HostFailure:
        """The same TLS failure for a REQUIRETLS message: final (RFC 8689 §4.2.1: no
        verified path is no delivery, and a bounce), 5.7.10 when TLS could not be set up
        at all, 5.7.30 when it was not the verified TLS the message requires."""
        status = "5.7.10" if self.tls_result == "starttls-not-supported" else NEEDS_REQUIRETLS
        return _HostFailure(status, f"REQUIRETLS: {self.reply}", tls_result=self.tls_result,
                            final=True)


@functools.cache
def opportunistic_context() -> ssl.SSLContext:
    """Encrypt without verifying (see module docstring); TLS 1.2+ like everything else.

    One context for every delivery, and no CA store loaded: nothing is verified against
    it, and loading it took ~20 ms of the event loop per delivery.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def deliver(
    targets: Sequence[Target],
    sender: str,
    recipients: Sequence[str],
    message: bytes | Outbound,
    *,
    helo: str,
    require_tls: bool = False,
    connect_timeout: float = 30.0,
    timeout: float = 300.0,
    tls_context: ssl.SSLContext | None = None,
    policy: TLSPolicy | None = None,
    report: Reporter | None = None,
    requiretls: bool = False,
    route: Route | None = None,
) -> DomainResult:
    """Try each target address in turn; per-recipient results for every recipient.

    ``requiretls`` (RFC 8689 §4.2.1): only a host whose name is vouched for (DANE, an
    MTA-STS policy, a configured route), over TLS verified against it, that offers
    REQUIRETLS gets the message, with the REQUIRETLS parameter; a host that fails any of
    these is final for it, and when every host is, the recipients fail (5.7.x, a bounce).

    ``require_tls`` adds to each target's own ``require_tls``; ``policy`` says what each
    host must offer (see module docstring). ``tls_context`` replaces the opportunistic
    (non-verifying) context. ``message`` is best an ``Outbound`` (streamed from its file);
    bytes are for small messages and tests. ``route``: the configured route the targets
    come from, for its implicit TLS and its login (see module docstring).
    """
    if isinstance(message, bytes):
        message = Outbound.from_bytes(message)
    out = DomainResult()
    try:
        _path(sender)
    except ValueError as exc:
        for r in recipients:
            out.results[r] = RcptResult(r, "permanent", f"553 5.1.7 {exc}", "5.1.7")
        return out
    safe = []
    for r in recipients:
        try:
            _path(r)
            safe.append(r)
        except ValueError as exc:
            out.results[r] = RcptResult(r, "permanent", f"553 5.1.3 {exc}", "5.1.3")
    if not safe:
        return out
    recipients = safe
    last = _HostFailure("4.4.1", "no host to try")
    failures: list[_HostFailure] = []
    policy = policy or TLSPolicy()
    opportunistic = tls_context or opportunistic_context()

    def note(result: str, target: Target, addr: str, detail: str = "") -> None:
        if report is not None and policy.domain:
            ptype = "tlsa" if policy.plan(target.host).mode == "dane" else \
                "sts" if policy.source == "mta-sts" else "no-policy-found"
            report(TLSEvent(result, ptype, policy.domain, target.host, addr, detail))

    for target in targets:
        plan = policy.plan(target.host)
        if requiretls:
            refusal = _requiretls_refusal(plan, policy, target)
            if refusal is not None:
                last = refusal
                failures.append(last)
                continue
            plan = dataclasses.replace(plan, testing=False)  # no fallback to the clear
        if plan.mode == "may" and (require_tls or target.require_tls):
            plan = HostPlan("encrypt")
        if not plan.allowed:
            detail = plan.refusal or \
                f"MX {target.host} is not listed in the MTA-STS policy of {policy.domain}"
            note(plan.refusal_result, target, "", detail)
            if not plan.testing:
                last = _HostFailure("4.7.5", detail)
                failures.append(last)
                continue
            plan = HostPlan(plan.fallback, ca_file=plan.ca_file)
        for addr in target.addresses:
            try:
                try:
                    res = await _transaction(
                        target, addr, sender, recipients, message,
                        helo=helo, plan=plan,
                        connect_timeout=connect_timeout,
                        timeout=timeout,
                        tls_context=plan.context(opportunistic),
                        requiretls=requiretls,
                        route=route,
                    )
                except _HostFailure as exc:
                    if not exc.tls_result:
                        raise
                    note(exc.tls_result, target, addr, exc.reply)
                    if requiretls and not exc.final:
                        raise exc.for_requiretls() from None
                    if not plan.testing:
                        raise
                    # MTA-STS testing: reported; now deliver as without a policy.
                    fallback = HostPlan(plan.fallback, ca_file=plan.ca_file)
                    res = await _transaction(
                        target, addr, sender, recipients, message,
                        helo=helo, plan=fallback,
                        connect_timeout=connect_timeout, timeout=timeout,
                        tls_context=fallback.context(opportunistic),
                        route=route,
                    )
                else:
                    if res.tls and plan.mode != "may":
                        note("success", target, addr)
                res.results.update(out.results)
                return res
            except _HostFailure as exc:
                last = exc
                failures.append(exc)
    if failures and all(f.no_smtputf8 for f in failures):
        # Every host answered and none can take it: retrying will not help (RFC 6531 §3.2).
        for r in recipients:
            out.results[r] = RcptResult(r, "permanent", last.reply, "5.6.7")
        return out
    if failures and all(f.final or f.no_smtputf8 for f in failures):
        # REQUIRETLS: no host offers the verified path the sender asked for (RFC 8689).
        final = next(f for f in reversed(failures) if f.final)
        for r in recipients:
            out.results[r] = RcptResult(r, "permanent", final.reply, final.status)
        return out
    last = next((f for f in reversed(failures) if not f.final), last)
    out.relay = last.relay
    for r in recipients:
        out.results[r] = RcptResult(r, "temporary", last.reply, last.status)
    return out


def connect_reason(exc: BaseException) -> str:
    """Why a connection could not be made, as the system says it ("Connection refused",
    "Network is unreachable", "timed out"), without the client library's wrapping."""
    if isinstance(exc, aiosmtplib.SMTPConnectTimeoutError | TimeoutError):
        return "Connection timed out"
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return errno_text(seen.errno)
        seen = seen.__cause__ or seen.__context__
    m = re.search(r"\[Errno (\d+)\]", str(exc))
    return errno_text(int(m.group(1))) if m else _one_line(str(exc.__cause__ or exc))


def errno_text(code: int) -> str:
    return os.strerror(code) if code in errno.errorcode else f"error {code}"


def _requiretls_refusal(plan: HostPlan, policy: TLSPolicy, target: Target) -> _HostFailure | None:
    """Why a host cannot take a REQUIRETLS message before we even connect, or None."""
    host = target.host
    if not plan.allowed:
        # A failed TLSA lookup may succeed later: not final. A host the MTA-STS policy
        # does not list never will be.
        transient = plan.refusal_result == "dnssec-invalid"
        reason = plan.refusal or f"MX {host} is not listed in the MTA-STS policy of " \
            f"{policy.domain}"
        return _HostFailure("4.7.5" if transient else NEEDS_REQUIRETLS,
                            f"REQUIRETLS: {reason}", final=not transient)
    if plan.mode == "dane" or (plan.mode == "verify" and plan.authenticated_name):
        return None
    if policy.pinned:
        return _HostFailure(NEEDS_REQUIRETLS, f"REQUIRETLS: the route to {host} does not "
                            "verify TLS (set delivery.tls_policy for the domain to \"verify\")",
                            final=True)
    if policy.lookup_error:  # the MTA-STS policy could not be had this time
        return _HostFailure("4.7.5", f"REQUIRETLS: no verifiable TLS for {host} yet: "
                            f"{_one_line(policy.lookup_error)}")
    return _HostFailure(NEEDS_REQUIRETLS, f"REQUIRETLS: {host} cannot be verified: "
                        f"{policy.domain or host} publishes no MTA-STS policy and {host} "
                        "no DANE TLSA records, so there is no authenticated TLS path",
                        final=True)


async def _transaction(
    target: Target,
    addr: str,
    sender: str,
    recipients: Sequence[str],
    message: Outbound,
    *,
    helo: str,
    plan: HostPlan,
    connect_timeout: float,
    timeout: float,
    tls_context: ssl.SSLContext,
    requiretls: bool = False,
    route: Route | None = None,
) -> DomainResult:
    where = f"{target.host}[{addr}]:{target.port}"
    implicit = route is not None and route.tls_mode == "implicit"
    sock: socket.socket | None = None
    if implicit:
        # TLS from the first byte, verified against the route's host (not the address):
        # the socket is connected here so that the handshake names the host.
        sock = await _tcp(addr, target.port, connect_timeout, where)
        smtp = aiosmtplib.SMTP(hostname=target.host, sock=sock, local_hostname=helo,
                               timeout=timeout, start_tls=False, use_tls=True,
                               tls_context=tls_context)
    else:
        smtp = aiosmtplib.SMTP(
            hostname=addr,
            port=target.port,
            local_hostname=helo,
            timeout=timeout,
            start_tls=False,
            use_tls=False,
            validate_certs=False,
        )
    try:
        try:
            await smtp.connect(timeout=connect_timeout)
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise _HostFailure(
                "4.4.1", f"{where} refused the connection: {_reply(exc.code, exc.message)}"
            ) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            if sock is not None:  # no transport took it over
                sock.close()
            cause = exc.__cause__ or exc.__context__
            if implicit and isinstance(cause, ssl.SSLError):
                # Nothing was sent: no greeting read, no EHLO, no AUTH.
                raise _HostFailure("4.7.5", f"{where}: TLS handshake failed: "
                                   f"{_one_line(str(cause))}",
                                   tls_result=failure_type(cause)) from None
            raise _HostFailure("4.4.1", f"connect to {where}: {connect_reason(exc)}")\
                from None
        try:
            return await _session(
                smtp, target, where, sender, recipients, message,
                helo=helo, plan=plan, tls_context=tls_context, requiretls=requiretls,
                route=route, implicit=implicit,
            )
        except _HostFailure as exc:
            exc.relay = exc.relay or where
            raise
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
        # Lost before a definite answer to the whole transaction: nothing was accepted.
        lost = _HostFailure("4.4.2", f"{where}: connection lost: {_one_line(str(exc))}")
        lost.relay = where
        raise lost from None
    finally:
        smtp.close()


async def _session(
    smtp: aiosmtplib.SMTP,
    target: Target,
    where: str,
    sender: str,
    recipients: Sequence[str],
    message: Outbound,
    *,
    helo: str,
    plan: HostPlan,
    tls_context: ssl.SSLContext,
    requiretls: bool = False,
    route: Route | None = None,
    implicit: bool = False,
) -> DomainResult:
    require_tls = plan.requires_tls
    try:
        await smtp.ehlo(hostname=helo)
    except aiosmtplib.SMTPHeloError:
        try:
            await smtp.helo(hostname=helo)
        except aiosmtplib.SMTPHeloError as exc:
            raise _HostFailure("4.4.1", f"{where} refused HELO: {_reply(exc.code, exc.message)}")\
                from None
    tls = False
    tls_version = verified = ""
    if implicit:
        # The handshake in connect() verified the certificate (the policy's verify level).
        tls = True
        ssl_object = smtp.transport.get_extra_info("ssl_object") \
            if smtp.transport is not None else None
        tls_version = str(ssl_object.version() or "") if ssl_object is not None else ""
        verified = plan.verify_label if plan.mode == "verify" else ""
    elif smtp.supports_extension("starttls"):
        try:
            await smtp.starttls(server_hostname=target.host, tls_context=tls_context)
        except aiosmtplib.SMTPResponseException as exc:
            # A refusal (e.g. 454) leaves the session usable in clear, if that is allowed.
            if require_tls or exc.code == 421:
                raise _HostFailure("4.7.5", f"{where} refused STARTTLS: "
                                   f"{_reply(exc.code, exc.message)}",
                                   tls_result="starttls-not-supported" if require_tls
                                   else "") from None
        except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
            # The connection is unusable after a failed handshake; try the next host.
            # Never a retry in clear: a required TLS that failed is a 4.7.x deferral.
            cause = exc.__cause__ or exc.__context__ or exc
            if not isinstance(cause, ssl.SSLError):
                cause = exc
            raise _HostFailure("4.7.5" if require_tls else "4.4.2",
                               f"{where}: STARTTLS failed: {_one_line(str(exc))}",
                               tls_result=failure_type(cause) if require_tls else "")\
                from None
        else:
            tls = True
            ssl_object = smtp.transport.get_extra_info("ssl_object") \
                if smtp.transport is not None else None
            tls_version = str(ssl_object.version() or "") if ssl_object is not None else ""
            if plan.mode == "verify":
                verified = plan.verify_label
            elif plan.mode == "dane":
                why = dane.authenticate(plan.tlsa, dane.presented_chain(ssl_object)
                                        if ssl_object is not None else [], target.host)
                if why is not None and any(r.usable for r in plan.tlsa):
                    await _quit(smtp)
                    raise _HostFailure("4.7.5", f"{where}: DANE authentication failed: {why}",
                                       tls_result="validation-failure")
                verified = "dane" if why is None else ""
            await smtp.ehlo(hostname=helo)
    elif require_tls:
        raise _HostFailure("4.7.10", f"{where} does not offer STARTTLS and TLS is required",
                           tls_result="starttls-not-supported")
    if route is not None and route.auth_user:
        await _login(smtp, where, route, verified=tls and bool(verified))

    options: list[bytes] = []
    if requiretls:
        hop = hop_text(tls, tls_version, verified)
        if not verified:
            await _quit(smtp)
            raise _HostFailure(NEEDS_REQUIRETLS, f"REQUIRETLS: {where}: TLS not verified "
                               f"({hop})", final=True)
        if not smtp.supports_extension("requiretls"):
            await _quit(smtp)
            raise _HostFailure(NEEDS_REQUIRETLS, f"REQUIRETLS: {where} does not offer "
                               f"REQUIRETLS ({hop})", final=True)
        options.append(b"REQUIRETLS")
    if smtp.supports_extension("size"):
        options.append(b"SIZE=%d" % message.size)
    if smtp.supports_extension("8bitmime") and message.traits.eight_bit:
        options.append(b"BODY=8BITMIME")
    if needs_smtputf8(message.traits, sender, recipients):
        if not smtp.supports_extension("smtputf8"):
            await _quit(smtp)
            raise _HostFailure(
                "5.6.7", f"554 5.6.7 {where} does not offer SMTPUTF8, which this message "
                "needs (non-ASCII addresses or headers)", no_smtputf8=True)
        options.append(b"SMTPUTF8")
    result = DomainResult(host=target.host, tls=tls, tls_version=tls_version,
                          verified=verified, relay=where, mail_at=time.monotonic())
    where_tls = f"{where}, {result.hop}"  # failures say which TLS the hop had
    pending = list(recipients)
    first = True
    while pending:
        try:
            pending = await _mail_transaction(smtp, where, where_tls, target.host, sender,
                                              pending, options, message, result,
                                              first=first)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError,
                OSError) as exc:
            if first:
                raise
            # Lost in a later transaction: what the earlier ones settled stands (sending
            # it all again elsewhere would duplicate it); the rest is retried later.
            reply = f"{where}: connection lost: {_one_line(str(exc))}"
            for r in recipients:
                result.results.setdefault(r, RcptResult(r, "temporary", reply, "4.4.2"))
            return result
        first = False
    await _quit(smtp)
    return result


def _too_many(resp: SMTPResponse, position: int) -> bool:
    """RFC 5321 §4.5.3.1.10: a server out of recipients for this transaction says 452 (RFC
    821 said 552, so 552 is taken the same way, as temporary); the rest go in a new one.
    An enhanced status other than X.5.3 ("too many recipients", RFC 3463) says it is about
    this recipient (4.2.2 mailbox full); and the first RCPT of a transaction cannot have
    hit the limit: its reply is final."""
    if resp.code not in (452, 552) or position == 0:
        return False
    m = _ENHANCED.match(resp.message.strip())
    return m is None or (m.group(2), m.group(3)) == ("5", "3")


async def _mail_transaction(
    smtp: aiosmtplib.SMTP,
    where: str,
    where_tls: str,
    host: str,
    sender: str,
    recipients: list[str],
    options: list[bytes],
    message: Outbound,
    result: DomainResult,
    *,
    first: bool,
) -> list[str]:
    """One MAIL/RCPT/DATA on the open connection. Records a result for each recipient it
    settles and returns those left for another transaction (the server's recipient limit
    was reached): they are sent at once, on this connection, not after a backoff."""
    if not first:
        await smtp.execute_command(b"RSET")
    resp = await smtp.execute_command(b"MAIL", b"FROM:" + _path(sender), *options)
    if resp.code != 250:
        outcome = _classify(resp.code)
        if first and outcome == "temporary" and resp.code == 421:
            raise _HostFailure(status_of(resp.code, resp.message),
                               f"{where} said: {_reply(resp.code, resp.message)}")
        for r in recipients:
            result.results[r] = _result(r, resp, where_tls, host, "MAIL FROM")
        return []

    accepted: list[str] = []
    leftover: list[str] = []
    for i, r in enumerate(recipients):
        resp = await smtp.execute_command(b"RCPT", b"TO:" + _path(r))
        if resp.code in (250, 251):
            accepted.append(r)
        elif _too_many(resp, i):
            leftover = recipients[i:]
            break
        else:
            result.results[r] = _result(r, resp, where_tls, host, "RCPT TO")
    if not accepted:
        return leftover
    resp = await _send_data(smtp, message, smtp.timeout)
    for r in accepted:
        result.results[r] = _result(r, resp, where_tls, host, "DATA")
    return leftover


async def _send_data(
    smtp: aiosmtplib.SMTP, message: Outbound, timeout: float | None
) -> SMTPResponse:
    """DATA, the message streamed from its file, and the final reply.

    The client library takes a message only as one bytes object, so this phase is written
    here on its connection: a chunk is read, encoded and written, then the transport's flow
    control is awaited before the next one, so at most about one chunk plus the transport's
    high-water mark is held per delivery. The reply is awaited from before the first octet
    is sent, so a server that answers early (e.g. 552 mid-message) is heard, not ignored.
    """
    resp = await smtp.execute_command(b"DATA")
    if resp.code != 354:
        return resp
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("connection lost")
    reply = asyncio.ensure_future(protocol.read_response(timeout=None))
    await asyncio.sleep(0)  # the reply reader is armed before any data goes out
    early = False
    try:
        f = await asyncio.to_thread(message.open)
        try:
            encoder = DataEncoder()
            strip = ReturnPathFilter()  # RFC 5321 §4.4: no Return-Path leaves with it
            while True:
                if reply.done():
                    early = True
                    break
                chunk = await asyncio.to_thread(f.read, CHUNK)
                out = encoder.feed(strip.feed(chunk)) if chunk else \
                    encoder.feed(strip.end()) + encoder.end()
                try:
                    if out:
                        protocol.write(out)
                    async with asyncio.timeout(timeout):
                        await _drained(protocol)
                except (ConnectionError, aiosmtplib.SMTPServerDisconnected):
                    # Closed while we sent: a reply it sent first still counts, so it is
                    # read below (and without one, that read raises the disconnection).
                    early = True
                    break
                if not chunk:
                    break
        finally:
            f.close()
        async with asyncio.timeout(timeout):
            resp = await reply
    finally:
        reply.cancel()
    if early:
        smtp.close()  # the server stopped listening mid-message: no QUIT on this one
    return resp


async def _drained(protocol: object) -> None:
    """Wait until the transport takes more data (asyncio's flow control).

    The client library's protocol implements asyncio's pause/resume-writing flow control
    with the same helper asyncio's own streams wait on; without it, poll the buffer.
    """
    helper = getattr(protocol, "_drain_helper", None)
    if helper is not None:
        await helper()
        return
    transport = getattr(protocol, "transport", None)
    while transport is not None and transport.get_write_buffer_size() > CHUNK:
        await asyncio.sleep(0.01)


def _result(r: str, resp: SMTPResponse, where: str, host: str, stage: str) -> RcptResult:
    outcome = _classify(resp.code)
    reply = _reply(resp.code, resp.message)
    if outcome != "delivered":
        reply = f"{reply} (in reply to {stage}, {where})"
    return RcptResult(r, outcome, reply, status_of(resp.code, resp.message), host)


async def _tcp(addr: str, port: int, timeout: float, where: str) -> socket.socket:
    """A connected, non-blocking TCP socket to ``addr`` (for implicit TLS)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (addr, port))
    except (OSError, TimeoutError) as exc:
        sock.close()
        why = _one_line(str(exc)) or "timed out"
        raise _HostFailure("4.4.1", f"cannot connect to {where}: {why}") from None
    return sock


def read_password(path: str) -> str:
    """The route's password: the file's first line. Refused when every user may read it
    (a secret on a multi-user host), when empty, or when unreadable; the message names the
    file, never its content."""
    try:
        with open(path, "rb") as f:
            if stat.S_IMODE(os.fstat(f.fileno()).st_mode) & stat.S_IROTH:
                raise _HostFailure("4.3.5", f"auth_password_file {path} is readable by every "
                                   "user: refusing to use it (chmod o-rwx)")
            data = f.read(4096)
    except OSError as exc:
        raise _HostFailure("4.3.5", f"cannot read auth_password_file {path}: "
                           f"{exc.strerror}") from None
    line = data.decode("utf-8", "replace").splitlines()[0] if data.strip() else ""
    if not line or any(c in line for c in "\0\r\n"):
        raise _HostFailure("4.3.5", f"auth_password_file {path} holds no password")
    return line


async def _login(smtp: aiosmtplib.SMTP, where: str, route: Route, *, verified: bool) -> None:
    """SMTP AUTH (RFC 4954) with the route's account: PLAIN (RFC 4616), else LOGIN.

    Only over verified TLS: the configuration already demands it, and this is where it is
    enforced, so no path can hand the password to a server we have not authenticated.
    A refusal is temporary for the message (the account may be fixed meanwhile)."""
    if not verified:
        await _quit(smtp)
        raise _HostFailure("4.7.10", f"{where}: no verified TLS, so no AUTH: the password "
                           "is not sent")
    offered = [m.lower() for m in smtp.server_auth_methods]
    if not smtp.supports_extension("auth") or not {"plain", "login"} & set(offered):
        await _quit(smtp)
        raise _HostFailure("4.7.0", f"{where} offers no AUTH PLAIN or LOGIN "
                           f"(offers: {_one_line(' '.join(offered)) or 'no AUTH'})")
    password = await asyncio.to_thread(read_password, route.auth_password_file)
    user = route.auth_user.encode("utf-8")
    secret = password.encode("utf-8")
    b64 = base64.b64encode
    if "plain" in offered:
        mech = "PLAIN"
        blob = b64(b"\0" + user + b"\0" + secret)
        resp = await smtp.execute_command(b"AUTH", b"PLAIN", blob)
        hidden = (blob,)
    else:
        mech = "LOGIN"
        hidden = (b64(secret),)
        resp = await smtp.execute_command(b"AUTH", b"LOGIN")
        if resp.code == 334:
            resp = await smtp.execute_command(b64(user))
        if resp.code == 334:
            resp = await smtp.execute_command(hidden[0])
    if resp.code == 235:
        return
    await _quit(smtp)
    reply = _reply(resp.code, resp.message)
    for h in (*hidden, secret):  # a server that echoes what it got must not log it for us
        reply = reply.replace(h.decode("utf-8", "replace"), "[hidden]")
    status = status_of(resp.code, resp.message)
    raise _HostFailure("4" + status[1:], f"{where} refused AUTH {mech} as {route.auth_user}: "
                       f"{reply}")


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(aiosmtplib.SMTPException, OSError):
        await smtp.quit(timeout=10)
