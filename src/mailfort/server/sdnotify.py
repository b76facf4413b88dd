"""systemd readiness (``Type=notify``): READY=1 once listening, STOPPING=1 at shutdown.

The protocol is one datagram of ``KEY=VALUE`` lines to the unix socket named by
``$NOTIFY_SOCKET`` (a leading ``@`` is Linux's abstract namespace); no library needed.
The socket is connected when the notifier is made, before privileges are dropped, so the
later messages need no access to the socket's path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

log = logging.getLogger("mailfort")


class Notifier:
    """Sends to the service manager; does nothing when not started by one."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        self.sock: socket.socket | None = None
        path = env.get("NOTIFY_SOCKET", "")
        if not path:
            return
        address = "\0" + path[1:] if path.startswith("@") else path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            log.warning("NOTIFY_SOCKET %s: %s; no readiness notification", path, exc)
            return
        self.sock = sock
        # Children (e.g. a worker process) must not notify as if they were the service.
        os.environ.pop("NOTIFY_SOCKET", None)

    def notify(self, **fields: str) -> bool:
        """Send ``KEY=VALUE`` lines (``notify(READY="1", STATUS="...")``); True if sent."""
        if self.sock is None:
            return False
        text = "\n".join(f"{k}={v}" for k, v in fields.items())
        try:
            self.sock.send(text.encode())
        except OSError as exc:
            log.warning("service manager notification failed: %s", exc)
            return False
        return True

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
