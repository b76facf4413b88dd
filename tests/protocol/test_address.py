"""Strict RFC 5321 path parsing: relay tricks stay opaque, malformed paths are refused."""

from __future__ import annotations

import time
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mailfort.protocol.address import (
    AddressError,
    Mailbox,
    _plain_path,
    _Scanner,
    parse_esmtp_params,
    parse_mail_argument,
    quote_local_part,
)
from tests.fuzzing import examples


def rcpt(arg: str, *, utf8: bool = False) -> Mailbox:
    mbox, params = parse_mail_argument(arg, prefix="TO:", null_allowed=False, smtputf8_allowed=utf8)
    assert mbox is not None
    assert params == {}
    return mbox


def rcpt_error(arg: str, *, utf8: bool = False) -> AddressError:
    with pytest.raises(AddressError) as exc:
        parse_mail_argument(arg, prefix="TO:", null_allowed=False, smtputf8_allowed=utf8)
    return exc.value


# --- the relay tricks of old: parsed literally, never turned into a foreign next hop ---


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("<u%foreign@local>", Mailbox("u%foreign", "local")),
        ('<"u@foreign"@local>', Mailbox("u@foreign", "local")),
        ('<"u%foreign"@local>', Mailbox("u%foreign", "local")),
        ("<foreign!u@local>", Mailbox("foreign!u", "local")),
        ("<u%foreign.test@local.test>", Mailbox("u%foreign.test", "local.test")),
        ('<"u@foreign.test"@local.test>', Mailbox("u@foreign.test", "local.test")),
        ("<foreign.test!u@local.test>", Mailbox("foreign.test!u", "local.test")),
        # a source route is checked for syntax and then ignored (RFC 5321 §4.1.1.3, App. C)
        ("<@local:u@foreign>", Mailbox("u", "foreign")),
        ("<@a,@b:u@c>", Mailbox("u", "c")),
        ("<@local.test:u@foreign.test>", Mailbox("u", "foreign.test")),
        ("<@[192.0.2.1],@b.test:u@c.test>", Mailbox("u", "c.test")),
        # case: the domain is lower-cased, the local part kept as written
        ("<U@LOCAL.TEST>", Mailbox("U", "local.test")),
        ("<u@[192.0.2.1]>", Mailbox("u", "[192.0.2.1]", literal=True)),
    ],
)
def test_relay_trick_forms(path: str, expected: Mailbox) -> None:
    assert rcpt(f"TO:{path}") == expected


@pytest.mark.parametrize(
    "path",
    [
        "<foreign!u>",  # a bang path without a domain
        "<u@foreign@local>",  # a second unquoted @
        "<u@local.test.>",  # trailing dot
        "<u%foreign>",
        "<@local:>",
        "<@local:u>",
        "<@local u@foreign>",  # route without ":"
        "<@:u@foreign>",
        "<@local,u@foreign>",
    ],
)
def test_relay_trick_malformed_forms_are_refused(path: str) -> None:
    err = rcpt_error(f"TO:{path}")
    assert (err.reply.code, err.reply.enhanced) == (501, "5.1.3")


# --- the grammar ---


@pytest.mark.parametrize(
    ("arg", "local", "domain"),
    [
        ("TO:<u@example.test>", "u", "example.test"),
        ("to:<U@EXAMPLE.TEST>", "U", "example.test"),
        ("To:<u@Example.Test>", "u", "example.test"),
        ("TO: <u@example.test>", "u", "example.test"),  # one space tolerated
        ("TO:<u@example.test>   ", "u", "example.test"),  # trailing spaces ignored
        ("TO:<first.last+tag@sub.example.test>", "first.last+tag", "sub.example.test"),
        ("TO:<!#$%&'*+-/=?^_`{|}~@example.test>", "!#$%&'*+-/=?^_`{|}~", "example.test"),
        ("TO:<u@a-b.example.test>", "u", "a-b.example.test"),
        ("TO:<u@xn--bcher-kva.test>", "u", "xn--bcher-kva.test"),
        ("TO:<u@123.example>", "u", "123.example"),
        ("TO:<u@localhost>", "u", "localhost"),
        ('TO:<"a b"@example.test>', "a b", "example.test"),
        ('TO:<"a..b"@example.test>', "a..b", "example.test"),
        ('TO:<"\\a"@example.test>', "a", "example.test"),  # a needless quoted pair
        ('TO:<"with \\"quote\\" and \\\\"@example.test>', 'with "quote" and \\', "example.test"),
        ("TO:<" + "a" * 64 + "@example.test>", "a" * 64, "example.test"),
        ("TO:<u@" + "a" * 63 + ".test>", "u", "a" * 63 + ".test"),
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
        ("TO:<u@[ipv6:2001:DB8:0:0:0:0:0:1]>", "[IPv6:2001:db8::1]"),  # canonical form
        ("TO:<u@[IPv6:::1]>", "[IPv6:::1]"),
    ],
)
def test_address_literals_are_marked(arg: str, domain: str) -> None:
    mbox = rcpt(arg)
    assert mbox.literal and mbox.domain == domain


