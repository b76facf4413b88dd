"""A deliberately weak SMTP/POP3/IMAP server for the auditor's tests, loopback only.

With no weakness switched on it behaves like a careful server (relay refused, unknown
users refused at RCPT, VRFY 252, STARTTLS/STLS with TLS 1.2+, AUTH and USER only inside
TLS, pipelined plaintext discarded at the handshake, only <CRLF>.<CRLF> ends DATA,
limits on lines, SIZE, recipients and NUL, GTUBE refused at the end of DATA as a content
filter refuses it, no software name; IMAP with LOGINDISABLED
before STARTTLS and literals over 64 KiB refused without ``+``). Each field of
:class:`Weakness` switches one of those off, so a test can prove that exactly the
matching audit check FAILs. Raw sockets and one thread per connection keep it small and
let it misbehave in ways a real engine would not (keep plaintext buffered across TLS,
end DATA at a bare LF, starve connections). Two behaviours are not weaknesses but make
a careful or weak server awkward to audit: ``slow`` answers chosen verbs late (an SPF
check or a sender callout at MAIL; the key ``"*"`` delays every reply, the greeting
too), ``trickle`` greets on port 25 with ``220-x`` continuation lines, one every
``trickle`` seconds, forever. Three more are not weaknesses the audit should FAIL on their
own: ``greeting`` replaces the SMTP greeting (``554 …`` refuses every session, RFC 5321
§3.1, then 503 to all but QUIT), ``broken_tls`` offers STARTTLS/STLS but every handshake
fails (no certificate loaded), ``refuse_data`` refuses every message at the end of DATA.
Every RCPT argument and every transaction that ended in a 250 (its envelope) is recorded,
so that a test can see where the auditor tried to send and what it completed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import ssl
import threading
import time
import warnings
from dataclasses import dataclass, fields

LINE_LIMIT = 512
IMAP_LINE_LIMIT = 8192
IMAP_LITERAL_LIMIT = 65536
SIZE_LIMIT = 10_000
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
RCPT_LIMIT = 100
MAX_ERRORS = 10


@dataclass
class Weakness:
    open_relay: bool = False
    accept_unknown: bool = False
    submission_no_auth: bool = False
    auth_before_tls: bool = False
    sender_forgery: bool = False
    vrfy_confirms: bool = False
    banner_version: bool = False
    no_starttls: bool = False
    no_stls: bool = False
    pop3_user_before_stls: bool = False
    old_tls: bool = False
    weak_ciphers: bool = False
    starttls_injection: bool = False
    stls_injection: bool = False
    smuggle_lf: bool = False
    no_line_limit: bool = False
    no_size_limit: bool = False
    no_rcpt_limit: bool = False
    accept_nul: bool = False
    exhaustible: bool = False  # serves at most 3 sessions; others wait, unanswered
    relay_local_sender: bool = False  # relays any RCPT when MAIL FROM is a local user
    apop: bool = False  # timestamp in the POP3 greeting, APOP answered before STLS
    vrfy_text: bool = False  # VRFY 252 for all, but the text tells users apart
    imap_plaintext_login: bool = False  # no LOGINDISABLED, AUTH=PLAIN and LOGIN before TLS
    no_imap_starttls: bool = False
    imap_injection: bool = False  # keeps plaintext pipelined with STARTTLS
    imap_huge_literal: bool = False  # answers + to a {4294967295} literal
    imap_banner_version: bool = False  # software and version in the IMAP greeting
    imap_literal_drop: bool = False  # a huge literal ends the session without a BYE
    imap_id_version: bool = False  # ID answers the software's name and version, not NIL
    imap_no_line_limit: bool = False  # holds a command line of any length, and runs it
    # LOGINDISABLED, no AUTH= and LOGIN refused before TLS, but AUTHENTICATE PLAIN forgot
    # the rule: it asks for the credentials (+) in the clear
    imap_authenticate_clear: bool = False
    sieve_plaintext_auth: bool = False  # ManageSieve: SASL PLAIN and a challenge before TLS
    sieve_injection: bool = False  # ManageSieve: keeps plaintext pipelined with STARTTLS
    sieve_banner_version: bool = False  # ManageSieve: software and version in IMPLEMENTATION
    no_content_filter: bool = False  # takes GTUBE at the end of DATA (no spam filter)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class _Closed(Exception):
    pass


class _Conn:
    """A socket with a line buffer; ``limit`` bounds a line (the rest is discarded)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode("utf-8") + b"\r\n")

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise _Closed
        self.buf += chunk

    def line(self, limit: int | None) -> tuple[bytes, bool]:
        """(line without CRLF, whether it was longer than ``limit``)."""
        too_long = False
        while b"\n" not in self.buf:
            if limit is not None and len(self.buf) > limit:
                too_long, self.buf = True, b""
            self._fill()
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r"), too_long

    def data(self, bare_lf_ends: bool) -> bytes:
        """Message bytes up to the end-of-data mark (the buffer keeps what follows)."""
        marks = [b"\r\n.\r\n"] + ([b"\n.\n"] if bare_lf_ends else [])
        self.buf = b"\r\n" + self.buf
        while True:
            hits = [(self.buf.find(m), m) for m in marks if m in self.buf]
            if hits:
                pos, mark = min(hits)
                body, self.buf = self.buf[2:pos], self.buf[pos + len(mark):]
                return body
            self._fill()

    def wrap(self, ctx: ssl.SSLContext, keep_buffer: bool) -> None:
        if not keep_buffer:
            self.buf = b""
        self.sock = ctx.wrap_socket(self.sock, server_side=True)


