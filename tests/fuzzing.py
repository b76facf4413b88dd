"""How hard the property tests try: a few hundred examples in the suite, many more in
``bench/fuzz`` (which sets MAILFORT_FUZZ_FACTOR)."""

from __future__ import annotations

import os


def examples(default: int) -> int:
    return default * max(1, int(os.environ.get("MAILFORT_FUZZ_FACTOR", "1")))
