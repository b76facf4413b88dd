"""Vacation auto-replies (RFC 5230, RFC 3834) that can never become a backscatter source.

A vacation reply goes to the envelope sender of whatever arrived. Anyone can write any
envelope sender, so a responder that answers whatever comes is a machine that sends mail to
victims of the spammer's choice (the seed's NDR-spam). So ``decide`` answers only when every
rule below allows it, and says which rule did not:

* the sender is not null, not ``MAILER-DAEMON``/``LISTSERV``/``majordomo``, not
  ``owner-*``/``*-request``, and not one of the user's own addresses (RFC 5230 4.6);
* the message is no automatic one: no ``Auto-Submitted`` other than ``no`` (RFC 3834 5),
  no ``Precedence: bulk|list|junk``, no ``List-*`` field (RFC 2369/2919), no
  ``X-Auto-Response-Suppress`` asking for none;
* the user is addressed in person: one of their addresses (or of ``:addresses``) is in a
  To, Cc, Bcc, Resent-To, Resent-Cc or Resent-Bcc field (RFC 5230 4.5);
* the sender is authenticated, which the anchors do not ask for and which ends
  backscatter: on submission a local user who logged in (SMTP AUTH), from outside an SPF
  pass for the envelope sender's domain or a DKIM pass of that domain (or a parent of it);
  a forged sender gets no reply;
* once per (sender, handle) per period (``:days``/``:seconds``, clamped to the
  administrator's ``vacation_min_days``..``vacation_max_days``), remembered in a small
  file beside the user's scripts (``VacationState``), shared by every process and node
  that mounts the Maildir.

``build_reply`` makes the reply: null envelope sender (the caller queues it with
``MAIL FROM:<>``), ``Auto-Submitted: auto-replied``, In-Reply-To/References, Subject
``Auto: ...`` by default, From the user (or ``:from`` when it is one of the user's
addresses). No sockets here; the state file is the only I/O (call it off the event loop).
"""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import hashlib
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email.header import Header
from pathlib import Path

DAY = 86400
MAX_REMEMBERED = 10_000  # (sender, handle) pairs a user's state file keeps
MAX_REASON = 64 * 1024
_NO_REPLY_LOCALS = ("mailer-daemon", "listserv", "majordomo")
_ADDRESSED = ("to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc")
_FOLD = re.compile(r"\r?\n[ \t]+")


@dataclass(frozen=True)
class Rules:
    """The vacation rules a node applies; the default is the hardened one. The lab's
    legacy profile (server/profile.py seam) turns the sender check off, as classic
    responders have it."""

    require_authenticated_sender: bool = True


HARDENED = Rules()


@dataclass(frozen=True)
class Request:
    """One vacation action of one delivery, with what is known of the message."""

    sender: str  # envelope sender ("" for the null sender)
    user: str  # the canonical recipient
    user_addresses: frozenset[str]  # every address of the user (lower case)
    headers: list[tuple[str, str]]  # the message's fields, unfolded, in order
    authenticated: bool  # see the module docstring; SenderAuthenticated below
    handle: str
    seconds: int  # as the script asked (:days * 86400 or :seconds)
    addresses: tuple[str, ...] = ()  # :addresses


@dataclass(frozen=True)
class Decision:
    send: bool
    reason: str  # why not (or "sent"), for the log line
    period: int = 0  # seconds, clamped


def parse_headers(block: bytes) -> list[tuple[str, str]]:
    """The fields of a header section as (lower-case name, unfolded value)."""
    text = _FOLD.sub(" ", block.decode("utf-8", "replace"))
    out = []
    for line in text.split("\n"):
        name, sep, value = line.rstrip("\r").partition(":")
        if sep and name and " " not in name:
            out.append((name.strip().lower(), value.strip()))
    return out


def _field(headers: list[tuple[str, str]], name: str) -> str | None:
    return next((v for n, v in headers if n == name), None)


