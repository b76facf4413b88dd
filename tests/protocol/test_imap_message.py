"""FETCH items and SEARCH matching of protocol/imap_message.py, on real message octets."""

from __future__ import annotations

import contextlib
import datetime
import imaplib
import os
import shutil
import time
from collections.abc import Iterator
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailfort.protocol import imap_message as im
from mailfort.protocol.imap_parse import (
    FetchAtt,
    Limits,
    SearchKey,
    Section,
    SequenceSet,
    parse_command,
)
from mailfort.store.imap_mailbox import wire_size

SIMPLE = (b"Date: Wed, 17 Jul 1996 02:23:25 -0700 (PDT)\r\n"
          b"From: Terry Gray <gray@cac.washington.edu>\r\n"
          b"Subject: IMAP4rev2 WG mtg summary and minutes\r\n"
          b"To: imap@cac.washington.edu\r\n"
          b"cc: minutes@CNRI.Reston.VA.US,\r\n John Klensin <KLENSIN@MIT.EDU>\r\n"
          b"Message-Id: <B27397-0100000@cac.washington.edu>\r\n"
          b"\r\n"
          b"Hello\r\nworld\r\n")

MIXED = (b"From: a@example.test\r\nTo: b@example.test\r\nSubject: with attachment\r\n"
         b"MIME-Version: 1.0\r\n"
         b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n'
         b"preamble\r\n"
         b"--XX\r\n"
         b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
         b"the text part\r\n"
         b"--XX\r\n"
         b"Content-Type: application/pdf; name=a.pdf\r\n"
         b"Content-Transfer-Encoding: base64\r\n"
         b'Content-Disposition: attachment; filename="a.pdf"\r\n'
         b"Content-Language: en, de\r\n\r\n"
         b"JVBERi0xLjQKAAE=\r\n"
         b"--XX--\r\n"
         b"epilogue\r\n")

ALTERNATIVE = (b"From: a@example.test\r\nSubject: alt\r\n"
               b"Content-Type: multipart/alternative; boundary=b1\r\n\r\n"
               b"--b1\r\nContent-Type: text/plain\r\n\r\nplain words\r\n"
               b"--b1\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: "
               b"quoted-printable\r\n\r\n<p>caf=C3=A9 html</p>\r\n"
               b"--b1--\r\n")

INNER = (b"From: Inner <inner@example.test>\r\nSubject: the original\r\n"
         b"Content-Type: multipart/mixed; boundary=in\r\n\r\n"
         b"--in\r\nContent-Type: text/plain\r\n\r\ninner one\r\n"
         b"--in\r\nContent-Type: text/plain\r\n\r\ninner two\r\n--in--\r\n")

FORWARD = (b"From: fwd@example.test\r\nSubject: Fwd: the original\r\n"
           b"Content-Type: multipart/mixed; boundary=out\r\n\r\n"
           b"--out\r\nContent-Type: text/plain\r\n\r\nsee below\r\n"
           b"--out\r\nContent-Type: message/rfc822\r\n\r\n" + INNER +
           b"\r\n--out--\r\n")

NO_BOUNDARY = (b"From: x@example.test\r\nContent-Type: multipart/mixed\r\n\r\n"
               b"--lost\r\nContent-Type: text/plain\r\n\r\nbody\r\n--lost--\r\n")

MISSING_DELIMITER = (b"From: x@example.test\r\nContent-Type: multipart/mixed; boundary=zz\r\n"
                     b"\r\nno delimiter here\r\n")

NON_ASCII = (b"From: =?utf-8?q?J=C3=BCrgen?= <jurgen@example.test>\r\n"
             b"To: undisclosed-recipients:;\r\n"
             b"Subject: =?utf-8?b?R3LDvMOfZQ==?=\r\n"
             b"Date: Mon, 07 Dec 2026 10:00:00 +0100\r\n"
             b"Content-Type: text/plain; charset=utf-8\r\n"
             b"Content-Transfer-Encoding: 8bit\r\n\r\n" +
             "Grüße aus Köln\r\n".encode())


def sec(part: tuple[int, ...] = (), text: str | None = None, *fields: str) -> Section:
    return Section(part, text, tuple(fields))


def body(data: bytes, section: Section) -> bytes | None:
    return im.section_bytes(im.parse(data), section, data)


# ---------------------------------------------------------------------------- ENVELOPE


def test_envelope_matches_the_rfc_example_shape() -> None:
    env = im.envelope(im.parse(SIMPLE))
    assert env[0] == b"Wed, 17 Jul 1996 02:23:25 -0700 (PDT)"
    assert env[1] == b"IMAP4rev2 WG mtg summary and minutes"
    gray = ((b"Terry Gray", None, b"gray", b"cac.washington.edu"),)
    assert env[2] == env[3] == env[4] == gray  # sender and reply-to default to from
    assert env[5] == ((None, None, b"imap", b"cac.washington.edu"),)
    assert env[6] == ((None, None, b"minutes", b"CNRI.Reston.VA.US"),
                      (b"John Klensin", None, b"KLENSIN", b"MIT.EDU"))
    assert env[7] is None and env[8] is None
    assert env[9] == b"<B27397-0100000@cac.washington.edu>"
    wire = im.fetch_item(FetchAtt("ENVELOPE"), SIMPLE)
    assert wire.startswith(b'ENVELOPE ("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)" '
                           b'"IMAP4rev2 WG mtg summary and minutes" '
                           b'(("Terry Gray" NIL "gray" "cac.washington.edu"))')
    assert wire.endswith(b'NIL NIL "<B27397-0100000@cac.washington.edu>")')


