"""Real IMAP clients (Debian's isync, offlineimap3, neomutt, interimap) driven against one
IMAP server, each in a directory of its own, with a timeout, from argv lists (never a shell
line with user data in it), returning what the client ended up with, parsed.

The same declarative ``Changes`` (flag, delete, move, by Message-ID) is made by each client
in its own way: in its local Maildir and then synced (mbsync, offlineimap), in its local
Dovecot and then synced with QRESYNC (interimap), or by keystrokes in its index (neomutt),
so that a test can check the same outcome on the server afterwards for every client.

``TLSFront`` puts TLS (implicit, or STARTTLS offered and then done) in front of a plaintext
IMAP server, so that each client's TLS settings are proven against the reference Dovecot,
which is configured with ``ssl = no``.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import os
import pty
import pwd
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

TIMEOUT = 30.0  # per client run
LETTERS = {"\\Seen": "S", "\\Flagged": "F", "\\Answered": "R", "\\Draft": "D", "\\Deleted": "T"}
DOVECOT_IMAP = "/usr/lib/dovecot/imap"


@dataclass(frozen=True)
class Account:
    """Where and how a client connects. ``host`` is the name the client uses (and checks
    the certificate against when ``tls`` is not "none")."""

    port: int
    user: str
    password: str
    tls: str = "none"  # "none" | "starttls" | "implicit"
    cafile: str | None = None
    host: str = "127.0.0.1"


@dataclass
class Changes:
    """What a client changes, by Message-ID (without the angle brackets): flags to add
    (IMAP names), messages to delete, messages to move (to a folder name)."""

    flag: dict[str, set[str]] = field(default_factory=dict)
    delete: list[str] = field(default_factory=list)
    move: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Local:
    """A message as the client has it locally."""

    message_id: str
    subject: str
    flags: frozenset[str]
    size: int


@dataclass
class Result:
    """``pulled``: folder -> messages after the first run; ``after``: after the changes
    were pushed back (empty when nothing was changed); ``log``: the client's output."""

    pulled: dict[str, list[Local]]
    after: dict[str, list[Local]]
    log: str


class ClientError(AssertionError):
    """The client failed, timed out, or did not do what it was told (its log included)."""


