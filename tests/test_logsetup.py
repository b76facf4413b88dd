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


class _Writes:
    """A text stream that keeps each ``write`` apart (the syscalls a real one makes)."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def _batching_handler(stream: _Writes) -> logging.Handler:
    cfg = config_mod.from_dict({})
    handler = logsetup.make_handler(cfg)
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)  # type: ignore[arg-type]
    return handler


def test_one_pass_of_the_loop_is_one_write_in_order(restored_logging: None) -> None:
    """The lines the loop's thread logs in one pass are written together when the pass
    ends (before the loop waits), in order; a line of another thread comes after them."""
    import asyncio
    import threading

    stream = _Writes()
    handler = _batching_handler(stream)
    log = logging.getLogger("mailfort.test.batch")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    async def main() -> None:
        for i in range(3):
            log.info("line %d", i)
        assert stream.writes == []  # still in this pass
        await asyncio.sleep(0)  # the next pass writes them
        assert [w.count("\n") for w in stream.writes] == [3]
        log.info("line 3")
        other = threading.Thread(target=log.info, args=("from another thread",))
        other.start()
        other.join()

    try:
        asyncio.run(main())
    finally:
        log.removeHandler(handler)
        log.propagate = True
    text = "".join(stream.writes)
    assert [line.rsplit(" ", 2)[-2:] for line in text.splitlines()] == [
        ["line", "0"], ["line", "1"], ["line", "2"], ["line", "3"], ["another", "thread"]]
    assert len(stream.writes) == 2  # the three lines, then line 3 with the thread's line


def test_a_line_of_the_last_pass_is_not_lost(tmp_path: Path, restored_logging: None) -> None:
    """A loop that stops right after a line (a worker ending: ``os._exit`` follows) leaves it
    pending; ``flush_all`` writes it, and a process forked meanwhile (which flushes as it
    ends) does not write it a second time."""
    import asyncio
    import os

    log_file = tmp_path / "mailfort.log"
    cfg = config_mod.from_dict({"server": {"data_dir": str(tmp_path)},
                                "log": {"file": str(log_file)}})
    logsetup.configure(cfg)
    loop = asyncio.new_event_loop()

    async def last_words() -> None:
        logging.getLogger("mailfort.test").info("the last line")

    loop.run_until_complete(last_words())
    loop.close()  # the pass that would have written it never comes
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child ends as a worker does
        logsetup.flush_all()
        os._exit(0)
    os.waitpid(pid, 0)
    logsetup.flush_all()
    assert log_file.read_text().count("the last line") == 1
