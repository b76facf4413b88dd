"""One 50 MB message to mailfort's MX: peak server RSS above idle, and stored completely?

    python bench/big_message.py              # 50 MB
    python bench/big_message.py --mb 10

The message (base64 lines of random data, CRLF, a unique X-Bench-Id header) is sent with
smtplib on 127.0.0.1. Peak RSS is the server's VmHWM after ``echo 5 > clear_refs`` (plus
a VmRSS sampler as a cross-check), measured from just before MAIL FROM to the 250.
"Stored completely" means: exactly one new file in alice's Maildir, which after the
trace headers mailfort prepends holds the sent message byte for byte (CRLF or LF form).
Target (issue 5): < 10 MB above idle. Loopback only.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import smtplib
import sys
import time
import uuid
from pathlib import Path

from mfproc import MailfortServer, PeakRSS, bench_tmpdir


def build_message(megabytes: int, tag: str) -> bytes:
    """A ``megabytes`` MB message in CRLF form."""
    head = (f"X-Bench-Id: {tag}\r\nFrom: bench@example.org\r\nTo: alice@example.test\r\n"
            f"Subject: big message bench\r\nMessage-ID: <{tag}@bench.test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n").encode()
    body = base64.encodebytes(os.urandom(megabytes * 1024 * 1024 * 3 // 4))
    return head + body.replace(b"\n", b"\r\n")


def check_stored(maildir: Path, sent: bytes, tag: str) -> tuple[bool, str]:
    """Is the sent message in ``maildir/new`` (or cur) exactly once, byte for byte?"""
    files = [f for sub in ("new", "cur") if (maildir / sub).exists()
             for f in (maildir / sub).iterdir()]
    marker = f"X-Bench-Id: {tag}".encode()
    hits = []
    for f in files:
        with open(f, "rb") as fh:
            start = fh.read(65536).find(marker)
        if start >= 0:
            hits.append((f, start))
    if len(hits) != 1:
        return False, f"{len(hits)} stored copies found ({len(files)} files in the Maildir)"
    f, start = hits[0]
    size = f.stat().st_size
    digest = hashlib.sha256()
    with open(f, "rb") as fh:
        fh.seek(start)
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    forms = {"CRLF": sent, "LF": sent.replace(b"\r\n", b"\n")}
    for name, form in forms.items():
        if hashlib.sha256(form).digest() == digest.digest():
            return True, (f"{size} bytes in {f.parent.name}/ = {start} bytes of trace headers "
                          f"+ {size - start} bytes = the {len(form)} bytes sent ({name} on disk)")
    return False, (f"{size} bytes in {f.parent.name}/, {size - start} after the trace headers, "
                   f"sent {len(sent)} (CRLF) / {len(forms['LF'])} (LF): content differs")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--port-base", type=int, default=13500)
    args = ap.parse_args()
    if not 1 <= args.mb <= 55:
        ap.error("--mb 1..55 (the benchmark config allows 60,000,000 bytes)")
    rows: list[str] = []
    with bench_tmpdir("mailfort-big-bench-") as tmp:
        mf = MailfortServer(Path(tmp), port_base=args.port_base)
        with mf:
            port = mf.ports["mx"]
            with smtplib.SMTP("127.0.0.1", port, timeout=120) as warm:  # load the code paths
                warm.sendmail("bench@example.org", ["alice@example.test"],
                              b"From: bench@example.org\r\nSubject: warm-up\r\n\r\n"
                              b"hello\r\n")
            tag = uuid.uuid4().hex
            msg = build_message(args.mb, tag)
            time.sleep(0.5)
            with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
                client.ehlo("client.bench.test")
                t0 = time.perf_counter()
                with PeakRSS(mf.pid) as peak:
                    refused = client.sendmail("bench@example.org", ["alice@example.test"], msg)
                secs = time.perf_counter() - t0
            if refused:
                raise RuntimeError(f"refused: {refused}")
            ok, detail = check_stored(mf.maildir("alice"), msg, tag)
            above = peak.above_idle_kb / 1024
            print(f"#   {len(msg)} bytes sent in {secs:.2f} s ({len(msg) / secs / 1e6:.0f} MB/s, "
                  f"until the 250); {peak.describe()}")
            print(f"#   stored: {detail}")
    rows.append(f"| one {args.mb} MB message received on the MX, server peak RSS above idle | "
                f"{above:.1f} MB | < 10 MB | {'OK' if above < 10 else 'OVER TARGET'} |")
    rows.append(f"| the {args.mb} MB message stored completely, once | "
                f"{'yes' if ok else 'NO'}: {detail} | byte for byte | "
                f"{'OK' if ok else 'FAILED'} |")
    print("| measure | mailfort | target | verdict |\n|---|---|---|---|")
    for r in rows:
        print(r)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
