#!/usr/bin/env python3
"""mailfort alone under senderauth_bench.py's signed row: CPU per message, and a profile.

Same keys, records and signed 1 KB messages as bench/senderauth_bench.py, sent the same way
(bench/smtp_load.py ``--message-dir``, a connection per message, 50 sessions) to ``mailfort
serve`` as shipped, with no Postfix and no milters (nothing to install; the DNS server on a
free port). ``--unsigned`` sends the same messages without their DKIM-Signature fields, From:
a domain with no records (about the as-shipped MX row's work); ``--both`` alternates the two
on one server and prints what a signed message costs more, pair by pair. CPU per message is
the serve process tree's; with ``--py-spy FILE`` the server and its workers are sampled
(py-spy ``record --subprocesses``, raw) during the last measurement of each kind, into
FILE.signed / FILE.unsigned, with a per-function summary (inclusive and own shares of the
busy samples) next to each.

    MAILFORT_BENCH_NO_WAIT=1 PYTHONPATH=src python3 bench/senderauth_profile.py --both \
        [--reps 3 --messages 2000] [--py-spy /tmp/sa] [--source OTHER/src]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from mfproc import MailfortServer, bench_tmpdir, cpu_seconds  # noqa: E402
from senderauth_bench import (  # noqa: E402
    RCPT,
    SENDER,
    make_keys,
    publish,
    signed_messages,
    wait_cpu_idle,
)

from tests.dnsserver import DNSServer  # noqa: E402


def strip_signatures(folder: Path, out: Path) -> None:
    """The messages without their (folded) DKIM-Signature fields, From: another domain."""
    out.mkdir()
    for p in sorted(folder.iterdir()):
        lines = p.read_bytes().split(b"\r\n")
        kept, skipping = [], False
        for line in lines:
            if line[:1] in (b" ", b"\t") and skipping:
                continue
            skipping = line.lower().startswith(b"dkim-signature:")
            if not skipping:
                kept.append(line.replace(b"@example.org", b"@unsigned.example"))
        (out / p.name).write_bytes(b"\r\n".join(kept))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--distinct", type=int, default=200)
    ap.add_argument("--unsigned", action="store_true")
    ap.add_argument("--both", action="store_true", help="signed and unsigned, alternating")
    ap.add_argument("--py-spy", default="", metavar="FILE")
    ap.add_argument("--port-base", type=int, default=16500)
    ap.add_argument("--source", default=None)
    args = ap.parse_args()
    rsa_pem, ed_seed, records = make_keys()
    with bench_tmpdir("mailfort-saprof-") as tmp, DNSServer().start() as dns:
        root = Path(tmp)
        publish(dns, records)
        folder = root / "signed"
        signed_messages(folder, args.distinct, 1024, rsa_pem, ed_seed)
        strip_signatures(folder, root / "unsigned")
        kinds = {"signed": (folder, SENDER),
                 "unsigned": (root / "unsigned", SENDER.replace("example.org",
                                                                "unsigned.example"))}
        if not args.both:
            kinds = {k: v for k, v in kinds.items() if (k == "unsigned") == args.unsigned}
        (root / "mf").mkdir()
        mf = MailfortServer(root / "mf", port_base=args.port_base, dns_port=dns.port,
                            as_shipped=True, source=args.source)
        mf.start()
        try:
            port = mf.ports["mx"]
            for folder, sender in kinds.values():
                load_as(port, folder, args.sessions, args.warmup, sender)
            results: dict[str, list[float]] = {k: [] for k in kinds}
            for rep in range(args.reps):
                for kind, (folder, sender) in kinds.items():
                    wait_cpu_idle(lambda: cpu_seconds(mf.pid))
                    spy = None
                    if args.py_spy and rep == args.reps - 1:
                        spy = subprocess.Popen(
                            ["py-spy", "record", "--subprocesses", "-r", "250", "-f", "raw",
                             "-o", f"{args.py_spy}.{kind}", "-p", str(mf.pid), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        time.sleep(1.0)
                    cpu0 = cpu_seconds(mf.pid)
                    secs = load_as(port, folder, args.sessions, args.messages, sender)
                    wait_cpu_idle(lambda: cpu_seconds(mf.pid))
                    us = (cpu_seconds(mf.pid) - cpu0) / args.messages * 1e6
                    results[kind].append(us)
                    print(f"rep {rep} {kind}: {args.messages / secs:.0f}/s, {us:.0f} µs CPU/msg",
                          flush=True)
                    if spy is not None:
                        spy.send_signal(2)
                        spy.wait(60)
            for kind, us_list in results.items():
                print(f"{kind}: median {statistics.median(us_list):.0f} µs CPU/msg "
                      f"({', '.join(f'{u:.0f}' for u in us_list)})")
            if len(results) == 2:
                diffs = [a - b for a, b in zip(results["signed"], results["unsigned"],
                                               strict=True)]
                print(f"signed - unsigned, per pair: median {statistics.median(diffs):.0f} µs "
                      f"({', '.join(f'{d:.0f}' for d in diffs)})")
            log = (root / "mf" / "serve.log").read_text(errors="replace").splitlines()
            print(next((line for line in reversed(log) if "sender-auth" in line), ""))
        finally:
            mf.stop()
    for kind in ("signed", "unsigned"):
        if args.py_spy and Path(f"{args.py_spy}.{kind}").exists():
            summarise(Path(f"{args.py_spy}.{kind}"))
    return 0


def load_as(port: int, folder: Path, sessions: int, n: int, sender: str) -> float:
    cmd = [sys.executable, str(HERE / "smtp_load.py"), "--port", str(port), "--sessions",
           str(sessions), "--messages", str(n), "--sender", sender, "--rcpt", RCPT,
           "--message-dir", str(folder)]
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True, timeout=900)
    return time.perf_counter() - start


def summarise(raw: Path) -> None:
    """Own and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if any("epoll" in f or "select (selectors" in f for f in frames[-2:]):
            continue  # idle
        total += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    out = raw.with_name(raw.name + ".summary")
    with out.open("w") as fh:
        fh.write(f"busy samples {total}\n\n# inclusive\n")
        for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[:80]:
            fh.write(f"{n / total:6.1%} {f}\n")
        fh.write("\n# own\n")
        for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:50]:
            fh.write(f"{n / total:6.1%} {f}\n")
    print(f"summary: {out}")


if __name__ == "__main__":
    sys.exit(main())