def run(argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float = TIMEOUT,
        input_: bytes | None = None) -> str:
    """One client run; its output; ClientError when it fails or overstays."""
    try:
        proc = subprocess.run(argv, cwd=cwd, env=env, input=input_, capture_output=True,
                              timeout=timeout, stdin=None if input_ is not None
                              else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise ClientError(f"{argv[0]} did not finish in {timeout} s:\n"
                          f"{_text(exc.stdout)}{_text(exc.stderr)}") from None
    log = _text(proc.stdout) + _text(proc.stderr)
    if proc.returncode != 0:
        raise ClientError(f"{argv[0]} exited {proc.returncode}:\n{log}")
    return log


def _text(b: bytes | str | None) -> str:
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


def client_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment: the client reads no configuration of the machine's user."""
    return {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8", "USER": "tester", "LOGNAME": "tester", **extra}


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A fresh directory under /tmp that an unprivileged account may traverse (interimap's
    local Dovecot runs as nobody), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o711)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ local Maildirs

_HEADERS = email.parser.BytesHeaderParser(policy=email.policy.compat32)


def read_message(data: bytes, flags: set[str]) -> Local:
    head = _HEADERS.parsebytes(data)
    mid = (head.get("Message-ID") or "").strip().strip("<>")
    return Local(mid, str(head.get("Subject") or ""), frozenset(flags), len(data))


def maildir_flags(name: str) -> set[str]:
    _, sep, letters = name.rpartition(":2,")
    if not sep:
        return set()
    return {flag for flag, letter in LETTERS.items() if letter in letters}


def read_maildir(path: Path) -> list[Local]:
    """The messages of one Maildir folder, sorted by Message-ID."""
    out = []
    for sub in ("new", "cur"):
        if (path / sub).is_dir():
            for f in (path / sub).iterdir():
                out.append(read_message(f.read_bytes(), maildir_flags(f.name)))
    return sorted(out, key=lambda m: m.message_id)


def find_in_maildir(path: Path, message_id: str) -> Path:
    for sub in ("new", "cur"):
        for f in (path / sub).iterdir() if (path / sub).is_dir() else ():
            if read_message(f.read_bytes(), set()).message_id == message_id:
                return f
    raise ClientError(f"{message_id} is not in the local Maildir {path}")


def set_maildir_flags(f: Path, flags: set[str]) -> Path:
    """Add ``flags`` to a Maildir file's name (moving it to cur/, as a reader does)."""
    base, _, letters = f.name.partition(":2,")
    letters = "".join(sorted(set(letters) | {LETTERS[x] for x in flags}))
    dest = f.parent.parent / "cur" / f"{base}:2,{letters}"
    os.rename(f, dest)
    return dest


def change_maildir(root: Path, folder_dir: dict[str, Path], changes: Changes,
                   strip_uid: bool = False) -> None:
    """Make ``changes`` in local Maildir folders (``folder_dir``: folder -> directory).
    A moved file loses what ties it to its old UID (``,U=n``) when ``strip_uid``, as a
    mail reader moving a file would not keep another folder's UID."""
    inbox = folder_dir["INBOX"]
    for mid, flags in changes.flag.items():
        set_maildir_flags(find_in_maildir(inbox, mid), flags)
    for mid in changes.delete:
        find_in_maildir(inbox, mid).unlink()
    for mid, folder in changes.move.items():
        f = find_in_maildir(inbox, mid)
        name = re.sub(r",U=\d+", "", f.name) if strip_uid else f.name
        dest = folder_dir[folder] / "cur" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(f, dest)


# ------------------------------------------------------------------ mbsync (isync)

def mbsync_sync(account: Account, work: Path, changes: Changes | None = None,
                folders: tuple[str, ...] = ("INBOX", "Archive")) -> Result:
    """Two-way mbsync: pull ``folders`` into a local Maildir, make ``changes`` there, sync
    again so that they are pushed back (flags stored, deletions and moves expunged)."""
    local = work / "mbsync-maildir"
    local.mkdir()
    ssl_type = {"none": "None", "starttls": "STARTTLS", "implicit": "IMAPS"}[account.tls]
    lines = [
        "IMAPAccount acc", f"Host {account.host}", f"Port {account.port}",
        f"User {_mbsync_quote(account.user)}", f"Pass {_mbsync_quote(account.password)}",
        f"SSLType {ssl_type}",
        # in the clear (the reference Dovecot alone) the LOGIN command, with a warning;
        # over TLS AUTHENTICATE PLAIN first, as mailfort offers after TLS
        "AuthMechs LOGIN" if account.tls == "none" else "AuthMechs PLAIN LOGIN",
        "Timeout 10", "PipelineDepth 1",
    ]
    if account.tls != "none":
        lines += ["SystemCertificates no", f"CertificateFile {account.cafile}"]
    lines += ["", "IMAPStore remote", "Account acc", "", "MaildirStore local",
              f"Path {local}/", f"Inbox {local}/INBOX", "SubFolders Verbatim", "",
              "Channel ch", "Far :remote:", "Near :local:",
              "Patterns " + " ".join(folders), "Create Both", "Remove None",
              "Expunge Both", "SyncState *", "Sync All", ""]
    rc = work / "mbsyncrc"
    rc.write_text("\n".join(lines))
    rc.chmod(0o600)
    argv = ["mbsync", "-c", str(rc), "-V", "-a"]
    env = client_env(work)
    log = run(argv, cwd=work, env=env)
    dirs = {f: local / f for f in folders}
    pulled = {f: read_maildir(d) for f, d in dirs.items()}
    after: dict[str, list[Local]] = {}
    if changes is not None:
        change_maildir(local, dirs, changes, strip_uid=True)
        log += run(argv, cwd=work, env=env)
        after = {f: read_maildir(d) for f, d in dirs.items()}
    return Result(pulled, after, log)


def _mbsync_quote(s: str) -> str:
    if any(c in s for c in "\r\n\0"):
        raise ValueError("mbsync cannot take a line break in a value")
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ------------------------------------------------------------------ offlineimap

def offlineimap_sync(account: Account, work: Path, changes: Changes | None = None,
                     folders: tuple[str, ...] = ("INBOX", "Archive")) -> Result:
    """offlineimap3: pull ``folders`` into a local Maildir, make ``changes``, sync again."""
    local = work / "offlineimap-maildir"
    local.mkdir()
    tls = {"none": ("no", "no"), "starttls": ("no", "yes"), "implicit": ("yes", "no")}
    use_ssl, starttls = tls[account.tls]
    wanted = ", ".join(repr(f) for f in folders)
    remote = [
        "[Repository R]", "type = IMAP", f"remotehost = {account.host}",
        f"remoteport = {account.port}", f"remoteuser = {account.user}",
        f"remotepassfile = {work / 'offlineimap.pass'}",
        f"ssl = {use_ssl}", f"starttls = {starttls}",
        f"folderfilter = lambda f: f in ({wanted},)",
        "maxconnections = 1", "holdconnectionopen = no", "timeout = 10",
    ]
    if account.tls != "none":
        remote += [f"sslcacertfile = {account.cafile}", "ssl_version = tls1_2"]
    else:
        remote += ["sslcacertfile = OS-DEFAULT"]
    text = "\n".join([
        "[general]", "accounts = a", f"metadata = {work / 'offlineimap-meta'}",
        "ui = basic", "maxsyncaccounts = 1", "",
        "[Account a]", "localrepository = L", "remoterepository = R", "autorefresh = 0", "",
        "[Repository L]", "type = Maildir", f"localfolders = {local}", "sep = .", "",
        *remote, ""])
    rc = work / "offlineimaprc"
    rc.write_text(text)
    (work / "offlineimap.pass").write_text(account.password)
    for p in (rc, work / "offlineimap.pass"):
        p.chmod(0o600)
    argv = ["offlineimap", "-c", str(rc), "-o", "-u", "basic"]
    env = client_env(work)
    log = run(argv, cwd=work, env=env)
    _offlineimap_ok(log)
    dirs = {f: local / f for f in folders}
    pulled = {f: read_maildir(d) for f, d in dirs.items()}
    after: dict[str, list[Local]] = {}
    if changes is not None:
        change_maildir(local, dirs, changes, strip_uid=True)
        log += run(argv, cwd=work, env=env)
        _offlineimap_ok(log)
        after = {f: read_maildir(d) for f, d in dirs.items()}
    return Result(pulled, after, log)


def _offlineimap_ok(log: str) -> None:
    """offlineimap exits 0 after some errors: its ERROR lines count as failures."""
    if "ERROR:" in log or "Traceback" in log:
        raise ClientError(f"offlineimap reported an error:\n{log}")


# ------------------------------------------------------------------ interimap (QRESYNC)

class LocalDovecot:
    """interimap's local side: Dovecot's imap binary on a Maildir of its own, run as
    nobody (as root it refuses a socket on stdout: "must not be started from inetd")."""

    def __init__(self, work: Path) -> None:
        nobody = pwd.getpwnam("nobody")
        self.maildir = work / "interimap-maildir"
        self.maildir.mkdir()
        os.chown(self.maildir, nobody.pw_uid, nobody.pw_gid)
        self.conf = work / "interimap-dovecot.conf"
        self.conf.write_text(
            f"mail_location = maildir:{self.maildir}\nssl = no\nlog_path = /dev/null\n"
            "mail_uid = nobody\nmail_gid = nogroup\nfirst_valid_uid = 1\n"
            "first_valid_gid = 1\n")
        self.conf.chmod(0o644)
        self.argv = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                     "--clear-groups", DOVECOT_IMAP, "-c", str(self.conf)]

    def folder_dir(self, folder: str) -> Path:
        return self.maildir if folder == "INBOX" else self.maildir / f".{folder}"

    def session(self, commands: list[str], env: dict[str, str]) -> str:
        """Commands to the local Dovecot (PREAUTH) over pipes; its transcript."""
        lines = [f"c{i} {c}\r\n" for i, c in enumerate(commands)] + ["z LOGOUT\r\n"]
        out = run(self.argv, cwd=self.maildir.parent, env=env,
                  input_="".join(lines).encode())
        for i in range(len(commands)):
            if not re.search(rf"^c{i} OK", out, re.M):
                raise ClientError(f"local Dovecot refused {commands[i]!r}:\n{out}")
        return out

    def change(self, changes: Changes, env: dict[str, str]) -> None:
        """``changes`` made over IMAP, one message at a time (found by Message-ID)."""
        for mid, flags in changes.flag.items():
            uid = self._uid(mid, env)
            self.session(["SELECT INBOX", f"UID STORE {uid} +FLAGS ({' '.join(flags)})"], env)
        for mid in changes.delete:
            uid = self._uid(mid, env)
            self.session(["SELECT INBOX", f"UID STORE {uid} +FLAGS (\\Deleted)",
                          f"UID EXPUNGE {uid}"], env)
        for mid, folder in changes.move.items():
            uid = self._uid(mid, env)
            self.session(["SELECT INBOX", f"UID MOVE {uid} {_imap_quote(folder)}"], env)

    def _uid(self, mid: str, env: dict[str, str]) -> int:
        out = self.session(["SELECT INBOX", f"UID SEARCH HEADER Message-ID {_imap_quote(mid)}"],
                           env)
        found = re.findall(r"^\* SEARCH (\d+)", out, re.M)
        if len(found) != 1:
            raise ClientError(f"{mid} not found once in interimap's local INBOX:\n{out}")
        return int(found[0])