@pytest.mark.parametrize(
    "arg",
    [
        "TO:u@example.test",  # angle brackets are required
        "TO:<u@example.test",
        "TO:u@example.test>",
        "TO:<<u@example.test>>",
        "TO:  <u@example.test>",  # only one space after the colon
        "TO:\t<u@example.test>",
        "TO:",
        "TO:<",
        "TO:<>",  # the null path is for senders only
        "TO:<@>",
        "TO:<u@>",
        "TO:<@local.test>",
        "TO:<u>",
        "TO:<u@.local.test>",
        "TO:<u@local..test>",
        "TO:<u@-local.test>",
        "TO:<u@local-.test>",
        "TO:<u@local_x.test>",
        "TO:<.u@local.test>",
        "TO:<u.@local.test>",
        "TO:<u..v@local.test>",
        "TO:<u v@local.test>",
        "TO:< u@local.test>",
        "TO:<u@local.test >",
        "TO:<u@local test>",
        "TO:<u\t@local.test>",
        'TO:<"u@local.test>',
        'TO:<u"@local.test>',
        'TO:<"u"v@local.test>',
        'TO:<""@local.test>',  # empty local part
        'TO:<"u\\"@local.test>',
        "TO:<u(comment)@local.test>",
        "TO:<u@[192.0.2.1>",
        "TO:<u@192.0.2.1]>",
        "TO:<u@[192.0.2.300]>",
        "TO:<u@[192.0.2]>",
        "TO:<u@[192.0.2.01]>",
        "TO:<u@[2001:db8::1]>",  # IPv6 without the tag
        "TO:<u@[IPv6:zz::1]>",
        "TO:<u@[IPv6:fe80::1%eth0]>",  # zone id
        "TO:<u@[IPv6:192.0.2.1]>",
        "TO:<u@[foo:bar]>",
        "TO:<u@[]>",
        "TO:<u@[192.0.2.1].test>",
        "TO:<u\x01@local.test>",
        'TO:<"u\x00"@local.test>',
        'TO:<"u\x7f"@local.test>',
        "TO:<u@local.test>junk",
        "TO:<u@local.test>\tSIZE=1",
        "TO:<" + "a" * 65 + "@local.test>",
        'TO:<"' + "a" * 63 + '"@local.test>',  # 65 octets as written
        "TO:<u@" + "a" * 64 + ".test>",
        "TO:<u@" + ("a" * 60 + ".") * 5 + "test>",
        "TO:<@" + "a" * 200 + ":u@" + "b" * 60 + ".test>",  # path over 256 octets
        "TO:<ü@local.test>",  # UTF-8 without SMTPUTF8
        "TO:<u@bücher.test>",
    ],
)
def test_invalid_paths(arg: str) -> None:
    err = rcpt_error(arg)
    assert err.reply.code == 501
    assert err.reply.enhanced == "5.1.3"
    assert isinstance(err, ValueError)


@pytest.mark.parametrize(
    "arg",
    [
        "TO:<u\x85@local.test>",  # C1 control
        "TO:<u\u00a0v@local.test>",  # no-break space
        "TO:<u\u2028@local.test>",  # line separator
        "TO:<u\u202e@local.test>",  # bidi override (spoofing)
        'TO:<"u\u200b"@local.test>',  # zero-width space, even quoted
        "TO:<\udc80@local.test>",  # lone surrogate
        "TO:<u@loc\u2028al.test>",
        "TO:<u@\u00e9\u200d.test>",
        "TO:<u@\udc80.test>",
        "TO:<u@b\u00fccher\u2603.test>",  # a symbol is not a label character
    ],
)
def test_unicode_controls_refused_even_with_smtputf8(arg: str) -> None:
    assert rcpt_error(arg, utf8=True).reply.code == 501


