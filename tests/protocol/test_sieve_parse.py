"""The Sieve lexer and parser (protocol/sieve_parse.py): RFC 5228 grammar, error positions,
limits checked while reading, and a fuzz that only ever gets a tree or a SieveError."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailfort.protocol.sieve import Keep, SieveEnvironment, SieveMessage, compile_script
from mailfort.protocol.sieve_parse import (
    DEFAULT_LIMITS,
    NumberArg,
    SieveError,
    SieveLimits,
    StringArg,
    TagArg,
    parse,
)
from tests.fuzzing import examples


def first_string(script: str) -> str:
    arg = parse(script).commands[0].args[-1]
    assert isinstance(arg, StringArg)
    return arg.values[0]


def error_of(script: str | bytes, limits: SieveLimits = DEFAULT_LIMITS) -> SieveError:
    with pytest.raises(SieveError) as info:
        parse(script, limits)
    return info.value


# ------------------------------------------------------------------------- grammar


def test_commands_blocks_tests_and_lists() -> None:
    tree = parse('require ["fileinto", "envelope"];\n'
                 'if anyof (header :contains "subject" "x", not exists "y") {\n'
                 '  fileinto "a"; stop;\n} else { keep; }\n').commands
    assert [n.name for n in tree] == ["require", "if", "else"]
    test = tree[1].tests[0]
    assert test.name == "anyof" and tree[1].test_list is False and test.test_list
    assert [t.name for t in test.tests] == ["header", "not"]
    assert test.tests[1].tests[0].name == "exists"
    assert isinstance(test.tests[0].args[0], TagArg)
    assert [c.name for c in tree[1].block or []] == ["fileinto", "stop"]
    assert tree[0].args[0] == StringArg(["fileinto", "envelope"], True, tree[0].args[0].pos)


def test_identifiers_and_tags_are_case_insensitive() -> None:
    node = parse('IF Header :IS "a" "b" { KEEP; }').commands[0]
    assert node.name == "if" and node.tests[0].name == "header"
    assert node.tests[0].args[0] == TagArg("is", node.tests[0].args[0].pos)


@pytest.mark.parametrize(("text", "value"), [("1", 1), ("10K", 10240), ("2m", 2 << 20),
                                             ("3G", 3 << 30), ("0", 0)])
def test_numbers_with_quantifiers(text: str, value: int) -> None:
    arg = parse(f"size :over {text};").commands[0].args[1]
    assert isinstance(arg, NumberArg) and arg.value == value


def test_quoted_string_escapes() -> None:
    # RFC 5228 2.4.2: \\ and \" are escapes, any other backslash is dropped
    assert first_string(r'x "a\\b\"c\d";') == 'a\\b"cd'
    assert first_string('x "two\r\nlines";') == "two\r\nlines"


def test_multiline_string_dot_unstuffing_and_comment() -> None:
    script = 'x text: # comment\r\nline one\r\n..dotted\r\n.\r\n;'
    assert first_string(script) == "line one\r\n.dotted\r\n"
    assert first_string("x TEXT:\n.\n;") == ""
    assert first_string("x text:   \n..\n...\n.\n;") == ".\r\n..\r\n"  # LF ends become CRLF


def test_comments_are_white_space() -> None:
    tree = parse("/* a\n * block */ keep; # hash\n/**/discard;/* x */").commands
    assert [n.name for n in tree] == ["keep", "discard"]


# ------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("script", "line", "column", "words"), [
    ("keep", 1, 5, "expected ';'"),
    ('keep;\n  fileinto "x"\n', 3, 1, "expected ';'"),
    ('if true {\n keep;\n', 3, 1, "missing '}'"),
    ("keep;\n}", 2, 1, "without a matching"),
    ('x "abc', 1, 3, "unterminated string"),
    ("x text:\nabc\n", 1, 3, "unterminated multi-line"),
    ("x text: junk\nabc\n.\n", 1, 3, "line end"),
    ("/* never closed", 1, 1, "unterminated bracket comment"),
    ("x 12abc;", 1, 3, "invalid number"),
    ("x 99999999999999999999G;", 1, 3, "too large"),
    ('x ["a", ];', 1, 9, "expected a string"),
    ('x ["a" "b"];', 1, 8, "',' or ']'"),
    ("if (true; false) {}", 1, 9, "',' or ')'"),
    ("keep; @", 1, 7, "unexpected character"),
    ("x : ;", 1, 3, "tag name"),
    ("\n\n   ;", 3, 4, "expected a command"),
])
def test_errors_carry_line_and_column(script: str, line: int, column: int, words: str) -> None:
    err = error_of(script)
    assert (err.line, err.column) == (line, column), err
    assert words in err.text
    assert str(err) == f"line {line}: {err.text}"


def test_invalid_utf8_is_refused_at_its_position() -> None:
    err = error_of(b'keep;\nfileinto "caf\xe9";')
    assert (err.line, err.column) == (2, 14) and "UTF-8" in err.text


def test_columns_count_characters_not_bytes() -> None:
    err = error_of('x "été" @')
    assert err.column == 9


# ------------------------------------------------------------------------- limits


def test_script_size_limit_checked_before_reading() -> None:
    limits = SieveLimits(max_script_bytes=100)
    assert "larger than 100 bytes" in error_of("#" * 101, limits).text
    parse("#" * 100, limits)


def test_nesting_limit_for_blocks_and_tests() -> None:
    limits = SieveLimits(max_nesting=5)
    parse("if true {" * 5 + "}" * 5, limits)
    assert "nesting deeper" in error_of("if true {" * 6 + "}" * 6, limits).text
    parse("if " + "not " * 4 + "true {}", limits)
    assert "nesting deeper" in error_of("if " + "not " * 5 + "true {}", limits).text
    assert "nesting deeper" in error_of("if " + "anyof(" * 6 + "true" + ")" * 6 + "{}",
                                        limits).text


def test_deep_nesting_by_default_is_an_error_not_a_crash() -> None:
    err = error_of("if " + "not " * 16_000 + "true {}")
    assert "nesting deeper than 32" in err.text
    err = error_of("if true {" * 7_000)
    assert "nesting deeper than 32" in err.text


def test_token_and_string_limits() -> None:
    assert "tokens" in error_of("keep;" * 100, SieveLimits(max_tokens=150)).text
    assert "strings" in error_of('x ' + '"a" ' * 20 + ';', SieveLimits(max_strings=10)).text


def test_a_large_hostile_script_is_refused_quickly() -> None:
    start = time.perf_counter()
    for script in ('x "' + "\\" * 65000, "/*" + "*" * 65000, "x text:\n" + "a\n" * 30000,
                   "[" * 65000, "if " + "(" * 60000):
        with pytest.raises(SieveError):
            compile_script(script)
    assert time.perf_counter() - start < 2


# ------------------------------------------------------------------------- fuzz

_WORDS = ["require", "if", "elsif", "else", "keep", "discard", "stop", "fileinto", "redirect",
          "header", "address", "envelope", "allof", "anyof", "not", "true", "false", "size",
          "exists", "set", "vacation", "include", "global", "body", "string", "date",
          ":is", ":contains", ":matches", ":count", ":value", ":over", ":under",
          ":comparator", ":days", ":copy", ":flags", ":index", ":last", ":domain",
          '"i;ascii-numeric"', '"ge"', '"fileinto"', '"variables"', '"x@y.z"', '"${1}"',
          '"${hex:41}"', "{", "}", "(", ")", "[", "]", ",", ";", "10K", "text:\nx\n.\n",
          "/* c */", "# c\n", '"a"', '["a","b"]', "\n", "reject", "ereject",
          "discard", "keep", '"reject"', '"envelope"', '"relational"', '"date"', '"body"',
          '"imap4flags"', '"include"', '"copy"', '"mailbox"', '"subaddress"',
          '"comparator-i;ascii-numeric"', '"from"', '"to"', '"subject"', '"year"', '"*"',
          '"${0}"', "addflag", "hasflag", ":create", ":once", ":optional", "return"]


@settings(max_examples=examples(150), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        compile_script(data)
    except SieveError as err:
        assert err.line >= 1 and err.column >= 1


@settings(max_examples=examples(200), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_WORDS), max_size=40))
def test_fuzz_grammar_shaped(words: list[str]) -> None:
    """What compiles also runs: never raises, always ends in an action, errors keep."""
    script = " ".join(words)
    try:
        compiled = compile_script(script, include=lambda name, global_: b"keep;")
    except SieveError as err:
        assert err.line >= 1 and err.column >= 1
        return
    result = compiled.run(_MESSAGE, _ENV)
    assert result.actions
    if result.error is not None:
        assert result.actions == [Keep()] and not result.error.startswith("internal")


_MESSAGE = SieveMessage.from_bytes(
    b"From: a@x.y\r\nTo: b@x.y\r\nSubject: a\r\nDate: Mon, 7 Dec 2026 10:00:00 +0100\r\n\r\n",
    lambda: b"body\r\n", size=100, envelope_from="a@x.y", envelope_to="b@x.y")
_ENV = SieveEnvironment(now=datetime(2026, 12, 7, tzinfo=UTC), hostname="h.x.y",
                        mailbox_exists=lambda name: True)


_REQUIRE = ('require ["fileinto", "reject", "envelope", "variables", "relational", "body",'
            ' "imap4flags", "copy", "date", "index", "subaddress", "vacation", "mailbox",'
            ' "comparator-i;ascii-numeric", "encoded-character", "environment"];\n')
_ONE = st.sampled_from(['"a"', '"*"', '"?*@*"', '"${1}"', '"${v}x"', '"2026"',
                        '"\\\\*"', '"${hex:41}"', '"10"'])
_KEYS = st.one_of(_ONE, st.sampled_from(['""', '["x", "b@x.y"]']))
_NAMES = st.sampled_from(['"from"', '"to"', '"subject"', '"date"', '"x-none"', '["to", "cc"]'])
_MATCH = st.sampled_from([":is", ":contains", ":matches", ':count "ge"', ':value "lt"',
                          ':comparator "i;ascii-numeric" :value "eq"', ":is :comparator "
                          '"i;octet"'])


def _tests() -> st.SearchStrategy[str]:
    leaf = st.one_of(
        st.builds("header {} {} {}".format, _MATCH, _NAMES, _KEYS),
        st.builds("address {} {} {} {}".format,
                  st.sampled_from([":all", ":localpart", ":domain", ":user", ":detail"]),
                  _MATCH, _NAMES, _KEYS),
        st.builds("envelope {} {} {}".format, _MATCH,
                  st.sampled_from(['"from"', '"to"']), _KEYS),
        st.builds("body :text {} {}".format, _MATCH, _KEYS),
        st.builds("string {} {} {}".format, _MATCH, _KEYS, _KEYS),
        st.builds('date :index 1 {} "date" {} {}'.format, _MATCH,
                  st.sampled_from(['"year"', '"iso8601"', '"weekday"']), _KEYS),
        st.builds("size :over {}".format, st.sampled_from(["1", "1K", "0"])),
        st.builds("hasflag {} {}".format, _MATCH, _KEYS),
        st.just('exists "from"'), st.just("true"), st.just("false"))
    return st.recursive(leaf, lambda inner: st.one_of(
        st.builds("not {}".format, inner),
        st.builds("anyof({}, {})".format, inner, inner),
        st.builds("allof({}, {})".format, inner, inner)), max_leaves=6)


def _commands() -> st.SearchStrategy[str]:
    simple = st.one_of(
        st.builds("fileinto {};".format, _ONE),
        st.builds("fileinto :copy :flags {} {};".format, _KEYS, _ONE),
        st.builds("redirect {};".format, st.sampled_from(['"r@x.y"', '"${1}@x.y"'])),
        st.sampled_from(["keep;", "discard;", "stop;", 'reject "no";', 'vacation "away";',
                         'addflag "\\\\Seen";', 'set "v" "${1}";', 'set :upper "v" "${0}";',
                         'keep :flags "${v}";']))
    return st.recursive(simple, lambda inner: st.builds(
        "if {} {{ {} }} else {{ {} }}".format, _tests(), inner, inner), max_leaves=8)


@settings(max_examples=examples(40), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_commands(), max_size=6))
def test_fuzz_valid_scripts_run(commands: list[str]) -> None:
    """Scripts from the grammar with every extension: they compile, and a run never
    raises, always decides something, and a runtime error is a plain keep."""
    compiled = compile_script(_REQUIRE + "\n".join(commands))
    result = compiled.run(_MESSAGE, _ENV)
    assert result.actions
    if result.error is not None:
        assert result.actions == [Keep()] and not result.error.startswith("internal")
