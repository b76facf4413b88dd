"""MX 1 KB / 50 sessions with real sender authentication (issue 29, target 2).

    apt-get install -y postfix opendkim opendkim-tools opendmarc postfix-policyd-spf-python
    python bench/senderauth_bench.py                       # 5 alternating pairs per row
    python bench/senderauth_bench.py --pairs 1 --messages 500 --warmup 500   # a dry run
    python bench/senderauth_bench.py --setup               # apt-get install what is missing

Setup: the Debian packages above (``--setup`` installs the missing ones; the reference
Postfix comes from ../shared/anchors/postfix-reference.sh, run here if needed). Needs root:
a Postfix instance, the milters under their own users, a mount namespace, port 53.

The sender domain example.org publishes, on the tests' loopback DNS server
(tests/dnsserver.py, bound to 127.0.0.1:53 because the daemons' resolvers cannot be given
another port): SPF ``v=spf1 ip4:127.0.0.1 -all``, two DKIM keys (selector ``rsa``: RSA-2048,
selector ``ed``: Ed25519) and DMARC ``v=DMARC1; p=reject``. Before anything is timed,
``--distinct`` 1 KB messages From: bench@example.org are signed with both keys (dkimpy) and
written to a folder; the load (bench/smtp_load.py ``--message-dir``, each message its own
connection as ``smtp-source -c``) sends them in turn to every server, so every server gets
the same bytes. (smtp-source cannot send a signed message: it writes its own.) The load
generator is Python: each measurement prints how much of a core it used, near 100% means the
client, not the server, set the rate.

Servers:

- mailfort: ``mailfort serve`` as shipped (bench/mfproc.py ``as_shipped``: the README's
  defaults, SPF/DKIM/DMARC on, one worker per CPU), its resolver on that DNS server.
- Postfix + checks: a Postfix instance built from the reference's main.cf and master.cf in a
  temporary config directory (as bench/milter_bench.py; ../shared is not changed), with the
  checks added the way Debian's users add them: ``check_policy_service
  unix:private/policyd-spf`` (postfix-policyd-spf-python under ``spawn``), and ``opendkim``
  (verify mode) then ``opendmarc`` as milters on loopback ports of this script, each from a
  config file written here. Their resolver is the same DNS server: Postfix, policyd-spf,
  opendkim and opendmarc run in a mount namespace whose /etc/resolv.conf says
  ``nameserver 127.0.0.1`` (opendkim's libunbound is given it with ``Nameservers``; with a
  ``ResolverConfiguration`` file instead, opendkim re-read that valid file under load, failed
  to parse it ("newline inside quoted string") and exited after ~1,000 messages). Both
  milters run in the foreground under this script, and a measurement stops if one has died.
  The three skip mail from 127.0.0.1 by default (``skip_addresses``, ``InternalHosts``,
  ``IgnoreHosts``): the configs here name another address instead, so the checks run.
- Postfix bare: a second listener of the same instance without the policy service and
  the milters (the reference as it is).

Before the timed part one message goes to each checked server and the stored copy must
show the checks ran: mailfort's Authentication-Results with dkim=pass for both signatures,
spf=pass and dmarc=pass; Postfix's Received-SPF: Pass, opendkim's dkim=pass for both and
opendmarc's dmarc=pass. The script stops if not.

Each row: ``--pairs`` alternating pairs (Postfix first in even pairs), each measurement on
idle servers and a quiet disk, after an unmeasured warm-up; stored messages counted. CPU per
message: mailfort's process tree; Postfix's master with all its children (smtpd, cleanup,
virtual, the spawned policyd-spf...) up to the end of its deliveries, plus opendkim and
opendmarc for the checked instance (shown apart too). The DNS server runs in this process:
its queries per message are shown for each side.

Loopback only; every process and directory made here is removed at the end.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import email.utils
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from mfproc import (  # noqa: E402  (bench/ is not a package)
    BENCH_DIR,
    MailfortServer,
    bench_tmpdir,
    cpu_seconds,
    port_free,
    wait_disk_quiet,
    wait_freed_inodes,
    wait_port,
)

PACKAGES = ("postfix", "opendkim", "opendkim-tools", "opendmarc", "postfix-policyd-spf-python")
MF_BASE = 15500  # mailfort's port base (mfproc.OFFSETS)
PF_CHECKED_PORT, PF_BARE_PORT = 15825, 15826  # the bench Postfix's two smtpd listeners
OPENDKIM_PORT, OPENDMARC_PORT = 15891, 15893
AUTHSERV = "mx.bench.local"  # the reference's myhostname: the milters' authserv-id
NOT_US = "192.0.2.1"  # "internal"/ignored hosts of the milters: anything but 127.0.0.1
DOMAIN, SENDER, RCPT = "example.org", "bench@example.org", "alice@example.test"
LOAD_TIMEOUT = 900.0
ANCHORS = next((p for p in (HERE.parent.parent / "shared" / "anchors",
                            HERE.parent.parent.parent / "shared" / "anchors") if p.exists()),
               HERE.parent.parent / "shared" / "anchors")


def setup() -> None:
    """apt-get install the packages that are missing (Debian)."""
    missing = [p for p in PACKAGES if subprocess.run(
        ["dpkg", "-s", p], capture_output=True).returncode != 0]
    if missing:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


# ---------------------------------------------------------------- keys, records, messages

def make_keys() -> tuple[bytes, bytes, dict[str, str]]:
    """(RSA-2048 PEM, Ed25519 seed in base64, DKIM TXT records by selector)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_pem = rsa_key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    rsa_pub = rsa_key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    seed = ed_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    ed_pub = ed_key.public_key().public_bytes(serialization.Encoding.Raw,
                                             serialization.PublicFormat.Raw)
    records = {"rsa": f"v=DKIM1; k=rsa; p={base64.b64encode(rsa_pub).decode()}",
               "ed": f"v=DKIM1; k=ed25519; p={base64.b64encode(ed_pub).decode()}"}
    return rsa_pem, base64.b64encode(seed), records