def test_utf8_allowed_with_smtputf8() -> None:
    mbox = rcpt("TO:<ü@bücher.test>", utf8=True)
    assert mbox == Mailbox("ü", "bücher.test")
    assert rcpt('TO:<"jö rg"@example.test>', utf8=True).local_part == "jö rg"


def test_utf8_domain_lowercases_ascii_only() -> None:
    # U-labels are kept as given: mailfort does not guess Unicode case mappings.
    assert rcpt("TO:<U@BÜCHER.TEST>", utf8=True).domain == "bÜcher.test"


def test_local_part_limit_counts_octets() -> None:
    assert rcpt("TO:<" + "ü" * 32 + "@x.test>", utf8=True).local_part == "ü" * 32
    assert rcpt_error("TO:<" + "ü" * 33 + "@x.test>", utf8=True).reply.code == 501


# --- MAIL FROM, parameters, error kinds ---


def test_sender_null_path_and_params() -> None:
    mbox, params = parse_mail_argument(
        "FROM:<> SIZE=1000 BODY=8BITMIME smtputf8",
        prefix="FROM:",
        null_allowed=True,
        smtputf8_allowed=False,
    )
    assert mbox is None
    assert params == {"SIZE": "1000", "BODY": "8BITMIME", "SMTPUTF8": None}


def test_sender_with_route_and_params() -> None:
    mbox, params = parse_mail_argument(
        "from:<@relay.test:Alice@Example.TEST> AUTH=<>",
        prefix="FROM:",
        null_allowed=True,
        smtputf8_allowed=False,
    )
    assert mbox == Mailbox("Alice", "example.test")
    assert params == {"AUTH": "<>"}


@pytest.mark.parametrize("arg", ["FROM:<a@b@c>", "FROM:a@b", "FROM:<a@b.>", "FROM:<>x"])
def test_sender_errors_use_sender_code(arg: str) -> None:
    with pytest.raises(AddressError) as exc:
        parse_mail_argument(arg, prefix="FROM:", null_allowed=True, smtputf8_allowed=False)
    assert exc.value.kind == "sender"
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (501, "5.1.7")
    assert exc.value.reply.lines[0].startswith("Bad sender address syntax: ")


def test_null_sender_refused_when_not_allowed() -> None:
    with pytest.raises(AddressError) as exc:
        parse_mail_argument("FROM:<>", prefix="FROM:", null_allowed=False, smtputf8_allowed=False)
    assert exc.value.reply.enhanced == "5.1.7"


@pytest.mark.parametrize(
    ("arg", "prefix"),
    [("FROM:<u@local.test>", "TO:"), ("TO<u@x.test>", "TO:"), ("FROM <u@x.test>", "FROM:")],
)
def test_wrong_prefix_is_a_syntax_error(arg: str, prefix: str) -> None:
    with pytest.raises(AddressError) as exc:
        parse_mail_argument(arg, prefix=prefix, null_allowed=True, smtputf8_allowed=False)
    assert exc.value.kind == "syntax"
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (501, "5.5.4")


def test_unknown_prefix_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="prefix") as exc:
        parse_mail_argument("X:<u@x.test>", prefix="X:", null_allowed=True, smtputf8_allowed=False)
    assert not isinstance(exc.value, AddressError)


def test_address_error_carries_reply_and_reason() -> None:
    err = AddressError("bad domain", kind="recipient")
    assert err.why == "bad domain" and err.kind == "recipient"
    assert err.reply.encode() == b"501 5.1.3 Bad recipient address syntax: bad domain\r\n"
    assert str(err) == "Bad recipient address syntax: bad domain"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("SIZE=1", {"SIZE": "1"}),
        ("size=1 body=7BIT", {"SIZE": "1", "BODY": "7BIT"}),
        ("X-FOO", {"X-FOO": None}),
        ("9X=a-b.c", {"9X": "a-b.c"}),
        ("", {}),
    ],
)
def test_good_params(text: str, expected: dict[str, str | None]) -> None:
    assert parse_esmtp_params(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "SIZE=1 SIZE=2",
        "size=1 SIZE=2",  # duplicates compare case-insensitively
        "=x",
        "SIZE=",
        "A=b=c",
        "-X=1",
        "X_Y=1",
        "X=\x7f",
        "X=a\x01",
        "A=1  B=2",
        " A=1",
        "A=é",  # UTF-8 values only under SMTPUTF8
    ],
)
def test_bad_params(text: str) -> None:
    with pytest.raises(AddressError) as exc:
        parse_esmtp_params(text)
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (501, "5.5.4")


