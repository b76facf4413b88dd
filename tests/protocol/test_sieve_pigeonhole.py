"""Differential test: mailfort's Sieve against Dovecot Pigeonhole's ``sieve-test`` (package
dovecot-sieve) on a corpus of scripts x messages; both must decide the same actions
(stores with their flags, redirects, rejects, discard, vacation, or a runtime error).

``sieve-test`` only reports what the script decided (no delivery): it runs with a config
file of its own (a throw-away Maildir; as root, the unprivileged ``nobody`` as mail user
since it refuses root), so no Dovecot needs to run. Skipped when the tool is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailfort.protocol.sieve import (
    Discard,
    FileInto,
    Keep,
    Redirect,
    Reject,
    SieveEnvironment,
    SieveError,
    SieveMessage,
    SieveResult,
    Vacation,
    compile_script,
)

SIEVE_TEST = shutil.which("sieve-test")
pytestmark = pytest.mark.skipif(SIEVE_TEST is None,
                                reason="sieve-test (Debian dovecot-sieve) not installed")

SENDER = "alice+lists@example.com"
RECIPIENT = "me@example.net"

MESSAGES: dict[str, bytes] = {
    "plain": (
        b"Return-Path: <alice+lists@example.com>\r\n"
        b"Received: from a.example.com by mx.example.net; Mon, 7 Dec 2026 10:00:05 +0100\r\n"
        b"Received: from b.example.com by a.example.com; Mon, 7 Dec 2026 09:59:00 +0100\r\n"
        b"From: Alice Example <alice+lists@example.com>\r\n"
        b"To: Me <me@example.net>, \"Doe, Jane\" <jane@example.org>\r\n"
        b"Cc: team: bob@example.net, carol@Example.NET;\r\n"
        b"Subject: Hello World\r\n"
        b"Date: Mon, 7 Dec 2026 10:00:00 +0100\r\n"
        b"Message-ID: <1@example.com>\r\n"
        b"X-Spam: yes\r\n"
        b"X-Spam-Score: 7\r\n"
        b"List-Id: <news.example.com>\r\n"
        b"\r\n"
        b"Hello there,\r\nthe meeting is at noon.\r\n"),
    "encoded": (
        b"From: =?UTF-8?Q?Jos=C3=A9?= <jose@example.org>\r\n"
        b"To: me@example.net, =?UTF-8?Q?Doe=2C_J?= <j@example.org>\r\n"
        b"Cc: a@example.org, b@example.org\r\n"
        b"Subject: =?UTF-8?Q?Caf=C3=A9?= =?ISO-8859-1?Q?_men=FA?= and\r\n"
        b" more\r\n"
        b"Date: Sat, 31 Jan 2026 23:30:00 -0500\r\n"
        b"X-Spam-Score: 12\r\n"
        b"Content-Type: multipart/alternative; boundary=\"b1\"\r\n"
        b"MIME-Version: 1.0\r\n"
        b"\r\n"
        b"preamble\r\n"
        b"--b1\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n"
        b"\r\n"
        b"Le caf=C3=A9 est pr=C3=AAt. Secret code: 4711\r\n"
        b"--b1\r\n"
        b"Content-Type: text/html; charset=utf-8\r\n"
        b"\r\n"
        b"<p>Le caf\xc3\xa9 <b>HTML</b></p>\r\n"
        b"--b1--\r\n"),
    "bare": (
        b"From: MAILER-DAEMON@example.org\r\n"
        b"To: someone@example.net\r\n"
        b"Subject: Undelivered Mail\r\n"
        b"Auto-Submitted: auto-replied\r\n"
        b"\r\n"
        b"x\r\n"),
}

SCRIPTS: list[str] = [
    'keep;',
    'discard;',
    'keep; discard;',
    'require "fileinto"; fileinto "Work";',
    'require "fileinto"; fileinto "INBOX"; keep;',
    'require "fileinto"; if header :contains "subject" "hello" { fileinto "Hello"; }',
    'require "fileinto"; if header :is "subject" "Hello World" { fileinto "Is"; stop; }'
    ' fileinto "After";',
    'require "fileinto"; if header :matches "subject" "*o W*" { fileinto "M"; }',
    'require "fileinto"; if header :matches "subject" "H?llo*" { fileinto "Q"; }',
    'require "fileinto"; if header :contains "subject" "café" { fileinto "Cafe"; }',
    'require "fileinto"; if header :contains "subject" "menú and more" { fileinto "Fold"; }',
    'require "fileinto"; if header :comparator "i;octet" :contains "subject" "hello"'
    ' { fileinto "Octet"; }',
    'require "fileinto"; if exists ["x-spam", "list-id"] { fileinto "Junk"; }',
    'require "fileinto"; if not exists "x-spam" { fileinto "Clean"; } else { keep; }',
    'require "fileinto"; if anyof (header :is "x-spam" "yes", size :over 1M)'
    ' { fileinto "A"; } elsif allof (true, false) { fileinto "B"; } else { fileinto "C"; }',
    'if size :over 400 { discard; }',
    'if size :under 1K { redirect "archive@example.org"; }',
    'redirect "one@example.org"; redirect "two@example.org"; redirect "ONE@example.org";',
    'redirect "a@example.org"; redirect "b@example.org"; redirect "c@example.org";'
    ' redirect "d@example.org"; redirect "e@example.org";',
    'require "copy"; redirect :copy "copy@example.org";',
    'require ["fileinto", "copy"]; fileinto :copy "Copy"; ',
    'require "fileinto"; if address :domain "from" "example.com" { fileinto "Dom"; }',
    'require "fileinto"; if address :localpart :is "to" "jane" { fileinto "Jane"; }',
    'require "fileinto"; if address :all :is "cc" "carol@example.net" { fileinto "Grp"; }',
    'require ["fileinto", "subaddress"]; if address :detail "from" "lists" { fileinto "Det"; }',
    'require ["fileinto", "subaddress"]; if address :user "from" "alice" { fileinto "User"; }',
    'require ["fileinto", "envelope"]; if envelope :domain "from" "example.com"'
    ' { fileinto "EnvFrom"; }',
    'require ["fileinto", "envelope", "subaddress"]; if envelope :detail "from" "lists"'
    ' { fileinto "EnvDetail"; }',
    'require ["fileinto", "envelope"]; if envelope :is "to" "me@example.net"'
    ' { fileinto "EnvTo"; }',
    'require ["fileinto", "relational", "comparator-i;ascii-numeric"];'
    ' if header :value "ge" :comparator "i;ascii-numeric" "x-spam-score" "10"'
    ' { fileinto "High"; }',
    'require ["fileinto", "relational", "comparator-i;ascii-numeric"];'
    ' if header :count "ge" :comparator "i;ascii-numeric" "received" "2"'
    ' { fileinto "Hops"; }',
    'require ["fileinto", "relational", "comparator-i;ascii-numeric"];'
    ' if address :count "eq" :comparator "i;ascii-numeric" ["to", "cc"] "4"'
    ' { fileinto "Four"; }',
    'require ["fileinto", "relational"]; if header :value "lt" "subject" "M"'
    ' { fileinto "Before"; }',
    'require ["fileinto", "variables"]; if header :matches "subject" "* *"'
    ' { fileinto "${2}-${1}"; }',
    'require ["fileinto", "variables"]; set :lower :upperfirst "x" "hELLO";'
    ' set :length "n" "${x}"; fileinto "${x}${n}";',
    'require ["fileinto", "variables"]; set "a" "Lists"; if string :is "${a}" "lists"'
    ' { fileinto "${a}"; }',
    'require ["fileinto", "variables", "envelope"]; if envelope :matches "from" "*@*"'
    ' { set :upper "d" "${2}"; fileinto "From/${d}"; }',
    'require ["fileinto", "encoded-character"]; fileinto "${hex:4A 75 6E 6B}${unicode:e9}";',
    'require ["imap4flags"]; addflag "\\\\Seen"; addflag ["\\\\Flagged", "$Work"];'
    ' removeflag "\\\\seen";',
    'require ["imap4flags", "fileinto"]; setflag "\\\\Seen"; fileinto "Read";'
    ' fileinto :flags "$x" "Other";',
    'require ["imap4flags"]; if hasflag "x" { discard; } addflag "x"; if hasflag :contains'
    ' "x" { keep :flags "\\\\Answered"; }',
    'require ["imap4flags", "variables", "fileinto"]; setflag "f" "a b"; addflag "f" "c";'
    ' fileinto :flags "${f}" "V";',
    'require ["fileinto", "body"]; if body :contains "noon" { fileinto "Noon"; }',
    'require ["fileinto", "body"]; if body :text :contains "café est" { fileinto "Text"; }',
    'require ["fileinto", "body"]; if body :content "text/html" :contains "HTML"'
    ' { fileinto "Html"; }',
    'require ["fileinto", "body"]; if body :raw :contains "caf=C3=A9" { fileinto "Raw"; }',
    'require ["fileinto", "date"]; if date :is "date" "year" "2026" { fileinto "Y"; }',
    'require ["fileinto", "date"]; if date :zone "+0000" :is "date" "date" "2026-02-01"'
    ' { fileinto "Z"; }',
    'require ["fileinto", "date"]; if date :originalzone :is "date" "hour" "10"'
    ' { fileinto "Orig"; }',
    'require ["fileinto", "date", "variables"]; if date :zone "+0000" :matches "date"'
    ' "weekday" "*" { fileinto "W${1}"; }',
    'require ["fileinto", "date", "index"]; if date :index 1 :zone "+0000" :is "received"'
    ' "time" "09:00:05" { fileinto "Recv"; }',
    'require ["fileinto", "index"]; if header :index 2 :contains "received" "b.example"'
    ' { fileinto "Second"; }',
    'require ["fileinto", "index"]; if header :index 1 :last :contains "received" "b.example"'
    ' { fileinto "Last"; }',
    'require ["fileinto", "date", "relational"]; if currentdate :value "ge" "year" "2020"'
    ' { fileinto "Now"; }',
    'require "reject"; if header :contains "subject" "hello" { reject "go away"; }',
    'require "reject"; reject text:\nNot here.\n..\n.\n;',
    'require ["reject", "fileinto"]; fileinto "x"; reject "no";',
    'require ["reject", "copy"]; redirect :copy "a@example.org"; reject "no";',
    'require ["vacation"]; vacation "v"; discard;',
    'require ["imap4flags", "fileinto"]; setflag "a"; fileinto "A"; fileinto :flags "b" "A";',
    'require ["imap4flags", "fileinto"]; addflag "x"; fileinto "A"; removeflag "x"; keep;',
    'require ["include"]; include "stopper"; keep;',
    'require ["encoded-character", "variables", "fileinto"]; set "a" "b";'
    ' fileinto "${hex:24}{a}";',
    'require "reject"; reject "no"; keep;',
    'require ["reject", "imap4flags"]; discard; reject "no"; addflag "x";',
    'require ["vacation"]; vacation :days 3 :subject "Away" "I am away";',
    'require ["vacation", "vacation-seconds"]; vacation :seconds 200000 :from'
    ' "me@example.net" :addresses ["me@example.net"] :handle "h1" "Back soon";',
    'require ["vacation", "fileinto"]; fileinto "Seen"; vacation "away";',
    'require ["fileinto", "mailbox"]; fileinto :create "New/Box";',
    'if false { keep; }',
    'require "fileinto"; if header :matches "subject" "Hello\\\\*" { fileinto "Star"; }'
    ' if header :matches "subject" "*\\\\?*" { fileinto "Quest"; }',
    'require "fileinto"; if header :contains ["subject", "from"] ["xyz", "ALICE"]'
    ' { fileinto "Multi"; }',
    'require "fileinto"; if not anyof (exists "x-none", header :is "x-none" "")'
    ' { if true { if size :over 10 { fileinto "Nested"; } } }',
    'require ["fileinto", "variables"]; set :quotewildcard "q" "Hello*"; if header :matches'
    ' "subject" "${q}" { fileinto "Quoted"; } else { fileinto "NotQuoted"; }',
    'require ["fileinto", "variables", "relational", "comparator-i;ascii-numeric"];'
    ' if string :count "ge" :comparator "i;ascii-numeric" ["a", "b", ""] "2"'
    ' { fileinto "Two"; }',
    'require ["fileinto", "envelope", "subaddress"]; if envelope :user "from" "alice"'
    ' { fileinto "EnvUser"; }',
    'require ["imap4flags"]; keep :flags ["\\\\Flagged", "x y"];',
    'require ["imap4flags", "variables"]; set "f" "a b c"; removeflag "f" "b";'
    ' if hasflag "f" ["a", "c"] { addflag "ac"; }',
    'require ["fileinto", "copy"]; redirect :copy "x@example.org"; fileinto "Also";',
    'require "fileinto";' + ''.join(f'fileinto "F{i}";' for i in range(33)),
    'require ["fileinto", "relational", "comparator-i;ascii-numeric"];'
    ' if header :count "eq" :comparator "i;ascii-numeric" "x-none" "0" { fileinto "Zero"; }',
    'require ["fileinto", "comparator-i;ascii-numeric"];'
    ' if header :is :comparator "i;ascii-numeric" "x-spam-score" "07" { fileinto "Num"; }',
    'require ["fileinto", "date", "relational"]; if date :value "lt" "date" "iso8601"'
    ' "2026-06-01T00:00:00+00:00" { fileinto "Early"; }',
    'require ["fileinto", "variables"]; if address :matches "from" "*@*.*"'
    ' { fileinto "${1}|${2}|${3}"; }',
    'require ["fileinto", "variables"]; if header :matches "subject" "?*?*"'
    ' { fileinto "${1}|${2}|${3}|${4}"; }',
    'require ["fileinto", "variables"]; if header :matches "subject" "*l*o*"'
    ' { fileinto "${0}|${1}|${2}|${3}"; }',
    'require ["fileinto", "variables"]; if header :matches "x-spam-score" "*"'
    ' { set "s" "${1}"; } if string :matches "${s}" "1?" { fileinto "Teen"; }',
    'require ["include"]; include "pers"; include :global "glob"; include :optional "none";',
    'require ["include"]; include :once "pers"; include :once "pers";',
    'require ["include", "variables", "fileinto"]; global "where"; set "where" "Main";'
    ' include :global "setter"; fileinto "${where}";',
]

# scripts the corpus includes: (global?, name) -> text
INCLUDED: dict[tuple[bool, str], str] = {
    (False, "pers"): 'require ["fileinto"]; if header :contains "subject" "hello"'
                     ' { fileinto "Pers"; }',
    (True, "glob"): 'require ["fileinto", "include"]; fileinto "Glob"; return;'
                    ' fileinto "Never";',
    (False, "stopper"): 'require "fileinto"; fileinto "S"; stop;',
    (True, "setter"): 'require ["include", "variables"]; global "where";'
                      ' set "where" "${where}-Set";',
}


_LOOKS_AT_MESSAGE = re.compile(r"\b(header|address|exists|body|date|size|envelope|include)\b")


def _pigeonhole_config(tmp: Path) -> Path:
    for (global_, name), text in INCLUDED.items():
        folder = tmp / ("global" if global_ else "personal")
        folder.mkdir(mode=0o755, exist_ok=True)
        (folder / f"{name}.sieve").write_text(text)
    conf = tmp / "dovecot.conf"
    # as root, sieve-test must drop to a mail user (it refuses root): nobody; as anyone
    # else it runs as that user
    users = ("mail_uid = 65534\nmail_gid = 65534\nfirst_valid_uid = 1\n"
             "first_valid_gid = 1\n") if os.geteuid() == 0 else ""
    conf.write_text(f"{users}mail_location = maildir:{tmp}/mail\n"
                    f"plugin {{\n  sieve = file:{tmp}/personal\n  sieve_global = {tmp}/global\n"
                    "  sieve_extensions = +vacation-seconds\n"
                    "  sieve_vacation_min_period = 1\n}\n")
    return conf


def _include(name: str, global_: bool) -> bytes | None:
    text = INCLUDED.get((global_, name))
    return None if text is None else text.encode()


def pigeonhole(conf: Path, script: Path, mail: Path) -> list[str]:
    env = dict(os.environ, TZ="UTC")
    out = subprocess.run([SIEVE_TEST, "-c", str(conf), "-f", SENDER, "-r", RECIPIENT,
                          str(script), str(mail)], capture_output=True, text=True, env=env,
                         timeout=30, check=False)
    text = out.stdout + out.stderr
    if "error:" in text and "Performed actions" not in text:
        return ["error"]
    assert "Performed actions" in text, text
    return _normalize_pigeonhole(text)


def _normalize_pigeonhole(text: str) -> list[str]:
    items: list[dict[str, str]] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := re.match(r"^ \* store message in folder: (.*)$", line):
            items.append({"kind": "store", "box": m.group(1), "flags": ""})
        elif m := re.match(r"^\s+\+ add IMAP flags: (.*)$", line):
            items[-1]["flags"] = m.group(1)
        elif m := re.match(r"^ \* redirect message to: <(.*)>$", line):
            items.append({"kind": "redirect", "to": m.group(1)})
        elif m := re.match(r"^ \* reject message with reason: (.*)$", line):
            items.append({"kind": "reject", "reason": m.group(1)})
        elif line == " * discard":
            items.append({"kind": "discard"})
        elif line == " * send vacation message:":
            item = {"kind": "vacation"}
            i += 1
            while (m := re.match(r"^\s+=> (\w+)\s*: (.*)$", lines[i])):
                item[m.group(1)] = m.group(2)
                i += 1
            while lines[i] != "START MESSAGE":
                i += 1
            end = lines.index("END MESSAGE", i)
            item["reason"] = "\n".join(lines[i + 1:end])
            items.append(item)
            i = end
        i += 1
    out = []
    for item in items:
        if item["kind"] == "store":
            out.append(_store(item["box"], item["flags"].split()))
        elif item["kind"] == "redirect":
            out.append(f"redirect {item['to'].lower()}")
        elif item["kind"] == "reject":
            out.append(f"reject {item['reason']}")
        elif item["kind"] == "vacation":
            out.append(f"vacation {item['seconds']} {item.get('subject')} {item.get('from')} "
                       f"{item['reason']}")
    if any(i["kind"] == "discard" for i in items):
        out.append("discard")
    return _discard_only_alone(out)


def _discard_only_alone(out: list[str]) -> list[str]:
    """Pigeonhole lists a discard beside what still delivers; mailfort only when nothing
    does (a discard just cancels the implicit keep): compare that."""
    if any(not item.startswith(("discard", "vacation")) for item in out):
        out = [item for item in out if item != "discard"]
    return sorted(set(out))


def _store(box: str, flags: list[str] | tuple[str, ...]) -> str:
    return f"store {box} [{' '.join(sorted({f.lower() for f in flags}))}]"


def ours(result: SieveResult) -> list[str]:
    if result.error is not None:
        assert result.actions == [Keep()]
        return ["error"]
    out = []
    for action in result.actions:
        if isinstance(action, Keep):
            out.append(_store("INBOX", action.flags))
        elif isinstance(action, FileInto):
            out.append(_store(action.mailbox, action.flags))
        elif isinstance(action, Redirect):
            out.append(f"redirect {action.address.lower()}")
        elif isinstance(action, Reject):
            out.append(f"reject {action.reason.replace(chr(13) + chr(10), '??')}")
        elif isinstance(action, Vacation):
            out.append(f"vacation {action.seconds} {action.subject} {action.from_} "
                       f"{action.reason}")
        elif isinstance(action, Discard):
            out.append("discard")
    return _discard_only_alone(out)


@pytest.fixture
def world_readable() -> Iterator[Path]:
    """A directory ``nobody`` can read (pytest's tmp_path is under a 0700 directory)."""
    with tempfile.TemporaryDirectory(prefix="mailfort-sieve-diff-", dir="/tmp") as name:
        path = Path(name)
        path.chmod(0o755)
        yield path


def test_pigeonhole_agrees(world_readable: Path) -> None:
    tmp_path = world_readable
    conf = _pigeonhole_config(tmp_path)
    env = SieveEnvironment(now=datetime.now(UTC), hostname="mx.example.net",
                           mailbox_exists=lambda name: False)
    mails = {}
    for name, data in MESSAGES.items():
        path = tmp_path / f"{name}.eml"
        path.write_bytes(data)
        mails[name] = path
    disagreements = []
    jobs = []
    for n, source in enumerate(SCRIPTS):
        try:
            script = compile_script(source, include=_include)
        except SieveError as exc:
            pytest.fail(f"script {n} refused: {exc}: {source}")
        path = tmp_path / f"s{n}.sieve"
        path.write_text(source)
        for name, data in MESSAGES.items():
            if name != "plain" and not _LOOKS_AT_MESSAGE.search(source):
                continue  # the same decision on every message: one run is enough
            head, _, body = data.partition(b"\r\n\r\n")
            msg = SieveMessage.from_bytes(head + b"\r\n\r\n", lambda body=body: body,
                                          size=len(data), envelope_from=SENDER,
                                          envelope_to=RECIPIENT)
            jobs.append((n, source, name, ours(script.run(msg, env)), path))
    with ThreadPoolExecutor(max_workers=4) as pool:  # sieve-test waits on its own I/O
        theirs = list(pool.map(lambda job: pigeonhole(conf, job[4], mails[job[2]]), jobs))
    for (n, source, name, mine, _), other in zip(jobs, theirs, strict=True):
        if mine != other:
            disagreements.append(f"script {n} on {name}: {source!r}\n"
                                 f"  mailfort:   {mine}\n  pigeonhole: {other}")
    assert not disagreements, "\n".join(disagreements)


# Scripts both must refuse, at the same line.
REFUSED: list[str] = [
    'require "fileinto";\nkeep;\nfileinto;',
    'if true {\n  keep;\n',
    'require "nosuch";',
    'keep;\nrequire "fileinto";',
    'if header :is :contains "a" "b" {}',
    'keep;\nredirect "not an address";',
    'if size 10 {}',
    'require "variables";\nset "1" "x";',
    'fileinto "x";',
    'elsif true {}',
    'require "envelope";\nif envelope "sender" "x" {}',
    'require "relational";\nif header :value "xx" "a" "b" {}',
    'if header :comparator "i;nope" "a" "b" {}',
    '"x";',
    'keep :copy;',
    'require "include";\ninclude "a/b";',
    'require "encoded-character";\nkeep;\nredirect "${unicode:D800}@x.y";',
    'stop\n',
    'if true { } else { } else { }',
    'require "vacation";\nvacation :seconds 10 "x";',
    'require "comparator-i;ascii-numeric";\n'
    'if header :contains :comparator "i;ascii-numeric" "a" "b" {}',
    'if not (true, false) {}',
    'if anyof true {}',
    'require "index";\nif header :last "a" "b" {}',
    'require "index";\nif header :index 0 "a" "b" {}',
    'require "imap4flags";\nsetflag "v" "x";',
    '/* unclosed',
    'keep; discard; if true {\n\n keep\n}',
    'require "reject";\nreject ["a", "b"];',
    'require "copy";\nredirect :copy :copy "a@b.c";',
]
# Refused by mailfort, accepted by Pigeonhole (which fails them at run time or never):
# stricter on purpose, a user learns at PUTSCRIPT rather than from a lost filter.
STRICTER: list[str] = [
    'require "date";\nif date "date" "century" "x" {}',
    'if header "a b" "x" {}',
    'require ["fileinto"];\nfileinto "";',
    'require "variables";\nset "a" "${foo.bar}";',
    'require "date";\nif currentdate :zone "+25" "year" "x" {}',
]


def pigeonhole_refusal(conf: Path, script: Path, mail: Path) -> int | None:
    """The line of the first compile error sieve-test reports, None when it compiles."""
    out = subprocess.run([SIEVE_TEST, "-c", str(conf), str(script), str(mail)],
                         capture_output=True, text=True, timeout=30, check=False)
    text = out.stdout + out.stderr
    if "failed to compile" not in text:
        return None
    m = re.search(r": line (\d+): error:", text)
    assert m, text
    return int(m.group(1))


def test_pigeonhole_refuses_the_same_scripts_at_the_same_line(world_readable: Path) -> None:
    conf = _pigeonhole_config(world_readable)
    mail = world_readable / "m.eml"
    mail.write_bytes(MESSAGES["bare"])
    paths = []
    for n, source in enumerate(REFUSED + STRICTER):
        path = world_readable / f"bad{n}.sieve"
        path.write_text(source)
        paths.append(path)
    with ThreadPoolExecutor(max_workers=4) as pool:
        theirs = list(pool.map(lambda p: pigeonhole_refusal(conf, p, mail), paths))
    problems = []
    for source, line in zip(REFUSED + STRICTER, theirs, strict=True):
        try:
            compile_script(source)
        except SieveError as err:
            mine: int | None = err.line
        else:
            mine = None
        expected = None if source in STRICTER else line
        if mine is None or (expected is not None and mine != expected) or (
                source in STRICTER and line is not None):
            problems.append(f"{source!r}: mailfort line {mine}, pigeonhole line {line}")
    assert not problems, "\n".join(problems)
