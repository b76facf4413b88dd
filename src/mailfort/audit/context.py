"""What a probe needs: the target, bounded connections, evidence, and the run's budget."""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from mailfort.audit.client import BudgetSpent, ProbeError, RawClient, insecure_context, trim
from mailfort.audit.registry import inconclusive, skip

SMTP_SERVICES = ("smtp", "submission", "submissions")
POP3_SERVICES = ("pop3", "pop3s")
IMAP_SERVICES = ("imap", "imaps")
MANAGESIEVE_SERVICES = ("managesieve",)
IMPLICIT_TLS = ("submissions", "pop3s", "imaps")
EHLO_NAME = "audit.mailfort.invalid"


@dataclass
class Target:
    """The server under audit and the knobs that bound the run."""

    host: str
    ports: dict[str, int | None] = field(default_factory=dict)
    domain: str | None = None
    user: str | None = None  # a known local part at ``domain``
    auth_user: str | None = None
    auth_password: str | None = None
    foreign_domain: str = "example.com"
    timeout: float = 10.0  # per connection, per send and per reply (all its lines)
    budget: float = 110.0  # the whole run
    idle_connections: int = 20
    rcpt_count: int = 1100  # past the common 1,000 (Postfix's smtpd_recipient_limit)
    long_line: int = 100_000
    max_size_probe: int = 64 * 1024 * 1024  # never stream more than this to test SIZE
    resolver: tuple[str, int] | None = None
    dnsbls: tuple[str, ...] = ("zen.spamhaus.org", "bl.spamcop.net")
    cafile: str | None = None

    @property
    def known_address(self) -> str | None:
        return f"{self.user}@{self.domain}" if self.user and self.domain else None


class Context:
    """Shared by every check of one run; ``evidence`` is reset for each check."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.started = time.monotonic()
        self.deadline = self.started + target.budget  # every wait of every check ends here
        self.evidence: list[str] = []
        self.open_ports: dict[str, int] = {}
        self.greetings: dict[str, str] = {}  # first greeting line per open port
        self.software: str | None = None  # "postfix" when the server says so
        self.cache: dict[str, object] = {}  # results shared by checks (DNS lookups)

    # -- budget -----------------------------------------------------------------------

    def remaining(self) -> float:
        return self.target.budget - (time.monotonic() - self.started)

    def note(self, line: str) -> None:
        self.evidence.append(f"  [{line}]")

    # -- connections ------------------------------------------------------------------

    def port(self, service: str) -> int:
        """The open port of ``service``, or SKIP when it was not given or is closed."""
        port = self.open_ports.get(service)
        if port is None:
            given = self.target.ports.get(service)
            raise skip("port.closed" if given else "port.none", service=service, port=given)
        return port

    def raw(self, port: int, *, evidence: bool = True) -> RawClient:
        """A bare connection to ``port`` under the run's timeout and budget."""
        t = self.target
        return RawClient(t.host, port, t.timeout, self.evidence if evidence else [],
                         deadline=self.deadline)

    def connect(self, service: str, *, timeout: float | None = None) -> RawClient:
        t = self.target
        if self.remaining() <= 0:
            raise BudgetSpent("the run's time budget is spent")
        c = RawClient(t.host, self.port(service), min(timeout or t.timeout, t.timeout),
                      self.evidence, deadline=self.deadline)
        if service in IMPLICIT_TLS:
            c.starttls()
        return c

    def smtp(self, service: str, *, tls: bool | str = False,
             ehlo: bool = True) -> tuple[RawClient, list[str]]:
        """Greeting, EHLO and (``tls``) STARTTLS and EHLO again; returns EHLO lines.

        ``tls=True`` requires STARTTLS (SKIP without it); ``tls="opportunistic"`` uses it
        when offered and goes on in the clear otherwise.
        """
        c = self.connect(service)
        try:
            smtp_greeting(c, service)
            lines: list[str] = []
            if ehlo:
                code, lines = c.cmd(f"EHLO {EHLO_NAME}")
                if code != 250:
                    raise ProbeError(f"EHLO answered {code}")
            if tls and service not in IMPLICIT_TLS:
                if not has_ext(lines, "STARTTLS"):
                    if tls == "opportunistic":
                        return c, lines
                    raise skip("tls.not-offered", service=service)
                code, _ = c.cmd("STARTTLS")
                if code != 220:
                    raise ProbeError(f"STARTTLS answered {code}")
                c.starttls()
                code, lines = c.cmd(f"EHLO {EHLO_NAME}")
                if code != 250:
                    raise ProbeError(f"EHLO after STARTTLS answered {code}")
            return c, lines
        except BaseException:
            c.close()
            raise

    def pop3(self, service: str) -> RawClient:
        c = self.connect(service)
        ok, _ = c.status()
        if not ok:
            c.close()
            raise ProbeError("POP3 greeting is not +OK")
        return c

    def imap(self, service: str) -> RawClient:
        """A connection whose ``* OK`` greeting is read (PREAUTH or BYE: INCONCLUSIVE, a
        session that is not in the not-authenticated state tests nothing here)."""
        c = self.connect(service)
        try:
            greeting = imap_greeting(c)
        except BaseException:
            c.close()
            raise
        if not greeting.upper().startswith("* OK"):
            c.close()
            raise inconclusive("greeting.refused", service=service, code=greeting[2:9],
                               text=greeting[:80])
        return c

    def managesieve(self, service: str = "managesieve") -> tuple[RawClient, dict[str, str]]:
        """A connection whose greeting (capabilities, then OK) is read; BYE (a refused
        session) is INCONCLUSIVE."""
        c = self.connect(service)
        try:
            caps = sieve_greeting(c, service)
        except BaseException:
            c.close()
            raise
        return c, caps

    @contextlib.contextmanager
    def session(self, service: str, **kw: bool | str) -> Iterator[tuple[RawClient, list[str]]]:
        c, lines = self.smtp(service, **kw)
        try:
            yield c, lines
        finally:
            c.quit()

    def verifying_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.target.cafile)
        return ctx

    def legacy_context(self) -> ssl.SSLContext:
        return insecure_context(legacy=True)


