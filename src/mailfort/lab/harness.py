"""Start and stop the lab: two mailfort nodes (legacy and hardened) with their capture
points, all on 127.0.0.1 and free ports, with scratch data removed at the end.

Both nodes are the real ``server.app.Node``, with the same domain, users and aliases;
the legacy one is given ``profile.LegacyProfile`` composed into the server's own policy
seams (``server.profile.Profile``) in Python. Each side has its own capture
points, so a consequence is always traced to the server that caused it: a sink playing the
victim's remote server (``[routes]`` sends every remote domain there), a mailbox for the
forged sender (its domain routed there), and a recording proxy in front of each service.
Everything runs on one asyncio loop in a background thread; attacks are plain blocking
clients in the caller's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import shutil
import tempfile
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailfort import config as config_mod
from mailfort.config import Config
from mailfort.directory.sqlite import SQLiteDirectory
from mailfort.lab.capture import CaptureSMTP, RecordingProxy
from mailfort.lab.dns import LabDNS
from mailfort.lab.profile import LegacyProfile
from mailfort.passwords import hash_password
from mailfort.server import eventloop
from mailfort.server.app import Node, directory_path
from mailfort.store.maildir import maildir_for
from mailfort.store.sieve_scripts import ScriptStore

LOOPBACK = "127.0.0.1"
DOMAIN = "example.test"
REMOTE_DOMAIN = "remote.example"  # the victim's remote server: the sink
FORGED_DOMAIN = "innocent.example"  # the forged sender's domain: its mailbox
ATTACKER_IP = "127.0.0.66"  # the password guesser's own loopback address

# The lab's accounts. bob's password is a weak one (the guessing attack finds it).
PASSWORDS = {
    f"alice@{DOMAIN}": "Tr0ub4dor&3-horse",
    f"bob@{DOMAIN}": "letmein2024",
    f"carol@{DOMAIN}": "carol-long-passphrase",
    f"mallory@{DOMAIN}": "mallory-insider-pw",
}
ALIASES = {
    f"postmaster@{DOMAIN}": [f"alice@{DOMAIN}"],
    f"team@{DOMAIN}": [f"alice@{DOMAIN}", f"bob@{DOMAIN}", f"carol@{DOMAIN}"],
    f"ceo@{DOMAIN}": ["boss.private@home-isp.example"],  # EXPN discloses the real one
}
CAROL = f"carol@{DOMAIN}"
VACATION_SCRIPT = ('require "vacation";\n'
                   'vacation :days 7 :subject "Out of office" "I am away this week.";\n')
# The hardened side keeps mailfort's protections; only the brute-force delays are scaled
# down (valid configuration values) so that the demonstration ends in seconds.
HARDENED_AUTH = {"delay_after_failures": 2, "block_after_failures": 6,
                 "failure_delay": 0.1, "block_seconds": 120.0}
SIDES = ("legacy", "hardened")
# What the lab domain publishes in the lab's DNS: no host may send as it from outside.
PUBLISHED_TXT = {
    DOMAIN: ["v=spf1 -all"],
    FORGED_DOMAIN: ["v=spf1 -all"],  # the victim's domain: a forged sender fails SPF
    f"_dmarc.{DOMAIN}": [f"v=DMARC1; p=reject; rua=mailto:postmaster@{DOMAIN}"],
}


class LabError(Exception):
    """The lab cannot start (bad address, a port that will not open…)."""


def check_address(address: str) -> str:
    """The lab listens on 127.0.0.1 only: nothing it does may be reachable from outside."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise LabError(f"{address!r} is not an IP address; the lab runs on 127.0.0.1 only")\
            from None
    if str(ip) != LOOPBACK:
        raise LabError(f"the lab runs on {LOOPBACK} only, not {address}")
    return LOOPBACK


@dataclass
class Side:
    """One server of the lab and its capture points."""

    name: str  # "legacy" or "hardened"
    root: Path
    node: Node | None = None
    sink: CaptureSMTP | None = None  # the victim's remote server
    forged: CaptureSMTP | None = None  # the forged sender's mailbox
    proxies: dict[str, RecordingProxy] = field(default_factory=dict)

    @property
    def legacy(self) -> bool:
        return self.name == "legacy"

    def port(self, service: str) -> int | None:
        """The proxy port of a service (None when this server has no such service)."""
        proxy = self.proxies.get(service)
        return None if proxy is None else proxy.port

    def server_port(self, service: str) -> int | None:
        """The server's own port, without the proxy (for ``mailfort audit``)."""
        assert self.node is not None
        ports = self.node.ports.get(service)
        return ports[0] if ports else None

    def mailbox(self, user: str) -> list[bytes]:
        """Every message stored for a local user (new/ and cur/)."""
        assert self.node is not None
        md = maildir_for(self.node.cfg.mail_path, user)
        out = []
        for sub in ("new", "cur"):
            d = md / sub
            if d.is_dir():
                out += [p.read_bytes() for p in sorted(d.iterdir())]
        return out