def sender_authenticated(*, submitted_by: str | None, sender: str, spf_pass_domain: str = "",
                         dkim_pass_domains: Iterable[str] = ()) -> bool:
    """Whether the envelope sender is proven: a logged-in local user (submission; the MSA
    already holds the sender to the user's addresses), or SPF pass for the sender's domain,
    or DKIM pass by that domain or a parent of it (relaxed alignment)."""
    if submitted_by:
        return True
    domain = sender.rpartition("@")[2].lower().rstrip(".")
    if not sender or not domain:
        return False
    if spf_pass_domain and spf_pass_domain.lower().rstrip(".") == domain:
        return True
    for d in dkim_pass_domains:
        d = d.lower().rstrip(".")
        if d and (domain == d or domain.endswith("." + d)):
            return True
    return False


def clamp(seconds: int, min_days: int, max_days: int) -> int:
    return max(min_days * DAY, min(seconds, max_days * DAY))


def _automatic(headers: list[tuple[str, str]]) -> str | None:
    """Why the message is an automatic one (no reply), or None."""
    auto = _field(headers, "auto-submitted")
    if auto is not None and auto.split(";")[0].strip().lower() != "no":
        return f"Auto-Submitted: {auto.split(';')[0].strip()[:40]}"
    prec = _field(headers, "precedence")
    if prec is not None and prec.strip().lower() in ("bulk", "list", "junk"):
        return f"Precedence: {prec.strip().lower()}"
    for name, _ in headers:
        if name.startswith("list-"):
            return f"mailing list ({name})"
    suppress = _field(headers, "x-auto-response-suppress")
    if suppress is not None and any(w.strip().lower() in ("all", "oof")
                                    for w in suppress.split(",")):
        return "X-Auto-Response-Suppress"
    return None


def addressed(headers: list[tuple[str, str]], mine: Iterable[str]) -> bool:
    """Whether one of ``mine`` is in a To/Cc/Bcc/Resent-* field (RFC 5230 4.5)."""
    wanted = {a.lower() for a in mine}
    values = [v for n, v in headers if n in _ADDRESSED]
    return any(addr.lower() in wanted for _, addr in email.utils.getaddresses(values))


def decide(req: Request, rules: Rules = HARDENED) -> Decision:
    """Whether to reply, and why not; the once-per-period rule is ``VacationState``'s."""
    sender = req.sender
    if not sender:
        return Decision(False, "null sender")
    local = sender.rpartition("@")[0].lower()
    if local in _NO_REPLY_LOCALS or local.startswith("owner-") or local.endswith("-request"):
        return Decision(False, f"sender <{sender}> is a system or list address")
    mine = req.user_addresses | {req.user.lower()} | {a.lower() for a in req.addresses}
    if sender.lower() in mine:
        return Decision(False, "sender is the user")
    why = _automatic(req.headers)
    if why is not None:
        return Decision(False, why)
    if not addressed(req.headers, mine):
        return Decision(False, "user not in To/Cc")
    if rules.require_authenticated_sender and not req.authenticated:
        return Decision(False, "sender not authenticated (no SMTP AUTH, SPF or aligned DKIM "
                               "pass)")
    return Decision(True, "sent")