def _imap_quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def interimap_sync(account: Account, work: Path, changes: Changes | None = None,
                   folders: tuple[str, ...] = ("INBOX", "Archive")) -> Result:
    """interimap: QRESYNC sync of ``folders`` into a local Dovecot, ``changes`` made there
    over IMAP, then synced back (UID STORE, UID EXPUNGE, APPEND)."""
    local = LocalDovecot(work)
    remote_type = "imaps" if account.tls == "implicit" else "imap"
    lines = [
        f"database = {work / 'interimap.db'}", "list-mailbox = " + " ".join(folders), "",
        "[local]", "type = tunnel", "command = " + " ".join(local.argv), "null-stderr = YES",
        "", "[remote]", f"type = {remote_type}", f"host = {account.host}",
        f"port = {account.port}", f"username = {account.user}",
        f"password = {account.password}",
        f"STARTTLS = {'YES' if account.tls == 'starttls' else 'NO'}",
        "compress = NO",
    ]
    if account.tls != "none":
        lines += [f"SSL_CAfile = {account.cafile}", "SSL_verify = YES",
                  "SSL_protocol_min = TLSv1.2"]
    conf = work / "interimap.conf"
    conf.write_text("\n".join(lines) + "\n")
    conf.chmod(0o600)
    env = client_env(work)
    argv = ["interimap", f"--config={conf}"]
    log = run(argv, cwd=work, env=env)
    dirs = {f: local.folder_dir(f) for f in folders}
    pulled = {f: read_maildir(d) for f, d in dirs.items()}
    after: dict[str, list[Local]] = {}
    if changes is not None:
        local.change(changes, env)
        log += run(argv, cwd=work, env=env)
        after = {f: read_maildir(d) for f, d in dirs.items()}
    return Result(pulled, after, log)


