"""Sieve (RFC 5228) lexer and parser: script text to a syntax tree, bounded while it reads.

Every limit is checked as the input is consumed, so a hostile script (ManageSieve PUTSCRIPT,
a user's file) costs at most ``max_script_bytes`` of reading, ``max_tokens`` tokens and
``max_nesting`` levels of recursion; every refusal is a ``SieveError`` with line and column.

Why not PyPI ``sievelib`` (1.6.0, read and tried before writing this): its string values
stay raw (``"a\\b"`` comes out with its quotes and backslashes, multi-line strings are not
dot-unstuffed), it has no limit on size, tokens, strings or nesting (200 nested ``not`` parse
happily), the extensions it knows stop short of what we offer (no include, mailbox, index,
subaddress, ereject, encoded-character, relational checks), and it keeps the loaded
extensions in module-global (thread-local) state. It does report line and column. Fixing
the rest would be a rewrite, and the grammar is small: this module is that rewrite.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SieveLimits:
    """What one script may cost: compiling (bytes, tokens, nesting) and each run."""

    max_script_bytes: int = 65536
    max_actions: int = 32
    max_redirects: int = 4
    max_nesting: int = 32
    max_cpu_ms: int = 200
    max_variables: int = 128
    max_variable_bytes: int = 4096
    max_include_depth: int = 5
    max_includes: int = 16
    max_header_bytes_tested: int = 65536
    max_body_bytes_tested: int = 1 << 20
    max_tokens: int = 32768
    max_strings: int = 8192  # string literals in one script (lists included)
    max_number: int = (1 << 63) - 1
    max_expanded_chars: int = 65536  # one string after ${...} expansion, at run time
    vacation_default_seconds: int = 7 * 86400  # a vacation without :days or :seconds


DEFAULT_LIMITS = SieveLimits()


class SieveError(Exception):
    """A compile error, at a position of the script (1-based line and column)."""

    def __init__(self, line: int, column: int, text: str) -> None:
        super().__init__(f"line {line}: {text}")
        self.line = line
        self.column = column
        self.text = text


# ------------------------------------------------------------------------- syntax tree


@dataclass(slots=True)
class StringArg:
    """A string or a string list; ``is_list`` when it was written in brackets."""

    values: list[str]
    is_list: bool
    pos: int


@dataclass(slots=True)
class NumberArg:
    value: int
    pos: int


@dataclass(slots=True)
class TagArg:
    name: str  # lower case, without the colon
    pos: int


Argument = StringArg | NumberArg | TagArg


@dataclass(slots=True)
class Node:
    """A command (with ``block`` when it has one) or a test (``block`` is None)."""

    name: str  # lower case
    pos: int
    args: list[Argument] = field(default_factory=list)
    tests: list[Node] = field(default_factory=list)
    test_list: bool = False  # tests were written in parentheses
    block: list[Node] | None = None


@dataclass(slots=True)
class Parsed:
    commands: list[Node]
    source: Source


class Source:
    """The script text, with offsets turned into line and column only when asked."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._starts: list[int] | None = None

    def position(self, offset: int) -> tuple[int, int]:
        if self._starts is None:
            self._starts = [0] + [m.end() for m in re.finditer("\n", self.text)]
        index = bisect.bisect_right(self._starts, offset) - 1
        return index + 1, offset - self._starts[index] + 1

    def error(self, offset: int, text: str) -> SieveError:
        line, column = self.position(offset)
        return SieveError(line, column, text)


# ------------------------------------------------------------------------- lexer

# token kinds
IDENT, TAG, NUMBER, STRING, PUNCT, END = "identifier", "tag", "number", "string", "punct", "end"

_SKIP = re.compile(r"(?:[ \t\r\n]+|#[^\n]*)+")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"([0-9]+)([KkMmGg]?)")
_TEXT_START = re.compile(r"[ \t]*(?:#[^\n]*)?\r?\n")
_TEXT_END = re.compile(r"^\.\r?$", re.M)
_QUOTED_RUN = re.compile(r'[^"\\]*')
_QUANT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


@dataclass(slots=True)
class Token:
    kind: str
    value: str | int
    pos: int


