"""``envelope_of_header`` on imap_bench's 2,000 headers, ``_string`` as before (a regex and
two scans) and as now (``isascii`` and one ``translate``), ten alternating bursts in one
process (fastest of 3 per burst), µs per header.

    PYTHONPATH=src:bench python3 bench/imap_envelope_micro.py
"""

from __future__ import annotations

import statistics
import timeit

from imap_bench import message

import mailfort.protocol.imap_message as im


def old_string(value: bytes) -> bytes:
    """``_string`` before 2026-12-08 (s5-imap-fetch)."""
    if len(value) <= im.QUOTED_MAX and im._UNQUOTABLE.search(value) is None:
        if b"\\" in value or b'"' in value:
            value = value.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
        return b'"' + value + b'"'
    return b"{%d}\r\n" % len(value) + value


def main() -> int:
    new_string = im._string
    headers = []
    for i in range(2000):
        wire = im.to_wire(message(i, 1024))
        headers.append(wire[:wire.find(b"\r\n\r\n") + 4])
    res: dict[str, list[float]] = {"old": [], "new": []}
    try:
        for _ in range(10):
            for name, fn in (("old", old_string), ("new", new_string)):
                im._string = fn
                best = min(timeit.repeat(lambda: [im.envelope_of_header(h) for h in headers],
                                         number=1, repeat=3))
                res[name].append(best / len(headers) * 1e6)
    finally:
        im._string = new_string
    for name, v in res.items():
        print(f"{name}: envelope_of_header {statistics.median(v):.2f} µs "
              f"({min(v):.2f}–{max(v):.2f}), 10 bursts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
