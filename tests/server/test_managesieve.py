"""End-to-end ManageSieve: real sockets on 127.0.0.1, real TLS (trustme), the real
authenticator and script store on disk, and real clients: Debian's ``sieve-connect`` and the
PyPI ``managesieve`` and ``sievelib`` libraries."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailfort.config import LimitsConfig, SieveConfig
from mailfort.server.managesieve import ManageSieveServer
from mailfort.store.maildir import maildir_for
from mailfort.store.sieve_scripts import Quota, ScriptStore
from tests.server.test_imap import Raw
from tests.server.test_pop3 import ALICE, PASSWORDS, make_authenticator
from tests.server.unread_pipeline import pipeline_without_reading, slow_client

SCRIPT = (b'require ["fileinto"];\r\nif header :contains "subject" "sale" {\r\n'
          b'  fileinto "Junk";\r\n}\r\n')
BROKEN = b'require ["fileinto"];\r\nif true {\r\n  frobnicate "Junk";\r\n}\r\n'  # line 3


@dataclass
class SieveLab:
    data_dir: Path
    server: ManageSieveServer
    client_ctx: ssl.SSLContext
    ca_file: Path

    @property
    def port(self) -> int:
        return self.server.ports[0]

    def store(self, user: str = ALICE) -> ScriptStore:
        return ScriptStore(maildir_for(self.data_dir / "mail", user), Quota())

    def raw(self) -> Raw:
        r = Raw(self.port)
        self.until_ok(r)  # the greeting: capabilities, then OK
        return r

    @staticmethod
    def until_ok(r: Raw) -> list[bytes]:
        out = []
        while True:
            ln = r.line()
            assert ln, f"closed; got {out}"
            out.append(ln)
            if ln.startswith((b"OK", b"NO", b"BYE")):
                return out

    def login(self, r: Raw, user: str = ALICE) -> None:
        r.send(b"STARTTLS\r\n")
        assert r.line().startswith(b"OK")
        r.tls(self.client_ctx)
        self.until_ok(r)
        creds = base64.b64encode(f"\0{user}\0{PASSWORDS[user]}".encode())
        r.send(b'AUTHENTICATE "PLAIN" "' + creds + b'"\r\n')
        assert r.line().startswith(b"OK"), "login"


@pytest.fixture
async def lab_factory(
    tmp_path: Path, server_ssl_context: ssl.SSLContext, client_ssl_context: ssl.SSLContext,
    tls_ca: trustme.CA,
) -> AsyncIterator[Callable[..., Any]]:
    servers: list[tuple[ManageSieveServer, Any]] = []
    ca_file = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_file))

    async def factory(sieve_config: SieveConfig | None = None,
                      limits: LimitsConfig | None = None, **kw: Any) -> SieveLab:
        data_dir = tmp_path / f"data{len(servers)}"
        auth = make_authenticator(data_dir)
        server = ManageSieveServer(ssl_context=server_ssl_context, authenticator=auth,
                                   mail_dir=data_dir / "mail", limits=limits or LimitsConfig(),
                                   sieve_config=sieve_config or SieveConfig(), **kw)
        await server.start("127.0.0.1", 0)
        servers.append((server, auth))
        return SieveLab(data_dir, server, client_ssl_context, ca_file)

    yield factory
    for server, auth in servers:
        await server.close()
        auth.close()


@pytest.fixture
async def lab(lab_factory: Callable[..., Any]) -> SieveLab:
    return await lab_factory()


def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return asyncio.to_thread(fn, *args)


# ------------------------------------------------------------------ TLS before credentials


async def test_plain_refused_before_starttls_and_offered_after(lab: SieveLab) -> None:
    def talk() -> tuple[list[bytes], list[bytes], list[bytes], list[bytes]]:
        r = Raw(lab.port)
        greeting = lab.until_ok(r)
        creds = base64.b64encode(f"\0{ALICE}\0{PASSWORDS[ALICE]}".encode())
        r.send(b'AUTHENTICATE "PLAIN" "' + creds + b'"\r\n')
        refused = lab.until_ok(r)
        r.send(b"STARTTLS\r\n")
        assert r.line().startswith(b"OK")
        r.tls(lab.client_ctx)
        after = lab.until_ok(r)
        r.send(b'AUTHENTICATE "PLAIN" "' + creds + b'"\r\n')
        ok = lab.until_ok(r)
        r.close()
        return greeting, refused, after, ok

    greeting, refused, after, ok = await in_thread(talk)
    assert b'"SASL" ""\r\n' in greeting and b'"STARTTLS"\r\n' in greeting
    assert refused == [b'NO (ENCRYPT-NEEDED) "Use STARTTLS before AUTHENTICATE"\r\n']
    assert b'"SASL" "PLAIN"\r\n' in after and b'"STARTTLS"\r\n' not in after
    assert after[-1].startswith(b"OK")
    assert ok[-1].startswith(b"OK")


async def test_what_is_pipelined_behind_starttls_is_discarded(lab: SieveLab) -> None:
    """CVE-2011-0411 class: a command sent in the clear with STARTTLS is never run."""
    def talk() -> list[bytes]:
        r = Raw(lab.port)
        lab.until_ok(r)
        r.send(b'STARTTLS\r\nPUTSCRIPT "evil" {5+}\r\nkeep;\r\nLOGOUT\r\n')
        assert r.line().startswith(b"OK")
        r.tls(lab.client_ctx)
        caps = lab.until_ok(r)
        r.send(b"NOOP\r\n")
        caps.append(r.line())
        r.close()
        return caps

    lines = await in_thread(talk)
    assert lines[-2].startswith(b"OK") and lines[-1] == b'OK "Done"\r\n', lines
    assert not any(b"PUTSCRIPT" in ln or b"not allowed" in ln for ln in lines)


async def test_pipelined_commands_from_a_client_that_does_not_read_hold_little_memory(
        lab: SieveLab) -> None:
    """CAPABILITY is answered by the engine itself, with no event for the server: one read
    of pipelined CAPABILITYs (~20 answer octets per command octet) used to be answered
    whole before anything was written. The engine now parses no further command once
    ``OUTPUT_PAUSE`` of its answers wait, so the session's passes stop while the client
    does not read; every answer still comes, in order."""
    sock, reader = await in_thread(slow_client, lab.port)
    try:
        while not (await in_thread(reader.readline)).startswith(b"OK"):
            pass  # the greeting: capabilities, then OK
        (session,) = lab.server.sessions
        sock.sendall(b"CAPABILITY\r\n")
        answer = b""
        while not answer.endswith(b'OK "Capability completed"\r\n'):
            line = await in_thread(reader.readline)
            assert line, answer
            answer += line
        count = 8_000_000 // len(answer)
        await pipeline_without_reading(sock, reader, session, b"CAPABILITY\r\n", answer,
                                       count)
        sock.sendall(b"LOGOUT\r\n")
        assert (await in_thread(reader.readline)).startswith(b"OK")
    finally:
        reader.close()
        sock.close()


async def test_decision_log_lines_and_brute_force_policy_as_imap(
        lab: SieveLab, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    def talk() -> list[bytes]:
        r = lab.raw()
        r.send(b"STARTTLS\r\n")
        r.line()
        r.tls(lab.client_ctx)
        lab.until_ok(r)
        bad = base64.b64encode(f"\0{ALICE}\0wrong-secret-pw".encode())
        r.send(b'AUTHENTICATE "PLAIN" "' + bad + b'"\r\n')
        out = lab.until_ok(r)
        good = base64.b64encode(f"\0{ALICE}\0{PASSWORDS[ALICE]}".encode())
        r.send(b'AUTHENTICATE "PLAIN" {' + str(len(good)).encode() + b"+}\r\n" + good + b"\r\n")
        out += lab.until_ok(r)
        r.close()
        return out

    out = await in_thread(talk)
    assert out == [b'NO "Authentication failed"\r\n', b'OK "Logged in"\r\n']
    decisions = [r.getMessage() for r in caplog.records if r.name == "mailfort.decision"]
    assert "connect from [127.0.0.1] service=managesieve" in decisions
    assert f"auth failed from [127.0.0.1] user={ALICE}" in decisions
    assert any(d.startswith("auth ok from [127.0.0.1]") for d in decisions)
    assert "wrong-secret-pw" not in caplog.text and PASSWORDS[ALICE] not in caplog.text


async def test_idle_sessions_end_with_bye(lab_factory: Callable[..., Any]) -> None:
    """60 s before login and 600 s after by default; here a fraction of a second each."""
    lab = await lab_factory(limits=LimitsConfig(managesieve_login_timeout=0.5,
                                                managesieve_timeout=1.0))

    def idle() -> tuple[bytes, bytes]:
        r = lab.raw()
        before = r.line()
        r.close()
        r = lab.raw()
        lab.login(r)
        after = r.line()
        r.close()
        return before, after

    before, after = await in_thread(idle)
    assert before == after == b'BYE "Idle timeout, closing connection"\r\n'


# ------------------------------------------------------------------ scripts and quotas


async def test_quota_replies(lab_factory: Callable[..., Any]) -> None:
    lab = await lab_factory(SieveConfig(max_script_size=100, max_scripts=2, max_storage=150))

    def talk() -> list[list[bytes]]:
        r = lab.raw()
        lab.login(r)
        out = []
        big = b"#" * 101
        r.send(b'HAVESPACE "a" 101\r\n')
        out.append(lab.until_ok(r))
        # Refused at the {101+}, then the octets are counted away: the session goes on.
        r.send(b'PUTSCRIPT "a" {101+}\r\n' + big + b"\r\nNOOP\r\n")
        out.append(lab.until_ok(r))
        out.append(lab.until_ok(r))
        for name in (b"a", b"b", b"c"):
            r.send(b'PUTSCRIPT "' + name + b'" {6+}\r\nkeep;\n\r\n')
            out.append(lab.until_ok(r))
        r.send(b'PUTSCRIPT "a" {90+}\r\n' + b"#" * 89 + b"\n\r\n")  # 90 + 6 > 150? no: 96
        out.append(lab.until_ok(r))
        r.send(b'PUTSCRIPT "b" {90+}\r\n' + b"#" * 89 + b"\n\r\n")  # 90 + 90 > 150
        out.append(lab.until_ok(r))
        r.close()
        return out

    out = await in_thread(talk)
    assert out[0][0].startswith(b"NO (QUOTA/MAXSIZE)")
    assert out[1][0].startswith(b"NO (QUOTA/MAXSIZE)")
    assert out[2] == [b'OK "Done"\r\n']
    assert out[3][0].startswith(b"OK") and out[4][0].startswith(b"OK")
    assert out[5][0].startswith(b"NO (QUOTA/MAXSCRIPTS)")
    assert out[6][0].startswith(b"OK")
    assert out[7][0].startswith(b"NO (QUOTA/MAXSIZE)")
    assert [n for n, _ in lab.store().list()] == ["a", "b"]


async def test_script_with_a_syntax_error_is_refused_with_its_line(lab: SieveLab) -> None:
    def talk() -> list[list[bytes]]:
        r = lab.raw()
        lab.login(r)
        out = []
        for cmd in (b'PUTSCRIPT "broken" ', b"CHECKSCRIPT "):
            r.send(cmd + b"{%d+}\r\n" % len(BROKEN) + BROKEN + b"\r\n")
            out.append(lab.until_ok(r))
        r.send(b"CHECKSCRIPT {%d+}\r\n" % len(SCRIPT) + SCRIPT + b"\r\n")
        out.append(lab.until_ok(r))
        r.close()
        return out

    out = await in_thread(talk)
    for reply in out[:2]:
        assert reply == [b'NO "line 3: unknown command \'frobnicate\'"\r\n'], reply
    assert out[2][0].startswith(b"OK")
    assert lab.store().list() == []  # nothing of the broken script was stored


async def test_sieve_capability_and_includes(lab: SieveLab) -> None:
    """SIEVE lists what ``require`` accepts; an include of a script not uploaded yet does
    not refuse the upload (scripts come one at a time), one of an existing script is
    compiled with it."""
    from mailfort.protocol.sieve import SUPPORTED

    main = b'require "include";\r\ninclude :personal "later";\r\nkeep;\r\n'

    def talk() -> tuple[list[bytes], list[bytes], list[bytes]]:
        r = Raw(lab.port)
        greeting = lab.until_ok(r)
        r.send(b"STARTTLS\r\n")
        r.line()
        r.tls(lab.client_ctx)
        lab.until_ok(r)
        creds = base64.b64encode(f"\0{ALICE}\0{PASSWORDS[ALICE]}".encode())
        r.send(b'AUTHENTICATE "PLAIN" "' + creds + b'"\r\n')
        lab.until_ok(r)
        r.send(b'PUTSCRIPT "main" {%d+}\r\n' % len(main) + main + b"\r\n")
        put = lab.until_ok(r)
        r.send(b'PUTSCRIPT "later" {%d+}\r\n' % len(SCRIPT) + SCRIPT + b"\r\n")
        put += lab.until_ok(r)
        r.send(b'CHECKSCRIPT {%d+}\r\n' % len(main) + main + b"\r\n")
        checked = lab.until_ok(r)
        r.close()
        return greeting, put, checked

    greeting, put, checked = await in_thread(talk)
    assert b'"SIEVE" "' + " ".join(sorted(SUPPORTED)).encode() + b'"\r\n' in greeting
    assert all(ln.startswith(b"OK") for ln in put) and checked[0].startswith(b"OK")


async def test_managesieve_client_library(lab: SieveLab, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PyPI ``managesieve`` client: STARTTLS (verifying our CA), PLAIN, every command."""
    managesieve = pytest.importorskip("managesieve")
    monkeypatch.setenv("SSL_CERT_FILE", str(lab.ca_file))

    def talk() -> dict[str, Any]:
        m = managesieve.MANAGESIEVE("127.0.0.1", lab.port, use_tls=True, timeout=10)
        seen: dict[str, Any] = {"tls": m.supports_tls}
        seen["login"] = m.authenticate("PLAIN", ALICE, PASSWORDS[ALICE])
        seen["space"] = m.havespace("filter", len(SCRIPT))
        seen["put"] = m.putscript("filter", SCRIPT.decode())
        seen["put2"] = m.putscript("spare", "keep;\r\n")
        seen["active"] = m.setactive("filter")
        seen["list"] = m.listscripts()
        seen["get"] = m.getscript("filter")
        seen["delete_active"] = m.deletescript("filter")
        seen["delete"] = m.deletescript("spare")
        seen["logout"] = m.logout()
        return seen

    seen = await in_thread(talk)
    for key in ("login", "space", "put", "put2", "active", "delete", "logout"):
        assert "OK" in (seen[key], seen[key][0]), (key, seen[key])
    assert seen["list"] == ("OK", [("filter", True), ("spare", False)])
    assert seen["get"][0] == "OK" and seen["get"][1].encode() == SCRIPT
    assert "NO" in (seen["delete_active"], seen["delete_active"][0]), seen
    active = lab.store().active_script()
    assert active is not None and active[:2] == ("filter", SCRIPT)