def tokenize(source: Source, limits: SieveLimits) -> list[Token]:
    """The tokens of the script, comments and white space dropped; bounded in count."""
    text, pos, end = source.text, 0, len(source.text)
    tokens: list[Token] = []
    append = tokens.append
    strings = 0
    while True:
        m = _SKIP.match(text, pos)
        if m:
            pos = m.end()
        if pos < end and text.startswith("/*", pos):
            close = text.find("*/", pos + 2)
            if close < 0:
                raise source.error(pos, "unterminated bracket comment")
            pos = close + 2
            continue
        if pos >= end:
            append(Token(END, "", pos))
            return tokens
        if len(tokens) >= limits.max_tokens:
            raise source.error(pos, f"script has more than {limits.max_tokens} tokens")
        c = text[pos]
        if c in "[](){};,":
            append(Token(PUNCT, c, pos))
            pos += 1
        elif c == '"':
            value, pos2 = _quoted(source, pos)
            append(Token(STRING, value, pos))
            pos = pos2
            strings += 1
        elif c == ":":
            m = _IDENT.match(text, pos + 1)
            if not m:
                raise source.error(pos, "':' not followed by a tag name")
            append(Token(TAG, m.group().lower(), pos))
            pos = m.end()
        elif c.isdigit() and c.isascii():
            m = _NUMBER.match(text, pos)
            assert m is not None
            if m.end() < end and (text[m.end()].isalnum() or text[m.end()] == "_"):
                raise source.error(pos, "invalid number")
            value = int(m.group(1)) * _QUANT[m.group(2).lower()]
            if value > limits.max_number:
                raise source.error(pos, "number too large")
            append(Token(NUMBER, value, pos))
            pos = m.end()
        else:
            m = _IDENT.match(text, pos)
            if not m:
                raise source.error(pos, f"unexpected character {c!r}")
            word = m.group()
            if word.lower() == "text" and text.startswith(":", m.end()):
                value, pos2 = _multiline(source, pos, m.end() + 1)
                append(Token(STRING, value, pos))
                pos = pos2
                strings += 1
            else:
                append(Token(IDENT, word.lower(), pos))
                pos = m.end()
        if strings > limits.max_strings:
            raise source.error(pos, f"script has more than {limits.max_strings} strings")


def _quoted(source: Source, start: int) -> tuple[str, int]:
    """A quoted string from its opening quote: \\\\ and \\" unescaped, \\x taken as x."""
    text, pos, parts = source.text, start + 1, []
    while True:
        m = _QUOTED_RUN.match(text, pos)
        assert m is not None
        parts.append(m.group())
        pos = m.end()
        if pos >= len(text):
            raise source.error(start, "unterminated string")
        if text[pos] == '"':
            return "".join(parts), pos + 1
        if pos + 1 >= len(text):  # a backslash at the very end
            raise source.error(start, "unterminated string")
        parts.append(text[pos + 1])
        pos += 2


def _multiline(source: Source, start: int, after_colon: int) -> tuple[str, int]:
    """A ``text:`` string: its lines up to a lone ".", one leading dot removed per line."""
    text = source.text
    m = _TEXT_START.match(text, after_colon)
    if not m:
        raise source.error(start, "text: must be followed by a line end")
    body_start = m.end()
    t = _TEXT_END.search(text, body_start)
    if not t:
        raise source.error(start, "unterminated multi-line string (no line with a single '.')")
    lines = text[body_start:t.start()].split("\n")[:-1]  # each line ended by its LF
    # one leading dot removed; every line ends in CRLF whatever the file used (as in
    # Pigeonhole), so a reject or vacation text is a proper message body
    value = "".join((line[1:] if line.startswith(".") else line).removesuffix("\r") + "\r\n"
                    for line in lines)
    end = t.end()
    if end < len(text) and text[end] == "\n":
        end += 1
    return value, end


