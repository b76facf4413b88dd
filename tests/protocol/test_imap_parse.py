"""The IMAP command reader: commands as real clients send them, every limit, and fuzzing.

The shapes come from RFC 9051's examples and from what Thunderbird, mutt, mbsync and
imaplib send. No sockets: the reader is sans-I/O.
"""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailfort.protocol.imap_parse import (
    Atom,
    Command,
    CommandReader,
    ContinuationRequest,
    FetchAtt,
    IdleDone,
    Limits,
    LiteralBytes,
    ParseError,
    SaslResponse,
    SearchKey,
    Secret,
    Section,
    SequenceSet,
)
from tests.fuzzing import examples


def events(reader: CommandReader, data: bytes) -> list[object]:
    reader.feed(data)
    out = []
    while (ev := reader.next_event()) is not None:
        out.append(ev)
    return out


def one(data: bytes, limits: Limits | None = None) -> object:
    """The single event of ``data`` (which must give exactly one)."""
    got = events(CommandReader(limits), data)
    assert len(got) == 1, got
    return got[0]


def cmd(data: bytes) -> Command:
    got = one(data)
    assert isinstance(got, Command), got
    return got


# ---------------------------------------------------------------------------- real clients


def test_thunderbird_header_fetch() -> None:
    c = cmd(b"a1 UID FETCH 1:* (FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS "
            b"(From To Subject Date)])\r\n")
    assert (c.tag, c.name, c.uid) == ("a1", "FETCH", True)
    seqs, items, mods = c.args
    assert seqs == SequenceSet(((1, None),))
    assert items == (FetchAtt("FLAGS"), FetchAtt("RFC822.SIZE"),
                     FetchAtt("BODY.PEEK", Section((), "HEADER.FIELDS",
                                                   ("From", "To", "Subject", "Date"))))
    assert mods == ()


def test_mutt_mbsync_apple_shapes() -> None:
    fields = (b"DATE FROM SENDER SUBJECT TO CC MESSAGE-ID REFERENCES CONTENT-TYPE "
              b"CONTENT-DESCRIPTION IN-REPLY-TO REPLY-TO LINES LIST-POST X-LABEL")
    c = cmd(b"a0005 UID FETCH 1:* (UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[HEADER.FIELDS ("
            + fields + b")])\r\n")
    assert c.args[1][-1].section.fields == tuple(fields.decode().split())
    assert cmd(b"6 UID FETCH 3 (BODY.PEEK[])\r\n").args[1] == (FetchAtt("BODY.PEEK", Section()),)
    assert cmd(b"7 UID STORE 4 +FLAGS.SILENT \\Deleted\r\n").args[4] == ("\\Deleted",)
    assert cmd(b"3 UID fetch 1:* (FLAGS)\r\n").args[1] == (FetchAtt("FLAGS"),)
    assert cmd(b'8 SELECT "INBOX" (CONDSTORE)\r\n').args == ("INBOX", (Atom("CONDSTORE"),))
    c = cmd(b"9 UID FETCH 1:* (FLAGS) (CHANGEDSINCE 5 VANISHED)\r\n")
    assert c.args[2] == (Atom("CHANGEDSINCE"), Atom("5"), Atom("VANISHED"))
    assert cmd(b'10 GETQUOTAROOT "INBOX"\r\n').args == ("INBOX",)
    assert cmd(b'11 LIST "" "%" RETURN (SPECIAL-USE)\r\n').args[3] == (Atom("SPECIAL-USE"),)
    assert cmd(b"12 SEARCH LARGER 9223372036854775807\r\n").name == "SEARCH"
    assert one(b"13 SEARCH LARGER 9223372036854775808\r\n") == ParseError(
        "13", "number out of range")


