"""A differential IMAP runner: the same scripted sessions against two servers, results
normalised so that two servers holding the same messages compare equal.

Each session is plain imaplib (connection, STARTTLS or implicit TLS, LOGIN) and one raw
command layer on its socket (``Session.cmd``), so that every untagged response is kept in
the order the server sent it, literals inline, whatever the command (imaplib 3.11 has no
IDLE, MOVE or ENABLE reply handling of its own).

What normalisation drops, and why (everything else is compared as the server sent it):
the human text of every reply (server wording); UIDVALIDITY and MODSEQ values (chosen by
each server); the keywords listed in FLAGS and PERMANENTFLAGS, and FLAGS or PERMANENTFLAGS
sent outside SELECT/EXAMINE (Dovecot lists every keyword the mailbox ever had, and
announces one a SEARCH merely names; another server may list those in use: the keywords of
each message are compared in FETCH); INTERNALDATE (the arrival time); ``\\Recent`` and
RECENT counts (gone in IMAP4rev2, per-session in rev1); untagged OK/NO/BAD without a code,
``[CLOSED]``, ``[HIGHESTMODSEQ]``, ``[CLIENTBUG]`` (informational) and the optional RFC 5530
codes of a refusal (the refusal itself is compared; TRYCREATE stays); the order of LIST
responses; the names of the mailboxes under test, which differ by run (replaced by
``{BOX}`` and ``{P}``); the case of BODYSTRUCTURE atoms (the sender's); special-use
attributes, kept apart under ``~special_use`` (the reference Dovecot is configured without
them) for the caller to check. A deliberately different mailbox must still compare
unequal: ``tests/server/test_imap_differential.py`` checks that.
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import re
import shutil
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TIMEOUT = 10.0
IDLE_WAIT = 10.0  # seconds a delivered message may take to reach an IDLE session
SPECIAL = ("Archive", "Drafts", "Junk", "Sent", "Trash")
SPECIAL_ATTRS = {b"\\all", b"\\archive", b"\\drafts", b"\\flagged", b"\\junk", b"\\sent",
                 b"\\trash", b"\\important"}


# ------------------------------------------------------------------ the messages

def _msg(n: int, subject: str, body: str, *, frm: str = "Carol <carol@remote.test>",
         date: str = "", extra: str = "", ctype: str = "") -> bytes:
    date = date or f"Mon, {n + 1} Dec 2025 10:{n:02d}:00 +0100"
    head = (f"From: {frm}\r\nTo: Alice <alice@example.test>\r\nSubject: {subject}\r\n"
            f"Date: {date}\r\nMessage-ID: <diff-{n}@remote.test>\r\nMIME-Version: 1.0\r\n"
            f"{extra}{ctype or 'Content-Type: text/plain; charset=utf-8'}\r\n\r\n")
    return (head + body).encode()


ALT = ("Content-Type: multipart/alternative; boundary=\"b1\"", "--b1\r\n"
       "Content-Type: text/plain; charset=us-ascii\r\n\r\nplain part with walrus\r\n--b1\r\n"
       "Content-Type: text/html; charset=us-ascii\r\n\r\n<p>html part</p>\r\n--b1--\r\n")
MIXED = ("Content-Type: multipart/mixed; boundary=\"m1\"", "--m1\r\n"
         "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
         "see attachment, caf\u00e9\r\n--m1\r\nContent-Type: application/octet-stream; "
         "name=\"data.bin\"\r\nContent-Disposition: attachment; filename=\"data.bin\"\r\n"
         "Content-Transfer-Encoding: base64\r\n\r\nAAECAwQFBgcICQ==\r\n--m1\r\n"
         "Content-Type: message/rfc822\r\n\r\nFrom: inner@remote.test\r\nSubject: inner\r\n"
         "\r\ninner body\r\n--m1--\r\n")

MESSAGES: list[bytes] = [
    _msg(0, "quarterly report", "the numbers are attached in spirit\r\n"),
    _msg(1, "lunch on friday?", "walrus sighting at noon\r\n", frm="dave@remote.test"),
    _msg(2, "=?utf-8?q?caf=C3=A9_menu?=", "croissant and caf\u00e9\r\n",
         frm="=?utf-8?q?Ren=C3=A9e?= <renee@remote.test>"),
    _msg(3, "alternatives", ALT[1], ctype=ALT[0]),
    _msg(4, "with attachment", MIXED[1], ctype=MIXED[0],
         extra="Cc: bob@example.test, \"Eve, E.\" <eve@remote.test>\r\n"),
    _msg(5, "old news", "from long ago\r\n", date="Tue, 3 Jan 2017 08:00:00 +0000"),
    _msg(6, "big one", "x" * 70 + "\r\n" + ("lorem ipsum dolor sit amet " * 3 + "\r\n") * 60),
    _msg(7, "Re: quarterly report", "reply text, no walrus\r\n",
         extra="In-Reply-To: <diff-0@remote.test>\r\nReply-To: reports@remote.test\r\n"),
]
IDLE_MESSAGE = _msg(20, "arrives while idle", "pushed to the idler\r\n")
APPEND_MESSAGE = _msg(30, "appended draft", "written by the client\r\n",
                      frm="alice@example.test")


# ------------------------------------------------------------------ targets and sessions

@dataclass
class Target:
    """One server under test. ``box``: the mailbox holding MESSAGES (UIDs 1..n, none
    flagged); ``prefix``: a name no mailbox has yet, for the folders the script creates;
    ``deliver``: puts one message into ``box`` the way mail arrives (MX, or the file)."""

    name: str
    port: int
    user: str
    password: str
    box: str
    prefix: str
    deliver: Callable[[bytes], None]
    tls: str = "none"  # "none" | "starttls" | "implicit"
    cafile: str | None = None
    host: str = "127.0.0.1"


@dataclass
class Reply:
    status: str
    code: str | None
    untagged: list[bytes] = field(default_factory=list)
    command: str = ""  # its name (SELECT, UID SEARCH, ...)


def client_context(cafile: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def connect(t: Target) -> imaplib.IMAP4:
    """An imaplib connection, TLS as the target says, logged in."""
    if t.tls == "implicit":
        imap: imaplib.IMAP4 = imaplib.IMAP4_SSL(t.host, t.port, timeout=TIMEOUT,
                                                ssl_context=client_context(t.cafile))
    else:
        imap = imaplib.IMAP4(t.host, t.port, timeout=TIMEOUT)
        if t.tls == "starttls":
            imap.starttls(client_context(t.cafile))
    imap.login(t.user, t.password)
    return imap


_LITERAL_END = re.compile(rb"\{(\d+)\+?\}\r\n$")
_TAGGED = re.compile(rb"^(\S+) (OK|NO|BAD)(?: \[([^\]]*)\])?")


class Session:
    """Raw commands over a logged-in imaplib connection, replies kept in order."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.imap = connect(target)

    def _response(self) -> bytes:
        """One response line with its literals inline."""
        line = self.imap.readline()
        if not line:
            raise ConnectionError("the server closed the connection")
        out = line
        while m := _LITERAL_END.search(line):
            out += self.imap.read(int(m.group(1)))
            line = self.imap.readline()
            out += line
        return out

    def _until_tagged(self, tag: bytes, got: list[bytes]) -> Reply:
        while True:
            line = self._response()
            if line.startswith(tag + b" "):
                m = _TAGGED.match(line)
                if not m:
                    raise ValueError(f"bad tagged reply {line!r}")
                code = m.group(3).decode() if m.group(3) is not None else None
                return Reply(m.group(2).decode(), code, got)
            if line.startswith(b"+"):
                raise ValueError(f"unexpected continuation {line!r}")
            got.append(line)

    def cmd(self, *parts: bytes | str) -> Reply:
        """One command: ``str`` parts are text, ``bytes`` parts are synchronising literals."""
        reply = self._cmd(*parts)
        words = str(parts[0]).split()
        reply.command = " ".join(words[:2] if words[0].upper() == "UID" else words[:1]).upper()
        return reply

    def _cmd(self, *parts: bytes | str) -> Reply:
        tag = self.imap._new_tag()
        got: list[bytes] = []
        pending = tag + b" "
        for part in parts:
            if isinstance(part, str):
                pending += part.encode()
                continue
            self.imap.send(pending + b"{%d}\r\n" % len(part))
            pending = b""
            while not (line := self._response()).startswith(b"+"):
                if line.startswith(tag + b" "):  # refused before the literal
                    m = _TAGGED.match(line)
                    if not m:
                        raise ValueError(f"bad tagged reply {line!r}")
                    return Reply(m.group(2).decode(), m.group(3) and m.group(3).decode(), got)
                got.append(line)
            self.imap.send(part)
        self.imap.send(pending + b"\r\n")
        return self._until_tagged(tag, got)

    def idle(self, during: Callable[[], None], wait: float = IDLE_WAIT) -> tuple[list[bytes],
                                                                                  float]:
        """IDLE, run ``during``, read until an EXISTS arrives (or ``wait`` passes), DONE.
        Returns the untagged responses and the seconds from ``during`` to the EXISTS."""
        tag = self.imap._new_tag()
        self.imap.send(tag + b" IDLE\r\n")
        got: list[bytes] = []
        while not (first := self._response()).startswith(b"+"):
            if first.startswith(tag + b" "):
                raise ValueError(f"IDLE refused: {first!r}")
            got.append(first)  # untagged responses may come before the continuation
        t0 = time.monotonic()
        during()
        took = -1.0
        sock = self.imap.sock
        deadline = t0 + wait
        while time.monotonic() < deadline:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                line = self._response()
            except TimeoutError:
                # a socket file that timed out cannot be read again: a new session
                self.imap.shutdown()
                self.imap = connect(self.target)
                return got, took
            got.append(line)
            if line.rstrip().endswith(b" EXISTS"):
                took = time.monotonic() - t0
                break
        sock.settimeout(TIMEOUT)
        self.imap.send(b"DONE\r\n")
        reply = self._until_tagged(tag, got)
        return [b"IDLE " + reply.status.encode(), *reply.untagged], took

    def close(self) -> None:
        try:
            self.imap.logout()
        except (OSError, imaplib.IMAP4.error):
            self.imap.shutdown()


