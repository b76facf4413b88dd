"""The tolerant header-field reader and the RFC 5322 address and comment parsers that
DMARC, the submission sender check and the Authentication-Results filter share."""

from __future__ import annotations

from email.headerregistry import Address
from email.parser import BytesHeaderParser
from email.policy import compat32

from hypothesis import given, settings
from hypothesis import strategies as st

from mailfort.policy import headerfields
from mailfort.policy.headerfields import address_list


def test_fields_obsolete_names_folding_and_junk() -> None:
    block = (b"From : Bob <bob@x.test>\r\n"
             b"from:\tcarol@y.test,\r\n dave@y.test\r\n"
             b"not a field\r\n continued junk\r\n"
             b"X-Empty:\r\n"
             b"\r\n"
             b"From: body@z.test\r\n")
    assert headerfields.fields(block) == [
        ("from", " Bob <bob@x.test>"), ("from", "\tcarol@y.test, dave@y.test"), ("x-empty", "")]
    assert headerfields.values(block, "FROM") == [" Bob <bob@x.test>",
                                                  "\tcarol@y.test, dave@y.test"]
    # Any line ending ends a line: what some reader splits on, we split on.
    assert len(headerfields.values(b"From: a@x.test\nFrom: b@y.test\rFrom: c@z.test", "from")) == 3


def test_address_list() -> None:
    def boxes(text: str) -> list[str] | None:
        parsed = address_list(text)
        return None if parsed is None else parsed.mailboxes

    assert boxes("Bob <bob@X.Test>") == ["bob@x.test"]
    assert boxes('"ceo@bank.test" <e@evil.test>') == ["e@evil.test"]
    assert boxes('"a@b"@Evil.test') == ["a@b@evil.test"]
    assert boxes("<@route.test,@r2.test:ceo@bank.test>") == ["ceo@bank.test"]
    assert boxes("a@b.test, , c@d.test,") == ["a@b.test", "c@d.test"]
    assert boxes("Dr. Who <a.b@c.test.>") == ["a.b@c.test"]
    assert boxes("a (\\() @ x.test") == ["a@x.test"]
    assert boxes("a@[192.0.2.1]") == ["a@[192.0.2.1]"]
    group = address_list("<ceo@bank.test>, undisclosed:;")
    assert group is not None and group.mailboxes == ["ceo@bank.test"] and group.groups == 1
    assert group.single is None
    assert address_list("g: a@x.test, b@y.test;") == headerfields.AddressList(
        ["a@x.test", "b@y.test"], 1)
    for bad in ("a@x.test b@y.test", "ceo@bank.test (c) <e@evil.test>", "Bob",
                "(unterminated a@x.test", "<a@x.test", "a@", "@x.test", '"open@x.test',
                "g: a@x.test", "g: h: a@x.test;;", ".a@x.test"):
        assert address_list(bad) is None, bad
    assert address_list("") == headerfields.AddressList([], 0)


_ATEXT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-/=?^_`{|}~",
                 min_size=1, max_size=12)
_LABEL = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z")


@settings(max_examples=200, deadline=None)
@given(name=st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=30),
       user=_ATEXT,
       labels=st.lists(_LABEL, min_size=2, max_size=4))
def test_a_formatted_mailbox_reads_as_exactly_that_one_address(
    name: str, user: str, labels: list[str]
) -> None:
    """Whatever the display name (quotes, parentheses, commas, '@', non-ASCII; control
    characters are refused), the standard library's formatting of one mailbox is one
    mailbox to us."""
    domain = ".".join(labels)
    text = str(Address(display_name=name, username=user, domain=domain))
    parsed = address_list(text)
    assert parsed is not None, text
    assert parsed.single == f"{user}@{domain}", text


def _comment(text: str) -> str:
    return "(" + "".join("\\" + c if c in "()\\" else c for c in text) + ")"


@settings(max_examples=200, deadline=None)
@given(before=st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=20),
       after=st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=20))
def test_comments_with_quoted_pairs_are_skipped(before: str, after: str) -> None:
    text = f"{_comment(before)} ceo@bank.test {_comment(after)}"
    parsed = address_list(text)
    assert parsed is not None and parsed.single == "ceo@bank.test", text


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_the_reader_sees_every_from_field_pythons_email_sees(block: bytes) -> None:
    """Never raises, and never sees fewer From: fields than the standard library."""
    ours = headerfields.values(block, "from")
    theirs = BytesHeaderParser(policy=compat32).parsebytes(block).get_all("From") or []
    assert len(ours) >= len(theirs)
    for value in ours:
        address_list(value)  # never raises


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["From", "from ", "FROM\t", "To", "Sender", " x", "junk",
                                 "Subject"]), max_size=6))
def test_from_fields_are_counted_with_any_spacing(names: list[str]) -> None:
    block = b"".join(f"{n}: v@x.test\r\n".encode() for n in names)
    expected = sum(1 for n in names if n.strip().lower() == "from" and not n.startswith(" "))
    assert len(headerfields.values(block, "from")) == expected


def test_control_characters_in_a_name_do_not_hide_the_field() -> None:
    """Some readers drop NUL and other controls: to them ``Fr<NUL>om:`` is From:."""
    assert headerfields.values(b"Fr\x00om: ceo@bank.test\r\nFROM \t: b@x.test\r\n", "from") == [
        " ceo@bank.test", " b@x.test"]
    assert headerfields.field_name("Subject: x") == "subject"
    assert headerfields.field_name("no colon here") is None
    assert headerfields.field_name(": empty name") is None


_PIECES = st.lists(st.sampled_from(["From", "from", " ", "\t", ":", "\r", "\n", "\r\n", "\x00",
                                    "\x7f", "é", "x", "-", "\x0b"]), max_size=30).map("".join)


@settings(max_examples=3000, deadline=None, derandomize=True)
@given(text=_PIECES)
def test_lines_and_names_are_read_as_the_expressions_read_them(text: str) -> None:
    """``lines`` (str.split when every line ends alike) splits as ``_LINE_END`` does, and
    ``field_name`` (the ignored characters dropped only when the name has any) names a
    line as dropping them first does, on any mix of line ends and control characters."""
    assert headerfields.lines(text) == headerfields._LINE_END.split(text)
    name, colon, _ = text.partition(":")
    name = headerfields._IGNORED_IN_NAME.sub("", name)
    want = name.lower() if colon and headerfields._NAME.fullmatch(name) else None
    assert headerfields.field_name(text) == want
