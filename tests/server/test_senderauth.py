"""Sender authentication end to end: real sockets, real clients, the real loopback DNS.

SPF at MAIL FROM, DKIM and DMARC at the end of data, the Authentication-Results field,
forged ones removed, DMARC policies enforced; and mail that mailfort's submission signs,
delivered through the outbound queue to a second mailfort's MX, verifying there.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import functools
import logging
import smtplib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest

from mailfort.config import Config
from mailfort.policy.dkim import KeyStore, ed25519_seed
from mailfort.server.app import Node
from mailfort.store.maildir import maildir_for
from tests.conftest import make_config, seed_directory
from tests.dnsserver import DNSServer
from tests.server.test_mx import stored
from tests.server.test_outbound import FAST_QUEUE, submit, wait_for
from tests.store.test_maildir import holding

ALICE = "alice@example.test"
NodeFactory = Callable[..., Any]


@pytest.fixture
async def mx(tmp_path: Path, dns_server: DNSServer,
             server_ssl_context: ssl.SSLContext) -> AsyncIterator[NodeFactory]:
    """``await mx(name, **sections)``: a started node on the test DNS server."""
    async with contextlib.AsyncExitStack() as stack:

        async def factory(name: str = "a", **sections: dict[str, Any]) -> Node:
            cfg = make_config(tmp_path / name, dns=dns_server.config(timeout=1.0), **sections)
            seed_directory(cfg)
            return await stack.enter_async_context(Node(cfg, ssl_context=server_ssl_context))

        yield factory


def letter(frm: str, body: str = "hello\n", extra: dict[str, str] | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = frm
    msg["To"] = ALICE
    msg["Subject"] = "sender auth"
    for k, v in (extra or {}).items():
        msg[k] = v
    msg.set_content(body)
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def send(port: int, sender: str, data: bytes, rcpt: str = ALICE,
         helo: str = "client.remote.test") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo(helo)
        s.sendmail(sender, [rcpt], data)


def auth_results(raw: bytes) -> str:
    """Our Authentication-Results field, unfolded."""
    fields = email.message_from_bytes(raw).get_all("Authentication-Results") or []
    return " ".join(" ".join(f.split()) for f in fields)


def spf_records(dns: DNSServer) -> None:
    dns.add_txt("pass.test", "v=spf1 ip4:127.0.0.1 -all")
    dns.add_txt("fail.test", "v=spf1 ip4:192.0.2.1 -all")
    dns.add_txt("soft.test", "v=spf1 ~all")
    chain = " ".join(f"include:i{n}.perm.test" for n in range(11))
    dns.add_txt("perm.test", f"v=spf1 {chain} ip4:127.0.0.1 -all")
    for n in range(11):
        dns.add_txt(f"i{n}.perm.test", "v=spf1 -all")


async def test_spf_results_are_reported(mx: NodeFactory, dns_server: DNSServer) -> None:
    spf_records(dns_server)
    dns_server.add_txt("client.remote.test", "v=spf1 ip4:127.0.0.1 -all")
    node = await mx()
    port = node.port("mx")
    for dom in ("pass", "fail", "soft", "perm"):
        await asyncio.to_thread(send, port, f"a@{dom}.test", letter(f"a@{dom}.test"))
    # Maildir names do not sort in arrival order: find each by its sender.
    got = {ar.split("smtp.mailfrom=a@")[1].split(".")[0]: ar
           for ar in map(auth_results, stored(node, ALICE))}
    assert sorted(got) == ["fail", "pass", "perm", "soft"]
    for dom, expected in (("pass", "pass"), ("fail", "fail"), ("soft", "softfail"),
                          ("perm", "permerror")):
        ar = got[dom]
        assert ar.startswith("mx.example.test;"), ar
        assert "spf=pass smtp.helo=client.remote.test" in ar
        assert f"spf={expected}" in ar, ar
        assert "dkim=none" in ar and "dmarc=none" in ar
    assert "lookups" in got["perm"]  # the permerror says why: over the lookup limit


async def test_each_accepted_message_logs_its_checks_then_its_acceptance(
    mx: NodeFactory, dns_server: DNSServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Both lines are written after the checks and the 250 (off the path to the reply):
    still one of each per message, the checks' first, with what they said."""
    caplog.set_level(logging.INFO, logger="mailfort")
    spf_records(dns_server)
    node = await mx()
    for n in range(3):
        await asyncio.to_thread(send, node.port("mx"), f"a{n}@pass.test", letter("a@pass.test"))
    await asyncio.sleep(0)  # a line scheduled by the last session's end
    lines = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith(("sender-auth [", "accept: DATA"))]
    assert len(lines) == 6, lines
    for n in range(3):
        checks, accepted = lines[2 * n], lines[2 * n + 1]
        assert checks.startswith(f"sender-auth [127.0.0.1] from=<a{n}@pass.test> "), checks
        assert "spf.mailfrom=pass" in checks and " -> " not in checks, checks
        assert accepted.startswith("accept: DATA from [127.0.0.1]: 250 2.0.0"), accepted
        assert f"from=<a{n}@pass.test> nrcpt=1" in accepted, accepted
    assert len(stored(node, ALICE)) == 3