async def test_sievelib_client(lab: SieveLab, monkeypatch: pytest.MonkeyPatch) -> None:
    """``sievelib``'s ManageSieve client: STARTTLS, PLAIN, put, check, rename, activate."""
    client = pytest.importorskip("sievelib.managesieve")
    monkeypatch.setenv("SSL_CERT_FILE", str(lab.ca_file))

    def talk() -> dict[str, Any]:
        c = client.Client("127.0.0.1", lab.port)
        seen: dict[str, Any] = {}
        seen["connect"] = c.connect(ALICE, PASSWORDS[ALICE], starttls=True, authmech="PLAIN")
        seen["sieve"] = c.get_sieve_capabilities()
        seen["put"] = c.putscript("main", SCRIPT.decode())
        seen["check"] = c.checkscript("keep;\r\n")
        seen["rename"] = c.renamescript("main", "renamed")
        seen["active"] = c.setactive("renamed")
        seen["list"] = c.listscripts()
        c.logout()
        return seen

    seen = await in_thread(talk)
    assert seen["connect"] and seen["put"] and seen["check"] and seen["rename"]
    assert seen["active"]
    assert seen["list"] == ("renamed", [])
    active = lab.store().active_script()
    assert active is not None and active[:2] == ("renamed", SCRIPT)


