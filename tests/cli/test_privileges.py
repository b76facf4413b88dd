"""Issue 24, item 1, for the administration commands: nothing runs as root on a path the
service user can change.

With ``server.user`` set, the data directory is that user's. Run as root, ``mailfort user
add``, ``domain add``, ``status``... used to open directory.sqlite3, control.sock and the
rest as root, through whatever the service user planted there. These tests plant as
``nobody`` (a forked process that switched to it for good), run the real command as root
in a subprocess (this checkout's code), and check that nothing outside the data directory
changed; and that what the commands make as root is still the server's to use. Skipped,
with the reason, when the tests do not run as root.
"""

from __future__ import annotations

import os
import poplib
import pwd
import shutil
import socket
import sqlite3
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import refusing_dns_port
from tests.server.production import as_nobody, cli, free_port, serving, world_dir, write_config

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: runs mailfort commands "
                             "as root with server.user and plants files as that user")

NOBODY = pwd.getpwnam("nobody")
PASSWORD = "correct horse battery"


@pytest.fixture
def root_dir() -> Iterator[Path]:
    d = world_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)



def nobodys_data_dir(root: Path) -> Path:
    """A data directory as ``serve`` leaves it: nobody's, 0700."""
    data = root / "data"
    data.mkdir(mode=0o700)
    os.chown(data, NOBODY.pw_uid, NOBODY.pw_gid)
    return data


def roots_place(root: Path) -> Path:
    """A directory only root can enter, holding a root-only database and the admin's
    password file."""
    secret = root / "secret"
    secret.mkdir(mode=0o700)
    db = sqlite3.connect(secret / "root-only.sqlite3")
    db.execute("CREATE TABLE precious (x TEXT)")
    db.execute("INSERT INTO precious VALUES ('root''s data')")
    db.commit()
    db.close()
    (secret / "root-only.sqlite3").chmod(0o600)
    (secret / "password").write_text(PASSWORD + "\n")
    (secret / "password").chmod(0o600)
    return secret


def snapshot(d: Path) -> dict[str, tuple[object, ...]]:
    """Every name in ``d``: mode, owner, size, mtime and content."""
    out: dict[str, tuple[object, ...]] = {}
    for p in sorted(d.iterdir()):
        st = os.lstat(p)
        body = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
        out[p.name] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, body)
    return out


def everything_is_nobodys(data: Path) -> None:
    for dirpath, dirs, files in os.walk(data):
        for name in [".", *dirs, *files]:
            st = os.lstat(Path(dirpath, name))
            assert (st.st_uid, st.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid), \
                f"{Path(dirpath, name)} is uid {st.st_uid}, not nobody's"


@as_root
@pytest.mark.parametrize("command", [
    ("domain", "add", "example.test"),
    ("user", "add", "alice@example.test", "--password-file", "{secret}/password"),
])
def test_a_planted_directory_symlink_leads_root_nowhere(
        root_dir: Path, command: tuple[str, ...]) -> None:
    """The service user replaces directory.sqlite3 by a symlink to a root-only database;
    the command run as root must not write into that database (it used to create the
    directory's tables there, and its -wal file beside it) nor create anything there."""
    data = nobodys_data_dir(root_dir)
    secret = roots_place(root_dir)
    config = write_config(root_dir, refusing_dns_port(), server={"user": "nobody"})
    as_nobody(lambda: os.symlink(secret / "root-only.sqlite3", data / "directory.sqlite3"))
    before = snapshot(secret)

    r = cli(config, *(a.format(secret=secret) for a in command))

    assert snapshot(secret) == before, f"root changed its own files: {r.stdout}{r.stderr}"
    # Refused, as nobody (who cannot enter root's directory), with one line; or done on
    # nobody's own files only.
    assert "Traceback" not in r.stderr
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Permission denied" in r.stderr
    everything_is_nobodys(data)


@as_root
def test_status_does_not_connect_as_root_to_a_planted_socket(root_dir: Path) -> None:
    """control.sock replaced by a symlink to a socket only root can reach (say, another
    daemon's): ``status`` as root used to connect and write to it."""
    data = nobodys_data_dir(root_dir)
    secret = roots_place(root_dir)
    config = write_config(root_dir, refusing_dns_port(), server={"user": "nobody"})
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(secret / "daemon.sock"))
        listener.listen()
        listener.setblocking(False)
        as_nobody(lambda: os.symlink(secret / "daemon.sock", data / "control.sock"))

        r = cli(config, "status")

        with pytest.raises(BlockingIOError):
            listener.accept()[0].close()  # root connected to it
    assert "Traceback" not in r.stderr
    assert r.returncode != 0


