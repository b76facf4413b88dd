"""Where ``mailfort serve`` logs, and in what form (``[log]``).

To stderr by default (journald adds its own time stamps and priority), or to a file that
logrotate may move: the file is reopened when it has been moved or removed (checked at each
line) and on SIGUSR1 (``reopen``), so a rotation never loses lines nor writes into the old
file. ``json`` gives one object per line with the decision's fields (``extra={"fields":
...}`` from policy/decisionlog.py) next to the text. What is logged is decided elsewhere;
no password or message content is ever passed to a logger.

The lines that the event loop's thread logs during one pass of the loop are written
together at the end of that pass, in one ``write`` (``_Batching``): the MX logs two or three
lines per message (connect, sender-auth, accept), and with two workers appending to one
file or journald socket a ``write`` each was the larger half of a line's cost. A line is
still written before the loop waits for anything (the next pass polls without waiting); lines
of other threads, and of a process without a running loop, are written at once, after any
pending ones, so the order is kept. A process that ends flushes what is pending
(``logging.shutdown``, ``flush_all`` before ``os._exit``, and before a ``fork``), so only
a SIGKILL within that pass can lose a line: it would lose the process's sessions as well.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import logging.handlers
import os
import sys
import threading
import time
import weakref
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


class _Batching(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes the lines of one pass of the running event loop in one go (module docstring).

    ``emit`` runs under the handler's lock (``Handler.handle``), and so does the write of
    the pending lines: a line of another thread waits for them and follows them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: list[str] = []
        # The loop whose next pass writes them (another loop, e.g. after ``asyncio.run``
        # ended with the write still to come, schedules its own).
        self._scheduled: asyncio.AbstractEventLoop | None = None
        self._scheduled_thread = 0
        _BATCHING.add(self)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            loop = self._scheduled
            if (loop is not None and self._scheduled_thread == threading.get_ident()
                    and loop.is_running()):  # this thread's loop: its flush is to come
                self._pending.append(line)
                return
            # None outside a loop's thread (asks the kernel for the pid: not every line)
            loop = asyncio._get_running_loop()
            if loop is not None:
                self._pending.append(line)
                loop.call_soon(self.flush)
                self._scheduled, self._scheduled_thread = loop, threading.get_ident()
                return
            if self._pending:
                line = "".join(self._pending) + line
                self._pending.clear()
            self._write(line)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        """Write the pending lines (at the end of the loop's pass, or when asked)."""
        self.acquire()
        try:
            self._scheduled = None
            if self._pending:
                text = "".join(self._pending)
                self._pending.clear()
                self._write(text)
            elif self.stream is not None and hasattr(self.stream, "flush"):
                self.stream.flush()
        except Exception:  # a full disk must not end the loop's callback
            self.handleError(logging.makeLogRecord({"msg": "log write failed"}))
        finally:
            self.release()

    def _write(self, text: str) -> None:
        stream = self.stream
        stream.write(text)
        stream.flush()

    def close(self) -> None:
        self.flush()  # a handler replaced at a reload still writes what it was given
        super().close()


class _LogFile(_Batching, logging.handlers.WatchedFileHandler):
    """Never opens its file through a symlink: opened as root at start, the file may sit
    where the service user can plant one, and root would append to what it names."""

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                     | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)

    def _write(self, text: str) -> None:
        self.reopenIfNeeded()  # once per write, not once per line
        if self.stream is None:  # closed meanwhile (``close``): open again
            self.stream = self._open()
            self._statstream()
        super()._write(text)


_BATCHING: weakref.WeakSet[_Batching] = weakref.WeakSet()


def flush_all() -> None:
    """Write every handler's pending lines (before ``os._exit`` and a fork)."""
    for handler in list(_BATCHING):
        handler.flush()


os.register_at_fork(before=flush_all)  # a child must not write its parent's lines again


def make_handler(cfg: Config) -> logging.Handler:
    # WatchedFileHandler reopens by itself when the file was moved or removed.
    handler = _LogFile(cfg.log.file, encoding="utf-8") if cfg.log.file else _Batching(sys.stderr)
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
    handler.flush()  # what was logged before goes to the file it was logged for
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
