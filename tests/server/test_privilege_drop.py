"""Issue 24, item 1: the service user cannot make root write, delete or change anything
outside the data directory.

Started as root with ``server.user``, the data directory is that user's: whatever it
plants there (a spool file with a link record naming a path through a symlink, symlinks
where the server's own directories and files should be) is met at the next start. These
tests do what a compromised service account would: start a real ``mailfort serve`` as
root once, plant as ``nobody`` (a forked process that switched to it), restart as root,
and compare everything outside the data directory, byte for byte and mode for mode, with
what it was; the server must still start and serve. They are skipped, with the reason,
when the tests do not run as root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import shutil
import smtplib
import stat
import zlib
from pathlib import Path

import pytest

from mailfort.store import intents
from tests.conftest import refusing_dns_port
from tests.server.production import as_nobody, cli, free_port, serving, world_dir, write_config

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: it starts mailfort as "
                             "root with server.user and plants files as that user")

NOBODY = pwd.getpwnam("nobody")
BODY = b"Subject: planted\r\n\r\nby the service user\r\n"
SPOOL_NAME = "1796530000.M1P4190001Q1.host"  # a pid of no live process


@pytest.fixture
def root_dir() -> Path:
    d = world_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)



def snapshot(root: Path, skip: Path) -> dict[str, tuple[object, ...]]:
    """Every name under ``root`` but ``skip``: type and mode, owner, size, content digest
    or link target, and mtime (an append or a rewrite shows)."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        if Path(dirpath) == skip.parent:
            dirs[:] = [d for d in dirs if Path(dirpath, d) != skip]
        for name in [*dirs, *files]:
            p = Path(dirpath, name)
            st = os.lstat(p)
            what: object = None
            if stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                             what, st.st_mtime_ns)
    return out


def root_only(root: Path, name: str, files: dict[str, bytes]) -> Path:
    """A directory of root's that nobody may enter, with ``files`` in it."""
    d = root / name
    d.mkdir(mode=0o700)
    for fname, data in files.items():
        (d / fname).write_bytes(data)
        (d / fname).chmod(0o600)
    return d


def record(entries: list[tuple[str, str]], version: int) -> bytes:
    """A link record of an earlier boot: (spool file, target) pairs for BODY. Format 1
    named targets by path (the issue's record), format 2 by user below the Maildir root."""
    body = json.dumps({"boot": "an-earlier-boot",
                       "messages": [[s, len(BODY), zlib.crc32(BODY), [t]]
                                    for s, t in entries]})
    text = f"mailfort-links {version}\n{body}\n"
    return f"{text}{zlib.crc32(text.encode()):08x}\n".encode()


def start_and_stop(config: Path, data: Path) -> str:
    with serving(config, data) as server:
        return server.stop()[1]


def served(config: Path, data: Path, port: int) -> str:
    """Start, check that the MX answers, stop; the server's stderr."""
    with serving(config, data) as server:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            assert smtp.ehlo()[0] == 250
        _out, err = server.stop()
    return err