def test_envelope_groups_routes_and_encoded_words_left_alone() -> None:
    env = im.envelope(im.parse(NON_ASCII))
    assert env[1] == b"=?utf-8?b?R3LDvMOfZQ==?="
    assert env[2] == ((b"=?utf-8?q?J=C3=BCrgen?=", None, b"jurgen", b"example.test"),)
    assert env[5] == ((None, None, b"undisclosed-recipients", None), (None, None, None, None))
    got = im.addresses(b'team: "A, B" <a@x.test>, c@y.test; <@r1,@r2:d@z.test>, e')
    assert got == ((None, None, b"team", None), (b"A, B", None, b"a", b"x.test"),
                   (None, None, b"c", b"y.test"), (None, None, None, None),
                   (None, b"@r1,@r2", b"d", b"z.test"), (None, None, b"e", b"MISSING_DOMAIN"))
    assert im.envelope(im.parse(b"\r\nno header"))[2] is None


# ---------------------------------------------------------------------------- BODYSTRUCTURE


def test_bodystructure_of_a_plain_message() -> None:
    bs = im.bodystructure(im.parse(SIMPLE))
    assert bs == (b"text", b"plain", (b"charset", b"us-ascii"), None, None, b"7bit", 14, 2,
                  None, None, None, None)
    assert im.encode(im.bodystructure(im.parse(SIMPLE), extended=False)) == \
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 14 2)'


def test_bodystructure_of_mixed_with_attachment() -> None:
    bs = im.bodystructure(im.parse(MIXED))
    text, pdf = bs[0]
    assert text[:8] == (b"text", b"plain", (b"charset", b"utf-8"), None, None, b"7bit", 13, 0)
    assert pdf[:7] == (b"application", b"pdf", (b"name", b"a.pdf"), None, None, b"base64", 16)
    assert pdf[7:] == (None, (b"attachment", (b"filename", b"a.pdf")), (b"en", b"de"), None)
    assert bs[1:] == (b"mixed", (b"boundary", b"XX"), None, None, None)
    wire = im.encode(bs)
    assert wire.startswith(b'(("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 13 0 NIL NIL '
                           b'NIL NIL)("application" "pdf"')  # bodies side by side
    assert wire.endswith(b' "mixed" ("boundary" "XX") NIL NIL NIL)')


def test_bodystructure_of_a_forwarded_message() -> None:
    root = im.parse(FORWARD)
    fwd = im.bodystructure(root, extended=False)[0][1]
    assert fwd[:2] == (b"message", b"rfc822")
    assert fwd[6] == len(INNER) and fwd[-1] == INNER.count(b"\n") == 13
    assert fwd[7][1] == b"the original"  # the envelope of the inner message
    assert fwd[8][1] == b"mixed" and len(fwd[8][0]) == 2


def test_rfc2231_parameters_as_dovecot_shows_them() -> None:
    bs = im.bodystructure(im.parse(DIFFERENTIAL["rfc2231"]))
    leaf = bs[0][0]
    assert leaf[2] == (b"name", b"longname.bin")  # continuations joined
    assert leaf[8] == (b"inline", (b"filename*", b"utf-8''%C3%A4.bin"))  # charset kept
    assert leaf[3:5] == (b"<cid@x>", b"a file") and leaf[10] == b"http://x.test/a"
    assert bs[2] == (b"boundary", b"=_a b")


def test_malformed_multiparts_do_not_lose_the_message() -> None:
    bs = im.bodystructure(im.parse(NO_BOUNDARY), extended=False)
    assert bs == (im.Concat([(b"text", b"plain", (b"charset", b"us-ascii"), None, None,
                              b"7bit", 0, 0)]), b"mixed")
    bs = im.bodystructure(im.parse(MISSING_DELIMITER), extended=False)
    assert bs[1] == b"mixed" and len(bs[0]) == 1 and bs[0][0][6] == 0


# ---------------------------------------------------------------------------- sections


@pytest.mark.parametrize("data", [SIMPLE, MIXED, ALTERNATIVE, FORWARD, NO_BOUNDARY,
                                  MISSING_DELIMITER, NON_ASCII])
def test_header_and_text_make_the_whole_message(data: bytes) -> None:
    assert body(data, sec()) == data
    assert body(data, sec((), "HEADER")) + body(data, sec((), "TEXT")) == data


def test_part_numbers_and_message_nesting() -> None:
    assert body(MIXED, sec((1,))) == b"the text part"
    assert body(MIXED, sec((2,))) == b"JVBERi0xLjQKAAE="
    assert body(MIXED, sec((2,), "MIME")).startswith(b"Content-Type: application/pdf")
    assert body(MIXED, sec((3,))) is None and body(MIXED, sec((1, 4))) is None
    assert body(MIXED, sec((2, 1, 1))) == body(MIXED, sec((2,)))  # a leaf is its own 1
    assert body(SIMPLE, sec((1,))) == b"Hello\r\nworld\r\n"  # a single part is part 1
    assert body(FORWARD, sec((2,))) == INNER
    assert body(FORWARD, sec((2,), "HEADER")) == INNER.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert body(FORWARD, sec((2,), "TEXT")) == INNER.split(b"\r\n\r\n", 1)[1]
    assert body(FORWARD, sec((2,), "MIME")) == b"Content-Type: message/rfc822\r\n\r\n"
    assert body(FORWARD, sec((2, 1))) == b"inner one"
    assert body(FORWARD, sec((2, 2))) == b"inner two"
    assert body(FORWARD, sec((1,), "HEADER")) is None  # only message/rfc822 has one


def test_header_fields_and_not() -> None:
    assert body(SIMPLE, sec((), "HEADER.FIELDS", "subject", "CC")) == (
        b"Subject: IMAP4rev2 WG mtg summary and minutes\r\n"
        b"cc: minutes@CNRI.Reston.VA.US,\r\n John Klensin <KLENSIN@MIT.EDU>\r\n\r\n")
    assert body(SIMPLE, sec((), "HEADER.FIELDS", "X-None")) == b"\r\n"
    rest = body(SIMPLE, sec((), "HEADER.FIELDS.NOT", "Date", "Cc", "Message-Id", "From"))
    assert rest == (b"Subject: IMAP4rev2 WG mtg summary and minutes\r\n"
                    b"To: imap@cac.washington.edu\r\n\r\n")


