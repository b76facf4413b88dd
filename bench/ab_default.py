"""Two as-shipped mailfort servers side by side, measured in turn: rate and CPU per message.

    python bench/ab_default.py before=/path/to/old/src after=src --reps 8 --messages 3000
    python bench/ab_default.py on=src 'off=src+[sender_auth]\\nenabled = false' --reps 6

Each variant is ``label=SRC`` (mailfort from that ``src`` directory) with optional
``+TOML`` appended to its configuration (``\\n`` for a new line). Both run at once, as the
README ships them (``mfproc.MailfortServer(as_shipped=True)``: sender authentication on, one
worker per CPU), their resolver on the tests' loopback DNS server where the sender domain
example.org publishes SPF and DMARC, as in ``run_all.py --default-config``. After a warm-up
of each, ``--reps`` rounds load each in turn (the order alternating) with Postfix's
``smtp-source -c -l 1024 -s SESSIONS``; CPU per message is the process tree's from /proc,
which, unlike a rate, hardly moves with the machine's other load.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from mfproc import BENCH_DIR, MailfortServer, cpu_seconds, wait_disk_quiet  # noqa: E402

from tests.dnsserver import DNSServer  # noqa: E402


def load(port: int, n: int, sessions: int) -> float:
    start = time.perf_counter()
    subprocess.run(["smtp-source", "-c", "-l", "1024", "-m", str(n), "-s", str(sessions),
                    "-f", "bench@example.org", "-t", "alice@example.test", f"127.0.0.1:{port}"],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("variant", nargs="+", help="label=SRC[+TOML]")
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3000)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--port-base", type=int, default=16000)
    a = ap.parse_args()
    servers: list[tuple[str, MailfortServer, list[float], list[float]]] = []
    with DNSServer() as dns, tempfile.TemporaryDirectory(prefix="mfab-", dir=BENCH_DIR) as tmp:
        dns.add_txt("example.org", "v=spf1 ip4:127.0.0.1 -all")
        dns.add_txt("_dmarc.example.org", "v=DMARC1; p=none")
        try:
            for i, v in enumerate(a.variant):
                label, _, rest = v.partition("=")
                src, _, extra = rest.partition("+")
                root = Path(tmp) / label
                root.mkdir()
                mf = MailfortServer(root, port_base=a.port_base + 200 * i, dns_port=dns.port,
                                    as_shipped=True, source=src)
                if extra:
                    with mf.config.open("a") as f:
                        f.write(extra.replace("\\n", "\n") + "\n")
                servers.append((label, mf, [], []))
                mf.start()
            for _, mf, _, _ in servers:
                load(mf.ports["mx"], a.warmup, a.sessions)
            for rep in range(a.reps):
                for label, mf, rates, cpus in servers if rep % 2 == 0 else servers[::-1]:
                    wait_disk_quiet(BENCH_DIR, timeout=10)
                    before = cpu_seconds(mf.pid)
                    seconds = load(mf.ports["mx"], a.messages, a.sessions)
                    time.sleep(0.3)  # the last 250s' log lines and flush
                    cpus.append((cpu_seconds(mf.pid) - before) / a.messages * 1e6)
                    rates.append(a.messages / seconds)
                    print(f"# rep {rep + 1} {label}: {rates[-1]:.0f}/s "
                          f"{cpus[-1]:.0f} µs CPU/msg", flush=True)
        finally:
            for _, mf, _, _ in servers:
                mf.stop()
    for label, _, rates, cpus in servers:
        print(f"{label}: rate median {statistics.median(rates):.0f}/s "
              f"({min(rates):.0f}–{max(rates):.0f}), CPU/msg median "
              f"{statistics.median(cpus):.0f} µs ({min(cpus):.0f}–{max(cpus):.0f})")
    if len(servers) == 2:
        r = sorted(x / y for x, y in zip(servers[1][2], servers[0][2], strict=True))
        print(f"{servers[1][0]}/{servers[0][0]} rate ratio median {statistics.median(r):.2f} "
              f"({r[0]:.2f}–{r[-1]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
