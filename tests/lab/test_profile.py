"""The legacy profile: reachable from the lab's Python code only, and hardened by default.

The weakened behaviour is a ``LegacyProfile`` object handed to ``Node`` by ``mailfort.lab``.
These tests try to reach it the other ways: through configuration keys (rejected as
unknown), through ``mailfort serve`` options and a config file (rejected before anything
starts), and check that every hook defaults to the hardened rule at its own depth (engine
settings, body checks, recipient policy).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import mailfort
from mailfort import cli
from mailfort import config as config_mod
from mailfort.config import Config, ConfigError
from mailfort.directory.base import Resolution
from mailfort.lab.profile import LegacyProfile
from mailfort.policy.recipients import STRICT, LegacyRecipients
from mailfort.protocol import imap, pop3, smtp
from mailfort.protocol.address import Mailbox
from mailfort.protocol.body import BodyChecker

SRC = Path(mailfort.__file__).resolve().parents[1]


@pytest.mark.parametrize("table", [
    {"lab": {"profile": "legacy"}},
    {"server": {"profile": "legacy"}},
    {"server": {"legacy": True}},
    {"relay": {"open": True}},
    {"limits": {"legacy_bare_lf": True}},
    {"smtp": {"legacy_accounts": True}},
])
def test_no_configuration_key_selects_it(table: dict[str, dict[str, object]]) -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        config_mod.from_dict(table)


def test_no_configuration_field_can_hold_it() -> None:
    """Walk the whole config schema: no field has a type through which a profile, a
    recipient policy or an account lookup could arrive."""
    def walk(cls: type) -> list[str]:
        found = []
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            for arg in (tp, *typing.get_args(tp)):
                if dataclasses.is_dataclass(arg):
                    found += walk(arg)  # type: ignore[arg-type]
                else:
                    found.append(getattr(arg, "__name__", str(arg)))
        return found

    kinds = set(walk(Config))
    assert kinds <= {"str", "int", "float", "bool", "list", "dict"}, kinds


def test_serve_has_no_option_for_it(capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("--legacy", "--profile=legacy", "--lab"):
        with pytest.raises(SystemExit) as exc:
            cli.build_parser().parse_args(["serve", flag])
        assert exc.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_serve_refuses_a_config_asking_for_it(tmp_path: Path) -> None:
    cfg = tmp_path / "legacy.toml"
    cfg.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\nprofile = "legacy"\n')
    proc = subprocess.run([sys.executable, "-m", "mailfort", "serve", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    assert "server.profile: unknown key" in proc.stderr
    assert not (tmp_path / "data").exists()  # refused before anything started


def test_hooks_default_to_the_hardened_rules() -> None:
    s = smtp.EngineSettings(hostname="mx.example.test")
    assert s.legacy_accounts is None and s.legacy_bare_lf is False
    assert pop3.EngineSettings().max_auth_failures == pop3.MAX_AUTH_FAILURES
    i = imap.EngineSettings()
    assert not i.allow_plaintext and i.max_auth_failures == imap.MAX_AUTH_FAILURES


def _imap_greeting(settings: imap.EngineSettings) -> bytes:
    eng = imap.IMAPEngine(settings)
    eng.greet()
    return eng.take_output()


def test_legacy_imap_settings_only_weaken_what_they_say() -> None:
    """The IMAP seam: LOGIN and AUTHENTICATE PLAIN in the clear, no STARTTLS, no
    LOGINDISABLED; the greeting (no software, no version, like the legacy POP3 and SMTP)
    and the parser's limits stay."""
    base = imap.EngineSettings(tls_available=True, append_limit=1000)
    weak = LegacyProfile(domain="example.test").imap_settings(base)
    assert weak.allow_plaintext and not weak.tls_available
    assert weak.greeting == base.greeting and weak.append_limit == 1000
    assert weak.limits == base.limits and weak.login_limits == base.login_limits
    hardened, legacy = _imap_greeting(base), _imap_greeting(weak)
    assert b"LOGINDISABLED" in hardened and b"AUTH=PLAIN" not in hardened
    assert b"LOGINDISABLED" not in legacy and b"AUTH=PLAIN" in legacy
    assert b"STARTTLS" not in legacy


def _engine(settings: smtp.EngineSettings) -> smtp.SMTPEngine:
    eng = smtp.SMTPEngine(settings)
    eng.greet()
    eng.take_output()
    return eng


def _events(eng: smtp.SMTPEngine) -> list[object]:
    out = []
    while (ev := eng.next_event()) is not None:
        out.append(ev)
        if isinstance(ev, smtp.MailFrom | smtp.RcptTo | smtp.DataStart):
            eng.decide(smtp.START_INPUT if isinstance(ev, smtp.DataStart)
                       else smtp.OK)
        elif isinstance(ev, smtp.MessageComplete):
            eng.decide(smtp.OK)
    return out


SMUGGLE = (b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
           b"Subject: one\r\n\r\nhi\r\n\n.\nMAIL FROM:<ceo@d.example>\r\n"
           b"RCPT TO:<c@d.example>\r\nDATA\r\nSubject: two\r\n\r\nx\r\n.\r\n")


