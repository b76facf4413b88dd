"""Strict RFC 5321 path parsing: relay tricks stay opaque, malformed paths are refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailfort.protocol.address import (
    AddressError,
    Mailbox,
    parse_esmtp_params,
    parse_mail_argument,
)
from tests.fuzzing import examples


def rcpt(arg: str, *, utf8: bool = False) -> Mailbox:
    mbox, params = parse_mail_argument(
        arg, prefix="TO:", null_allowed=False, smtputf8_allowed=utf8
    )
    assert mbox is not None
    assert params == {}
    return mbox


@pytest.mark.parametrize(
    ("arg", "local", "domain"),
    [
        ("TO:<u@example.test>", "u", "example.test"),
        ("to:<U@EXAMPLE.TEST>", "U", "example.test"),
        ("TO: <u@example.test>", "u", "example.test"),  # one space tolerated
        ("TO:<first.last+tag@sub.example.test>", "first.last+tag", "sub.example.test"),
        # relay tricks: the local part is opaque, never a next hop
        ("TO:<u%foreign.test@local.test>", "u%foreign.test", "local.test"),
        ('TO:<"u@foreign.test"@local.test>', "u@foreign.test", "local.test"),
        ('TO:<"u%foreign.test"@local.test>', "u%foreign.test", "local.test"),
        ("TO:<foreign.test!u@local.test>", "foreign.test!u", "local.test"),
        # a source route is parsed and ignored (RFC 5321 §4.1.1.3)
        ("TO:<@local.test:u@foreign.test>", "u", "foreign.test"),
        ("TO:<@a.test,@b.test:u@c.test>", "u", "c.test"),
        ('TO:<"with \\"quote\\" and \\\\"@example.test>', 'with "quote" and \\', "example.test"),
    ],
)
def test_valid_paths(arg: str, local: str, domain: str) -> None:
    mbox = rcpt(arg)
    assert (mbox.local_part, mbox.domain, mbox.literal) == (local, domain, False)


@pytest.mark.parametrize(
    ("arg", "domain"),
    [
        ("TO:<u@[192.0.2.1]>", "[192.0.2.1]"),
        ("TO:<u@[IPv6:2001:db8::1]>", "[IPv6:2001:db8::1]"),
    ],
)
def test_address_literals_are_marked(arg: str, domain: str) -> None:
    mbox = rcpt(arg)
    assert mbox.literal and mbox.domain == domain


@pytest.mark.parametrize(
    "arg",
    [
        "TO:u@example.test",  # angle brackets are required
        "TO:<foreign.test!u>",  # no domain
        "TO:<u@foreign.test@local.test>",  # a second unquoted @
        "TO:<u@local.test.>",  # trailing dot
        "TO:<u@.local.test>",
        "TO:<u@local..test>",
        "TO:<u@-local.test>",
        "TO:<.u@local.test>",
        "TO:<u.@local.test>",
        "TO:<u..v@local.test>",
        "TO:<u v@local.test>",
        "TO:<u@local test>",
        "TO:<u@local.test",
        'TO:<"u@local.test>',
        "TO:<u@[192.0.2.300]>",
        "TO:<u@[IPv6:zz::1]>",
        "TO:<u@[foo:bar]>",
        "TO:<@local.test u@foreign.test>",
        "TO:<>",  # the null path is for senders only
        "TO:<u\x01@local.test>",
        'TO:<"u\x00"@local.test>',
        "TO:<u@local.test>junk",
        "TO:<" + "a" * 65 + "@local.test>",
        "TO:<u@" + "a" * 64 + ".test>",
        "TO:<u@" + ("a" * 60 + ".") * 5 + "test>",
        "TO:<ü@local.test>",  # UTF-8 without SMTPUTF8
        "FROM:<u@local.test>",  # wrong prefix
    ],
)
def test_invalid_paths(arg: str) -> None:
    with pytest.raises(AddressError) as exc:
        parse_mail_argument(arg, prefix="TO:", null_allowed=False, smtputf8_allowed=False)
    assert exc.value.reply.code == 501


def test_utf8_allowed_with_smtputf8() -> None:
    mbox = rcpt("TO:<ü@bücher.test>", utf8=True)
    assert mbox.local_part == "ü" and mbox.domain == "bücher.test"


def test_sender_null_path_and_params() -> None:
    mbox, params = parse_mail_argument(
        "FROM:<> SIZE=1000 BODY=8BITMIME smtputf8",
        prefix="FROM:", null_allowed=True, smtputf8_allowed=False,
    )
    assert mbox is None
    assert params == {"SIZE": "1000", "BODY": "8BITMIME", "SMTPUTF8": None}


def test_sender_errors_use_sender_code() -> None:
    with pytest.raises(AddressError) as exc:
        parse_mail_argument("FROM:<a@b@c>", prefix="FROM:", null_allowed=True,
                            smtputf8_allowed=False)
    assert exc.value.reply.enhanced == "5.1.7"


@pytest.mark.parametrize("text", ["SIZE=1 SIZE=2", "=x", "SIZE=", "A=b=c", "-X=1", "X=\x7f"])
def test_bad_params(text: str) -> None:
    with pytest.raises(AddressError):
        parse_esmtp_params(text)


def test_str_requotes_only_when_needed() -> None:
    assert str(rcpt("TO:<u@example.test>")) == "u@example.test"
    assert str(rcpt('TO:<"u@foreign"@example.test>')) == '"u@foreign"@example.test'
    assert str(rcpt('TO:<"plain"@example.test>')) == "plain@example.test"


@settings(max_examples=examples(500), deadline=None)
@given(st.text(max_size=120))
def test_arbitrary_text_only_raises_address_error(text: str) -> None:
    try:
        mbox, params = parse_mail_argument("TO:" + text, prefix="TO:", null_allowed=False,
                                           smtputf8_allowed=True)
    except AddressError as exc:
        assert exc.reply.code == 501
        return
    # whatever parses is a well-formed mailbox that prints back to something parseable
    assert mbox is not None and "\r" not in str(mbox) and "\n" not in str(mbox)
    assert all(k == k.upper() for k in params)


_atom = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-/=?^_`{|}~",
                min_size=1, max_size=10)
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


@settings(max_examples=examples(300), deadline=None)
@given(
    st.one_of(
        st.lists(_atom, min_size=1, max_size=4).map(".".join),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
    ),
    st.lists(_label, min_size=1, max_size=4).map(".".join),
)
def test_round_trip(local: str, domain: str) -> None:
    mbox = Mailbox(local, domain)
    if len(local.encode()) > 64 or len(domain) > 255:
        return
    parsed = rcpt(f"TO:<{mbox}>")
    assert parsed == mbox
