"""The Sieve interpreter: compiled commands and tests, one run's state, the actions decided.

``sieve.py`` validates a syntax tree and builds these nodes once per script; a run only walks
them. Every run is bounded: actions, redirects, variables (count and size) and CPU time
(``tick`` in every command and in every loop over values). A runtime problem raises
``Fail``, which ``Script.run`` turns into an implicit keep plus the error text (RFC 5228
2.10.6: a failing script never loses mail).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from mailfort.protocol import sieve_match as m
from mailfort.protocol.sieve_message import SieveMessage, address_part
from mailfort.protocol.sieve_parse import SieveLimits

T = TypeVar("T")

# ------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Keep:
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class FileInto:
    mailbox: str  # UTF-8, as the script wrote it
    flags: tuple[str, ...] = ()
    create: bool = False


@dataclass(frozen=True)
class Redirect:
    address: str
    copy: bool = False


@dataclass(frozen=True)
class Reject:
    reason: str
    ereject: bool = False


@dataclass(frozen=True)
class Discard:
    pass


@dataclass(frozen=True)
class Vacation:
    """The script asked for an auto-reply; whether one is sent is the caller's policy."""

    reason: str
    subject: str | None
    from_: str | None
    addresses: tuple[str, ...]
    mime: bool
    handle: str
    seconds: int  # from :days (x 86400) or :seconds; the caller clamps it


Action = Keep | FileInto | Redirect | Reject | Discard | Vacation


@dataclass(frozen=True)
class SieveEnvironment:
    now: datetime  # currentdate; the default zone of date tests
    hostname: str  # environment "host" and "domain"
    mailbox_exists: Callable[[str], bool]  # mailboxexists (RFC 5490)
    phase: str = "during"  # environment "phase"


@dataclass
class SieveResult:
    actions: list[Action]
    error: str | None = None


# ------------------------------------------------------------------------- run state


class Fail(Exception):
    """A runtime error: the script's actions are dropped for an implicit keep."""


class Stop(Exception):
    pass


class Return(Exception):
    pass


FLAGS_VAR = "\x00flags"  # imap4flags' internal variable (no script can name it)


