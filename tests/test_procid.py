"""The remembered process id is the kernel's, in a forked child too."""

from __future__ import annotations

import os

from mailfort import procid


def test_pid_is_the_processs_own_and_a_forked_childs_own() -> None:
    assert procid.pid() == os.getpid()
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # report what the child remembers, then leave without cleanup
        os.write(w, f"{procid.pid()} {os.getpid()}".encode())
        os._exit(0)
    os.close(w)
    remembered, actual = map(int, os.read(r, 100).split())
    os.close(r)
    os.waitpid(child, 0)
    assert remembered == actual == child != os.getpid()