def test_fetch_sections_partials_macros_and_changedsince() -> None:
    c = cmd(b"A654 FETCH 2:4 (FLAGS BODY[HEADER.FIELDS (DATE FROM)] BODY[1.2.MIME] "
            b"BODY[]<0.2048> BINARY.PEEK[1]<10.20> BINARY.SIZE[2] BODY[3.TEXT])\r\n")
    assert c.args[1] == (
        FetchAtt("FLAGS"),
        FetchAtt("BODY", Section((), "HEADER.FIELDS", ("DATE", "FROM"))),
        FetchAtt("BODY", Section((1, 2), "MIME")),
        FetchAtt("BODY", Section(), (0, 2048)),
        FetchAtt("BINARY.PEEK", Section((1,)), (10, 20)),
        FetchAtt("BINARY.SIZE", Section((2,))),
        FetchAtt("BODY", Section((3,), "TEXT")))
    assert cmd(b"a FETCH 1 fast\r\n").args[1] == (FetchAtt("FAST"),)
    assert cmd(b"a fetch 1 body.peek[]\r\n").args[1] == (FetchAtt("BODY.PEEK", Section()),)
    c = cmd(b"s100 UID FETCH 1:* (FLAGS) (CHANGEDSINCE 12345)\r\n")
    assert c.args[2] == (Atom("CHANGEDSINCE"), Atom("12345"))


def test_rfc9051_append_with_literal_plus() -> None:
    message = (b"Date: Mon, 7 Feb 1994 21:52:25 -0800\r\nFrom: Fred <fred@example.com>\r\n"
               b"Subject: afternoon meeting\r\n\r\nHello Joe\r\n")
    data = (b"A003 APPEND saved-messages (\\Seen) \"07-Feb-1994 21:52:25 -0800\" {%d+}\r\n"
            % len(message)) + message + b"\r\n"
    c = cmd(data)
    box, flags, when, lit = c.args
    assert (box, flags) == ("saved-messages", ("\\Seen",))
    assert when == datetime.datetime(1994, 2, 7, 21, 52, 25,
                                     tzinfo=datetime.timezone(-datetime.timedelta(hours=8)))
    assert lit == LiteralBytes(message)


def test_synchronising_literal_asks_for_continuation_first() -> None:
    r = CommandReader()
    assert events(r, b"A003 APPEND INBOX {5}\r\n") == [ContinuationRequest()]
    got = events(r, b"hello\r\n")
    assert got == [Command("A003", "APPEND", False, ("INBOX", (), None,
                                                     LiteralBytes(b"hello")))]


def test_login_forms_and_secret_not_in_repr() -> None:
    c = cmd(b'a001 LOGIN "fred@example.com" "p\\"a\\\\ss"\r\n')
    assert c.args == (b"fred@example.com", Secret(b'p"a\\ss'))
    assert b"p\\" not in repr(c).encode() and "ss" not in repr(c.args[1])
    r = CommandReader()
    assert events(r, b"a LOGIN {5}\r\n") == [ContinuationRequest()]
    assert events(r, b"alice {3}\r\n") == [ContinuationRequest()]
    assert events(r, b"p w\r\n") == [Command("a", "LOGIN", False, (b"alice", Secret(b"p w")))]


