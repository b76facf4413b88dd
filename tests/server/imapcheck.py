"""A small multi-session IMAP consistency checker, in the manner of Dovecot's imaptest.

Each ``Checked`` session is a raw socket with its own strict parser of the server's
responses and its own model of the selected mailbox (sequence number -> UID, flags per UID,
EXISTS). Every untagged response is applied to the model as a client must apply it, and
what the protocol forbids is recorded in ``violations`` (the tests assert it stays empty):

* an EXPUNGE while the command in progress is FETCH, STORE or SEARCH by sequence number
  (RFC 9051 §7.5.1), or one that names a number beyond the session's EXISTS;
* a FETCH for a sequence number beyond EXISTS, or whose UID contradicts the one the
  session already holds for that number;
* EXISTS that shrinks (only EXPUNGE/VANISHED remove messages);
* VANISHED of UIDs not in the view outside ``(EARLIER)``;
* MODSEQ of a message going down; a UID that reappears after it was expunged;
* the untagged FETCH of a non-silent STORE that does not show the change just asked for
  (``+FLAGS x`` answered without ``x``: a stale flag list).

Shared by tests/server/test_imap_consistency.py and bench/imap_soak.py.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from dataclasses import dataclass, field

_NUMBERED = re.compile(rb"\* (\d+) (EXISTS|EXPUNGE|FETCH|RECENT)\b", re.I)
_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")
_BY_SEQUENCE = {"FETCH", "STORE", "SEARCH"}  # RFC 9051 §7.5.1: no EXPUNGE while these run


class ImapError(Exception):
    pass


@dataclass
class Reply:
    status: str  # OK NO BAD
    text: str
    untagged: list[bytes] = field(default_factory=list)


class Lit(bytes):
    """A string (quoted or literal) in a parsed response, as opposed to an atom."""


def parse_list(data: bytes, pos: int = 0) -> tuple[list[object], int]:
    """The items of a parenthesized list starting after ``(`` at ``pos``: atoms (str),
    strings (Lit), nested lists; literals are inline as ``{n}\\r\\n`` + octets."""
    out: list[object] = []
    n = len(data)
    while pos < n:
        c = data[pos:pos + 1]
        if c == b" ":
            pos += 1
        elif c == b")":
            return out, pos + 1
        elif c == b"(":
            inner, pos = parse_list(data, pos + 1)
            out.append(inner)
        elif c == b'"':
            end = pos + 1
            buf = bytearray()
            while data[end:end + 1] != b'"':
                if data[end:end + 1] == b"\\":
                    end += 1
                buf += data[end:end + 1]
                end += 1
                if end >= n:
                    raise ImapError(f"unterminated string: {data!r}")
            out.append(Lit(bytes(buf)))
            pos = end + 1
        elif c == b"{":
            m = re.compile(rb"\{(\d+)\}\r\n").match(data, pos)
            if m is None:
                raise ImapError(f"bad literal at {pos}: {data!r}")
            size = int(m.group(1))
            out.append(Lit(data[m.end():m.end() + size]))
            pos = m.end() + size
        else:
            end = pos
            depth = 0
            while end < n:
                ch = data[end:end + 1]
                if ch == b"[":
                    depth += 1
                elif ch == b"]":
                    depth -= 1
                elif depth == 0 and ch in b" ()":
                    break
                end += 1
            out.append(data[pos:end].decode("latin-1"))
            pos = end
    raise ImapError(f"unterminated list: {data!r}")


def uid_set(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition(":")
        lo, hi = int(a), int(b or a)
        out.extend(range(min(lo, hi), max(lo, hi) + 1))
    return out


class Checked:
    """One IMAP session with its model of the selected mailbox. One command at a time,
    except that ``idle_wait`` reads while IDLE is in progress."""

    def __init__(self, host: str, port: int, name: str, *, source: str | None = None,
                 timeout: float = 30.0) -> None:
        self.name = name
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buf = b""
        self.tag = 0
        self.violations: list[str] = []
        self.uids: list[int | None] = []  # sequence number - 1 -> UID (None: not yet known)
        self.flags: dict[int, frozenset[str]] = {}
        self.modseq: dict[int, int] = {}
        self.gone: set[int] = set()  # UIDs this session was told are expunged
        self.uidvalidity = 0
        self.current = ""  # the command in progress, e.g. "FETCH" or "UID FETCH"
        self.expunges = 0
        self.unanswered: set[int] = set()  # UIDs a FETCH by sequence number skipped
        self.sizes: dict[int, int] = {}  # RFC822.SIZE per UID: never changes
        self.registry: UidRegistry | None = None  # where BODY[] Message-IDs are noted
        self.registry_key = "INBOX"
        greeting = self._response()
        if not greeting.startswith(b"* OK"):
            raise ImapError(f"{name}: greeting {greeting!r}")

    # -- the wire ---------------------------------------------------------------------

    def _line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line, self.buf = self.buf[:i + 2], self.buf[i + 2:]
                return line
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ImapError(f"{self.name}: connection closed")
            self.buf += chunk

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ImapError(f"{self.name}: connection closed in a literal")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _response(self) -> bytes:
        """One whole response, literals inline, without the final CRLF."""
        parts = []
        while True:
            line = self._line()
            parts.append(line)
            m = _LITERAL.search(line)
            if m is None:
                return b"".join(parts)[:-2]
            parts.append(self._exact(int(m.group(1))))

    def send(self, text: str | bytes) -> str:
        self.tag += 1
        tag = f"{self.name[:1]}{self.tag}"
        raw = text.encode() if isinstance(text, str) else text
        self.sock.sendall(tag.encode() + b" " + raw + b"\r\n")
        return tag

    def command(self, text: str, *, literal: bytes | None = None) -> Reply:
        """Send, apply every untagged response to the model, return the tagged reply."""
        words = text.split()
        self.current = " ".join(words[:2]).upper() if words[0].upper() == "UID" \
            else words[0].upper()
        if literal is not None:
            tag = self.send(f"{text} {{{len(literal)}+}}\r\n".encode() + literal)
        else:
            tag = self.send(text)
        untagged: list[bytes] = []
        try:
            while True:
                resp = self._response()
                if resp.startswith(tag.encode() + b" "):
                    rest = resp[len(tag) + 1:].decode("latin-1")
                    status, _, text_ = rest.partition(" ")
                    return Reply(status, text_, untagged)
                if resp.startswith(b"+"):
                    continue
                untagged.append(resp)
                self.apply(resp)
        finally:
            self.current = ""

    def ok(self, text: str, **kw: bytes) -> Reply:
        r = self.command(text, **kw)
        if r.status != "OK":
            raise ImapError(f"{self.name}: {text!r} -> {r.status} {r.text}")
        return r

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    # -- the model ----------------------------------------------------------------------

    def bad(self, what: str) -> None:
        self.violations.append(f"{self.name} during {self.current or 'no command'}: {what}")

    def apply(self, resp: bytes) -> None:
        m = _NUMBERED.match(resp)
        if m is not None:
            n, kind = int(m.group(1)), m.group(2).upper().decode()
            if kind == "EXISTS":
                if n < len(self.uids):
                    self.bad(f"EXISTS {n} below the {len(self.uids)} known")
                self.uids += [None] * (n - len(self.uids))
            elif kind == "EXPUNGE":
                self.expunges += 1
                if self.current in _BY_SEQUENCE:
                    self.bad(f"EXPUNGE {n} (RFC 9051 7.5.1)")
                if not 1 <= n <= len(self.uids):
                    self.bad(f"EXPUNGE {n} beyond EXISTS {len(self.uids)}")
                    return
                uid = self.uids.pop(n - 1)
                if uid is not None:
                    self.gone.add(uid)
                    self.flags.pop(uid, None)
            elif kind == "FETCH":
                self._fetch(n, resp[m.end():])
            return
        if resp.upper().startswith(b"* VANISHED"):
            rest = resp[len(b"* VANISHED "):].decode()
            earlier = rest.upper().startswith("(EARLIER)")
            if earlier:
                return  # about UIDs that may be long gone: nothing to renumber
            if self.current in _BY_SEQUENCE:
                self.bad("VANISHED (RFC 9051 7.5.1)")
            for uid in uid_set(rest.strip()):
                if uid not in self.uids:
                    self.bad(f"VANISHED {uid} not in the view")
                    continue
                self.uids.remove(uid)
                self.gone.add(uid)
                self.flags.pop(uid, None)
                self.expunges += 1
            return
        if resp.upper().startswith(b"* SEARCH") and self.current == "SEARCH":
            for word in resp.split()[2:]:
                if word.isdigit() and not 1 <= int(word) <= len(self.uids):
                    self.bad(f"SEARCH found {int(word)}, beyond EXISTS {len(self.uids)}")
            return
        vm = re.search(rb"\[UIDVALIDITY (\d+)\]", resp)
        if vm is not None:
            value = int(vm.group(1))
            if self.uidvalidity and value != self.uidvalidity:
                self.bad(f"UIDVALIDITY {self.uidvalidity} -> {value}")
            self.uidvalidity = value

    def _fetch(self, n: int, rest: bytes) -> None:
        if not 1 <= n <= len(self.uids):
            self.bad(f"FETCH {n} beyond EXISTS {len(self.uids)}")
            return
        rest = rest.lstrip()
        if not rest.startswith(b"("):
            raise ImapError(f"{self.name}: bad FETCH {rest!r}")
        items, _ = parse_list(rest, 1)
        data = {str(items[i]).upper(): items[i + 1] for i in range(0, len(items) - 1, 2)}
        uid = self.uids[n - 1]
        if "UID" in data:
            got = int(str(data["UID"]))
            if uid is None:
                if got in self.gone:
                    self.bad(f"UID {got} came back after its EXPUNGE")
                if got in self.uids:
                    self.bad(f"UID {got} at {n} and at {self.uids.index(got) + 1}")
                known = [u for u in self.uids[:n - 1] if u is not None]
                if known and got <= max(known):
                    self.bad(f"UID {got} at {n} not above the UIDs before it")
                self.uids[n - 1] = uid = got
            elif uid != got:
                self.bad(f"FETCH {n} says UID {got}, the view has {uid}")
                return
        if uid is None:
            return  # flags of a message whose UID is not known yet: learnt with it
        if "RFC822.SIZE" in data:
            size = int(str(data["RFC822.SIZE"]))
            if self.sizes.setdefault(uid, size) != size:
                self.bad(f"RFC822.SIZE of UID {uid} {self.sizes[uid]} -> {size}")
        body = next((v for k, v in data.items() if k.startswith("BODY[")), None)
        if self.registry is not None and isinstance(body, bytes):
            found = re.search(rb"(?im)^Message-ID:\s*<([^>]+)>", body)
            if found is not None:  # the octets of the message this UID names, always
                self.registry.note(self.registry_key, uid, found.group(1).decode())
        if "FLAGS" in data:
            flags = data["FLAGS"]
            assert isinstance(flags, list)
            self.flags[uid] = frozenset(str(f) for f in flags) - {"\\Recent"}
        if "MODSEQ" in data:
            ms = data["MODSEQ"]
            value = int(str(ms[0] if isinstance(ms, list) else ms))
            if value < self.modseq.get(uid, 0):
                self.bad(f"MODSEQ of UID {uid} down from {self.modseq[uid]} to {value}")
            self.modseq[uid] = value

    # -- higher level -------------------------------------------------------------------

    def login(self, user: str, password: str) -> Reply:
        return self.command(f'LOGIN "{user}" "{password}"')

    def select(self, mailbox: str = "INBOX") -> Reply:
        self.uids, self.flags, self.modseq, self.gone = [], {}, {}, set()
        self.uidvalidity = 0  # another mailbox: its own UIDVALIDITY
        r = self.ok(f"SELECT {mailbox}")
        self.learn()
        return r

    def learn(self) -> None:
        """Fill in the UIDs and flags of messages known only by EXISTS."""
        missing = [i + 1 for i, u in enumerate(self.uids) if u is None]
        if missing:
            self.ok(f"FETCH {missing[0]}:{missing[-1]} (UID FLAGS)")

    def noop(self) -> Reply:
        r = self.ok("NOOP")
        self.learn()
        return r

    def view(self) -> tuple[list[int | None], dict[int, frozenset[str]]]:
        return list(self.uids), dict(self.flags)

    def store(self, uids: list[int], op: str, flags: str, *, silent: bool = False) -> Reply:
        """``UID STORE`` (``op`` ``+FLAGS`` or ``-FLAGS``), checking that each untagged
        FETCH answers with the change made (the flags asked for are owned by this session:
        no one else can undo them meanwhile). ``silent``: ``.SILENT``, the model takes the
        change itself, as a client does."""
        dot = ".SILENT" if silent else ""
        r = self.command(f"UID STORE {','.join(map(str, uids))} {op}{dot} ({flags})")
        if r.status != "OK":
            return r
        wanted = set(flags.split())
        if silent:
            for uid in uids:
                if uid in self.flags:
                    have = self.flags[uid]
                    self.flags[uid] = have | wanted if op[0] == "+" else have - wanted
        seen: set[int] = set()
        for resp in r.untagged:
            m = _NUMBERED.match(resp)
            if m is None or m.group(2).upper() != b"FETCH":
                continue
            items, _ = parse_list(resp[m.end():].lstrip(), 1)
            data = {str(items[i]).upper(): items[i + 1] for i in range(0, len(items) - 1, 2)}
            if "UID" not in data or "FLAGS" not in data:
                continue
            uid = int(str(data["UID"]))
            if uid not in uids:
                continue
            seen.add(uid)
            have = {str(f) for f in data["FLAGS"]}  # type: ignore[union-attr]
            lower = {f.lower() for f in have}
            if op == "+FLAGS" and not all(w.lower() in lower for w in wanted):
                self.bad(f"STORE {op} ({flags}) on UID {uid} answered {resp!r}")
            if op == "-FLAGS" and any(w.lower() in lower for w in wanted):
                self.bad(f"STORE {op} ({flags}) on UID {uid} answered {resp!r}")
        return r

    def idle_until(self, predicate: str, timeout: float,
                   ready: threading.Event | None = None) -> float | None:
        """IDLE until an untagged response containing ``predicate`` (e.g. "EXISTS") comes:
        the ``time.monotonic()`` it came at, or None after ``timeout``. ``ready`` is set
        once the server has accepted IDLE. DONE is sent either way."""
        self.current = "IDLE"
        tag = self.send("IDLE")
        cont = self._response()
        if not cont.startswith(b"+"):
            raise ImapError(f"{self.name}: IDLE refused: {cont!r}")
        if ready is not None:
            ready.set()
        deadline = time.monotonic() + timeout
        came: float | None = None
        self.sock.settimeout(0.05)
        try:
            while came is None and time.monotonic() < deadline:
                try:
                    resp = self._response()
                except TimeoutError:
                    continue
                self.apply(resp)
                if predicate.encode() in resp:
                    came = time.monotonic()
        finally:
            self.sock.settimeout(30)
        self.sock.sendall(b"DONE\r\n")
        while True:
            resp = self._response()
            if resp.startswith(tag.encode() + b" "):
                break
            self.apply(resp)
        self.current = ""
        return came


class UidRegistry:
    """Every (mailbox, UID) -> Message-ID any session has seen: a UID given to two
    messages, or a new message below a UID seen before, is a reuse."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, int], str] = {}
        self.lock = threading.Lock()
        self.problems: list[str] = []

    def note(self, mailbox: str, uid: int, ident: str) -> None:
        with self.lock:
            old = self.seen.setdefault((mailbox, uid), ident)
            if old != ident:
                self.problems.append(f"{mailbox} UID {uid}: {old} then {ident}")


def message_ids(sess: Checked, mailbox: str, registry: UidRegistry) -> dict[int, str]:
    """UID -> Message-ID of every message in the selected mailbox (noted in registry)."""
    r = sess.ok("UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    out: dict[int, str] = {}
    for resp in r.untagged:
        m = _NUMBERED.match(resp)
        if m is None or m.group(2).upper() != b"FETCH":
            continue
        items, _ = parse_list(resp[m.end():].lstrip(), 1)
        data = {str(items[i]).upper(): items[i + 1] for i in range(0, len(items) - 1, 2)}
        uid = int(str(data["UID"]))
        header = next((v for k, v in data.items() if k.startswith("BODY[")), b"")
        found = re.search(rb"<([^>]+)>", bytes(header))  # type: ignore[arg-type]
        ident = found.group(1).decode() if found else f"?{uid}"
        out[uid] = ident
        registry.note(mailbox, uid, ident)
    return out


class Resync:
    """A QRESYNC client that is away between checkpoints (UNSELECTed): it keeps UID ->
    flags and the HIGHESTMODSEQ it last saw, and at each ``resync`` SELECTs with
    ``QRESYNC (uidvalidity modseq)``. The VANISHED (EARLIER) and FETCH responses must
    bring its copy to the mailbox's state (RFC 7162 §3.2.5): a change recorded without a
    MODSEQ above the old one, or an expunge not remembered, leaves it behind."""

    def __init__(self, sess: Checked) -> None:
        self.sess = sess
        self.cache: dict[int, frozenset[str]] = {}
        self.validity = 0
        self.modseq = 0

    def resync(self, mailbox: str = "INBOX") -> dict[int, frozenset[str]]:
        s = self.sess
        s.uids, s.flags, s.modseq, s.gone, s.uidvalidity = [], {}, {}, set(), 0
        first = not self.validity
        qresync = "" if first else f" (QRESYNC ({self.validity} {self.modseq}))"
        r = s.ok(f"SELECT {mailbox}{qresync}")
        s.learn()
        if first:
            r.untagged += s.ok("UID FETCH 1:* (FLAGS)").untagged
        for resp in r.untagged:
            m = re.search(rb"\[HIGHESTMODSEQ (\d+)\]", resp)
            if m is not None:
                self.modseq = int(m.group(1))
            m = re.search(rb"\[UIDVALIDITY (\d+)\]", resp)
            if m is not None:
                value = int(m.group(1))
                if self.validity and value != self.validity:
                    s.bad(f"UIDVALIDITY {self.validity} -> {value}")
                    self.cache.clear()
                self.validity = value
            if resp.upper().startswith(b"* VANISHED (EARLIER) "):
                for uid in uid_set(resp[len(b"* VANISHED (EARLIER) "):].decode().strip()):
                    self.cache.pop(uid, None)
                continue
            m = _NUMBERED.match(resp)
            if m is None or m.group(2).upper() != b"FETCH":
                continue
            items, _ = parse_list(resp[m.end():].lstrip(), 1)
            data = {str(items[i]).upper(): items[i + 1] for i in range(0, len(items) - 1, 2)}
            if "UID" in data and "FLAGS" in data:
                flags = data["FLAGS"]
                assert isinstance(flags, list)
                self.cache[int(str(data["UID"]))] = frozenset(str(f) for f in flags) - {
                    "\\Recent"}
        s.ok("UNSELECT")
        return dict(self.cache)
