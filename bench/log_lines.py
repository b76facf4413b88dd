#!/usr/bin/env python3
"""CPU per MX decision-log line as ``mailfort serve`` writes it, in process.

The handler ``logsetup.configure`` installs (text format, to a file as the bench's stderr
is), the three lines an MX message logs (connect, sender-auth, accept), logged by the
event loop's thread in passes of ``--per-pass`` lines (about what two workers under the
50-session row log in one pass of their loops), timed with ``time.process_time``
(least of ``--runs``), in ``--processes`` processes at once appending to the one file (as
the two workers of a 2-core machine do). Run it with PYTHONPATH set to each version.

    PYTHONPATH=src python3 bench/log_lines.py [--lines 30000 --per-pass 8 --runs 5 \
        --processes 2]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from mailfort import config, logsetup
from mailfort.policy import decisionlog
from mailfort.protocol.replies import Reply


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=30000)
    ap.add_argument("--per-pass", type=int, default=8)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        cfg = config.from_dict({"server": {"data_dir": tmp},
                                "log": {"file": str(Path(tmp) / "mailfort.log")}})
        logsetup.configure(cfg)
        sa = logging.getLogger("mailfort.senderauth")
        reply = Reply(250, "2.0.0", ("OK queued as 1a2b3c",))

        def one_message() -> None:
            decisionlog.connect("mx", "127.0.0.1")
            sa.info("sender-auth [%s] from=<%s> spf.helo=none spf.mailfrom=pass dkim=none "
                    "dmarc=none(dis=none) from_domain=%s", "127.0.0.1", "bench@example.org",
                    "example.org")
            decisionlog.accept("127.0.0.1", reply, "bench@example.org", 1, 1300, "")

        async def run() -> float:
            messages = args.lines // 3
            per_pass = max(1, args.per_pass // 3)
            start = time.process_time()
            for _ in range(messages // per_pass):
                for _ in range(per_pass):
                    one_message()
                await asyncio.sleep(0)  # the end of a pass of the loop
            await asyncio.sleep(0)
            return (time.process_time() - start) / (messages // per_pass * per_pass * 3)

        children = []
        for _ in range(args.processes - 1):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # a second worker, logging at the same time
                best = min(asyncio.run(run()) for _ in range(args.runs))
                logging.shutdown()
                os.write(w, repr(best).encode())
                os._exit(0)
            os.close(w)
            children.append((pid, r))
        bests = [min(asyncio.run(run()) for _ in range(args.runs))]
        for pid, r in children:
            os.waitpid(pid, 0)
            with os.fdopen(r) as f:
                bests.append(float(f.read()))
        logging.shutdown()
    print(f"{sum(bests) / len(bests) * 1e6:.2f} us CPU per line, mean of {len(bests)} "
          f"processes ({args.per_pass} lines per pass)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
