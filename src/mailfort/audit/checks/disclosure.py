"""Account and software disclosure: VRFY/EXPN, and names or versions in replies."""

from __future__ import annotations

import re

from mailfort.audit.checks.common import unknown_local
from mailfort.audit.client import ProbeError, RawClient
from mailfort.audit.context import (
    IMAP_SERVICES,
    MANAGESIEVE_SERVICES,
    POP3_SERVICES,
    SMTP_SERVICES,
    Context,
    imap_greeting,
)
from mailfort.audit.registry import FAIL, INCONCLUSIVE, PASS, WARN, Verdict, check, skip

SOFTWARE = re.compile(  # a name, not part of a host name such as mailfort.example.org
    r"(?<![\w.-])(postfix|exim|sendmail|qmail|opensmtpd|microsoft esmtp|exchange|aiosmtpd|haraka|"
    r"dovecot|courier|cyrus|hmailserver|mdaemon|zimbra|kerio|smtpd\.py|python|"
    r"mailenable|communigate|axigen|james|mailfort)(?![\w.-])",
    re.IGNORECASE,
)
VERSION = re.compile(
    r"(?:\b(?:version|ver\.?|v):?\s*|[/ ])(\d+\.\d+(?:\.\d+)*(?:[-+_.][0-9A-Za-z]+)?)\b",
    re.IGNORECASE,
)
STATUS_CODE = re.compile(r"^\d\.\d{1,3}\.\d{1,3}\s*")


def find_software(text: str) -> tuple[str | None, str | None]:
    """(software name, version) named in one reply text, either may be None.

    Enhanced status codes (2.1.0) and address literals are not versions; a number counts
    as a version only next to a software name or the word "version".
    """
    body = STATUS_CODE.sub("", text)
    body = re.sub(r"\[[0-9A-Fa-f:.IPv]+\]|\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}"
                  r"(?:25[0-5]|2[0-4]\d|1?\d?\d)\b", "", body)
    name = SOFTWARE.search(body)
    version = None
    for m in VERSION.finditer(body):
        near = name and abs(m.start() - name.end()) <= 12
        if near or re.match(r"\s*(version|ver)", m.group(0), re.IGNORECASE):
            version = m.group(1)
            break
    return (name.group(1) if name else None), version


def _smtp_texts(c: RawClient, service: str) -> list[tuple[str, str]]:
    _, greet = c.reply()
    seen = [(f"{service} banner", ln) for ln in greet]
    for cmd in ("EHLO audit.mailfort.invalid", "HELP", "XYZZY"):
        _, lines = c.cmd(cmd)
        seen += [(f"{service} {cmd.split()[0]}", ln) for ln in lines]
    return seen


def _pop3_texts(c: RawClient, service: str) -> list[tuple[str, str]]:
    _, greet = c.status()
    seen = [(f"{service} banner", greet)]
    c.send(b"CAPA\r\n")
    if c.status()[0]:
        seen += [(f"{service} CAPA", ln) for ln in c.multiline()]
    return seen


def _imap_texts(c: RawClient, service: str) -> list[tuple[str, str]]:
    """The greeting, CAPABILITY, the answer to an unknown command, and the ``* ID`` reply
    to ``ID NIL`` when ID is offered: what the server tells any client before a login,
    an attacker's included (RFC 2971 leaves the fields to the server; NIL is the safe
    answer). Sent in the clear before STARTTLS, as an attacker on 143 would."""
    seen = [(f"{service} banner", imap_greeting(c))]
    caps: list[str] = []
    for cmd in ("CAPABILITY", "XYZZY"):
        _, lines = c.imap("D", cmd)
        seen += [(f"{service} {cmd}", ln) for ln in lines]
        caps += [w.upper() for ln in lines if ln.upper().startswith("* CAPABILITY ")
                 for w in ln.split()[2:]]
    if "ID" in caps:
        _, lines = c.imap("D", "ID NIL")
        seen += [(f"{service} ID", ln) for ln in lines if ln.upper().startswith("* ID ")]
    return seen


def _sieve_texts(c: RawClient, service: str) -> list[tuple[str, str]]:
    """ManageSieve's IMPLEMENTATION capability (RFC 5804 §1.7 asks for a name and version;
    a server need not give its real ones) and the answer to an unknown command."""
    _, lines = c.sieve()
    seen = [(f"{service} IMPLEMENTATION", ln) for ln in lines
            if ln.upper().startswith('"IMPLEMENTATION"')]
    c.send(b"XYZZY\r\n")
    _, lines = c.sieve()
    return seen + [(f"{service} XYZZY", ln.removeprefix("< ")) for ln in c.transcript[-1:]]


ID_NAME = ("name", "vendor", "os")  # RFC 2971 §3.3 fields that name software
ID_VERSION = ("version", "os-version", "date")  # and those that date it


def id_fields(line: str) -> dict[str, str]:
    """The field-value pairs of a ``* ID (...)`` reply (quoted strings; NIL values left
    out), field names lower-cased. Enough for RFC 2971's quoted form, nothing more."""
    values = [m.group(1) for m in re.finditer(r'"((?:[^"\\]|\\.)*)"|\bNIL\b', line,
                                              re.IGNORECASE)]
    return {k.lower(): v for k, v in zip(values[::2], values[1::2], strict=False)
            if k is not None and v}


