"""This process's id, asked of the kernel once (and again in a forked child).

Asked per message otherwise (Maildir names, the metrics of each worker process): a system
call each time for a number that changes only across ``fork``.
"""

from __future__ import annotations

import os

_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


def pid() -> int:
    return _pid[0]
