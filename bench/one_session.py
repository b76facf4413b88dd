"""The one-session MX row's wall time per connection, step by step, as shipped.

    python bench/one_session.py [--messages 400] [--rounds 3] [--base /path/to/other/src]

Starts ``mailfort serve`` as a user runs it (bench/mfproc.py ``as_shipped``: two workers,
SPF/DKIM/DMARC on, the sender publishing SPF and DMARC on the loopback DNS server as in
``run_all.py --default-config``) and sends 1 KB messages one connection at a time, as
``smtp-source -s 1`` does, timing each reply from the client (bench/session_steps.py) and
the whole connection up to the server's close. With ``--base``, a second server runs that
source tree (e.g. ``git archive`` of the base commit) and the two alternate ``--rounds``
times: per-connection median wall time and CPU per message of each. ``--syscalls``: then
one more run of each with ``perf stat`` counting their system calls per message.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from cpu_per_message import count_syscalls  # noqa: E402
from mfproc import MailfortServer, bench_tmpdir  # noqa: E402
from session_steps import CLOSE, STEPS, one  # noqa: E402

from tests.dnsserver import DNSServer  # noqa: E402


def run(mf: MailfortServer, n: int) -> tuple[float, float, dict[str, float]]:
    """(median µs per connection, CPU µs per message, median µs per step)."""
    times: dict[str, list[float]] = {s: [] for s in (*STEPS, CLOSE)}
    walls = []
    cpu0 = mf.cpu_seconds()
    for _ in range(n):
        walls.append(one(mf.ports["mx"], "alice@example.test", times))
    cpu = (mf.cpu_seconds() - cpu0) / n * 1e6
    return (statistics.median(walls) * 1e6, cpu,
            {s: statistics.median(v) * 1e6 for s, v in times.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--base", help="a second source tree (its src/) to alternate with")
    ap.add_argument("--port-base", type=int, default=13700)
    ap.add_argument("--syscalls", action="store_true",
                    help="then one more run of each counting system calls (perf stat)")
    args = ap.parse_args()
    with bench_tmpdir("mailfort-one-") as tmp, contextlib.ExitStack() as stack:
        dns = stack.enter_context(DNSServer())
        dns.add_txt("example.org", "v=spf1 ip4:127.0.0.1 -all")
        dns.add_txt("_dmarc.example.org", "v=DMARC1; p=none")
        for name in ("this", "base"):
            (Path(tmp) / name).mkdir()
        servers = {"this": MailfortServer(Path(tmp) / "this", port_base=args.port_base,
                                          dns_port=dns.port, as_shipped=True,
                                          source=str(HERE.parent / "src"))}
        if args.base:
            servers["base"] = MailfortServer(Path(tmp) / "base",
                                             port_base=args.port_base + 100,
                                             dns_port=dns.port, as_shipped=True,
                                             source=args.base)
        for mf in servers.values():
            mf.start()
            stack.callback(mf.stop)
            run(mf, 50)  # warm up: imports, the SPF cache, the Maildir
        results: dict[str, list[tuple[float, float, dict[str, float]]]] = {
            k: [] for k in servers}
        for r in range(args.rounds):
            for name in (servers if r % 2 == 0 else reversed(list(servers))):
                res = run(servers[name], args.messages)
                results[name].append(res)
                print(f"round {r} {name:5s} {res[0]:7.0f} µs/connection "
                      f"{res[1]:6.0f} µs CPU/msg", flush=True)
        for name, rs in results.items():
            print(f"\n{name}: median per connection "
                  f"{statistics.median(x[0] for x in rs):.0f} µs, CPU/msg "
                  f"{statistics.median(x[1] for x in rs):.0f} µs")
            for step in (*STEPS, CLOSE):
                print(f"  {step:22s} {statistics.median(x[2][step] for x in rs):7.0f} µs")
        if args.syscalls:
            for name, mf in servers.items():
                counts = count_syscalls(mf.pid, lambda mf=mf: run(mf, args.messages))
                print(f"{name} system calls per message: " + ", ".join(
                    f"{c} {n / args.messages:.2f}" for c, n in counts.items() if n))


if __name__ == "__main__":
    main()
