"""TLS: offered on every port, no version below 1.2, no weak cipher class, a good
certificate, and no STARTTLS command injection (CVE-2011-0411 class)."""

from __future__ import annotations

import datetime as dt
import re
import ssl
import warnings

from cryptography import x509

from mailfort.audit.client import NoReply, ProbeError, RawClient, insecure_context
from mailfort.audit.context import (
    EHLO_NAME,
    IMPLICIT_TLS,
    Context,
    has_ext,
    imap_capabilities,
    imap_greeting,
    sieve_greeting,
    smtp_greeting,
)
from mailfort.audit.registry import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    WARN,
    Part,
    Stop,
    Verdict,
    check,
    inconclusive,
    part,
    skip,
)

TLS_SERVICES = ("smtp", "submission", "submissions", "pop3", "pop3s", "imap", "imaps",
                "managesieve")
OLD_VERSIONS = (("TLS 1.0", ssl.TLSVersion.TLSv1), ("TLS 1.1", ssl.TLSVersion.TLSv1_1))
WEAK_CLASSES = (("NULL", "eNULL"), ("anonymous", "aNULL"), ("EXPORT", "EXPORT"),
                ("RC4", "RC4"), ("3DES", "3DES"))


class NoTLS(Exception):
    """The service does not offer STARTTLS/STLS."""


def ask_tls(c: RawClient, service: str, pipelined: bytes = b"") -> None:
    """Greeting, capabilities and STARTTLS (POP3: STLS) on a fresh connection, up to the
    server's go-ahead; ``pipelined`` goes in the same write as the command (the injection
    probe). NoTLS when it is not offered, ProbeError when it is refused."""
    if service.startswith("pop3"):
        ok, _ = c.status()
        c.send(b"CAPA\r\n")
        caps = c.multiline() if c.status()[0] else []
        if not ok or "STLS" not in [x.split(" ")[0].upper() for x in caps]:
            raise NoTLS(service)
        c.send(b"STLS\r\n" + pipelined)
        if not c.status()[0]:
            raise ProbeError("STLS refused")
    elif service == "managesieve":
        if "STARTTLS" not in sieve_greeting(c, service):
            raise NoTLS(service)
        c.send(b"STARTTLS\r\n" + pipelined)
        status, _ = c.sieve()
        if status != "OK":
            raise ProbeError(f"STARTTLS answered {status}")
    elif service.startswith("imap"):
        if not imap_greeting(c).upper().startswith("* OK"):
            raise ProbeError("IMAP greeting is not * OK")
        if "STARTTLS" not in imap_capabilities(c):
            raise NoTLS(service)
        c.send(b"S STARTTLS\r\n" + pipelined)
        status, _ = c.tagged("S")
        if status != "OK":
            raise ProbeError(f"STARTTLS answered {status}")
    else:
        smtp_greeting(c, service)
        _, lines = c.cmd(f"EHLO {EHLO_NAME}")
        if not has_ext(lines, "STARTTLS"):
            raise NoTLS(service)
        c.send(b"STARTTLS\r\n" + pipelined)
        code, _ = c.reply()
        if code != 220:
            raise ProbeError(f"STARTTLS answered {code}")


def tls_client(ctx: Context, service: str, sslctx: ssl.SSLContext) -> RawClient:
    """A connection to ``service`` with TLS negotiated under ``sslctx`` (ProbeError if
    the handshake fails, NoTLS when the service offers no TLS)."""
    c = ctx.raw(ctx.port(service))
    try:
        if service not in IMPLICIT_TLS:
            ask_tls(c, service)
        c.starttls(sslctx)
        return c
    except BaseException:
        c.close()
        raise


def _handshakes(ctx: Context) -> dict[str, Stop | None]:
    """Per open service that offers TLS: None when a handshake completed, else why not.

    Looked up once per run. A service whose handshake never completes (no certificate, a
    broken key) or whose greeting refuses every session is untested, never a PASS.
    """
    found = [s for s in TLS_SERVICES if s in ctx.open_ports]
    if not found:
        raise skip("port.none-of", services=", ".join(TLS_SERVICES))
    cached = ctx.cache.get("tls.handshakes")
    if isinstance(cached, dict):
        return cached
    result: dict[str, Stop | None] = {}
    for service in found:
        try:
            tls_client(ctx, service, insecure_context()).close()
        except NoTLS:
            continue
        except NoReply as exc:
            result[service] = inconclusive("probe.no-reply", error=str(exc),
                                           what=f"{service}: the way to a TLS handshake")
        except ProbeError as exc:
            result[service] = inconclusive("tls.no-handshake", service=service,
                                           error=str(exc)[:120])
        except Stop as stop:
            result[service] = stop
        else:
            result[service] = None
    ctx.cache["tls.handshakes"] = result
    if not result:
        raise skip("tls.none-offered", services=", ".join(found))
    return result


