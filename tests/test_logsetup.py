"""``[log]``: the text line's shape, and the per-record work a server does not need."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailfort import config as config_mod
from mailfort import logsetup

TEXT_FORMAT = "%(asctime)s %(name)s %(message)s"


def _record(created: float, msg: str = "accept: DATA from [192.0.2.1]") -> logging.LogRecord:
    record = logging.LogRecord("mailfort.decision", logging.INFO, __file__, 1, msg, None, None)
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    return record


def test_text_lines_are_the_standard_formatters() -> None:
    """The time stamp is formatted once a second and reused; the lines are the same as
    the standard library's Formatter writes, across second boundaries."""
    ours, stdlib = logsetup.TextFormatter(), logging.Formatter(TEXT_FORMAT)
    times = [1795879754.0, 1795879754.25, 1795879754.999, 1795879755.001, 1795879754.5,
             1795879999.123]
    for t in times:
        assert ours.format(_record(t)) == stdlib.format(_record(t))


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    flags = (logging._srcfile, logging.logThreads, logging.logProcesses,
             logging.logMultiprocessing)
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)
    (logging._srcfile, logging.logThreads, logging.logProcesses,
     logging.logMultiprocessing) = flags


def test_a_server_record_skips_what_no_line_shows(tmp_path: Path,
                                                   restored_logging: None) -> None:
    """Neither format shows the caller's file and line, the thread or the process, so a
    configured server does not look them up for every record (the logging HOWTO's
    optimisation switches); the lines still come out whole."""
    log_file = tmp_path / "mailfort.log"
    cfg = config_mod.from_dict({"server": {"data_dir": str(tmp_path)},
                                "log": {"file": str(log_file)}})
    logsetup.configure(cfg)
    logging.getLogger("mailfort.decision").info("connect from [%s] service=%s", "192.0.2.1",
                                                "mx")
    assert logging._srcfile is None
    assert not (logging.logThreads or logging.logProcesses or logging.logMultiprocessing)
    line = log_file.read_text().strip()
    assert line.endswith(" mailfort.decision connect from [192.0.2.1] service=mx")
