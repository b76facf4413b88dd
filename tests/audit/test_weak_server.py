"""Each check can FAIL: switch one weakness on in the weak server and exactly the matching
check FAILs, with the others of its family still passing; with none on, nothing FAILs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from tests.audit.conftest import FAST, port_args, run_audit, statuses
from tests.audit.weak_server import Weakness, WeakServer
from tests.dnsserver import DNSServer

RELAY = ["relay", "backscatter"]
SUBMISSION = ["submission"]
DISCLOSURE = ["disclosure"]
TLS = ["tls", "pop3"]
IMAP = ["imap", "tls.starttls", "tls.injection-imap", "limits.imap-literal",
        "limits.imap-line", "disclosure.banner"]
SIEVE = ["managesieve", "tls.starttls", "tls.injection-managesieve"]
LIMITS = ["limits.long-line", "limits.size", "limits.recipients", "limits.nul"]

CASES: dict[str, tuple[str, list[str]]] = {
    "open_relay": ("relay.open", RELAY),
    "accept_unknown": ("backscatter.unknown-user", RELAY),
    "submission_no_auth": ("submission.no-auth", SUBMISSION),
    "auth_before_tls": ("submission.auth-before-tls", SUBMISSION),
    "sender_forgery": ("submission.sender-forgery", SUBMISSION),
    "vrfy_confirms": ("disclosure.vrfy-expn", DISCLOSURE),
    "banner_version": ("disclosure.banner", DISCLOSURE),
    "no_starttls": ("tls.starttls", TLS),
    "no_stls": ("tls.pop3-stls", TLS),
    "pop3_user_before_stls": ("pop3.plaintext-auth", TLS),
    "old_tls": ("tls.versions", TLS),
    "weak_ciphers": ("tls.ciphers", TLS),
    "starttls_injection": ("tls.injection-smtp", TLS),
    "stls_injection": ("tls.injection-pop3", TLS),
    "smuggle_lf": ("smuggling.end-of-data", ["smuggling", "limits.size"]),
    "no_line_limit": ("limits.long-line", LIMITS),
    "no_size_limit": ("limits.size", LIMITS),
    "no_rcpt_limit": ("limits.recipients", LIMITS),
    "accept_nul": ("limits.nul", LIMITS),
    "exhaustible": ("limits.idle-connections", ["limits.idle-connections", "limits.liveness"]),
    "relay_local_sender": ("relay.open", RELAY),
    "apop": ("pop3.apop", TLS),
    "vrfy_text": ("disclosure.vrfy-expn", DISCLOSURE),
    "imap_plaintext_login": ("imap.plaintext-auth", IMAP),
    "no_imap_starttls": ("tls.starttls", IMAP),
    "imap_injection": ("tls.injection-imap", IMAP),
    "imap_huge_literal": ("limits.imap-literal", IMAP),
    "imap_banner_version": ("disclosure.banner", IMAP),
    "imap_literal_drop": ("limits.imap-literal", IMAP),
    "imap_id_version": ("disclosure.banner", IMAP),
    "imap_no_line_limit": ("limits.imap-line", IMAP),
    "imap_authenticate_clear": ("imap.plaintext-auth", IMAP),
    "sieve_plaintext_auth": ("managesieve.plaintext-auth", SIEVE),
    "sieve_injection": ("tls.injection-managesieve", SIEVE),
    "sieve_banner_version": ("disclosure.banner", DISCLOSURE),
    "no_content_filter": ("content.gtube", ["content", "smuggling"]),
}


# A server that answers an over-long line normally may hold it whole (this weak server
# does) or cut it (Postfix does): no reply tells them apart, so the check WARNs. An IMAP
# session that ends without BYE on a huge literal may have crashed: a WARN too.
# A server without a content filter takes spam, but refusing it is not a protocol rule: WARN.
WARN_ONLY = {"no_line_limit", "imap_literal_drop", "no_content_filter"}


def test_every_weakness_has_a_case() -> None:
    assert set(CASES) == set(Weakness.names())


def _argv(server: WeakServer, password_file: Callable[[str], str]) -> list[str]:
    return ["127.0.0.1", *port_args(server.ports), "--domain", "weak.test", "--user", "alice",
            "--auth-user", "alice@weak.test", "--auth-password-file",
            password_file("alice-pw"), *FAST, "--json"]


def test_careful_server_nothing_fails(
    weak_factory: Callable[..., WeakServer], password_file: Callable[[str], str],
    dns: DNSServer, capsys: pytest.CaptureFixture[str],
) -> None:
    dns.add_mx("weak.test", "mx.weak.test")
    dns.add_txt("weak.test", "v=spf1 mx -all")
    dns.add_txt("_dmarc.weak.test", "v=DMARC1; p=reject")
    server = weak_factory()
    code, out, _ = run_audit(capsys, [*_argv(server, password_file),
                                      "--resolver", f"127.0.0.1:{dns.port}",
                                      "--dnsbl", "bl.test"])
    got = statuses(out)
    assert code == 0
    # The certificate is not trusted (WARN); every other check passes, none is skipped.
    assert {k: v for k, v in got.items() if v != "PASS"} == {"tls.certificate": "WARN"}


@pytest.mark.parametrize("weakness", sorted(CASES))
def test_one_weakness_fails_exactly_its_check(
    weakness: str, weak_factory: Callable[..., WeakServer],
    password_file: Callable[[str], str], capsys: pytest.CaptureFixture[str],
) -> None:
    expected, family = CASES[weakness]
    server = weak_factory(**{weakness: True})
    code, out, _ = run_audit(capsys, [*_argv(server, password_file), "--only", *family])
    got = statuses(out)
    assert expected in got
    assert not [k for k, v in got.items() if v == "INCONCLUSIVE"]
    if weakness in WARN_ONLY:  # see WARN_ONLY: seen, said, but not provable from outside
        assert [k for k, v in got.items() if v != "PASS"] == [expected]
        assert got[expected] == "WARN" and code == 0
        return
    assert [k for k, v in got.items() if v == "FAIL"] == [expected]
    assert code == 1


def test_failed_control_is_inconclusive_not_pass(
    weak_factory: Callable[..., WeakServer], capsys: pytest.CaptureFixture[str],
) -> None:
    """Refusals mean nothing when the known user is refused too: say so, do not PASS."""
    server = weak_factory()
    code, out, _ = run_audit(capsys, ["127.0.0.1", *port_args(server.ports), "--domain",
                                      "weak.test", "--user", "nobody", *FAST, "--json",
                                      "--only", "relay", "backscatter", "smuggling"])
    report = json.loads(out)
    got = {c["id"]: (c["status"], c["note_key"]) for c in report["checks"]}
    assert got == {"relay.open": ("INCONCLUSIVE", "control.known-refused"),
                   "backscatter.unknown-user": ("INCONCLUSIVE", "control.known-refused"),
                   "smuggling.end-of-data": ("INCONCLUSIVE", "control.known-refused")}
    assert code == 3  # could not tell: not the 0 of "all fine"


def test_postfix_gets_postfix_fixes(
    weak_factory: Callable[..., WeakServer], capsys: pytest.CaptureFixture[str],
) -> None:
    server = weak_factory(banner="weak.test ESMTP Postfix (Debian/GNU)", open_relay=True)
    code, out, _ = run_audit(capsys, ["127.0.0.1", *port_args(server.ports), "--domain",
                                      "weak.test", "--user", "alice", *FAST, "--json",
                                      "--only", "relay", "disclosure.banner"])
    by_id = {c["id"]: c for c in json.loads(out)["checks"]}
    assert code == 1
    assert by_id["disclosure.banner"]["status"] == "WARN"  # the name, without version
    assert "reject_unauth_destination" in by_id["relay.open"]["fix_postfix"]
    assert any("accepted: MAIL FROM:" in e for e in by_id["relay.open"]["evidence"])


def test_other_servers_get_no_postfix_fixes(
    weak_factory: Callable[..., WeakServer], capsys: pytest.CaptureFixture[str],
) -> None:
    server = weak_factory(open_relay=True)
    _, out, _ = run_audit(capsys, ["127.0.0.1", *port_args(server.ports), "--domain",
                                   "weak.test", "--user", "alice", *FAST, "--json",
                                   "--only", "relay"])
    assert json.loads(out)["checks"][0]["fix_postfix"] is None


# Later than --settle, well inside --timeout: a server that looks up SPF or calls the sender
# back at MAIL answers like this; one that tarpits answers NOOP late.
SLOW = 0.3
SLOW_CASES = [
    ("smuggle_lf", "smuggling.end-of-data", "MAIL"),
    ("starttls_injection", "tls.injection-smtp", "NOOP"),
    ("stls_injection", "tls.injection-pop3", "NOOP"),
]


@pytest.mark.parametrize("weak", [True, False], ids=["weak", "careful"])
@pytest.mark.parametrize(("weakness", "check", "verb"), SLOW_CASES,
                         ids=[c[1] for c in SLOW_CASES])
def test_slow_replies_are_counted_not_taken_for_silence(
    weakness: str, check: str, verb: str, weak: bool,
    weak_factory: Callable[..., WeakServer], password_file: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A reply later than --settle is still a reply: the weak server FAILs, the careful
    one PASSes, neither is INCONCLUSIVE (the probe waits for its QUIT marker's reply)."""
    server = weak_factory(slow={verb: SLOW}, **({weakness: True} if weak else {}))
    _, out, _ = run_audit(capsys, [*_argv(server, password_file), "--settle", "0.05",
                                   "--only", check])
    report = json.loads(out)["checks"]
    assert [(c["id"], c["status"]) for c in report] == [(check, "FAIL" if weak else "PASS")]


