"""``mailfort serve`` and ``mailfort config check``: run the server, show the effective
settings (as TOML that loads again, or JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from mailfort import config as config_mod
from mailfort.cli.common import CLIError, config_of


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot render {type(v).__name__}")


def _toml_key(k: str) -> str:
    bare = k and all(c.isascii() and (c.isalnum() or c in "-_") for c in k)
    return k if bare else json.dumps(k)


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Render the effective settings as TOML (loadable again with tomllib)."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for k, v in data.items():
        if isinstance(v, dict) and (v or not prefix):
            tables.append((k, v))
        else:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    out = "\n".join(lines)
    for k, v in tables:
        name = f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k)
        inner = to_toml(v, name)
        block = f"[{name}]\n{inner}" if not inner.startswith("[") else inner
        if not v:
            block = f"[{name}]"
        out = f"{out}\n\n{block}" if out else block
    return out


def preflight(args: argparse.Namespace) -> config_mod.Config:
    """The configuration and serve's own checks (``config.preflight``), the same for
    ``serve`` and ``config check``: a refusal raises ConfigError (one line, exit 1); a
    warning is printed on stderr and does not stop either command (exit 0)."""
    cfg = config_of(args)
    for warning in config_mod.preflight(cfg):
        print(f"mailfort: warning: {warning}", file=sys.stderr, flush=True)
    return cfg


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = preflight(args)
    from mailfort.server.acceptor import BindError
    from mailfort.server.main import run

    # A reload reads the file again (config_of keeps the first reading).
    try:
        run(cfg, reload_config=lambda: config_mod.load(getattr(args, "config", None)))
    except BindError as exc:  # as the supervisor says it (server/supervisor.py)
        raise CLIError(f"cannot listen: {exc.strerror}") from None
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = preflight(args)
    eff = config_mod.effective(cfg)
    print(json.dumps(eff, indent=2) if args.json else to_toml(eff))
    return 0


def add_parser(sub: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    leaf(sub, "serve", cmd_serve, "run the mail server")

    cfg_p = sub.add_parser("config", help="configuration", allow_abbrev=False)
    cfg_sub = cfg_p.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = leaf(cfg_sub, "check", cmd_config_check, "validate and print effective settings")
    check.add_argument("--json", action="store_true", help="print JSON instead of TOML")