class WeakServer:
    """SMTP (MX), submission, submissions, POP3, POP3S, IMAP, IMAPS on free loopback ports."""

    ROLES = ("smtp", "submission", "submissions", "pop3", "pop3s", "imap", "imaps",
             "managesieve")

    def __init__(self, cert: object, weakness: Weakness | None = None,
                 domain: str = "weak.test", users: dict[str, str] | None = None,
                 banner: str = "weak.test ESMTP ready", slow: dict[str, float] | None = None,
                 trickle: float = 0.0, greeting: str | None = None, broken_tls: bool = False,
                 refuse_data: bool = False) -> None:
        self.weak = weakness or Weakness()
        self.banner = banner
        self.greeting = greeting
        self.refuse_data = refuse_data
        self.slow = {verb.upper(): delay for verb, delay in (slow or {}).items()}
        self.trickle = trickle
        self.domain = domain
        self.users = users or {"alice": "alice-pw"}
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if not broken_tls:  # without a certificate every handshake fails
            cert.configure_cert(self.ctx)  # type: ignore[attr-defined]
        if self.weak.old_tls:
            self.ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
            with warnings.catch_warnings():  # deprecated: the weakness under test
                warnings.simplefilter("ignore", DeprecationWarning)
                self.ctx.minimum_version = ssl.TLSVersion.TLSv1
        else:
            self.ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.weak.weak_ciphers:
            self.ctx.set_ciphers("ALL:eNULL:@SECLEVEL=0")
        self.ports: dict[str, int] = {}
        self._listeners: list[socket.socket] = []
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(3)
        self._stop = threading.Event()
        self.accepted = 0  # connections taken (a run that never started takes none)
        self.rcpt_args: list[str] = []  # every RCPT TO argument (after "TO:"), as sent
        self.completed: list[tuple[str, list[str]]] = []  # (sender, rcpts) of each 250

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> WeakServer:
        for role in self.ROLES:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 0))
            s.listen(64)
            s.settimeout(0.2)
            self._listeners.append(s)
            self.ports[role] = s.getsockname()[1]
            threading.Thread(target=self._accept, args=(s, role), daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for s in self._listeners:
            s.close()
        with self._lock:
            for s in list(self._socks):
                with contextlib.suppress(OSError):
                    s.close()

    def __enter__(self) -> WeakServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self, listener: socket.socket, role: str) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(20)
            with self._lock:
                self._socks.add(sock)
                self.accepted += 1
            threading.Thread(target=self._serve, args=(sock, role), daemon=True).start()

    def _serve(self, sock: socket.socket, role: str) -> None:
        slot = self.weak.exhaustible and role == "smtp"
        if slot:
            self._slots.acquire()
        try:
            conn = _Conn(sock)
            tls = role in ("submissions", "pop3s", "imaps")
            if tls:
                conn.wrap(self.ctx, keep_buffer=False)
            if role.startswith("pop3"):
                self._pop3(conn, tls)
            elif role.startswith("imap"):
                self._imap(conn, tls)
            elif role == "managesieve":
                self._sieve(conn)
            else:
                self._smtp(conn, role, tls)
        except (_Closed, OSError, ssl.SSLError):
            pass
        finally:
            if slot:
                self._slots.release()
            with contextlib.suppress(OSError):
                conn.sock.close()
            with self._lock:
                self._socks.discard(sock)

    # -- SMTP -----------------------------------------------------------------------------

    def _smtp(self, c: _Conn, role: str, tls: bool) -> None:
        w = self.weak
        submission = role in ("submission", "submissions")
        if self.trickle and role == "smtp":
            while not self._stop.is_set():  # the reply never ends; the client must give up
                c.send("220-x")
                time.sleep(self.trickle)
            return
        time.sleep(self.slow.get("*", 0.0))
        if self.greeting is not None:
            c.send(self.greeting)
            if not self.greeting.startswith("220"):
                self._refusing(c)
                return
        else:
            c.send("220 " + ("weak.test ESMTP Exim 4.69 ready" if w.banner_version
                             else self.banner))
        authed: str | None = None
        sender: str | None = None
        rcpts: list[str] = []
        errors = 0
        while True:
            raw, too_long = c.line(None if w.no_line_limit else LINE_LIMIT)
            if too_long:
                reply = "500 5.5.2 Line too long"
            elif b"\0" in raw and not w.accept_nul:
                reply = "500 5.5.2 NUL not allowed"
            else:
                line = raw.decode("latin-1")
                verb, _, arg = line.partition(" ")
                verb = verb.upper()
                reply = ""
                time.sleep(self.slow.get(verb, self.slow.get("*", 0.0)))
                if verb in ("EHLO", "HELO"):
                    sender, rcpts = None, []
                    ext = ["PIPELINING", f"SIZE {SIZE_LIMIT}"]
                    if not tls and not w.no_starttls:
                        ext.append("STARTTLS")
                    if submission and (tls or w.auth_before_tls):
                        ext.append("AUTH PLAIN")
                    c.send("\r\n".join(f"250-{x}" for x in ["weak.test", *ext[:-1]])
                           + f"\r\n250 {ext[-1]}")
                    continue
                if verb == "STARTTLS" and not tls and not w.no_starttls:
                    c.send("220 2.0.0 Ready to start TLS")
                    c.wrap(self.ctx, keep_buffer=w.starttls_injection)
                    tls, sender, rcpts = True, None, []
                    continue
                if verb == "AUTH":
                    reply = self._auth(arg, submission, tls)
                    if reply.startswith("235"):
                        authed = self._auth_user(arg)
                elif verb == "MAIL":
                    reply = self._mail(arg, submission, authed)
                    if reply.startswith("250"):
                        sender, rcpts = _addr(arg), []
                elif verb == "RCPT":
                    with self._lock:
                        self.rcpt_args.append(arg.partition(":")[2])
                    if sender is None:
                        reply = "503 5.5.1 MAIL first"
                    elif len(rcpts) >= RCPT_LIMIT and not w.no_rcpt_limit:
                        reply = "452 4.5.3 Too many recipients"
                    else:
                        relay_ok = authed or (submission and w.submission_no_auth)
                        reply = self._rcpt(_addr(arg), bool(relay_ok), sender)
                        if reply.startswith("250"):
                            rcpts.append(_addr(arg))
                elif verb == "DATA":
                    if not rcpts:
                        reply = "503 5.5.1 RCPT first"
                    else:
                        c.send("354 End data with <CR><LF>.<CR><LF>")
                        body = c.data(w.smuggle_lf)
                        reply = self._data(body, authed)
                        if reply.startswith("250"):
                            with self._lock:
                                self.completed.append((sender or "", rcpts))
                        sender, rcpts = None, []
                elif verb == "VRFY" or verb == "EXPN":
                    local = _addr(arg).partition("@")[0].lower()
                    if w.vrfy_confirms:
                        reply = (f"250 2.1.5 <{local}@{self.domain}>" if local in self.users
                                 else "550 5.1.1 No such user")
                    elif w.vrfy_text and verb == "VRFY":
                        reply = (f"252 <{local}@{self.domain}> is a local mailbox"
                                 if local in self.users else "252 Cannot VRFY user")
                    else:
                        reply = "252 2.5.2 Cannot VRFY" if verb == "VRFY" else "502 5.5.1 No"
                elif verb == "RSET":
                    sender, rcpts, reply = None, [], "250 2.0.0 OK"
                elif verb == "NOOP":
                    reply = "250 2.0.0 OK"
                elif verb == "HELP":
                    reply = "214 2.0.0 See RFC 5321"
                elif verb == "QUIT":
                    c.send("221 2.0.0 Bye")
                    return
                else:
                    reply = "500 5.5.2 Unknown command"
            if reply[0] in "45":
                errors += 1
                if errors >= MAX_ERRORS:
                    c.send("421 4.7.0 Too many errors")
                    return
            c.send(reply)

    def _refusing(self, c: _Conn) -> None:
        """After a 554 greeting: 503 to everything until QUIT (RFC 5321 §3.1)."""
        while True:
            raw, _ = c.line(LINE_LIMIT)
            if raw.decode("latin-1").partition(" ")[0].upper() == "QUIT":
                c.send("221 2.0.0 Bye")
                return
            c.send("503 5.5.1 No service")

    def _auth_user(self, arg: str) -> str:
        try:
            _, user, _ = base64.b64decode(arg.split()[1]).decode().split("\0")
        except (ValueError, IndexError):
            return ""
        return user

    def _auth(self, arg: str, submission: bool, tls: bool) -> str:
        if not submission:
            return "503 5.5.1 AUTH not available"
        if not tls and not self.weak.auth_before_tls:
            return "538 5.7.11 Encryption required"
        try:
            _, user, pw = base64.b64decode(arg.split()[1]).decode().split("\0")
        except (ValueError, IndexError):
            return "501 5.5.2 Bad AUTH"
        local, _, domain = user.partition("@")
        if domain == self.domain and self.users.get(local) == pw:
            return "235 2.7.0 OK"
        return "535 5.7.8 Bad credentials"

    def _mail(self, arg: str, submission: bool, authed: str | None) -> str:
        w = self.weak
        for param in arg.split()[1:]:
            key, _, value = param.partition("=")
            if (key.upper() == "SIZE" and value.isdigit() and int(value) > SIZE_LIMIT
                    and not w.no_size_limit):
                return "552 5.3.4 Too big"
        if submission and not authed and not w.submission_no_auth:
            return "530 5.7.0 Authentication required"
        if authed and _addr(arg).lower() != authed.lower() and not w.sender_forgery:
            return "553 5.7.1 Not your address"
        return "250 2.1.0 OK"

    def _rcpt(self, addr: str, may_relay: bool, sender: str | None = None) -> str:
        local, _, domain = addr.rpartition("@")
        s_local, _, s_domain = (sender or "").rpartition("@")
        if (self.weak.relay_local_sender and s_domain.lower() == self.domain
                and s_local.lower() in self.users):
            may_relay = True  # "relay for my own domain's senders": forgeable
        if domain.lower() == self.domain:
            if local.lower() in self.users or self.weak.accept_unknown:
                return "250 2.1.5 OK"
            return "550 5.1.1 No such user"
        if may_relay or self.weak.open_relay:
            return "250 2.1.5 OK"
        return "554 5.7.1 Relay access denied"

    def _data(self, body: bytes, authed: str | None) -> str:
        w = self.weak
        if self.refuse_data:
            return "554 5.7.1 Message refused"
        if len(body) > SIZE_LIMIT and not w.no_size_limit:
            return "552 5.3.4 Too big"
        if not w.smuggle_lf and (b"\r" in body.replace(b"\r\n", b"")
                                 or b"\n" in body.replace(b"\r\n", b"")):
            return "550 5.6.0 Bare CR or LF"
        if authed and not w.sender_forgery:
            for line in body.split(b"\r\n"):
                if line.lower().startswith(b"from:") and authed.encode() not in line:
                    return "553 5.7.1 From: is not yours"
        if GTUBE in body and not w.no_content_filter:
            return "554 5.7.1 Gtube pattern"
        return "250 2.0.0 Accepted"

    # -- POP3 -----------------------------------------------------------------------------

    def _pop3(self, c: _Conn, tls: bool) -> None:
        w = self.weak
        stamp = f"<{os.getpid()}.{time.time_ns()}@{self.domain}>"
        time.sleep(self.slow.get("*", 0.0))
        c.send("+OK weak.test POP3 ready" + (f" {stamp}" if w.apop else ""))
        while True:
            raw, _ = c.line(LINE_LIMIT)
            verb, _, arg = raw.decode("latin-1").partition(" ")
            verb = verb.upper()
            time.sleep(self.slow.get(verb, self.slow.get("*", 0.0)))
            if verb == "CAPA":
                caps = ["TOP", "UIDL"]
                if not tls and not w.no_stls:
                    caps.append("STLS")
                if tls or w.pop3_user_before_stls:
                    caps.append("USER")
                c.send("+OK\r\n" + "\r\n".join(caps) + "\r\n.")
            elif verb == "STLS" and not tls and not w.no_stls:
                c.send("+OK Begin TLS")
                c.wrap(self.ctx, keep_buffer=w.stls_injection)
                tls = True
            elif verb in ("USER", "PASS"):
                if not tls and not w.pop3_user_before_stls:
                    c.send("-ERR [PRIVACY] STLS first")
                else:
                    c.send("+OK" if verb == "USER" else "-ERR [AUTH] Invalid")
            elif verb == "APOP" and w.apop:
                user, _, digest = arg.partition(" ")
                good = hashlib.md5((stamp + self.users.get(user, "\0")).encode()).hexdigest()
                c.send("+OK maildrop locked" if digest == good else "-ERR [AUTH] Invalid")
            elif verb == "QUIT":
                c.send("+OK Bye")
                return
            else:
                c.send("-ERR Not allowed now")


    # -- IMAP -----------------------------------------------------------------------------

    def _imap(self, c: _Conn, tls: bool) -> None:
        """Just enough IMAP for the auditor: CAPABILITY, NOOP, ID, STARTTLS, LOGIN, LOGOUT."""
        w = self.weak
        c.send("* OK " + ("weak.test Dovecot 2.3.21 ready" if w.imap_banner_version
                          else "weak.test IMAP ready"))
        while True:
            raw, too_long = c.line(None if w.imap_no_line_limit else IMAP_LINE_LIMIT)
            if too_long:
                c.send("* BAD Line too long")
                continue
            line = raw.decode("latin-1")
            tag, _, rest = line.partition(" ")
            verb, _, arg = rest.partition(" ")
            verb = verb.upper()
            if line.endswith("}") and "{" in line:
                size = line.rpartition("{")[2][:-1]
                if not size.isdigit():
                    c.send(f"{tag} BAD Bad literal")
                    continue
                if int(size) > IMAP_LITERAL_LIMIT and w.imap_literal_drop:
                    return  # as a session process that dies would
                if int(size) > IMAP_LITERAL_LIMIT and not w.imap_huge_literal:
                    c.send(f"{tag} BAD Literal too big")
                    continue
                c.send("+ Ready for literal data")
                c.line(None)  # the literal and the rest of the command: not served here
                c.send(f"{tag} NO Not supported here")
                continue
            if verb == "CAPABILITY":
                caps = ["IMAP4rev1", "ID"]
                if not tls and not w.no_imap_starttls:
                    caps.append("STARTTLS")
                if tls or w.imap_plaintext_login:
                    caps.append("AUTH=PLAIN")
                else:
                    caps.append("LOGINDISABLED")
                c.send("* CAPABILITY " + " ".join(caps) + f"\r\n{tag} OK CAPABILITY done")
            elif verb == "NOOP":
                c.send(f"{tag} OK NOOP done")
            elif verb == "ID":
                c.send(('* ID ("name" "WeakIMAP" "version" "1.2.3")' if w.imap_id_version
                        else "* ID NIL") + f"\r\n{tag} OK ID done")
            elif verb == "STARTTLS" and not tls and not w.no_imap_starttls:
                c.send(f"{tag} OK Begin TLS")
                c.wrap(self.ctx, keep_buffer=w.imap_injection)
                tls = True
            elif verb == "AUTHENTICATE" and not tls and w.imap_authenticate_clear:
                if " " in arg.strip():  # SASL-IR: the credentials came with the command
                    c.send(f"{tag} NO [AUTHENTICATIONFAILED] Invalid")
                    continue
                c.send("+ ")
                answer, _ = c.line(IMAP_LINE_LIMIT)
                c.send(f"{tag} BAD Cancelled" if answer.strip() == b"*"
                       else f"{tag} NO [AUTHENTICATIONFAILED] Invalid")
            elif verb in ("LOGIN", "AUTHENTICATE"):
                if not tls and not w.imap_plaintext_login:
                    c.send(f"{tag} NO [PRIVACYREQUIRED] STARTTLS first")
                else:
                    user, _, pw = arg.partition(" ")
                    ok = self.users.get(user.partition("@")[0]) == pw.strip('"')
                    c.send(f"{tag} OK Logged in" if ok and verb == "LOGIN"
                           else f"{tag} NO [AUTHENTICATIONFAILED] Invalid")
            elif verb == "LOGOUT":
                c.send(f"* BYE Logging out\r\n{tag} OK LOGOUT done")
                return
            else:
                c.send(f"{tag} BAD Unknown command")


    # -- ManageSieve ----------------------------------------------------------------------

    def _sieve(self, c: _Conn) -> None:
        """Just enough ManageSieve (RFC 5804) for the auditor: capabilities, NOOP with a
        tag, STARTTLS, AUTHENTICATE PLAIN (never accepted), LOGOUT."""
        w = self.weak
        tls = False

        def caps() -> str:
            sasl = "PLAIN" if tls or w.sieve_plaintext_auth else ""
            name = "Cyrus timsieved v2.4.17" if w.sieve_banner_version else "weak"
            lines = [f'"IMPLEMENTATION" "{name}"', f'"SASL" "{sasl}"', '"SIEVE" "fileinto"']
            if not tls:
                lines.append('"STARTTLS"')
            return "\r\n".join([*lines, '"VERSION" "1.0"', 'OK "ready"'])

        c.send(caps())
        while True:
            raw, _ = c.line(LINE_LIMIT)
            verb, _, arg = raw.decode("latin-1").partition(" ")
            verb = verb.upper()
            if verb == "CAPABILITY":
                c.send(caps())
            elif verb == "NOOP":
                c.send(f"OK (TAG {arg}) \"Done\"" if arg else 'OK "Done"')
            elif verb == "STARTTLS" and not tls:
                c.send('OK "Begin TLS"')
                c.wrap(self.ctx, keep_buffer=w.sieve_injection)
                tls = True
                c.send(caps())
            elif verb == "AUTHENTICATE":
                if not tls and not w.sieve_plaintext_auth:
                    c.send('NO (ENCRYPT-NEEDED) "STARTTLS first"')
                elif " " in arg.strip():
                    c.send('NO "Authentication failed"')
                else:
                    c.send('""')
                    answer, _ = c.line(LINE_LIMIT)
                    c.send('NO "Cancelled"' if answer.strip() == b'"*"'
                           else 'NO "Authentication failed"')
            elif verb == "LOGOUT":
                c.send('OK "Bye"')
                return
            else:
                c.send('NO "Unknown command"')


def _addr(arg: str) -> str:
    """The path inside <...> of a MAIL/RCPT argument (or the bare argument)."""
    _, sep, rest = arg.partition("<")
    if sep:
        return rest.rpartition(">")[0]
    return arg.partition(":")[2].strip() or arg.strip()
