"""Sieve at local delivery: which script runs for whom, and what its actions become.

For every local recipient (MX and submission) the administrator's ``[sieve] before``
script, the user's active script (store/sieve_scripts.py) and ``after`` run in that order,
after sender authentication and the content filters, before the commit; a script whose
result keeps the message (the implicit keep included) hands it on to the next one, one that
does not (fileinto, discard, reject, redirect) ends the chain. What the actions become:

* keep / fileinto: a target of the commit: the user's INBOX or a Maildir++ folder, with
  the imap4flags flags as the file name's ``:2,`` letters (store/maildir.py). A folder that
  does not exist is created with ``:create`` (RFC 5490 3.2), or when it is a special-use
  one (Junk, Trash, ...; the quarantine makes ``.Junk`` the same way); otherwise the
  message is kept in INBOX and a log line says why. Keywords cannot be stored in a file
  name: they are logged and left out;
* discard: not stored for that user (logged);
* redirect: at most ``max_redirects`` per run and ``redirects_per_day`` per user (a
  sliding 24 hours counted in ``<maildir>/sieve/.redirects``, under an flock: shared by
  every process and node on the Maildir). A local target is stored in its INBOX in the same
  commit; a remote one goes through the outbound queue in the commit, durable before the
  250, as a forward of the user's (queue/forward.py): its envelope sender is rewritten
  with SRS unless null, already ours, or the mail was submitted by a logged-in user; with
  SRS off it keeps the original sender. Over a limit, or to nowhere: kept in INBOX;
* reject / ereject: ``550 5.7.1 <reason>`` at the end of DATA, never a bounce. A DATA reply
  is one for every recipient, so at RCPT a transaction that has a recipient whose script
  can reject takes no second recipient (``452 4.5.3``: the client sends it in a new
  transaction, RFC 5321 3.5 and 4.5.3.1.10). A reject that still finds other recipients
  (an alias that reaches several users) is a keep, logged;
* vacation: after the 250, through policy/vacation.py (no backscatter).

A script that does not compile, is too large, or fails at run time never loses mail: the
message goes to INBOX (RFC 5228 2.10.6) and the log says why. Scripts are compiled once and
cached by (inode, size, mtime) of the active one; the global ones are read at start (as
root, before the privilege drop) into memory. Every method here blocks (disk, CPU): the
session runs them in a thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from mailfort.config import Config
from mailfort.directory.base import Directory
from mailfort.policy import vacation
from mailfort.protocol import sieve
from mailfort.protocol.address import AddressError, parse_mail_argument
from mailfort.store import imap_mailbox
from mailfort.store.maildir import maildir_for
from mailfort.store.sieve_scripts import ACTIVE, Quota, ScriptError, ScriptStore

log = logging.getLogger("mailfort.sieve")
_MAX_CACHED = 4096
_MAX_GLOBAL_SCRIPTS = 64
DAY = 86400
INLINE_SECONDS = 0.002  # scripts that ran faster lately run on the event loop
INBOX = "INBOX"
REDIRECTS_FILE = ".redirects"


# The administrator's scripts by path, read as root before the privilege drop (phase 5 of
# server/node_plan.py: ``preload``); a worker process forked later inherits them.
_PRELOADED: dict[str, bytes] = {}


def preload(cfg: Config) -> None:
    """Read ``[sieve] before``/``after`` and the scripts beside them now (as root, before
    the drop): the service user need not be able to read them, nor change them."""
    if not cfg.sieve.enabled:
        return
    owned = (cfg.data_path.resolve(), cfg.mail_path.resolve())
    for path in (cfg.sieve.before, cfg.sieve.after):
        if not path:
            continue
        p = Path(path)
        if any(p.parent.resolve().is_relative_to(d) for d in owned):
            # The service user's own tree: it could make the script a link to a file only
            # root may read. Read after the drop, as that user, like everything there.
            continue
        try:
            _PRELOADED[str(p)] = p.read_bytes()
            for other in sorted(p.parent.glob("*.sieve"))[:_MAX_GLOBAL_SCRIPTS]:
                _PRELOADED.setdefault(str(other), other.read_bytes())
        except OSError as exc:  # said again, with the consequence, when the node starts
            log.error("sieve: cannot read %s: %s", path, exc)


def _read(path: Path) -> bytes:
    found = _PRELOADED.get(str(path))
    return found if found is not None else path.read_bytes()


@dataclass
class Compiled:
    """A user's active script as last seen: its file's identity, the script or why not."""

    key: tuple[int, int, int] | None  # (inode, size, mtime_ns); None: no active script
    script: sieve.Script | None = None
    error: str | None = None
    # How long this user's scripts (global ones included) took to run here, lately (a slow
    # run counts at once, fast ones bring it down slowly); None: not run yet.
    seconds: float | None = None

    @property
    def uses_reject(self) -> bool:
        return self.script is not None and self.script.uses_reject



@dataclass
class Message:
    """What a run needs of the message (read once per message, shared by its recipients)."""

    header_block: bytes  # the header section as stored, through the blank line
    body: Callable[[], bytes]
    size: int
    sender: str  # envelope sender, "" for null
    submitted_by: str | None
    original_to: str | None
    queue_id: str


@dataclass
class Outcome:
    """What one user's scripts decided, as the session applies it."""

    user: str
    targets: dict[Path, str] = field(default_factory=dict)  # Maildir -> flag letters
    remote_redirects: list[str] = field(default_factory=list)
    reject: sieve.Reject | None = None
    vacation: sieve.Vacation | None = None
    ran: bool = False  # a script ran (else: plain delivery to INBOX)