# ------------------------------------------------------------------ parsing

_ATOM_STOP = b" ()[]{\"\r\n"


def parse(data: bytes) -> list[Any]:
    """IMAP values of one response: atoms and quoted strings as bytes, literals as bytes,
    parenthesised lists as lists, NIL as None. An atom keeps its ``[section]<partial>``."""
    stack: list[list[Any]] = [[]]
    i, n = 0, len(data)
    while i < n:
        c = data[i:i + 1]
        if c in (b" ", b"\r", b"\n"):
            i += 1
        elif c == b"(":
            stack.append([])
            i += 1
        elif c == b")":
            done = stack.pop()
            stack[-1].append(done)
            i += 1
        elif c == b'"':
            j, buf = i + 1, bytearray()
            while data[j:j + 1] != b'"':
                if data[j:j + 1] == b"\\":
                    j += 1
                buf += data[j:j + 1]
                j += 1
            stack[-1].append(bytes(buf))
            i = j + 1
        elif c == b"{":
            j = data.index(b"}", i)
            size = int(data[i + 1:j].rstrip(b"+"))
            start = data.index(b"\n", j) + 1
            stack[-1].append(data[start:start + size])
            i = start + size
        else:
            j = i
            while j < n and data[j:j + 1] not in _ATOM_STOP:
                j += 1
            if data[j:j + 1] == b"[":  # BODY[...], [code ...]: to the matching bracket
                depth = 0
                while j < n:
                    ch = data[j:j + 1]
                    depth += ch == b"["
                    depth -= ch == b"]"
                    j += 1
                    if depth == 0:
                        break
                while j < n and data[j:j + 1] not in b" ()\r\n":
                    j += 1
            atom = data[i:j]
            stack[-1].append(None if atom.upper() == b"NIL" else atom)
            i = j
    while len(stack) > 1:  # tolerate an unbalanced tail rather than lose the response
        done = stack.pop()
        stack[-1].append(done)
    return stack[0]