# ------------------------------------------------------------------ neomutt

def neomutt_list(account: Account, work: Path, changes: Changes | None = None,
                 folder: str = "INBOX", timeout: float = 20.0) -> Result:
    """neomutt, headless: its index on a pseudo-terminal, driven by a ``push`` of
    keystrokes given with ``-e``. It first copies every message of ``folder`` into a local
    mbox (what it read, parsed into ``pulled``), then makes ``changes`` (important flag,
    reading a message for \\Seen, delete, save to another folder), syncs and quits."""
    scheme = "imaps" if account.tls == "implicit" else "imap"
    out_mbox = work / "neomutt-read.mbox"
    for value in (account.user, account.password):
        if "'" in value or "\n" in value:
            raise ValueError("neomutt_list puts user and password in single quotes")
    rc_lines = [
        f"set imap_user='{account.user}'", f"set imap_pass='{account.password}'",
        f"set folder=\"{scheme}://{account.host}:{account.port}/\"",
        f"set spoolfile=\"+{folder}\"", "set header_cache=\"\"", "set message_cachedir=\"\"",
        "set record=\"\"", "set mbox_type=mbox", "set confirmappend=no",
        "set confirmcreate=no", "set delete=yes", "set move=no", "set quit=yes",
        "set wait_key=no", "set imap_passive=yes", "set timeout=5", "set mark_old=no",
        "set pager_stop=yes", "set sort=date",
        f"set ssl_starttls={'yes' if account.tls == 'starttls' else 'no'}",
        f"set ssl_force_tls={'no' if account.tls == 'none' else 'yes'}",
    ]
    if account.tls != "none":
        rc_lines.append(f"set certificate_file=\"{work / 'neomutt-certs'}\"")
        rc_lines.append(f"set ssl_ca_certificates_file=\"{account.cafile}\"")
    rc = work / "neomuttrc"
    rc.write_text("\n".join(rc_lines) + "\n")
    rc.chmod(0o600)
    keys = (f"<tag-pattern>~A<enter><tag-prefix><copy-message>{out_mbox}<enter>"
            "<untag-pattern>~A<enter>")
    changes = changes or Changes()
    for mid, flags in changes.flag.items():
        pat = _neomutt_id(mid)
        if "\\Flagged" in flags:
            keys += f"<tag-pattern>{pat}<enter><tag-prefix><flag-message><untag-pattern>~A<enter>"
        if "\\Seen" in flags:  # reading it is what sets \Seen
            keys += f"<limit>{pat}<enter><display-message><exit><limit>~A<enter>"
        if flags - {"\\Flagged", "\\Seen"}:
            raise ValueError("neomutt_list sets \\Flagged and \\Seen only")
    for mid in changes.delete:
        keys += f"<delete-pattern>{_neomutt_id(mid)}<enter>"
    for mid, dest in changes.move.items():
        keys += (f"<tag-pattern>{_neomutt_id(mid)}<enter><tag-prefix><save-message>"
                 f"={dest}<enter><untag-pattern>~A<enter>")
    keys += "<sync-mailbox><quit>"
    screen = _pty_run(["neomutt", "-n", "-F", str(rc), "-e", f"push \"{keys}\""],
                      work, client_env(work, TERM="xterm"), timeout)
    if not out_mbox.exists():
        raise ClientError(f"neomutt wrote no copy of {folder}; its screen:\n{screen}")
    pulled = {folder: read_mbox(out_mbox)}
    return Result(pulled, {}, screen)