class SieveDelivery:
    """The node's Sieve at delivery: global scripts, the cache of users' compiled ones."""

    def __init__(self, cfg: Config, directory: Directory,
                 rules: vacation.Rules = vacation.HARDENED) -> None:
        self.cfg = cfg
        self.opts = cfg.sieve
        self.directory = directory
        self.rules = rules
        o = self.opts
        self.limits = sieve.SieveLimits(max_script_bytes=o.max_script_size,
                                        max_actions=o.max_actions,
                                        max_redirects=o.max_redirects, max_cpu_ms=o.max_cpu_ms,
                                        vacation_default_seconds=o.vacation_default_days * 86400)
        self.quota = Quota(o.max_script_size, o.max_scripts, o.max_storage)
        self._cache: dict[Path, Compiled] = {}
        self.no_script = Compiled(None)  # this node's (its timing is of the global scripts)
        self._lock = threading.Lock()
        self._globals: dict[str, bytes] = {}
        self.before = self._load_global(o.before, "before")
        self.after = self._load_global(o.after, "after")

    # ---------------------------------------------------------------- scripts

    def _load_global(self, path: str, which: str) -> sieve.Script | None:
        """An administrator's script, read now (as root at start) and compiled; the scripts
        beside it are what its ``include :global`` may name. Broken: logged, not run."""
        if not path:
            return None
        p = Path(path)
        try:
            text = _read(p)
            siblings = [Path(k) for k in _PRELOADED if Path(k).parent == p.parent] or \
                sorted(p.parent.glob("*.sieve"))[:_MAX_GLOBAL_SCRIPTS]
            for other in siblings:
                if other.suffix == ".sieve":
                    self._globals.setdefault(other.stem, _read(other))
            return sieve.compile_script(text, limits=self.limits, include=self._global_include)
        except OSError as exc:
            log.error("sieve: global %s script %s cannot be read, not run: %s", which, path,
                      exc)
        except sieve.SieveError as exc:
            log.error("sieve: global %s script %s does not compile, not run: %s", which, path,
                      exc)
        return None

    def _global_include(self, name: str, global_: bool) -> bytes | None:
        return self._globals.get(name) if global_ else None

    @property
    def has_globals(self) -> bool:
        return self.before is not None or self.after is not None

    @staticmethod
    def _key(maildir: Path) -> tuple[int, int, int] | None:
        try:
            st = os.stat(maildir / "sieve" / ACTIVE)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def cached(self, maildir: Path) -> Compiled | None:
        """The user's script if the cache is current (one stat), else None: ``load``."""
        key = self._key(maildir)
        if key is None:
            return self.no_script
        found = self._cache.get(maildir)
        return found if found is not None and found.key == key else None

    def load(self, maildir: Path) -> Compiled:
        """The user's active script, compiled (or why it cannot run); cached."""
        found = self.cached(maildir)
        if found is not None:
            return found
        store = ScriptStore(maildir, self.quota)
        try:
            active = store.active_script()
        except OSError as exc:
            return Compiled((0, 0, 0), error=f"cannot read the active script: {exc}")
        if active is None:
            key = self._key(maildir)
            if key is None:
                return self.no_script
            compiled = Compiled(key, error="the active script is over max_script_size")
        else:
            name, text, st = active
            key = (st.st_ino, st.st_size, st.st_mtime_ns)

            def include(inc: str, global_: bool) -> bytes | None:
                if global_:
                    return self._globals.get(inc)
                try:
                    return store.get(inc)
                except (ScriptError, OSError):
                    return None

            try:
                compiled = Compiled(key, sieve.compile_script(text, limits=self.limits,
                                                              include=include))
            except sieve.SieveError as exc:
                compiled = Compiled(key, error=f"script {name!r} does not compile: {exc}")
        with self._lock:
            if len(self._cache) >= _MAX_CACHED:
                self._cache.clear()
            self._cache[maildir] = compiled
        return compiled

    def global_reject(self) -> bool:
        return any(s is not None and s.uses_reject for s in (self.before, self.after))

    # ---------------------------------------------------------------- a delivery

    def run(self, user: str, maildir: Path, msg: Message, *, alone: bool) -> Outcome:
        """The scripts of ``user`` on ``msg`` and what their actions become. ``alone``:
        the user is the transaction's only recipient (a reject can be answered)."""
        actions = self.evaluate(user, maildir, msg, self.load(maildir))
        return self.apply(user, maildir, msg, actions, alone=alone)

    def cheap(self, compiled: Compiled | None) -> bool:
        """Whether this user's scripts ran fast enough lately to run on the event loop
        (a run is bounded by max_cpu_ms all the same; one that is slow goes back to a
        thread from the next message on)."""
        return compiled is not None and compiled.seconds is not None \
            and compiled.seconds < INLINE_SECONDS

    def needs_io(self, maildir: Path, actions: list[object] | None) -> bool:
        """Whether applying ``actions`` writes or asks beyond a stat: a redirect (the day's
        count, the directory), a folder to create."""
        for a in actions or ():
            if isinstance(a, sieve.Redirect):
                return True
            if isinstance(a, sieve.FileInto) and not self._folder(maildir, a.mailbox)[1]:
                return True
        return False

    def evaluate(self, user: str, maildir: Path, msg: Message,
                 compiled: Compiled) -> list[object] | None:
        """The actions of the user's scripts (the implicit keep made explicit), None when
        no script runs for the user (plain delivery to INBOX). CPU only: the global
        scripts and ``compiled`` are in memory."""
        chain = [s for s in (self.before, compiled.script, self.after) if s is not None]
        qid = msg.queue_id
        if compiled.error is not None:
            log.warning("%s: sieve for %s: %s; the user's script is skipped", qid, user,
                        compiled.error)
        if not chain:
            return None
        started = time.perf_counter()
        env = sieve.SieveEnvironment(
            now=datetime.now(UTC), hostname=self.cfg.server.hostname,
            mailbox_exists=lambda name: self._folder(maildir, name)[1])
        view = sieve.SieveMessage.from_bytes(
            msg.header_block, msg.body, size=msg.size, envelope_from=msg.sender,
            envelope_to=user, original_to=msg.original_to, auth=msg.submitted_by)
        actions: list[object] = []
        flags: tuple[str, ...] = ()
        kept = True
        for n, script in enumerate(chain):
            try:
                result = script.run(view, env)
            except Exception as exc:  # the interpreter must not raise; never lose mail
                log.exception("%s: sieve for %s: the interpreter failed", qid, user)
                result = sieve.SieveResult([sieve.Keep()], error=f"internal error: {exc}")
            if result.error:
                log.warning("%s: sieve for %s: run-time error, message kept: %s", qid, user,
                            result.error)
            keeps = [a for a in result.actions if isinstance(a, sieve.Keep)]
            actions += [a for a in result.actions if not isinstance(a, sieve.Keep)]
            for k in keeps:
                flags += tuple(f for f in k.flags if f not in flags)
            kept = bool(keeps)
            if not kept:
                break  # the implicit keep was cancelled: the next script is not run
            if n == len(chain) - 1:
                break
        if kept:
            actions.append(sieve.Keep(flags))
        took = time.perf_counter() - started
        last = compiled.seconds
        compiled.seconds = took if last is None or took > last else 0.8 * last + 0.2 * took
        return actions

    def apply(self, user: str, maildir: Path, msg: Message, actions: list[object] | None,
              *, alone: bool) -> Outcome:
        """What ``evaluate``'s actions become (folders, flags, redirects...): disk, and the
        directory for a redirect; on the loop only when ``needs_io`` says no."""
        out = Outcome(user)
        if actions is None:
            out.targets[maildir] = ""
            return out
        try:
            self._apply(out, maildir, msg, actions, alone)
        except Exception:  # a directory or disk failure must not cost the message
            log.exception("%s: sieve for %s: its actions failed; the message goes to INBOX",
                          msg.queue_id, user)
            out = Outcome(user, targets={maildir: ""}, ran=True)
        return out

    def _apply(self, out: Outcome, maildir: Path, msg: Message, actions: list[object],
               alone: bool) -> None:
        user = out.user
        out.ran = True
        qid = msg.queue_id
        redirects = 0
        for a in actions:
            if isinstance(a, sieve.Keep):
                self._target(out, maildir, "", a.flags, qid)
            elif isinstance(a, sieve.FileInto):
                self._fileinto(out, maildir, a, qid)
            elif isinstance(a, sieve.Discard):
                log.info("%s: sieve for %s: discarded", qid, user)
            elif isinstance(a, sieve.Reject):
                if alone:
                    out.reject = a
                else:
                    log.warning("%s: sieve for %s: %s with other recipients in the "
                                "transaction: kept instead (one reply is given to all)", qid,
                                user, "ereject" if a.ereject else "reject")
                    self._target(out, maildir, "", (), qid)
            elif isinstance(a, sieve.Redirect):
                redirects += 1
                self._redirect(out, maildir, a, msg, redirects)
            elif isinstance(a, sieve.Vacation):
                out.vacation = a
        if out.reject is not None:
            out.targets.clear()
            out.remote_redirects.clear()

    def _folder(self, maildir: Path, name: str) -> tuple[Path | None, bool]:
        """The Maildir of folder ``name`` (None: not a valid name) and whether it exists."""
        if name.upper() == INBOX:
            return maildir, True
        try:
            checked = imap_mailbox._check_name(name)
        except imap_mailbox.BadName:
            return None, False
        path = maildir / imap_mailbox.folder_dir(checked)
        return path, (path / "cur").is_dir()

    def _target(self, out: Outcome, maildir: Path, folder: str, flags: tuple[str, ...],
                qid: str) -> None:
        letters = set(out.targets.get(maildir, ""))
        for flag in flags:
            try:
                found, keywords = imap_mailbox.split_flags([flag])
            except ValueError:
                found, keywords = "", ()
            letters.update(found)
            if keywords or (not found and not keywords):
                log.info("%s: sieve for %s: flag %r not stored (only system flags are kept "
                         "with a delivered message)", qid, out.user, flag[:64])
        out.targets[maildir] = "".join(sorted(letters))

    def _fileinto(self, out: Outcome, root: Path, a: sieve.FileInto, qid: str) -> None:
        path, exists = self._folder(root, a.mailbox)
        name = a.mailbox[:100]
        if path is None:
            log.warning("%s: sieve for %s: fileinto %r: not a folder name: kept in INBOX",
                        qid, out.user, name)
            path = root
        elif not exists:
            special = a.mailbox in imap_mailbox.SPECIAL_USE
            if a.create or special:
                try:
                    imap_mailbox.MailStore(root).create(a.mailbox)
                    log.info("%s: sieve for %s: folder %r created", qid, out.user, name)
                except imap_mailbox.MailboxExists:
                    pass
                except (OSError, imap_mailbox.MailboxError) as exc:
                    log.warning("%s: sieve for %s: folder %r cannot be created (%s): kept "
                                "in INBOX", qid, out.user, name, exc)
                    path = root
            else:
                log.warning("%s: sieve for %s: fileinto %r: no such folder (and no "
                            ":create): kept in INBOX", qid, out.user, name)
                path = root
        self._target(out, path, "", a.flags, qid)

    def _redirect(self, out: Outcome, maildir: Path, a: sieve.Redirect, msg: Message,
                  n: int) -> None:
        user, qid = out.user, msg.queue_id
        why = None
        addr = a.address[:320]
        try:
            parsed, _ = parse_mail_argument(f"TO:<{addr}>", prefix="TO:", null_allowed=False,
                                            smtputf8_allowed=False)
            addr = str(parsed)
        except AddressError:
            why = "not an address"
        if why is None and n > self.opts.max_redirects:
            why = f"over max_redirects ({self.opts.max_redirects}) in one run"
        if why is None and addr.lower() == user.lower():
            why = "to the user itself"
        resolution = None
        if why is None:
            domain = addr.rpartition("@")[2]
            if self.directory.is_local_domain(domain):
                resolution = self.directory.resolve(addr)
                if resolution is None:
                    why = "no such local user"
        if why is None and not vacation.VacationState(
                maildir / "sieve", REDIRECTS_FILE).count_recent(
                    self.opts.redirects_per_day, DAY):
            why = f"over redirects_per_day ({self.opts.redirects_per_day})"
        if why is not None:
            log.warning("%s: sieve for %s: redirect to <%s> not done (%s): kept in INBOX",
                        qid, user, addr, why)
            self._target(out, maildir, "", (), qid)
            return
        if resolution is None:
            out.remote_redirects.append(addr)
        else:
            for local in resolution.local:
                out.targets.setdefault(maildir_for(self.cfg.mail_path, local), "")
            out.remote_redirects.extend(resolution.remote)
        log.info("%s: sieve for %s: redirected to <%s>%s", qid, user, addr,
                 " (copy kept)" if a.copy else "")

    # ---------------------------------------------------------------- vacation

    def vacation_reply(self, out: Outcome, maildir: Path, msg: Message,
                       authenticated: bool) -> bytes | None:
        """The reply to send for ``out.vacation`` (None: not sent; the log says why)."""
        a = out.vacation
        assert a is not None
        user, qid = out.user, msg.queue_id
        headers = vacation.parse_headers(msg.header_block)
        try:
            mine = frozenset(x.lower() for x in self.directory.addresses_of(user))
        except Exception:  # a directory down: no reply rather than a wrong one
            log.exception("%s: vacation for %s: addresses unknown", qid, user)
            return None
        o = self.opts
        period = vacation.clamp(a.seconds, o.vacation_min_days, o.vacation_max_days)
        req = vacation.Request(msg.sender, user, mine, headers, authenticated, a.handle,
                               period, tuple(a.addresses))
        decision = vacation.decide(req, self.rules)
        if decision.send and not vacation.VacationState(maildir / "sieve").claim(
                msg.sender, a.handle, period):
            decision = vacation.Decision(False, "already answered within the period")
        log.info("%s: vacation for %s to <%s>: %s", qid, user, msg.sender,
                 "sent" if decision.send else f"not sent ({decision.reason})")
        if not decision.send:
            return None
        return vacation.build_reply(
            hostname=self.cfg.server.hostname, user=user, from_=a.from_, to=msg.sender,
            headers=headers, reason=a.reason, subject=a.subject, mime=a.mime,
            user_addresses=mine)


def header_block(data: bytes) -> bytes:
    """The header section of a stored message's start, through its blank line."""
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[: end + 4]