def _endpoints(ctx: Context) -> list[str]:
    """The open services where a TLS handshake completes: a version, cipher or certificate
    check on a service without TLS would be a PASS about nothing (``tls.starttls`` reports
    it); when TLS is offered but no handshake completes anywhere, INCONCLUSIVE."""
    done = [s for s, why in _handshakes(ctx).items() if why is None]
    if not done:
        raise _untested(ctx) or skip("tls.none-offered", services="-")
    return done


def _untested(ctx: Context) -> Stop | None:
    """Why a service that offers TLS could not be tested (the first such), or None."""
    return next((why for why in _handshakes(ctx).values() if why is not None), None)


@check("tls.starttls", "4", order=40)
def starttls_offered(ctx: Context) -> Verdict:
    missing, ok = [], []
    untested: Stop | None = None
    services = ("smtp", "submission", "submissions", "imap", "imaps", "managesieve")
    found = [s for s in services if s in ctx.open_ports]
    if not found:
        raise skip("port.none-of", services=", ".join(services))
    for service in found:
        try:
            c = tls_client(ctx, service, insecure_context())
            ok.append(service)
            c.close()
        except NoTLS:
            missing.append(part("tls.why.not-offered", service=service))
        except ProbeError as exc:
            missing.append(part("tls.why.error", service=service, error=str(exc)))
        except Stop as stop:  # e.g. a 554 greeting: not known whether TLS is offered
            untested = untested or stop
    if missing:
        return Verdict(FAIL, "tls.missing", {"where": missing})
    if untested:
        raise untested
    return Verdict(PASS, "tls.everywhere", {"services": ", ".join(ok)})


def _accepts(ctx: Context, service: str, sslctx: ssl.SSLContext) -> str | None:
    """The negotiated cipher when the server accepts ``sslctx``'s offer, else None.

    A reply that never came is not a refusal: INCONCLUSIVE, not None."""
    try:
        c = tls_client(ctx, service, sslctx)
    except NoReply as exc:
        raise inconclusive("probe.no-reply", what=f"{service}: the way to a TLS handshake",
                           error=str(exc)) from exc
    except (NoTLS, ProbeError):
        return None
    tls = c.sock
    cipher = f"{tls.version()} {tls.cipher()[0]}" if isinstance(tls, ssl.SSLSocket) else "?"
    c.close()
    return cipher


@check("tls.versions", "4", order=41)
def old_versions(ctx: Context) -> Verdict:
    accepted, untestable = [], []
    for label, version in OLD_VERSIONS:
        sslctx = insecure_context(legacy=True)
        try:
            with warnings.catch_warnings():  # deprecated on purpose: that is the test
                warnings.simplefilter("ignore", DeprecationWarning)
                sslctx.minimum_version = sslctx.maximum_version = version
        except (ValueError, ssl.SSLError):
            untestable.append(label)
            continue
        for service in _endpoints(ctx):
            got = _accepts(ctx, service, sslctx)
            if got:
                accepted.append(f"{service}: {got}")
    if accepted:
        return Verdict(FAIL, "tls.old-accepted", {"where": "; ".join(accepted)})
    return _refused(ctx, "tls.old-refused", untestable, len(OLD_VERSIONS))


@check("tls.ciphers", "4", order=42)
def weak_ciphers(ctx: Context) -> Verdict:
    accepted, untestable = [], []
    for label, spec in WEAK_CLASSES:
        sslctx = insecure_context()
        sslctx.maximum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.3 has no weak suites
        sslctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        try:
            sslctx.set_ciphers(f"@SECLEVEL=0:{spec}")
            if not [c for c in sslctx.get_ciphers() if c["protocol"] != "TLSv1.3"]:
                raise ssl.SSLError("none")
        except ssl.SSLError:
            untestable.append(label)
            continue
        for service in _endpoints(ctx):
            got = _accepts(ctx, service, sslctx)
            if got:
                accepted.append(f"{service}: {label} ({got})")
    if accepted:
        return Verdict(FAIL, "tls.weak-accepted", {"where": "; ".join(accepted)})
    return _refused(ctx, "tls.weak-refused", untestable, len(WEAK_CLASSES))


