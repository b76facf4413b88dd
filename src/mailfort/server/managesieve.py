"""asyncio ManageSieve listener (RFC 5804; 4190 in production) driving the engine.

A session is an ``asyncio.Protocol`` like the POP3 and IMAP sessions (server/session.py):
bytes go straight into ``protocol/managesieve.py``, so what a client pipelines behind
STARTTLS is discarded by the engine before the handshake. Logins go through the node's
authenticator (policy/authn.py: the same delays, blocks and decision log lines as POP3,
IMAP and submission). A logged-in user's scripts are the ``ScriptStore`` beside their
Maildir (store/sieve_scripts.py), with the ``[sieve]`` quotas; every command that touches
it runs in a worker thread while reading is paused, so replies stay in order.

PUTSCRIPT and CHECKSCRIPT compile the script (``protocol.sieve.compile_script``) before
anything is stored, and a script that does not compile is refused with the compiler's
``line N: ...`` text (RFC 5804 §2.6 asks for a human-readable reason; Dovecot words it the
same way), so a broken script never becomes the one that runs at delivery.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from mailfort.config import LimitsConfig, SieveConfig
from mailfort.policy import decisionlog
from mailfort.policy.authn import AuthOutcome, AuthStatus
from mailfort.protocol import sieve
from mailfort.protocol.managesieve import (
    TRY_LATER,
    CheckCredentials,
    EngineSettings,
    Event,
    Execute,
    ManageSieveEngine,
    StartTLS,
    State,
)
from mailfort.server.connections import Admission, is_loopback, limit_exceptions
from mailfort.server.session import EngineSession, Listener
from mailfort.store.maildir import maildir_for
from mailfort.store.sieve_scripts import Quota, ScriptError, ScriptStore

log = logging.getLogger("mailfort.managesieve")

TOO_MANY_CONNECTIONS = "Too many connections, try again later"
_REFUSALS = {Admission.TOO_MANY: TOO_MANY_CONNECTIONS,
             Admission.TOO_MANY_FROM_IP: "Too many connections from your address, try again later",
             Admission.RATE_FROM_IP: "Too many connections from your address, try again later"}
SHUTTING_DOWN = "Service shutting down, try again later"
STRESS_CLOSE = "Server busy, closing idle connection, try again later"
STORAGE_PROBLEM = "Temporary storage problem, try again later"


class Authenticator(Protocol):
    async def verify(self, username: str, password: str, client_ip: str) -> AuthOutcome: ...


# A script's compile error ("line N: ..."), or None; given the user's store for includes.
Checker = Callable[[bytes, ScriptStore], str | None]


def sieve_checker(cfg: SieveConfig) -> Checker:
    """Compile a script as delivery will (the ``[sieve]`` limits); its error, or None.

    An ``include`` of one of the user's scripts is compiled with it, so an error there is
    told at upload too. One that does not exist (yet), or a global one (the administrator's,
    not this listener's to read), counts as an empty script: scripts are uploaded one at a
    time, in any order, and a missing include at delivery is a runtime error that keeps the
    message (RFC 6609 §3.2), never lost mail."""
    limits = sieve.SieveLimits(max_script_bytes=cfg.max_script_size,
                               max_actions=cfg.max_actions, max_redirects=cfg.max_redirects,
                               max_cpu_ms=cfg.max_cpu_ms)

    def check(text: bytes, store: ScriptStore) -> str | None:
        def include(name: str, global_: bool) -> bytes:
            if global_:
                return b""
            try:
                return store.get(name)
            except ScriptError:
                return b""

        try:
            sieve.compile_script(text, limits=limits, include=include)
        except sieve.SieveError as exc:
            return str(exc)
        return None

    return check


def store_for(mail_dir: Path, user: str, cfg: SieveConfig) -> ScriptStore:
    return ScriptStore(maildir_for(mail_dir, user),
                       Quota(cfg.max_script_size, cfg.max_scripts, cfg.max_storage))


class ManageSieveServer(Listener):
    """The ManageSieve listener: plaintext, STARTTLS before AUTHENTICATE."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None,
        authenticator: Authenticator,
        mail_dir: Path,
        limits: LimitsConfig,
        sieve_config: SieveConfig,
        allow_plaintext: bool = False,
        checker: Checker | None = None,
    ) -> None:
        """``allow_plaintext`` (``allow_plaintext_auth_on_loopback``) applies to loopback
        clients only. ``checker``: compiles a script (default: ``sieve_checker``)."""
        super().__init__(limits.max_connections, limits.max_connections_per_ip,
                         limit_exceptions(limits.connection_limit_exceptions, ()))
        self.ssl_context = ssl_context
        self.authenticator = authenticator
        self.mail_dir = Path(mail_dir)
        self.limits = limits
        self.sieve = sieve_config
        self.checker = checker or sieve_checker(sieve_config)
        base = EngineSettings(
            tls_available=ssl_context is not None,
            allow_plaintext=False,
            max_errors=limits.max_errors,
            error_slowdown=limits.error_slowdown,
            sieve_extensions=tuple(sorted(sieve.SUPPORTED)),
            max_redirects=sieve_config.max_redirects,
            max_script_size=sieve_config.max_script_size,
        )
        self.settings = base
        self.loopback_settings = (
            dataclasses.replace(base, allow_plaintext=True) if allow_plaintext else base)
        self.name = "managesieve"

    async def start(self, host: str, port: int,
                    sock: socket.socket | None = None) -> asyncio.base_events.Server:
        return await self.listen(lambda: ManageSieveSession(self), host, port, None, sock=sock)


