"""Domains, users, aliases and password hashes behind the ``Directory`` interface."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailfort.config import Config
    from mailfort.directory.postgresql import PostgreSQLDirectory
    from mailfort.directory.sqlite import SQLiteDirectory

DIRECTORY_FILE = "directory.sqlite3"


def open_directory(cfg: Config) -> SQLiteDirectory | PostgreSQLDirectory:
    """The configured directory: the embedded one at ``<data_dir>/directory.sqlite3``
    (data_dir made 0700), or the shared PostgreSQL one (its schema must be current)."""
    if cfg.directory.backend == "postgresql":
        from mailfort.directory.postgresql import PostgreSQLDirectory

        return PostgreSQLDirectory.from_config(cfg.directory)
    from mailfort.directory.sqlite import SQLiteDirectory

    cfg.data_path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return SQLiteDirectory(os.path.join(cfg.data_path, DIRECTORY_FILE))