@as_root
@pytest.mark.parametrize("workers,metrics_plant", [(1, "file"), (2, "dir"), (2, "file")])
def test_what_the_service_user_plants_changes_nothing_outside_the_data_dir(
        root_dir: Path, workers: int, metrics_plant: str) -> None:
    """The issue's reproduction: a spool file and a link record of an earlier boot naming
    data/evil/new/owned, with data/evil/new -> a root-only directory; a format-2 record
    through data/mail/evil.test -> another; data/metrics -> a root-only directory holding
    an important.db (or data/metrics/x.db -> a file elsewhere); symlinks to root's files
    among the data directory's. Restarted as root, mailfort links nothing, deletes
    nothing, creates nothing and changes no owner or mode outside the data directory, keeps
    the refused message in spool/kept/, and serves."""
    mx = f"127.0.0.1:{free_port()}"
    extra = {"metrics": {"listen": f"127.0.0.1:{free_port()}"}} if workers > 1 else {}
    config = write_config(root_dir, refusing_dns_port(), listen={"mx": [mx]},
                          server={"user": "nobody", "workers": workers}, **extra)
    data = root_dir / "data"
    start_and_stop(config, data)
    assert data.stat().st_uid == NOBODY.pw_uid
    victim = root_only(root_dir, "root-only", {"passwd": b"root:x:0:0\n"})
    victim2 = root_only(root_dir, "root-only-2", {})
    metrics_victim = root_only(root_dir, "root-metrics", {"important.db": b"precious"})
    elsewhere = root_dir / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x-target.db").write_bytes(b"keep me")
    n = len(BODY)
    planted_name = f"{SPOOL_NAME},S={n},W={n}"

    def plant() -> None:
        spool = data / "spool"
        (spool / SPOOL_NAME).write_bytes(BODY)
        (spool / f"1796530000.M1P4190001Q2.host{intents.SUFFIX}").write_bytes(
            record([(SPOOL_NAME, str(data / "evil" / "new" / "owned"))], 1))
        (spool / f"1796530000.M1P4190001Q3.host{intents.SUFFIX}").write_bytes(
            record([(SPOOL_NAME, f"evil.test/a/new/{planted_name}")], 2))
        (data / "evil").mkdir()
        (data / "evil" / "new").symlink_to(victim)
        (data / "mail").mkdir(exist_ok=True)
        (data / "mail" / "evil.test").symlink_to(victim2)
        metrics = data / "metrics"
        if metrics_plant == "dir":
            shutil.rmtree(metrics, ignore_errors=True)
            metrics.symlink_to(metrics_victim)
        else:
            metrics.mkdir(exist_ok=True)
            (metrics / "x.db").symlink_to(elsewhere / "x-target.db")
        (data / "passwd-link").symlink_to(victim / "passwd")  # chown must not follow

    as_nobody(plant)
    before = snapshot(root_dir, data)
    err = served(config, data, int(mx.rpartition(":")[2]))
    assert snapshot(root_dir, data) == before
    assert sorted(os.listdir(victim)) == ["passwd"] and os.listdir(victim2) == []
    assert (metrics_victim / "important.db").read_bytes() == b"precious"
    kept = data / "spool" / intents.KEPT
    assert SPOOL_NAME in os.listdir(kept)
    assert (kept / SPOOL_NAME).read_bytes() == BODY
    assert "refused to link" in err, err
    # ... and a second restart is as quiet: the refused records stay kept, not replayed.
    served(config, data, int(mx.rpartition(":")[2]))
    assert snapshot(root_dir, data) == before


@as_root
@pytest.mark.parametrize("plant_what", ["tls", "log"])
def test_a_planted_tls_dir_or_log_file_changes_nothing_outside(
        root_dir: Path, plant_what: str) -> None:
    """data/tls -> a root directory with a key: no chmod through it, no certificate
    written into it. A log file kept in the data directory replaced by a symlink to a
    root file: that file is not given to the service user (the switch to root for
    whoever owns it next). The server may refuse to start over what its own account
    broke; it must not touch what is outside."""
    log_file = root_dir / "data" / "mailfort.log"
    config = write_config(root_dir, refusing_dns_port(),
                          server={"user": "nobody", "workers": 1},
                          **({"log": {"file": str(log_file)}} if plant_what == "log" else {}))
    data = root_dir / "data"
    data.mkdir()  # the log file's directory, there before the first start
    start_and_stop(config, data)
    victim = root_dir / "root-tls"
    victim.mkdir(mode=0o755)
    (victim / "server-key.pem").write_bytes(b"not yours")
    (victim / "server-key.pem").chmod(0o644)
    shadow = root_only(root_dir, "root-only", {"shadow": b"root:$6$secret:1:0:99999:7:::\n"})

    def plant() -> None:
        if plant_what == "tls":
            shutil.rmtree(data / "tls")
            (data / "tls").symlink_to(victim)
        else:
            log_file.unlink()
            log_file.symlink_to(shadow / "shadow")

    as_nobody(plant)
    before = snapshot(root_dir, data)
    # It may refuse to start (its own account broke it): AssertionError from wait_ready.
    with serving(config, data, ready=False) as server, contextlib.suppress(AssertionError):
        server.wait_ready()
    assert snapshot(root_dir, data) == before
    assert (shadow / "shadow").stat().st_uid == 0