async def test_spf_fail_is_refused_at_mail_from_when_configured(
    mx: NodeFactory, dns_server: DNSServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailfort")
    spf_records(dns_server)
    node = await mx(sender_auth={"spf_fail": "reject"})
    port = node.port("mx")
    with pytest.raises(smtplib.SMTPSenderRefused) as exc:
        await asyncio.to_thread(send, port, "a@fail.test", letter("a@fail.test"))
    assert exc.value.smtp_code == 550 and exc.value.smtp_error.startswith(b"5.7.23")
    # softfail is not fail; and the same server goes on serving.
    await asyncio.to_thread(send, port, "a@soft.test", letter("a@soft.test"))
    assert len(stored(node, ALICE)) == 1
    assert any("reject: MAIL from [127.0.0.1]: 550 5.7.23" in r.getMessage()
               for r in caplog.records)


def dmarc_records(dns: DNSServer) -> None:
    dns.add_txt("_dmarc.rej.test", "v=DMARC1; p=reject")
    dns.add_txt("_dmarc.quar.test", "v=DMARC1; p=quarantine")
    dns.add_txt("_dmarc.mon.test", "v=DMARC1; p=none")
    dns.add_txt("rej.test", "v=spf1 ip4:127.0.0.1 -all")
    dns.add_txt("bounce.rej.test", "v=spf1 ip4:127.0.0.1 -all")
    dns.add_txt("spfok.test", "v=spf1 ip4:127.0.0.1 -all")


async def test_dmarc_reject_quarantine_none_aligned_and_unaligned(
    mx: NodeFactory, dns_server: DNSServer
) -> None:
    dmarc_records(dns_server)
    node = await mx()
    port = node.port("mx")

    async def outcome(sender: str, frm: str) -> str:
        before = set(stored(node, ALICE))
        try:
            await asyncio.to_thread(send, port, sender, letter(frm))
        except smtplib.SMTPDataError as exc:
            return f"{exc.smtp_code} {exc.smtp_error.decode()}"
        (new,) = set(stored(node, ALICE)) - before
        return auth_results(new) + " " + (
            email.message_from_bytes(new).get("X-Quarantine") or "-")

    # Unaligned: SPF passes, but for another domain than From:.
    refused = await outcome("a@spfok.test", "a@rej.test")
    assert refused.startswith("550 5.7.1") and "DMARC" in refused, refused
    assert len(stored(node, ALICE)) == 0
    aligned = await outcome("a@rej.test", "a@rej.test")
    assert "dmarc=pass (p=reject dis=none) header.from=rej.test" in aligned, aligned
    relaxed = await outcome("b@bounce.rej.test", "a@rej.test")  # same organisational domain
    assert "dmarc=pass" in relaxed, relaxed
    quarantined = await outcome("a@spfok.test", "a@quar.test")
    assert "dmarc=fail (p=quarantine dis=quarantine) header.from=quar.test" in quarantined
    assert quarantined.endswith("dmarc=fail policy=quarantine header.from=quar.test")
    monitored = await outcome("a@spfok.test", "a@mon.test")
    assert "dmarc=fail (p=none dis=none)" in monitored and monitored.endswith(" -")
    assert len(stored(node, ALICE)) == 4


async def test_quarantine_into_junk_and_enforcement_off(
    mx: NodeFactory, dns_server: DNSServer
) -> None:
    dmarc_records(dns_server)
    junk = await mx("junk", sender_auth={"quarantine": "junk"})
    await asyncio.to_thread(send, junk.port("mx"), "a@spfok.test", letter("a@quar.test"))
    box = maildir_for(junk.cfg.mail_path, ALICE)
    assert stored(junk, ALICE) == []
    (filed,) = list((box / ".Junk" / "new").iterdir())
    assert b"X-Quarantine: dmarc=fail" in filed.read_bytes()
    lax = await mx("lax", sender_auth={"dmarc_enforce": False})
    await asyncio.to_thread(send, lax.port("mx"), "a@spfok.test", letter("a@rej.test"))
    (kept,) = stored(lax, ALICE)
    assert "dmarc=fail (p=reject dis=reject)" in auth_results(kept)


async def test_forged_authentication_results_are_removed(
    mx: NodeFactory, dns_server: DNSServer
) -> None:
    node = await mx()
    forged = letter("a@bank.test", extra={
        "Authentication-Results": "mx.example.test; dkim=pass header.d=bank.test"})
    forged = forged.replace(
        b"Subject:", b"Authentication-Results: (ours?)\r\n MX.Example.Test.;\r\n dmarc=pass\r\n"
        b"Authentication-Results: mx.elsewhere.test; spf=pass\r\nSubject:", 1)
    await asyncio.to_thread(send, node.port("mx"), "a@bank.test", forged)
    (raw,) = stored(node, ALICE)
    fields = email.message_from_bytes(raw).get_all("Authentication-Results")
    assert len(fields) == 2, fields
    assert fields[0].split(";")[0].strip() == "mx.example.test"  # ours
    assert "dkim=none" in fields[0] and "header.d=bank.test" not in raw.decode()
    assert fields[1] == "mx.elsewhere.test; spf=pass"  # someone else's: kept


async def test_dns_failure_fails_open_quickly(
    config_factory: Callable[..., Config], server_ssl_context: ssl.SSLContext
) -> None:
    """The default test config's DNS refuses everything: accepted, temperror reported."""
    cfg = config_factory()
    seed_directory(cfg)
    async with Node(cfg, ssl_context=server_ssl_context) as node:
        t0 = time.monotonic()
        await asyncio.to_thread(send, node.port("mx"), "a@rej.test", letter("a@rej.test"))
        assert time.monotonic() - t0 < 2.0
        (raw,) = stored(node, ALICE)
    ar = auth_results(raw)
    assert "spf=temperror" in ar and "dmarc=temperror" in ar, ar


async def test_submission_is_signed_and_verifies_at_another_mailfort_mx(
    mx: NodeFactory, dns_server: DNSServer, client_ssl_context: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    # Node b: the MX of remote.test (user carol); node a: example.test, where alice submits.
    b = await mx("b", server={"hostname": "mx.remote.test"})
    b.directory.add_domain("remote.test")
    b.directory.add_user("carol@remote.test", "$argon2id$unused")  # never logs in
    dns_server.add_mx("remote.test", "mx1.remote.test")
    dns_server.add_a("mx1.remote.test", "127.0.0.1")
    # The keys of a, created as `mailfort dkim keygen` does, and what it says to publish.
    a_cfg_dir = tmp_path / "a"  # node a's data_dir (see the mx fixture)
    keys = KeyStore(a_cfg_dir)
    for sel, alg in (("r1", "rsa"), ("e1", "ed25519")):
        key = keys.generate("example.test", sel, alg)
        dns_server.add_txt(key.dns_name, key.dns_record())
    dns_server.add_txt("example.test", "v=spf1 ip4:127.0.0.1 -all")
    dns_server.add_txt("_dmarc.example.test", "v=DMARC1; p=reject")
    a = await mx("a", queue={**FAST_QUEUE, "mx_port": b.port("mx")},
                 delivery={"allow_private_destinations": True})  # b listens on loopback
    assert a.cfg.data_path == a_cfg_dir

    msg = EmailMessage()
    msg["From"] = ALICE
    msg["To"] = "carol@remote.test"
    msg["Subject"] = "signed"
    msg.set_content("a body that must not change\n")
    await asyncio.to_thread(submit, a.port("submission"), client_ssl_context, msg,
                            ["carol@remote.test"])
    await wait_for(lambda: len(stored(b, "carol@remote.test")) == 1, "delivered to b")
    (raw,) = stored(b, "carol@remote.test")
    ar = auth_results(raw)
    assert ar.startswith("mx.remote.test;")
    assert "dkim=pass header.d=example.test header.s=r1 header.a=rsa-sha256" in ar, ar
    assert "dkim=pass header.d=example.test header.s=e1 header.a=ed25519-sha256" in ar, ar
    assert "spf=pass smtp.mailfrom=alice@example.test" in ar
    assert "dmarc=pass" in ar

    def txt(name: bytes, timeout: int = 5) -> bytes | None:
        rec = dns_server.records.get(name.decode().rstrip(".").lower(), [])
        return b"".join(b"".join(r[2].data) for r in rec if r[0] == "TXT") or None

    assert dkimpy.verify(raw, dnsfunc=txt), "dkimpy alone verifies the stored file"

    # The same message with its body changed: DKIM fails at b's MX; sent from an
    # unaligned envelope, DMARC p=reject refuses it; from an aligned one, it is stored
    # with dkim=fail.
    tampered = raw.replace(b"must not change", b"has been changed")
    body_start = tampered.index(b"DKIM-Signature:")
    tampered = tampered[body_start:]  # without b's own trace and result fields
    with pytest.raises(smtplib.SMTPDataError) as exc:
        await asyncio.to_thread(send, b.port("mx"), "x@elsewhere.test", tampered,
                                "carol@remote.test")
    assert exc.value.smtp_code == 550
    await asyncio.to_thread(send, b.port("mx"), ALICE, tampered, "carol@remote.test")
    (again,) = set(stored(b, "carol@remote.test")) - {raw}
    second = auth_results(again)
    assert "dkim=fail" in second and "dkim=pass" not in second, second
    assert "dmarc=pass" in second  # by the aligned SPF pass alone
    assert not dkimpy.verify(again, dnsfunc=txt)


async def test_submission_cannot_hand_a_local_user_our_results(
    mx: NodeFactory, client_ssl_context: ssl.SSLContext
) -> None:
    node = await mx()
    msg = EmailMessage()
    msg["From"] = ALICE
    msg["To"] = "bob@example.test"
    msg["Subject"] = "trust me"
    msg["Authentication-Results"] = "mx.example.test; dmarc=pass header.from=bank.test"
    msg.set_content("hi\n")
    await asyncio.to_thread(submit, node.port("submission"), client_ssl_context, msg,
                            ["bob@example.test"])
    (raw,) = stored(node, "bob@example.test")
    assert b"Authentication-Results" not in raw and b"trust me" in raw


def raw_letter(fields: bytes, body: bytes = b"hello\r\n") -> bytes:
    return fields + b"To: alice@example.test\r\nSubject: sender auth\r\n\r\n" + body


def outcome(port: int, sender: str, data: bytes) -> str:
    """"250", or the code and text of the refusal at the end of data."""
    try:
        send(port, sender, data)
    except smtplib.SMTPDataError as exc:
        return f"{exc.smtp_code} {exc.smtp_error.decode()}"
    return "250"


JUNK_SIGNATURE = ("DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d={d}; s={s};\r\n"
                  "\th=from:to:subject; bh=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=;\r\n"
                  "\tb=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n")


async def test_only_aligned_temporary_errors_count_for_dmarc(
    mx: NodeFactory, dns_server: DNSServer
) -> None:
    """Issue 24 #3: an attacker's identifiers that fail to resolve (DKIM d=evil.test, MAIL
    FROM a@evil2.test) say nothing about bank.test: DMARC fails and p=reject refuses. Only
    an aligned identifier's temporary error defers, 451 4.7.5, for the sender to retry."""
    dns_server.add_txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    dns_server.add_txt("bank.test", "v=spf1 ip4:192.0.2.1 -all")
    dns_server.add_txt("_dmarc.watch.test", "v=DMARC1; p=none")
    dns_server.add_txt("spfok.test", "v=spf1 ip4:127.0.0.1 -all")
    for name in ("sel._domainkey.evil.test", "evil2.test", "sel._domainkey.bank.test",
                 "sel._domainkey.watch.test"):
        dns_server.servfail(name)
    node = await mx()
    port = node.port("mx")
    forged = b"From: CEO <ceo@bank.test>\r\n"

    def junk(d: str) -> bytes:
        return JUNK_SIGNATURE.format(d=d, s="sel").encode()

    assert (await asyncio.to_thread(outcome, port, "a@spfok.test", raw_letter(forged))
            ).startswith("550 5.7.1")
    unaligned_dkim = await asyncio.to_thread(outcome, port, "a@spfok.test",
                                             raw_letter(junk("evil.test") + forged))
    assert unaligned_dkim.startswith("550 5.7.1"), unaligned_dkim
    unaligned_spf = await asyncio.to_thread(outcome, port, "a@evil2.test", raw_letter(forged))
    assert unaligned_spf.startswith("550 5.7.1"), unaligned_spf
    assert stored(node, ALICE) == []
    # Aligned: bank.test's own selector (or its SPF) could not be looked up: retry later.
    aligned_dkim = await asyncio.to_thread(outcome, port, "a@spfok.test",
                                           raw_letter(junk("bank.test") + forged))
    assert aligned_dkim.startswith("451 4.7.5"), aligned_dkim
    dns_server.servfail("bank.test")
    aligned_spf = await asyncio.to_thread(outcome, port, "x@bank.test", raw_letter(forged))
    assert aligned_spf.startswith("451 4.7.5"), aligned_spf
    assert stored(node, ALICE) == []
    # p=none: nothing to retry for; accepted and reported.
    watch = b"From: w@watch.test\r\n"
    assert await asyncio.to_thread(outcome, port, "a@spfok.test",
                                   raw_letter(junk("watch.test") + watch)) == "250"
    (kept,) = stored(node, ALICE)
    assert "dkim=temperror" in auth_results(kept) and "dmarc=temperror" in auth_results(kept)


@pytest.mark.parametrize("fields", [
    b"From: ceo@bank.test\r\nFrom: a@spfok.test\r\n",  # the attacker's second From:
    b"From: a@spfok.test\r\nFrom : ceo@bank.test\r\n",  # obsolete syntax, still a From:
    b"From: <ceo@bank.test>, undisclosed:;\r\n",  # a group beside the address
    b"From: undisclosed:;\r\n",
    b"From: a@spfok.test, ceo@bank.test\r\n",
    b"From: a@spfok.test (\\() ceo@bank.test\r\n",  # not one address: unreadable
], ids=["two", "obsolete", "group", "empty-group", "two-addresses", "garbage"])
async def test_from_must_be_one_field_with_one_address(
    mx: NodeFactory, dns_server: DNSServer, fields: bytes
) -> None:
    """Issue 24 #4, RFC 7489 §6.6.1: DMARC cannot judge such a message; refused, even
    when the sender's SPF passes for one of the addresses."""
    dns_server.add_txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    dns_server.add_txt("spfok.test", "v=spf1 ip4:127.0.0.1 -all")
    node = await mx()
    got = await asyncio.to_thread(outcome, node.port("mx"), "a@spfok.test", raw_letter(fields))
    assert got.startswith("550 5.7.1") and "From:" in got, got
    assert stored(node, ALICE) == []
    fine = b"From: \"Spf, Ok\" (comment \\) here) <a@spfok.test>\r\n"
    assert await asyncio.to_thread(outcome, node.port("mx"), "a@spfok.test",
                                   raw_letter(fine)) == "250"


@pytest.mark.parametrize("data", [
    raw_letter(b""),  # To: and Subject: only
    raw_letter(b"Sender: ceo@bank.test\r\nResent-From: a@spfok.test\r\n"),  # no From: still
    raw_letter(b"X-From: ceo@bank.test\r\n"),  # a name that only ends in "From"
    b"\r\nno header section at all\r\n",
    raw_letter(b"", (b"x" * 998 + b"\r\n") * 5),  # over dkim_max_bytes: read as it streams
], ids=["none", "sender-only", "x-from", "body-only", "over-dkim-max-bytes"])
async def test_message_without_from_is_refused(
    mx: NodeFactory, dns_server: DNSServer, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    """RFC 5322 §3.6 requires exactly one From: and RFC 7489 §6.6.1 says a message DMARC
    cannot judge is typically rejected: with no From: a reader shows whatever it likes as
    the author. Refused 550 5.7.1 with a reason, stored nowhere, even with SPF passing
    (it used to be stored with dmarc=permerror)."""
    dns_server.add_txt("spfok.test", "v=spf1 ip4:127.0.0.1 -all")
    node = await mx(sender_auth={"dkim_max_bytes": 2000})
    with caplog.at_level(logging.INFO, logger="mailfort.senderauth"):
        got = await asyncio.to_thread(outcome, node.port("mx"), "a@spfok.test", data)
    assert got.startswith("550 5.7.1") and "no From:" in got, got
    assert stored(node, ALICE) == []
    assert any("from=none -> 550 5.7.1" in r.getMessage() for r in caplog.records)
    # The same message with a From: is accepted.
    assert await asyncio.to_thread(outcome, node.port("mx"), "a@spfok.test",
                                   b"From: a@spfok.test\r\n" + data) == "250"
    assert len(stored(node, ALICE)) == 1


FORGED_AR = b"Authentication-Results: mx.example.test; dkim=pass header.d=bank.test; dmarc=pass\r\n"


async def test_header_section_is_bounded_and_forgeries_removed_wherever_they_are(
    mx: NodeFactory, dns_server: DNSServer
) -> None:
    """Issue 24 #5a: a forged field below 2 MiB of padding used to be kept (the scan gave up
    after 1 MiB). A header section over 1 MiB is refused, 552 5.3.4; under it, a forgery
    at its very end is removed."""
    node = await mx()
    port = node.port("mx")
    lines = [b"X-Pad-%05d: %s\r\n" % (i, b"p" * 900) for i in range(2300)]  # 914 each
    pad = b"".join(lines)  # 2 MiB
    big = raw_letter(b"From: a@remote.test\r\n" + pad + FORGED_AR)
    got = await asyncio.to_thread(outcome, port, "a@remote.test", big)
    assert got.startswith("552 5.3.4"), got
    assert stored(node, ALICE) == []
    under = raw_letter(b"From: a@remote.test\r\n" + b"".join(lines[:1100]) + FORGED_AR)
    assert await asyncio.to_thread(outcome, port, "a@remote.test", under) == "250"
    (raw,) = stored(node, ALICE)
    assert b"header.d=bank.test" not in raw and raw.count(b"X-Pad-") > 1000


@pytest.mark.parametrize("forged", [
    b"Authentication-Results: (\\() mx.example.test; dkim=pass; dmarc=pass\r\n",
    b"Authentication-Results: (a (b \\) c) d) mx.example.test; dmarc=pass\r\n",
    b"Authentication-Results : mx.example.test; dmarc=pass\r\n",
    b"Authentication-Results: (\\) mx.example.test; ) other.test; dmarc=pass\r\n",
    b"Authentication-Results: (unterminated mx.example.test; dmarc=pass\r\n",
    b"Authentication-Results: \"mx.example.test\"; dmarc=pass\r\n",
], ids=["quoted-pair", "nested", "obsolete-name", "naive-reading", "unterminated", "quoted"])
async def test_forged_results_behind_comments_are_removed(
    mx: NodeFactory, forged: bytes
) -> None:
    """Issue 24 #5b: comments hold quoted-pairs and nest (RFC 5322 §3.2.2); a field that
    any reader could take for ours is removed, and ours is the only one left."""
    node = await mx()
    await asyncio.to_thread(send, node.port("mx"), "a@remote.test",
                            raw_letter(b"From: a@remote.test\r\n" + forged))
    (raw,) = stored(node, ALICE)
    client_part = raw.split(b"\r\nFrom: a@remote.test\r\n", 1)[1]
    assert b"dmarc=pass" not in client_part, raw.decode()
    fields = email.message_from_bytes(raw).get_all("Authentication-Results")
    assert len(fields) == 1 and fields[0].startswith("mx.example.test;"), fields


async def test_dkim_length_tag_short_of_the_body_is_no_pass(
    mx: NodeFactory, dns_server: DNSServer, tmp_path: Path
) -> None:
    """Issue 24 #6: bank.test signed with l=; a phishing paragraph appended after the
    signed length must not keep dkim=pass nor make dmarc=pass."""
    dns_server.add_txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    dns_server.add_txt("spfok.test", "v=spf1 ip4:127.0.0.1 -all")
    key = KeyStore(tmp_path / "keys").generate("bank.test", "s1", "ed25519")
    dns_server.add_txt(key.dns_name, key.dns_record())
    seed = ed25519_seed(key.path.read_bytes())
    assert seed is not None
    original = raw_letter(b"From: ceo@bank.test\r\n", b"Your statement is ready.\r\n")
    signature = dkimpy.sign(original, b"s1", b"bank.test", base64.b64encode(seed),
                            signature_algorithm=b"ed25519-sha256", length=True,
                            include_headers=[b"from", b"to", b"subject"], linesep=b"\r\n")
    assert b" l=" in signature
    node = await mx()
    port = node.port("mx")
    # As signed (l= covers the whole body): a pass, aligned, accepted.
    assert await asyncio.to_thread(outcome, port, "a@spfok.test", signature + original) == "250"
    (kept,) = stored(node, ALICE)
    assert "dkim=pass" in auth_results(kept) and "dmarc=pass" in auth_results(kept)
    phished = signature + original + b"\r\nUrgent: wire the money to IBAN XX00 0000.\r\n"
    got = await asyncio.to_thread(outcome, port, "a@spfok.test", phished)
    assert got.startswith("550 5.7.1") and "DMARC" in got, got
    assert len(stored(node, ALICE)) == 1


async def test_forgeries_are_removed_when_sender_checks_are_off(mx: NodeFactory) -> None:
    """With ``sender_auth.enabled = false`` the MX writes no result, but a filter that
    trusts our authserv-id must still never find one it did not write (RFC 8601 §5)."""
    node = await mx(sender_auth={"enabled": False})
    await asyncio.to_thread(send, node.port("mx"), "a@remote.test",
                            raw_letter(b"From: a@remote.test\r\n" + FORGED_AR
                                       + b"Authentication-Results: other.test; spf=pass\r\n"))
    (raw,) = stored(node, ALICE)
    assert b"dmarc=pass" not in raw
    assert email.message_from_bytes(raw).get_all("Authentication-Results") == [
        "other.test; spf=pass"]


async def test_messages_too_large_for_dkim_are_still_checked_and_cleaned(
    mx: NodeFactory, dns_server: DNSServer, client_ssl_context: ssl.SSLContext
) -> None:
    """Over ``dkim_max_bytes`` nothing is signed, but the From: rule holds and forged
    results are removed, on the MX and on submission alike."""
    dns_server.add_txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    node = await mx(sender_auth={"dkim_max_bytes": 2000})
    body = b"x" * 998 + b"\r\n"
    two = raw_letter(b"From: ceo@bank.test\r\nFrom: a@remote.test\r\n", body * 5)
    got = await asyncio.to_thread(outcome, node.port("mx"), "a@remote.test", two)
    assert got.startswith("550 5.7.1"), got
    await asyncio.to_thread(send, node.port("mx"), "a@remote.test",
                            raw_letter(b"From: a@remote.test\r\n" + FORGED_AR, body * 5))
    (raw,) = stored(node, ALICE)
    assert b"dmarc=pass" not in raw and "dkim=none" in auth_results(raw)
    msg = EmailMessage()
    msg["From"] = ALICE
    msg["To"] = "bob@example.test"
    msg["Subject"] = "big"
    msg["Authentication-Results"] = "mx.example.test; dmarc=pass header.from=bank.test"
    msg.set_content(("y" * 70 + "\n") * 40)
    await asyncio.to_thread(submit, node.port("submission"), client_ssl_context, msg,
                            ["bob@example.test"])
    (sub,) = stored(node, "bob@example.test")
    assert b"Authentication-Results" not in sub and len(sub) > 2000


def big_body(lines: int) -> bytes:
    """A body with what canonicalisation changes: runs of white space inside and at the
    ends of lines, tabs, empty lines inside and at the end."""
    one = (b"Line %05d:\t two  spaces,\ttab , trailing   \r\n"
           b"    indented\r\n\r\n \t \r\n" + b"z" * 900 + b"\r\n")
    return b"".join(one.replace(b"%05d", b"%05d" % i) for i in range(lines)) + b"\r\n\r\n"


async def test_large_messages_are_verified_as_they_stream(
    mx: NodeFactory, dns_server: DNSServer, tmp_path: Path
) -> None:
    """A forged From: padded past ``dkim_max_bytes`` used to get dkim=neutral, dmarc=none
    and reach the inbox (bank.test publishes p=reject). Now a large message's DKIM is
    verified as it streams from the spool: the forgery is refused, 550 5.7.1, while
    large mail that bank.test signed (relaxed and simple, RSA and Ed25519) or sends
    from an SPF-aligned envelope is delivered, and a large message altered after
    signing, or signed with an l= short of its body, is refused."""
    dns_server.add_txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    dns_server.add_txt("spfok.test", "v=spf1 ip4:127.0.0.1 -all")
    dns_server.add_txt("news.bank.test", "v=spf1 ip4:127.0.0.1 -all")
    keys = KeyStore(tmp_path / "keys")
    rsa_key = keys.generate("bank.test", "r1", "rsa")
    ed_key = keys.generate("bank.test", "e1", "ed25519")
    for key in (rsa_key, ed_key):
        dns_server.add_txt(key.dns_name, key.dns_record())
    seed = ed25519_seed(ed_key.path.read_bytes())
    assert seed is not None
    node = await mx(sender_auth={"dkim_max_bytes": 2000})
    port = node.port("mx")
    headers = b"From: CEO <ceo@bank.test>\r\n"
    small, large = big_body(3), big_body(1200)  # about 3 KB and 1.2 MiB (several chunks)

    def signed(body: bytes, canon: bytes, *, length: bool = False) -> bytes:
        message = raw_letter(headers, body)
        rsa_sig = dkimpy.sign(message, b"r1", b"bank.test", rsa_key.path.read_bytes(),
                              canonicalize=(canon, canon), include_headers=[b"from", b"to"],
                              length=length, linesep=b"\r\n")
        ed_sig = dkimpy.sign(message, b"e1", b"bank.test", base64.b64encode(seed),
                             signature_algorithm=b"ed25519-sha256", length=length,
                             canonicalize=(canon, canon), include_headers=[b"from", b"to"],
                             linesep=b"\r\n")
        return rsa_sig + ed_sig + message

    async def deliver(sender: str, data: bytes) -> str:
        assert len(data) > 2000  # over dkim_max_bytes: streamed
        before = set(stored(node, ALICE))
        got = await asyncio.to_thread(outcome, port, sender, data)
        if got != "250":
            return got
        (new,) = set(stored(node, ALICE)) - before
        return auth_results(new)

    for body in (small, large):
        forged = await deliver("a@spfok.test", raw_letter(headers, body))
        assert forged.startswith("550 5.7.1") and "DMARC" in forged, forged
    assert stored(node, ALICE) == []
    for canon in (b"relaxed", b"simple"):
        for body in (small, large):
            ar = await deliver("a@spfok.test", signed(body, canon))
            assert "dkim=pass header.d=bank.test header.s=r1" in ar, (canon, ar)
            assert "dkim=pass header.d=bank.test header.s=e1" in ar, (canon, ar)
            assert "dmarc=pass" in ar, ar
    assert len(stored(node, ALICE)) == 4
    # Altered after signing: one letter near the end of 1.2 MiB; or text added after l=.
    tampered = signed(large, b"relaxed").replace(b"Line 01199", b"Line 01190")
    assert (await deliver("a@spfok.test", tampered)).startswith("550 5.7.1")
    appended = signed(small, b"simple", length=True) + b"Wire the money today.\r\n"
    assert (await deliver("a@spfok.test", appended)).startswith("550 5.7.1")
    assert len(stored(node, ALICE)) == 4
    # Unsigned but from an SPF-aligned envelope: DMARC passes by SPF.
    spf = await deliver("letters@news.bank.test", raw_letter(headers, large))
    assert "spf=pass smtp.mailfrom=letters@news.bank.test" in spf and "dmarc=pass" in spf


async def test_large_signed_message_is_rewritten_whole_with_forgeries_removed(
    mx: NodeFactory, dns_server: DNSServer, tmp_path: Path
) -> None:
    """A message past the spool's memory (64 KiB) and under ``dkim_max_bytes`` is checked
    from memory and rewritten in its own spool file (senderauth.rewrite): its signatures
    still verify, forged results in its header section are dropped (enough of them that
    the rewritten message is shorter than the received one), a look-alike line in its
    body is left alone, and the body is stored byte for byte."""
    dns_server.add_txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    keys = KeyStore(tmp_path / "keys")
    key = keys.generate("bank.test", "r1", "rsa")
    dns_server.add_txt(key.dns_name, key.dns_record())
    node = await mx()
    body = big_body(150) + FORGED_AR  # about 150 KB
    message = raw_letter(b"From: CEO <ceo@bank.test>\r\n", body)
    signature = dkimpy.sign(message, b"r1", b"bank.test", key.path.read_bytes(),
                            include_headers=[b"from", b"to"], linesep=b"\r\n")
    data = FORGED_AR * 40 + signature + message
    assert await asyncio.to_thread(outcome, node.port("mx"), "a@spfnone.test", data) == "250"
    (raw,) = stored(node, ALICE)
    head, stored_body = raw.split(b"\r\n\r\n", 1)
    assert stored_body == body
    assert head.endswith(signature + message.split(b"\r\n\r\n", 1)[0])
    assert b"header.d=bank.test; dmarc=pass" not in head
    ar = auth_results(raw)
    assert "dkim=pass header.d=bank.test header.s=r1" in ar and "dmarc=pass" in ar, ar
    assert len(raw) < len(data)
    spool = node.cfg.data_path / "spool"  # emptied once the links are flushed: no copy left
    for _ in range(500):  # spent link records, emptied and kept for reuse, do not count
        if not holding(spool):
            break
        await asyncio.sleep(0.01)
    assert holding(spool) == []


async def test_cached_answers_are_used_within_their_ttl_and_never_after(
        mx: NodeFactory, dns_server: DNSServer) -> None:
    """The checks run from the DNS cache (on the event loop) while a sender's answers are
    fresh, and judge by its new records once the old ones' TTL has passed."""
    dns_server.add_txt("ttl.test", "v=spf1 ip4:127.0.0.1 -all", ttl=1)
    dns_server.add_txt("_dmarc.ttl.test", "v=DMARC1; p=reject", ttl=1)
    node = await mx()
    port = node.port("mx")
    for _ in range(2):
        await asyncio.to_thread(send, port, "a@ttl.test", letter("a@ttl.test"))
    assert dns_server.queries.count(("ttl.test", "TXT")) == 1  # the second from the cache
    assert dns_server.queries.count(("_dmarc.ttl.test", "TXT")) == 1
    assert all("spf=pass smtp.mailfrom=a@ttl.test" in auth_results(m)
               for m in stored(node, ALICE))
    dns_server.remove("ttl.test").add_txt("ttl.test", "v=spf1 ip4:192.0.2.1 -all", ttl=1)
    await asyncio.sleep(1.1)
    with pytest.raises(smtplib.SMTPDataError) as exc:  # SPF fail now, and DMARC p=reject
        await asyncio.to_thread(send, port, "a@ttl.test", letter("a@ttl.test"))
    assert exc.value.smtp_code == 550
    assert len(stored(node, ALICE)) == 2


def _mail_reply_seconds(port: int, sender: str) -> float:
    """How long the reply to MAIL took; the rest of the transaction must succeed."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.remote.test")
        t0 = time.monotonic()
        code, _ = s.mail(sender)
        took = time.monotonic() - t0
        assert code == 250
        assert s.rcpt(ALICE)[0] == 250
        assert s.data(letter(sender))[0] == 250
    return took


async def test_spf_lookups_overlap_the_transaction_unless_mail_waits_for_them(
        mx: NodeFactory, dns_server: DNSServer) -> None:
    """With spf_fail = "mark" (the default) the reply to MAIL does not depend on SPF, so a
    sender domain whose DNS is slow (here: never answers, 1 s timeout) is answered at once
    and its SPF result, awaited at the end of data, is still reported; with "reject" MAIL
    waits for it, as a fail must be refused there."""
    dns_server.timeout("slow.test")
    dns_server.timeout("slower.test")
    node = await mx()
    took = await asyncio.to_thread(_mail_reply_seconds, node.port("mx"), "a@slow.test")
    assert took < 0.5, took
    (raw,) = stored(node, ALICE)
    ar = auth_results(raw)
    assert "spf=temperror (" in ar and "smtp.mailfrom=a@slow.test" in ar, ar
    strict = await mx("b", sender_auth={"spf_fail": "reject"})
    took = await asyncio.to_thread(_mail_reply_seconds, strict.port("mx"), "a@slower.test")
    assert took >= 0.8, took


class _CountingExecutor(ThreadPoolExecutor):
    """The loop's default executor, counting what is handed to its threads."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.submitted = 0

    def submit(self, *args: Any, **kw: Any) -> Any:  # type: ignore[override]
        self.submitted += 1
        return super().submit(*args, **kw)


def test_unforged_small_message_is_checked_on_the_loop(tmp_path: Path) -> None:
    """A 1 KB message in memory is cleaned of forged Authentication-Results on the event
    loop (a header scan: a thread hand-over cost the loop more); one in a spool file is
    read in a thread. Forged fields go either way."""
    from mailfort.server import senderauth
    from mailfort.store.maildir import Committer

    committer = Committer(tmp_path / "data")
    trace = b"Received: from client by mx.test; Mon, 7 Dec 2026 22:00:00 +0000\r\n"
    forged = (b"Authentication-Results: mx.test; dmarc=pass\r\nFrom: a@b.test\r\n"
              b"Subject: hi\r\n\r\n" + b"x" * 1000 + b"\r\n")

    async def run(body: bytes, big: bool) -> tuple[bytes, int]:
        executor = _CountingExecutor()
        asyncio.get_running_loop().set_default_executor(executor)
        spool = committer.new_spool()
        spool.write(trace + body + (b"y" * 78 + b"\r\n") * (20_000 if big else 0))
        new = await senderauth.unforged(committer, spool, trace, "mx.test")
        data = b"".join(new.chunks())
        new.discard()
        return data, executor.submitted

    try:
        for body in (forged, forged.split(b"\r\n", 1)[1]):
            data, handed = asyncio.run(run(body, big=False))
            assert handed == 0
            assert b"Authentication-Results" not in data and data.startswith(trace)
        data, handed = asyncio.run(run(forged, big=True))
        assert handed == 1 and b"Authentication-Results" not in data
    finally:
        committer.stop()


class _RecordingExecutor(ThreadPoolExecutor):
    """The loop's default executor, noting what each hand-over to a thread ran."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.ran: list[str] = []

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        parts = [fn, *args]
        while parts and isinstance(parts[0], functools.partial):  # what to_thread hands over
            parts = [parts[0].func, *parts[0].args, *parts[1:]]
        self.ran.append(" ".join(getattr(a, "__name__", "") for a in parts))
        return super().submit(fn, *args, **kwargs)


async def test_submission_signs_only_in_a_thread_and_only_with_a_key(
    mx: NodeFactory, client_ssl_context: ssl.SSLContext
) -> None:
    """A message whose From: domain has no key is finished on the loop (a header scan):
    the hand-over to a thread and back cost the worker ~4 % of its time per message. With
    a key, the message is signed (in a thread), a local recipient's copy too: a forward
    or a Sieve redirect takes it out, and the signature is what still passes DMARC there."""
    node = await mx()
    loop = asyncio.get_running_loop()
    recorder = _RecordingExecutor()
    loop.set_default_executor(recorder)
    client = ThreadPoolExecutor(max_workers=1)
    msg = EmailMessage()
    msg["From"] = ALICE
    msg["To"] = "bob@example.test"
    msg["Subject"] = "local"
    msg.set_content("hi\n")
    await loop.run_in_executor(client, submit, node.port("submission"), client_ssl_context,
                               msg, ["bob@example.test"])
    (raw,) = stored(node, "bob@example.test")
    assert b"DKIM-Signature" not in raw
    assert not any("_sign" in r for r in recorder.ran), recorder.ran
    KeyStore(node.cfg.data_path).generate("example.test", "s1", "ed25519")
    await loop.run_in_executor(client, submit, node.port("submission"), client_ssl_context,
                               msg, ["bob@example.test"])
    signed = [r for r in stored(node, "bob@example.test") if b"DKIM-Signature" in r]
    assert len(signed) == 1 and b"d=example.test" in signed[0]
    assert any("_sign" in r for r in recorder.ran), recorder.ran
    client.shutdown()