# ------------------------------------------------------------------ normalisation

_UNORDERED = ("LIST", "LSUB")
_SKIP_CODES = {"CLOSED", "HIGHESTMODSEQ", "NOMODSEQ", "CLIENTBUG"}
# RFC 5530 codes a server may add to a refusal or not (the refusal itself is compared);
# TRYCREATE is required (RFC 9051 §6.3.12) and stays.
_OPTIONAL_CODES = {"CANNOT", "ALREADYEXISTS", "NONEXISTENT", "SERVERBUG", "LIMIT", "INUSE",
                   "UNAVAILABLE", "CONTACTADMIN", "NOPERM"}


class Norm:
    """Per-target name mapping (box and prefix become placeholders)."""

    def __init__(self, t: Target) -> None:
        self.t = t

    def name(self, raw: bytes | str) -> str:
        s = raw.decode() if isinstance(raw, bytes) else raw
        if s.startswith(self.t.prefix):
            return "{P}" + s[len(self.t.prefix):]
        if s == self.t.box or (self.t.box.upper() == "INBOX" and s.upper() == "INBOX"):
            return "{BOX}"
        return s

    def code(self, code: str | None) -> str | None:
        if code is None:
            return None
        words = code.split()
        key = words[0].upper()
        if key in _SKIP_CODES:
            return None
        if key in ("UIDVALIDITY",):
            return key
        if key in ("APPENDUID", "COPYUID"):
            return " ".join([key, "*", *words[2:]])
        if key == "PERMANENTFLAGS":
            inner = code[len(words[0]):].strip()
            return key + " " + " ".join(f for f in sorted(_flags(parse(inner.encode())[0]))
                                        if f.startswith("\\"))
        return code

    def flags(self, value: list[Any]) -> list[str]:
        return _flags(value)

    def untagged(self, line: bytes) -> Any:
        """One untagged response, normalised; None to drop it."""
        body = line[2:] if line.startswith(b"* ") else line
        words = body.split(b" ", 2)
        head = words[0].upper()
        if head in (b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH"):
            m = re.match(rb"\w+ \[([^\]]*)\]", body)
            code = self.code(m.group(1).decode()) if m else None
            return None if code is None else f"{head.decode()} [{code}]"
        if head.isdigit() and len(words) > 1:
            kind = words[1].upper().rstrip(b"\r\n")
            if kind == b"RECENT":
                return None
            if kind == b"FETCH":
                return ("FETCH", int(head), self.fetch(parse(words[2])[0]))
            return f"{kind.decode()} {int(head)}"
        vals = parse(body)
        kind = vals[0].upper() if isinstance(vals[0], bytes) else b""
        if kind == b"FLAGS":  # the keywords listed are the server's choice: left out
            return ("FLAGS", [f for f in self.flags(vals[1]) if f.startswith("\\")])
        if kind in (b"SEARCH", b"SORT"):
            return ("SEARCH", sorted(int(v) for v in vals[1:] if v.isdigit()))
        if kind == b"ESEARCH":
            rest = vals[1:]
            if rest and isinstance(rest[0], list):  # (TAG "x"): the correlator
                rest = rest[1:]
            uid = bool(rest) and rest[0].upper() == b"UID"
            rest = rest[1:] if uid else rest
            return ("ESEARCH", uid, {rest[k].decode().upper(): rest[k + 1].decode()
                                     for k in range(0, len(rest) - 1, 2)})
        if kind in (b"LIST", b"LSUB"):
            attrs = sorted(a.decode().lower() for a in vals[1]
                           if a.lower() not in SPECIAL_ATTRS)
            return (kind.decode(), attrs, vals[2], self.name(vals[3]))
        if kind == b"STATUS":
            items = vals[2]
            pairs = {items[k].decode().upper(): int(items[k + 1])
                     for k in range(0, len(items), 2)}
            pairs.pop("RECENT", None)
            pairs.pop("UIDVALIDITY", None)
            pairs.pop("HIGHESTMODSEQ", None)
            return ("STATUS", self.name(vals[1]), pairs)
        if kind == b"ENABLED":
            return ("ENABLED", sorted(v.decode().upper() for v in vals[1:]))
        if kind == b"VANISHED":
            return ("VANISHED", [v.decode() if isinstance(v, bytes) else v for v in vals[1:]])
        if kind in (b"CAPABILITY", b"ID", b"NAMESPACE"):
            return None  # server-specific
        return body.decode(errors="replace").strip()

    def fetch(self, items: list[Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in range(0, len(items) - 1, 2):
            key = items[k].decode().upper()
            value = items[k + 1]
            if key in ("INTERNALDATE", "MODSEQ"):
                continue
            if key == "FLAGS":
                value = self.flags(value)
            elif key in ("BODYSTRUCTURE", "BODY") and isinstance(value, list):
                value = _lower(value)
            elif key in ("UID", "RFC822.SIZE"):
                value = int(value)
            out[key] = value
        return out

    def reply(self, r: Reply) -> dict[str, Any]:
        code = self.code(r.code)
        if r.status != "OK" and code and code.split()[0].upper() in _OPTIONAL_CODES:
            code = None
        got = [u for u in map(self.untagged, r.untagged) if u is not None]
        if r.command not in ("SELECT", "EXAMINE"):  # a new keyword announced, or not
            got = [u for u in got if not (u[0] == "FLAGS" or str(u).startswith(
                "OK [PERMANENTFLAGS"))]
        # LIST, LSUB and STATUS responses come in no order the RFCs fix
        lists = sorted((u for u in got if isinstance(u, tuple) and u[0] in _UNORDERED), key=repr)
        return {"status": r.status, "code": code,
                "untagged": [u for u in got if u not in lists] + lists}


def _flags(value: list[Any]) -> list[str]:
    out = set()
    for f in value:
        s = f.decode()
        if s.lower() == "\\recent":
            continue
        out.add("\\" + s[1:].capitalize() if s.startswith("\\") else s)
    return sorted(out)


def _lower(value: Any) -> Any:
    if isinstance(value, list):
        return [_lower(v) for v in value]
    if isinstance(value, bytes):
        return value.lower()
    return value


# ------------------------------------------------------------------ the script

Step = Callable[[Session, Target], dict[str, Reply]]


def _quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def s_select(s: Session, t: Target) -> dict[str, Reply]:
    return {"examine": s.cmd(f"EXAMINE {_quote(t.box)}"),
            "select": s.cmd(f"SELECT {_quote(t.box)}"),
            "noop": s.cmd("NOOP")}


FETCH_ITEMS = ("(UID FLAGS RFC822.SIZE ENVELOPE BODYSTRUCTURE "
               "BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE MESSAGE-ID)] BODY.PEEK[1])")


def s_fetch(s: Session, t: Target) -> dict[str, Reply]:
    s.cmd(f"SELECT {_quote(t.box)}")
    return {"uid-fetch-all": s.cmd(f"UID FETCH 1:* {FETCH_ITEMS}"),
            "seq-fetch": s.cmd("FETCH 2:4 (UID FLAGS BODY.PEEK[HEADER] RFC822.SIZE)"),
            "sections": s.cmd("UID FETCH 4:5 (BODY.PEEK[TEXT] BODY.PEEK[1.MIME] "
                              "BODY.PEEK[2] BODY.PEEK[1]<0.10>)"),
            "nested": s.cmd("UID FETCH 5 (BODY.PEEK[3.HEADER] BODY.PEEK[3.TEXT] "
                            "BODY.PEEK[HEADER.FIELDS.NOT (TO CC DATE)])"),
            "implicit-seen": s.cmd("UID FETCH 2 (BODY[1])"),
            "after-seen": s.cmd("UID FETCH 1:* (FLAGS)"),
            "rfc822": s.cmd("UID FETCH 6 (RFC822.HEADER RFC822.TEXT)")}


SEARCHES = [
    "ALL", "SUBJECT quarterly", "HEADER Subject report", "FROM dave", "TO alice",
    "CC eve", "BODY walrus", "TEXT walrus", "NOT BODY walrus", "SEEN", "UNSEEN",
    "FLAGGED", "OR FROM dave SUBJECT alternatives", "SENTBEFORE 1-Jan-2020",
    "SENTSINCE 3-Dec-2025", "SENTON 2-Dec-2025", "SINCE 1-Jan-2000", "BEFORE 1-Jan-2000",
    "LARGER 2000", "SMALLER 500", "UID 2:4", "2:3", "HEADER Message-ID <diff-4@remote.test>",
    "HEADER In-Reply-To diff-0", "KEYWORD $Label1", "UNKEYWORD $Label1", "DELETED",
    "ANSWERED", "NEW", "SUBJECT \"Re:\"", "BODY croissant", "NOT (SEEN FLAGGED)",
]


def s_search(s: Session, t: Target) -> dict[str, Reply]:
    s.cmd(f"SELECT {_quote(t.box)}")
    out = {f"uid-search {q}": s.cmd(f"UID SEARCH {q}") for q in SEARCHES}
    out["utf8-subject"] = s.cmd("UID SEARCH CHARSET UTF-8 SUBJECT ", "café".encode())
    out["utf8-body"] = s.cmd("UID SEARCH CHARSET UTF-8 BODY ", "café".encode())
    out["seq-search"] = s.cmd("SEARCH BODY walrus")
    out["esearch"] = s.cmd("UID SEARCH RETURN (MIN MAX COUNT ALL) SUBJECT report")
    return out


def s_store(s: Session, t: Target) -> dict[str, Reply]:
    s.cmd(f"SELECT {_quote(t.box)}")
    return {"add-flagged": s.cmd("UID STORE 1,3 +FLAGS (\\Flagged)"),
            "add-keyword": s.cmd("UID STORE 3:4 +FLAGS ($Label1)"),
            "remove": s.cmd("UID STORE 3 -FLAGS (\\Flagged)"),
            "replace": s.cmd("STORE 5 FLAGS (\\Answered \\Seen)"),
            "silent": s.cmd("UID STORE 6 +FLAGS.SILENT (\\Draft)"),
            "after": s.cmd("UID FETCH 1:* (FLAGS)"),
            "searches": s.cmd("UID SEARCH FLAGGED"),
            "kw-search": s.cmd("UID SEARCH KEYWORD $Label1"),
            "answered": s.cmd("UID SEARCH ANSWERED SEEN")}


def s_folders(s: Session, t: Target) -> dict[str, Reply]:
    p = t.prefix
    out = {"create": s.cmd(f"CREATE {_quote(p)}"),
           "create-sub": s.cmd(f"CREATE {_quote(p + '.Sub')}"),
           "create-again": s.cmd(f"CREATE {_quote(p)}"),
           "subscribe": s.cmd(f"SUBSCRIBE {_quote(p)}")}
    s.cmd(f"SELECT {_quote(t.box)}")
    out["copy"] = s.cmd(f"UID COPY 1:2 {_quote(p)}")
    out["move"] = s.cmd(f"UID MOVE 3 {_quote(p + '.Sub')}")
    out["copy-missing"] = s.cmd(f"UID COPY 1 {_quote(p + '-none')}")
    out["after-move"] = s.cmd("UID FETCH 1:* (FLAGS)")
    out["status-box"] = s.cmd(f"STATUS {_quote(t.box)} (MESSAGES UIDNEXT UNSEEN SIZE)")
    out["status-p"] = s.cmd(f"STATUS {_quote(p)} (MESSAGES UIDNEXT UNSEEN SIZE)")
    out["status-sub"] = s.cmd(f"STATUS {_quote(p + '.Sub')} (MESSAGES UIDNEXT UNSEEN)")
    out["select-p"] = s.cmd(f"SELECT {_quote(p)}")
    out["fetch-p"] = s.cmd("UID FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE)")
    out["select-sub"] = s.cmd(f"SELECT {_quote(p + '.Sub')}")
    out["fetch-sub"] = s.cmd("UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    out["list"] = s.cmd('LIST "" "*" RETURN (SPECIAL-USE CHILDREN)')
    out["list-pattern"] = s.cmd(f'LIST "" {_quote(p + "%")}')
    out["lsub"] = s.cmd(f'LSUB "" {_quote(p + "*")}')
    out["rename"] = s.cmd(f"RENAME {_quote(p + '.Sub')} {_quote(p + '.Moved')}")
    out["list-renamed"] = s.cmd(f'LIST "" {_quote(p + "*")}')
    out["status-renamed"] = s.cmd(f"STATUS {_quote(p + '.Moved')} (MESSAGES UIDNEXT)")
    return out


def s_append(s: Session, t: Target) -> dict[str, Reply]:
    p = t.prefix
    out = {"append": s.cmd(f"APPEND {_quote(p)} (\\Seen $Label2) "
                           "\"05-Dec-2025 09:30:00 +0000\" ", APPEND_MESSAGE),
           "append-box": s.cmd(f"APPEND {_quote(t.box)} ", APPEND_MESSAGE),
           "append-missing": s.cmd(f"APPEND {_quote(p + '-none')} ", APPEND_MESSAGE)}
    s.cmd(f"SELECT {_quote(p)}")
    out["fetch"] = s.cmd("UID FETCH 3 (FLAGS RFC822.SIZE ENVELOPE BODY.PEEK[])")
    return out


def s_expunge(s: Session, t: Target) -> dict[str, Reply]:
    s.cmd(f"SELECT {_quote(t.box)}")
    return {"mark": s.cmd("UID STORE 2,4 +FLAGS.SILENT (\\Deleted)"),
            "expunge": s.cmd("EXPUNGE"),
            "mark-more": s.cmd("UID STORE 5:6 +FLAGS.SILENT (\\Deleted)"),
            "uid-expunge": s.cmd("UID EXPUNGE 6"),
            "left": s.cmd("UID SEARCH ALL"),
            "deleted": s.cmd("UID SEARCH DELETED"),
            "close": s.cmd("CLOSE"),
            "status": s.cmd(f"STATUS {_quote(t.box)} (MESSAGES UIDNEXT UNSEEN)"),
            "reselect": s.cmd(f"SELECT {_quote(t.box)}"),
            "seqs": s.cmd("FETCH 1:* (UID FLAGS)")}


def s_idle(s: Session, t: Target) -> dict[str, Reply]:
    s.cmd(f"SELECT {_quote(t.box)}")
    got, took = s.idle(lambda: t.deliver(IDLE_MESSAGE))
    s.idle_seconds = took  # type: ignore[attr-defined]
    exists = [g for g in got if g.rstrip().endswith(b" EXISTS")]
    idle = Reply("OK" if exists else "NO", None, exists[:1])
    s.cmd(f"SELECT {_quote(t.box)}")  # again: a session whose IDLE timed out is a new one
    return {"idle": idle,
            "fetch-new": s.cmd("UID FETCH 9:* (UID FLAGS RFC822.SIZE ENVELOPE)"),
            "search-new": s.cmd("UID SEARCH SUBJECT idle")}


def s_delete(s: Session, t: Target) -> dict[str, Reply]:
    p = t.prefix
    return {"unsubscribe": s.cmd(f"UNSUBSCRIBE {_quote(p)}"),
            "delete-parent-with-child": s.cmd(f"DELETE {_quote(p + '.Moved')}"),
            "delete": s.cmd(f"DELETE {_quote(p)}"),
            "list": s.cmd(f'LIST "" {_quote(p + "*")}'),
            "delete-missing": s.cmd(f"DELETE {_quote(p + '-none')}"),
            "delete-inbox": s.cmd("DELETE INBOX")}


SCRIPT: list[tuple[str, Step]] = [
    ("select", s_select), ("fetch", s_fetch), ("search", s_search), ("store", s_store),
    ("folders", s_folders), ("append", s_append), ("expunge", s_expunge),
    ("idle", s_idle), ("delete", s_delete),
]


def run(t: Target) -> dict[str, Any]:
    """Every session of SCRIPT against ``t`` (each a fresh connection), normalised."""
    norm = Norm(t)
    out: dict[str, Any] = {}
    for name, step in SCRIPT:
        s = Session(t)
        try:
            replies = step(s, t)
            for key, reply in replies.items():
                out[f"{name}/{key}"] = norm.reply(reply)
            if hasattr(s, "idle_seconds"):
                out["~idle_seconds"] = s.idle_seconds
        finally:
            s.close()
    out["~special_use"] = special_use(t)
    out["~uidvalidity"] = uidvalidity(t)
    if "folders/list" in out:
        keep = {"{BOX}", *SPECIAL} | {n for n in _names(out["folders/list"])
                                      if n.startswith("{P}")}
        out["folders/list"]["untagged"] = [u for u in out["folders/list"]["untagged"]
                                           if u[0] != "LIST" or u[3] in keep]
    return out


def _names(reply: dict[str, Any]) -> list[str]:
    return [u[3] for u in reply["untagged"] if isinstance(u, tuple) and u[0] == "LIST"]


def special_use(t: Target) -> dict[str, list[str]]:
    """Mailbox name -> its special-use attributes (apart: not compared)."""
    s = Session(t)
    try:
        r = s.cmd('LIST "" "*" RETURN (SPECIAL-USE)')
    finally:
        s.close()
    out = {}
    for line in r.untagged:
        vals = parse(line[2:])
        if vals and vals[0].upper() == b"LIST":
            attrs = sorted(a.decode() for a in vals[1] if a.lower() in SPECIAL_ATTRS)
            if attrs:
                out[vals[3].decode()] = attrs
    return out


def uidvalidity(t: Target) -> int:
    """The box's raw UIDVALIDITY (normalised away above; kept to show it was there)."""
    s = Session(t)
    try:
        r = s.cmd(f"EXAMINE {_quote(t.box)}")
    finally:
        s.close()
    for line in r.untagged:
        if m := re.search(rb"\[UIDVALIDITY (\d+)\]", line):
            return int(m.group(1))
    raise AssertionError(f"no UIDVALIDITY from {t.name}: {r}")


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys whose normalised results differ (``~`` keys are informational)."""
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.startswith("~"):
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}:\n  {a.get(key)!r}\n  {b.get(key)!r}")
    return diffs


# ------------------------------------------------------------------ the reference Dovecot

DOVECOT_ROOT = Path("/var/mail/vhosts/example.test")
VMAIL = (5000, 5000)
_RUNS = iter(range(1, 1_000_000))


def maildir_put(folder: Path, data: bytes, n: int, owner: tuple[int, int] | None,
                letters: str | None = None) -> Path:
    """One message into ``folder``/new as a delivery does it (tmp, then rename), or into
    cur/ with flag ``letters``; names sort by ``n``, which is the order both servers number
    new messages in."""
    name = f"{1765000000 + n}.M{n:06d}P{os.getpid()}.mfdiff"
    tmp, new = folder / "tmp" / name, folder / "new" / name
    if letters is not None:
        new = folder / "cur" / f"{name}:2,{letters}"
    tmp.write_bytes(data)
    if owner:
        os.chown(tmp, *owner)
    os.rename(tmp, new)
    return new


@contextlib.contextmanager
def dovecot_target(port: int, messages: list[bytes], user: str = "alice",
                   password: str = "alicepw",
                   idle_message: bytes | None = None,
                   letters: dict[int, str] | None = None) -> Iterator[Target]:
    """A fresh folder of ``user``'s at the reference Dovecot holding ``messages`` (the
    INBOX is shared with other tests and benchmarks), and the five special folders the way
    mailfort creates them for every user; the folder and everything the script created
    are removed afterwards. ``idle_message``: the bytes to deliver instead of what the
    script asks for (the copy another server stored); ``letters``: message index -> Maildir
    flag letters it starts with."""
    run_id = f"mfd-{os.getpid()}-{next(_RUNS)}"
    base = DOVECOT_ROOT / user
    box = base / f".{run_id}"
    for d in [base, *(base / f".{name}" for name in SPECIAL), box]:
        for sub in ("", "cur", "new", "tmp"):
            if not (d / sub).exists():
                (d / sub).mkdir(parents=True)
                os.chown(d / sub, *VMAIL)
    for n, data in enumerate(messages):
        maildir_put(box, data, n, VMAIL, (letters or {}).get(n))
    counter = iter(range(len(messages), len(messages) + 1000))

    def deliver(data: bytes) -> None:
        maildir_put(box, idle_message if idle_message is not None else data, next(counter),
                    VMAIL)

    try:
        yield Target("dovecot", port, f"{user}@example.test", password, run_id,
                     run_id + "-x", deliver)
    finally:
        for d in base.glob(f".{run_id}*"):
            shutil.rmtree(d, ignore_errors=True)
