"""SRS (policy/srs.py) and its acceptance at RCPT (policy/recipients.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mailfort.directory.base import Resolution
from mailfort.policy import srs as srs_mod
from mailfort.policy.recipients import STRICT, BounceReturn, StrictRecipients
from mailfort.policy.srs import DAY, SRS, is_srs, rotate
from mailfort.protocol.address import Mailbox

NOW = 20_000 * DAY + 3600.0


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def srs(tmp_path: Path, clock: Clock) -> SRS:
    return SRS(tmp_path / "data" / "srs.key", 21, clock)


def local_of(address: str) -> str:
    return address.rpartition("@")[0]


def test_forward_then_reverse(srs: SRS) -> None:
    out = srs.forward("someone@elsewhere.test", "example.test")
    assert out is not None
    local, _, domain = out.rpartition("@")
    assert domain == "example.test"
    assert local.startswith("SRS0=") and local.endswith("=elsewhere.test=someone")
    h, tt = local.split("=")[1:3]
    assert len(h) == srs_mod.HASH_CHARS and len(tt) == 2
    assert srs.reverse(local) == "someone@elsewhere.test"
    # Another MTA may change the case of the local part: still ours.
    assert srs.reverse(local.upper()) == "SOMEONE@ELSEWHERE.TEST"


def test_key_file_is_made_once_0600_and_kept(srs: SRS, tmp_path: Path) -> None:
    first = srs.forward("a@b.test", "example.test")
    st = os.stat(srs.key_file)
    assert stat.S_IMODE(st.st_mode) == 0o600
    again = SRS(srs.key_file, 21, srs.clock)  # another process: the same key
    assert again.forward("a@b.test", "example.test") == first


def test_altered_or_forged_addresses_do_not_verify(srs: SRS, tmp_path: Path) -> None:
    local = local_of(srs.forward("someone@elsewhere.test", "example.test") or "")
    _, h, tt, dom, user = local.split("=")
    flipped = ("a" if h[0] != "a" else "b") + h[1:]
    for forged in (
        f"SRS0={flipped}={tt}={dom}={user}",  # hash changed
        f"SRS0={h}={tt}={dom}=victim",  # another local part, same hash
        f"SRS0={h}={tt}=victim.test={user}",  # another domain
        f"SRS0={h}=aa={dom}={user}",  # another day
        f"SRS0={h}={tt}={dom}",  # parts missing
        f"SRS0=={tt}={dom}={user}",
        "SRS0=abcdef=zz=elsewhere.test=someone",
        f"SRS1={h}={dom}=={h}={tt}={dom}={user}",
        "someone",
    ):
        assert srs.reverse(forged) is None, forged
    other = SRS(tmp_path / "other.key", 21, srs.clock)  # someone else's key
    assert other.reverse(local) is None


def test_time_stamp_expires_after_max_age(srs: SRS, clock: Clock) -> None:
    local = local_of(srs.forward("someone@elsewhere.test", "example.test") or "")
    clock.t += 21 * DAY
    assert srs.reverse(local) == "someone@elsewhere.test"
    clock.t += DAY
    assert srs.reverse(local) is None
    clock.t = NOW - DAY  # from "tomorrow": not accepted either (age wraps to 1023 days)
    assert srs.reverse(local) is None


def test_rotation_keeps_the_previous_key_for_verifying(srs: SRS) -> None:
    old = local_of(srs.forward("someone@elsewhere.test", "example.test") or "")
    rotate(srs.key_file)
    assert stat.S_IMODE(os.stat(srs.key_file).st_mode) == 0o600
    new = local_of(srs.forward("someone@elsewhere.test", "example.test") or "")
    assert new != old  # signed with the new key (read again without a restart)
    assert srs.reverse(old) == srs.reverse(new) == "someone@elsewhere.test"
    rotate(srs.key_file)  # two rotations: the first key is gone
    assert srs.reverse(old) is None
    assert srs.reverse(new) == "someone@elsewhere.test"


def test_null_and_uncarriable_senders_stay(srs: SRS) -> None:
    assert srs.forward("", "example.test") is None
    assert srs.forward('"john doe"@elsewhere.test', "example.test") is None
    assert srs.forward("jöran@elsewhere.test", "example.test") is None
    long = "x" * 40 + "@elsewhere.test"  # the SRS local part would pass 64 octets
    assert srs.forward(long, "example.test") is None


def test_re_forwarding_an_srs_sender_gives_srs1_back_to_the_first_hop(
        srs: SRS, tmp_path: Path) -> None:
    first_hop = SRS(tmp_path / "hop1.key", 21, srs.clock)
    srs0 = first_hop.forward("someone@origin.test", "hop1.test") or ""
    out = srs.forward(srs0, "example.test") or ""
    local = local_of(out)
    assert local.startswith("SRS1=") and f"=hop1.test=={local_of(srs0)[5:]}" in local
    back = srs.reverse(local)
    assert back == srs0  # back to the first forwarder, which checks its own hash
    assert first_hop.reverse(local_of(back)) == "someone@origin.test"
    # A third forwarder keeps the first hop and signs again: the address does not grow.
    third = SRS(tmp_path / "hop3.key", 21, srs.clock)
    again = local_of(third.forward(out, "third.test") or "")
    assert again.startswith("SRS1=") and len(again) == len(local)
    assert third.reverse(again) == srs0
    assert srs.reverse(again) is None  # not our hash


def test_is_srs() -> None:
    assert is_srs("SRS0=x") and is_srs("srs1=x") and not is_srs("srs2=x")
    assert not is_srs("srs0") and not is_srs("alice")


# ------------------------------------------------------------------ RCPT acceptance


class Dir:
    """The two questions the recipient policy asks of a directory."""

    def is_local_domain(self, domain: str) -> bool:
        return domain == "example.test"

    def resolve(self, address: str) -> Resolution | None:
        if address == "alice@example.test":
            return Resolution(("alice@example.test",), ())
        return None


def mailbox(address: str) -> Mailbox:
    local, _, domain = address.rpartition("@")
    return Mailbox(local, domain)


def test_rcpt_to_a_verified_srs_address_is_a_bounce_return_for_null_senders_only(
        srs: SRS) -> None:
    policy = StrictRecipients(srs)
    addr = mailbox(srs.forward("someone@elsewhere.test", "example.test") or "")
    d = Dir()
    ok = policy.decide(addr, d, may_relay=False, bounce=True)  # type: ignore[arg-type]
    assert isinstance(ok, BounceReturn) and ok.reply.code == 250
    assert ok.resolution == Resolution((), ("someone@elsewhere.test",))
    assert not ok.relay
    for may_relay in (False, True):  # a non-null sender: unknown user, even authenticated
        no = policy.decide(addr, d, may_relay=may_relay)  # type: ignore[arg-type]
        assert (no.reply.code, no.reply.enhanced, no.resolution) == (550, "5.1.1", None)


def test_rcpt_to_a_forged_srs_address_is_an_unknown_user(srs: SRS) -> None:
    policy = StrictRecipients(srs)
    forged = mailbox("SRS0=abcdef=aa=elsewhere.test=someone@example.test")
    no = policy.decide(forged, Dir(), may_relay=False, bounce=True)  # type: ignore[arg-type]
    assert (no.reply.code, no.reply.enhanced) == (550, "5.1.1")
    # Without SRS (the lab's and old configurations) it is just an unknown user too.
    no = STRICT.decide(forged, Dir(), may_relay=False, bounce=True)  # type: ignore[arg-type]
    assert (no.reply.code, no.reply.enhanced) == (550, "5.1.1")


def test_srs_address_of_a_local_sender_is_delivered_here(srs: SRS) -> None:
    policy = StrictRecipients(srs)
    addr = mailbox(srs.forward("alice@example.test", "example.test") or "")
    ok = policy.decide(addr, Dir(), may_relay=False, bounce=True)  # type: ignore[arg-type]
    assert isinstance(ok, BounceReturn) and ok.resolution == Resolution(("alice@example.test",),
                                                                        ())


def test_srs_domain_that_is_not_a_directory_domain(srs: SRS) -> None:
    policy = StrictRecipients(srs, "fwd.example.net")
    addr = mailbox(srs.forward("someone@elsewhere.test", "fwd.example.net") or "")
    ok = policy.decide(addr, Dir(), may_relay=False, bounce=True)  # type: ignore[arg-type]
    assert ok.reply.code == 250
    other = mailbox("SRS0=abcdef=aa=x.test=y@other.test")  # not ours: a relay attempt
    no = policy.decide(other, Dir(), may_relay=False, bounce=True)  # type: ignore[arg-type]
    assert no.reply.code == 554


def test_srs_settings_are_checked() -> None:
    from mailfort import config

    assert config.from_dict({}).srs.max_age_days == 21
    for bad in ({"max_age_days": 0}, {"max_age_days": 1024}, {"domain": "not a domain"}):
        with pytest.raises(config.ConfigError, match="srs"):
            config.from_dict({"srs": bad})
    off = config.from_dict({"srs": {"enabled": False}})
    assert srs_mod.for_config(off) is None
