"""What every command adapter shares: the configuration read once, the one-line error,
a ``--password-file`` read before any switch to the service user, and the rule that a
command which only reads the data directory never creates it."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mailfort import config as config_mod
from mailfort.config import Config

NO_DATA_DIR = "no data directory here (use --config or the directory where serve runs)"


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def config_of(args: argparse.Namespace) -> Config:
    """The configuration, read once: as root, before the switch to the service user (the
    file may be readable by root only); the commands use this copy afterwards."""
    cfg: Config | None = getattr(args, "loaded_config", None)
    if cfg is None:
        cfg = config_mod.load(getattr(args, "config", None))
        args.loaded_config = cfg
    return cfg


def password_file_text(args: argparse.Namespace) -> str:
    """The ``--password-file``: a file the admin named, read as the admin (before the
    switch, when there is one) and kept for the command. ``-`` is standard input: its
    first line (``echo pw | mailfort user add ...``; nothing is echoed, no prompt)."""
    text: str | None = getattr(args, "password_text", None)
    if text is None:
        if args.password_file == "-":
            text = sys.stdin.readline()
            if not text:
                raise CLIError("--password-file -: nothing on standard input")
        else:
            text = Path(args.password_file).read_text(encoding="utf-8")
        args.password_text = text
    return text


def reads_only(parser: argparse.ArgumentParser, what: str = "data") -> argparse.ArgumentParser:
    """Mark a command that only reads or changes what exists: where there is no data
    directory it says so and creates nothing (``require_data_dir``). ``what``: "data"
    (the queue, keys, control socket: always in the data directory) or "directory" (the
    domains and users: in the data directory unless the directory is PostgreSQL) or
    "status" (``mailfort status``: said on stdout, exit 3, as for a server not running)."""
    parser.set_defaults(reads_only=what)
    return parser


def require_data_dir(args: argparse.Namespace) -> None:
    """CLIError for a ``reads_only`` command when the data directory does not exist; run
    before anything (the switch to the service user included) could create it."""
    what = getattr(args, "reads_only", None)
    if what is None:
        return
    cfg = config_of(args)
    if what == "directory" and cfg.directory.backend == "postgresql":
        return
    if not os.path.isdir(cfg.data_path):
        if what == "status":  # as ``status`` says it when nothing answers, LSB exit 3
            print(f"mailfort is not running ({NO_DATA_DIR}: {cfg.data_path} does not exist)")
            raise SystemExit(3)
        raise CLIError(f"{NO_DATA_DIR}: {cfg.data_path} does not exist")


def require_local_domain(cfg: Config, domain: str) -> str:
    """``domain`` normalized; CLIError unless it is one of ours (a DKIM key or an MTA-STS
    policy for another domain is never used). Creates nothing: an embedded directory that
    does not exist yet has no domains."""
    from mailfort.directory import DIRECTORY_FILE, open_directory
    from mailfort.directory.sqlite import normalize_domain

    name = normalize_domain(domain)
    local = False
    if cfg.directory.backend == "postgresql" or (cfg.data_path / DIRECTORY_FILE).is_file():
        config_mod.require_directory_extra(cfg)
        with open_directory(cfg) as d:
            local = d.is_local_domain(name)
    if not local:
        raise CLIError(f"{name} is not a local domain (add it with: mailfort domain add {name})")
    return name
