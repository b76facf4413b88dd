"""The decision log: the same lines and fields as ever, and no formatting when off."""

from __future__ import annotations

import logging

import pytest

from mailfort import metrics
from mailfort.policy import decisionlog
from mailfort.protocol.address import Mailbox
from mailfort.protocol.replies import Reply

QUEUED = Reply(250, "2.0.0", "OK queued as 1a2b")
REFUSED = Reply(550, "5.1.1", "No such user here")


class Spy:
    """A client-chosen value that notes each time it is turned into text."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.formatted = 0

    def __str__(self) -> str:
        self.formatted += 1
        return self.text


def _fields(record: logging.LogRecord) -> dict[str, object]:
    fields = getattr(record, "fields", None)
    assert isinstance(fields, dict)
    return fields


def test_accept_and_connect_lines_and_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mailfort.decision")
    decisionlog.connect("mx", "192.0.2.7")
    decisionlog.accept("192.0.2.7", QUEUED, Mailbox("a", "x.test"), 2, 420, tls="TLSv1.3")
    decisionlog.accept("192.0.2.7", QUEUED, "", 1, 9)
    assert [r.getMessage() for r in caplog.records] == [
        "connect from [192.0.2.7] service=mx",
        "accept: DATA from [192.0.2.7]: 250 2.0.0 OK queued as 1a2b; from=<a@x.test> "
        "nrcpt=2 size=420 tls=TLSv1.3",
        "accept: DATA from [192.0.2.7]: 250 2.0.0 OK queued as 1a2b; from=<> nrcpt=1 "
        "size=9 tls=none",
    ]
    assert [_fields(r) for r in caplog.records] == [
        {"event": "connect", "client": "192.0.2.7", "service": "mx"},
        {"event": "accept", "client": "192.0.2.7", "reply": "250 2.0.0 OK queued as 1a2b",
         "from": "a@x.test", "nrcpt": "2", "size": "420", "tls": "TLSv1.3"},
        {"event": "accept", "client": "192.0.2.7", "reply": "250 2.0.0 OK queued as 1a2b",
         "from": "", "nrcpt": "1", "size": "9", "tls": "none"},
    ]


def test_reject_line_and_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mailfort.decision")
    decisionlog.reject("RCPT", "192.0.2.7", REFUSED, from_="a@x.test", to="b]@y\x7f", helo=None)
    (record,) = caplog.records
    assert record.getMessage() == ("reject: RCPT from [192.0.2.7]: 550 5.1.1 No such user "
                                   "here; from=<a@x.test> to=<b?@y?>")
    assert _fields(record) == {"event": "reject", "client": "192.0.2.7", "stage": "RCPT",
                               "code": "550", "status": "5.1.1",
                               "reply": "550 5.1.1 No such user here", "from": "a@x.test",
                               "to": "b?@y?"}


def test_milter_line_and_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mailfort.decision")
    decisionlog.milter("192.0.2.7", "1a2b", "inet:127.0.0.1:11332", "reject",
                       "550 5.7.1 Gtube [pattern]\r\nX: y")
    decisionlog.milter("192.0.2.7", "1a2c", "unix:/run/m.sock", "accept")
    assert [r.getMessage() for r in caplog.records] == [
        "milter [192.0.2.7] id=1a2b filter=inet:127.0.0.1:11332 action=reject "
        "detail=<550 5.7.1 Gtube ?pattern???X: y>",
        "milter [192.0.2.7] id=1a2c filter=unix:/run/m.sock action=accept",
    ]
    assert _fields(caplog.records[1]) == {"event": "milter", "client": "192.0.2.7",
                                          "id": "1a2c", "filter": "unix:/run/m.sock",
                                          "action": "accept", "detail": ""}


def test_clean_keeps_unicode_and_folds_controls_and_brackets() -> None:
    assert decisionlog.clean("ünï [x]\t\x1b\x7f\x85") == "ünï ?x????\x85"
    assert decisionlog.clean(None) == ""
    assert decisionlog.clean(12) == "12"


def test_nothing_is_formatted_when_the_level_is_off(caplog: pytest.LogCaptureFixture) -> None:
    """Per message the MX logs a connect and an accept line: at a level that drops them,
    no client value is turned into text, and the metrics still count."""
    caplog.set_level(logging.WARNING, "mailfort.decision")
    sender, to, user = Spy("a@x.test"), Spy("b@y.test"), Spy("alice")
    before = metrics.ACCEPTED._value.get()
    decisionlog.connect("mx", "192.0.2.7")
    decisionlog.accept("192.0.2.7", QUEUED, sender, 1, 420)
    decisionlog.reject("RCPT", "192.0.2.7", REFUSED, from_=sender, to=to)
    decisionlog.auth_ok("192.0.2.7", user)  # type: ignore[arg-type]
    decisionlog.auth_failed("192.0.2.7", user)  # type: ignore[arg-type]
    assert caplog.records == []
    assert (sender.formatted, to.formatted, user.formatted) == (0, 0, 0)
    assert metrics.ACCEPTED._value.get() == before + 1
