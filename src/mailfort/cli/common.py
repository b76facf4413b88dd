"""What every command adapter shares: the configuration read once, the one-line error,
and a ``--password-file`` read before any switch to the service user."""

from __future__ import annotations

import argparse
from pathlib import Path

from mailfort import config as config_mod
from mailfort.config import Config


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
    switch, when there is one) and kept for the command."""
    text: str | None = getattr(args, "password_text", None)
    if text is None:
        text = Path(args.password_file).read_text(encoding="utf-8")
        args.password_text = text
    return text
