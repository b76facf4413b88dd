"""The MX's anti-abuse decisions put together (policy/inbound.py), without sockets."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from mailfort import config as config_mod
from mailfort.policy import decisionlog
from mailfort.policy.inbound import PREGREET, ConnectionVerdict, InboundPolicy
from mailfort.protocol.address import Mailbox
from mailfort.protocol.replies import RELAY_DENIED, Reply
from mailfort.server.app import inbound_policy
from tests.dnsserver import DNSServer


def policy(tmp_path: Path, dns_server: DNSServer, **sections: dict[str, Any]) -> InboundPolicy:
    raw: dict[str, Any] = {"server": {"data_dir": str(tmp_path / "data")},
                           "dns": dns_server.config(timeout=1.0)}
    raw.update(sections)
    cfg = config_mod.from_dict(raw)
    cfg.data_path.mkdir(parents=True, exist_ok=True)
    return inbound_policy(cfg)


ALICE = Mailbox("alice", "example.test")
POSTMASTER = Mailbox("PostMaster", "example.test")
SENDER = Mailbox("someone", "remote.test")


async def test_listed_client_refused_at_greeting(tmp_path: Path, dns_server: DNSServer) -> None:
    dns_server.rfc5782_test_entries("bl.test")
    p = policy(tmp_path, dns_server, dnsbl={"zones": [{"zone": "bl.test"}]})
    assert p.screens_connections
    v = await p.screen_connection("127.0.0.2")
    assert v.refusal == Reply(554, "5.7.1",
                              "Service unavailable; client [127.0.0.2] blocked using bl.test")
    assert (await p.screen_connection("127.0.0.1")).refusal is None
    # IPv4 on a dual-stack socket is looked up, and named, as IPv4
    v = await p.screen_connection("::ffff:127.0.0.2")
    assert v.refusal is not None and "client [127.0.0.2]" in str(v.refusal.text)


async def test_reject_at_rcpt_spares_postmaster_and_abuse(tmp_path: Path,
                                                          dns_server: DNSServer) -> None:
    dns_server.rfc5782_test_entries("bl.test")
    p = policy(tmp_path, dns_server, dnsbl={"zones": [{"zone": "bl.test"}], "reject_at": "rcpt"})
    v = await p.screen_connection("127.0.0.2")
    assert v.refusal is None and v.dnsbl.listed and p.checks_rcpt(v)
    assert not p.checks_rcpt(await p.screen_connection("127.0.0.1"))  # nothing to do
    refusal = await p.check_rcpt("127.0.0.2", v, "h.remote.test", SENDER, ALICE)
    assert refusal is not None and refusal.code == 554 and "bl.test" in str(refusal.text)
    assert await p.check_rcpt("127.0.0.2", v, "h", SENDER, POSTMASTER) is None
    assert await p.check_rcpt("127.0.0.2", v, "h", None, Mailbox("abuse", "example.test")) is None


async def test_allow_list_skips_every_check(tmp_path: Path, dns_server: DNSServer) -> None:
    dns_server.rfc5782_test_entries("bl.test")
    p = policy(tmp_path, dns_server, dnsbl={"zones": [{"zone": "bl.test"}]},
               screen={"allow_networks": ["127.0.0.0/30"]}, greylist={"enabled": True})
    v = await p.screen_connection("127.0.0.2")
    assert v.allowed and v.refusal is None
    assert not [q for q in dns_server.queries if q[0].endswith("bl.test")]  # not even asked
    assert await p.check_rcpt("127.0.0.2", v, "h", SENDER, ALICE) is None  # no greylisting


async def test_right_hand_side_lists_at_rcpt(tmp_path: Path, dns_server: DNSServer) -> None:
    dns_server.list_domain("dbl.test", "remote.test").list_domain("hbl.test", "bad.helo.test")
    p = policy(tmp_path, dns_server, dnsbl={"sender_zones": [{"zone": "dbl.test"}],
                                     "helo_zones": [{"zone": "hbl.test"}]})
    assert not p.screens_connections  # nothing to look up before the banner
    conn = ConnectionVerdict()
    r = await p.check_rcpt("192.0.2.1", conn, "good.test", SENDER, ALICE)
    assert r == Reply(554, "5.7.1",
                      "Service unavailable; sender domain remote.test blocked using dbl.test")
    r = await p.check_rcpt("192.0.2.1", conn, "bad.helo.test", Mailbox("a", "ok.test"), ALICE)
    assert r is not None and r.code == 554 and "HELO name blocked using hbl.test" in str(r.text)
    assert await p.check_rcpt("192.0.2.1", conn, "good.test", Mailbox("a", "ok.test"),
                              ALICE) is None
    assert await p.check_rcpt("192.0.2.1", conn, "bad.helo.test", SENDER, POSTMASTER) is None


async def test_greylisting_after_the_blocklists(tmp_path: Path, dns_server: DNSServer) -> None:
    p = policy(tmp_path, dns_server, greylist={"enabled": True, "delay": 0.0})
    conn = ConnectionVerdict()
    assert p.checks_rcpt(conn) and not p.checks_rcpt(ConnectionVerdict(allowed=True))
    first = await p.check_rcpt("192.0.2.1", conn, "h", SENDER, ALICE)
    assert first == Reply(451, "4.7.1", "Greylisted, please try again later")
    assert await p.check_rcpt("192.0.2.1", conn, "h", SENDER, ALICE) is None
    p.close()


async def test_greeting_delay_runs_beside_the_lookups(tmp_path: Path,
                                                      dns_server: DNSServer) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    cfg = config_mod.from_dict({"screen": {"greeting_delay": 3.0},
                                "server": {"data_dir": str(tmp_path)}})
    p = InboundPolicy(cfg, None, None, sleep=sleep)
    assert p.screens_connections
    assert (await p.screen_connection("192.0.2.1")).refusal is None
    assert slept == [3.0]
    assert PREGREET.code == 554 and PREGREET.enhanced == "5.5.1"


def test_log_lines_cannot_be_forged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mailfort.decision")
    decisionlog.reject("RCPT", "192.0.2.1", RELAY_DENIED, from_="x\r\nreject: RCPT from [6.6.6.6]",
                       to="b@y.test")
    decisionlog.auth_failed("192.0.2.1", "bob [10.0.0.1]\n")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "reject: RCPT from [192.0.2.1]: 554 5.7.1 Relay access denied; "
        "from=<x??reject: RCPT from ?6.6.6.6?> to=<b@y.test>",
        "auth failed from [192.0.2.1] user=bob ?10.0.0.1??",
    ]
    assert decisionlog.clean("a" * 300).endswith("...") and len(decisionlog.clean("a" * 300)) == 203
