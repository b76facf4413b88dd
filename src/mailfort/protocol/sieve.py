"""Sieve (RFC 5228) for mailfort: compile a script once (parse, validate, build the
interpreter's nodes), run it per message. Pure: no sockets, no disk, no wall clock (the date
comes from ``SieveEnvironment.now``; only the per-run CPU budget reads a CPU timer).

The public API (see SIEVE_CONTRACT.md): ``compile_script``, ``Script`` (``run``,
``uses_reject``, ``uses_vacation``), ``SieveMessage``, ``SieveEnvironment``, ``SieveResult``,
the action classes, ``SieveLimits``, ``SieveError`` and ``SUPPORTED``.

Validation refuses, with line and column: ``require`` after another command or of an
extension not offered; a command, test or tagged argument that is unknown or whose extension
was not required; a tagged argument twice or two of one kind (two match types); a wrong
argument type or count (a list where one string goes, a missing key list); a comparator,
relation, envelope part, date part or zone that does not exist; a constant mailbox or
redirect address that cannot work; an ``include`` that is missing, recursive, too deep or
one too many.

``regex`` is not offered: Python's ``re`` backtracks, cannot be interrupted once it runs,
and a short pattern can take exponential time on a header of a few kilobytes, so no CPU
budget could bound it; the wildcards of ``:matches`` cover what clients generate.
``editheader`` is not offered either (it would need header-changing actions that delivery
then applies; not worth the risk for a rarely used extension). ``comparator-i;octet`` and
``comparator-i;ascii-casemap`` are accepted by ``require`` (always available, RFC 5228
2.7.3) but not listed in ``SUPPORTED``, as Pigeonhole does. Where the RFCs leave room, the
behaviour is Pigeonhole's (tests/protocol/test_sieve_pigeonhole.py holds us to it): the
``string`` test compares with i;octet unless told otherwise, multi-line strings end their
lines in CRLF, reject conflicts with keep, fileinto, redirect and vacation (a runtime error).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

from mailfort.protocol import sieve_match
from mailfort.protocol import sieve_run as rt
from mailfort.protocol.sieve_message import SieveMessage
from mailfort.protocol.sieve_parse import (
    DEFAULT_LIMITS,
    Argument,
    Node,
    NumberArg,
    Parsed,
    SieveError,
    SieveLimits,
    StringArg,
    TagArg,
    parse,
)
from mailfort.protocol.sieve_run import (
    Action,
    Discard,
    FileInto,
    Keep,
    Redirect,
    Reject,
    SieveEnvironment,
    SieveResult,
    Vacation,
)

__all__ = ["SUPPORTED", "Action", "Discard", "FileInto", "Keep", "Redirect", "Reject",
           "Script", "SieveEnvironment", "SieveError", "SieveLimits", "SieveMessage",
           "SieveResult", "Vacation", "compile_script"]

SUPPORTED: frozenset[str] = frozenset({
    "body", "comparator-i;ascii-numeric", "copy", "date", "encoded-character", "envelope",
    "environment", "ereject", "fileinto", "imap4flags", "include", "index", "mailbox",
    "reject", "relational", "subaddress", "vacation", "vacation-seconds", "variables",
})
_ALWAYS = frozenset({"comparator-i;octet", "comparator-i;ascii-casemap"})

IncludeLoader = Callable[[str, bool], "bytes | None"]


# ------------------------------------------------------------------------- the table


class _Tag(NamedTuple):
    ext: str | None  # the extension that must be required to use it
    arg: str | None  # "string", "strings", "number" or None
    group: str  # at most one tag of a group


class _Spec(NamedTuple):
    ext: str | None
    tags: dict[str, _Tag]
    positional: tuple[str, ...]  # "string", "strings", "number"; "?" first: may be left out
    tests: str = ""  # "", "one" (a single test), "list" (a test list in parentheses)
    block: bool = False


_MATCH = {"is": _Tag(None, None, "match type"), "contains": _Tag(None, None, "match type"),
          "matches": _Tag(None, None, "match type"),
          "count": _Tag("relational", "string", "match type"),
          "value": _Tag("relational", "string", "match type")}
_COMPARATOR = {"comparator": _Tag(None, "string", "comparator")}
_ADDRESS_PART = {p: _Tag(None, None, "address part") for p in ("localpart", "domain", "all")}
_ADDRESS_PART |= {p: _Tag("subaddress", None, "address part") for p in ("user", "detail")}
_INDEX = {"index": _Tag("index", "number", "index"), "last": _Tag("index", None, "last")}
_ZONE = {"zone": _Tag(None, "string", "zone"), "originalzone": _Tag(None, None, "zone")}
_CMP_MATCH = _COMPARATOR | _MATCH

TESTS: dict[str, _Spec] = {
    "address": _Spec(None, _CMP_MATCH | _ADDRESS_PART | _INDEX, ("strings", "strings")),
    "envelope": _Spec("envelope", _CMP_MATCH | _ADDRESS_PART, ("strings", "strings")),
    "header": _Spec(None, _CMP_MATCH | _INDEX, ("strings", "strings")),
    "exists": _Spec(None, {}, ("strings",)),
    "size": _Spec(None, {"over": _Tag(None, "number", "size"),
                         "under": _Tag(None, "number", "size")}, ()),
    "true": _Spec(None, {}, ()),
    "false": _Spec(None, {}, ()),
    "not": _Spec(None, {}, (), "one"),
    "allof": _Spec(None, {}, (), "list"),
    "anyof": _Spec(None, {}, (), "list"),
    "body": _Spec("body", _CMP_MATCH | {"raw": _Tag(None, None, "transform"),
                                        "text": _Tag(None, None, "transform"),
                                        "content": _Tag(None, "strings", "transform")},
                  ("strings",)),
    "string": _Spec("variables", _CMP_MATCH, ("strings", "strings")),
    "hasflag": _Spec("imap4flags", _CMP_MATCH, ("?strings", "strings")),
    "mailboxexists": _Spec("mailbox", {}, ("strings",)),
    "environment": _Spec("environment", _CMP_MATCH, ("string", "strings")),
    "date": _Spec("date", _CMP_MATCH | _INDEX | _ZONE, ("string", "string", "strings")),
    "currentdate": _Spec("date", _CMP_MATCH | {"zone": _Tag(None, "string", "zone")},
                         ("string", "strings")),
}

_FLAGS = {"flags": _Tag("imap4flags", "strings", "flags")}
_MODS = {name: _Tag(None, None, f"modifier {prec}")
         for name, prec in rt.MODIFIER_PRECEDENCE.items()}
_VACATION = {"days": _Tag(None, "number", "period"),
             "seconds": _Tag("vacation-seconds", "number", "period"),
             "subject": _Tag(None, "string", "subject"), "from": _Tag(None, "string", "from"),
             "addresses": _Tag(None, "strings", "addresses"), "mime": _Tag(None, None, "mime"),
             "handle": _Tag(None, "string", "handle")}

COMMANDS: dict[str, _Spec] = {
    "require": _Spec(None, {}, ("strings",)),
    "if": _Spec(None, {}, (), "one", True),
    "elsif": _Spec(None, {}, (), "one", True),
    "else": _Spec(None, {}, (), "", True),
    "stop": _Spec(None, {}, ()),
    "keep": _Spec(None, _FLAGS, ()),
    "discard": _Spec(None, {}, ()),
    "redirect": _Spec(None, {"copy": _Tag("copy", None, "copy")}, ("string",)),
    "fileinto": _Spec("fileinto", {"copy": _Tag("copy", None, "copy"),
                                   "create": _Tag("mailbox", None, "create")} | _FLAGS,
                      ("string",)),
    "reject": _Spec("reject", {}, ("string",)),
    "ereject": _Spec("ereject", {}, ("string",)),
    "setflag": _Spec("imap4flags", {}, ("?string", "strings")),
    "addflag": _Spec("imap4flags", {}, ("?string", "strings")),
    "removeflag": _Spec("imap4flags", {}, ("?string", "strings")),
    "set": _Spec("variables", _MODS, ("string", "string")),
    "vacation": _Spec("vacation", _VACATION, ("string",)),
    "include": _Spec("include", {"personal": _Tag(None, None, "location"),
                                 "global": _Tag(None, None, "location"),
                                 "once": _Tag(None, None, "once"),
                                 "optional": _Tag(None, None, "optional")}, ("string",)),
    "return": _Spec("include", {}, ()),
    "global": _Spec("include", {}, ("strings",)),
}

_ENVELOPE_PARTS = frozenset({"from", "to", "auth"})
_FIELD_NAME = re.compile(r"^[!-9;-~]+$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAMESPACED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_REFERENCE = re.compile(r"\$\{([^{}]*)\}")
_ENCODED = re.compile(r"\$\{(hex|unicode):([^}]*)\}", re.IGNORECASE)
_HEX_SEQ = re.compile(r"^[ \t]*[0-9A-Fa-f]{1,2}(?:[ \t]+[0-9A-Fa-f]{1,2})*[ \t]*$")
_UNICODE_SEQ = re.compile(r"^[ \t]*[0-9A-Fa-f]+(?:[ \t]+[0-9A-Fa-f]+)*[ \t]*$")


# ------------------------------------------------------------------------- compiling


class _Shared:
    """What the main script and its includes share while compiling."""

    def __init__(self, limits: SieveLimits, include: IncludeLoader | None) -> None:
        self.limits = limits
        self.include = include
        self.units: dict[tuple[bool, str], rt.Unit] = {}
        self.stack: list[tuple[bool, str]] = []
        self.uses_reject = False
        self.uses_vacation = False
        self.extensions: set[str] = set()


class _Compiler:
    def __init__(self, parsed: Parsed, shared: _Shared) -> None:
        self.parsed = parsed
        self.shared = shared
        self.limits = shared.limits
        self.exts: set[str] = set()
        self.globals: set[str] = set()

    def error(self, pos: int, text: str) -> SieveError:
        return self.parsed.source.error(pos, text)

    # the script -----------------------------------------------------------

    def script(self) -> list[rt.Command]:
        nodes = self.parsed.commands
        start = 0
        while start < len(nodes) and nodes[start].name == "require":
            self.require(nodes[start])
            start += 1
        self.shared.extensions |= self.exts
        if "include" in self.exts:
            self.collect_globals(nodes[start:])
        return self.block(nodes[start:])

    def require(self, node: Node) -> None:
        _, positional = self.arguments(node, COMMANDS["require"])
        arg = positional[0]
        assert isinstance(arg, StringArg)
        for name in arg.values:
            if name not in SUPPORTED and name not in _ALWAYS:
                raise self.error(arg.pos, f"require: extension {name!r} is not supported")
            self.exts.add(name)

    def collect_globals(self, nodes: list[Node]) -> None:
        for node in nodes:
            if node.name == "global":
                for arg in node.args:
                    if isinstance(arg, StringArg):
                        for name in arg.values:
                            if not _IDENT.match(name):
                                raise self.error(arg.pos, f"global: invalid variable name "
                                                          f"{name!r}")
                            self.globals.add(name.lower())
            if node.block:
                self.collect_globals(node.block)

    def block(self, nodes: list[Node]) -> list[rt.Command]:
        out: list[rt.Command] = []
        chain: list[tuple[rt.Test | None, list[rt.Command]]] | None = None
        for node in nodes:
            name = node.name
            if name in ("elsif", "else"):
                if chain is None:
                    raise self.error(node.pos, f"{name} without a preceding if or elsif")
                spec = COMMANDS[name]
                self.arguments(node, spec)
                test = self.test(node.tests[0]) if name == "elsif" else None
                assert node.block is not None
                chain.append((test, self.block(node.block)))
                if name == "else":
                    chain = None
                continue
            if name == "if":
                self.arguments(node, COMMANDS["if"])
                assert node.block is not None
                chain = [(self.test(node.tests[0]), self.block(node.block))]
                out.append(rt.If(chain))
                continue
            chain = None
            out.append(self.command(node))
        return out

    # arguments ------------------------------------------------------------

    def need(self, ext: str | None, pos: int, what: str) -> None:
        if ext is not None and ext not in self.exts:
            raise self.error(pos, f"{what} needs require \"{ext}\"")

    def arguments(self, node: Node, spec: _Spec) -> tuple[dict[str, Argument | None],
                                                           list[Argument]]:
        """Tagged arguments (by name) and positional ones, every rule of the spec checked."""
        kind = "command" if node.name in COMMANDS else "test"
        self.need(spec.ext, node.pos, f"{kind} {node.name!r}")
        tags: dict[str, Argument | None] = {}
        groups: dict[str, str] = {}
        positional: list[Argument] = []
        args = node.args
        i = 0
        while i < len(args):
            arg = args[i]
            i += 1
            if not isinstance(arg, TagArg):
                positional.append(arg)
                continue
            tag = spec.tags.get(arg.name)
            if tag is None:
                raise self.error(arg.pos, f"unknown tagged argument ':{arg.name}' "
                                          f"for {node.name}")
            self.need(tag.ext, arg.pos, f":{arg.name}")
            if tag.group in groups:
                other = groups[tag.group]
                raise self.error(arg.pos, f"{node.name}: ':{arg.name}' after ':{other}' "
                                          f"(one {tag.group} only)"
                                 if other != arg.name else
                                 f"{node.name}: ':{arg.name}' given twice")
            groups[tag.group] = arg.name
            value: Argument | None = None
            if tag.arg is not None:
                if i >= len(args) or not self.fits(args[i], tag.arg):
                    raise self.error(arg.pos, f":{arg.name} needs a {_TYPE_NAMES[tag.arg]}")
                value = args[i]
                i += 1
            tags[arg.name] = value
        wanted = spec.positional
        if wanted and wanted[0].startswith("?") and len(positional) == len(wanted) - 1:
            wanted = wanted[1:]
        if len(positional) != len(wanted):
            raise self.error(positional[len(wanted)].pos if len(positional) > len(wanted)
                             else node.pos,
                             f"{node.name} takes {len(wanted)} positional argument(s), "
                             f"not {len(positional)}")
        for arg, want in zip(positional, wanted, strict=True):
            want = want.lstrip("?")
            if not self.fits(arg, want):
                raise self.error(arg.pos, f"{node.name}: expected a {_TYPE_NAMES[want]}")
        if spec.tests == "" and node.tests:
            raise self.error(node.tests[0].pos, f"{node.name} takes no test")
        if spec.tests == "one" and (len(node.tests) != 1 or node.test_list):
            raise self.error(node.pos, f"{node.name} needs one test")
        if spec.tests == "list" and not node.test_list:
            raise self.error(node.pos, f"{node.name} needs a test list in parentheses")
        if kind == "command":
            if spec.block and node.block is None:
                raise self.error(node.pos, f"{node.name} needs a block")
            if not spec.block and node.block is not None:
                raise self.error(node.pos, f"{node.name} takes no block")
        return tags, positional

    @staticmethod
    def fits(arg: Argument, want: str) -> bool:
        if want == "number":
            return isinstance(arg, NumberArg)
        if want == "string":
            return isinstance(arg, StringArg) and not arg.is_list
        return isinstance(arg, StringArg)

    # strings --------------------------------------------------------------

    def string(self, text: str, pos: int) -> rt.Str:
        if "encoded-character" in self.exts and "${" in text:
            text = self.decode_encoded(text, pos)
        if "variables" not in self.exts or "${" not in text:
            return text
        parts: list[str | tuple[str, str]] = []
        last = 0
        for match in _REFERENCE.finditer(text):
            ref = self.reference(match.group(1), pos)
            if ref is None:
                continue
            parts.append(text[last:match.start()])
            parts.append(ref)
            last = match.end()
        if not parts:
            return text
        parts.append(text[last:])
        return rt.Template([p for p in parts if p != ""])

    def reference(self, name: str, pos: int) -> tuple[str, str] | None:
        if name.isdigit() and name.isascii():
            return ("match", str(int(name)))
        if _IDENT.match(name):
            lower = name.lower()
            return ("global" if lower in self.globals else "local", lower)
        if _NAMESPACED.match(name):
            space, _, rest = name.lower().partition(".")
            if space == "global" and "include" in self.exts and _IDENT.match(rest):
                return ("global", rest)
            raise self.error(pos, f"unknown variable namespace in ${{{name}}}")
        return None

    def decode_encoded(self, text: str, pos: int) -> str:
        def one(match: re.Match[str]) -> str:
            kind, body = match.group(1).lower(), match.group(2)
            if kind == "hex":
                if not _HEX_SEQ.match(body):
                    return match.group()
                try:
                    return bytes(int(h, 16) for h in body.split()).decode("utf-8")
                except UnicodeDecodeError:
                    raise self.error(pos, "${hex:...} is not valid UTF-8") from None
            if not _UNICODE_SEQ.match(body):
                return match.group()
            out = []
            for h in body.split():
                code = int(h, 16) if len(h) <= 8 else 0x110000
                if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
                    raise self.error(pos, f"${{unicode:{h}}} is not a Unicode scalar value")
                out.append(chr(code))
            return "".join(out)

        return _ENCODED.sub(one, text)

    def strings(self, arg: Argument | None) -> rt.StrList:
        assert isinstance(arg, StringArg)
        return rt.StrList([self.string(v, arg.pos) for v in arg.values])

    def one_string(self, arg: Argument | None) -> rt.Str:
        assert isinstance(arg, StringArg)
        return self.string(arg.values[0], arg.pos)

    def variable(self, arg: Argument, what: str) -> tuple[str, str]:
        assert isinstance(arg, StringArg)
        name = arg.values[0]
        if _IDENT.match(name):
            lower = name.lower()
            return ("global" if lower in self.globals else "local", lower)
        if "include" in self.exts and name.lower().startswith("global.") and _IDENT.match(
                name[7:]):
            return ("global", name[7:].lower())
        raise self.error(arg.pos, f"{what}: invalid variable name {name!r}")

    def matcher(self, node: Node, tags: dict[str, Argument | None],
                keys: Argument) -> rt.Matcher:
        # the string test compares octets unless told otherwise, as Pigeonhole does (the
        # differential test holds us to it); every other test folds ASCII case (RFC 5228)
        comparator = "i;octet" if node.name == "string" else "i;ascii-casemap"
        if "comparator" in tags:
            arg = tags["comparator"]
            assert isinstance(arg, StringArg)
            comparator = arg.values[0]
            if comparator not in sieve_match.COMPARATORS:
                raise self.error(arg.pos, f"unknown comparator {comparator!r}")
            if comparator == "i;ascii-numeric":
                self.need("comparator-i;ascii-numeric", arg.pos, "comparator i;ascii-numeric")
        kind = next((t for t in _MATCH if t in tags), "is")
        relation = None
        if kind in ("count", "value"):
            arg = tags[kind]
            assert isinstance(arg, StringArg)
            relation = arg.values[0].lower()
            if relation not in sieve_match.RELATIONS:
                raise self.error(arg.pos, f"unknown relation {relation!r}")
        if comparator == "i;ascii-numeric" and kind in ("contains", "matches"):
            raise self.error(node.pos, f"comparator i;ascii-numeric cannot do :{kind}")
        return rt.Matcher(kind, comparator, relation, self.strings(keys),
                          "variables" in self.exts)

    def header_names(self, arg: Argument) -> rt.StrList:
        names = self.strings(arg)
        assert isinstance(arg, StringArg)
        for name in names.const or ():
            if not _FIELD_NAME.match(name):
                raise self.error(arg.pos, f"invalid header field name {name!r}")
        return names

    # tests ----------------------------------------------------------------

    def test(self, node: Node) -> rt.Test:
        spec = TESTS.get(node.name)
        if spec is None:
            raise self.error(node.pos, f"unknown test {node.name!r}")
        tags, pos = self.arguments(node, spec)
        name = node.name
        index, last = None, False
        if "index" in tags:
            index_arg = tags["index"]
            assert isinstance(index_arg, NumberArg)
            if index_arg.value < 1:
                raise self.error(index_arg.pos, ":index counts from 1")
            index, last = index_arg.value, "last" in tags
        elif "last" in tags:
            raise self.error(node.pos, ":last needs :index")
        if name in ("true", "false"):
            return rt.Const(name == "true")
        if name == "not":
            return rt.Not(self.test(node.tests[0]))
        if name in ("allof", "anyof"):
            tests = [self.test(t) for t in node.tests]
            return rt.AllOf(tests) if name == "allof" else rt.AnyOf(tests)
        if name == "header":
            return rt.Header(self.header_names(pos[0]), self.matcher(node, tags, pos[1]),
                             index, last)
        if name == "address":
            part = next((p for p in _ADDRESS_PART if p in tags), "all")
            return rt.Address(self.header_names(pos[0]), self.matcher(node, tags, pos[1]),
                              part, index, last)
        if name == "envelope":
            part = next((p for p in _ADDRESS_PART if p in tags), "all")
            parts = self.strings(pos[0])
            for value in parts.const or ():
                if value.lower() not in _ENVELOPE_PARTS:
                    raise self.error(pos[0].pos, f"envelope: unknown part {value!r}")
            return rt.Envelope(parts, self.matcher(node, tags, pos[1]), part)
        if name == "exists":
            return rt.Exists(self.header_names(pos[0]))
        if name == "size":
            arg = tags.get("over") or tags.get("under")
            if arg is None:
                raise self.error(node.pos, "size needs :over or :under")
            assert isinstance(arg, NumberArg)
            return rt.Size("over" in tags, arg.value)
        if name == "body":
            transform = next((t for t in ("raw", "content", "text") if t in tags), "text")
            types = self.strings(tags["content"]) if transform == "content" else None
            return rt.Body(self.matcher(node, tags, pos[0]), transform, types)
        if name == "string":
            return rt.StringTest(self.strings(pos[0]), self.matcher(node, tags, pos[1]))
        if name == "hasflag":
            if len(pos) == 2:
                assert isinstance(pos[0], StringArg)
                self.need("variables", pos[0].pos, "hasflag with variable names")
                variables = [self.variable(StringArg([v], False, pos[0].pos), "hasflag")
                             for v in pos[0].values]
            else:
                variables = [("local", rt.FLAGS_VAR)]
            return rt.HasFlag(variables, self.matcher(node, tags, pos[-1]))
        if name == "mailboxexists":
            return rt.MailboxExists(self.strings(pos[0]))
        if name == "environment":
            return rt.Environment(self.one_string(pos[0]), self.matcher(node, tags, pos[1]))
        # date, currentdate
        zone = None
        if "zone" in tags:
            zone_arg = tags["zone"]
            zone = self.one_string(zone_arg)
            if isinstance(zone, str) and sieve_match.parse_zone(zone) is None:
                assert zone_arg is not None
                raise self.error(zone_arg.pos, f"invalid time zone {zone!r}")
        header = self.one_string(pos[0]) if name == "date" else None
        part_arg = pos[1] if name == "date" else pos[0]
        part = self.one_string(part_arg)
        if isinstance(part, str) and part.lower() not in sieve_match.DATE_PARTS:
            raise self.error(part_arg.pos, f"unknown date part {part!r}")
        return rt.DateTest(header, part, self.matcher(node, tags, pos[-1]), zone,
                           "originalzone" in tags, index, last)

    # commands -------------------------------------------------------------

    def command(self, node: Node) -> rt.Command:
        name = node.name
        spec = COMMANDS.get(name)
        if spec is None:
            if name in TESTS:
                raise self.error(node.pos, f"{name!r} is a test, not a command")
            raise self.error(node.pos, f"unknown command {name!r}")
        if name == "require":
            raise self.error(node.pos, "require must come before every other command")
        tags, pos = self.arguments(node, spec)
        if name == "stop":
            return rt.StopCmd()
        if name == "keep":
            return rt.KeepCmd(self.strings(tags["flags"]) if "flags" in tags else None)
        if name == "discard":
            return rt.DiscardCmd()
        if name == "redirect":
            address = self.one_string(pos[0])
            if isinstance(address, str):
                problem = rt.check_address(address.strip().removeprefix("<").removesuffix(">"))
                if problem:
                    raise self.error(pos[0].pos, f"redirect: {problem}")
            return rt.RedirectCmd(address, "copy" in tags)
        if name == "fileinto":
            mailbox = self.one_string(pos[0])
            if isinstance(mailbox, str):
                problem = rt.check_mailbox(mailbox)
                if problem:
                    raise self.error(pos[0].pos, f"fileinto: {problem}")
            flags = self.strings(tags["flags"]) if "flags" in tags else None
            return rt.FileIntoCmd(mailbox, flags, "copy" in tags, "create" in tags)
        if name in ("reject", "ereject"):
            self.shared.uses_reject = True
            return rt.RejectCmd(self.one_string(pos[0]), name == "ereject")
        if name in ("setflag", "addflag", "removeflag"):
            if len(pos) == 2:
                self.need("variables", pos[0].pos, f"{name} with a variable name")
                scope, var = self.variable(pos[0], name)
            else:
                scope, var = "local", rt.FLAGS_VAR
            return rt.FlagCmd(name, scope, var, self.strings(pos[-1]))
        if name == "set":
            scope, var = self.variable(pos[0], "set")
            return rt.SetCmd(scope, var, self.one_string(pos[1]), list(tags))
        if name == "vacation":
            return self.vacation(tags, pos)
        if name == "include":
            return self.include(node, tags, pos[0])
        if name == "return":
            return rt.ReturnCmd()
        return rt.Noop()  # global: resolved while compiling (collect_globals)

    def vacation(self, tags: dict[str, Argument | None], pos: list[Argument]) -> rt.Command:
        self.shared.uses_vacation = True
        seconds = self.limits.vacation_default_seconds
        if "days" in tags:
            days = tags["days"]
            assert isinstance(days, NumberArg)
            seconds = days.value * 86400
        elif "seconds" in tags:
            secs = tags["seconds"]
            assert isinstance(secs, NumberArg)
            seconds = secs.value

        def opt(name: str) -> rt.Str | None:
            return self.one_string(tags[name]) if name in tags else None

        addresses = self.strings(tags["addresses"]) if "addresses" in tags else None
        return rt.VacationCmd(self.one_string(pos[0]), opt("subject"), opt("from"),
                              addresses, "mime" in tags, opt("handle"), seconds)

    def include(self, node: Node, tags: dict[str, Argument | None],
                arg: Argument) -> rt.Command:
        assert isinstance(arg, StringArg)
        name = arg.values[0]
        if not name or "/" in name or any(ord(c) < 32 for c in name):
            raise self.error(arg.pos, f"include: invalid script name {name!r}")
        global_ = "global" in tags
        key = (global_, name)
        shared = self.shared
        if key in shared.stack:
            raise self.error(arg.pos, f"include: {name!r} includes itself (recursion)")
        if shared.include is None:  # checking only (ManageSieve): the script may come later
            return rt.Unresolved(name)
        unit = shared.units.get(key)
        if unit is None:
            limits = self.limits
            if len(shared.stack) >= limits.max_include_depth:
                raise self.error(arg.pos, f"include: deeper than {limits.max_include_depth}")
            if len(shared.units) >= limits.max_includes:
                raise self.error(arg.pos, f"include: more than {limits.max_includes} scripts")
            text = shared.include(name, global_)
            if text is None:
                if "optional" in tags:
                    return rt.Noop()
                where = "global" if global_ else "personal"
                raise self.error(arg.pos, f"include: no {where} script named {name!r}")
            shared.stack.append(key)
            try:
                parsed = parse(text, limits)
                block = _Compiler(parsed, shared).script()
            except SieveError as exc:
                raise self.error(arg.pos, f"include {name!r}: line {exc.line} column "
                                          f"{exc.column}: {exc.text}") from None
            finally:
                shared.stack.pop()
            unit = rt.Unit(name, block)
            shared.units[key] = unit
        return rt.IncludeCmd(unit, "once" in tags)


_TYPE_NAMES = {"string": "string", "strings": "string list", "number": "number"}


# ------------------------------------------------------------------------- the API


class Script:
    """A compiled script: run it once per message and recipient."""

    __slots__ = ("_block", "_limits", "extensions", "uses_reject", "uses_vacation")

    def __init__(self, block: list[rt.Command], shared: _Shared) -> None:
        self._block = block
        self._limits = shared.limits
        self.uses_reject = shared.uses_reject
        self.uses_vacation = shared.uses_vacation
        self.extensions = frozenset(shared.extensions)

    def run(self, msg: SieveMessage, env: SieveEnvironment) -> SieveResult:
        """The actions for this message; never raises (a runtime error keeps the message)."""
        return rt.execute(self._block, msg, env, self._limits)


def compile_script(text: bytes | str, *, limits: SieveLimits = DEFAULT_LIMITS,
                   include: IncludeLoader | None = None) -> Script:
    """Parse and validate a script; SieveError (line, column, text) when it is refused.

    ``include(name, global_)`` gives an included script's text, or None when there is none
    (an error unless ``:optional``); included scripts are compiled here, once each. Without
    ``include`` (checking a script, as ManageSieve's PUTSCRIPT does before the scripts it
    includes are uploaded) ``include`` commands are validated but not followed, and running
    one is a runtime error (the message is kept)."""
    shared = _Shared(limits, include)
    try:
        block = _Compiler(parse(text, limits), shared).script()
    except RecursionError:  # only with a max_nesting far above the default's 32
        raise SieveError(1, 1, "script nested too deeply") from None
    return Script(block, shared)