@pytest.mark.parametrize("check", ["smuggling.end-of-data", "tls.injection-smtp"])
def test_replies_that_cannot_be_counted_are_inconclusive_not_pass(
    check: str, weak_factory: Callable[..., WeakServer], password_file: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """QUIT answered after --timeout: the probe cannot know what else was answered."""
    server = weak_factory(slow={"QUIT": 1.0})
    _, out, _ = run_audit(capsys, [*_argv(server, password_file), "--timeout", "0.5",
                                   "--only", check])
    report = json.loads(out)["checks"]
    assert [(c["id"], c["status"], c["note_key"]) for c in report] == \
        [(check, "INCONCLUSIVE", "replies.uncounted")]


@pytest.mark.parametrize(("flags", "verb", "check"), [
    ({"accept_nul": True}, "MAIL", "limits.nul"),  # would be "closed"
    ({"old_tls": True}, "EHLO", "tls.versions"),  # would be "TLS 1.0 refused"
])
def test_a_late_answer_is_not_a_refusal(
    flags: dict[str, bool], verb: str, check: str,
    weak_factory: Callable[..., WeakServer], password_file: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A weak server answering after --timeout: not a refusal, so not a PASS. (Only port
    25 is given: the weak server's other TLS ports would show TLS 1.0 without EHLO.)"""
    server = weak_factory(slow={verb: 1.0}, **flags)
    server.ports = {"smtp": server.ports["smtp"]}
    _, out, _ = run_audit(capsys, [*_argv(server, password_file), "--timeout", "0.5",
                                   "--only", check])
    report = json.loads(out)["checks"]
    assert [(c["id"], c["status"], c["note_key"]) for c in report] == \
        [(check, "INCONCLUSIVE", "probe.no-reply")]


def _checks(out: str) -> dict[str, dict[str, str]]:
    return {c["id"]: c for c in json.loads(out)["checks"]}


def test_relay_for_a_forged_local_sender_names_the_sender(
    weak_factory: Callable[..., WeakServer], password_file: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """"Relay for my own domain's senders": found with the known user as MAIL FROM."""
    server = weak_factory(relay_local_sender=True)
    code, out, _ = run_audit(capsys, [*_argv(server, password_file), "--only", "relay.open"])
    relay = _checks(out)["relay.open"]
    assert code == 1 and relay["status"] == "FAIL"
    assert "<alice@weak.test>" in relay["result"]
    assert any("accepted: MAIL FROM:<alice@weak.test>" in e for e in relay["evidence"])


def test_apop_is_a_fail_with_why_and_fix(
    weak_factory: Callable[..., WeakServer], password_file: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = weak_factory(apop=True)
    for lang, word in (("en", "MD5"), ("ja", "チャレンジレスポンス")):
        _, out, _ = run_audit(capsys, [*_argv(server, password_file), "--lang", lang,
                                       "--only", "pop3.apop"])
        apop = _checks(out)["pop3.apop"]
        assert apop["status"] == "FAIL" and "@weak.test>" in apop["result"]
        assert word in apop["why"] and "2007" in apop["why"] and "APOP" in apop["fix"]


UNTESTED_TLS = ["tls.versions", "tls.ciphers", "tls.certificate", "tls.injection-smtp",
                "tls.injection-pop3"]


def test_no_completed_handshake_is_never_a_pass(
    weak_factory: Callable[..., WeakServer], password_file: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """STARTTLS/STLS offered, every handshake fails: the offer FAILs, nothing PASSes."""
    server = weak_factory(broken_tls=True)
    code, out, _ = run_audit(capsys, [*_argv(server, password_file), "--only", "tls",
                                      "limits.liveness"])
    got = _checks(out)
    assert code == 1 and got["tls.starttls"]["status"] == "FAIL"
    assert "submissions: TLS handshake" in got["tls.starttls"]["result"]  # 465 is not closed
    assert got["limits.liveness"]["status"] == "PASS"
    assert {k: (got[k]["status"], got[k]["note_key"]) for k in UNTESTED_TLS} == \
        dict.fromkeys(UNTESTED_TLS, ("INCONCLUSIVE", "tls.no-handshake"))


def test_a_554_greeting_is_a_greeting(
    weak_factory: Callable[..., WeakServer], password_file: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """RFC 5321 §3.1: the server refuses every session. Not "no greeting", not "no TLS":
    the checks that need a session say so: no exit 1, and no 0 either (3: could not tell)."""
    server = weak_factory(greeting="554 5.3.2 weak.test accepts no mail here")
    code, out, _ = run_audit(capsys, [*_argv(server, password_file), "--only", *RELAY,
                                      "disclosure", "tls.starttls", "tls.injection-smtp",
                                      "limits", "smuggling"])
    got = _checks(out)
    assert code == 3 and not [k for k, c in got.items() if c["status"] == "FAIL"]
    refused = ["relay.open", "backscatter.unknown-user", "disclosure.vrfy-expn",
               "tls.starttls", "tls.injection-smtp", "limits.recipients",
               "limits.idle-connections", "smuggling.end-of-data"]
    assert {k: (got[k]["status"], got[k]["note_key"]) for k in refused} == \
        dict.fromkeys(refused, ("INCONCLUSIVE", "greeting.refused"))
    assert "554" in got["relay.open"]["result"]
    assert got["limits.liveness"]["status"] == "PASS"


def test_vrfy_text_without_the_address_must_match(
    weak_factory: Callable[..., WeakServer], password_file: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """252 for both, but only the known user's text says "local mailbox": a leak."""
    server = weak_factory(vrfy_text=True)
    _, out, _ = run_audit(capsys, [*_argv(server, password_file),
                                   "--only", "disclosure.vrfy-expn"])
    vrfy = _checks(out)["disclosure.vrfy-expn"]
    assert vrfy["status"] == "FAIL" and "VRFY 252/252 with different texts" in vrfy["result"]


def test_accepted_at_rcpt_refused_at_data_is_said_as_seen(
    weak_factory: Callable[..., WeakServer], password_file: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """250 to every RCPT, 554 at the end of DATA: still FAILs, worded as seen."""
    server = weak_factory(open_relay=True, accept_unknown=True, refuse_data=True)
    _, out, _ = run_audit(capsys, [*_argv(server, password_file), "--only", *RELAY])
    got = _checks(out)
    relay, back = got["relay.open"], got["backscatter.unknown-user"]
    assert relay["status"] == back["status"] == "FAIL"
    assert "accepted at RCPT" in relay["result"] and "not seen" in relay["result"]
    assert back["note_key"] == "backscatter.data-refused"
    assert "refused at the end of DATA (554)" in back["result"]


@pytest.mark.parametrize("check", ["relay.open", "limits.recipients"])
def test_the_budget_bounds_a_server_slow_on_every_reply(
    check: str, weak_factory: Callable[..., WeakServer], password_file: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every reply 1 s late, --budget 3: the run ends near 3 s (its greeting waits too),
    the check cut short and INCONCLUSIVE."""
    server = weak_factory(slow={"*": 1.0})
    started = time.monotonic()
    _, out, _ = run_audit(capsys, [*_argv(server, password_file), "--budget", "3",
                                   "--only", check])
    elapsed = time.monotonic() - started
    got = _checks(out)[check]
    assert (got["status"], got["note_key"]) == ("INCONCLUSIVE", "budget.cut")
    assert elapsed < 4.0