def _refused(ctx: Context, key: str, untestable: list[str], tried: int) -> Verdict:
    """Nothing was accepted: a PASS only for what this client could really offer, and
    only when every service that offers TLS completed a handshake."""
    stop = _untested(ctx)
    if stop:
        raise stop
    if len(untestable) == tried:  # nothing was offered, so a refusal proves nothing
        return Verdict(INCONCLUSIVE, "tls.untestable", {"untestable": ", ".join(untestable)})
    if untestable:
        return Verdict(PASS, key + "-partly", {"untestable": ", ".join(untestable)})
    return Verdict(PASS, key, {})


def _reason(exc: Exception) -> str:
    """The verification error without OpenSSL's decoration."""
    text = str(exc).removeprefix("TLS handshake: ")
    text = re.sub(r"^\[SSL: [A-Z_]+\] certificate verify failed: ", "", text)
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", text)[:120]


# OpenSSL's verify results (X509_V_ERR_*) that have words of their own in the catalogues;
# any other is told with OpenSSL's own text (cert.why.other).
_VERIFY_NOTES = {
    18: "cert.why.self-signed",  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: "cert.why.unknown-ca",  # SELF_SIGNED_CERT_IN_CHAIN
    20: "cert.why.unknown-ca",  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: "cert.why.unknown-ca",  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    10: "cert.why.expired-now",  # CERT_HAS_EXPIRED
    9: "cert.why.not-yet-valid",  # CERT_NOT_YET_VALID
    62: "cert.why.name-mismatch",  # HOSTNAME_MISMATCH
}


def _unverified(service: str, exc: ProbeError) -> Part:
    """Why the certificate of ``service`` did not verify, as a catalogue part."""
    cause = exc.__cause__
    code = cause.verify_code if isinstance(cause, ssl.SSLCertVerificationError) else None
    if code in _VERIFY_NOTES:
        return part(_VERIFY_NOTES[code], service=service)
    return part("cert.why.other", service=service, reason=_reason(exc))


@check("tls.certificate", "4", order=43)
def certificate(ctx: Context) -> Verdict:
    problems: list[Part] = []
    failures: list[Part] = []
    for service in _endpoints(ctx):
        try:
            c = tls_client(ctx, service, insecure_context())
        except (NoTLS, ProbeError):
            continue
        der = c.sock.getpeercert(binary_form=True) if isinstance(c.sock, ssl.SSLSocket) else None
        c.close()
        if der:
            cert = x509.load_der_x509_certificate(der)
            left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
            ctx.note(f"{service}: {cert.subject.rfc4514_string()}, expires "
                     f"{cert.not_valid_after_utc:%Y-%m-%d}")
            if left.total_seconds() < 0:
                failures.append(part("cert.why.expired", service=service,
                                     date=f"{cert.not_valid_after_utc:%Y-%m-%d}"))
            elif left.days < 14:
                problems.append(part("cert.why.expires-soon", service=service,
                                     days=left.days))
        try:
            tls_client(ctx, service, ctx.verifying_context()).close()
        except ProbeError as exc:
            problems.append(_unverified(service, exc))
        except NoTLS:
            pass
    if failures:  # senders that verify (MTA-STS, DANE) stop; others go on: WARN, not FAIL
        return Verdict(WARN, "cert.expired", {"where": failures})
    if problems:
        return Verdict(WARN, "cert.unverified", {"where": problems})
    stop = _untested(ctx)
    if stop:  # no certificate seen there: it cannot be called good
        raise stop
    return Verdict(PASS, "cert.ok", {})


def _injected(ctx: Context, service: str) -> bool | None:
    """Whether a command pipelined with STARTTLS/STLS is answered inside TLS.

    None when the service offers no TLS. The probe sends ``STARTTLS\\r\\nNOOP\\r\\n`` in one
    write, negotiates TLS, sends one NOOP and then QUIT, and counts the replies before
    QUIT's: two means the server executed the plaintext NOOP inside the TLS session. A
    reply is counted however late it comes; a QUIT not answered in time is INCONCLUSIVE.
    IMAP counts tagged replies (``N``, ``M``) up to a ``Z LOGOUT`` marker the same way.
    ManageSieve pipelines ``NOOP "mailfort-injected"``: a reply carrying that tag
    (``OK (TAG "mailfort-injected")``, RFC 5804 §2.15) proves it ran inside TLS.
    """
    if service == "managesieve":
        return _sieve_injected(ctx, service)
    pop3, imap = service.startswith("pop3"), service.startswith("imap")
    c = ctx.raw(ctx.port(service))
    try:
        try:
            ask_tls(c, service, b"N NOOP\r\n" if imap else b"NOOP\r\n")
        except NoTLS:
            return None
        # Whatever the server already buffered in the clear is now ours to discard: a
        # reply is only counted if it arrives inside TLS.
        c.buf = b""
        c.starttls()
        c.send(b"M NOOP\r\n" if imap else b"NOOP\r\n")
        return len(c.replies_before_quit(pop3, imap)) >= 2
    except NoReply as exc:
        raise inconclusive("replies.uncounted", what=f"{service}: the pipelined NOOP",
                           error=str(exc)) from exc
    except ProbeError:
        return False  # the server refused the pipelined input or dropped us
    finally:
        c.close()


