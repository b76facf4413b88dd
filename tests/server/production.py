"""``mailfort serve`` as a real subprocess, configured from a test, on free loopback ports.

The tree is made world-traversable (0711) so that a server that drops to an unprivileged
account can still reach its data directory; the subprocess imports this checkout's code.
"""

from __future__ import annotations

import atexit
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mailfort
from mailfort.server import control

SRC = str(Path(mailfort.__file__).resolve().parents[1])
SERVICES = ("mx", "submission", "submissions", "pop3", "pop3s", "imap", "imaps",
            "managesieve")


_GIVEN: set[int] = set()  # handed out in this run: never twice


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for a server started later: picked below the kernel's ephemeral
    range (32768+), where port 0 would pick, so that the outgoing connections of whatever
    else runs meanwhile cannot take it before the server binds it; and never one handed
    out before in this run (two picks for servers that bind later, such as the several
    listeners of one configuration and an ACME challenge port, could otherwise match)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        if port in _GIVEN:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            _GIVEN.add(port)
            return port
    raise OSError("no free port in 20000-32000")


def free_low_port() -> int:
    """A free port below 1024 on 127.0.0.1 (root only)."""
    for port in range(1023, 600, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below 1024")


def world_dir() -> Path:
    """A fresh directory under /tmp that any account may traverse (not list), removed when
    the test run ends (pytest's tmp_path lies under a directory only its owner may enter)."""
    d = Path(tempfile.mkdtemp(prefix="mailfort-prod-", dir="/tmp"))
    d.chmod(0o711)
    atexit.register(shutil.rmtree, d, True)
    return d


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_toml(x)}" for k, x in v.items()) + " }"
    return str(v)


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml(k)


def write_config(root: Path, dns_port: int, listen: dict[str, list[str]] | None = None,
                 **tables: dict[str, Any]) -> Path:
    """A config whose listeners are free loopback ports unless ``listen`` says otherwise."""
    listen = {name: [f"127.0.0.1:{free_port()}"] for name in SERVICES} | (listen or {})
    data: dict[str, dict[str, Any]] = {
        "server": {"hostname": "mx.example.test", "data_dir": str(root / "data")},
        "dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": 0.5},
        "listen": listen,
    }
    for name, values in tables.items():
        data[name] = data.get(name, {}) | values
    text = "\n".join(
        f"[{name}]\n" + "\n".join(f"{_key(k)} = {_toml(v)}" for k, v in values.items())
        for name, values in data.items()) + "\n"
    path = root / "mailfort.toml"
    path.write_text(text)
    return path


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, "PYTHONWARNINGS": "ignore", **extra}


def cli(config: Path, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailfort", *args, "--config", str(config)],
                          text=True, capture_output=True, timeout=60, env=env(), **kwargs)


class Server:
    def __init__(self, config: Path, data_dir: Path, proc: subprocess.Popen[str]) -> None:
        self.config, self.data_dir, self.proc = config, data_dir, proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until the control socket answers (the server is fully up), or it exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                _out, err = self.proc.communicate()
                raise AssertionError(f"mailfort serve exited {self.proc.returncode}: {err}")
            try:
                control.request(self.data_dir, "status", timeout=2)
                return
            except (control.NotRunning, OSError):
                time.sleep(0.05)
        raise AssertionError("mailfort serve did not come up")

    def stop(self) -> tuple[str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return out, err


# Runs ``mailfort serve`` with listening sockets as systemd hands them over: descriptors
# 3, 4, ... and LISTEN_PID set to the pid that serves (known only once it runs).
ACTIVATE = """
import os, sys
fds = [int(x) for x in sys.argv[1].split(",")]
for i, fd in enumerate(fds):
    os.dup2(fd, 3 + i)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = str(len(fds))
os.execv(sys.executable, [sys.executable, "-m", "mailfort", "serve", "--config", sys.argv[2]])
"""


@contextmanager
def serving(config: Path, data_dir: Path, ready: bool = True,
            activate: list[socket.socket] | None = None, popen: dict[str, Any] | None = None,
            **env_extra: str) -> Iterator[Server]:
    """``activate``: sockets handed over as systemd does; ``popen``: e.g. user=, group=."""
    argv = [sys.executable, "-m", "mailfort", "serve", "--config", str(config)]
    extra: dict[str, Any] = dict(popen or {})
    if activate:
        fds = [s.fileno() for s in activate]
        argv = [sys.executable, "-c", ACTIVATE, ",".join(map(str, fds)), str(config)]
        extra["pass_fds"] = fds
    proc = subprocess.Popen(argv, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env(**env_extra), **extra)
    server = Server(config, data_dir, proc)
    try:
        if ready:
            server.wait_ready()
        yield server
    finally:
        server.stop()


def node_pids(pid: int) -> list[int]:
    """``pid`` (``mailfort serve``) and its children (its worker processes, if any)."""
    out = [pid]
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def proc_ids(pid: int, task: int | None = None) -> dict[str, list[int]]:
    """Uid, Gid (real, effective, saved, fs) and Groups of a process (or one of its
    threads), from /proc."""
    out: dict[str, list[int]] = {}
    where = f"/proc/{pid}" + (f"/task/{task}" if task is not None else "")
    for line in Path(f"{where}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            out[key] = [int(x) for x in value.split()]
    return out


def as_nobody(work: Callable[[], None]) -> None:
    """Run ``work`` in a forked child that has become nobody for good (as a compromised
    service account would be); fail if it fails."""
    nobody = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            work()
            code = 0
        except BaseException as exc:
            os.write(2, f"as nobody: {exc!r}\n".encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "planting as nobody failed"
