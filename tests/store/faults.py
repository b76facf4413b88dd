"""A committer fault hook (``Committer.fault``) that acts at one flush of a test's choice."""

from __future__ import annotations

import threading


class AtFlush:
    """Counts the flushes (``calls``); the ``n``th one first waits for ``release`` (when
    given, ``held`` is set meanwhile), then fails with ``error`` (when given)."""

    def __init__(self, n: int, *, release: threading.Event | None = None,
                 error: OSError | None = None) -> None:
        self.n = n
        self.release = release
        self.error = error
        self.held = threading.Event()
        self.calls = 0

    def __call__(self, at: str) -> None:
        if at != "sync":
            return
        self.calls += 1
        if self.calls != self.n:
            return
        if self.release is not None:
            self.held.set()
            assert self.release.wait(10)
        if self.error is not None:
            raise self.error
