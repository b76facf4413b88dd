"""A real PostgreSQL server for the tests: Debian's binaries, a temporary cluster, loopback.

initdb and postgres refuse to run as root, so as root they run as the ``postgres`` account
(made by Debian's package) or ``nobody``; as any other user, as that user. The cluster
trusts local connections of one role only from 127.0.0.1 and has one password-protected
role too, so that the password path (file or environment) is exercised for real.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ADMIN = "mailfort_admin"  # trusted superuser of the test cluster (creates databases)
ROLE = "mailfort_node"  # what the nodes connect as, with PASSWORD
PASSWORD = "s3cret-directory-pw"


def find_bindir() -> Path | None:
    """The newest installed PostgreSQL's bin directory, None when there is none."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name)
                   if Path(p).parent.parent.name.isdigit() else 0)
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """``start()``, then ``url(db)`` / ``create_database()``; ``stop()`` removes it all."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="mailfort-pg-"))
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.runas: list[str] = []
        if os.geteuid() == 0:
            user = "postgres" if _has_user("postgres") else "nobody"
            self.runas = ["runuser", "-u", user, "--"]
            pw = pwd.getpwnam(user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.root.chmod(0o700)
        self._dbs = 0

    def start(self) -> PostgresServer:
        data = self.root / "data"
        subprocess.run(
            [*self.runas, str(self.bindir / "initdb"), "-D", str(data), "-U", ADMIN,
             "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions"],
            check=True, capture_output=True, timeout=60)
        hba = data / "pg_hba.conf"
        # Only loopback TCP: the admin role trusted, every other role by password.
        rules = (f"host all {ADMIN} 127.0.0.1/32 trust\n"
                 "host all all 127.0.0.1/32 scram-sha-256\n")
        subprocess.run([*self.runas, "sh", "-c", f"cat > {hba}"], input=rules.encode(),
                       check=True, timeout=10)
        self.proc = subprocess.Popen(
            [*self.runas, str(self.bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1",
             "-p", str(self.port), "-k", str(self.root), "-c", "fsync=off",
             "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=200"],
            stdout=subprocess.DEVNULL, stderr=open(self.root / "log", "wb"))  # noqa: SIM115
        deadline = time.monotonic() + 30
        while True:
            try:
                self.admin_sql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
                break
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("PostgreSQL did not start: "
                                       + (self.root / "log").read_text()[-2000:]) from None
                time.sleep(0.1)
        return self

    def admin_sql(self, sql: str, db: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.url(db, ADMIN), autocommit=True, connect_timeout=2) as c:
            c.execute(sql.encode())

    def url(self, db: str, user: str = ROLE) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{db}"

    def create_database(self) -> str:
        """A new empty database owned by ROLE; its name."""
        self._dbs += 1
        name = f"mailfort_t{self._dbs}"
        self.admin_sql(f"CREATE DATABASE {name} OWNER {ROLE} TEMPLATE template0")
        return name

    def stop(self) -> None:
        """A "fast" shutdown (SIGINT to the postmaster itself: runuser does not pass it
        on), then the temporary cluster is removed."""
        if self.proc is not None and self.proc.poll() is None:
            pidfile = self.root / "data" / "postmaster.pid"
            with contextlib.suppress(OSError, ValueError, IndexError):
                os.kill(int(pidfile.read_text().split()[0]), signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)


def _has_user(name: str) -> bool:
    with contextlib.suppress(KeyError):
        pwd.getpwnam(name)
        return True
    return False


def unavailable_reason() -> str | None:
    """Why no PostgreSQL test can run here, or None."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        return "psycopg / psycopg-pool not installed (pip install -e '.[test]')"
    if find_bindir() is None:
        return ("PostgreSQL server binaries not installed (apt-get install postgresql; "
                "./run-tests does it as root)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: initdb refuses root"
    return None