@as_root
def test_own_data_dir_follows_no_symlink_and_no_extra_hard_link(root_dir: Path) -> None:
    """What own_data_dir meets as root: a symlink to root's file (its own owner changes,
    never the target's), a hard link to root's file (as the account could make one where
    fs.protected_hardlinks is off: left to root), tls -> a directory of root's (no chmod
    through it), and files an admin command made as root (given to the account)."""
    from mailfort.server import privileges

    acct = privileges.Account("nobody", NOBODY.pw_uid, NOBODY.pw_gid)
    data = root_dir / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "made-by-root").write_bytes(b"x")
    secret = root_only(root_dir, "root-only", {"secret": b"root's"})
    (data / "sub" / "link").symlink_to(secret / "secret")
    os.link(secret / "secret", data / "sub" / "hard")
    tls = root_dir / "root-tls"
    tls.mkdir(mode=0o755)
    (tls / "server-key.pem").write_bytes(b"k")
    (tls / "server-key.pem").chmod(0o644)
    (data / "tls").symlink_to(tls)
    privileges.own_data_dir(data, acct)
    st = (secret / "secret").stat()
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert os.lstat(data / "sub" / "link").st_uid == NOBODY.pw_uid
    assert (data / "sub" / "made-by-root").stat().st_uid == NOBODY.pw_uid
    assert (data / "sub").stat().st_uid == NOBODY.pw_uid
    assert stat.S_IMODE(tls.stat().st_mode) == 0o755 and tls.stat().st_uid == 0
    assert stat.S_IMODE((tls / "server-key.pem").stat().st_mode) == 0o644


@as_root
def test_a_data_dir_the_account_could_swap_for_a_symlink_is_refused(root_dir: Path) -> None:
    """data_dir in a directory of the service user's: it could replace the data directory
    by a symlink to /etc, and root, giving the data directory away, would give /etc. The
    start is refused, naming the setting, before anything is given away."""
    theirs = root_dir / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY.pw_uid, NOBODY.pw_gid)
    config = write_config(root_dir, refusing_dns_port(), server={"user": "nobody"})
    text = config.read_text().replace(str(root_dir / "data"), str(theirs / "data"))
    config.write_text(text)
    r = cli(config, "serve")
    assert r.returncode == 1
    assert "server.data_dir" in r.stderr and str(theirs) in r.stderr, r.stderr
    assert not (theirs / "data").exists()


@as_root
@pytest.mark.parametrize("workers", [1, 2])
def test_the_service_user_resolves_every_record_type(root_dir: Path, workers: int) -> None:
    """dnspython loads each record type's module on first use; after the drop, a Python
    whose files only root may read (one installed in root's home) could load none, and
    every SPF, DKIM, DMARC and MX lookup of the node failed. Here an SPF TXT record served
    by the loopback DNS server gives spf=pass in the stored message."""
    from tests.dnsserver import DNSServer

    dns = DNSServer().start()
    try:
        dns.add_txt("spf.test", "v=spf1 ip4:127.0.0.1 -all")
        mx = f"127.0.0.1:{free_port()}"
        config = write_config(root_dir, int(dns.port), listen={"mx": [mx]},
                              server={"user": "nobody", "workers": workers})
        data = root_dir / "data"
        assert cli(config, "domain", "add", "example.test").returncode == 0
        pw = root_dir / "bob.pw"
        pw.write_text("pw-of-bob-1234\n")
        add = cli(config, "user", "add", "bob@example.test", "--password-file", str(pw))
        assert add.returncode == 0, add.stderr
        with serving(config, data) as server:
            with smtplib.SMTP("127.0.0.1", int(mx.rpartition(":")[2]), timeout=10) as smtp:
                smtp.ehlo("sender.spf.test")
                reply = smtp.sendmail("someone@spf.test", ["bob@example.test"],
                                      b"From: someone@spf.test\r\nSubject: x\r\n\r\nhi\r\n")
            err = server.stop()[1]
        assert reply == {}, err
        (stored,) = list((data / "mail").glob("example.test/bob/new/*"))
        text = stored.read_text()
        assert "spf=pass smtp.mailfrom=someone@spf.test" in text, text[:600]
    finally:
        dns.stop()