def test_fetch_items_on_the_wire() -> None:
    att = FetchAtt("BODY.PEEK", sec((), "HEADER.FIELDS", "From"), (0, 5))
    assert im.fetch_item(att, SIMPLE) == b'BODY[HEADER.FIELDS (FROM)]<0> "From:"'
    assert im.fetch_item(FetchAtt("RFC822.SIZE"), SIMPLE) == b"RFC822.SIZE %d" % len(SIMPLE)
    assert im.fetch_item(FetchAtt("BODY", sec((1,))), SIMPLE) == \
        b"BODY[1] {14}\r\nHello\r\nworld\r\n"
    assert im.fetch_item(FetchAtt("BODY", sec((9,))), SIMPLE) == b"BODY[9] NIL"
    assert im.fetch_item(FetchAtt("BODY", sec()), NON_ASCII).startswith(
        b"BODY[] {%d}\r\nFrom:" % len(NON_ASCII))


def test_binary_decodes_the_transfer_encoding() -> None:
    pdf = b"%PDF-1.4\n\x00\x01"
    assert im.binary_bytes(im.parse(MIXED), (2,), MIXED) == pdf
    assert im.fetch_item(FetchAtt("BINARY", Section((2,))), MIXED) == \
        b"BINARY[2] ~{%d}\r\n" % len(pdf) + pdf
    assert im.fetch_item(FetchAtt("BINARY.SIZE", Section((2,))), MIXED) == b"BINARY.SIZE[2] 11"
    assert im.binary_bytes(im.parse(ALTERNATIVE), (2,), ALTERNATIVE) == \
        "<p>café html</p>".encode()
    whole = im.binary_bytes(im.parse(MIXED), (), MIXED)
    assert whole == MIXED.replace(b"Content-Transfer-Encoding: base64\r\n", b"").replace(
        b"Content-Language: en, de\r\n\r\nJVBERi0xLjQKAAE=",
        b"Content-Language: en, de\r\nContent-Transfer-Encoding: binary\r\n\r\n" + pdf)
    odd = b"Content-Transfer-Encoding: x-uuencode\r\n\r\nbegin\r\n"
    with pytest.raises(im.UnknownCTE):
        im.binary_bytes(im.parse(odd), (1,), odd)


def test_string_encoding() -> None:
    assert im.encode(None) == b"NIL"
    assert im.encode(b'say "hi" \\o/') == b'"say \\"hi\\" \\\\o/"'
    assert im.encode("Grüße") == b"{7}\r\n" + "Grüße".encode()
    assert im.encode(b"a\r\nb") == b"{4}\r\na\r\nb"
    assert im.encode(b"x" * 2000).startswith(b"{2000}\r\n")


@given(st.one_of(st.binary(max_size=40), st.sampled_from([
    b"", b'"', b"\\", b"\x00", b"a\rb", b"a\nb", b"\x7f", b"\x80", b"x" * 1000, b"x" * 1001])))
@settings(max_examples=400, deadline=None)
def test_string_is_a_quoted_string_exactly_when_it_can_be(value: bytes) -> None:
    """The fast test for a plain quoted string answers what the rules say: quoted (with
    backslash and quote escaped) when short, ASCII and without NUL, CR or LF; else a
    literal of the octets as they are."""
    got = im.encode(value)
    if len(value) <= im.QUOTED_MAX and value.isascii() and not any(
            c in value for c in (b"\x00", b"\r", b"\n")):
        assert got == b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    else:
        assert got == b"{%d}\r\n" % len(value) + value


def test_email_message_built_fixture() -> None:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = "Ann <ann@example.test>"
    msg["To"] = "bob@example.test"
    msg["Subject"] = "Report Ümlaut"
    msg.set_content("see attached\n")
    msg.add_attachment(b"\x89PNG\r\n\x00", maintype="image", subtype="png", filename="p.png")
    data = msg.as_bytes()
    root = im.parse(data)
    bs = im.bodystructure(root)
    assert bs[1] == b"mixed" and [p[:2] for p in bs[0]] == [(b"text", b"plain"),
                                                             (b"image", b"png")]
    assert im.binary_bytes(root, (2,), data) == b"\x89PNG\r\n\x00"
    assert matches(key("SUBJECT", "ümlaut"), data)
    assert b"=?utf-8?" in im.envelope(root)[1]  # left encoded


# ---------------------------------------------------------------------------- hypothesis


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600) | st.sampled_from([SIMPLE, MIXED, FORWARD, NO_BOUNDARY]).flatmap(
    lambda d: st.integers(0, len(d)).map(lambda i: d[:i])), st.integers(0, 700),
    st.integers(1, 700))
def test_any_octets_never_crash_and_partial_is_the_slice(data: bytes, origin: int,
                                                         count: int) -> None:
    root = im.parse(data)
    im.encode(im.envelope(root))
    im.encode(im.bodystructure(root))
    whole = im.fetch_item(FetchAtt("BODY", Section(), (origin, count)), data, root)
    expect = data[origin:origin + count]
    assert whole == b"BODY[]<%d> " % origin + im.encode(expect)
    assert root.header + root.body == data
    stack = [root]
    while stack:  # the frames and the children make each multipart body again
        part = stack.pop()
        if part.multipart and part.children:
            rebuilt = part.frames[0] + b"".join(
                c.header + c.body + f for c, f in zip(part.children, part.frames[1:],
                                                      strict=True))
            assert rebuilt == part.body
        stack += part.children
    for part in ((1,), (1, 1), (2,), (2, 1)):
        for text in (None, "HEADER", "TEXT", "MIME"):
            im.section_bytes(root, Section(part, text), data)
        with contextlib.suppress(im.UnknownCTE):
            im.binary_bytes(root, part, data)
    matches(key("TEXT", "x"), data)


