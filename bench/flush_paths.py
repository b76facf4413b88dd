"""What making one accepted message durable costs on this file system, three ways.

    python bench/flush_paths.py [--messages 1500] [--dir /var/tmp]

For a lone sender the flush before the 250 is on the path of every message. Each way runs
``--messages`` times, interleaved, in a fresh directory under ``--dir`` (the file system the
bench servers use); median and deciles of the wall time, in µs:

* ``now``: what the committer does (store/maildir.py): a new spool file with the message, the
  link record written over in place, one ``syncfs``;
* ``log``: the message written into the next 4 KiB slot of a log file allocated and written
  once beforehand, then one ``fdatasync`` (no inode, directory or bitmap block changes);
* ``file``: a new file with the message and its own ``fdatasync`` (less than the committer
  needs: no record, no durable name).

A directory of thousands of files is removed at the end: run it again within a minute and
the file-creating ways pay ext4's scan past recently freed inodes (journal-less ext4,
RESULTS.md), the log does not.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from mailfort.store.syncfs import syncfs

MESSAGE = 1400  # bytes: the 1 KB rows' message with its trace fields
RECORD = 250  # bytes: a one-message link record
LOG_SIZE = 64 << 20
SLOT = 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1500)
    ap.add_argument("--dir", default=os.environ.get("MAILFORT_BENCH_DIR", "/var/tmp"))
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="flush-paths-"))
    message = os.urandom(MESSAGE)
    times: dict[str, list[float]] = {"now": [], "log": [], "file": []}
    try:
        record = root / "record"
        record.write_bytes(b"x" * RECORD)
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        log = root / "log"
        with open(log, "wb") as f:  # allocated and written once: overwrites change no block map
            f.write(b"\0" * LOG_SIZE)
            f.flush()
            os.fsync(f.fileno())
        log_fd = os.open(log, os.O_WRONLY)
        for i in range(args.messages):
            t0 = time.perf_counter()
            fd = os.open(root / f"spool{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, message)
            os.close(fd)
            fd = os.open(record, os.O_WRONLY)
            os.write(fd, os.urandom(RECORD))
            os.close(fd)
            syncfs(dir_fd)
            times["now"].append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            os.pwrite(log_fd, message, (i * SLOT) % LOG_SIZE)
            os.fdatasync(log_fd)
            times["log"].append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            fd = os.open(root / f"file{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, message)
            os.fdatasync(fd)
            os.close(fd)
            times["file"].append(time.perf_counter() - t0)
        os.close(log_fd)
        os.close(dir_fd)
    finally:
        shutil.rmtree(root)
    for name, values in times.items():
        us = sorted(v * 1e6 for v in values)
        print(f"{name:5s} median {statistics.median(us):6.0f} µs   p10 {us[len(us) // 10]:6.0f}"
              f"   p90 {us[9 * len(us) // 10]:6.0f}")


if __name__ == "__main__":
    main()
