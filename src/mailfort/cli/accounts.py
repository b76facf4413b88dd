"""``mailfort domain|user|alias``: the local domains, mail accounts and aliases.

Passwords are read from a prompt (twice) or from a file, never from the command line,
where any local user could read them in the process list or the shell history.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from typing import Any

from mailfort import config as config_mod
from mailfort.cli.common import CLIError, config_of, password_file_text, reads_only
from mailfort.directory import open_directory
from mailfort.directory.postgresql import PostgreSQLDirectory
from mailfort.directory.sqlite import SQLiteDirectory, normalize_local_address

MIN_PASSWORD_LENGTH = 8


def _directory(args: argparse.Namespace) -> SQLiteDirectory | PostgreSQLDirectory:
    cfg = config_of(args)
    config_mod.require_directory_extra(cfg)  # one line, not psycopg's ImportError
    return open_directory(cfg)


def _read_password(args: argparse.Namespace) -> str:
    if args.password_file:
        text = password_file_text(args)
        password = text.removesuffix("\n").removesuffix("\r")
    else:
        try:
            password = getpass.getpass("Password: ")
            again = getpass.getpass("Password (again): ")
        except EOFError:  # piped once (without a terminal getpass reads stdin): say how
            print(file=sys.stderr)  # end the prompt's line
            raise CLIError("the password is asked twice, and standard input ended: to "
                           "pipe it once, use --password-file -") from None
        if again != password:
            raise CLIError("the passwords do not match")
    if "\n" in password or "\r" in password:
        raise CLIError("the password file must hold one line")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise CLIError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    return password


def _hash(password: str) -> str:
    from mailfort.passwords import hash_password

    return hash_password(password)


def cmd_domain_add(args: argparse.Namespace) -> int:
    print(f"domain {_directory(args).add_domain(args.domain)} added")
    return 0


def cmd_domain_list(args: argparse.Namespace) -> int:
    d = _directory(args)
    for name in d.list_domains():
        target = d.catchall(name)
        print(f"{name}\tcatch-all -> {target}" if target else name)
    return 0


def cmd_domain_remove(args: argparse.Namespace) -> int:
    _directory(args).remove_domain(args.domain)
    print(f"domain {args.domain.lower()} removed")
    return 0


def cmd_domain_catchall(args: argparse.Namespace) -> int:
    if args.off == (args.target is not None):
        raise CLIError("give either a TARGET address or --off")
    _directory(args).set_catchall(args.domain, None if args.off else args.target)
    print(f"catch-all for {args.domain.lower()}: {'off' if args.off else args.target}")
    return 0


def _local_user(d: SQLiteDirectory | PostgreSQLDirectory, address: str) -> str:
    addr = normalize_local_address(address)
    domain = addr.rpartition("@")[2]
    if not d.is_local_domain(domain):
        raise CLIError(
            f"{domain} is not a local domain (add it with: mailfort domain add {domain})"
        )
    return addr


def cmd_user_add(args: argparse.Namespace) -> int:
    d = _directory(args)
    addr = _local_user(d, args.address)  # checked before asking for a password
    if d.password_hash(addr) is not None:
        raise CLIError(f"user {addr} already exists")
    d.add_user(addr, _hash(_read_password(args)))
    print(f"user {addr} added")
    return 0


def cmd_user_passwd(args: argparse.Namespace) -> int:
    d = _directory(args)
    addr = _local_user(d, args.address)
    if d.password_hash(addr) is None:
        raise CLIError(f"no such user: {addr}")
    d.set_password(addr, _hash(_read_password(args)))
    print(f"password of {addr} changed")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    for user in _directory(args).list_users(args.domain):
        print(user)
    return 0


def cmd_user_remove(args: argparse.Namespace) -> int:
    addr = normalize_local_address(args.address)
    _directory(args).remove_user(addr)
    print(f"user {addr} removed (its Maildir is kept)")
    return 0


def cmd_alias_add(args: argparse.Namespace) -> int:
    src = _directory(args).add_alias(args.source, args.targets)
    print(f"alias {src} -> {', '.join(args.targets)}")
    return 0


def cmd_alias_list(args: argparse.Namespace) -> int:
    for source, targets in _directory(args).list_aliases(args.domain).items():
        print(f"{source}\t{', '.join(targets)}")
    return 0


def cmd_alias_remove(args: argparse.Namespace) -> int:
    _directory(args).remove_alias(args.source, args.targets or None)
    print(f"alias {args.source.lower()} updated" if args.targets else
          f"alias {args.source.lower()} removed")
    return 0


def add_parser(sub: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    dom = sub.add_parser("domain", help="local domains", allow_abbrev=False)
    dom_sub = dom.add_subparsers(dest="action", required=True, metavar="ACTION")
    leaf(dom_sub, "add", cmd_domain_add, "add a local domain").add_argument("domain")
    reads_only(leaf(dom_sub, "list", cmd_domain_list, "list local domains"), "directory")
    reads_only(leaf(dom_sub, "remove", cmd_domain_remove, "remove an empty domain"),
               "directory").add_argument("domain")
    ca = reads_only(leaf(dom_sub, "catchall", cmd_domain_catchall,
                         "catch-all address (off by default)"), "directory")
    ca.add_argument("domain")
    ca.add_argument("target", nargs="?")
    ca.add_argument("--off", action="store_true", help="turn the catch-all off")

    usr = sub.add_parser("user", help="mail accounts", allow_abbrev=False)
    usr_sub = usr.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, func, help_ in (("add", cmd_user_add, "add a user (asks for the password)"),
                              ("passwd", cmd_user_passwd, "change a user's password")):
        p = leaf(usr_sub, name, func, help_, needs=("mailfort.passwords",))
        if name == "passwd":
            reads_only(p, "directory")
        p.add_argument("address")
        p.add_argument("--password-file", metavar="FILE",
                       help="read the password from the first line of FILE (- : standard "
                       "input)")
    reads_only(leaf(usr_sub, "list", cmd_user_list, "list users"),
               "directory").add_argument("domain", nargs="?")
    reads_only(leaf(usr_sub, "remove", cmd_user_remove, "remove a user"),
               "directory").add_argument("address")

    al = sub.add_parser("alias", help="aliases and forwards", allow_abbrev=False)
    al_sub = al.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = reads_only(leaf(al_sub, "add", cmd_alias_add, "add targets to an alias"), "directory")
    p.add_argument("source")
    p.add_argument("targets", nargs="+", metavar="TARGET")
    reads_only(leaf(al_sub, "list", cmd_alias_list, "list aliases"),
               "directory").add_argument("domain", nargs="?")
    p = reads_only(leaf(al_sub, "remove", cmd_alias_remove,
                        "remove an alias or some of its targets"), "directory")
    p.add_argument("source")
    p.add_argument("targets", nargs="*", metavar="TARGET")