# ------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, source: Source, tokens: list[Token], limits: SieveLimits) -> None:
        self.source = source
        self.tokens = tokens
        self.i = 0
        self.limits = limits

    def error(self, token: Token, text: str) -> SieveError:
        return self.source.error(token.pos, text)

    def peek(self) -> Token:
        return self.tokens[self.i]

    def expect_punct(self, char: str, what: str) -> None:
        token = self.tokens[self.i]
        if token.kind != PUNCT or token.value != char:
            raise self.error(token, f"expected {what}, found {_describe(token)}")
        self.i += 1

    def commands(self, depth: int, closing: bool) -> list[Node]:
        out: list[Node] = []
        while True:
            token = self.tokens[self.i]
            if token.kind == END:
                if closing:
                    raise self.error(token, "missing '}' at the end of the script")
                return out
            if token.kind == PUNCT and token.value == "}":
                if not closing:
                    raise self.error(token, "'}' without a matching '{'")
                return out
            out.append(self.command(depth))

    def command(self, depth: int) -> Node:
        token = self.tokens[self.i]
        if token.kind != IDENT:
            raise self.error(token, f"expected a command, found {_describe(token)}")
        self.i += 1
        node = Node(str(token.value), token.pos)
        self.arguments(node, depth)
        nxt = self.tokens[self.i]
        if nxt.kind == PUNCT and nxt.value == ";":
            self.i += 1
        elif nxt.kind == PUNCT and nxt.value == "{":
            if depth + 1 > self.limits.max_nesting:
                raise self.error(nxt, f"nesting deeper than {self.limits.max_nesting}")
            self.i += 1
            node.block = self.commands(depth + 1, closing=True)
            self.i += 1  # the '}'
        else:
            raise self.error(nxt, f"expected ';' or '{{' after {node.name}, found {_describe(nxt)}")
        return node

    def arguments(self, node: Node, depth: int) -> None:
        tokens = self.tokens
        while True:
            token = tokens[self.i]
            kind = token.kind
            if kind == STRING:
                node.args.append(StringArg([str(token.value)], False, token.pos))
                self.i += 1
            elif kind == NUMBER:
                node.args.append(NumberArg(int(token.value), token.pos))
                self.i += 1
            elif kind == TAG:
                node.args.append(TagArg(str(token.value), token.pos))
                self.i += 1
            elif kind == PUNCT and token.value == "[":
                node.args.append(self.string_list())
            else:
                break
        token = tokens[self.i]
        if token.kind == IDENT:
            node.tests.append(self.test(depth + 1))
        elif token.kind == PUNCT and token.value == "(":
            if depth + 1 > self.limits.max_nesting:
                raise self.error(token, f"nesting deeper than {self.limits.max_nesting}")
            self.i += 1
            node.test_list = True
            while True:
                node.tests.append(self.test(depth + 1))
                sep = tokens[self.i]
                if sep.kind == PUNCT and sep.value == ",":
                    self.i += 1
                    continue
                self.expect_punct(")", "',' or ')' in the test list")
                break

    def string_list(self) -> StringArg:
        start = self.tokens[self.i]
        self.i += 1
        values: list[str] = []
        while True:
            token = self.tokens[self.i]
            if token.kind != STRING:
                raise self.error(token, f"expected a string in the list, found {_describe(token)}")
            values.append(str(token.value))
            self.i += 1
            sep = self.tokens[self.i]
            if sep.kind == PUNCT and sep.value == ",":
                self.i += 1
                continue
            self.expect_punct("]", "',' or ']' in the string list")
            return StringArg(values, True, start.pos)

    def test(self, depth: int) -> Node:
        token = self.tokens[self.i]
        if depth > self.limits.max_nesting:
            raise self.error(token, f"nesting deeper than {self.limits.max_nesting}")
        if token.kind != IDENT:
            raise self.error(token, f"expected a test, found {_describe(token)}")
        self.i += 1
        node = Node(str(token.value), token.pos)
        self.arguments(node, depth)
        return node


def _describe(token: Token) -> str:
    if token.kind == END:
        return "the end of the script"
    if token.kind == STRING:
        return "a string"
    if token.kind == NUMBER:
        return "a number"
    if token.kind == TAG:
        return f"tag ':{token.value}'"
    if token.kind == IDENT:
        return f"'{token.value}'"
    return f"'{token.value}'"


def parse(text: bytes | str, limits: SieveLimits = DEFAULT_LIMITS) -> Parsed:
    """The syntax tree of a script; SieveError (with position) for anything malformed."""
    size = len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else len(text)
    if size > limits.max_script_bytes:
        raise SieveError(1, 1, f"script larger than {limits.max_script_bytes} bytes")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            prefix = text[:exc.start].decode("utf-8", "replace")
            raise Source(prefix).error(len(prefix), "script is not valid UTF-8") from None
    else:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise Source(text).error(exc.start, "script is not valid UTF-8") from None
    if "\x00" in text:
        raise Source(text).error(text.index("\x00"), "NUL in the script")
    source = Source(text)
    tokens = tokenize(source, limits)
    parser = _Parser(source, tokens, limits)
    return Parsed(parser.commands(0, closing=False), source)