def _sieve_injected(ctx: Context, service: str) -> bool | None:
    """``_injected`` for ManageSieve: after the handshake, the capabilities the server
    re-sends (RFC 5804 §2.2), then our own ``NOOP "mailfort-tls"`` and LOGOUT; every status
    line up to the close that follows LOGOUT is read. The injected NOOP shows by its tag; a
    server that echoes no tags gives itself away by one status line too many (three where
    NOOP and LOGOUT make two)."""
    c = ctx.raw(ctx.port(service))
    try:
        try:
            ask_tls(c, service, b'NOOP "mailfort-injected"\r\n')
        except NoTLS:
            return None
        c.buf = b""
        c.starttls()
        c.sieve()  # the capabilities re-sent after the handshake
        c.send(b'NOOP "mailfort-tls"\r\nLOGOUT\r\n')
        seen: list[str] = []
        try:
            for _ in range(4):
                c.sieve()
                seen.append(c.transcript[-1])
                if "mailfort-tls" in seen[-1]:
                    c.sieve()  # LOGOUT's: nothing after it is counted
                    break
        except NoReply:
            if not seen:
                raise
        except ProbeError:  # the close after LOGOUT ends the count
            pass
        if any("mailfort-injected" in s for s in seen):
            return True
        return not any("mailfort-tls" in s for s in seen) and len(seen) >= 3
    except NoReply as exc:
        raise inconclusive("replies.uncounted", what=f"{service}: the pipelined NOOP",
                           error=str(exc)) from exc
    except ProbeError:
        return False
    finally:
        c.close()


def _injection(ctx: Context, services: tuple[str, ...]) -> Verdict:
    found = [s for s in services if s in ctx.open_ports]
    if not found:
        raise skip("port.none-of", services=", ".join(services))
    results: dict[str, bool | None] = {}
    uncounted: Stop | None = None
    try:
        handshakes = _handshakes(ctx)
    except Stop:  # no TLS anywhere: each service below says so itself
        handshakes = {}
    for service in found:
        if handshakes.get(service) is not None:  # no handshake completes there at all:
            uncounted = handshakes[service]  # a failed one after STARTTLS proves nothing
            continue
        try:
            results[service] = _injected(ctx, service)
        except Stop as stop:  # one service not counted does not hide another's FAIL
            uncounted = stop
    bad = [s for s, r in results.items() if r]
    if bad:
        return Verdict(FAIL, "inject.answered", {"services": ", ".join(bad)})
    if uncounted:
        raise uncounted
    tested = [s for s, r in results.items() if r is not None]
    if not tested:
        raise skip("tls.not-offered", service=", ".join(found))
    return Verdict(PASS, "inject.discarded", {"services": ", ".join(tested)})


@check("tls.injection-smtp", "4", order=44)
def injection_smtp(ctx: Context) -> Verdict:
    return _injection(ctx, ("smtp", "submission"))


@check("tls.injection-pop3", "4", order=46)
def injection_pop3(ctx: Context) -> Verdict:
    return _injection(ctx, ("pop3",))


@check("tls.injection-imap", "4", order=46)
def injection_imap(ctx: Context) -> Verdict:
    return _injection(ctx, ("imap",))


@check("tls.injection-managesieve", "4", order=46)
def injection_managesieve(ctx: Context) -> Verdict:
    return _injection(ctx, ("managesieve",))


@check("tls.pop3-stls", "4", order=40)
def pop3_stls(ctx: Context) -> Verdict:
    found = [s for s in ("pop3", "pop3s") if s in ctx.open_ports]
    if not found:
        raise skip("port.none-of", services="pop3, pop3s")
    missing = []
    for service in found:
        try:
            tls_client(ctx, service, insecure_context()).close()
        except NoTLS:
            missing.append(part("tls.why.stls-not-offered", service=service))
        except ProbeError as exc:
            missing.append(part("tls.why.error", service=service, error=str(exc)))
    if missing:
        return Verdict(FAIL, "tls.missing", {"where": missing})
    return Verdict(PASS, "tls.everywhere", {"services": ", ".join(found)})
