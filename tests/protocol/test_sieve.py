"""The Sieve language (protocol/sieve.py): validation with positions, the interpreter's RFC
5228 semantics, every extension offered, the per-run limits, and the message view."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailfort.protocol import sieve_match, sieve_message
from mailfort.protocol.sieve import (
    SUPPORTED,
    Discard,
    FileInto,
    Keep,
    Redirect,
    Reject,
    Script,
    SieveEnvironment,
    SieveError,
    SieveLimits,
    SieveMessage,
    SieveResult,
    Vacation,
    compile_script,
)
from tests.fuzzing import examples

HEADER = (b"Received: from a.example by mx.example.net; Mon, 7 Dec 2026 10:00:05 +0100\r\n"
          b"Received: from b.example by a.example; Mon, 7 Dec 2026 09:59:00 +0100\r\n"
          b"From: Alice <alice+lists@example.com>\r\n"
          b"To: Me <me@example.net>, bob@example.org\r\n"
          b"Subject: =?UTF-8?Q?Caf=C3=A9?= menu\r\n"
          b" for today\r\n"
          b"Date: Mon, 7 Dec 2026 10:00:00 +0100\r\n"
          b"X-Spam-Score: 7\r\n"
          b"\r\n")
BODY = b"Lunch is at noon.\r\n"
NOW = datetime(2026, 12, 7, 12, 30, 15, tzinfo=UTC)


def message(header: bytes = HEADER, body: bytes = BODY, *, envelope_from: str =
            "alice+lists@example.com", envelope_to: str = "me+work@example.net",
            size: int | None = None) -> SieveMessage:
    return SieveMessage.from_bytes(header, lambda: body,
                                   size=len(header) + len(body) if size is None else size,
                                   envelope_from=envelope_from, envelope_to=envelope_to,
                                   auth="me@example.net")


def environment(mailboxes: tuple[str, ...] = ("INBOX", "Work")) -> SieveEnvironment:
    return SieveEnvironment(now=NOW, hostname="mx.example.net",
                            mailbox_exists=lambda name: name in mailboxes)


def run(source: str, msg: SieveMessage | None = None, **kwargs: object) -> SieveResult:
    script = compile_script(source, **kwargs)  # type: ignore[arg-type]
    result = script.run(msg or message(), environment())
    return result


def actions(source: str, msg: SieveMessage | None = None, **kwargs: object) -> list[object]:
    result = run(source, msg, **kwargs)
    assert result.error is None, result.error
    return list(result.actions)


def refused(source: str, **kwargs: object) -> SieveError:
    with pytest.raises(SieveError) as info:
        compile_script(source, **kwargs)  # type: ignore[arg-type]
    return info.value


FI = 'require ["fileinto"];\n'


def filed(source: str, msg: SieveMessage | None = None) -> bool:
    """Whether a test (in ``if ... { fileinto "Yes"; }``) was true."""
    got = actions(source, msg)
    return FileInto("Yes") in got


# ------------------------------------------------------------------------- RFC 5228


def test_rfc5228_section_9_example() -> None:
    script = FI + '''
    if header :is "Sender" "owner-ietf-mtg@example.com" { discard; }
    elsif address :DOMAIN :is ["From", "To"] "example.com" { keep; }
    elsif anyof (not address :all :contains ["To", "Cc", "Bcc"] "me@example.net",
                 header :matches "subject" ["*make*money*fast*", "*university*dipl*mas*"])
      { fileinto "spam"; }
    else { fileinto "personal"; }
    '''
    assert actions(script) == [Keep()]  # From is example.com
    other = HEADER.replace(b"alice+lists@example.com", b"carol@example.org")
    assert actions(script, message(other)) == [FileInto("personal")]
    spam = other.replace(b"Me <me@example.net>", b"you@example.org")
    assert actions(script, message(spam)) == [FileInto("spam")]


def test_implicit_keep_and_what_cancels_it() -> None:
    assert actions("") == [Keep()]
    assert actions("discard;") == [Discard()]
    assert actions(FI + 'fileinto "A";') == [FileInto("A")]
    assert actions('redirect "x@example.org";') == [Redirect("x@example.org")]
    assert actions('require "reject"; reject "no";') == [Reject("no")]
    assert actions('require ["fileinto", "copy"]; fileinto :copy "A";') == [FileInto("A"),
                                                                            Keep()]
    assert actions('require "copy"; redirect :copy "x@example.org";') == [
        Redirect("x@example.org", copy=True), Keep()]
    assert actions("keep; discard;") == [Keep()]  # discard only cancels the implicit keep


def test_stop_and_duplicates() -> None:
    assert actions(FI + 'fileinto "A"; stop; fileinto "B";') == [FileInto("A")]
    assert actions(FI + 'fileinto "A"; fileinto "A"; keep; fileinto "inbox";') == [
        FileInto("A"), Keep()]
    assert actions('redirect "a@x.org"; redirect "A@X.org";') == [Redirect("a@x.org")]


def test_header_values_are_unfolded_and_rfc2047_decoded() -> None:
    assert filed(FI + 'if header :is "subject" "Café menu for today" { fileinto "Yes"; }')
    assert filed(FI + 'if header :contains "SUBJECT" "CAFÉ" { fileinto "Yes"; }') is False
    assert filed(FI + 'if header :contains "subject" "CAFé" { fileinto "Yes"; }')


@pytest.mark.parametrize(("test", "expected"), [
    ('header :is "x-spam-score" "7"', True),
    ('header :contains "to" "BOB@"', True),
    ('header :comparator "i;octet" :contains "to" "BOB@"', False),
    ('header :matches "from" "Alice <*+*@*>"', True),
    ('header :matches "subject" "caf? *"', True),
    ('header :matches "x-spam-score" "\\\\*"', False),
    ('header :is "x-missing" ""', False),
    ('exists ["from", "x-spam-score"]', True),
    ('exists ["from", "x-nope"]', False),
    ('address :is "to" "bob@example.org"', True),
    ('address :localpart :is "from" "alice+lists"', True),
    ('address :domain :is "to" "EXAMPLE.net"', True),
    ('size :over 100', True),
    ('size :under 100', False),
    ('allof (true, not false)', True),
    ('anyof (false, false)', False),
    ('envelope :is "from" "alice+lists@example.com"', True),
    ('envelope :localpart :is "to" "me+work"', True),
    ('envelope :is "auth" "me@example.net"', True),
])
def test_tests(test: str, expected: bool) -> None:
    script = 'require ["fileinto", "envelope"];\n' f'if {test} {{ fileinto "Yes"; }}'
    assert filed(script) is expected


def test_matches_sets_match_variables_only_when_it_matches() -> None:
    script = ('require ["fileinto", "variables"];\n'
              'if header :matches "from" "* <*@*>" { set "who" "${1}/${2}/${3}"; }\n'
              'if header :matches "subject" "no*match" { set "who" "${1}"; }\n'
              'fileinto "${who}/${0}";')
    assert actions(script) == [FileInto("Alice/alice+lists/example.com/Alice "
                                        "<alice+lists@example.com>")]


def test_wildcards_cannot_be_made_to_backtrack() -> None:
    value = b"a" * 60000
    header = b"Subject: " + value + b"\r\n\r\n"
    script = FI + 'if header :matches "subject" "' + "*a" * 40 + '*b" { fileinto "Yes"; }'
    start = time.process_time()
    assert actions(script, message(header)) == [Keep()]
    assert time.process_time() - start < 1


# ------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("script", "line", "column", "words"), [
    ('fileinto "x";', 1, 1, 'needs require "fileinto"'),
    ('keep;\nrequire "fileinto";', 2, 1, "before every other command"),
    ('if true { require "fileinto"; }', 1, 11, "before every other command"),
    ('require ["fileinto", "regex"];', 1, 9, "'regex' is not supported"),
    ('require "copy";\nredirect :copy :copy "a@b.c";', 2, 16, "given twice"),
    ('frobnicate;', 1, 1, "unknown command"),
    ('if frobnicate { }', 1, 4, "unknown test"),
    ('if header :over "a" "b" {}', 1, 11, "unknown tagged argument ':over'"),
    ('if header :count "ge" "a" "b" {}', 1, 11, ':count needs require "relational"'),
    ('if address :user "from" "a" {}', 1, 12, 'needs require "subaddress"'),
    ('if header :is :matches "a" "b" {}', 1, 15, "one match type only"),
    ('if header "a" {}', 1, 4, "takes 2 positional"),
    ('if header "a" "b" "c" {}', 1, 19, "takes 2 positional"),
    ('redirect ["a@b.c", "d@e.f"];', 1, 10, "expected a string"),
    ('if size 10 {}', 1, 9, "takes 0 positional"),
    ('if size {}', 1, 4, ":over or :under"),
    ('if header :comparator "i;nope" "a" "b" {}', 1, 23, "unknown comparator"),
    ('if header :comparator "i;ascii-numeric" "a" "b" {}', 1, 23,
     'needs require "comparator-i;ascii-numeric"'),
    ('require "comparator-i;ascii-numeric";\n'
     'if header :contains :comparator "i;ascii-numeric" "a" "b" {}', 2, 4, "cannot do"),
    ('require "relational"; if header :value "gx" "a" "b" {}', 1, 40, "unknown relation"),
    ('if header "a" "b" :comparator {}', 1, 19, ":comparator needs a string"),
    ('require "envelope"; if envelope "sender" "a" {}', 1, 33, "unknown part"),
    ('if header "bad name" "x" {}', 1, 11, "invalid header field name"),
    ('redirect "not an address";', 1, 10, "invalid redirect address"),
    ('require "fileinto"; fileinto "";', 1, 30, "empty mailbox"),
    ('else { keep; }', 1, 1, "without a preceding if"),
    ('if true { } keep; elsif true { }', 1, 19, "without a preceding if"),
    ('if true keep;', 1, 1, "needs a block"),
    ('if true;', 1, 1, "needs a block"),
    ('keep { }', 1, 1, "takes no block"),
    ('if anyof true {}', 1, 4, "test list"),
    ('if not (true, false) {}', 1, 4, "one test"),
    ('if true true {}', 1, 9, "takes no test"),
    ('require "index"; if header :last "a" "b" {}', 1, 21, ":last needs :index"),
    ('require "index"; if header :index 0 "a" "b" {}', 1, 35, "counts from 1"),
    ('require "variables"; set "1" "x";', 1, 26, "invalid variable name"),
    ('require "variables"; set "a" "${foo.bar}";', 1, 30, "unknown variable namespace"),
    ('require "encoded-character"; redirect "${unicode:D800}@x.y";', 1, 39,
     "not a Unicode scalar value"),
    ('require "date"; if date "date" "century" "x" {}', 1, 32, "unknown date part"),
    ('require "date"; if currentdate :zone "+25" "year" "x" {}', 1, 38, "invalid time zone"),
    # found by the atheris target: "+5000" made a timezone() of 50 hours raise ValueError
    ('require "date"; if currentdate :zone "+5000" "year" "x" {}', 1, 38,
     "invalid time zone"),
    ('require "vacation"; vacation :seconds 10 "x";', 1, 30,
     ':seconds needs require "vacation-seconds"'),
    ('require "vacation"; vacation :days 1 :days 2 "x";', 1, 38, "given twice"),
    ('require "include"; include "a/b";', 1, 28, "invalid script name"),
    ('return;', 1, 1, 'needs require "include"'),
    ('require "imap4flags"; setflag "v" "x";', 1, 31, 'needs require "variables"'),
])
def test_validation_errors_with_positions(script: str, line: int, column: int,
                                          words: str) -> None:
    err = refused(script)
    assert (err.line, err.column) == (line, column), err
    assert words in err.text, err


def test_a_nesting_limit_beyond_python_s_stack_is_still_a_sieve_error() -> None:
    err = refused("if " + "not " * 5000 + "true {}", limits=SieveLimits(max_nesting=100_000))
    assert "nested too deeply" in err.text


def test_supported_extensions() -> None:
    assert "regex" not in SUPPORTED and "editheader" not in SUPPORTED
    capability = " ".join(sorted(SUPPORTED))
    assert capability.startswith("body comparator-i;ascii-numeric copy date")
    for name in SUPPORTED:
        compile_script(f'require "{name}";')
    compile_script('require ["comparator-i;octet", "comparator-i;ascii-casemap"];')


def test_uses_reject_and_vacation() -> None:
    assert compile_script('require "reject"; if false { reject "x"; }').uses_reject
    assert compile_script('require "ereject"; ereject "x";').uses_reject
    assert not compile_script('require "reject"; keep;').uses_reject
    assert compile_script('require "vacation"; vacation "x";').uses_vacation
    assert not compile_script("keep;").uses_vacation
    inner = compile_script('require "include"; include "r";',
                           include=lambda name, g: b'require "reject"; reject "no";')
    assert inner.uses_reject


# ------------------------------------------------------------------------- extensions


def test_reject_and_ereject() -> None:
    assert actions('require "ereject"; ereject "Go away";') == [Reject("Go away", ereject=True)]
    # reject with a delivering action is a runtime error: keep, and say why
    result = run('require ["reject", "fileinto"]; fileinto "A"; reject "no";')
    assert result.actions == [Keep()] and "reject conflicts with fileinto" in (result.error
                                                                                or "")
    assert run('require ["reject", "vacation"]; vacation "x"; reject "no";').error
    assert run('require "reject"; reject "a"; reject "b";').error == "more than one reject"


def test_envelope_null_sender() -> None:
    msg = message(envelope_from="")
    script = ('require ["envelope", "fileinto"];'
              'if envelope :is "from" "" { fileinto "Yes"; }')
    assert filed(script, msg)
    assert filed(script.replace(":is", ":domain :is"), msg)


def test_subaddress() -> None:
    base = 'require ["subaddress", "envelope", "fileinto"];\n'
    assert filed(base + 'if envelope :detail "to" "work" { fileinto "Yes"; }')
    assert filed(base + 'if envelope :user "to" "me" { fileinto "Yes"; }')
    assert filed(base + 'if address :detail "to" "" { fileinto "Yes"; }') is False
    assert filed(base + 'if address :detail "from" "lists" { fileinto "Yes"; }')


def test_encoded_character() -> None:
    script = ('require ["encoded-character", "fileinto"];'
              'fileinto "${hex:46 6f}${unicode:263a}${hex:zz}";')
    assert actions(script) == [FileInto("Fo\u263a${hex:zz}")]
    # without the extension the text stays as written
    assert actions(FI + 'fileinto "${hex:46}";') == [FileInto("${hex:46}")]


def test_imap4flags() -> None:
    script = ('require ["imap4flags", "fileinto"];\n'
              'setflag "\\\\Seen"; addflag ["$A $B", "\\\\seen"]; removeflag "$a";\n'
              'if hasflag :is "$B" { fileinto "Flagged"; }\n'
              'fileinto :flags "\\\\Answered" "Other"; keep :flags "";')
    assert actions(script) == [FileInto("Flagged", ("\\Seen", "$B")),
                               FileInto("Other", ("\\Answered",)), Keep()]
    assert actions('require "imap4flags"; addflag "\\\\Seen";') == [Keep(("\\Seen",))]


def test_imap4flags_with_variables() -> None:
    script = ('require ["imap4flags", "variables"];\n'
              'setflag "f" "x y"; addflag "f" "z"; removeflag "f" "y";\n'
              'if hasflag "f" "z" { keep :flags "${f}"; }')
    assert actions(script) == [Keep(("x", "z"))]


def test_body_is_read_only_when_a_body_test_asks() -> None:
    calls = []

    def loader() -> bytes:
        calls.append(1)
        return BODY

    msg = SieveMessage.from_bytes(HEADER, loader, size=100, envelope_from="a@b.c",
                                  envelope_to="d@e.f")
    assert actions(FI + 'if header :contains "subject" "x" { fileinto "A"; }', msg) == [Keep()]
    assert calls == []
    script = 'require ["body", "fileinto"]; if body :contains "NOON" { fileinto "Yes"; }'
    assert actions(script, msg) == [FileInto("Yes")]
    assert actions(script, msg) == [FileInto("Yes")]
    assert calls == [1]


def test_body_transforms() -> None:
    header = (b"Content-Type: multipart/mixed; boundary=x\r\nMIME-Version: 1.0\r\n\r\n")
    body = (b"--x\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\nna=EFve\r\n"
            b"--x\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            b"UERGIHNlY3JldA==\r\n--x--\r\n")
    msg = message(header, body)
    base = 'require ["body", "fileinto"]; if body '
    assert filed(base + ':text :contains "naïve" { fileinto "Yes"; }', msg)
    assert filed(base + ':text :contains "PDF secret" { fileinto "Yes"; }', msg) is False
    assert filed(base + ':content "application" :contains "PDF secret" { fileinto "Yes"; }',
                 msg)
    assert filed(base + ':raw :contains "na=EFve" { fileinto "Yes"; }', msg)


def test_body_tested_bytes_are_bounded() -> None:
    body = b"x" * 5000 + b"needle"
    script = 'require ["body", "fileinto"]; if body :raw :contains "needle" { fileinto "Yes"; }'
    small = compile_script(script, limits=SieveLimits(max_body_bytes_tested=1000))
    assert small.run(message(body=body), environment()).actions == [Keep()]
    assert filed(script, message(body=body))


def test_variables_and_modifiers() -> None:
    script = ('require ["variables", "fileinto"];\n'
              'set "a" "wORLD"; set :lower :upperfirst "b" "${a}"; set :length "n" "${b}";\n'
              'set :quotewildcard "q" "a*b?"; set :upper "u" "${unknown}x";\n'
              'fileinto "${b}-${n}-${q}-${u}-${A}";')
    assert actions(script) == [FileInto("World-5-a\\*b\\?-X-wORLD")]


def test_string_test_and_count() -> None:
    base = 'require ["variables", "relational", "comparator-i;ascii-numeric", "fileinto"];\n'
    assert filed(base + 'set "x" "abc"; if string :is "${x}" "abc" { fileinto "Yes"; }')
    assert filed(base + 'if string :count "eq" :comparator "i;ascii-numeric" ["a", "", "b"]'
                        ' "2" { fileinto "Yes"; }')


def test_relational() -> None:
    base = 'require ["relational", "comparator-i;ascii-numeric", "fileinto"];\n'
    assert filed(base + 'if header :value "gt" :comparator "i;ascii-numeric" "x-spam-score"'
                        ' "5" { fileinto "Yes"; }')
    assert filed(base + 'if header :value "gt" :comparator "i;ascii-numeric" "x-spam-score"'
                        ' "10" { fileinto "Yes"; }') is False
    # i;octet orders "7" after "10"
    assert filed(base + 'if header :value "gt" :comparator "i;octet" "x-spam-score" "10"'
                        ' { fileinto "Yes"; }')
    assert filed(base + 'if header :count "eq" :comparator "i;ascii-numeric" "received" "2"'
                        ' { fileinto "Yes"; }')
    assert filed(base + 'if address :count "eq" :comparator "i;ascii-numeric" "to" "2"'
                        ' { fileinto "Yes"; }')
    # a key that is not a number is positive infinity for i;ascii-numeric
    assert filed(base + 'if header :value "lt" :comparator "i;ascii-numeric" "x-spam-score"'
                        ' "none" { fileinto "Yes"; }')


def test_date_currentdate_and_index() -> None:
    base = 'require ["date", "index", "relational", "fileinto", "variables"];\n'
    assert filed(base + 'if date :is "date" "date" "2026-12-07" { fileinto "Yes"; }')
    assert filed(base + 'if date :zone "+0100" :is "date" "hour" "10" { fileinto "Yes"; }')
    assert filed(base + 'if date :originalzone :is "date" "zone" "+0100" { fileinto "Yes"; }')
    assert filed(base + 'if date :is "date" "hour" "09" { fileinto "Yes"; }')  # UTC: env
    assert filed(base + 'if date :index 2 :is "received" "time" "08:59:00"'
                        ' { fileinto "Yes"; }')
    assert filed(base + 'if date :index 1 :last :is "received" "minute" "59"'
                        ' { fileinto "Yes"; }')
    assert filed(base + 'if currentdate :is "iso8601" "2026-12-07T12:30:15+00:00"'
                        ' { fileinto "Yes"; }')
    assert filed(base + 'if currentdate :zone "-0500" :is "weekday" "1" { fileinto "Yes"; }')
    assert filed(base + 'if currentdate :is "julian" "61381" { fileinto "Yes"; }')
    assert filed(base + 'if currentdate :value "ge" "date" "2026-01-01" { fileinto "Yes"; }')
    assert filed(base + 'if date :is "x-spam-score" "year" "2026" { fileinto "Yes"; }') is False
    assert filed(base + 'if header :index 2 :contains "received" "b.example"'
                        ' { fileinto "Yes"; }')


def test_a_zone_out_of_range_at_run_time_is_false_not_a_crash() -> None:
    script = ('require ["date", "variables", "fileinto"]; set "z" "+5000";\n'
              'if currentdate :zone "${z}" :matches "year" "*" { fileinto "Yes"; }')
    assert actions(script) == [Keep()]


def test_environment() -> None:
    base = 'require ["environment", "fileinto"];\n'
    assert filed(base + 'if environment :is "domain" "example.net" { fileinto "Yes"; }')
    assert filed(base + 'if environment :is "host" "mx.example.net" { fileinto "Yes"; }')
    assert filed(base + 'if environment :is "phase" "during" { fileinto "Yes"; }')
    assert filed(base + 'if environment :is "name" "mailfort" { fileinto "Yes"; }')
    assert filed(base + 'if environment :matches "remote-ip" "*" { fileinto "Yes"; }') is False


def test_mailbox_extension() -> None:
    base = 'require ["mailbox", "fileinto"];\n'
    assert filed(base + 'if mailboxexists ["INBOX", "Work"] { fileinto "Yes"; }')
    assert filed(base + 'if mailboxexists ["INBOX", "Nope"] { fileinto "Yes"; }') is False
    assert actions(base + 'fileinto :create "New";') == [FileInto("New", create=True)]


def test_vacation() -> None:
    (vacation, keep) = actions('require "vacation"; vacation "I am away";')
    assert keep == Keep() and isinstance(vacation, Vacation)
    assert (vacation.reason, vacation.seconds, vacation.subject, vacation.from_,
            vacation.addresses, vacation.mime) == ("I am away", 7 * 86400, None, None, (),
                                                   False)
    other = actions('require "vacation"; vacation "I am back";')[0]
    assert isinstance(other, Vacation) and other.handle != vacation.handle
    full = actions('require ["vacation", "vacation-seconds"];\n'
                   'vacation :seconds 3600 :subject "Out" :from "me@example.net" :addresses'
                   ' ["me@example.net", "alias@example.net"] :mime :handle "h" text:\n'
                   'Content-Type: text/plain\n\nAway.\n.\n;')[0]
    assert full == Vacation("Content-Type: text/plain\r\n\r\nAway.\r\n", "Out",
                            "me@example.net", ("me@example.net", "alias@example.net"), True,
                            "h", 3600)
    default = actions('require "vacation"; vacation "x";',
                      limits=SieveLimits(vacation_default_seconds=3 * 86400))[0]
    assert isinstance(default, Vacation) and default.seconds == 3 * 86400
    days = actions('require "vacation"; vacation :days 2 "x";')[0]
    assert isinstance(days, Vacation) and days.seconds == 2 * 86400
    assert run('require "vacation"; vacation "a"; vacation "b";').error == (
        "more than one vacation")


def scripts(table: dict[str, str]) -> Callable[[str, bool], bytes | None]:
    def load(name: str, global_: bool) -> bytes | None:
        key = ("global:" if global_ else "") + name
        return table[key].encode() if key in table else None
    return load


def test_include_personal_global_once_optional_return() -> None:
    table = {"spam": 'require "fileinto"; if header :contains "x-spam-score" "7"'
                     ' { fileinto "Junk"; }',
             "global:common": 'require ["include", "fileinto"];\n'
                              'fileinto "Global"; return; fileinto "Never";',
             "twice": 'require "fileinto"; fileinto "Twice";'}
    script = compile_script(
        'require ["include"];\n'
        'include "spam"; include :global "common"; include :once "twice";'
        ' include :once "twice"; include :optional "missing";',
        include=scripts(table))
    result = script.run(message(), environment())
    assert result.actions == [FileInto("Junk"), FileInto("Global"), FileInto("Twice")]


def test_include_global_variables() -> None:
    table = {"setter": 'require ["include", "variables"]; global "box"; set "box" "Shared";'
                       ' set "local" "hidden";',
             "user": 'require ["include", "variables", "fileinto"];'
                     ' fileinto "${global.box}${local}";'}
    script = compile_script('require ["include", "variables", "fileinto"]; global "box";\n'
                            'include "setter"; include "user"; fileinto "${box}${local}";',
                            include=scripts(table))
    assert script.run(message(), environment()).actions == [FileInto("Shared")]


def test_include_without_a_loader_checks_but_does_not_follow() -> None:
    script = compile_script('require "include"; include "later"; include :global "x";')
    result = script.run(message(), environment())
    assert result.actions == [Keep()] and "'later' was not resolved" in (result.error or "")
    assert "invalid script name" in refused('require "include"; include "";').text


def test_include_errors() -> None:
    assert "no personal script named 'nope'" in refused(
        'require "include"; include "nope";', include=scripts({})).text
    loop = scripts({"a": 'require "include"; include "b";',
                    "b": 'require "include"; include "a";'})
    err = refused('require "include";\ninclude "a";', include=loop)
    assert err.line == 2 and "recursion" in err.text
    chain = scripts({f"s{i}": f'require "include"; include "s{i + 1}";' for i in range(10)}
                    | {"s10": "keep;"})
    assert "deeper than 5" in refused('require "include"; include "s0";', include=chain).text
    many = scripts({f"m{i}": "keep;" for i in range(30)})
    text = 'require "include";' + "".join(f'include "m{i}";' for i in range(20))
    assert "more than 16 scripts" in refused(text, include=many).text
    broken = scripts({"bad": "keep;\n  frob;"})
    err = refused('require "include";\n\ninclude "bad";', include=broken)
    assert err.line == 3 and "line 2 column 3: unknown command 'frob'" in err.text


# ------------------------------------------------------------------------- limits


def test_action_and_redirect_limits() -> None:
    redirects = "".join(f'redirect "r{i}@example.org";' for i in range(5))
    result = run(redirects)
    assert result == SieveResult([Keep()], "more than 4 redirects")
    many = FI + "".join(f'fileinto "F{i}";' for i in range(40))
    assert run(many).error == "more than 32 actions"
    assert run(many, limits=SieveLimits(max_actions=64)).error is None


def test_variable_limits() -> None:
    script = 'require "variables";' + "".join(f'set "v{i}" "x";' for i in range(200))
    assert run(script).error == "more than 128 variables"
    big = ('require ["variables", "fileinto"]; set "a" "0123456789";'
           + 'set "a" "${a}${a}";' * 12 + 'set :length "n" "${a}"; fileinto "${n}";')
    assert actions(big) == [FileInto("4096")]
    huge = ('require ["variables", "fileinto"]; set "a" "' + "x" * 4000 + '";'
            ' fileinto "' + "${a}" * 100 + '";')
    assert run(huge).error == "a string expanded to more than 65536 characters"


def test_cpu_budget() -> None:
    script = FI + 'if header :matches "subject" "*x*y*z" { fileinto "A"; }\n' * 300
    header = b"Subject: " + b"x" * 3000 + b"\r\n\r\n"
    limited = compile_script(script, limits=SieveLimits(max_cpu_ms=1))
    result = limited.run(message(header), environment())
    assert result.actions == [Keep()] and "CPU time limit of 1 ms" in (result.error or "")


def test_cpu_budget_bounds_the_cached_fast_path() -> None:
    """:contains on values folded once per message still counts each value against the
    budget (the values are cached, the comparisons are not)."""
    script = FI + 'if header :contains "x-many" "absent" { fileinto "A"; }\n' * 300
    header = b"X-Many: " + b"v" * 20 + b"\r\n"
    limited = compile_script(script, limits=SieveLimits(max_cpu_ms=1))
    result = limited.run(message(header * 3000 + b"\r\n"), environment())
    assert result.actions == [Keep()] and "CPU time limit of 1 ms" in (result.error or "")


def test_values_cached_per_message_keep_comparator_and_part_apart() -> None:
    """One message, tests that share a field but not the comparator, the part or :index:
    each answer is the one the test alone gives."""
    script = 'require ["fileinto", "variables", "index"];' + """
        if header :is :comparator "i;octet" "subject" "hello" { fileinto "Octet"; }
        if header :is "subject" "hello" { fileinto "Casemap"; }
        if address :localpart :is "from" "example.com" { fileinto "Wrong"; }
        if address :domain :is "from" "EXAMPLE.com" { fileinto "Domain"; }
        if address :domain :is :comparator "i;octet" "from" "EXAMPLE.com" { fileinto "No"; }
        if address :all :matches "from" "*@*" { fileinto "${1}"; }
        if header :index 2 :contains "x-a" "two" { fileinto "Second"; }
        if header :contains ["x-a", "subject"] "ONE" { fileinto "Either"; }
    """
    header = (b"Subject: Hello\r\nFrom: Ann <Ann@Example.COM>\r\nX-A: one\r\n"
              b"X-A: two\r\n\r\n")
    assert [a.mailbox for a in run(script, message(header)).actions
            if isinstance(a, FileInto)] == ["Casemap", "Domain", "Ann", "Second", "Either"]


def test_runtime_errors_keep_the_message() -> None:
    result = run('require ["fileinto", "variables"]; set "b" ""; fileinto "${b}";')
    assert result == SieveResult([Keep()], "fileinto: empty mailbox name")
    result = run('require "variables"; set "a" "no address"; redirect "${a}";')
    assert result.actions == [Keep()] and "invalid redirect address" in (result.error or "")


def test_header_bytes_tested_are_bounded() -> None:
    header = b"X-Pad: " + b"p" * 2000 + b"\r\nSubject: late\r\n\r\n"
    script = FI + 'if exists "subject" { fileinto "Yes"; }'
    small = compile_script(script, limits=SieveLimits(max_header_bytes_tested=1000))
    assert small.run(message(header), environment()).actions == [Keep()]
    assert filed(script, message(header))


def fifty_rules() -> Script:
    rules = ['require ["fileinto", "envelope", "subaddress", "imap4flags", "relational",'
             ' "comparator-i;ascii-numeric"];']
    for i in range(50):
        rules.append([
            f'if header :contains "subject" "project-{i}" {{ fileinto "P{i}"; stop; }}',
            f'if address :domain :is "from" "list{i}.example.org" {{ fileinto "L{i}"; }}',
            f'if header :matches "list-id" "*<news{i}.*" {{ fileinto "N{i}"; }}',
            f'if envelope :detail "to" "tag{i}" {{ addflag "$t{i}"; }}',
            f'if header :value "ge" :comparator "i;ascii-numeric" "x-spam-score" "{i + 100}"'
            ' { fileinto "Junk"; }'][i % 5])
    return compile_script("\n".join(rules))


def test_fifty_rules_parse_the_header_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = sieve_message.parse_header_block

    def counting(block: bytes, limit: int) -> dict[str, list[str]]:
        calls.append(1)
        return real(block, limit)

    monkeypatch.setattr(sieve_message, "parse_header_block", counting)
    script = fifty_rules()
    assert script.run(message(), environment()).actions == [Keep()]
    assert calls == [1]


def test_fifty_rules_on_a_small_message_are_fast() -> None:
    script = fifty_rules()
    env = environment()
    header = HEADER + b"X-Pad: " + b"p" * 400 + b"\r\n"
    runs = []
    for _ in range(30):
        start = time.process_time()
        script.run(message(header), env)
        runs.append(time.process_time() - start)
    # well under a millisecond on a quiet machine; generous here (a shared CI box)
    assert sorted(runs)[len(runs) // 2] < 0.003


# ------------------------------------------------------------------------- message view


def test_address_lists_with_groups_comments_and_quotes() -> None:
    value = ('"Doe, Jane" <jane@example.org>, bob@example.net (Bob, B.),'
             ' team: carol@example.net, <dan@example.net>;, <>, Undisclosed:;')
    assert sieve_message.parse_addresses(value) == [
        "jane@example.org", "bob@example.net", "carol@example.net", "dan@example.net"]


def test_addresses_come_from_the_raw_field_not_the_decoded_one() -> None:
    header = b"From: =?utf-8?q?Doe=2C_J?= <j@example.org>\r\n\r\n"
    script = ('require ["relational", "comparator-i;ascii-numeric", "fileinto"];'
              ' if address :count "eq" :comparator "i;ascii-numeric" "from" "1"'
              ' { fileinto "Yes"; }')
    assert filed(script, message(header))
    assert filed(FI + 'if header :contains "from" "Doe, J" { fileinto "Yes"; }',
                 message(header))


def test_the_header_section_ends_at_the_first_empty_line() -> None:
    fields = sieve_message.parse_header_block(
        b"Subject: a\r\n\r\nX-In-Body: b\r\n", 65536)
    assert fields == {"subject": ["a"]}
    assert sieve_message.parse_header_block(b"A: 1\nB: 2\n \tfolded\n\nC: 3\n", 65536) == {
        "a": ["1"], "b": ["2 \tfolded"]}
    parse = sieve_message.parse_header_block
    assert parse(b"A: 1\r\n\r\nB: 2\r\n", 65536) == {"a": ["1"]}
    assert parse(b"A: 1\n\r\nB: 2\r\n", 65536) == {"a": ["1"]}  # a line of only CR
    assert parse(b"A: 1\n\r", 65536) == {"a": ["1"]}
    assert parse(b"\r\nA: 1\r\n", 65536) == {}
    assert parse(b"A: 1\r\n\tb\r\n c\nB:\r\n  2\r\n", 65536) == {
        "a": ["1\tb c"], "b": ["2"]}


def test_rfc2047_decoding() -> None:
    decode = sieve_message.decode_mime_words
    assert decode("=?utf-8?b?w6k=?= =?utf-8?q?t=C3=A9?=") == "été"
    assert decode("a =?iso-8859-1?q?=E9?= b") == "a é b"
    assert decode("=?x-unknown?q?abc?=") == "=?x-unknown?q?abc?="
    assert decode("plain") == "plain"


def test_date_default_zone_is_the_environment_s() -> None:
    env = SieveEnvironment(now=datetime(2026, 12, 7, 12, tzinfo=timezone(timedelta(hours=9))),
                           hostname="h", mailbox_exists=lambda n: False)
    script = compile_script('require ["date", "fileinto"];'
                            ' if date :is "date" "hour" "18" { fileinto "Yes"; }')
    assert script.run(message(), env).actions == [FileInto("Yes")]


# ------------------------------------------------------------------------- :matches


def _reference(pattern: str) -> str:
    """The pattern as a regular expression (fine for the short inputs of the property)."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append("(.*?)" if c == "*" else "(.)" if c == "?" else re.escape(c))
        i += 1
    return "".join(out)


@settings(max_examples=examples(300), deadline=None)
@given(st.text("ab*?\\", max_size=8), st.text("abAB*?\\", max_size=12), st.booleans())
def test_glob_agrees_with_a_regular_expression(pattern: str, value: str,
                                               casemap: bool) -> None:
    caps = sieve_match.glob(value, sieve_match.compile_glob(pattern, casemap), casemap,
                            lambda: None)
    flags = re.IGNORECASE | re.DOTALL if casemap else re.DOTALL
    expected = re.fullmatch(_reference(pattern), value, flags)
    assert (caps is not None) == (expected is not None)
    if caps is not None and expected is not None:
        assert len(caps) == len(expected.groups())
        # the first wildcard takes the shortest match, as the lazy regex does
        assert caps[:1] == list(expected.groups()[:1])