class VacationState:
    """Who was answered until when: ``<sieve dir>/.vacation``, one ``expiry key`` line per
    (sender, handle), the key a hash (no address kept in clear). Changed under an flock of
    ``.vacation.lock`` and replaced by a rename, so concurrent deliveries (threads,
    processes, nodes on one Maildir) answer once."""

    def __init__(self, sieve_dir: Path, name: str = ".vacation") -> None:
        self.dir = sieve_dir
        self.path = sieve_dir / name
        self.lock = sieve_dir / f"{name}.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, int]]:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self._read()
        finally:
            os.close(fd)

    def _read(self) -> dict[str, int]:
        entries: dict[str, int] = {}
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return entries
        with os.fdopen(fd, "rb") as f:
            for line in f.read(MAX_REMEMBERED * 64).decode("ascii", "replace").splitlines():
                expiry, _, key = line.partition(" ")
                if expiry.isdigit() and key:
                    entries[key] = int(expiry)
        return entries

    def _write(self, entries: dict[str, int], now: float) -> None:
        live = sorted(((e, k) for k, e in entries.items() if e > now), reverse=True)
        text = "".join(f"{e} {k}\n" for e, k in live[:MAX_REMEMBERED])
        tmp = self.dir / f"{self.path.name}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    @staticmethod
    def key(sender: str, handle: str) -> str:
        return hashlib.sha256(f"{sender.lower()}\0{handle}".encode()).hexdigest()[:32]

    def claim(self, sender: str, handle: str, period: int, now: float | None = None) -> bool:
        """True (and remembered for ``period`` seconds) if ``sender`` was not answered for
        ``handle`` within its period; False if it was."""
        now = time.time() if now is None else now
        key = self.key(sender, handle)
        with self._locked() as entries:
            if entries.get(key, 0) > now:
                return False
            entries[key] = int(now + period)
            self._write(entries, now)
        return True

    def count_recent(self, limit: int, window: int, now: float | None = None) -> bool:
        """A sliding-window counter in the same file format (entries keyed by time): True
        and one more counted if fewer than ``limit`` fall within the last ``window``
        seconds. (Used for the per-day redirect limit.)"""
        now = time.time() if now is None else now
        with self._locked() as entries:
            live = {k: e for k, e in entries.items() if e > now}
            if len(live) >= limit:
                return False
            live[secrets.token_hex(8)] = int(now + window)
            self._write(live, now)
        return True


def _clean(text: str, limit: int = 200) -> str:
    """One printable line (no CR/LF: nothing can be injected into a header)."""
    text = " ".join(text.split())
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


def _encode(text: str) -> str:
    return text if text.isascii() else Header(text, "utf-8").encode()


def build_reply(*, hostname: str, user: str, from_: str | None, to: str,
                headers: list[tuple[str, str]], reason: str, subject: str | None,
                mime: bool, user_addresses: frozenset[str], now: float | None = None) -> bytes:
    """The reply (RFC 5230 5, RFC 3834 3): CRLF bytes, ready for the queue."""
    sender = user
    if from_:
        name, addr = email.utils.parseaddr(from_)
        if addr and addr.lower() in user_addresses | {user.lower()}:
            sender = email.utils.formataddr((_clean(name), addr)) if name else addr
    orig_subject = _clean(_field(headers, "subject") or "", 900)
    subj = _clean(subject, 900) if subject else f"Auto: {orig_subject}".rstrip()
    msgid = _clean(_field(headers, "message-id") or "", 900)
    refs = _clean(_field(headers, "references") or "", 900)
    lines = [
        f"From: {_clean(sender, 900)}",
        f"To: <{_clean(to, 320)}>",
        f"Subject: {_encode(subj)}",
        f"Date: {email.utils.formatdate(now, localtime=False)}",
        f"Message-ID: <{secrets.token_hex(12)}@{hostname}>",
        "Auto-Submitted: auto-replied (vacation)",
    ]
    if msgid:
        lines.append(f"In-Reply-To: {msgid}")
        lines.append(f"References: {(refs + ' ' + msgid).strip()}")
    lines.append("MIME-Version: 1.0")
    reason = reason[:MAX_REASON].replace("\r\n", "\n").replace("\r", "\n")
    if mime:  # the reason is a MIME entity: its own header fields, then its body
        head = "\r\n".join(lines) + "\r\n"
        return (head + reason.replace("\n", "\r\n")).encode("utf-8", "replace")
    lines += ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit",
              ""]
    body = "\r\n".join(ln.rstrip() for ln in reason.split("\n"))
    return ("\r\n".join(lines) + "\r\n" + body + "\r\n").encode("utf-8", "replace")
