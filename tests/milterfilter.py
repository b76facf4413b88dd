"""A milter for the tests, written with pymilter (Python over Sendmail's own libmilter, the
filter side that rspamd's and clamav-milter's MTAs are built to talk to), run as a process.

Why pymilter: of the Python filter libraries, pymilter wraps the reference libmilter, so the
packets our client reads are those of the filters people run; ``kilter.service`` (asyncio,
pure Python) is marked "planning" and pulls in anyio. A well-behaved library never sends a
malformed packet or drops a connection halfway: those two filters are in the tests
themselves, over the codec of protocol/milter.py.

What it does is chosen by the message's Subject, ``milter: ACTION[,ACTION...]``, at end of
message: headers, body, rcpt (add bob, delete alice, add an outsider), sender, quarantine,
tempfail, reject, discard, slow (sleeps before answering), macros (reports them in a header).
``python3 tests/milterfilter.py PORT`` serves on 127.0.0.1:PORT.

``python3 tests/milterfilter.py PORT noreply`` serves a second filter, shaped as rspamd
negotiates (no reply to CONNECT, MAIL, RCPT and the headers; no HELO, DATA, EOH or body at
all; its word only at end of message, CONTINUE): it adds ``X-Seen-By: noreply-filter;
subject=…; client=…`` so that a test sees it got each message's headers and client.

``python3 tests/milterfilter.py PORT gtube`` serves a spam filter in miniature: it reads the
body and refuses a message whose body holds the GTUBE line (``554 5.7.1``, with its own
text), as rspamd and SpamAssassin do; ``mailfort audit``'s content check is tested on it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
SKIP_REASON = ("pymilter not installed (pip install pymilter, which needs Debian's "
               "libmilter-dev; run-tests installs both as root): the test milter uses it")


def serve(port: int, kind: str = "") -> None:
    import Milter

    class TestFilter(Milter.Base):  # type: ignore[misc]
        def __init__(self) -> None:
            self.subject = ""
            self.seen: dict[str, str] = {}
            self.rcpts: list[str] = []

        def connect(self, hostname: str, family: int, hostaddr: object) -> int:
            self.seen["hostname"] = hostname
            for name in ("j", "{client_addr}", "{daemon_name}", "{client_name}"):
                self.seen[name] = self.getsymval(name) or ""
            return Milter.CONTINUE

        def envfrom(self, sender: str, *params: str) -> int:
            self.seen["from"] = sender
            for name in ("i", "{mail_addr}", "{auth_authen}"):
                self.seen[name] = self.getsymval(name) or ""
            return Milter.CONTINUE

        def envrcpt(self, rcpt: str, *params: str) -> int:
            self.rcpts.append(f"{rcpt}={self.getsymval('{rcpt_addr}')}")
            return Milter.CONTINUE

        def header(self, name: str, value: str) -> int:
            if name.lower() == "subject":
                self.subject = value
            return Milter.CONTINUE

        def eom(self) -> int:
            actions = self.subject.partition("milter:")[2].replace(" ", "").split(",")
            if "slow" in actions:
                time.sleep(3)
            if "macros" in actions:
                report = "; ".join(f"{k}={v}" for k, v in sorted(self.seen.items()))
                self.addheader("X-Macros", report + "; rcpts=" + " ".join(self.rcpts))
            if "headers" in actions:
                self.addheader("X-Filter", "seen")
                self.addheader("X-Top", "inserted", 1)
                self.chgheader("Subject", 1, "[filtered] " + self.subject)
                self.chgheader("X-Remove-Me", 1, "")
                self.addheader("Authentication-Results", "mx.example.test; dkim=pass")
                self.addheader("Authentication-Results", "filter.example; spf=pass")
            if "body" in actions:
                self.replacebody(b"The filter replaced this body.\r\n")
            if "rcpt" in actions:
                self.addrcpt("<bob@example.test>")
                self.addrcpt("<victim@elsewhere.test>")
                self.delrcpt("<alice@example.test>")
            if "sender" in actions:
                self.chgfrom("<bounces@example.test>")
            if "quarantine" in actions:
                self.quarantine("looks like a phish")
            if "tempfail" in actions:
                self.setreply("451", "4.7.1", "Busy scanning, come back later")
                return Milter.TEMPFAIL
            if "reject" in actions:
                self.setreply("554", "5.7.1", "Refused by the test filter", "second line")
                return Milter.REJECT
            if "discard" in actions:
                return Milter.DISCARD
            return Milter.CONTINUE

    class NoReplyFilter(Milter.Base):  # type: ignore[misc]
        def __init__(self) -> None:
            self.subject = self.client = ""

        @Milter.noreply
        def connect(self, hostname: str, family: int, hostaddr: object) -> int:
            self.client = self.getsymval("{client_addr}") or ""
            return Milter.CONTINUE

        @Milter.noreply
        def envfrom(self, sender: str, *params: str) -> int:
            return Milter.CONTINUE

        @Milter.noreply
        def envrcpt(self, rcpt: str, *params: str) -> int:
            return Milter.CONTINUE

        @Milter.noreply
        def header(self, name: str, value: str) -> int:
            if name.lower() == "subject":
                self.subject = value
            return Milter.CONTINUE

        def eom(self) -> int:
            self.addheader("X-Seen-By",
                           f"noreply-filter; subject={self.subject}; client={self.client}")
            return Milter.CONTINUE

    class GtubeFilter(Milter.Base):  # type: ignore[misc]
        def __init__(self) -> None:
            self.body_seen = b""

        def envfrom(self, sender: str, *params: str) -> int:
            self.body_seen = b""  # a new message on the same connection
            return Milter.CONTINUE

        def body(self, chunk: bytes) -> int:
            self.body_seen += chunk
            return Milter.CONTINUE

        def eom(self) -> int:
            if GTUBE in self.body_seen:
                self.setreply("554", "5.7.1", "Spam refused by the test filter (GTUBE)")
                return Milter.REJECT
            return Milter.CONTINUE

    Milter.factory = {"noreply": NoReplyFilter, "gtube": GtubeFilter}.get(kind, TestFilter)
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.CHGBODY | Milter.ADDRCPT
                     | Milter.DELRCPT | Milter.QUARANTINE | Milter.CHGFROM)
    Milter.runmilter("mailfort-test", f"inet:{port}@127.0.0.1", 60)


class FilterProcess:
    """The filter above in a process of its own on a free loopback port."""

    def __init__(self, kind: str = "") -> None:
        self.kind = kind
        try:
            import Milter  # noqa: F401
        except ImportError:
            pytest.skip(SKIP_REASON)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def start(self) -> FilterProcess:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.proc = subprocess.Popen([sys.executable or shutil.which("python3") or "python3",
                                      str(Path(__file__)), str(self.port), self.kind],
                                     env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("the test milter did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # libmilter's threads: no clean exit
            self.proc.wait(5)
        self.proc = None


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "")
