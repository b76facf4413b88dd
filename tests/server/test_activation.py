"""systemd socket activation: mailfort serves on sockets it did not bind.

The test plays systemd: it binds and listens, then starts ``mailfort serve`` with the
socket as descriptor 3 and LISTEN_FDS/LISTEN_PID set. As root it starts the server as
``nobody`` on a port below 1024, which that account could never bind itself.
"""

from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailfort import config as config_mod
from mailfort.config import ConfigError
from mailfort.server import activation
from tests.conftest import refusing_dns_port
from tests.server.production import (
    cli,
    free_low_port,
    free_port,
    proc_ids,
    serving,
    world_dir,
    write_config,
)


@pytest.fixture
def root_dir() -> Iterator[Path]:
    d = world_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _listening(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(16)
    return sock


@pytest.mark.parametrize("workers", [1, 2])
def test_inherited_socket_serves_the_listener_that_names_its_address(
        root_dir: Path, workers: int) -> None:
    """workers = 2: the supervisor takes the socket and its workers serve it."""
    port = free_port()
    config = write_config(root_dir, refusing_dns_port(), listen={"mx": [f"127.0.0.1:{port}"]},
                          server={"workers": workers})
    with _listening(port) as sock, serving(config, root_dir / "data", activate=[sock]):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            assert smtp.ehlo()[0] == 250
        status = cli(config, "status")
        assert f"127.0.0.1:{port}" in status.stdout


def _others_may_run(path: str) -> bool:
    """Whether an account other than the owner may execute ``path`` (every directory on
    the way searchable, the file executable, by "other")."""
    p = Path(path).resolve()
    return all(d.stat().st_mode & 0o001 for d in [p, *p.parents])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: binds a port below 1024 for an "
                    "unprivileged server process")
@pytest.mark.skipif(not _others_may_run(sys.executable), reason=f"{sys.executable} cannot "
                    "be run by another account (e.g. a Python under /root)")
def test_unprivileged_process_serves_a_privileged_port_it_was_handed(root_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    low = free_low_port()
    config = write_config(root_dir, refusing_dns_port(), listen={"mx": [f"127.0.0.1:{low}"]})
    data = root_dir / "data"
    data.mkdir(mode=0o700)
    os.chown(data, nobody.pw_uid, nobody.pw_gid)
    with _listening(low) as sock, serving(
            config, data, activate=[sock],
            popen={"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}) as srv:
        assert proc_ids(srv.pid)["Uid"] == [nobody.pw_uid] * 4
        with smtplib.SMTP("127.0.0.1", low, timeout=10) as smtp:
            assert smtp.ehlo()[0] == 250


def test_a_socket_no_listener_names_is_refused(tmp_path: Path) -> None:
    cfg = config_mod.from_dict({"server": {"data_dir": str(tmp_path)}})
    with _listening(free_port()) as sock, pytest.raises(ConfigError, match="no listen"):
        activation.assign(cfg, [sock])


def test_variables_for_another_process_are_ignored() -> None:
    assert activation.inherited_sockets({"LISTEN_PID": "1", "LISTEN_FDS": "1"}) == []
    assert activation.inherited_sockets({}) == []