def _neomutt_id(mid: str) -> str:
    """A ~i pattern for one Message-ID (regex metacharacters escaped)."""
    if not re.fullmatch(r"[\w.@+-]+", mid):
        raise ValueError(f"a Message-ID neomutt_list can put in a pattern: {mid!r}")
    return "~i '" + re.sub(r"([.+])", r"\\\\\1", mid) + "'"


def read_mbox(path: Path) -> list[Local]:
    out = []
    for chunk in re.split(rb"(?m)^From [^\n]*\n", path.read_bytes()):
        if chunk.strip():
            out.append(read_message(chunk, set()))
    return sorted(out, key=lambda m: m.message_id)


_ANSI = re.compile(rb"\x1b(\[[0-?]*[ -/]*[@-~]|[()][0-9A-B]|[=>])")


def _pty_run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    """Run a full-screen program on a pseudo-terminal (150x40) until it exits; the text it
    drew (escape sequences removed). Killed, and ClientError, after ``timeout``."""
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    raw = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the program closed the terminal
                    chunk = b""
                if not chunk:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                    break
                raw += chunk
            elif proc.poll() is not None:
                break
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise ClientError(f"{argv[0]} did not finish in {timeout} s; its screen:\n"
                              + _ANSI.sub(b" ", raw).decode(errors="replace")[-3000:])
    finally:
        os.close(master)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    screen = _ANSI.sub(b" ", raw).decode(errors="replace")
    if proc.returncode != 0:
        raise ClientError(f"{argv[0]} exited {proc.returncode}; its screen:\n{screen[-3000:]}")
    return screen