def test_authenticate_with_sasl_ir_and_continuation_lines() -> None:
    c = cmd(b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    assert c.args == ("PLAIN", Secret(b"AGFsaWNlAHNlY3JldA=="))
    assert cmd(b"a authenticate plain =\r\n").args == ("PLAIN", Secret(b"="))
    r = CommandReader()
    assert events(r, b"b AUTHENTICATE PLAIN\r\n") == [Command("b", "AUTHENTICATE", False,
                                                              ("PLAIN", None))]
    r.expect_sasl_response()
    # a response line is not a command: "{5}" and NOOP are not parsed
    assert events(r, b"b NOOP {5}\r\n") == [SaslResponse(b"b NOOP {5}")]
    assert events(r, b"c NOOP\r\n") == [Command("c", "NOOP", False, ())]
    r.expect_sasl_response()
    got = events(r, b"x" * 13000 + b"\r\nd NOOP\r\n")
    assert got == [SaslResponse(None), Command("d", "NOOP", False, ())]


def test_idle_then_done() -> None:
    r = CommandReader()
    assert events(r, b"A002 IDLE\r\n") == [Command("A002", "IDLE", False, ())]
    r.expect_done()
    assert events(r, b"DONE\r\nA003 NOOP\r\n") == [IdleDone(True),
                                                 Command("A003", "NOOP", False, ())]
    r.expect_done()
    assert events(r, b"A004 NOOP\r\n") == [IdleDone(False)]


def test_search_tree_charset_and_esearch_return() -> None:
    c = cmd(b"A283 SEARCH RETURN (MIN COUNT) CHARSET UTF-8 OR FROM \"Smith\" "
            b"(SINCE 1-Feb-1994 NOT SEEN) UID 1:5,7 HEADER X-Spam yes 2:*\r\n")
    ret, charset, tree = c.args
    assert ret == ("MIN", "COUNT") and charset == "UTF-8"
    assert tree == SearchKey("AND", children=(
        SearchKey("OR", children=(
            SearchKey("FROM", (b"Smith",)),
            SearchKey("AND", children=(SearchKey("SINCE", (datetime.date(1994, 2, 1),)),
                                       SearchKey("NOT", children=(SearchKey("SEEN"),)))))),
        SearchKey("UID", (SequenceSet(((1, 5), (7, 7))),)),
        SearchKey("HEADER", ("X-Spam", b"yes")),
        SearchKey("SEQSET", (SequenceSet(((2, None),)),))))
    c = cmd(b"a UID SEARCH MODSEQ \"/flags/\\\\draft\" all 620162338 LARGER 10\r\n")
    assert c.args[2].children[0] == SearchKey("MODSEQ", ("/flags/\\draft", "all", 620162338))
    r = CommandReader()  # a literal search string (imaplib, non-ASCII text)
    assert events(r, b"a SEARCH CHARSET UTF-8 SUBJECT {4}\r\n") == [ContinuationRequest()]
    assert events(r, "ünï".encode()[:4] + b"\r\n")[0].args[2] == SearchKey(
        "AND", children=(SearchKey("SUBJECT", ("ünï".encode()[:4],)),))


def test_store_copy_move_expunge() -> None:
    assert cmd(b"A003 STORE 2:4 +FLAGS (\\Deleted)\r\n").args == (
        SequenceSet(((2, 4),)), (), "+FLAGS", False, ("\\Deleted",))
    assert cmd(b"a UID STORE 5,9 -FLAGS.SILENT \\Seen $Junk\r\n").args == (
        SequenceSet(((5, 5), (9, 9))), (), "-FLAGS", True, ("\\Seen", "$Junk"))
    c = cmd(b"d105 STORE 7,5,9 (UNCHANGEDSINCE 320162338) +FLAGS.SILENT (\\Deleted)\r\n")
    assert c.args[1] == (Atom("UNCHANGEDSINCE"), Atom("320162338"))
    assert cmd(b"a UID MOVE 42:69 foo\r\n").args == (SequenceSet(((42, 69),)), "foo")
    assert cmd(b"a COPY 2:4 \"[Gmail]/All Mail\"\r\n").args[1] == "[Gmail]/All Mail"
    assert cmd(b"A202 UID EXPUNGE 3000:3002\r\n").args == (SequenceSet(((3000, 3002),)),)
    assert cmd(b"A202 EXPUNGE\r\n").args == ()


def test_mailbox_commands_and_list_extended() -> None:
    assert cmd(b"A142 SELECT inbox\r\n").args == ("INBOX", ())
    c = cmd(b"A142 SELECT INBOX (QRESYNC (67890007 90060115194045000 41:211,214:541))\r\n")
    assert c.args[1][0] == Atom("QRESYNC")
    assert cmd(b"t1 CREATE MyJunk (USE (\\Junk))\r\n").args == (
        "MyJunk", (Atom("USE"), (Atom("\\Junk"),)))
    assert cmd(b"a RENAME blurdybloop sarasoop\r\n").args == ("blurdybloop", "sarasoop")
    assert cmd("a CREATE \"Entwürfe\"\r\n".encode()).args == ("Entwürfe", ())
    assert cmd(b'a LIST "" "*"\r\n').args == ((), "", ("*",), ())
    assert cmd(b"a LIST \"\" %\r\n").args == ((), "", ("%",), ())
    c = cmd(b'A02 LIST (SUBSCRIBED REMOTE) "" ("INBOX" "Sent/%") '
            b"RETURN (CHILDREN STATUS (MESSAGES UNSEEN))\r\n")
    assert c.args == (("SUBSCRIBED", "REMOTE"), "", ("INBOX", "Sent/%"),
                      (Atom("CHILDREN"), Atom("STATUS"), (Atom("MESSAGES"), Atom("UNSEEN"))))
    assert cmd(b'a LSUB "" *\r\n').args == ("", "*")
    assert cmd(b"A042 STATUS blurdybloop (UIDNEXT MESSAGES SIZE)\r\n").args == (
        "blurdybloop", ("UIDNEXT", "MESSAGES", "SIZE"))
    assert cmd(b"a ENABLE IMAP4rev2 CONDSTORE\r\n").args == ("IMAP4REV2", "CONDSTORE")
    assert cmd(b'a ID ("name" "Thunderbird" "version" "115.0" "os" NIL)\r\n').args == (
        ((b"name", b"Thunderbird"), (b"version", b"115.0"), (b"os", None)),)
    assert cmd(b"a ID NIL\r\n").args == (None,)
    for name in ("CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "NAMESPACE", "CLOSE", "UNSELECT"):
        assert cmd(b"x1 " + name.lower().encode() + b"\r\n") == Command("x1", name, False, ())


# ---------------------------------------------------------------------------- malformed


@pytest.mark.parametrize("line, tag", [
    (b"* NOOP", None), (b"+a NOOP", None), (b"", None), (b"a", "a"), (b"a FROB", "a"),
    (b"a NOOP extra", "a"), (b"a UID NOOP", "a"), (b"a FETCH 0 FLAGS", "a"),
    (b"a FETCH 1 (FLAGS", "a"), (b"a FETCH 1 BODY[1.MIME", "a"), (b"a FETCH 1 BODY[MIME]", "a"),
    (b'a LOGIN "x', "a"), (b"a SELECT \"\\x\"", "a"), (b"a SEARCH FOO", "a"),
    (b"a SEARCH SINCE 31-Feb-2020", "a"), (b"a STORE 1 FLAGS", "a"), (b"a FETCH 1 XYZZY", "a"),
    (b"a SELECT \xff\xfe", "a"), (b"a APPEND INBOX \"bad date\" {1+}\r\nx", "a"),
    (b"a  NOOP", "a"), (b"a NOOP\rb NOOP", "a"), (b"a STATUS x (BOGUS)", "a"),
    (b"a FETCH 99999999999 FLAGS", "a"), (b"a APPEND INBOX", "a"),
])
def test_malformed_gives_bad_with_tag_when_known(line: bytes, tag: str | None) -> None:
    r = CommandReader()
    got = events(r, line + b"\r\nz NOOP\r\n")
    if got and got[0] == ContinuationRequest():
        got = got[1:]
    assert isinstance(got[0], ParseError) and got[0].tag == tag and got[0].status == "BAD"
    assert got[-1] == Command("z", "NOOP", False, ()), "the next command is read"


def test_bare_lf_and_nul_refused() -> None:
    assert events(CommandReader(), b"a NOOP\nb NOOP\r\n") == [
        ParseError("a", "bare CR or LF"), Command("b", "NOOP", False, ())]
    assert isinstance(one(b"a LOGIN a\0b c\r\n"), ParseError)
    assert isinstance(one(b"a LOGIN {3+}\r\na\0b c\r\n"), ParseError)  # NUL needs literal8
    c = cmd(b"a APPEND INBOX ~{3+}\r\na\0b\r\n")
    assert c.args[3] == LiteralBytes(b"a\0b", binary=True)


# ---------------------------------------------------------------------------- limits


def test_line_limit_reported_at_once_with_tag_and_resync() -> None:
    r = CommandReader()
    got = events(r, b"a7 SEARCH TEXT " + b"x" * 8200)
    assert got == [ParseError("a7", "line too long", "TOOBIG")]
    assert r.held <= 64
    assert events(r, b"y" * 100000 + b"\r\nb NOOP\r\n") == [Command("b", "NOOP", False, ())]
    # the limit counts every line of a command outside its literals
    r = CommandReader(Limits(max_line=100))
    assert events(r, b"a LOGIN {3}\r\n") == [ContinuationRequest()]
    got = events(r, b"abc " + b"p" * 100 + b"\r\nb NOOP\r\n")
    assert got == [ParseError("a", "line too long", "TOOBIG"), Command("b", "NOOP", False, ())]


def test_huge_literal_refused_before_any_octet_is_buffered() -> None:
    r = CommandReader()
    assert events(r, b"A1 APPEND INBOX {4294967295}\r\n") == [
        ParseError("A1", "literal too large", "TOOBIG", "NO")]
    assert r.held == 0
    assert events(r, b"A2 LOGIN {99999999999999999999999}\r\n")[0].code == "TOOBIG"
    r = CommandReader(Limits(max_append=1000, max_nonsync_literal=2000))
    assert events(r, b"A1 APPEND INBOX {1001}\r\n")[0].code == "TOOBIG"
    assert events(r, b"A1 APPEND INBOX {1001+}\r\n" + b"m" * 1001 + b"\r\n") == [
        ParseError("A1", "literal too large", "TOOBIG", "NO")]
    assert r.held == 0
    assert events(r, b"A2 APPEND INBOX {1000}\r\n") == [ContinuationRequest()]
    # outside APPEND the small limit applies, to each literal and to their sum
    r = CommandReader(Limits(max_literal=10))
    assert events(r, b"a LOGIN {6}\r\n") == [ContinuationRequest()]
    assert events(r, b"abcdef {5}\r\n") == [ParseError("a", "literal too large", "TOOBIG")]


def test_nonsync_literal_over_literal_minus_skipped_without_buffering() -> None:
    r = CommandReader(Limits(max_nonsync_literal=4096))  # LITERAL- (the default is LITERAL+)
    got = events(r, b"A1 APPEND INBOX {5000+}\r\n" + b"z NOOP\r\n" * 100)
    assert got == [ParseError("A1", "non-synchronizing literal over 4096 octets", "TOOBIG")]
    assert r.held == 0
    # the literal's octets, even ones that look like commands, are never commands; after
    # them comes the rest of the refused command's line, skipped as well
    got = events(r, b"z NOOP\r\n" * 525 + b" (rest of the line)\r\n" + b"B1 NOOP\r\n")
    assert got == [Command("B1", "NOOP", False, ())]


def test_literal_plus_takes_a_large_nonsync_append_without_a_continuation() -> None:
    """LITERAL+ (RFC 7888 §3): an APPEND {N+} within APPENDLIMIT is read as it comes."""
    msg = b"Subject: big\r\n\r\n" + b"x" * 100_000 + b"\r\n"
    r = CommandReader()
    got = events(r, b"A1 APPEND INBOX {%d+}\r\n" % len(msg) + msg + b"\r\nA2 NOOP\r\n")
    assert [type(e).__name__ for e in got] == ["Command", "Command"]
    assert got[0].name == "APPEND" and got[0].args[-1].data == msg  # type: ignore[union-attr]


def test_nonsync_append_over_appendlimit_is_counted_away_not_buffered() -> None:
    """An APPEND {N+} over max_append: NO [TOOBIG] at the announcement, its octets skipped
    as they arrive (the reader never holds more than one read); past max_discard, BYE."""
    r = CommandReader(Limits(max_append=1000, max_discard=1 << 20))
    assert events(r, b"A1 APPEND INBOX {500000+}\r\n") == [
        ParseError("A1", "literal too large", "TOOBIG", "NO")]
    held = 0
    for _ in range(50):
        assert events(r, b"A2 NOOP \r\n" * 1000) == []  # 10,000 octets, looking like commands
        held = max(held, r.held)
    assert held <= 10_000
    assert events(r, b"\r\nB1 NOOP\r\n") == [Command("B1", "NOOP", False, ())]
    got = events(r, b"A3 APPEND INBOX {2000000+}\r\n")
    assert got[0].code == "TOOBIG" and got[0].fatal  # type: ignore[union-attr]


def test_nonsync_literal_after_an_error_is_still_skipped() -> None:
    r = CommandReader()
    got = events(r, b"a FROB {8+}\r\nb NOOP\r\n\r\nc NOOP\r\n")
    assert got == [ParseError("a", "unknown command"), Command("c", "NOOP", False, ())]
    # an over-long line that ends by announcing a literal: the literal is skipped too
    got = events(CommandReader(), b"t " + b"x" * 9000 + b"{8+}\r\nb NOOP\r\n\r\nc NOOP\r\n")
    assert got == [ParseError("t", "line too long", "TOOBIG"), Command("c", "NOOP", False, ())]
    got = events(CommandReader(), b"a FROB {99999999999+}\r\nb NOOP\r\n")
    assert len(got) == 1 and got[0].fatal


def test_nesting_ranges_and_search_keys_bounded() -> None:
    deep = b"a SEARCH " + b"(" * 17 + b"ALL" + b")" * 17 + b"\r\n"
    assert one(deep).code == "LIMIT"
    assert one(b"a SEARCH " + b"NOT " * 40 + b"ALL\r\n").code == "LIMIT"
    assert one(b"a UID FETCH " + b",".join([b"1"] * 2001) + b" FLAGS\r\n").code == "LIMIT"
    assert isinstance(one(b"a UID FETCH " + b",".join([b"1"] * 2000) + b" FLAGS\r\n"), Command)
    keys = b" ".join([b"SEEN"] * 257)
    assert one(b"a SEARCH " + keys + b"\r\n").code == "LIMIT"
    assert one(b"a SELECT x (" * 17 + b")" * 17 + b"\r\n").code == "LIMIT"


def test_clear_discards_pipelined_input() -> None:
    r = CommandReader()
    got = events(r, b"a STARTTLS\r\nb LOGIN x y\r\n")
    assert got == [Command("a", "STARTTLS", False, ()), Command("b", "LOGIN", False,
                                                                (b"x", Secret(b"y")))]
    r = CommandReader()
    r.feed(b"a STARTTLS\r\nb LOGIN x y\r\n")
    assert r.next_event() == Command("a", "STARTTLS", False, ())
    r.clear()
    assert r.next_event() is None and r.held == 0


# ---------------------------------------------------------------------------- properties

LIMITS = Limits(max_line=200, max_literal=300, max_append=500, max_nonsync_literal=100,
                max_discard=10000)
BOUND = LIMITS.max_line + LIMITS.max_append + 64


def _drain(r: CommandReader) -> list[object]:
    out = []
    while (ev := r.next_event()) is not None:
        out.append(ev)
    return out


fragments = st.sampled_from([b"a", b" ", b"\r\n", b"{3}", b"{2+}", b"~{1}", b"{9999}", b"(", b")",
                             b'"', b"\\", b"NOOP", b"FETCH 1:*", b"UID", b"APPEND x", b"LOGIN",
                             b"SEARCH", b"NOT", b"OR", b"BODY[", b"]", b"\n", b"\0", b"\xff",
                             b"*", b"%", b"{99999999999+}"])
noise = st.one_of(st.binary(max_size=400),
                  st.lists(fragments, max_size=60).map(b"".join))


@settings(max_examples=examples(300), deadline=None)
@given(noise, st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_random_bytes_any_split_same_events_bounded_memory(data: bytes, cuts: list[int]) -> None:
    whole = CommandReader(LIMITS)
    whole.feed(data)
    expected = _drain(whole)
    r = CommandReader(LIMITS)
    got: list[object] = []
    pos, k = 0, 0
    while pos < len(data):
        step = cuts[k % len(cuts)]
        k += 1
        r.feed(data[pos:pos + step])
        pos += step
        got += _drain(r)
        assert r.held <= BOUND
    assert got == expected
    for ev in got:
        assert isinstance(ev, Command | ContinuationRequest | ParseError)
        if isinstance(ev, ParseError):
            assert ev.tag is None or ev.tag.isascii()


@settings(max_examples=examples(100), deadline=None)
@given(noise, st.sampled_from(["idle", "sasl"]))
def test_special_modes_random_input_never_crash(data: bytes, mode: str) -> None:
    r = CommandReader(LIMITS)
    r.feed(data)
    for _ in range(50):
        r.expect_done() if mode == "idle" else r.expect_sasl_response()
        if r.next_event() is None:
            break
    assert r.held <= len(data)


# -- round trip: a generated command, written by a small serializer, reads back the same

ATOM_TEXT = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.",
                    min_size=1, max_size=12)
seq_number = st.one_of(st.none(), st.integers(1, 2**32 - 1))
seq_sets = st.lists(st.tuples(seq_number, seq_number), min_size=1, max_size=5).map(
    lambda rs: SequenceSet(tuple(rs)))
astrings = st.binary(min_size=0, max_size=40).filter(lambda b: b"\0" not in b)


def w_seq(s: SequenceSet) -> bytes:
    def n(x: int | None) -> bytes:
        return b"*" if x is None else b"%d" % x
    return b",".join(n(a) if a == b else n(a) + b":" + n(b) for a, b in s.ranges)


def w_astring(value: bytes, style: int) -> bytes:
    if style == 0 and value and all(c in b"abcdefghijklmnopqrstuvwxyz0123456789" for c in value):
        return value
    if style == 1 and not any(c in b"\r\n" for c in value):
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d+}\r\n" % len(value) + value


fetch_atts = st.one_of(
    st.sampled_from([FetchAtt(n) for n in ("FLAGS", "UID", "RFC822.SIZE", "ENVELOPE",
                                           "INTERNALDATE", "BODYSTRUCTURE", "MODSEQ")]),
    st.builds(FetchAtt, st.sampled_from(["BODY", "BODY.PEEK"]),
              st.one_of(st.just(Section()),
                        st.builds(Section, st.lists(st.integers(1, 99), min_size=1,
                                                    max_size=3).map(tuple)),
                        st.builds(Section, st.just(()), st.sampled_from(["HEADER", "TEXT"])),
                        st.builds(Section, st.just(()), st.just("HEADER.FIELDS"),
                                  st.lists(ATOM_TEXT, min_size=1, max_size=4).map(tuple))),
              st.one_of(st.none(), st.tuples(st.integers(0, 10**6), st.integers(1, 10**6)))))


def w_section(s: Section) -> bytes:
    parts = [".".join(str(p) for p in s.part)] if s.part else []
    if s.text:
        parts.append(s.text)
    out = ".".join(parts)
    if s.fields:
        out += " (" + " ".join(s.fields) + ")"
    return b"[" + out.encode() + b"]"


def w_att(a: FetchAtt) -> bytes:
    out = a.name.encode() + (w_section(a.section) if a.section else b"")
    return out + (b"<%d.%d>" % a.partial if a.partial else b"")


search_leaf = st.one_of(
    st.builds(SearchKey, st.sampled_from(["SEEN", "UNSEEN", "DELETED", "ALL", "FLAGGED"])),
    st.builds(lambda n, v: SearchKey(n, (v,)), st.sampled_from(["FROM", "SUBJECT", "BODY"]),
              astrings),
    st.builds(lambda v: SearchKey("UID", (v,)), seq_sets),
    st.builds(lambda v: SearchKey("LARGER", (v,)), st.integers(0, 10**9)),
    st.builds(lambda d: SearchKey("SINCE", (d,)), st.dates(datetime.date(1970, 1, 1))))
search_keys = st.recursive(search_leaf, lambda kids: st.one_of(
    st.builds(lambda k: SearchKey("NOT", children=(k,)), kids),
    st.builds(lambda a, b: SearchKey("OR", children=(a, b)), kids, kids),
    st.builds(lambda ks: SearchKey("AND", children=tuple(ks)),
              st.lists(kids, min_size=1, max_size=3))), max_leaves=8)


def w_key(k: SearchKey, style: int) -> bytes:
    if k.name == "AND":
        return b"(" + b" ".join(w_key(c, style) for c in k.children) + b")"
    if k.children:
        return k.name.encode() + b" " + b" ".join(w_key(c, style) for c in k.children)
    if not k.args:
        return k.name.encode()
    v = k.args[0]
    if isinstance(v, SequenceSet):
        text = w_seq(v)
    elif isinstance(v, bytes):
        text = w_astring(v, style)
    elif isinstance(v, datetime.date):
        text = v.strftime("%d-%b-%Y").encode()
    else:
        text = b"%d" % v
    return k.name.encode() + b" " + text


commands = st.one_of(
    st.builds(lambda u, s, atts: Command("t1", "FETCH", u, (s, tuple(atts), ())),
              st.booleans(), seq_sets, st.lists(fetch_atts, min_size=1, max_size=5)),
    st.builds(lambda u, ks: Command("t2", "SEARCH", u, (None, None,
                                                        SearchKey("AND", children=tuple(ks)))),
              st.booleans(), st.lists(search_keys, min_size=1, max_size=3)),
    st.builds(lambda u, p: Command("t3", "LOGIN", False, (u, Secret(p))), astrings, astrings),
    st.builds(lambda s, act, silent, fl: Command("t4", "STORE", True,
                                                 (s, (), act, silent, tuple(fl))),
              seq_sets, st.sampled_from(["FLAGS", "+FLAGS", "-FLAGS"]), st.booleans(),
              st.lists(st.sampled_from(["\\Seen", "\\Deleted", "$Junk", "NonJunk"]),
                       max_size=4)),
    st.builds(lambda flags, msg: Command("t5", "APPEND", False,
                                         ("Sent", tuple(flags), None, LiteralBytes(msg))),
              st.lists(st.sampled_from(["\\Seen", "\\Draft"]), max_size=2),
              astrings))


def serialize(c: Command, style: int) -> bytes:
    head = c.tag.encode() + (b" UID " if c.uid else b" ") + c.name.encode()
    a = c.args
    if c.name == "FETCH":
        body = w_seq(a[0]) + b" (" + b" ".join(w_att(x) for x in a[1]) + b")"
    elif c.name == "SEARCH":
        body = b" ".join(w_key(k, style) for k in a[2].children)
    elif c.name == "LOGIN":
        body = w_astring(a[0], style) + b" " + w_astring(a[1].value, style)
    elif c.name == "STORE":
        body = (w_seq(a[0]) + b" " + a[2].encode() + (b".SILENT" if a[3] else b"")
                + b" (" + " ".join(a[4]).encode() + b")")
    else:
        body = (b"Sent (" + " ".join(a[1]).encode() + b") "
                + b"{%d+}\r\n" % len(a[3].data) + a[3].data)
    return head + b" " + body + b"\r\n"


@settings(max_examples=examples(300), deadline=None)
@given(commands, st.integers(0, 2))
def test_generated_commands_round_trip(command: Command, style: int) -> None:
    wire = serialize(command, style)
    assert events(CommandReader(), wire) == [command]


def test_searchres_dollar_is_a_saved_sequence_set() -> None:
    """RFC 5182: ``$`` stands for the saved SEARCH result, in commands and SEARCH keys."""
    assert cmd(b"a UID FETCH $ FLAGS\r\n").args[0] == SequenceSet((), saved=True)
    assert cmd(b"a COPY $ Trash\r\n").args == (SequenceSet((), saved=True), "Trash")
    key = cmd(b"a SEARCH OR $ SEEN\r\n").args[2]
    assert key.children[0].children[0] == SearchKey("SEQSET", (SequenceSet((), saved=True),))