def _config(side: Side, routes: dict[str, dict[str, Any]], dns_port: int) -> Config:
    listen = {name: [f"{LOOPBACK}:0"] for name in
              ("mx", "submission", "submissions", "pop3", "pop3s", "imap", "imaps",
               "managesieve")}
    if side.legacy:  # one door: no submission ports, no implicit TLS, no ManageSieve
        listen.update(submission=[], submissions=[], pop3s=[], imaps=[], managesieve=[])
    raw: dict[str, Any] = {
        "server": {"hostname": f"mx.{side.name}.{DOMAIN}", "data_dir": str(side.root / "data")},
        "store": {"flush": "fsync"},  # a shared disk: flush only our own files
        "listen": listen,
        "routes": routes,
        # Never the system resolver: the lab's own DNS (lab/dns.py) answers for the lab
        # domain and NXDOMAIN for every other name; remote mail is routed to capture points.
        "dns": {"nameservers": [LOOPBACK], "port": dns_port, "timeout": 1.0},
        "queue": {"initial_retry": 1.0, "connect_timeout": 5.0},
    }
    if side.legacy:  # the old way: whoever connects may claim any sender
        raw["sender_auth"] = {"enabled": False}
    else:
        raw["auth"] = HARDENED_AUTH
    return config_mod.from_dict(raw)


def _seed(cfg: Config) -> None:
    cfg.data_path.mkdir(mode=0o700, parents=True, exist_ok=True)
    d = SQLiteDirectory(directory_path(cfg))
    try:
        d.add_domain(DOMAIN)
        for user, password in PASSWORDS.items():
            d.add_user(user, hash_password(password))
        for source, targets in ALIASES.items():
            d.add_alias(source, targets)
        # carol is on vacation (the vacation-backscatter attack): her active Sieve script
        store = ScriptStore(maildir_for(cfg.mail_path, CAROL))
        store.put("vacation", VACATION_SCRIPT.encode())
        store.set_active("vacation")
    finally:
        close = getattr(d, "close", None)
        if callable(close):
            close()


class Lab:
    """``with Lab() as lab:`` starts both sides; leaving removes every scratch file."""

    def __init__(self, address: str = LOOPBACK, scratch: Path | None = None) -> None:
        check_address(address)
        self._own_scratch = scratch is None
        self.scratch = Path(tempfile.mkdtemp(prefix="mailfort-lab-")) if scratch is None \
            else scratch
        self.sides = {name: Side(name, self.scratch / name) for name in SIDES}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dns: LabDNS | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Lab:
        loop = eventloop.loop_factory()()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="mailfort-lab",
                                        daemon=True)
        self._thread.start()
        try:
            self.call(self._start(), timeout=120)
        except BaseException:
            self.stop()
            raise
        return self

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        """Run a coroutine on the lab's loop and wait for its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        self.dns = await LabDNS(PUBLISHED_TXT, LOOPBACK).start()
        for side in self.sides.values():
            side.root.mkdir(parents=True, exist_ok=True)
            side.sink = CaptureSMTP("sink", f"mx.{REMOTE_DOMAIN}", side.root / "sink")
            side.forged = CaptureSMTP("forged-sender", f"mx.{FORGED_DOMAIN}",
                                      side.root / "forged-sender")
            await side.sink.start()
            await side.forged.start()
            routes = {"*": {"host": LOOPBACK, "port": side.sink.port},
                      FORGED_DOMAIN: {"host": LOOPBACK, "port": side.forged.port}}
            cfg = _config(side, routes, self.dns.port)
            await asyncio.to_thread(_seed, cfg)
            node = (Node(cfg, profile=LegacyProfile(domain=DOMAIN).compose()) if side.legacy
                    else Node(cfg))
            side.node = node
            await node.start()
            for service in ("mx", "submission", "pop3", "imap"):
                if node.ports.get(service):
                    proxy = RecordingProxy(service, node.port(service))
                    await proxy.start()
                    side.proxies[service] = proxy

    async def _stop(self) -> None:
        for side in self.sides.values():
            for proxy in side.proxies.values():
                await proxy.close()
            if side.node is not None:
                with contextlib.suppress(Exception):
                    await side.node.stop()
            for cap in (side.sink, side.forged):
                if cap is not None:
                    await cap.close()
        if self.dns is not None:
            await self.dns.close()

    def stop(self) -> None:
        """Stop everything and remove the scratch data (safe to call twice)."""
        loop, self._loop = self._loop, None
        try:
            if loop is not None:
                with contextlib.suppress(Exception):
                    asyncio.run_coroutine_threadsafe(self._stop(), loop).result(15)
                loop.call_soon_threadsafe(loop.stop)
                if self._thread is not None:
                    self._thread.join(5)
                if not loop.is_running():
                    loop.close()
        finally:
            if self._own_scratch and self.scratch.exists():
                shutil.rmtree(self.scratch, ignore_errors=True)
            elif not self._own_scratch:
                for side in self.sides.values():
                    shutil.rmtree(side.root, ignore_errors=True)

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