def test_utf8_param_value_under_smtputf8() -> None:
    assert parse_esmtp_params("X=é", smtputf8_allowed=True) == {"X": "é"}
    with pytest.raises(AddressError):
        parse_esmtp_params("X=\u2028", smtputf8_allowed=True)


def test_params_after_path_are_returned() -> None:
    mbox, params = parse_mail_argument(
        "TO:<u@x.test> NOTIFY=NEVER ORCPT=rfc822;u@x.test",
        prefix="TO:",
        null_allowed=False,
        smtputf8_allowed=False,
    )
    assert mbox == Mailbox("u", "x.test")
    assert params == {"NOTIFY": "NEVER", "ORCPT": "rfc822;u@x.test"}


# --- printing ---


def test_str_requotes_only_when_needed() -> None:
    assert str(rcpt("TO:<u@example.test>")) == "u@example.test"
    assert str(rcpt('TO:<"u@foreign"@example.test>')) == '"u@foreign"@example.test'
    assert str(rcpt('TO:<"plain"@example.test>')) == "plain@example.test"
    assert str(rcpt('TO:<"a.b"@example.test>')) == "a.b@example.test"
    assert str(rcpt('TO:<"a..b"@example.test>')) == '"a..b"@example.test'
    assert str(rcpt('TO:<"a\\"b"@example.test>')) == '"a\\"b"@example.test'
    assert str(rcpt("TO:<u@[IPv6:2001:DB8::1]>")) == "u@[IPv6:2001:db8::1]"
    assert quote_local_part("") == '""'


# --- no backtracking: hostile inputs are refused in linear time ---


@pytest.mark.parametrize(
    "arg",
    [
        "TO:<" + "a." * 50_000,
        'TO:<"' + "\\a" * 50_000,
        "TO:<" + "@a," * 30_000,
        "TO:<" + "@[" * 50_000,
        "TO:<@" + "[192.0.2.1],@" * 20_000 + ":u@x.test>",
        "TO:<u@" + "a." * 50_000 + "test>",
        "TO:<u@x.test> " + "A=1 " * 50_000,
    ],
)
def test_hostile_inputs_are_fast(arg: str) -> None:
    start = time.perf_counter()
    with pytest.raises(AddressError):
        parse_mail_argument(arg, prefix="TO:", null_allowed=False, smtputf8_allowed=True)
    assert time.perf_counter() - start < 2.0


# --- properties ---


def _parse_any(text: str, *, prefix: str, utf8: bool) -> None:
    try:
        mbox, params = parse_mail_argument(
            text, prefix=prefix, null_allowed=prefix == "FROM:", smtputf8_allowed=utf8
        )
    except AddressError as exc:
        assert exc.reply.code == 501
        assert exc.reply.enhanced in ("5.1.3", "5.1.7", "5.5.4")
        return
    assert all(k == k.upper() and k for k in params)
    if mbox is None:
        assert prefix == "FROM:"
        return
    printed = str(mbox)
    assert printed.isprintable()
    # whatever parses prints back to the same mailbox
    again, _ = parse_mail_argument(
        f"{prefix}<{printed}>", prefix=prefix, null_allowed=False, smtputf8_allowed=utf8
    )
    assert again == mbox


_all_chars = st.characters(exclude_categories=())  # surrogates and controls included
_path_chars = st.sampled_from(
    [*'<>@"\\.:,[]%! =aZ09-_éü', "IPv6:", "::1", "192.0.2.1", "\x00", "\x85", "\u2028"]
)


@settings(max_examples=examples(500), deadline=None)
@given(st.text(alphabet=_all_chars, max_size=120), st.sampled_from(["TO:", "FROM:"]), st.booleans())
def test_arbitrary_text_only_raises_address_error(text: str, prefix: str, utf8: bool) -> None:
    _parse_any(prefix + text, prefix=prefix, utf8=utf8)


@settings(max_examples=examples(1000), deadline=None)
@given(
    st.lists(_path_chars, max_size=40).map("".join),
    st.sampled_from(["TO:", "FROM:"]),
    st.booleans(),
)
def test_path_like_text_only_raises_address_error(text: str, prefix: str, utf8: bool) -> None:
    _parse_any(prefix + "<" + text, prefix=prefix, utf8=utf8)