@as_root
def test_commands_as_root_make_the_data_dir_the_service_users_and_serve_uses_it(
        root_dir: Path) -> None:
    """The first ``domain add`` and ``user add`` as root make the data directory: it and
    all in it are server.user's; then ``mailfort serve`` (as root, dropping to nobody)
    lets the user log in."""
    secret = roots_place(root_dir)
    pop3s = f"127.0.0.1:{free_port()}"
    config = write_config(root_dir, refusing_dns_port(), listen={"pop3s": [pop3s]},
                          server={"user": "nobody"})
    data = root_dir / "data"

    for command in (("domain", "add", "example.test"),
                    ("user", "add", "alice@example.test", "--password-file",
                     str(secret / "password"))):
        r = cli(config, *command)
        assert r.returncode == 0, r.stderr

    everything_is_nobodys(data)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "directory.sqlite3").stat().st_mode) == 0o600

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with serving(config, data):
        pop = poplib.POP3_SSL("127.0.0.1", int(pop3s.rpartition(":")[2]), context=ctx,
                              timeout=10)
        try:
            pop.user("alice@example.test")
            assert pop.pass_(PASSWORD).startswith(b"+OK")
        finally:
            pop.quit()


@as_root
def test_a_directory_left_by_root_in_the_data_dir_is_given_away_first(root_dir: Path) -> None:
    """An earlier version's ``domain add`` as root left directory.sqlite3 root's in the
    service user's data directory: the command gives the tree away (as ``serve`` does, no
    symlink followed) before it switches, and then can write it."""
    data = nobodys_data_dir(root_dir)
    config = write_config(root_dir, refusing_dns_port(), server={"user": "nobody"})
    r = cli(config, "domain", "add", "example.test")
    assert r.returncode == 0, r.stderr
    os.chown(data / "directory.sqlite3", 0, 0)

    r = cli(config, "domain", "add", "example.org")

    assert (r.returncode, r.stderr) == (0, "")
    everything_is_nobodys(data)


@as_root
def test_every_command_that_drops_finds_what_it_imports(root_dir: Path) -> None:
    """After the switch, a Python installed in root's home (as here) is unreadable: each
    command must have imported what it needs before. Run the commands whose imports
    differ, as root with server.user, and look for an import failure."""
    secret = roots_place(root_dir)
    from mailfort.config import Config
    from mailfort.tls import make_self_signed

    key, cert, _facts = make_self_signed(Config())
    (root_dir / "cert.pem").write_bytes(cert)
    (root_dir / "key.pem").write_bytes(key)
    config = write_config(root_dir, refusing_dns_port(), server={"user": "nobody"},
                          tls={"cert_file": str(root_dir / "cert.pem"),
                               "key_file": str(root_dir / "key.pem")})
    pw = str(secret / "password")
    commands: list[tuple[tuple[str, ...], int]] = [
        (("domain", "add", "example.test"), 0),
        (("user", "add", "alice@example.test", "--password-file", pw), 0),
        (("user", "passwd", "alice@example.test", "--password-file", pw), 0),
        (("alias", "add", "a@example.test", "alice@example.test"), 0),
        (("queue", "retry"), 0),
        (("status",), 3),
        (("tls", "show"), 0),
        (("dkim", "keygen", "example.test", "--algorithm", "ed25519"), 0),
        (("dkim", "list", "--records"), 0),
        (("mta-sts", "policy", "example.test", "--mx", "mx.example.test"), 0),
        (("dns", "check", "example.test", "--address", "192.0.2.1"), 2),
    ]
    for command, code in commands:
        r = cli(config, *command)
        assert (r.returncode, r.stderr) == (code, ""), (command, r.stdout)
    everything_is_nobodys(root_dir / "data")


def test_the_commands_that_keep_root_are_named() -> None:
    """Only these stay as they were started; every other command switches."""
    from mailfort.cli import KEEPS_PRIVILEGES, build_parser, command_path

    # mta-sts policy reads the directory (the domain must be ours): it switches too.
    assert set(KEEPS_PRIVILEGES) == {("serve",), ("config", "check"), ("audit",), ("lab",)}
    parser = build_parser()
    assert command_path(parser.parse_args(["user", "add", "a@b.test"])) == ("user", "add")
    assert command_path(parser.parse_args(["status"])) == ("status",)
    assert command_path(parser.parse_args(["audit", "--list"])) == ("audit",)


@as_root
def test_postgresql_directory_commands_switch_too(root_dir: Path, postgres_server: Any) -> None:
    """With the shared PostgreSQL directory, ``db migrate`` and ``domain add`` run as the
    service user too: psycopg is imported before the switch, the password file is read
    after it (as ``serve`` reads it: it must be the service user's)."""
    from tests.pgserver import PASSWORD

    password = root_dir / "directory-password"
    password.write_text(PASSWORD + "\n")
    password.chmod(0o600)
    os.chown(password, NOBODY.pw_uid, NOBODY.pw_gid)
    config = write_config(root_dir, refusing_dns_port(), server={"user": "nobody"},
                          directory={"backend": "postgresql",
                                     "url": postgres_server.url(
                                         postgres_server.create_database()),
                                     "password_file": str(password)})
    for command in (("db", "migrate"), ("domain", "add", "example.test"), ("domain", "list")):
        r = cli(config, *command)
        assert (r.returncode, r.stderr) == (0, ""), command
    assert r.stdout == "example.test\n"
    everything_is_nobodys(root_dir / "data")
