"""The MX's inbound anti-abuse checks end to end: real sockets, the tests' real DNS server.

A client's source address is chosen with ``local_addr``: all of 127.0.0.0/8 is loopback on
the test machine, so a client really connecting from 127.0.0.2 is the RFC 5782 test entry.
"""

from __future__ import annotations

import asyncio
import logging
import re
import smtplib
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mailfort import config as config_mod
from mailfort.config import Config
from mailfort.server.app import Node
from tests.conftest import seed_directory
from tests.dnsserver import DNSServer
from tests.server.test_connections import connect, node_with
from tests.server.test_mx import message, read_reply, stored

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKED_2 = "554 5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test\r\n"


def decisions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mailfort.decision"]


async def refused_at_greeting(port: int, source: str, host: str = "127.0.0.1") -> str:
    """The first reply, after which the server must have closed the connection."""
    (reader, writer), first = await connect(port, host=host, source=source)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    return first


def send(port: int, source: str, rcpts: list[str]) -> dict[str, tuple[int, bytes]]:
    """One transaction; each recipient's RCPT reply; DATA only if one was accepted."""
    out = {}
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=10) as s:
        s.ehlo("client.remote.test")
        s.mail("sender@remote.test")
        for r in rcpts:
            out[r] = s.rcpt(r)
        if any(code == 250 for code, _ in out.values()):
            code, _ = s.data(message().as_string())
            out["DATA"] = (code, b"")
    return out


@pytest.fixture
def dnsbl_dns(dns_server: DNSServer) -> DNSServer:
    dns_server.rfc5782_test_entries("bl.test")
    return dns_server


# ------------------------------------------------------------------ DNSBL


