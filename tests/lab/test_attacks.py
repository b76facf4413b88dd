"""Every attack end to end against both servers; outcomes read from the capture points.

Each test runs one attack (legacy then hardened) and then looks at the capture points
itself (the victim sink, the forged sender's mailbox, the maildirs, the proxies' wire
recording), not at the printed text, so a lab that merely *says* an attack worked fails.
"""

from __future__ import annotations

import base64

import dns.resolver
import pytest

from mailfort.lab.attacks import ALICE, BOB, GUESSES, run_attack
from mailfort.lab.harness import FORGED_DOMAIN, PASSWORDS, Lab


def _sink_subjects(lab: Lab, side: str, needle: bytes) -> list[bytes]:
    sink = lab.sides[side].sink
    assert sink is not None
    return [m.data for m in sink.snapshot() if needle in m.data]


def test_one_door(lab: Lab) -> None:
    run = run_attack(lab, "one-door")
    legacy, hardened = run.sides["legacy"], run.sides["hardened"]
    assert _sink_subjects(lab, "legacy", b"New bank details")
    assert _sink_subjects(lab, "hardened", b"New bank details") == []
    assert legacy.found["auth_on_25"] and not hardened.found["auth_on_25"]
    assert legacy.succeeded and not hardened.succeeded
    assert any(line.startswith("< 530 5.7.0") for line in hardened.transcript)


def test_open_relay(lab: Lab) -> None:
    run = run_attack(lab, "open-relay")
    relayed = _sink_subjects(lab, "legacy", b"Cheap watches")
    assert relayed and b"Received: from spam-engine.example" in relayed[0]
    assert _sink_subjects(lab, "hardened", b"Cheap watches") == []
    assert run.sides["legacy"].succeeded and not run.sides["hardened"].succeeded
    assert any("554 5.7.1" in line for line in run.sides["hardened"].transcript)


def test_spoofing(lab: Lab) -> None:
    run = run_attack(lab, "spoofing")
    forged = b"From: CEO <ceo@example.test>"
    assert [m for m in lab.sides["legacy"].mailbox(BOB) if forged in m and b"Urgent" in m]
    assert not [m for m in lab.sides["hardened"].mailbox(BOB) if b"Urgent transfer" in m]
    assert any("553 5.7.1" in line for line in run.sides["hardened"].transcript)
    assert run.sides["legacy"].succeeded and not run.sides["hardened"].succeeded
    # The same forgery from outside on the MX: both copies stored on legacy; on hardened the
    # lab domain's published SPF and DMARC (p=reject) refuse it at the end of data.
    legacy_forged = [m for m in lab.sides["legacy"].mailbox(BOB) if forged in m]
    assert len(legacy_forged) == 2
    assert any("550 5.7.1" in line for line in run.sides["hardened"].transcript)


