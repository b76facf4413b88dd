"""Where ``mailfort serve`` logs, and in what form (``[log]``).

To stderr by default (journald adds its own time stamps and priority), or to a file that
logrotate may move: the file is reopened when it has been moved or removed (checked at each
line) and on SIGUSR1 (``reopen``), so a rotation never loses lines nor writes into the old
file. ``json`` gives one object per line with the decision's fields (``extra={"fields":
...}`` from policy/decisionlog.py) next to the text. What is logged is decided elsewhere;
no password or message content is ever passed to a logger.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import logging.handlers
import os
import sys
import time
from typing import Any

from mailfort.config import Config

_OWNED = "_mailfort_handler"


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the decision fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if k not in out})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``<time> <logger> <message>``, the standard Formatter's line, with the local time
    stamp formatted once a second instead of for every record (two records per message)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s %(message)s")
        self._stamp = (-1, "")  # (second, its text), replaced whole

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second, text = self._stamp
        if second != int(record.created):
            second = int(record.created)
            text = time.strftime(self.default_time_format, self.converter(second))
            self._stamp = (second, text)
        return self.default_msec_format % (text, record.msecs)


class _LogFile(logging.handlers.WatchedFileHandler):
    """Never opens its file through a symlink: opened as root at start, the file may sit
    where the service user can plant one, and root would append to what it names."""

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                     | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)


def make_handler(cfg: Config) -> logging.Handler:
    handler: logging.Handler
    if cfg.log.file:
        # WatchedFileHandler reopens by itself when the file was moved or removed.
        handler = _LogFile(cfg.log.file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    if cfg.log.format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter())
    setattr(handler, _OWNED, True)
    return handler


def configure(cfg: Config) -> logging.Handler:
    """Replace the handlers this module installed before; returns the new one."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _OWNED, False):
            root.removeHandler(h)
            h.close()
    handler = make_handler(cfg)
    root.addHandler(handler)
    # No line shows the caller's file and line, the thread or the process: do not look them
    # up for every record (the switches of the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root.setLevel(getattr(logging, cfg.log.level.upper()))
    return handler


def reopen(handler: logging.Handler) -> None:
    """Close and open the log file again (SIGUSR1, after a rotation); no-op for stderr."""
    if isinstance(handler, logging.FileHandler):
        handler.acquire()
        try:
            if handler.stream is not None:
                handler.stream.close()
            handler.stream = handler._open()
            if isinstance(handler, logging.handlers.WatchedFileHandler):
                handler._statstream()
        finally:
            handler.release()