@pytest.mark.parametrize("data", [
    b"Subject: x\r\n" + b" folded\r\n" * 200_000 + b"\r\nbody",  # one 2 MB folded field
    b"To: a@b" + b":x" * 300_000 + b"\r\n\r\n",  # colons after an address
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"--b\r\n" * 100_000,
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n" * 1000,  # deep nesting
], ids=["folded", "colons", "many-parts", "deep"])
def test_hostile_shapes_stay_linear(data: bytes) -> None:
    start = time.monotonic()
    root = im.parse(data)
    im.encode(im.envelope(root))
    im.encode(im.bodystructure(root))
    matches(key("TEXT", "needle"), data)
    matches(key("TO", "needle"), data)
    assert time.monotonic() - start < 5


# ---------------------------------------------------------------------------- SEARCH


def key(name: str, *args: object, children: tuple[SearchKey, ...] = ()) -> SearchKey:
    return SearchKey(name, tuple(a.encode() if isinstance(a, str) else a for a in args),
                     children)


def matches(k: SearchKey, data: bytes = NON_ASCII, **facts: object) -> bool:
    base: dict[str, object] = {"flags": frozenset({"\\Seen", "\\Flagged", "$Work"}),
                               "uid": 40, "seq": 4, "size": len(data),
                               "internal_date": 1796637600,  # 2026-12-07 10:00 UTC
                               "last_seq": 9, "last_uid": 90}
    base.update(facts)
    return im.matches(k, im.SearchMessage(data, **base))  # type: ignore[arg-type]


D = datetime.date
CASES = [  # (key, matching, not matching) as (key, facts-or-data)
    (key("ALL"), {}, None),
    (key("SEEN"), {}, {"flags": frozenset()}),
    (key("UNSEEN"), {"flags": frozenset()}, {}),
    (key("FLAGGED"), {}, {"flags": frozenset()}),
    (key("UNFLAGGED"), {"flags": frozenset()}, {}),
    (key("ANSWERED"), {"flags": frozenset({"\\Answered"})}, {}),
    (key("UNANSWERED"), {}, {"flags": frozenset({"\\Answered"})}),
    (key("DELETED"), {"flags": frozenset({"\\Deleted"})}, {}),
    (key("UNDELETED"), {}, {"flags": frozenset({"\\Deleted"})}),
    (key("DRAFT"), {"flags": frozenset({"\\Draft"})}, {}),
    (key("UNDRAFT"), {}, {"flags": frozenset({"\\Draft"})}),
    (SearchKey("KEYWORD", ("$work",)), {}, {"flags": frozenset()}),
    (SearchKey("UNKEYWORD", ("$Work",)), {"flags": frozenset()}, {}),
    (key("FROM", "jürgen"), {}, {"data": SIMPLE}),
    (key("FROM", "JURGEN@EXAMPLE"), {}, {"data": SIMPLE}),
    (key("TO", "undisclosed"), {}, {"data": SIMPLE}),
    (key("CC", "klensin"), {"data": SIMPLE}, {}),
    (key("BCC", "hidden"), {"data": b"Bcc: hidden@x.test\r\n\r\n"}, {}),
    (key("SUBJECT", "GRÜSSE".lower().replace("ss", "ß")), {}, {"data": SIMPLE}),
    (SearchKey("HEADER", ("Message-Id", b"b27397")), {"data": SIMPLE}, {}),
    (SearchKey("HEADER", ("Message-Id", b"")), {"data": SIMPLE}, {}),
    (key("BODY", "köln"), {}, {"data": SIMPLE}),
    (key("BODY", "café"), {"data": ALTERNATIVE}, {"data": MIXED}),
    (key("BODY", "inner two"), {"data": FORWARD}, {"data": MIXED}),
    (key("BODY", "inner one"), {"data": FORWARD}, {"data": FORWARD.replace(b"one", b"1")}),
    (key("FROM", "comment"), {"data": b"From: Comment <x@y.test>\r\n\r\n"},
     {"data": b"From: x@y.test (comment)\r\n\r\n"}),
    (key("TEXT", "inner@example"), {"data": FORWARD}, {"data": MIXED}),
    (key("TEXT", "grüße"), {}, {"data": SIMPLE}),
    (key("TEXT", "minutes"), {"data": SIMPLE}, {}),
    (key("BEFORE", D(2026, 12, 8)), {}, {"internal_date": 1796688000}),
    (key("ON", D(2026, 12, 7)), {}, {"internal_date": 1796688000}),
    (key("SINCE", D(2026, 12, 7)), {}, {"internal_date": 1796515200}),
    (key("ON", D(2026, 12, 8)), {"tz": datetime.timezone(datetime.timedelta(hours=14))}, {}),
    (key("SENTBEFORE", D(2026, 12, 8)), {}, {"data": SIMPLE.replace(b"1996", b"2027")}),
    (key("SENTON", D(1996, 7, 17)), {"data": SIMPLE}, {}),
    (key("SENTSINCE", D(2026, 12, 7)), {}, {"data": SIMPLE}),
    (key("LARGER", 10), {}, {"size": 10}),
    (key("SMALLER", 10), {"size": 9}, {}),
    (key("UID", SequenceSet(((30, 50),))), {}, {"uid": 51}),
    (key("UID", SequenceSet(((None, None),))), {"uid": 90}, {}),
    (key("SEQSET", SequenceSet(((1, 1), (4, None)))), {}, {"seq": 2}),
    (key("NOT", children=(key("SEEN"),)), {"flags": frozenset()}, {}),
    (key("OR", children=(key("DRAFT"), key("SEEN"))), {}, {"flags": frozenset()}),
    (key("AND", children=(key("SEEN"), key("FROM", "jurgen"))), {}, {"data": SIMPLE}),
]


@pytest.mark.parametrize(("k", "positive", "negative"), CASES,
                         ids=[f"{c[0].name}-{i}" for i, c in enumerate(CASES)])