def _find(where: str, text: str) -> tuple[str | None, str | None]:
    """(software name, version) in one reply; an ID reply's fields say what they are, so
    any ``name`` there is a name and any ``version`` a version, known software or not."""
    name, version = find_software(text)
    if where.endswith(" ID"):
        fields = id_fields(text)
        name = name or next((fields[k] for k in ID_NAME if k in fields), None)
        version = version or next((fields[k] for k in ID_VERSION if k in fields), None)
    return name, version


# How each protocol is read and left: (services, reader, quit keywords).
_READERS = (
    (SMTP_SERVICES, _smtp_texts, {}),
    (POP3_SERVICES, _pop3_texts, {"pop3": True}),
    (MANAGESIEVE_SERVICES, _sieve_texts, {"sieve": True}),
    (IMAP_SERVICES, _imap_texts, {"imap": True}),
)


@check("disclosure.banner", "5", order=30)
def banner(ctx: Context) -> Verdict:
    seen: list[tuple[str, str]] = []
    unread: list[str] = []  # services whose replies could not be read: no PASS over them
    for services, read, quit_kw in _READERS:
        for service in services:
            if service not in ctx.open_ports:
                continue
            try:
                c = ctx.connect(service)
            except ProbeError as exc:
                unread.append(f"{service}: {exc}")
                continue
            try:
                seen += read(c, service)
            except ProbeError as exc:
                unread.append(f"{service}: {exc}")
            finally:
                c.quit(**quit_kw)
    if not seen and not unread:
        raise skip("port.none-of", services=", ".join(s for group, _, _ in _READERS
                                                      for s in group))
    names: list[str] = []
    versions: list[str] = []
    for where, text in seen:
        name, version = _find(where, text)
        if name and name.lower() == "postfix":
            ctx.software = "postfix"
        if version:
            versions.append(f"{where}: {text.strip()[:80]}")
        elif name:
            names.append(f"{where}: {text.strip()[:80]}")
    if versions:
        return Verdict(FAIL, "banner.version", {"where": versions[0]})
    if names:
        return Verdict(WARN, "banner.name", {"where": names[0]})
    if unread:
        return Verdict(INCONCLUSIVE, "probe.error", {"error": "; ".join(unread)[:200]})
    return Verdict(PASS, "banner.clean", {})


def _shape(lines: list[str], address: str) -> str:
    """A reply's text with the address and its local part taken out: what is left must be
    the same for a known and an unknown user, or the text tells them apart."""
    text = " ".join(lines)
    for part in (address, address.partition("@")[0]):
        if part:  # whole tokens only: the local part "a" must not eat every "a"
            text = re.sub(rf"(?<![\w.+-]){re.escape(part)}(?![\w.+-])", "", text,
                          flags=re.IGNORECASE)
    return " ".join(text.split())


@check("disclosure.vrfy-expn", "5", order=31)
def vrfy_expn(ctx: Context) -> Verdict:
    """VRFY and EXPN for the known user and for a made-up one: the codes and the texts
    (without the address) must be the same. RCPT is shown too; it may tell them apart."""
    t = ctx.target
    ctx.port("smtp")
    if not t.domain:
        raise skip("need.domain")
    known = t.known_address or f"postmaster@{t.domain}"
    nobody = unknown_local(ctx) or ""
    codes: dict[str, tuple[int, int]] = {}
    texts: dict[str, tuple[str, str]] = {}
    rcpt: tuple[int, int] | None = None
    with ctx.session("smtp") as (c, _):
        for verb in ("VRFY", "EXPN"):
            a, a_text = c.cmd(f"{verb} {known}")
            b, b_text = c.cmd(f"{verb} {nobody}")
            codes[verb] = (a, b)
            texts[verb] = (_shape(a_text, known), _shape(b_text, nobody))
            if a == 421 or b == 421:
                break
        if not c.closed:
            try:
                c.cmd("MAIL FROM:<>")
                a, _ = c.cmd(f"RCPT TO:<{known}>")
                b, _ = c.cmd(f"RCPT TO:<{nobody}>")
                rcpt = (a, b)
                c.cmd("RSET")
            except ProbeError:
                pass
    leaks = []
    for verb, (a, b) in codes.items():
        if a in (250, 251) or a != b:
            leaks.append(f"{verb} {a}/{b}")
        elif texts[verb][0] != texts[verb][1]:
            leaks.append(f"{verb} {a}/{b} with different texts: "
                         f"{texts[verb][0][:40]!r} / {texts[verb][1][:40]!r}")
    info = f"RCPT {rcpt[0]}/{rcpt[1]}" if rcpt else "RCPT -"
    if leaks:
        return Verdict(FAIL, "vrfy.leaks", {"what": "; ".join(leaks), "rcpt": info})
    return Verdict(PASS, "vrfy.same", {"what": "; ".join(f"{v} {a}/{b}" for v, (a, b)
                                                         in codes.items()), "rcpt": info})