def test_engine_bare_lf_hook() -> None:
    """Hardened: one message, refused for its bare LF. Legacy: two messages."""
    hardened = _engine(smtp.EngineSettings(hostname="h"))
    hardened.receive(SMUGGLE)
    evs = _events(hardened)
    assert sum(isinstance(e, smtp.MessageComplete) for e in evs) == 0
    assert b"550 5.6.0" in hardened.take_output()
    legacy = _engine(smtp.EngineSettings(hostname="h", legacy_bare_lf=True))
    legacy.receive(SMUGGLE)
    evs = _events(legacy)
    assert sum(isinstance(e, smtp.MessageComplete) for e in evs) == 2
    body = b"".join(e.data for e in evs if isinstance(e, smtp.DataChunk))
    assert body.startswith(b"Subject: one\r\n\r\nhi\r\n\n") and b"Subject: two" in body


def test_body_checker_bare_line_endings_hook() -> None:
    assert BodyChecker(1000).feed(b"a\nb\r\n") is False
    legacy = BodyChecker(1000, bare_line_endings=True)
    assert legacy.feed(b"a\nb\r\n") and legacy.finish() is None


class _Lookup:
    def vrfy(self, arg: str) -> smtp.Reply:
        return smtp.Reply(250, "2.1.5", f"<{arg}@x>")

    def expn(self, arg: str) -> smtp.Reply:
        return smtp.Reply(250, "2.1.5", ("<a@x>", "<b@x>"))


def test_engine_vrfy_expn_hook() -> None:
    hardened = _engine(smtp.EngineSettings(hostname="h"))
    hardened.receive(b"VRFY alice\r\nEXPN team\r\n")
    _events(hardened)
    assert hardened.take_output() == smtp.VRFY_REPLY.encode() + smtp.EXPN_REPLY.encode()
    legacy = _engine(smtp.EngineSettings(hostname="h", legacy_accounts=_Lookup()))
    legacy.receive(b"VRFY alice\r\nEXPN team\r\n")
    _events(legacy)
    assert legacy.take_output() == b"250 2.1.5 <alice@x>\r\n250-2.1.5 <a@x>\r\n250 2.1.5 <b@x>\r\n"


class _Dir:
    def is_local_domain(self, domain: str) -> bool:
        return domain == "example.test"

    def resolve(self, address: str) -> Resolution | None:
        return Resolution(("alice@example.test",), ()) if address.startswith("alice@") else None


def test_recipient_policies() -> None:
    d = _Dir()
    foreign = Mailbox("victim", "remote.example")
    unknown = Mailbox("nobody", "example.test")
    assert STRICT.decide(foreign, d, may_relay=False).reply.code == 554  # type: ignore[arg-type]
    assert STRICT.decide(unknown, d, may_relay=False).reply.code == 550  # type: ignore[arg-type]
    legacy = LegacyRecipients()
    for rcpt in (foreign, unknown):
        decision = legacy.decide(rcpt, d, may_relay=False)  # type: ignore[arg-type]
        assert decision.reply.code == 250 and decision.resolution is not None
        assert decision.resolution.remote == (str(rcpt),)


def test_legacy_profile_only_weakens_what_it_says() -> None:
    base = smtp.EngineSettings(hostname="h", tls_available=True, auth_required=True)
    weak = LegacyProfile(domain="example.test").smtp_settings(base, _Dir())  # type: ignore[arg-type]
    assert weak.hostname == "h" and weak.max_message_size == base.max_message_size
    assert not weak.tls_available and not weak.auth_required and not weak.auth_requires_tls
    assert weak.legacy_bare_lf and weak.legacy_accounts is not None


def test_the_server_profile_defaults_to_hardened() -> None:
    """``server.profile.HARDENED``, what every configuration runs, changes nothing."""
    from mailfort.server.profile import HARDENED, Profile

    base = smtp.EngineSettings(hostname="h", tls_available=True, auth_required=True)
    assert HARDENED.smtp(base, _Dir()) is base  # type: ignore[arg-type]
    assert HARDENED.imap_settings is None and HARDENED.pop3_settings is None
    assert all(getattr(HARDENED, f.name) in (None, False) for f in dataclasses.fields(Profile))


def test_the_lab_composes_its_server_from_the_seams() -> None:
    """Every seam of the server's profile is set by the lab, to the lab's own rules."""
    from mailfort.server.profile import Profile

    legacy = LegacyProfile(domain="example.test")
    composed = legacy.compose()
    assert all(getattr(composed, f.name) not in (None, False)
               for f in dataclasses.fields(Profile))
    base = smtp.EngineSettings(hostname="h", tls_available=True, auth_required=True)
    weak = composed.smtp(base, _Dir())  # type: ignore[arg-type]
    same = legacy.smtp_settings(base, _Dir())  # type: ignore[arg-type]
    assert dataclasses.replace(weak, legacy_accounts=None) == dataclasses.replace(
        same, legacy_accounts=None)
    assert weak.legacy_accounts is not None
    assert weak.legacy_accounts.expn("alice").code == 250  # answered from the directory