def test_search_key(k: SearchKey, positive: dict, negative: dict | None) -> None:
    pos = dict(positive)
    assert matches(k, pos.pop("data", NON_ASCII), **pos)
    if negative is not None:
        neg = dict(negative)
        assert not matches(k, neg.pop("data", NON_ASCII), **neg)


def test_search_reads_a_bounded_amount(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(im, "SEARCH_CAP", 64)
    data = b"Subject: big\r\n\r\n" + b"a" * 100 + b"needle\r\n"
    assert not matches(key("BODY", "needle"), data)
    assert matches(key("BODY", "aaa"), data)


# ---------------------------------------------------------------------------- Dovecot


MAILDIRS = Path("/var/mail/vhosts/example.test")


def _imap_values(raw: bytes) -> list[object]:
    """A small reader of IMAP response values (NIL, numbers, strings, literals, lists)."""
    pos = 0

    def value() -> object:
        nonlocal pos
        while raw[pos:pos + 1] == b" ":
            pos += 1
        c = raw[pos:pos + 1]
        if c == b"(":
            pos += 1
            items = []
            while True:
                while raw[pos:pos + 1] == b" ":
                    pos += 1
                if raw[pos:pos + 1] == b")":
                    pos += 1
                    return items
                items.append(value())
        if c == b'"':
            pos += 1
            out = bytearray()
            while raw[pos:pos + 1] != b'"':
                if raw[pos:pos + 1] == b"\\":
                    pos += 1
                out += raw[pos:pos + 1]
                pos += 1
            pos += 1
            return bytes(out)
        if c in (b"{", b"~"):
            end = raw.index(b"}", pos)
            n = int(raw[raw.index(b"{", pos) + 1:end])
            pos = end + 3
            pos += n
            return raw[pos - n:pos]
        start = pos
        while pos < len(raw) and raw[pos:pos + 1] not in b" ()":
            pos += 1
        atom = raw[start:pos]
        if atom.upper() == b"NIL":
            return None
        return int(atom) if atom.isdigit() else atom

    out = []
    while pos < len(raw):
        out.append(value())
        while raw[pos:pos + 1] in (b" ", b"\r", b"\n"):
            pos += 1
    return out




DIFFERENTIAL = {
    "simple": SIMPLE, "mixed": MIXED, "alternative": ALTERNATIVE, "forward": FORWARD,
    "non-ascii": NON_ASCII, "no-boundary": NO_BOUNDARY, "missing-delimiter": MISSING_DELIMITER,
    "lf-only": b"From: a@b\nSubject: lf\nContent-Type: multipart/mixed; boundary=q\n\n"
               b"--q\n\nx\n--q--\n",
    "digest": b"Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\n"
              b"Subject: s\r\n\r\nb\r\n--d--\r\n",
    "groups": b'To: team: "A, B" <a@x.test>, c@y.test;, e\r\nFrom: (c) <>\r\n\r\nx',
    "header-only": b"Subject: x",
    "rfc2231": b"Content-Type: multipart/mixed; boundary=\"=_a b\"\r\n\r\n--=_a b\r\n"
               b"Content-Type: APPLICATION/octet-stream;\r\n name*0=\"long\";\r\n"
               b" name*1=\"name.bin\"\r\nContent-ID: <cid@x>\r\n"
               b"Content-Description: a file\r\nContent-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==\r\n"
               b"Content-Location: http://x.test/a\r\nContent-Disposition: inline;"
               b" filename*=utf-8''%C3%A4.bin\r\n\r\nabc\r\n--=_a b--\r\n",
    "addresses": b'From: "Last, First" <first.last@x.test>, "quoted local"@x.test\r\n'
                 b"Sender: =?iso-8859-1?q?J=F6rg?= <j@x.test>\r\nReply-To: empty:;\r\n"
                 b"To: nobody, <@a.test,@b.test:c@d.test>\r\nCc: <>\r\n"
                 b"In-Reply-To: <a@b>\r\nDate: garbage\r\n\r\nx\r\n",
}


def _normalise(value: object) -> object:
    """Case of MIME type and parameter atoms is the sender's; compare without it."""
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, bytes):
        return value.lower()
    return value


FLAG_LETTERS = {"S": "\\Seen", "F": "\\Flagged", "R": "\\Answered", "D": "\\Draft"}
LETTERS = ["S", "", "FS", "R", "", "S", "D", "", "S", "F", "", "", "S"]  # per DIFFERENTIAL message
DAY = 86400
MTIMES = [1796637600 - DAY * (i % 4) for i in range(len(DIFFERENTIAL))]  # 4 days before 8 Dec


def _responses(data: list) -> dict[int, list]:
    raw = b""
    for item in data:
        raw += item[0] + b"\r\n" + item[1] if isinstance(item, tuple) else item + b"\r\n"
    values = _imap_values(raw)
    return dict(zip(values[0::2], values[1::2], strict=True))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def dovecot(reference_dovecot: int) -> Iterator[imaplib.IMAP4]:
    """The DIFFERENTIAL messages in a folder of alice's of their own, selected read-only."""
    folder = f"mailfort-fetch-{os.getpid()}"
    base = MAILDIRS / "alice"
    box = base / f".{folder}"
    created = [p for p in (MAILDIRS, base) if not p.exists()]
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(DIFFERENTIAL.values()):
        path = box / "cur" / f"{1700000000 + i}.M{i}P1.mailfort:2,{LETTERS[i]}"
        path.write_bytes(data)
        os.utime(path, (MTIMES[i], MTIMES[i]))
    for path in [*created, box, *box.rglob("*")]:
        os.chown(path, 5000, 5000)
    try:
        imap = imaplib.IMAP4("127.0.0.1", reference_dovecot, timeout=10)
        try:
            imap.login("alice", "alicepw")
            typ, _ = imap.select(f'"{folder}"', readonly=True)
            assert typ == "OK"
            yield imap
        finally:
            imap.logout()
    finally:
        shutil.rmtree(box, ignore_errors=True)


