"""SMTP replies with enhanced status codes (RFC 5321 §4.2, RFC 3463).

Every reply mailfort sends carries an enhanced code; a multi-line reply is encoded into
one bytes object so the server writes it in one go.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str  # "2.1.0"; empty only for the greeting (220) and 221-less edge cases
    text: str | tuple[str, ...] = ""

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def lines(self) -> tuple[str, ...]:
        return (self.text,) if isinstance(self.text, str) else self.text

    def encode(self) -> bytes:
        lines = self.lines or ("",)
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = []
        last = len(lines) - 1
        for i, line in enumerate(lines):
            sep = " " if i == last else "-"
            out.append(f"{self.code}{sep}{prefix}{line}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8")


# Replies shared by several modules.
OK = Reply(250, "2.0.0", "OK")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
SYNTAX_ERROR = Reply(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
TEMP_LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")