def publish(dns: Any, records: dict[str, str]) -> None:
    dns.add_txt(DOMAIN, "v=spf1 ip4:127.0.0.1 -all", ttl=300)
    for selector, text in records.items():
        dns.add_txt(f"{selector}._domainkey.{DOMAIN}", text, ttl=300)
    dns.add_txt(f"_dmarc.{DOMAIN}", "v=DMARC1; p=reject", ttl=300)


def signed_messages(folder: Path, count: int, size: int, rsa_pem: bytes, ed_seed: bytes) -> None:
    """``count`` distinct messages of about ``size`` bytes, each signed with both keys."""
    import dkim

    folder.mkdir()
    line = b"x" * 78 + b"\r\n"
    for i in range(count):
        head = (f"From: Bench <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: bench {i}\r\n"
                f"Date: {email.utils.formatdate()}\r\n"
                f"Message-ID: <bench-{i}-{time.time_ns()}@{DOMAIN}>\r\n"
                "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n").encode()
        msg = head + line * (max(0, size - len(head)) // len(line) + 1)
        sigs = (dkim.sign(msg, b"ed", DOMAIN.encode(), ed_seed,
                          signature_algorithm=b"ed25519-sha256", linesep=b"\r\n")
                + dkim.sign(msg, b"rsa", DOMAIN.encode(), rsa_pem, linesep=b"\r\n"))
        (folder / f"{i:05d}.eml").write_bytes(sigs + msg)  # no line starts with "."


# ---------------------------------------------------------------- the daemons

# Run in a mount namespace of its own whose /etc/resolv.conf is the file given as $0: the
# machine's own resolver setting is left alone.
MOUNT_RESOLV = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'


def in_namespace(resolv: Path, *cmd: str) -> None:
    """Run ``cmd`` (a daemon that forks) in such a namespace."""
    subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    MOUNT_RESOLV, str(resolv), *cmd],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Milters:
    """opendkim (verify only) and opendmarc, configured here, on their loopback ports."""

    def __init__(self, root: Path, resolv: Path) -> None:
        self.root = root
        self.resolv = resolv
        ignore = root / "milter-ignore-hosts"
        ignore.write_text(f"{NOT_US}\n")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.dkim_conf = root / "opendkim.conf"
        self.dkim_conf.write_text(
            f"Syslog no\nMode v\nSocket inet:{OPENDKIM_PORT}@127.0.0.1\n"
            "UserID opendkim\n"
            f"AuthservID {AUTHSERV}\nInternalHosts {ignore}\nCanonicalization relaxed/simple\n"
            "Nameservers 127.0.0.1\n")
        psl = Path("/usr/share/publicsuffix/public_suffix_list.dat")
        self.dmarc_conf = root / "opendmarc.conf"
        self.dmarc_conf.write_text(
            f"Syslog false\nSocket inet:{OPENDMARC_PORT}@127.0.0.1\n"
            "UserID opendmarc\n"
            f"AuthservID {AUTHSERV}\nTrustedAuthservIDs {AUTHSERV}\nIgnoreHosts {ignore}\n"
            # SPF comes from policyd-spf's Received-SPF field, as in Debian's usual setup
            "SPFSelfValidate false\nRejectFailures false\n"
            + (f"PublicSuffixList {psl}\n" if psl.exists() else ""))

    def start(self) -> None:
        """Both in the foreground under this script (their exit status is known if one
        dies; nothing else would tell: they log to syslog only)."""
        for name, conf, flag in (("opendkim", self.dkim_conf, "-x"),
                                 ("opendmarc", self.dmarc_conf, "-c")):
            log = open(self.root / f"{name}.out", "wb")  # noqa: SIM115 (kept while it runs)
            self.procs[name] = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", MOUNT_RESOLV,
                 str(self.resolv), name, "-f", flag, str(conf)],
                stdout=log, stderr=subprocess.STDOUT)
            log.close()
        for port in (OPENDKIM_PORT, OPENDMARC_PORT):
            wait_port(port)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values() if p.poll() is None]

    def dead(self) -> list[str]:
        """The milters that have exited, with how."""
        return [f"{name} exited with {p.returncode}" for name, p in self.procs.items()
                if p.poll() is not None]

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class BenchPostfix:
    """A Postfix instance from the reference's main.cf and master.cf, in ``root``: one
    listener with SPF (policyd-spf), opendkim and opendmarc, one bare."""

    def __init__(self, root: Path, resolv: Path) -> None:
        self.root = root
        self.resolv = resolv
        self.conf = root / "pf-etc"
        self.queue = root / "pf-queue"
        self.mail = root / "pf-mail"
        ref = postconf_h("config_directory")
        ref_queue = postconf_h("queue_directory")
        self.conf.mkdir()
        shutil.copy(Path(ref, "main.cf"), self.conf / "main.cf")
        spf_conf = root / "policyd-spf.conf"
        # Debian's shipped settings, but without its skip_addresses (127.0.0.0/8...): the
        # load comes from 127.0.0.1, and the check must run.
        spf_conf.write_text("debugLevel = 1\nTestOnly = 1\nHELO_reject = Fail\n"
                            "Mail_From_reject = Fail\nPermError_reject = False\n"
                            f"TempError_Defer = False\nskip_addresses = {NOT_US}/32\n")
        lines = [ln for ln in Path(ref, "master.cf").read_text().splitlines()
                 if not ln.startswith("127.0.0.1:")]
        lines += [f"127.0.0.1:{PF_CHECKED_PORT} inet n - n - - smtpd"
                  " -o smtpd_recipient_restrictions=$senderauth_recipient_restrictions"
                  " -o smtpd_milters=$senderauth_milters",
                  f"127.0.0.1:{PF_BARE_PORT} inet n - n - - smtpd",
                  "policyd-spf unix - n n - 0 spawn",
                  f"  user=policyd-spf argv=/usr/bin/policyd-spf {spf_conf}"]
        (self.conf / "master.cf").write_text("\n".join(lines) + "\n")
        self.queue.mkdir()
        for sub in ("etc", "lib", "usr"):  # the chroot, as the reference's
            if Path(ref_queue, sub).is_dir():
                shutil.copytree(Path(ref_queue, sub), self.queue / sub, symlinks=True)
        if (self.queue / "etc").is_dir():
            shutil.copy(resolv, self.queue / "etc" / "resolv.conf")
        (root / "pf-data").mkdir()
        shutil.chown(root / "pf-data", "postfix", "postfix")
        (self.mail / "example.test").mkdir(parents=True)
        for path in (self.mail, self.mail / "example.test"):
            os.chown(path, 5000, 5000)  # vmail, as the reference's virtual_uid_maps
        self.postconf(
            f"queue_directory = {self.queue}", f"data_directory = {root / 'pf-data'}",
            f"virtual_mailbox_base = {self.mail}", f"maillog_file = {root / 'pf.log'}",
            "syslog_name = postfix-senderauthbench",
            "senderauth_recipient_restrictions = reject_unauth_destination, "
            "check_policy_service unix:private/policyd-spf",
            f"senderauth_milters = inet:127.0.0.1:{OPENDKIM_PORT}, "
            f"inet:127.0.0.1:{OPENDMARC_PORT}",
            "policyd-spf_time_limit = 3600", "smtpd_milters =", "non_smtpd_milters =",
            "milter_protocol = 6", "milter_default_action = tempfail")
        subprocess.run(["postfix", "-c", str(self.conf), "check"], check=True)

    def postconf(self, *settings: str) -> None:
        subprocess.run(["postconf", "-c", str(self.conf), "-e", *settings], check=True)

    def start(self) -> None:
        in_namespace(self.resolv, "postfix", "-c", str(self.conf), "start")
        for port in (PF_CHECKED_PORT, PF_BARE_PORT):
            wait_port(port)

    def pid(self) -> int | None:
        try:
            pid = int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if Path(f"/proc/{pid}").exists() else None

    def settle(self, timeout: float = 120.0) -> None:
        """Until its queue is empty: Postfix delivers what it accepted after the 250."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["postqueue", "-c", str(self.conf), "-p"],
                                 capture_output=True, text=True, timeout=30).stdout
            if "Mail queue is empty" in out:
                return
            time.sleep(0.2)
        print("# Postfix's queue not empty after 120 s", flush=True)

    def maildir_new(self) -> Path:
        return self.mail / "example.test" / "alice" / "new"

    def stop(self) -> None:
        pid = self.pid()
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)
        deadline = time.monotonic() + 20
        while pid is not None and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid is not None and Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def postconf_h(name: str) -> str:
    return subprocess.run(["postconf", "-h", name], capture_output=True, text=True,
                          check=True).stdout.strip()


# ---------------------------------------------------------------- measuring

def load(port: int, folder: Path, sessions: int, messages: int) -> float:
    """bench/smtp_load.py: the signed messages, a connection each; the seconds it took."""
    cmd = [sys.executable, str(HERE / "smtp_load.py"), "--port", str(port), "--sessions",
           str(sessions), "--messages", str(messages), "--sender", SENDER, "--rcpt", RCPT,
           "--message-dir", str(folder)]
    start = time.perf_counter()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=LOAD_TIMEOUT)
    if out.returncode != 0:
        print(f"#   load to port {port}: {out.stdout.strip()}", flush=True)
    return time.perf_counter() - start


def count_new(path: Path) -> int:
    return sum(1 for _ in path.iterdir()) if path.exists() else 0


def wait_cpu_idle(cpu: Callable[[], float], quiet: float = 0.5, timeout: float = 60.0) -> None:
    start = time.monotonic()
    last, since = cpu(), start
    while time.monotonic() - start < timeout:
        time.sleep(0.1)
        now = cpu()
        if now - last > 0.011:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


@dataclass
class Side:
    """One server on one listener."""

    name: str
    port: int
    pid: Callable[[], int | None]
    maildir_new: Path
    settle: Callable[[], None] | None = None
    extra_cpu: Callable[[], float] | None = None  # the milters, for Postfix + checks
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    extra_us: list[float] = field(default_factory=list)
    dns_q: list[float] = field(default_factory=list)
    client_share: list[float] = field(default_factory=list)  # the load generator's core
    stored_ok: bool = True

    def cpu(self) -> float:
        pid = self.pid()
        return ((cpu_seconds(pid) if pid else 0.0)
                + (self.extra_cpu() if self.extra_cpu else 0.0))

    def idle(self) -> None:
        if self.settle is not None:
            self.settle()
        wait_cpu_idle(self.cpu)

    def measure(self, folder: Path, sessions: int, n: int, dns: Any) -> str:
        pid = self.pid()
        q0, stored0 = len(dns.queries), count_new(self.maildir_new)
        cpu0 = cpu_seconds(pid) if pid else 0.0
        extra0 = self.extra_cpu() if self.extra_cpu else 0.0
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds = load(self.port, folder, sessions, n)
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.client_share.append((kids1.ru_utime + kids1.ru_stime - kids0.ru_utime
                                  - kids0.ru_stime) / seconds)
        if self.settle is not None:
            self.settle()
        cpu = cpu_seconds(pid) - cpu0 if pid else 0.0
        extra = self.extra_cpu() - extra0 if self.extra_cpu else 0.0
        stored = count_new(self.maildir_new) - stored0
        self.stored_ok = self.stored_ok and stored == n
        self.rates.append(n / seconds)
        self.cpu_us.append((cpu + extra) / n * 1e6)
        self.extra_us.append(extra / n * 1e6)
        self.dns_q.append((len(dns.queries) - q0) / n)
        milters = f" (milters {self.extra_us[-1]:.0f})" if self.extra_cpu else ""
        return (f"{self.name} {self.rates[-1]:.0f}/s stored {stored}/{n}, "
                f"{self.cpu_us[-1]:.0f} µs CPU/msg{milters}, DNS {self.dns_q[-1]:.2f} q/msg, "
                f"load generator {self.client_share[-1]:.0%} of a core")


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def row(label: str, ours: Side, ref: Side, sides: list[Side], folder: Path, pairs: int,
        sessions: int, n: int, dns: Any, need: float, check: Callable[[], None]) -> list[str]:
    """``pairs`` alternating measurements of ``ref`` and ``ours``; the table row."""
    for values in (ours.rates, ours.cpu_us, ours.extra_us, ours.dns_q, ours.client_share):
        values.clear()
    for pair in range(pairs):
        line = []
        for side in (ref, ours) if pair % 2 == 0 else (ours, ref):
            for s in sides:
                s.idle()
            wait_disk_quiet(BENCH_DIR, timeout=60)
            line.append(side.measure(folder, sessions, n, dns))
            check()
        print(f"# {label}, pair {pair + 1}: " + "; ".join(line)
              + f" ({ours.rates[-1] / ref.rates[-1]:.2f}×)", flush=True)
    ratios = sorted(o / r for o, r in zip(ours.rates, ref.rates, strict=True))
    ok = ("stored==sent" if ours.stored_ok and ref.stored_ok
          else f"**STORED != SENT** (mailfort {ours.stored_ok}, {ref.name} {ref.stored_ok})")
    milters = f" (opendkim+opendmarc {med(ref.extra_us):.0f})" if ref.extra_cpu else ""
    reference = (f"{ref.name} {med(ref.rates):.0f}/s, {med(ref.cpu_us):.0f} µs CPU/msg"
                 f"{milters}, DNS {med(ref.dns_q):.2f} q/msg")
    mine = (f"{med(ours.rates):.0f}/s (median {med(ratios):.2f}×, range {ratios[0]:.2f}–"
            f"{ratios[-1]:.2f}× over {pairs} pairs), {med(ours.cpu_us):.0f} µs CPU/msg, "
            f"DNS {med(ours.dns_q):.2f} q/msg, {ok}")
    goal = f"median ≥ {need}×" + (" met" if med(ratios) >= need else " **not met**")
    return ["| " + " | ".join((label, reference, mine, goal)) + " |"]


# ---------------------------------------------------------------- the checks really ran

def header_section(path: Path) -> str:
    raw = path.read_bytes()
    return raw[: raw.find(b"\r\n\r\n") if b"\r\n\r\n" in raw else raw.find(b"\n\n")].decode(
        errors="replace")


def unfolded_fields(head: str, name: str) -> list[str]:
    """The values of the header fields called ``name``, unfolded."""
    out: list[str] = []
    current: str | None = None
    for line in head.replace("\r\n", "\n").split("\n"):
        if line[:1] in (" ", "\t"):
            if current is not None:
                current += " " + line.strip()
            continue
        if current is not None:
            out.append(current)
        current = (line.split(":", 1)[1].strip()
                   if line.lower().startswith(name.lower() + ":") else None)
    if current is not None:
        out.append(current)
    return out


def newest(folder: Path, before: set[str], timeout: float = 30.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [p for p in folder.iterdir() if p.name not in before] if folder.exists() else []
        if new:
            return new[0]
        time.sleep(0.1)
    raise SystemExit(f"nothing stored in {folder} within {timeout:.0f} s")


def checks_ran(side: Side, folder: Path, postfix: bool) -> list[str]:
    """Send one signed message; what the stored copy shows, and what is missing."""
    before = {p.name for p in side.maildir_new.iterdir()} if side.maildir_new.exists() else set()
    load(side.port, folder, 1, 1)
    if side.settle is not None:
        side.settle()
    head = header_section(newest(side.maildir_new, before))
    ar = " ; ".join(unfolded_fields(head, "Authentication-Results"))
    need = ["dkim=pass", "header.a=rsa-sha256", "header.a=ed25519-sha256", "dmarc=pass"]
    missing = [w for w in need if w not in ar]
    if ar.count("dkim=pass") < 2:
        missing.append("two dkim=pass")
    if postfix:
        spf = " ".join(unfolded_fields(head, "Received-SPF"))
        if not spf.lower().startswith("pass"):
            missing.append("Received-SPF: Pass")
        shown = f"Received-SPF: {spf[:60]}; Authentication-Results: {ar}"
    else:
        if "spf=pass" not in ar:
            missing.append("spf=pass")
        shown = f"Authentication-Results: {ar}"
    print(f"# {side.name}: {shown}", flush=True)
    return missing


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--messages", type=int, default=2000, help="per measurement")
    ap.add_argument("--warmup", type=int, default=2000, help="per server, unmeasured")
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--distinct", type=int, default=200, help="signed messages, sent in turn")
    ap.add_argument("--source", default=None, metavar="SRC",
                    help="run mailfort from this src directory (another checkout)")
    ap.add_argument("--setup", action="store_true", help="apt-get install the packages, exit")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (a Postfix instance, the milters' users, port 53)", file=sys.stderr)
        return 2
    if args.setup:
        setup()
        return 0
    if not 1 <= args.pairs <= 20 or not 1 <= args.messages <= 100_000:
        ap.error("--pairs 1..20, --messages 1..100000")
    for tool in ("opendkim", "opendmarc", "unshare"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: python bench/senderauth_bench.py --setup",
                  file=sys.stderr)
            return 2
    if not Path("/usr/bin/policyd-spf").exists():
        print("policyd-spf not found: python bench/senderauth_bench.py --setup", file=sys.stderr)
        return 2
    if shutil.which("postfix") is None or not Path("/etc/postfix/vmailbox").exists():
        subprocess.run(["bash", str(ANCHORS / "postfix-reference.sh"), "start"], check=True)
    ports = (PF_CHECKED_PORT, PF_BARE_PORT, OPENDKIM_PORT, OPENDMARC_PORT, 53)
    busy = [p for p in ports if not port_free(p)]
    if busy:
        print(f"ports in use: {busy}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on a kill too
    la = os.getloadavg()
    print(f"# start {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average "
          f"{la[0]:.2f} {la[1]:.2f} {la[2]:.2f}", flush=True)
    wait_freed_inodes()
    lines: list[str] = []
    with bench_tmpdir("mailfort-senderauth-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        os.chmod(root, 0o755)  # Postfix's, policyd-spf's and the milters' users read below it
        from tests.dnsserver import DNSServer

        dns = stack.enter_context(DNSServer(port=53))
        rsa_pem, ed_seed, records = make_keys()
        publish(dns, records)
        folder = root / "messages"
        t0 = time.monotonic()
        signed_messages(folder, args.distinct, args.size, rsa_pem, ed_seed)
        print(f"# signed {args.distinct} messages with RSA-2048 and Ed25519 in "
              f"{time.monotonic() - t0:.1f} s (not timed)", flush=True)
        resolv = root / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:1\n")
        milters = Milters(root, resolv)
        stack.callback(milters.stop)
        milters.start()
        pf = BenchPostfix(root, resolv)
        stack.callback(pf.stop)
        pf.start()
        (root / "mf").mkdir()
        mf = MailfortServer(root / "mf", port_base=MF_BASE, dns_port=53, as_shipped=True,
                            source=args.source)
        stack.callback(mf.stop)
        mf.start()
        ours = Side("mailfort", mf.ports["mx"], lambda: mf.pid, mf.maildir("alice") / "new")
        checked = Side("Postfix+policyd-spf+opendkim+opendmarc", PF_CHECKED_PORT, pf.pid,
                       pf.maildir_new(), pf.settle, milters.cpu)
        bare = Side("Postfix bare", PF_BARE_PORT, pf.pid, pf.maildir_new(), pf.settle)
        sides = [ours, checked, bare]
        missing = {s.name: checks_ran(s, folder, s is checked) for s in (ours, checked)}
        if any(missing.values()):
            for name, what in missing.items():
                if what:
                    print(f"{name}: the checks did not all run: missing {', '.join(what)}",
                          file=sys.stderr)
            print(f"mailfort log:\n{mf.log_tail()}", file=sys.stderr)
            return 1
        def check() -> None:
            """A milter that died makes Postfix refuse (tempfail) or skip the checks: stop."""
            if milters.dead():
                said = " ".join((root / f"{m}.out").read_text(errors="replace")[-300:]
                                for m in ("opendkim", "opendmarc"))
                raise SystemExit(f"stopped: {'; '.join(milters.dead())}; their output: {said}")

        for side in sides:  # warm-up, unmeasured
            side.idle()
            wait_disk_quiet(BENCH_DIR, timeout=60)
            load(side.port, folder, args.sessions, args.warmup)
            if side.settle is not None:
                side.settle()
            check()
        label = f"MX {args.size // 1024} KB, {args.sessions} sessions, SPF+DKIM+DMARC"
        lines += row(f"{label}, vs Postfix with the same checks", ours, checked, sides,
                     folder, args.pairs, args.sessions, args.messages, dns, 2.0, check)
        lines += row(f"{label}, vs bare Postfix", ours, bare, sides, folder, args.pairs,
                     args.sessions, args.messages, dns, 1.5, check)
    la = os.getloadavg()
    versions = {t: subprocess.run([t, "-V"], capture_output=True, text=True).stdout.split("\n")[0]
                for t in ("opendkim", "opendmarc")}
    print(f"machine: {os.cpu_count()} cores; Postfix {postconf_h('mail_version')}; "
          f"{versions['opendkim']}; {versions['opendmarc']}; mailfort as shipped; "
          f"{args.messages} messages per measurement, {args.distinct} distinct signed ones; "
          f"load average at end {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")
    print("| measure | reference | mailfort | target |\n|---|---|---|---|")
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