def test_envelope_and_bodystructure_agree_with_dovecot(dovecot: imaplib.IMAP4) -> None:
    typ, data = dovecot.fetch(f"1:{len(DIFFERENTIAL)}", "(ENVELOPE BODYSTRUCTURE)")
    assert typ == "OK"
    theirs = {seq: dict(zip(items[0::2], items[1::2], strict=True))
              for seq, items in _responses(data).items()}
    for seq, (name, data_) in enumerate(DIFFERENTIAL.items(), start=1):
        root = im.parse(data_)
        ours_env = _imap_values(im.encode(im.envelope(root)))[0]
        ours_bs = _imap_values(im.encode(im.bodystructure(root)))[0]
        dove_env, dove_bs = theirs[seq][b"ENVELOPE"], theirs[seq][b"BODYSTRUCTURE"]
        assert ours_env == dove_env, f"{name}: ours {ours_env} Dovecot {dove_env}"
        assert _normalise(ours_bs) == _normalise(dove_bs), \
            f"{name}: ours {ours_bs} Dovecot {dove_bs}"


SECTIONS = ["", "HEADER", "TEXT", "1", "1.MIME", "2", "2.MIME", "2.HEADER", "2.TEXT", "2.1",
            "2.2", "HEADER.FIELDS (FROM SUBJECT)", "HEADER.FIELDS.NOT (FROM)", "1.1"]


@pytest.mark.parametrize("spec", SECTIONS)
def test_sections_agree_with_dovecot(dovecot: imaplib.IMAP4, spec: str) -> None:
    typ, data = dovecot.fetch(f"1:{len(DIFFERENTIAL)}", f"(BODY.PEEK[{spec}])")
    assert typ == "OK"
    theirs = _responses(data)
    cmd = parse_command([b"a FETCH 1 BODY.PEEK[" + spec.encode() + b"]"], [], Limits())
    att = cmd.args[1][0]  # type: ignore[union-attr]
    for seq, (name, data_) in enumerate(DIFFERENTIAL.items(), start=1):
        if (name, spec) == ("header-only", "HEADER.FIELDS.NOT (FROM)"):
            continue  # Dovecot adds the missing CRLF to the last field for FIELDS, not for NOT
        wire = im.to_wire(data_)
        ours = im.section_bytes(im.parse(wire), att.section, wire)
        dove = theirs[seq][-1]
        assert (ours or b"") == (dove or b""), f"{name} [{spec}]: ours {ours!r} Dovecot {dove!r}"


SEARCHES = ["ALL", "SEEN", "UNSEEN", "FLAGGED", "ANSWERED", "UNDRAFT", "SUBJECT original",
            "FROM example.test", "TO undisclosed", "CC klensin", "BODY \"inner two\"",
            "BODY words", "TEXT minutes", "HEADER Message-Id b27397", "HEADER Subject \"\"",
            "LARGER 300", "SMALLER 100", "OR SEEN FROM fwd", "NOT SUBJECT x", "2:4 UNSEEN",
            "UID 3:*", "SENTSINCE 1-Jan-2000", "SENTBEFORE 1-Jan-2000", "SENTON 17-Jul-1996",
            "ON 6-Dec-2026", "SINCE 6-Dec-2026", "BEFORE 6-Dec-2026", "(SEEN SMALLER 200)",
            "BODY Subject", "BODY preamble", "BODY JVBER", "BODY epilogue", "TEXT inner",
            "FROM jurgen", "HEADER Content-Type mixed", "TO team", "BODY lost",
            "BODY \"no delimiter\"", "TEXT \"lf\"", "FROM \"(c)\"", "TEXT inner@example",
            "SUBJECT \"=?utf-8\""]


@pytest.mark.parametrize("criteria", SEARCHES)
def test_search_agrees_with_dovecot(dovecot: imaplib.IMAP4, criteria: str) -> None:
    typ, data = dovecot.search(None, criteria)
    assert typ == "OK"
    theirs = {int(n) for n in data[0].split()}
    cmd = parse_command([b"a SEARCH " + criteria.encode()], [], Limits())
    k = cmd.args[2]  # type: ignore[union-attr]
    tz = datetime.datetime.now().astimezone().tzinfo
    ours = set()
    for seq, data_ in enumerate(DIFFERENTIAL.values(), start=1):
        flags = frozenset(FLAG_LETTERS[c] for c in LETTERS[seq - 1])
        msg = im.SearchMessage(data_, flags, seq, seq, wire_size(data_), MTIMES[seq - 1],
                               tz=tz, last_seq=len(DIFFERENTIAL), last_uid=len(DIFFERENTIAL))
        if im.matches(k, msg):
            ours.add(seq)
    assert ours == theirs, criteria


@pytest.mark.parametrize("spec", ["", "1", "2", "2.1", "1.1"])
def test_binary_agrees_with_dovecot(dovecot: imaplib.IMAP4, spec: str) -> None:
    for seq, (name, data_) in enumerate(DIFFERENTIAL.items(), start=1):
        typ, data = dovecot.fetch(str(seq), f"(BINARY.PEEK[{spec}] BINARY.SIZE[{spec}])")
        wire = im.to_wire(data_)
        root = im.parse(wire)
        try:
            ours = im.binary_bytes(root, tuple(int(n) for n in spec.split(".") if n), wire)
        except im.UnknownCTE:
            ours = None
        if typ != "OK":
            assert ours is None, f"{name} [{spec}]: Dovecot refused, we gave {ours!r}"
            continue
        items = _responses(data)[seq]
        dove = items[items.index(b"BINARY.SIZE") - 1] if b"BINARY.SIZE" in items else items[1]
        assert (ours or b"") == (dove or b""), f"{name} [{spec}]: ours {ours!r} Dovecot {dove!r}"