def smtp_greeting(c: RawClient, service: str) -> None:
    """Read the greeting. A 554 (or other 4xx/5xx) greeting is a greeting (RFC 5321 §3.1):
    the server refuses every session, so a check that needs one is INCONCLUSIVE, not a
    FAIL of whatever it was about to test."""
    code, lines = c.reply()
    if 400 <= code < 600:
        raise inconclusive("greeting.refused", service=service, code=code,
                           text=" ".join(lines)[:80])
    if code != 220:
        raise ProbeError(f"greeting {code}")


def imap_greeting(c: RawClient) -> str:
    """The IMAP greeting line (``* OK``, ``* PREAUTH`` or ``* BYE``)."""
    text = c.read_line().decode("latin-1")
    c.transcript.append("< " + trim(text))
    return text


def imap_capabilities(c: RawClient) -> list[str]:
    """The words of the CAPABILITY reply, upper-cased (``STARTTLS``, ``AUTH=PLAIN``…)."""
    status, lines = c.imap("C", "CAPABILITY")
    if status != "OK":
        raise ProbeError(f"CAPABILITY answered {status}")
    words: list[str] = []
    for ln in lines:
        head = "* CAPABILITY "
        if ln.upper().startswith(head):
            words += ln[len(head):].upper().split()
    return words


def sieve_capabilities(lines: list[str]) -> dict[str, str]:
    """ManageSieve capability lines (``"NAME" "value"``) as {NAME upper-cased: value}."""
    caps: dict[str, str] = {}
    for ln in lines:
        parts = ln.split('"')
        if len(parts) >= 3 and parts[0] == "":
            caps[parts[1].upper()] = parts[3] if len(parts) >= 5 else ""
    return caps


def sieve_greeting(c: RawClient, service: str = "managesieve") -> dict[str, str]:
    """Read the ManageSieve greeting: its capabilities (a BYE: INCONCLUSIVE)."""
    status, lines = c.sieve()
    if status != "OK":
        raise inconclusive("greeting.refused", service=service, code=status,
                           text=" ".join(lines)[:80])
    return sieve_capabilities(lines)


def has_ext(ehlo_lines: list[str], keyword: str) -> bool:
    """Whether an EHLO reply advertises ``keyword`` (first line is the greeting)."""
    return any(ln.split(" ")[0].upper() == keyword for ln in ehlo_lines[1:])


def ext_arg(ehlo_lines: list[str], keyword: str) -> str | None:
    for ln in ehlo_lines[1:]:
        word, _, rest = ln.partition(" ")
        if word.upper() == keyword:
            return rest
    return None


def positive(code: int) -> bool:
    return 200 <= code < 400