def test_the_lab_dns_answers_the_published_policy_and_nothing_else(lab: Lab) -> None:

    assert lab.dns is not None
    r = dns.resolver.Resolver(configure=False)
    r.nameservers, r.port, r.lifetime = ["127.0.0.1"], lab.dns.port, 2.0
    txt = [b"".join(x.strings) for x in r.resolve("_dmarc.example.test", "TXT")]
    assert txt == [b"v=DMARC1; p=reject; rua=mailto:postmaster@example.test"]
    with pytest.raises(dns.resolver.NXDOMAIN):
        r.resolve("example.org", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        r.resolve("example.test", "MX")


def test_backscatter(lab: Lab) -> None:
    run = run_attack(lab, "backscatter")
    legacy_box = lab.sides["legacy"].forged
    hardened_box = lab.sides["hardened"].forged
    assert legacy_box is not None and hardened_box is not None
    bounces = [m for m in legacy_box.snapshot() if b"Cheap pills" in m.data]
    assert len(bounces) == 1
    bounce = bounces[0]
    assert bounce.sender == "" and bounce.recipients == [f"victim@{FORGED_DOMAIN}"]
    assert b"Undelivered Mail" in bounce.data  # a bounce, with the spam inside
    assert [m for m in hardened_box.snapshot() if b"Cheap pills" in m.data] == []
    assert any("550 5.1.1" in line for line in run.sides["hardened"].transcript)


def test_vacation_backscatter(lab: Lab) -> None:
    """Forged sender (SPF fail) to carol, on vacation: the legacy responder answers the
    victim, mailfort does not; carol gets the message on both."""
    run = run_attack(lab, "vacation-backscatter")
    legacy_box, hardened_box = lab.sides["legacy"].forged, lab.sides["hardened"].forged
    assert legacy_box is not None and hardened_box is not None
    replies = [m for m in legacy_box.snapshot() if b"lab-vacation-" in m.data]
    assert len(replies) == 1 and replies[0].sender == ""
    assert b"Auto-Submitted: auto-replied" in replies[0].data
    assert [m for m in hardened_box.snapshot() if b"lab-vacation-" in m.data] == []
    assert run.sides["legacy"].succeeded and not run.sides["hardened"].succeeded
    assert any(b"lab-vacation-" in m for m in lab.sides["hardened"].mailbox(
        "carol@example.test"))


def test_sniff(lab: Lab) -> None:
    password = PASSWORDS[ALICE]
    marks = {s: {n: p.recording.mark() for n, p in side.proxies.items()}
             for s, side in lab.sides.items()}
    run = run_attack(lab, "sniff")

    def wire(side: str) -> bytes:
        proxies = lab.sides[side].proxies
        return b"".join(ch.data for name, p in proxies.items()
                        for ch in p.recording.since(marks[side][name]))

    plain_b64 = base64.b64encode(f"\0{ALICE}\0{password}".encode())
    legacy_wire, hardened_wire = wire("legacy"), wire("hardened")
    assert f"PASS {password}".encode() in legacy_wire  # POP3, verbatim
    assert plain_b64 in legacy_wire  # AUTH PLAIN: base64 is not encryption
    assert b"Salaries 2026" in legacy_wire
    assert password.encode() not in hardened_wire and plain_b64 not in hardened_wire
    assert b"Salaries 2026" not in hardened_wire
    assert b"STARTTLS" in hardened_wire and b"STLS" in hardened_wire  # then TLS records
    assert run.sides["legacy"].found["passwords"] == [password]
    assert run.sides["hardened"].found["passwords"] == []
    assert run.sides["hardened"].found["tls"] > 1000
    # alice's message was delivered on both: only the legacy wire gave it away.
    assert any(b"Salaries 2026" in m for m in lab.sides["hardened"].mailbox(BOB))


def test_sniff_imap(lab: Lab) -> None:
    """IMAP in the sniffing attack: on the legacy server alice's LOGIN crosses the wire in
    the clear and the recording gives her password away; the hardened server says
    LOGINDISABLED, refuses LOGIN before STARTTLS with NO [PRIVACYREQUIRED] (the lab's
    client sends it without her password), and her LOGIN goes inside TLS."""
    password = PASSWORDS[ALICE]
    marks = {s: side.proxies["imap"].recording.mark() for s, side in lab.sides.items()}
    run = run_attack(lab, "sniff")

    def imap_wire(side: str, direction: str) -> bytes:
        chunks = lab.sides[side].proxies["imap"].recording.since(marks[side])
        return b"".join(ch.data for ch in chunks if ch.direction == direction)

    legacy_up, legacy_down = imap_wire("legacy", ">"), imap_wire("legacy", "<")
    assert f'LOGIN {ALICE} "{password}"'.encode() in legacy_up  # verbatim on the wire
    assert b"AUTH=PLAIN" in legacy_down and b"LOGINDISABLED" not in legacy_down
    assert b"Logged in" in legacy_down  # the server took it, in the clear
    hardened_up, hardened_down = imap_wire("hardened", ">"), imap_wire("hardened", "<")
    assert password.encode() not in hardened_up
    assert b"LOGINDISABLED" in hardened_down and b"AUTH=PLAIN" not in hardened_down
    assert b"NO [PRIVACYREQUIRED]" in hardened_down
    assert b"STARTTLS" in hardened_up and b"Logged in" not in hardened_down  # inside TLS
    legacy, hardened = run.sides["legacy"], run.sides["hardened"]
    assert legacy.found["captured"][password] == ["SMTP AUTH PLAIN", "POP3 PASS", "IMAP LOGIN"]
    assert hardened.found["captured"] == {}
    assert legacy.found["imap"] == "login-in-clear"
    assert hardened.found["imap"] == "login-refused"
    # Both servers let alice in: the hardened one only after STARTTLS.
    assert any("Logged in" in line for line in hardened.transcript)
    assert any("PRIVACYREQUIRED" in line for line in hardened.transcript)


def test_legacy_imap_takes_authenticate_plain_in_the_clear(lab: Lab) -> None:
    """imaplib, a real client, over the legacy IMAP port: AUTHENTICATE PLAIN without TLS
    works (and the recording can read it); the hardened port refuses it before TLS."""
    import imaplib

    from mailfort.lab.attacks import _sniff

    creds = f"\0{ALICE}\0{PASSWORDS[ALICE]}".encode()
    legacy = lab.sides["legacy"].proxies["imap"]
    mark = legacy.recording.mark()
    client = imaplib.IMAP4("127.0.0.1", legacy.port, timeout=5)
    try:
        assert "LOGINDISABLED" not in client.capabilities
        assert client.authenticate("PLAIN", lambda _: creds)[0] == "OK"
    finally:
        client.logout()
    found, *_ = _sniff({"imap": legacy.recording.since(mark)})
    assert found == {PASSWORDS[ALICE]: ["IMAP AUTHENTICATE PLAIN"]}
    hardened = imaplib.IMAP4("127.0.0.1", lab.sides["hardened"].server_port("imap") or 0,
                             timeout=5)
    try:
        assert "LOGINDISABLED" in hardened.capabilities
        with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
            hardened.authenticate("PLAIN", lambda _: creds)
    finally:
        hardened.logout()


def test_sniffer_reads_a_password_sent_as_a_literal(lab: Lab) -> None:
    """Clients send a password with odd characters as a literal ({N}, then the octets
    after the server's +): the eavesdropper reads it all the same."""
    import socket

    from mailfort.lab.attacks import _sniff

    password = PASSWORDS[ALICE]
    proxy = lab.sides["legacy"].proxies["imap"]
    mark = proxy.recording.mark()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"* OK")
        sock.sendall(f"L LOGIN {{{len(ALICE)}}}\r\n".encode())
        assert reader.readline().startswith(b"+")
        sock.sendall(f"{ALICE} {{{len(password)}}}\r\n".encode())
        assert reader.readline().startswith(b"+")
        sock.sendall(password.encode() + b"\r\n")
        assert reader.readline().startswith(b"L OK")
        sock.sendall(b"Z LOGOUT\r\n")
        while reader.readline().split(b" ")[:1] not in ([b"Z"], [b""]):
            pass
    found, *_ = _sniff({"imap": proxy.recording.since(mark)})
    assert found == {password: ["IMAP LOGIN"]}