async def test_listed_client_refused_unlisted_accepted(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext,
    dnsbl_dns: DNSServer, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with node_with(config_factory, server_ssl_context, dns=dnsbl_dns.config(),
                         dnsbl={"zones": [{"zone": "bl.test"}]}) as node:
        port = node.port("mx")
        assert await refused_at_greeting(port, "127.0.0.2") == BLOCKED_2
        replies = await asyncio.to_thread(send, port, "127.0.0.1", ["alice@example.test"])
        assert replies["DATA"][0] == 250
        assert len(stored(node, "alice@example.test")) == 1
    lines = decisions(caplog)
    assert "dnsbl [127.0.0.2] listed in bl.test (127.0.0.2) weight=1" in lines
    assert ("reject: CONNECT from [127.0.0.2]: 554 5.7.1 Service unavailable; "
            "client [127.0.0.2] blocked using bl.test") in lines
    assert any(line.startswith("accept: DATA from [127.0.0.1]: 250 2.0.0 OK queued as ")
               and line.endswith("from=<sender@remote.test> nrcpt=1 size=" + line.split("size=")[1])
               for line in lines)


async def test_weight_threshold(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext,
    dns_server: DNSServer,
) -> None:
    dns_server.list_ip("one.test", "127.0.0.2")  # one list only
    dns_server.list_ip("one.test", "127.0.0.3").list_ip("two.test", "127.0.0.3")  # both
    zones = [{"zone": "one.test", "weight": 1}, {"zone": "two.test", "weight": 2}]
    async with node_with(config_factory, server_ssl_context, dns=dns_server.config(),
                         dnsbl={"zones": zones, "threshold": 3}) as node:
        port = node.port("mx")
        (_, w), greeting = await connect(port, source="127.0.0.2")
        w.close()
        assert greeting.startswith("220 ")
        assert await refused_at_greeting(port, "127.0.0.3") == (
            "554 5.7.1 Service unavailable; client [127.0.0.3] blocked using two.test\r\n")


async def test_dns_timeout_fails_open_quickly(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext,
    dns_server: DNSServer, caplog: pytest.LogCaptureFixture,
) -> None:
    dns_server.timeout(DNSServer.dnsbl_name("127.0.0.2", "slow.test"))
    async with node_with(config_factory, server_ssl_context, dns=dns_server.config(),
                         dnsbl={"zones": [{"zone": "slow.test"}], "timeout": 0.3}) as node:
        start = time.monotonic()
        (_, w), greeting = await connect(node.port("mx"), source="127.0.0.2")
        w.close()
        assert greeting.startswith("220 ")
        assert 0.25 < time.monotonic() - start < 1.5
    assert "fail open" in caplog.text


async def test_ipv6_client_listed_in_nibble_form(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext,
    dns_server: DNSServer,
) -> None:
    dns_server.list_ip("v6.test", "::1")
    async with node_with(config_factory, server_ssl_context, dns=dns_server.config(),
                         listen={"mx": ["[::1]:0"]},
                         dnsbl={"zones": [{"zone": "v6.test"}]}) as node:
        first = await refused_at_greeting(node.port("mx"), "::1", host="::1")
        assert first == "554 5.7.1 Service unavailable; client [::1] blocked using v6.test\r\n"


async def test_reject_at_rcpt_still_accepts_postmaster(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext,
    dnsbl_dns: DNSServer, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with node_with(config_factory, server_ssl_context, dns=dnsbl_dns.config(),
                         dnsbl={"zones": [{"zone": "bl.test"}], "reject_at": "rcpt"}) as node:
        replies = await asyncio.to_thread(
            send, node.port("mx"), "127.0.0.2", ["bob@example.test", "postmaster@example.test"])
        code, text = replies["bob@example.test"]
        assert (code, text) == (554, b"5.7.1 Service unavailable; client [127.0.0.2] "
                                     b"blocked using bl.test")
        assert replies["postmaster@example.test"][0] == 250
        assert replies["DATA"][0] == 250
        assert len(stored(node, "alice@example.test")) == 1  # postmaster -> alice
        assert stored(node, "bob@example.test") == []
    assert ("reject: RCPT from [127.0.0.2]: 554 5.7.1 Service unavailable; client [127.0.0.2] "
            "blocked using bl.test; from=<sender@remote.test> to=<bob@example.test> "
            "helo=<client.remote.test>") in decisions(caplog)


async def test_sender_domain_blocklist(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext,
    dns_server: DNSServer, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    dns_server.list_domain("dbl.test", "remote.test")
    async with node_with(config_factory, server_ssl_context, dns=dns_server.config(),
                         dnsbl={"sender_zones": [{"zone": "dbl.test"}]}) as node:
        replies = await asyncio.to_thread(send, node.port("mx"), "127.0.0.1",
                                          ["alice@example.test"])
    assert replies["alice@example.test"] == (
        554, b"5.7.1 Service unavailable; sender domain remote.test blocked using dbl.test")
    assert ("reject: RCPT from [127.0.0.1]: 554 5.7.1 Service unavailable; sender domain "
            "remote.test blocked using dbl.test; from=<sender@remote.test> "
            "to=<alice@example.test> helo=<client.remote.test>") in decisions(caplog)


# ------------------------------------------------------------------ before the banner


async def test_pregreet_talker_refused(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with node_with(config_factory, server_ssl_context,
                         screen={"greeting_delay": 0.8}) as node:
        port = node.port("mx")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"EHLO spambot.test\r\nMAIL FROM:<a@b.test>\r\n")  # does not wait
        start = time.monotonic()
        reply = await read_reply(reader)
        assert reply == "554 5.5.1 Protocol error: client spoke before the greeting\r\n"
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert time.monotonic() - start < 0.7  # refused at once, not after the delay
        writer.close()
        # a patient client gets the banner after the delay, then a normal session
        start = time.monotonic()
        replies = await asyncio.to_thread(send, port, "127.0.0.1", ["alice@example.test"])
        assert time.monotonic() - start >= 0.75
        assert replies["DATA"][0] == 250
    assert ("reject: CONNECT from [127.0.0.1]: 554 5.5.1 Protocol error: client spoke before "
            "the greeting") in decisions(caplog)


async def test_no_screen_by_default_greets_at_once(node: Node) -> None:
    assert not node.inbound.screens_connections
    start = time.monotonic()
    (_, w), greeting = await connect(node.port("mx"))
    w.close()
    assert greeting.startswith("220 ") and time.monotonic() - start < 1.0


# ------------------------------------------------------------------ greylisting


async def test_greylisting_defers_then_accepts_across_a_restart(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    cfg = config_factory(greylist={"enabled": True, "delay": 1.0})
    seed_directory(cfg)
    async with Node(cfg, ssl_context=server_ssl_context) as node:
        first = time.monotonic()
        replies = await asyncio.to_thread(send, node.port("mx"), "127.0.0.1",
                                          ["alice@example.test"])
        assert replies == {"alice@example.test": (451, b"4.7.1 Greylisted, please try again later")}
        # too early: still deferred
        replies = await asyncio.to_thread(send, node.port("mx"), "127.0.0.1",
                                          ["alice@example.test"])
        assert replies["alice@example.test"][0] == 451
    assert (cfg.data_path / "greylist.sqlite3").exists()
    await asyncio.sleep(max(0.0, 1.05 - (time.monotonic() - first)))
    async with Node(cfg, ssl_context=server_ssl_context) as node:  # a new process's view
        replies = await asyncio.to_thread(send, node.port("mx"), "127.0.0.1",
                                          ["alice@example.test"])
        assert replies["alice@example.test"][0] == 250 and replies["DATA"][0] == 250
        assert len(stored(node, "alice@example.test")) == 1
    assert ("reject: RCPT from [127.0.0.1]: 451 4.7.1 Greylisted, please try again later; "
            "from=<sender@remote.test> to=<alice@example.test> helo=<client.remote.test>"
            ) in decisions(caplog)


async def test_greylisting_spares_authenticated_submission(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext,
) -> None:
    async with node_with(config_factory, server_ssl_context,
                         greylist={"enabled": True, "delay": 60},
                         server={"allow_plaintext_auth_on_loopback": True}) as node:
        def submit() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", node.port("submission"), timeout=10) as s:
                s.login("alice@example.test", "alice-pw")
                s.mail("alice@example.test")
                return {"bob": s.rcpt("bob@example.test")}

        assert (await asyncio.to_thread(submit))["bob"][0] == 250


# ------------------------------------------------------------------ decision log


async def test_refusals_are_logged_and_match_the_fail2ban_filter(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext,
    dnsbl_dns: DNSServer, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with node_with(config_factory, server_ssl_context, dns=dnsbl_dns.config(),
                         dnsbl={"zones": [{"zone": "bl.test"}]},
                         server={"allow_plaintext_auth_on_loopback": True}) as node:
        await refused_at_greeting(node.port("mx"), "127.0.0.2")
        replies = await asyncio.to_thread(
            send, node.port("mx"), "127.0.0.1", ["victim@foreign.test", "nobody@example.test"])
        assert replies["victim@foreign.test"][0] == 554
        assert replies["nobody@example.test"][0] == 550

        def bad_login() -> None:
            with smtplib.SMTP("127.0.0.1", node.port("submission"), timeout=10) as s, \
                    pytest.raises(smtplib.SMTPAuthenticationError):
                s.login("alice@example.test", "wrong")

        await asyncio.to_thread(bad_login)
    lines = decisions(caplog)
    expected = [
        "reject: CONNECT from [127.0.0.2]: 554 5.7.1 Service unavailable; client [127.0.0.2] "
        "blocked using bl.test",
        "reject: RCPT from [127.0.0.1]: 554 5.7.1 Relay access denied; "
        "from=<sender@remote.test> to=<victim@foreign.test> helo=<client.remote.test>",
        "reject: RCPT from [127.0.0.1]: 550 5.1.1 No such user here; "
        "from=<sender@remote.test> to=<nobody@example.test> helo=<client.remote.test>",
        "auth failed from [127.0.0.1] user=alice@example.test",
    ]
    for line in expected:
        assert line in lines
    # The README's fail2ban filter finds the client in each of them, as the log shows it.
    regexes = fail2ban_regexes()
    fmt = logging.Formatter("%(asctime)s %(name)s %(message)s")  # as `mailfort serve` logs
    shown = [fmt.format(r) for r in caplog.records if r.name == "mailfort.decision"]
    for line in expected:
        full = next(s for s in shown if s.endswith(line))
        hosts = {m.group("host") for rx in regexes if (m := rx.search(full))}
        assert hosts == {"127.0.0.2" if "127.0.0.2" in line else "127.0.0.1"}, full
    accepted = [s for s in shown if " accept: " in s or " dnsbl " in s]
    assert accepted and not any(rx.search(s) for rx in regexes for s in accepted)


async def test_blocked_login_is_logged_for_pop3_and_smtp(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Failed and blocked logins are logged once, by the one authenticator of both."""
    caplog.set_level(logging.INFO)
    async with node_with(config_factory, server_ssl_context,
                         auth={"block_after_failures": 1},
                         server={"allow_plaintext_auth_on_loopback": True}) as node:
        (reader, writer), greeting = await connect(node.port("pop3"))
        assert greeting.startswith("+OK")
        for line in (b"USER alice@example.test\r\n", b"PASS wrong\r\n"):
            writer.write(line)
            await reader.readline()
        writer.close()

        def smtp_login() -> None:
            with smtplib.SMTP("127.0.0.1", node.port("submission"), timeout=10) as s, \
                    pytest.raises(smtplib.SMTPException):
                s.login("alice@example.test", "alice-pw")

        await asyncio.to_thread(smtp_login)
    lines = decisions(caplog)
    assert "auth failed from [127.0.0.1] user=alice@example.test" in lines
    assert "auth blocked from [127.0.0.1] user=alice@example.test" in lines
    assert any(rx.search("x mailfort.decision auth blocked from [127.0.0.1] user=a")
               for rx in fail2ban_regexes())


def fail2ban_regexes() -> list[re.Pattern[str]]:
    """The failregex lines of the README's fail2ban example, <HOST> as fail2ban reads it."""
    text = README.read_text()
    block = text.split("[Definition]", 1)[1].split("ignoreregex", 1)[0]
    lines = block.split("failregex =", 1)[1].strip().splitlines()
    return [re.compile(line.strip().replace("<HOST>", r"(?P<host>[0-9A-Fa-f:.]+)"))
            for line in lines if line.strip()]


# ------------------------------------------------------------------ host name


async def test_default_hostname_is_the_machine_and_names_no_software(
    tmp_path: Path, server_ssl_context: ssl.SSLContext,
) -> None:
    cfg = config_mod.from_dict({"server": {"data_dir": str(tmp_path / "d")},
                                "listen": {"mx": ["127.0.0.1:0"], "submission": [],
                                           "submissions": [], "pop3": [], "pop3s": [],
                                           "imap": [], "imaps": [],
                                           "managesieve": []}})
    assert cfg.server.hostname == config_mod.default_hostname()
    async with Node(cfg, ssl_context=server_ssl_context) as node:
        def talk() -> tuple[bytes, bytes]:
            with smtplib.SMTP(timeout=10) as s:
                _, banner = s.connect("127.0.0.1", node.port("mx"))
                _, ehlo = s.ehlo("client.test")
                return banner, ehlo

        banner, ehlo = await asyncio.to_thread(talk)
    assert banner == f"{cfg.server.hostname} ESMTP ready".encode()
    for text in (banner, ehlo, cfg.server.hostname.encode()):
        for word in (b"mailfort", b"python", b"asyncio"):
            assert word not in text.lower()


async def test_the_engines_own_refusals_are_logged_once_each(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Syntax, sequence and line-limit refusals and the close for too many errors come from
    the protocol engine, not from a server decision: each still gets its one log line, and
    a server decision (the relay refusal) is not logged a second time."""
    caplog.set_level(logging.INFO)
    async with node_with(config_factory, server_ssl_context,
                         limits={"max_errors": 4, "soft_errors": 4}) as node:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port("mx"))
        await read_reply(reader)
        for line in (b"BOGUS\r\n", b"RCPT TO:<a@example.test>\r\n", b"EHLO c.test\r\n",
                     b"NOOP " + b"x" * 600 + b"\r\n", b"MAIL FROM:<s@remote.test>\r\n",
                     b"RCPT TO:<v@foreign.test>\r\n", b"DATA\r\n"):
            writer.write(line)
            await read_reply(reader)
        assert (await read_reply(reader)).startswith("421 4.7.0")
        writer.close()
    lines = [s for s in decisions(caplog) if s.startswith("reject:")]
    assert lines == [
        "reject: UNKNOWN from [127.0.0.1]: 500 5.5.2 Command unrecognized",
        "reject: RCPT from [127.0.0.1]: 503 5.5.1 Need MAIL command first",
        "reject: LINE from [127.0.0.1]: 500 5.5.2 Line too long; helo=<c.test>",
        "reject: RCPT from [127.0.0.1]: 554 5.7.1 Relay access denied; "
        "from=<s@remote.test> to=<v@foreign.test> helo=<c.test>",
        "reject: DATA from [127.0.0.1]: 554 5.5.1 No valid recipients; helo=<c.test>",
        "reject: SESSION from [127.0.0.1]: 421 4.7.0 Too many errors, closing connection; "
        "helo=<c.test>",
    ], lines