@pytest.mark.skipif(shutil.which("sieve-connect") is None, reason="sieve-connect not installed "
                    "(apt-get install sieve-connect; run-tests does)")
async def test_sieve_connect(lab: SieveLab, tmp_path: Path) -> None:
    """Debian's sieve-connect: STARTTLS with our CA, PLAIN, upload, activate, list,
    download."""
    local = tmp_path / "filter.sieve"
    local.write_bytes(SCRIPT)
    down = tmp_path / "down.sieve"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        r, w = os.pipe()
        os.write(w, PASSWORDS[ALICE].encode() + b"\n")
        os.close(w)
        try:
            return subprocess.run(
                ["sieve-connect", "--server", "127.0.0.1", "--port", str(lab.port),
                 "--user", ALICE, "--authmech", "PLAIN", "--tlscafile", str(lab.ca_file),
                 "--tlshostname", "localhost", "--passwordfd", str(r), *args],
                pass_fds=(r,), capture_output=True, text=True, timeout=30, check=False)
        finally:
            os.close(r)

    up = await in_thread(run, "--upload", "--localsieve", str(local),
                         "--remotesieve", "filter")
    assert up.returncode == 0, up.stderr
    act = await in_thread(run, "--activate", "--remotesieve", "filter")
    assert act.returncode == 0, act.stderr
    listing = await in_thread(run, "--list")
    assert listing.returncode == 0 and "filter" in listing.stdout, listing
    got = await in_thread(run, "--download", "--remotesieve", "filter", "--localsieve",
                          str(down))
    assert got.returncode == 0, got.stderr
    assert down.read_bytes() == SCRIPT
    active = lab.store().active_script()
    assert active is not None and active[:2] == ("filter", SCRIPT)


# ------------------------------------------------------------------ the node


def test_embedded_default_listens_on_24190() -> None:
    from mailfort.config import Config
    from mailfort.server.node_plan import LISTENERS

    assert Config().listen.managesieve == ["127.0.0.1:24190"]
    row = {p.name: p for p in LISTENERS}["managesieve"]
    assert row.engine == "managesieve" and not row.implicit_tls and row.plaintext_on_loopback


async def test_node_serves_managesieve(node: Any, client_ssl_context: ssl.SSLContext) -> None:
    def talk() -> list[bytes]:
        r = Raw(node.port("managesieve"))
        out = SieveLab.until_ok(r)
        r.send(b"LOGOUT\r\n")
        out.append(r.line())
        r.close()
        return out

    out = await in_thread(talk)
    assert b'"STARTTLS"\r\n' in out and out[-1].startswith(b"OK")
