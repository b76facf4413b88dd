"""``mailfort audit``: arguments, progress line, outputs and exit status (0/1/2/3)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from mailfort.audit import catalogue, engine, report
from mailfort.audit.context import Target
from mailfort.audit.registry import all_checks

DESCRIPTION = """\
Check a mail server (SMTP, POP3, IMAP, ManageSieve) from the outside for every weakness mailfort
closes (open relay, unauthenticated submission, backscatter, plaintext, VRFY/EXPN, limits,
smuggling, DNS) and say how to fix each finding.

Exit status: 0 every check PASS, WARN or SKIP; 1 something FAILs; 2 bad usage,
unwritable --html FILE or unreachable host (no report); 3 nothing FAILs but something
is INCONCLUSIVE (the audit could not tell: often --domain/--user not given or not
known to the server, or --budget too small) - not "all fine".

Safety: no message ever leaves for a foreign domain. Relay probes stop after RCPT and
reset; the only messages completed go to the known local user (--user) for the smuggling,
size, forged-From: and content (GTUBE) probes. A port that is closed or set to 0 is skipped.
"""


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError("expected IP:PORT")
    return host.strip("[]"), int(port)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "audit", help="audit any mail server for the weaknesses mailfort closes",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)
    p.add_argument("host", nargs="?", help="the server to audit (name or address)")
    ports = p.add_argument_group("ports (0 skips a service)")
    for name, default in (("smtp", 25), ("submission", 587), ("submissions", 465),
                          ("pop3", 110), ("pop3s", 995), ("imap", 143), ("imaps", 993),
                          ("managesieve", 4190)):
        ports.add_argument(f"--{name}-port", type=int, default=default, metavar="PORT")
    p.add_argument("--domain", help="a local domain of the server")
    p.add_argument("--user", help="a known local part at --domain (the control recipient)")
    p.add_argument("--auth-user", help="an account for the submission checks")
    p.add_argument("--auth-password-file", metavar="FILE",
                   help="its password, first line of FILE (never on the command line)")
    p.add_argument("--only", nargs="+", metavar="CHECK",
                   help="run only these checks (ids or prefixes such as tls)")
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    p.add_argument("--schema", action="store_true",
                   help="print the JSON Schema of the --json report and exit")
    p.add_argument("--json", action="store_true", help="print the JSON report")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")
    p.add_argument("--lang", choices=catalogue.LANGUAGES, default="en")
    p.add_argument("-v", "--verbose", action="store_true", help="evidence for every check")
    tune = p.add_argument_group("bounds and DNS")
    tune.add_argument("--timeout", type=float, default=10.0,
                      help="seconds per connection, send and whole reply, however it "
                           "trickles (default 10); never past --budget")
    tune.add_argument("--budget", type=float, default=110.0,
                      help="seconds for the whole run, enforced inside each check; a check "
                           "cut by it is INCONCLUSIVE (default 110)")
    tune.add_argument("--settle", type=float, default=1.5,
                      help="ignored, kept for old command lines: probes now count replies "
                           "up to a QUIT marker instead of waiting for silence")
    tune.add_argument("--idle-connections", type=int, default=20, metavar="N")
    tune.add_argument("--rcpt-count", type=int, default=1100, metavar="N")
    tune.add_argument("--foreign-domain", default="example.com",
                      help="the foreign domain of relay probes (nothing is ever sent there)")
    tune.add_argument("--resolver", type=_hostport, metavar="IP:PORT",
                      help="DNS server for the DNS checks (default: the system's)")
    tune.add_argument("--dnsbl", action="append", metavar="ZONE",
                      help="DNSBL zone (repeatable; default zen.spamhaus.org, bl.spamcop.net)")
    tune.add_argument("--cafile", metavar="FILE", help="CA bundle to verify certificates")
    p.set_defaults(func=cmd_audit)
    return p


def _target(args: argparse.Namespace) -> Target:
    password = None
    if args.auth_password_file:
        text = Path(args.auth_password_file).read_text(encoding="utf-8")
        password = text.splitlines()[0] if text else ""
    if bool(args.auth_user) != bool(password):
        raise engine.UsageError("--auth-user and --auth-password-file go together")
    t = Target(
        host=args.host,
        ports={s: getattr(args, f"{s}_port") or None
               for s in ("smtp", "submission", "submissions", "pop3", "pop3s", "imap",
                         "imaps", "managesieve")},
        domain=args.domain.lower().rstrip(".") if args.domain else None,
        user=args.user, auth_user=args.auth_user, auth_password=password,
        foreign_domain=args.foreign_domain, timeout=args.timeout,
        budget=args.budget, idle_connections=args.idle_connections,
        rcpt_count=args.rcpt_count, resolver=args.resolver, cafile=args.cafile,
    )
    if args.dnsbl:
        t.dnsbls = tuple(args.dnsbl)
    if args.user and not args.domain:
        raise engine.UsageError("--user needs --domain")
    return t


def _check_writable(name: str) -> None:
    """Say before the run, not after it, that the HTML report cannot be written."""
    path = Path(name)
    parent = path.parent
    if path.is_dir():
        raise engine.UsageError(f"--html {name}: is a directory")
    if not parent.is_dir():
        raise engine.UsageError(f"--html {name}: no directory {str(parent)!r}")
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise engine.UsageError(f"--html {name}: not writable")


def _progress(i: int, n: int, check_id: str) -> None:
    line = f"[{i}/{n}] {check_id}" if check_id else ""
    sys.stderr.write("\r\x1b[K" + line)
    sys.stderr.flush()


def cmd_audit(args: argparse.Namespace) -> int:
    if args.schema:
        from mailfort.audit.schema import SCHEMA

        print(json.dumps(SCHEMA, indent=2))
        return 0
    if args.list:
        cat = catalogue.load(args.lang)
        for c in all_checks():
            print(f"{c.id:28} {c.row:2} {cat.CHECKS[c.id]['title']}")
        return 0
    try:
        if not args.host:
            raise engine.UsageError("give the HOST to audit")
        target = _target(args)
        if args.html:
            _check_writable(args.html)
        engine.resolve_host(target.host)
        tty = sys.stderr.isatty() and not args.json
        result = engine.run(target, only=args.only, lang=args.lang,
                            progress=_progress if tty else None)
    except (engine.UsageError, OSError) as exc:
        print(f"mailfort audit: {exc}", file=sys.stderr)
        return engine.EXIT_USAGE
    except engine.Unreachable as exc:
        print(f"mailfort audit: unreachable: {exc}", file=sys.stderr)
        return engine.EXIT_USAGE
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        sys.stdout.write(report.terminal(result, colour=sys.stdout.isatty(),
                                         verbose=args.verbose))
    if args.html:
        try:
            Path(args.html).write_text(report.html_page(result), encoding="utf-8")
        except OSError as exc:
            print(f"mailfort audit: --html {args.html}: {exc.strerror or exc}", file=sys.stderr)
            return engine.EXIT_USAGE
    return int(result["exit_status"])