def test_vrfy(lab: Lab) -> None:
    run = run_attack(lab, "vrfy")
    legacy, hardened = run.sides["legacy"], run.sides["hardened"]
    assert {"alice", "bob", "carol", "mallory"} <= set(legacy.found["users"])
    assert "root" not in legacy.found["users"]
    assert legacy.found["expanded"]["ceo"] == ["boss.private@home-isp.example"]
    assert hardened.found["users"] == [] and hardened.found["expanded"] == {}


def test_smuggling(lab: Lab) -> None:
    run = run_attack(lab, "smuggling")
    smuggled = b"Subject: Smuggled"
    stored = [m for m in lab.sides["legacy"].mailbox(BOB) if smuggled in m]
    assert len(stored) == 1 and b"Return-Path: <ceo@example.test>" in stored[0]
    assert not [m for m in lab.sides["hardened"].mailbox(BOB) if smuggled in m]
    assert run.sides["hardened"].found["replies"] == [550]


def test_overflow(lab: Lab) -> None:
    run = run_attack(lab, "overflow")
    legacy, hardened = run.sides["legacy"].found, run.sides["hardened"].found
    assert legacy["long_line"] == 250 and legacy["accepted"] == 2000
    assert legacy["held"] == 2000 and legacy["held_octets"] > 100_000  # read from the server
    assert hardened["long_line"] == 500
    assert hardened["accepted"] == 100 and hardened["closed"]
    assert hardened["held"] <= 100


def test_guessing(lab: Lab) -> None:
    run = run_attack(lab, "guessing")
    legacy, hardened = run.sides["legacy"].found, run.sides["hardened"].found
    assert legacy["password"] == PASSWORDS[BOB]
    assert hardened["password"] is None
    # The hardened server slowed the guesser down, then refused even the right password.
    assert max(t[3] for t in hardened["tries"]) > 0.2
    assert hardened["tries"][-1][1] == GUESSES[-1] == PASSWORDS[BOB]
    assert hardened["tries"][-1][2] != "+OK"
    # The owner, from their own address, still logs in: the account was not locked.
    import poplib

    pop = lab.sides["hardened"].port("pop3")
    assert pop is not None
    client = poplib.POP3("127.0.0.1", pop, timeout=5)
    try:
        import ssl

        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        client.stls(ctx)
        client.user(BOB)
        assert client.pass_(PASSWORDS[BOB]).startswith(b"+OK")
    finally:
        client.quit()