@pytest.mark.parametrize("words", ["grüße", "jürgen", "köln", "café", "Ümlaut"])
def test_utf8_search_agrees_with_dovecot(dovecot: imaplib.IMAP4, words: str) -> None:
    for field in ("SUBJECT", "FROM", "BODY", "TEXT"):
        dovecot.literal = words.encode()  # type: ignore[attr-defined]
        typ, data = dovecot.search("UTF-8", field)
        assert typ == "OK"
        theirs = {int(n) for n in data[0].split()}
        k = SearchKey(field, (words.encode(),))
        ours = {seq for seq, data_ in enumerate(DIFFERENTIAL.values(), start=1)
                if im.matches(k, im.SearchMessage(data_, frozenset(), seq, seq,
                                                  wire_size(data_), MTIMES[seq - 1]))}
        assert ours == theirs, f"{field} {words}"


@pytest.mark.parametrize("name", list(DIFFERENTIAL))
def test_parse_header_sees_the_fields_parse_sees(name: str) -> None:
    """SEARCH on header keys uses parse_header (no MIME look): same header, same fields."""
    data = im.to_wire(DIFFERENTIAL[name])
    full, head = im.parse(data), im.parse_header(data)
    assert (head.header, head.fields) == (full.header, full.fields)
    assert im.envelope(head) == im.envelope(full)


def _fields_by_lines(header: bytes) -> list[tuple[str, bytes]]:
    """The field splitter as first written, a loop per line: the reference for _fields."""
    pieces: list[tuple[str, list[bytes]]] = []
    for line in header.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and pieces:
            pieces[-1][1].append(line)
            continue
        name = line.split(b":", 1)[0].strip() if b":" in line else b""
        pieces.append((name.decode("ascii", "replace").lower(), [line]))
    return [(name, b"".join(lines)) for name, lines in pieces]


@given(st.lists(st.sampled_from([b"From", b": ", b":", b"x", b" ", b"\t", b"\r\n", b"\r",
                                 b"\n", b"\xc3\xa4", b"To:a", b"  folded", b"\r\n\r\n"]),
                max_size=30))
def test_fields_split_as_the_line_loop_did(pieces: list[bytes]) -> None:
    """The regex splitter (one match per field, for SEARCH speed) agrees with a plain loop
    over bytes.splitlines lines on any mix of line ends, folds, colons and blank lines."""
    header = b"".join(pieces)
    assert im._fields(header) == _fields_by_lines(header)


# ---------------------------------------------------------------- the SEARCH probe

_PROBE_CASES = [
    # (message, key): the needle is in the text SEARCH compares but not (as such) in the
    # octets, or is in them only where SEARCH does not look; the probe must never pass over
    # a message that matches.
    (b"Subject: x\r\nContent-Transfer-Encoding: base64\r\n\r\nemVicmFmaXNo\r\n", "BODY"),
    (b"Subject: x\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nzebra=\r\nfish\r\n",
     "BODY"),
    (b"Subject: x\r\nContent-Transfer-Encoding: Quoted-Printable\r\n\r\nzebra=66ish\r\n",
     "TEXT"),
    (b"Subject: x\r\nContent-Transfer-Encoding:\r\n base64\r\n\r\nemVicmFmaXNo\r\n", "BODY"),
    (b"Subject: x\r\nContent-Type: text/plain; charset=utf-7\r\n\r\n+AHoAZQBiAHIAYQBmAGkAcwBo-\r\n",
     "BODY"),
    (b"Subject: x\r\nContent-Type: text/plain; charset=\"UTF-7\"\r\n\r\n+AHo-ebrafish\r\n", "BODY"),
    (b"Subject: x\r\nContent-Type: text/plain; charset*0=utf-7\r\n\r\n+AHo-ebrafish\r\n", "BODY"),
    (b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nzebra\r\n"
     b"--b\r\n\r\nfish\r\n--b--\r\n", "BODY"),
    (b"Subject: =?us-ascii?q?zebra=66ish?=\r\n\r\nbody\r\n", "SUBJECT"),
    (b"Subject: =?us-ascii?q?zebra=66ish?=\r\n\r\nbody\r\n", "TEXT"),
    (b"Subject: =?us-ascii?q?zebra=66ish?=\r\n", "HEADER"),
    ("Subject: zebra\ufb01sh\r\n\r\nx\r\n".encode(), "SUBJECT"),  # the fi ligature folds
    ("Subject: x\r\n\r\nzebra\ufb01sh\r\n".encode(), "BODY"),  # to "fi"
    (b"Subject: x\n\nZEBRAFISH\n", "BODY"),  # LF endings, upper case
    (b"Subject: ZebraFish\n", "HEADER"),
    (b"Subject: x\r\nContent-Type: message/rfc822\r\n\r\nSubject: y\r\n\r\nzebrafish\r\n",
     "BODY"),
]


def _probe_key(kind: str, needle: bytes = b"zebrafish") -> SearchKey:
    return SearchKey("HEADER", ("Subject", needle)) if kind == "HEADER" else \
        SearchKey(kind, (needle,))


@pytest.mark.parametrize("data,kind", _PROBE_CASES)
def test_probe_never_passes_over_a_match(data: bytes, kind: str) -> None:
    key = _probe_key(kind)
    probe = im.search_probe(key)
    assert probe is not None
    header = data[:data.find(b"\n\n") + 2] if b"\n\n" in data else data
    want = im.matches(key, im.SearchMessage(data, frozenset(), 1, 1, len(data), 0))
    assert want, "every case is a match, as the full parse sees it"
    assert not im.excluded(probe, data, whole=True)
    if kind in ("SUBJECT", "HEADER"):
        assert not im.excluded(probe, header, whole=False)


