"""Argon2's 19 MiB blocks are given back after each login, not kept by every arena."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from mailfort.server.malloc import fix_mmap_threshold

# Logins in threads, as the authenticator runs them; the growth of the resident set after
# the first round, when the threshold has had its chance to move.
_PROGRAM = textwrap.dedent("""
    import sys, threading
    from mailfort.passwords import DEFAULT_HASHER
    from mailfort.server.malloc import fix_mmap_threshold
    if sys.argv[1] == "fixed":
        assert fix_mmap_threshold()

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) * 1024

    def round_() -> None:
        ts = [threading.Thread(target=DEFAULT_HASHER.hash, args=("pw",)) for _ in range(4)]
        for t in ts: t.start()
        for t in ts: t.join()

    round_()
    before = rss()
    for _ in range(4):
        round_()
    print(rss() - before)
""")


def _growth(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROGRAM, mode], capture_output=True,
                         text=True, timeout=120, check=True)
    return int(out.stdout.strip())


def test_the_hash_memory_is_returned_once_the_threshold_is_fixed() -> None:
    if not fix_mmap_threshold():
        pytest.skip("no glibc mallopt here: the allocator's behaviour is another's")
    mib = 1 << 20
    kept = _growth("default")
    returned = _growth("fixed")
    # glibc's moving threshold keeps about one 19 MiB block per arena used by a thread
    assert kept >= 18 * mib, f"the default allocator kept only {kept / mib:.1f} MiB"
    assert returned < 8 * mib, f"{returned / mib:.1f} MiB kept with the threshold fixed"
