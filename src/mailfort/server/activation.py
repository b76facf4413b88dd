"""systemd socket activation: listening sockets handed over instead of bound here.

With ``contrib/mailfort.socket`` systemd binds the ports (25, 587, ...) and starts mailfort
as its unprivileged user with the sockets as descriptors 3, 4, ... (``$LISTEN_FDS``, for
``$LISTEN_PID``; sd_listen_fds(3)). The configuration stays the one source of truth: each
inherited socket is matched by its address to a ``listen.*`` entry, which then needs no
bind (nor root); a socket that no entry names is an error, not a silent extra door.
"""

from __future__ import annotations

import ipaddress
import os
import socket

from mailfort.config import Config, ConfigError
from mailfort.server.privileges import LISTEN_KEYS

FIRST_FD = 3
Key = tuple[str, int]  # (listen.* name, index in that list)


def inherited_sockets(env: dict[str, str] | None = None) -> list[socket.socket]:
    """The sockets passed to this process (none when the variables are for another)."""
    env = os.environ if env is None else env
    try:
        pid, count = int(env.get("LISTEN_PID", "")), int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if pid != os.getpid() or count <= 0:
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for the children
    socks = []
    for fd in range(FIRST_FD, FIRST_FD + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


def _address(host: str, port: int) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address,
                                             int]:
    return ipaddress.ip_address(host.strip("[]").split("%")[0]), port


def assign(cfg: Config, socks: list[socket.socket]) -> dict[Key, socket.socket]:
    """Match each inherited socket to the configured listener with its address."""
    wanted: dict[tuple[object, int], Key] = {}
    for name in LISTEN_KEYS:
        for i, hostport in enumerate(getattr(cfg.listen, name)):
            host, _, port = hostport.rpartition(":")
            wanted[_address(host, int(port))] = (name, i)
    out: dict[Key, socket.socket] = {}
    for sock in socks:
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET,
                                                                  socket.AF_INET6):
            raise ConfigError(f"listen: systemd passed a socket that is not TCP ({sock!r})")
        host, port = sock.getsockname()[:2]
        key = wanted.get(_address(host, port))
        if key is None:
            raise ConfigError(
                f"listen: systemd passed a socket on {host} port {port} that no listen.* "
                "entry names; add it to the configuration (or remove it from the .socket)")
        out[key] = sock
    return out