class ManageSieveSession(EngineSession):
    """One client connection."""

    engine: ManageSieveEngine | None

    def __init__(self, server: ManageSieveServer) -> None:
        super().__init__()
        self.server = server
        self.engine = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = typing.cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.peer_ip = str(peer[0])
        srv = self.server
        settings = srv.loopback_settings if is_loopback(self.peer_ip) else srv.settings
        settings = srv.stress.engine_settings(srv.limiter, settings)
        self.engine = ManageSieveEngine(settings)
        decisionlog.connect(srv.name, self.peer_ip)
        self.admit(srv.limiter, srv.sessions, _REFUSALS, srv.limits.managesieve_login_timeout,
                   stress=srv.stress)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.release()

    def stress_reply(self, engine: ManageSieveEngine) -> None:  # type: ignore[override]
        engine.close(STRESS_CLOSE)

    def shutdown(self) -> None:
        engine = self.engine
        if engine is not None:  # a PUTSCRIPT in flight is answered first
            self.close_engine(lambda: engine.close(SHUTTING_DOWN))

    def on_timer(self) -> None:
        engine, limits = self.engine, self.server.limits
        assert engine is not None
        limit = (limits.managesieve_login_timeout if engine.state is State.NOT_AUTHENTICATED
                 else limits.managesieve_timeout)
        self.idle_check(limit, "managesieve")

    def task_failed(self) -> None:
        if self.engine is not None:
            self.engine.close(STORAGE_PROBLEM)

    def handle(self, ev: Event) -> None:
        if isinstance(ev, CheckCredentials):
            self.run(self._check(ev))
        elif isinstance(ev, StartTLS):
            self.run(self._starttls())
        elif isinstance(ev, Execute):
            self.run(self._execute(ev))

    async def _check(self, ev: CheckCredentials) -> None:
        engine = self.engine
        assert engine is not None
        outcome = await self.server.authenticator.verify(ev.username, ev.password, self.peer_ip)
        if outcome.status is AuthStatus.UNAVAILABLE:  # shared counters down: try later
            engine.credentials_unverifiable(TRY_LATER)
        elif outcome.ok and outcome.user:
            log.info("managesieve %s: %s logged in", self.peer_ip, outcome.user)
            engine.credentials_accepted(outcome.user)
        else:  # failed or blocked: one reply, so neither the account nor the block shows
            log.info("managesieve %s: login %s (%s)", self.peer_ip, outcome.status,
                     ev.mechanism)
            engine.credentials_refused()

    async def _starttls(self) -> None:
        engine, ctx = self.engine, self.server.ssl_context
        assert engine is not None and ctx is not None
        if await self.start_tls(ctx, lambda: engine.close("TLS handshake failed")):
            engine.tls_started()

    async def _execute(self, ev: Execute) -> None:
        engine = self.engine
        assert engine is not None and engine.user is not None
        user, srv = engine.user, self.server
        try:
            answer = await asyncio.to_thread(
                execute, store_for(srv.mail_dir, user, srv.sieve), srv.checker, ev)
        except OSError as exc:
            log.error("managesieve %s: %s of %s failed: %s", self.peer_ip, ev.name, user, exc)
            answer = Answer(False, "TRYLATER", STORAGE_PROBLEM)
        if ev.name in ("PUTSCRIPT", "SETACTIVE", "DELETESCRIPT", "RENAMESCRIPT") and answer.ok:
            log.info("managesieve %s: %s %s", self.peer_ip, user, ev.name)
        engine.executed(answer.ok, answer.code, answer.text, listing=answer.listing,
                        script=answer.script)


@dataclasses.dataclass(slots=True)
class Answer:
    ok: bool
    code: str = ""
    text: str = ""
    listing: list[tuple[str, bool]] | None = None
    script: bytes | None = None


def _name(raw: bytes | int) -> str:
    """A script name from the wire: UTF-8 (RFC 5804 §1.6), checked by the store."""
    assert isinstance(raw, bytes)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ScriptError("", "a script name is UTF-8") from None


def execute(store: ScriptStore, checker: Checker, ev: Execute) -> Answer:
    """One script command against the user's store (blocking: runs in a thread)."""
    a = ev.args
    try:
        if ev.name == "LISTSCRIPTS":
            return Answer(True, listing=store.list())
        if ev.name == "GETSCRIPT":
            return Answer(True, script=store.get(_name(a[0])))
        if ev.name == "HAVESPACE":
            assert isinstance(a[1], int)
            store.check_room(_name(a[0]), a[1])
            return Answer(True)
        if ev.name in ("PUTSCRIPT", "CHECKSCRIPT"):
            text = a[-1]
            assert isinstance(text, bytes)
            name = _name(a[0]) if ev.name == "PUTSCRIPT" else None
            if name is not None:  # quota first: cheap, and a client must hear why
                store.check_room(name, len(text))
            error = checker(text, store)
            if error is not None:
                return Answer(False, "", error)
            if name is not None:
                store.put(name, text)
            return Answer(True)
        if ev.name == "SETACTIVE":
            name = _name(a[0])
            store.set_active(name or None)
            return Answer(True)
        if ev.name == "DELETESCRIPT":
            store.delete(_name(a[0]))
            return Answer(True)
        if ev.name == "RENAMESCRIPT":
            store.rename(_name(a[0]), _name(a[1]))
            return Answer(True)
    except ScriptError as exc:
        return Answer(False, exc.code, exc.text)
    raise ValueError(f"not a script command: {ev.name}")