def test_probe_passes_over_plain_messages_without_the_needle() -> None:
    plain = (b"From: a@b.example\nSubject: hello\nContent-Type: text/plain; charset=us-ascii\n"
             b"Content-Transfer-Encoding: 7bit\n\nnothing to see\n")
    for kind in ("BODY", "TEXT", "SUBJECT", "HEADER"):
        probe = im.search_probe(_probe_key(kind))
        assert probe is not None and im.excluded(probe, plain, whole=True), kind
    # AND: one absent needle is enough; OR and NOT promise nothing
    both = SearchKey("AND", (), (_probe_key("BODY", b"nothing"), _probe_key("SUBJECT")))
    probe = im.search_probe(both)
    assert probe is not None and im.excluded(probe, plain, whole=True)
    assert im.search_probe(SearchKey("OR", (), (_probe_key("BODY"), SearchKey("ALL")))) is None
    assert im.search_probe(SearchKey("NOT", (), (_probe_key("BODY"),))) is None
    assert im.search_probe(_probe_key("BODY", "é".encode())) is None  # not ASCII: no probe
    assert im.search_probe(_probe_key("BODY", b"a\r\nb")) is None


@given(st.binary(max_size=300), st.sampled_from(["BODY", "TEXT", "SUBJECT", "HEADER"]),
       st.sampled_from([b"ab", b"=", b"a b", b"x"]))
@settings(max_examples=300, deadline=None)
def test_probe_agrees_with_the_full_search(data: bytes, kind: str, needle: bytes) -> None:
    """Whatever the octets: passed over means the full search finds nothing."""
    key = _probe_key(kind, needle)
    probe = im.search_probe(key)
    assert probe is not None
    if im.excluded(probe, data, whole=True):
        assert not im.matches(key, im.SearchMessage(data, frozenset(), 1, 1, len(data), 0))


@given(st.lists(st.sampled_from([
    b"From: A <a@b.example>\r\n", b"From: =?utf-8?q?x?= <a@b>, c@d\r\n", b"Sender: \r\n",
    b"Reply-To: g: x@y, z@w;\r\n", b"To: \"q \\\" x\" <p@q>\r\n", b"Cc: (c) r@s (t)\r\n",
    b"Subject: a\r\n b\r\n", b"Subject: \"\\\r\n", b"Date: x\n", b"Message-ID: <m@x>\r\n",
    b"In-Reply-To: \xff\r\n", b"Bcc:\r\n", b"X: y\r\n", b"to: two@x\r\n", b"FROM:\r\n"]),
    max_size=8))
@settings(max_examples=200, deadline=None)
def test_envelope_wire_is_encode_of_envelope(lines: list[bytes]) -> None:
    root = im.parse_header(b"".join(lines) + b"\r\nbody\r\n")
    assert im.envelope_wire(root) == im.encode(im.envelope(root))


_ENVELOPE_LINES = st.lists(st.one_of(st.sampled_from([
    b"From: A <a@b.example>\r\n", b"From: =?utf-8?q?x?= <a@b>, c@d\r\n", b"Sender: \r\n",
    b"Reply-To: g: x@y, z@w;\r\n", b"To: \"q \\\" x\" <p@q>\r\n", b"Cc: (c) r@s (t)\r\n",
    b"Subject: a\r\n b\r\n", b"Subject: \"\\\r\n", b"Date: x\n", b"Message-ID: <m@x>\r\n",
    b"In-Reply-To: \xff\r\n", b"Bcc:\r\n", b"X: y\r\n", b"to: two@x\r\n", b"FROM:\r\n",
    b" folded\r\n", b"\tfolded\n", b"\r\n", b"\n", b"\r", b"\x1cFrom : x@y\r\n", b":\r\n",
    b"subject :\r\n", b"no colon\r\n", b"Date: a\rb\r\n", b"From\xff: z@w\n"]),
    st.binary(max_size=20)), max_size=10)


@given(_ENVELOPE_LINES)
@settings(max_examples=500, deadline=None)
def test_envelope_of_header_is_the_generic_envelope(lines: list[bytes]) -> None:
    """The cold ENVELOPE FETCH's one-pass path answers what the generic parse does, for any
    octets: first fields only, folding, line ends of every kind, odd names, no blank line."""
    data = b"".join(lines)
    assert im.envelope_of_header(data) == im.envelope_wire(im.parse_header(data))
    wire = im.to_wire(data)
    assert im.envelope_of_header(wire) == im.envelope_wire(im.parse_header(wire))


@given(st.lists(st.sampled_from([
    b"Subject: zebrafish\r\n\r\n", b"Subject: x\r\n\r\n",
    b"Subject: =?us-ascii?q?zebra=66ish?=\r\n",
    "Subject: zebra\ufb01sh\r\n".encode(), b"X: ZEBRAFISH\n\n", b"", b"zebra", b"fish\r\n",
    b"Subject: a\r\n =?x\r\n", b"\xff\r\n"]), max_size=12),
    st.sampled_from([b"zebrafish", b"x", b"fish"]))
@settings(max_examples=300, deadline=None)
def test_header_candidates_cover_every_possible_match(heads: list[bytes], needle: bytes) -> None:
    """The one-sweep header filter keeps every header the per-message probe would keep,
    and so every header the full search matches."""
    key = SearchKey("HEADER", ("Subject", needle))
    probe = im.search_probe(key)
    assert probe is not None
    picked = im.header_candidates(probe, heads)
    assert picked is not None and picked == sorted(set(picked))
    for i, h in enumerate(heads):
        if not im.excluded(probe, h, whole=False):
            assert i in picked, (i, h)
        if im.matches(key, im.SearchMessage(h, frozenset(), 1, 1, len(h), 0)):
            assert i in picked, (i, h)
    assert im.header_candidates(im.Probe((("body", b"x"),)), heads) is None


@given(st.lists(st.sampled_from([b"Subject", b" ", b"\t", b":", b"\r", b"\n", b"\r\n", b"a",
                                 b"X-Y ", b"\xff", b"  :"]), max_size=30))
@settings(max_examples=500, deadline=None)
def test_fields_by_lines_cut_as_the_field_regex(chunks: list[bytes]) -> None:
    header = b"".join(chunks)
    assert im._fields(header) == im._fields_by_regex(header)