class Run:
    """One execution of a script against one message."""

    __slots__ = (
        "actions",
        "deadline",
        "discarded",
        "env",
        "globals",
        "header_limit",
        "implicit_keep",
        "included",
        "limits",
        "local",
        "match",
        "msg",
        "ops",
        "redirects",
        "variables",
    )

    def __init__(self, msg: SieveMessage, env: SieveEnvironment, limits: SieveLimits) -> None:
        self.msg = msg
        self.env = env
        self.limits = limits
        self.actions: list[Action] = []
        self.implicit_keep = True
        self.discarded = False
        self.match: list[str] = []
        self.local: dict[str, str] = {}
        self.globals: dict[str, str] = {}
        self.redirects = 0
        self.ops = 0
        self.deadline = time.thread_time() + limits.max_cpu_ms / 1000
        self.included: set[object] = set()
        self.variables = 0
        self.header_limit = limits.max_header_bytes_tested

    def tick(self) -> None:
        """One operation: the clock (a system call) is read every 64th. Hot loops inline
        ``r.ops += 1`` and call ``check`` themselves, which saves a call per operation."""
        self.ops += 1
        if not self.ops & 63:
            self.check()

    def check(self) -> None:
        if time.thread_time() > self.deadline:
            raise Fail(f"CPU time limit of {self.limits.max_cpu_ms} ms exceeded")

    # variables ------------------------------------------------------------

    def get(self, scope: str, name: str) -> str:
        if scope == "match":
            index = int(name)
            return self.match[index] if index < len(self.match) else ""
        table = self.globals if scope == "global" else self.local
        return table.get(name, "")

    def set(self, scope: str, name: str, value: str) -> None:
        table = self.globals if scope == "global" else self.local
        if name not in table:
            self.variables += 1
            if self.variables > self.limits.max_variables:
                raise Fail(f"more than {self.limits.max_variables} variables")
        limit = self.limits.max_variable_bytes
        if len(value) > limit // 4 and len(value.encode("utf-8", "surrogatepass")) > limit:
            value = value.encode("utf-8", "surrogatepass")[:limit].decode("utf-8", "ignore")
        table[name] = value

    # actions --------------------------------------------------------------

    def add(self, action: Action) -> None:
        """Record an action, merging a duplicate (same mailbox, same address) into the first;
        a second store into one mailbox sets the flags it is stored with (as Pigeonhole)."""
        actions = self.actions
        if isinstance(action, (Keep, FileInto)):
            key = _store_key(action)
            for i, old in enumerate(actions):
                if isinstance(old, (Keep, FileInto)) and _store_key(old) == key:
                    if isinstance(old, Keep):
                        actions[i] = Keep(action.flags)
                    else:
                        actions[i] = FileInto(old.mailbox, action.flags,
                                              old.create or getattr(action, "create", False))
                    return
        elif isinstance(action, Redirect):
            for i, old in enumerate(actions):
                if isinstance(old, Redirect) and old.address.lower() == action.address.lower():
                    if old.copy and not action.copy:
                        actions[i] = action
                    return
            self.redirects += 1
            if self.redirects > self.limits.max_redirects:
                raise Fail(f"more than {self.limits.max_redirects} redirects")
        elif isinstance(action, Reject):
            if any(isinstance(old, Reject) for old in actions):
                raise Fail("more than one reject")
        elif isinstance(action, Vacation) and any(isinstance(old, Vacation) for old in actions):
            raise Fail("more than one vacation")
        if len(actions) >= self.limits.max_actions:
            raise Fail(f"more than {self.limits.max_actions} actions")
        actions.append(action)

    def finish(self) -> list[Action]:
        """The final list: implicit keep made explicit, reject's conflicts refused."""
        actions = self.actions
        reject = next((a for a in actions if isinstance(a, Reject)), None)
        if reject is not None:
            # anything else that delivers, :copy or not (as Pigeonhole), and a vacation
            other = next((a for a in actions
                          if isinstance(a, (Keep, FileInto, Redirect, Vacation))), None)
            if other is not None:
                raise Fail(f"reject conflicts with {type(other).__name__.lower()}")
        if self.implicit_keep:
            flags = _split_flags(self.local.get(FLAGS_VAR, ""))
            self.add(Keep(flags))
        if self.discarded and not any(isinstance(a, (Keep, FileInto, Redirect, Reject))
                                      for a in actions):
            actions.append(Discard())
        return actions


def _store_key(action: Keep | FileInto) -> str:
    if isinstance(action, Keep) or action.mailbox.upper() == "INBOX":
        return "INBOX"
    return action.mailbox


def _split_flags(text: str) -> tuple[str, ...]:
    seen: dict[str, str] = {}
    for flag in text.split():
        seen.setdefault(flag.lower(), flag)
    return tuple(seen.values())


def normalize_flags(values: list[str]) -> str:
    return " ".join(_split_flags(" ".join(values)))


# ------------------------------------------------------------------------- strings


