"""Least privilege: ``mailfort serve`` started as root binds, then runs as server.user.

These run a real ``mailfort serve`` subprocess as root (CI runs as root) and read what the
kernel says about it in /proc; they are skipped, with the reason, when the tests are not
root. The account is ``nobody``, which exists everywhere.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import smtplib
import stat
from pathlib import Path

import pytest

from mailfort import config as config_mod
from mailfort.config import ConfigError
from mailfort.server import privileges
from tests.conftest import refusing_dns_port
from tests.server.production import (
    cli,
    free_low_port,
    node_pids,
    proc_ids,
    serving,
    world_dir,
    write_config,
)

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: it checks the switch "
                             "from root to server.user and binding below port 1024")

NOBODY = pwd.getpwnam("nobody")
NOBODY_GROUP = grp.getgrgid(NOBODY.pw_gid).gr_name


@pytest.fixture
def root_dir() -> Path:
    d = world_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@as_root
@pytest.mark.parametrize("workers", [1, 2])
def test_started_as_root_serves_as_server_user_with_no_way_back(
        root_dir: Path, workers: int) -> None:
    """With workers = 2 the supervisor drops before it forks: no process serves as root."""
    low = free_low_port()
    config = write_config(root_dir, refusing_dns_port(),
                          listen={"mx": [f"127.0.0.1:{low}"]},
                          server={"user": "nobody", "workers": workers})
    with serving(config, root_dir / "data") as server:
        pids = node_pids(server.pid)
        assert len(pids) == (1 if workers == 1 else 1 + workers)
        threads = 0
        for pid in pids:
            ids = proc_ids(pid)
            assert ids["Uid"] == [NOBODY.pw_uid] * 4  # real, effective, saved, filesystem
            assert ids["Gid"] == [NOBODY.pw_gid] * 4
            assert ids["Groups"] == []  # root's supplementary groups are gone
            tasks = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
            threads += len(tasks)
            for task in tasks:  # every thread, not only the main one
                assert proc_ids(pid, task)["Uid"] == [NOBODY.pw_uid] * 4, task
        assert threads > len(pids)  # the committer threads at least
        # ... and it still serves on the privileged port it bound as root.
        with smtplib.SMTP("127.0.0.1", low, timeout=10) as smtp:
            assert smtp.ehlo()[0] == 250
        data = root_dir / "data"
        st = data.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY.pw_uid, 0o700)
        key = (data / "tls" / "key.pem").stat()
        assert (key.st_uid, stat.S_IMODE(key.st_mode)) == (NOBODY.pw_uid, 0o600)
        assert (data / "directory.sqlite3").stat().st_uid == NOBODY.pw_uid


@as_root
def test_root_without_user_refuses_a_privileged_port_naming_the_setting(
        root_dir: Path) -> None:
    low = free_low_port()
    config = write_config(root_dir, refusing_dns_port(), listen={"mx": [f"127.0.0.1:{low}"]})
    r = cli(config, "serve")
    assert r.returncode == 1
    assert "server.user" in r.stderr and f"127.0.0.1:{low}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (root_dir / "data").exists()  # refused before anything was opened


@as_root
def test_root_without_user_on_unprivileged_ports_runs_with_a_loud_warning(
        root_dir: Path) -> None:
    config = write_config(root_dir, refusing_dns_port())
    with serving(config, root_dir / "data") as server:
        assert proc_ids(server.pid)["Uid"][1] == 0
        _out, err = server.stop()
    assert "WARNING: mailfort is running as ROOT" in err
    assert "server.user" in err


@as_root
def test_verify_dropped_refuses_a_process_that_can_become_root_again() -> None:
    # Still root here: the check must see that uid 0 is within reach.
    with pytest.raises(privileges.PrivilegeError):
        privileges.verify_dropped(privileges.Account("nobody", NOBODY.pw_uid, NOBODY.pw_gid))


def test_unknown_user_is_a_config_error_with_the_command_to_create_it(tmp_path: Path) -> None:
    cfg = config_mod.from_dict({"server": {"data_dir": str(tmp_path), "user": "no-such-acct"}})
    with pytest.raises(ConfigError, match=r"server\.user: no such user.*useradd"):
        privileges.account(cfg)


def test_root_cannot_be_the_service_user() -> None:
    with pytest.raises(ConfigError, match=r"server\.user"):
        config_mod.from_dict({"server": {"user": "root"}})


def test_privileged_listeners_named_by_key() -> None:
    cfg = config_mod.from_dict({"listen": {"mx": ["127.0.0.1:2525", "[::1]:25"],
                                           "pop3s": ["0.0.0.0:995"]}})
    assert privileges.privileged_listeners(cfg) == ["listen.mx[1] ([::1]:25)",
                                                    "listen.pop3s[0] (0.0.0.0:995)"]


def test_group_of_nobody_resolves(tmp_path: Path) -> None:
    cfg = config_mod.from_dict({"server": {"data_dir": str(tmp_path), "user": "nobody",
                                           "group": NOBODY_GROUP}})
    assert privileges.account(cfg).gid == NOBODY.pw_gid