# ------------------------------------------------------------------ TLS in front of plaintext

class TLSFront:
    """A loopback TLS listener relaying to a plaintext IMAP server: "implicit" (TLS from
    the first byte) or "starttls" (STARTTLS added to the capabilities before TLS, answered,
    the handshake done, then every byte relayed). Threads, each connection bounded in time."""

    def __init__(self, backend_port: int, context: ssl.SSLContext, mode: str) -> None:
        self.backend_port, self.context, self.mode = backend_port, context, mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self.sock.close()
        self._thread.join(5)

    def __enter__(self) -> TLSFront:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        try:
            back = socket.create_connection(("127.0.0.1", self.backend_port), timeout=TIMEOUT)
        except OSError:
            conn.close()
            return
        try:
            if self.mode == "implicit":
                client: socket.socket = self.context.wrap_socket(conn, server_side=True)
            else:
                client = self._starttls(conn, back)
            self._relay(client, back)
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            conn.close()
            back.close()

    @staticmethod
    def _line(s: socket.socket) -> bytes:
        buf = b""
        while not buf.endswith(b"\n") and len(buf) < 8192:
            b = s.recv(1)
            if not b:
                raise ValueError("closed")
            buf += b
        return buf

    def _starttls(self, conn: socket.socket, back: socket.socket) -> ssl.SSLSocket:
        """Plaintext until the client's STARTTLS: CAPABILITY and the greeting get STARTTLS
        (and lose AUTH=, as a server does before TLS); nothing else is allowed."""
        def offer(line: bytes) -> bytes:
            return re.sub(rb" AUTH=\S+", b"", line.replace(b"IMAP4rev1", b"IMAP4rev1 STARTTLS",
                                                           1))
        greeting = self._line(back)
        conn.sendall(offer(greeting))
        while True:
            line = self._line(conn)
            tag, _, cmd = line.strip().partition(b" ")
            if cmd.upper() == b"STARTTLS":
                conn.sendall(tag + b" OK Begin TLS negotiation now\r\n")
                tls = self.context.wrap_socket(conn, server_side=True)
                return tls
            if cmd.upper() == b"CAPABILITY":
                back.sendall(line)
                while True:
                    reply = self._line(back)
                    conn.sendall(offer(reply) if reply.startswith(b"* CAPABILITY") else reply)
                    if reply.startswith(tag + b" "):
                        break
            elif cmd.upper() in (b"NOOP", b"LOGOUT") or cmd.upper().startswith(b"ID "):
                back.sendall(line)
                while not (reply := self._line(back)).startswith(tag + b" "):
                    conn.sendall(reply)
                conn.sendall(reply)
                if cmd.upper() == b"LOGOUT":
                    raise ValueError("logged out")
            else:
                conn.sendall(tag + b" BAD STARTTLS first\r\n")

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        deadline = time.monotonic() + 120
        socks = [a, b]
        while time.monotonic() < deadline and not self._stop.is_set():
            pending = isinstance(a, ssl.SSLSocket) and a.pending()
            ready = [a] if pending else select.select(socks, [], [], 0.5)[0]
            for s in ready:
                data = s.recv(65536)
                if not data:
                    return
                (b if s is a else a).sendall(data)