_atom = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~",
    min_size=1,
    max_size=10,
)
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_ascii_local = st.one_of(
    st.lists(_atom, min_size=1, max_size=4).map(".".join),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=30),
)
_domain = st.lists(_label, min_size=1, max_size=4).map(".".join)


@settings(max_examples=examples(300), deadline=None)
@given(_ascii_local, st.one_of(_domain, st.ip_addresses()))
def test_round_trip(local: str, where: str | IPv4Address | IPv6Address) -> None:
    if isinstance(where, str):
        mbox = Mailbox(local, where)
    else:
        tag = "IPv6:" if where.version == 6 else ""
        mbox = Mailbox(local, f"[{tag}{where}]", literal=True)
    assume(len(quote_local_part(local).encode()) <= 64)
    assert rcpt(f"TO:<{mbox}>") == mbox
    assert rcpt(f"TO:<@route.test:{mbox}>") == mbox


_u_label = st.text(
    alphabet=st.characters(categories=("Ll", "Lo", "Nd")), min_size=1, max_size=8
).filter(lambda s: s.lower() == s)


@settings(max_examples=examples(200), deadline=None)
@given(
    st.text(alphabet=st.characters(categories=("L", "N", "P", "S")), min_size=1, max_size=16),
    st.lists(st.one_of(_label, _u_label), min_size=1, max_size=3).map(".".join),
)
def test_round_trip_utf8(local: str, domain: str) -> None:
    mbox = Mailbox(local, domain)
    assume(len(quote_local_part(local).encode()) <= 64 and len(domain.encode()) <= 255)
    assume(all(len(label.encode()) <= 63 for label in domain.split(".")))
    assert rcpt(f"TO:<{mbox}>", utf8=True) == mbox


# --- the everyday path's shortcut agrees with the scanner ---


def _by_scanner(text: str, utf8: bool) -> tuple[Mailbox | None, int] | AddressError:
    scanner = _Scanner(text, utf8, "recipient")
    try:
        return scanner.path(null_allowed=False), scanner.pos
    except AddressError as exc:
        return exc


_rough_label = st.from_regex(r"[a-z0-9-]{0,4}|[a-z]{60,66}", fullmatch=True)
_plain_chars = st.sampled_from([*"<>@.-aZ09!%_=", "ab", "x.test", "\u00e9"])


@settings(max_examples=examples(1000), deadline=None)
@given(
    st.one_of(
        st.lists(_path_chars, max_size=40).map("".join),
        st.lists(_plain_chars, max_size=40).map("".join),
        st.tuples(st.lists(st.one_of(_atom, st.just("")), min_size=1, max_size=30)
                  .map(".".join),
                  st.lists(st.one_of(_label, _rough_label), min_size=1, max_size=40)
                  .map(".".join),
                  st.sampled_from(["", " SIZE=1", "x", ".", ">"]))
        .map(lambda t: f"<{t[0]}@{t[1]}>{t[2]}"),
    ),
    st.booleans(),
)
def test_plain_path_shortcut_takes_only_what_the_scanner_takes(text: str, utf8: bool) -> None:
    """Whatever the shortcut accepts, the scanner accepts with the same mailbox and end;
    lengths at and past every limit included (up to 30 atoms, 40 labels)."""
    for candidate in ("<" + text, text):
        fast = _plain_path(candidate)
        if fast is not None:
            assert _by_scanner(candidate, utf8) == fast


def test_plain_path_shortcut_limits() -> None:
    """At each length limit the shortcut declines and the scanner's error stands."""
    for arg in ("TO:<a@b-.test>", "TO:<a@-b.test>", "TO:<a@b..test>", "TO:<a..b@x.test>",
                "TO:<.a@x.test>", "TO:<a@x.test.>", f"TO:<{'a' * 65}@x.test>",
                f"TO:<a@{'b' * 64}.test>",
                f"TO:<a@{'.'.join(['b' * 60] * 5)}>", f"TO:<{'a' * 60}@{'b.' * 100}test>"):
        with pytest.raises(AddressError):
            rcpt(arg)
    assert rcpt(f"TO:<{'a' * 64}@{'b' * 63}.Test>") == Mailbox("a" * 64, "b" * 63 + ".test")
    assert quote_local_part("a.b") == "a.b" and quote_local_part(".a") == '".a"'