class Template:
    """A string with ``${...}`` references (RFC 5229), expanded at run time."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[str | tuple[str, str]]) -> None:
        self.parts = parts

    def expand(self, r: Run) -> str:
        text = "".join(p if type(p) is str else r.get(*p) for p in self.parts)  # type: ignore[misc]
        if len(text) > r.limits.max_expanded_chars:  # "${a}" x 10000 would be 40 MB
            raise Fail(f"a string expanded to more than {r.limits.max_expanded_chars} "
                       "characters")
        return text


Str = str | Template


def val(s: Str, r: Run) -> str:
    return s if type(s) is str else s.expand(r)  # type: ignore[union-attr]


class StrList:
    __slots__ = ("const", "items")

    def __init__(self, items: list[Str]) -> None:
        self.items = items
        self.const: list[str] | None = (
            [str(i) for i in items] if all(type(i) is str for i in items) else None)

    def get(self, r: Run) -> list[str]:
        if self.const is not None:
            return self.const
        return [val(i, r) for i in self.items]


# ------------------------------------------------------------------------- matching


class Matcher:
    """Match type + comparator (+ relation) + keys; sets ${0}..${n} after a :matches."""

    __slots__ = ("casemap", "comparator", "keys", "kind", "prefolded", "prepared", "relation",
                 "set_vars")

    def __init__(self, kind: str, comparator: str, relation: str | None, keys: StrList,
                 set_vars: bool) -> None:
        self.kind = kind
        self.comparator = comparator
        self.relation = m.RELATIONS[relation] if relation else None
        self.keys = keys
        self.casemap = comparator == "i;ascii-casemap"
        self.set_vars = set_vars
        self.prepared = self._prepare(keys.const) if keys.const is not None else None
        # the caller may hand ``test_folded`` values already folded (cached per message)
        self.prefolded = (self.prepared is not None and self.casemap
                          and kind in ("is", "contains"))

    def _prepare(self, keys: list[str]) -> list[object]:
        if self.kind == "matches":
            return [m.compile_glob(k, self.casemap) for k in keys]
        if self.casemap and self.kind in ("is", "contains"):
            return [m.fold(k) for k in keys]
        if self.comparator == "i;ascii-numeric" and self.kind == "is":
            return [m.numeric(k) for k in keys]
        return list(keys)

    def test_folded(self, r: Run, values: list[str]) -> bool:
        """``test`` for :is or :contains under i;ascii-casemap with constant keys, on values
        the caller folded (``prefolded``); the same answer, without folding per test."""
        keys: list[str] = self.prepared  # type: ignore[assignment]
        if self.kind == "is":
            for v in values:
                r.ops += 1
                if not r.ops & 63:
                    r.check()
                if v in keys:
                    return True
            return False
        for v in values:
            r.ops += 1
            if not r.ops & 63:
                r.check()
            for k in keys:
                if k in v:
                    return True
        return False

    def test(self, r: Run, values: list[str]) -> bool:
        if not values and self.kind != "count":  # nothing to compare: only :count can match
            return False
        keys = self.prepared if self.prepared is not None else self._prepare(self.keys.get(r))
        kind = self.kind
        if kind == "count":
            count = str(len(values))
            relation = self.relation
            assert relation is not None
            return any(relation(m.order(self.comparator, count, k), 0) for k in keys)  # type: ignore[arg-type]
        tick = r.tick
        if kind == "is":
            if self.casemap:
                for v in values:
                    tick()
                    if m.fold(v) in keys:
                        return True
                return False
            if self.comparator == "i;ascii-numeric":
                return any(m.numeric(v) in keys for v in values)
            return any(v in keys for v in values)
        if kind == "contains":
            for v in values:
                tick()
                if self.casemap:
                    v = m.fold(v)
                for k in keys:
                    if k in v:  # type: ignore[operator]
                        return True
            return False
        if kind == "matches":
            for v in values:
                for k in keys:
                    tick()
                    caps = m.glob(v, k, self.casemap, tick)  # type: ignore[arg-type]
                    if caps is not None:
                        if self.set_vars:
                            r.match = [v, *caps]
                        return True
            return False
        relation = self.relation  # :value
        assert relation is not None
        for v in values:
            tick()
            for k in keys:
                if relation(m.order(self.comparator, v, k), 0):  # type: ignore[arg-type]
                    return True
        return False


# ------------------------------------------------------------------------- tests


class Test:
    __slots__ = ()

    def ev(self, r: Run) -> bool:
        raise NotImplementedError


class Const(Test):
    __slots__ = ("value",)

    def __init__(self, value: bool) -> None:
        self.value = value

    def ev(self, r: Run) -> bool:
        return self.value


class Not(Test):
    __slots__ = ("test",)

    def __init__(self, test: Test) -> None:
        self.test = test

    def ev(self, r: Run) -> bool:
        return not self.test.ev(r)


class AllOf(Test):
    __slots__ = ("tests",)

    def __init__(self, tests: list[Test]) -> None:
        self.tests = tests

    def ev(self, r: Run) -> bool:
        for t in self.tests:  # noqa: SIM110 (a loop: no generator per test)
            if not t.ev(r):
                return False
        return True


class AnyOf(AllOf):
    __slots__ = ()

    def ev(self, r: Run) -> bool:
        for t in self.tests:  # noqa: SIM110 (a loop: no generator per test)
            if t.ev(r):
                return True
        return False


def _select(values: list[T], index: int | None, last: bool) -> list[T]:
    """RFC 5260 :index — the nth field (1-based), counted from the end with :last."""
    if index is None:
        return values
    if index > len(values):
        return []
    return [values[-index] if last else values[index - 1]]


def _lowered(names: StrList) -> list[str] | None:
    """Constant field names in lower case, once at compile time."""
    return [n.lower() for n in names.const] if names.const is not None else None


class Header(Test):
    __slots__ = ("index", "last", "lowered", "matcher", "names", "one")

    def __init__(self, names: StrList, matcher: Matcher, index: int | None, last: bool) -> None:
        self.names, self.matcher, self.index, self.last = names, matcher, index, last
        self.lowered = lowered = _lowered(names)
        # what most tests are (header :contains "Subject" "x"): one constant name, no :index,
        # casemap :is or :contains with constant keys
        self.one = (lowered[0] if lowered is not None and len(lowered) == 1 and index is None
                    and matcher.prefolded else None)

    def ev(self, r: Run) -> bool:
        one = self.one
        if one is not None:
            msg = r.msg
            values = msg.folded_cache.get(one)  # the method only on the first ask
            if values is None:
                values = msg.folded(one, r.header_limit)
            # no such field (most rules' case): no values, no match for :is or :contains
            return bool(values) and self.matcher.test_folded(r, values)
        lowered = self.lowered
        if lowered is None:
            lowered = [n.lower() for n in self.names.get(r)]
        msg, limit, matcher = r.msg, r.header_limit, self.matcher
        if self.index is None:
            if matcher.prefolded:  # the common case: values folded once per message
                if len(lowered) == 1:
                    return matcher.test_folded(r, msg.folded(lowered[0], limit))
                folded: list[str] = []
                for name in lowered:
                    folded += msg.folded(name, limit)
                return matcher.test_folded(r, folded)
            if len(lowered) == 1:
                return matcher.test(r, msg.header(lowered[0], limit))
        values: list[str] = []
        for name in lowered:
            values += _select(msg.header(name, limit), self.index, self.last)
        return matcher.test(r, values)


class Address(Test):
    __slots__ = ("index", "last", "lowered", "matcher", "names", "one", "part")

    def __init__(self, names: StrList, matcher: Matcher, part: str, index: int | None,
                 last: bool) -> None:
        self.names, self.matcher, self.part = names, matcher, part
        self.index, self.last = index, last
        self.lowered = lowered = _lowered(names)
        self.one = (lowered[0] if lowered is not None and len(lowered) == 1 and index is None
                    and matcher.prefolded else None)  # as Header's

    def ev(self, r: Run) -> bool:
        one = self.one
        if one is not None:
            r.tick()
            msg = r.msg
            values = msg.parts_cache.get((one, self.part, True))
            if values is None:
                values = msg.parts(one, self.part, True, r.header_limit)
            return bool(values) and self.matcher.test_folded(r, values)
        lowered = self.lowered
        if lowered is None:
            lowered = [n.lower() for n in self.names.get(r)]
        msg, limit, matcher = r.msg, r.header_limit, self.matcher
        if self.index is None:  # the parts, folded or not, are cached per message
            r.tick()
            prefolded = matcher.prefolded
            if len(lowered) == 1:
                values = msg.parts(lowered[0], self.part, prefolded, limit)
            else:
                values = []
                for name in lowered:
                    values += msg.parts(name, self.part, prefolded, limit)
            return matcher.test_folded(r, values) if prefolded else matcher.test(r, values)
        values = []
        for name in lowered:
            for addresses in _select(msg.addresses(name, limit),
                                     self.index, self.last):
                r.tick()
                for address in addresses:
                    part = address_part(address, self.part)
                    if part is not None:
                        values.append(part)
        return self.matcher.test(r, values)


class Envelope(Test):
    __slots__ = ("lowered", "matcher", "part", "parts")

    def __init__(self, parts: StrList, matcher: Matcher, part: str) -> None:
        self.parts, self.matcher, self.part = parts, matcher, part
        self.lowered = _lowered(parts)

    def ev(self, r: Run) -> bool:
        msg, matcher = r.msg, self.matcher
        lowered = self.lowered
        if lowered is None:
            lowered = [n.lower() for n in self.parts.get(r)]
        prefolded = matcher.prefolded
        if len(lowered) == 1:
            values = msg.envelope(lowered[0], self.part, prefolded)
        else:
            values = []
            for name in lowered:
                values += msg.envelope(name, self.part, prefolded)
        return matcher.test_folded(r, values) if prefolded else matcher.test(r, values)


class Exists(Test):
    __slots__ = ("names",)

    def __init__(self, names: StrList) -> None:
        self.names = names

    def ev(self, r: Run) -> bool:
        fields = r.msg.fields(r.header_limit)
        return all(name.lower() in fields for name in self.names.get(r))


class Size(Test):
    __slots__ = ("limit", "over")

    def __init__(self, over: bool, limit: int) -> None:
        self.over, self.limit = over, limit

    def ev(self, r: Run) -> bool:
        return r.msg.size > self.limit if self.over else r.msg.size < self.limit


class Body(Test):
    __slots__ = ("matcher", "transform", "types")

    def __init__(self, matcher: Matcher, transform: str, types: StrList | None) -> None:
        self.matcher, self.transform, self.types = matcher, transform, types

    def ev(self, r: Run) -> bool:
        types = tuple(self.types.get(r)) if self.types is not None else ()
        texts = r.msg.body_texts(self.transform, types, r.limits.max_body_bytes_tested)
        return self.matcher.test(r, texts)


class StringTest(Test):
    __slots__ = ("matcher", "sources")

    def __init__(self, sources: StrList, matcher: Matcher) -> None:
        self.sources, self.matcher = sources, matcher

    def ev(self, r: Run) -> bool:
        values = self.sources.get(r)
        if self.matcher.kind == "count":
            values = [v for v in values if v != ""]
        return self.matcher.test(r, values)


class HasFlag(Test):
    __slots__ = ("matcher", "variables")

    def __init__(self, variables: list[tuple[str, str]], matcher: Matcher) -> None:
        self.variables, self.matcher = variables, matcher

    def ev(self, r: Run) -> bool:
        flags: list[str] = []
        for scope, name in self.variables:
            flags += r.get(scope, name).split()
        return self.matcher.test(r, flags)


class MailboxExists(Test):
    __slots__ = ("names",)

    def __init__(self, names: StrList) -> None:
        self.names = names

    def ev(self, r: Run) -> bool:
        return all(r.env.mailbox_exists(n) for n in self.names.get(r))


class Environment(Test):
    __slots__ = ("matcher", "name")

    def __init__(self, name: Str, matcher: Matcher) -> None:
        self.name, self.matcher = name, matcher

    def ev(self, r: Run) -> bool:
        name = val(self.name, r).lower()
        env = r.env
        host = env.hostname
        value = {"domain": host.split(".", 1)[1] if "." in host else host, "host": host,
                 "location": "MDA", "name": "mailfort", "phase": env.phase,
                 "version": "1"}.get(name)
        return value is not None and self.matcher.test(r, [value])


class DateTest(Test):
    __slots__ = ("header", "index", "last", "matcher", "original", "part", "zone")

    def __init__(self, header: Str | None, part: Str, matcher: Matcher, zone: Str | None,
                 original: bool, index: int | None, last: bool) -> None:
        self.header, self.part, self.matcher = header, part, matcher
        self.zone, self.original, self.index, self.last = zone, original, index, last

    def ev(self, r: Run) -> bool:
        part = val(self.part, r).lower()
        if part not in m.DATE_PARTS:
            return False
        zone = None
        if self.zone is not None:
            zone = m.parse_zone(val(self.zone, r))
            if zone is None:
                return False
        if self.header is None:  # currentdate
            dates = [r.env.now]
        else:
            name = val(self.header, r).lower()
            dates = []
            for value in _select(r.msg.header(name, r.header_limit), self.index, self.last):
                if name == "received":
                    value = value.rpartition(";")[2]
                dt = m.parse_date(value)
                if dt is not None:
                    dates.append(dt)
        values = []
        for dt in dates:
            if zone is not None:
                dt = dt.astimezone(zone)
            elif not self.original:
                dt = dt.astimezone(r.env.now.tzinfo)
            values.append(m.date_part(dt, part))
        return self.matcher.test(r, values)


# ------------------------------------------------------------------------- commands


class Command:
    __slots__ = ()

    def run(self, r: Run) -> None:
        raise NotImplementedError


def run_block(block: list[Command], r: Run) -> None:
    for command in block:
        r.ops += 1  # r.tick(), inlined: one call less per command
        if not r.ops & 63:
            r.check()
        command.run(r)


class If(Command):
    __slots__ = ("branches",)

    def __init__(self, branches: list[tuple[Test | None, list[Command]]]) -> None:
        self.branches = branches  # the compiler appends elsif and else after this

    def run(self, r: Run) -> None:
        branches = self.branches
        if len(branches) == 1:  # an "if" without elsif or else: most rules of a filter script
            test, block = branches[0]
            if test.ev(r):  # type: ignore[union-attr]
                run_block(block, r)
            return
        for test, block in branches:
            if test is None or test.ev(r):
                run_block(block, r)
                return


class StopCmd(Command):
    __slots__ = ()

    def run(self, r: Run) -> None:
        raise Stop


class ReturnCmd(Command):
    __slots__ = ()

    def run(self, r: Run) -> None:
        raise Return


def _flags(flags: StrList | None, r: Run) -> tuple[str, ...]:
    if flags is None:
        return _split_flags(r.local.get(FLAGS_VAR, ""))
    return _split_flags(" ".join(flags.get(r)))


class KeepCmd(Command):
    __slots__ = ("flags",)

    def __init__(self, flags: StrList | None) -> None:
        self.flags = flags

    def run(self, r: Run) -> None:
        r.add(Keep(_flags(self.flags, r)))
        r.implicit_keep = False


class DiscardCmd(Command):
    __slots__ = ()

    def run(self, r: Run) -> None:
        r.implicit_keep = False
        r.discarded = True


def check_mailbox(name: str) -> str | None:
    """Why a mailbox name is refused, or None."""
    if not name:
        return "empty mailbox name"
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        return "control character in mailbox name"
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        return "mailbox name longer than 255 bytes"
    return None


def check_address(address: str) -> str | None:
    local, at, domain = address.rpartition("@")
    if (not at or not local or not domain or len(address) > 320
            or any(c.isspace() or c in "<>\"()," or ord(c) < 32 for c in domain)
            or any(ord(c) < 32 or c in "<>" for c in local)):
        return f"invalid redirect address {address!r}"
    return None


class FileIntoCmd(Command):
    __slots__ = ("copy", "create", "flags", "mailbox")

    def __init__(self, mailbox: Str, flags: StrList | None, copy: bool, create: bool) -> None:
        self.mailbox, self.flags, self.copy, self.create = mailbox, flags, copy, create

    def run(self, r: Run) -> None:
        mailbox = val(self.mailbox, r)
        problem = check_mailbox(mailbox)
        if problem:
            raise Fail(f"fileinto: {problem}")
        r.add(FileInto(mailbox, _flags(self.flags, r), self.create))
        if not self.copy:
            r.implicit_keep = False


class RedirectCmd(Command):
    __slots__ = ("address", "copy")

    def __init__(self, address: Str, copy: bool) -> None:
        self.address, self.copy = address, copy

    def run(self, r: Run) -> None:
        address = val(self.address, r).strip()
        if address.startswith("<") and address.endswith(">"):
            address = address[1:-1]
        problem = check_address(address)
        if problem:
            raise Fail(f"redirect: {problem}")
        r.add(Redirect(address, self.copy))
        if not self.copy:
            r.implicit_keep = False


class RejectCmd(Command):
    __slots__ = ("ereject", "reason")

    def __init__(self, reason: Str, ereject: bool) -> None:
        self.reason, self.ereject = reason, ereject

    def run(self, r: Run) -> None:
        r.add(Reject(val(self.reason, r), self.ereject))
        r.implicit_keep = False


class FlagCmd(Command):
    __slots__ = ("flags", "name", "op", "scope")

    def __init__(self, op: str, scope: str, name: str, flags: StrList) -> None:
        self.op, self.scope, self.name, self.flags = op, scope, name, flags

    def run(self, r: Run) -> None:
        new = _split_flags(" ".join(self.flags.get(r)))
        if self.op == "setflag":
            result = " ".join(new)
        else:
            old = _split_flags(r.get(self.scope, self.name))
            if self.op == "addflag":
                result = " ".join(_split_flags(" ".join(old + new)))
            else:
                gone = {f.lower() for f in new}
                result = " ".join(f for f in old if f.lower() not in gone)
        r.set(self.scope, self.name, result)


def _quote_wildcards(text: str) -> str:
    return "".join("\\" + c if c in "*?\\" else c for c in text)


_MODIFIERS: dict[str, Callable[[str], str]] = {
    "lower": m.fold, "upper": lambda s: s.upper() if s.isascii() else "".join(
        c.upper() if c.isascii() else c for c in s),
    "lowerfirst": lambda s: m.fold(s[:1]) + s[1:],
    "upperfirst": lambda s: s[:1].upper() + s[1:] if s[:1].isascii() else s,
    "quotewildcard": _quote_wildcards, "length": lambda s: str(len(s)),
}
MODIFIER_PRECEDENCE = {"lower": 40, "upper": 40, "lowerfirst": 30, "upperfirst": 30,
                       "quotewildcard": 20, "length": 10}


class SetCmd(Command):
    __slots__ = ("modifiers", "name", "scope", "value")

    def __init__(self, scope: str, name: str, value: Str, modifiers: list[str]) -> None:
        self.scope, self.name, self.value = scope, name, value
        self.modifiers = sorted(modifiers, key=lambda x: -MODIFIER_PRECEDENCE[x])

    def run(self, r: Run) -> None:
        value = val(self.value, r)
        for modifier in self.modifiers:
            value = _MODIFIERS[modifier](value)
        r.set(self.scope, self.name, value)


class VacationCmd(Command):
    __slots__ = ("addresses", "from_", "handle", "mime", "reason", "seconds", "subject")

    def __init__(self, reason: Str, subject: Str | None, from_: Str | None,
                 addresses: StrList | None, mime: bool, handle: Str | None,
                 seconds: int) -> None:
        self.reason, self.subject, self.from_ = reason, subject, from_
        self.addresses, self.mime, self.handle, self.seconds = addresses, mime, handle, seconds

    def run(self, r: Run) -> None:
        reason = val(self.reason, r)
        subject = val(self.subject, r) if self.subject is not None else None
        from_ = val(self.from_, r) if self.from_ is not None else None
        if self.handle is not None:
            handle = val(self.handle, r)
        else:  # RFC 5230 4.2: derived from the arguments, so a changed text replies anew
            basis = "\x00".join((reason, subject or "", from_ or "", str(self.mime)))
            handle = hashlib.sha256(basis.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        addresses = tuple(self.addresses.get(r)) if self.addresses is not None else ()
        r.add(Vacation(reason, subject, from_, addresses, self.mime, handle, self.seconds))


class Unit:
    """One compiled script (the main one or an included one)."""

    __slots__ = ("block", "name")

    def __init__(self, name: str, block: list[Command]) -> None:
        self.name, self.block = name, block


class IncludeCmd(Command):
    __slots__ = ("once", "unit")

    def __init__(self, unit: Unit, once: bool) -> None:
        self.unit, self.once = unit, once

    def run(self, r: Run) -> None:
        if self.once:
            if self.unit in r.included:
                return
            r.included.add(self.unit)
        saved_local, saved_match = r.local, r.match
        r.local = {FLAGS_VAR: saved_local.get(FLAGS_VAR, "")}
        r.match = []
        try:
            run_block(self.unit.block, r)
        except Return:
            pass
        finally:
            flags = r.local.get(FLAGS_VAR, "")
            r.local, r.match = saved_local, saved_match
            if flags or FLAGS_VAR in saved_local:
                saved_local[FLAGS_VAR] = flags


class Unresolved(Command):
    """An include compiled without a loader (a script checked, not meant to run)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, r: Run) -> None:
        raise Fail(f"include: {self.name!r} was not resolved when the script was compiled")


class Noop(Command):
    __slots__ = ()

    def run(self, r: Run) -> None:
        pass


def execute(block: list[Command], msg: SieveMessage, env: SieveEnvironment,
            limits: SieveLimits) -> SieveResult:
    r = Run(msg, env, limits)
    try:
        try:  # noqa: SIM105
            run_block(block, r)
        except (Stop, Return):  # not contextlib.suppress: no context manager per message
            pass
        return SieveResult(r.finish())
    except Fail as exc:
        return SieveResult([Keep()], error=str(exc))
    except RecursionError:
        return SieveResult([Keep()], error="script too deeply nested")
    except Exception as exc:  # a bug here must not lose the message: keep it, say why
        return SieveResult([Keep()], error=f"internal error: {type(exc).__name__}: {exc}")
