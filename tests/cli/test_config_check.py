"""``mailfort config check`` is serve's own validation (config.preflight): what serve would
refuse, the check reports with the same one line and a non-zero exit; a warning (a host
name without a dot) is printed by both and stops neither (issue 27). Real subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from mailfort.passwords import verify_password
from tests.server.production import SRC, free_port

# Makes ``import NAME`` fail as if the optional package were not installed.
BLOCKER = """\
import sys

BLOCKED = {blocked!r}


class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return f'"{v}"' if isinstance(v, str) else repr(v)


def write(cwd: Path, **tables: dict[str, Any]) -> Path:
    """A configuration whose listeners are free ports; ``tables`` override or add."""
    base: dict[str, dict[str, Any]] = {
        "server": {"hostname": "mail.example.test", "data_dir": str(cwd / "data"),
                   "workers": 1},
        "listen": {name: [f"127.0.0.1:{free_port()}"]
                   for name in ("mx", "submission", "submissions", "pop3", "pop3s", "imap",
                                "imaps", "managesieve")},
    }
    for name, table in tables.items():
        base.setdefault(name, {}).update(table)
    text = "".join(f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in t.items())
                   for name, t in base.items())
    path = cwd / "mailfort.toml"
    path.write_text(text)
    return path


def run(cwd: Path, *args: str, stdin: str = "", blocked: tuple[str, ...] = (),
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    path = SRC
    if blocked:
        (cwd / "blocker").mkdir(exist_ok=True)
        (cwd / "blocker" / "sitecustomize.py").write_text(BLOCKER.format(blocked=blocked))
        path = f"{cwd / 'blocker'}{os.pathsep}{SRC}"
    return subprocess.run([sys.executable, "-m", "mailfort", *args], cwd=cwd, input=stdin,
                          text=True, capture_output=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"})


def refused(cwd: Path, *args: str, **kwargs: Any) -> str:
    """The one line of a refusal (exit 1, no traceback)."""
    try:
        r = run(cwd, *args, **kwargs)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{args}: not refused (still running)")
    assert r.returncode == 1, (args, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "WARNING" not in ln
             and not ln.startswith(("mailfort: warning:", "Warning: Password", "Password"))]
    assert lines and lines[0].startswith("mailfort: "), r.stderr
    assert len(lines) == 1, r.stderr
    return lines[0]


def check_and_serve_refuse(cwd: Path, config: Path, expected: str,
                           **kwargs: Any) -> None:
    check = refused(cwd, "config", "check", "--config", str(config), **kwargs)
    serve = refused(cwd, "serve", "--config", str(config), **kwargs)
    assert expected in check, check
    assert serve == check


def test_missing_certificate_file(tmp_path: Path) -> None:
    config = write(tmp_path, tls={"cert_file": str(tmp_path / "cert.pem"),
                                  "key_file": str(tmp_path / "key.pem")})
    check_and_serve_refuse(tmp_path, config, f"tls.cert_file: cannot read {tmp_path}/cert.pem")
    (tmp_path / "cert.pem").write_text("x")
    check_and_serve_refuse(tmp_path, config, f"tls.key_file: cannot read {tmp_path}/key.pem")


def test_service_user_that_does_not_exist(tmp_path: Path) -> None:
    config = write(tmp_path, server={"user": "nosuchuser"})
    check_and_serve_refuse(tmp_path, config, "server.user: no such user 'nosuchuser'")


def test_nameserver_that_is_not_an_ip_address(tmp_path: Path) -> None:
    config = write(tmp_path, dns={"nameservers": ["127.0.0.53", "dns.google"]})
    check_and_serve_refuse(tmp_path, config,
                           "dns.nameservers[1]: 'dns.google' must be an IP address")


def test_two_listeners_on_one_port(tmp_path: Path) -> None:
    port = free_port()
    config = write(tmp_path, listen={"mx": [f"127.0.0.1:{port}"],
                                     "submission": [f"127.0.0.1:{port}"]})
    check_and_serve_refuse(
        tmp_path, config, f"listen.submission[0]: 127.0.0.1:{port} is already taken by "
        "listen.mx[0]")
    # The wildcard address of the family takes the port on every address of it.
    config = write(tmp_path, listen={"mx": [f"0.0.0.0:{port}"],
                                     "submission": [f"127.0.0.1:{port + 0}"]})
    check_and_serve_refuse(tmp_path, config, "listen.submission[0]")
    config = write(tmp_path, listen={"pop3": [f"127.0.0.1:{port}"]},
                   metrics={"listen": f"127.0.0.1:{port}"})
    check_and_serve_refuse(tmp_path, config, "metrics.listen: 127.0.0.1:")


def test_port_zero_twice_is_no_clash() -> None:
    from mailfort import config as config_mod

    cfg = config_mod.from_dict({"server": {"hostname": "mail.example.test"},
                                "listen": {"mx": ["127.0.0.1:0"], "submission": ["127.0.0.1:0"]}})
    assert config_mod.preflight(cfg) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_taken_by_another_program_is_one_line_at_serve(tmp_path: Path,
                                                              workers: int) -> None:
    """Known only at the bind: config check cannot see it, serve says which address."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = write(tmp_path, server={"workers": workers},
                       listen={"submission": [f"127.0.0.1:{port}"]})
        line = refused(tmp_path, "serve", "--config", str(config))
    assert line == f"mailfort: cannot listen: 127.0.0.1:{port}: Address already in use"


def test_log_file_in_a_missing_directory(tmp_path: Path) -> None:
    config = write(tmp_path, log={"file": str(tmp_path / "nodir" / "mailfort.log")})
    check_and_serve_refuse(tmp_path, config,
                           f"log.file: the directory {tmp_path}/nodir does not exist")


def test_every_listener_empty(tmp_path: Path) -> None:
    config = write(tmp_path, listen={name: [] for name in
                                     ("mx", "submission", "submissions", "pop3", "pop3s",
                                      "imap", "imaps", "managesieve")})
    check_and_serve_refuse(tmp_path, config, "the server would serve nothing")


def test_postgresql_without_its_extra_is_one_line_everywhere(tmp_path: Path) -> None:
    config = write(tmp_path, directory={"backend": "postgresql",
                                        "url": "postgresql://mailfort@127.0.0.1:1/mailfort"})
    blocked = ("psycopg_pool",)
    expected = "install it with: pip install 'mailfort[postgresql]'"
    check_and_serve_refuse(tmp_path, config, expected, blocked=blocked)
    for command in (("user", "list"), ("db", "migrate"), ("domain", "add", "example.test")):
        line = refused(tmp_path, *command, "--config", str(config), blocked=blocked)
        assert line.endswith(expected), (command, line)


def test_acme_without_its_extra(tmp_path: Path) -> None:
    config = write(tmp_path, tls={"acme": True, "acme_http_listen": f"127.0.0.1:{free_port()}"})
    check_and_serve_refuse(tmp_path, config, "install it with: pip install 'mailfort[acme]'",
                           blocked=("josepy",))


def test_host_name_without_a_dot_is_a_warning_of_check_and_serve(tmp_path: Path) -> None:
    """A warning, not a refusal: exit 0 for the check, and serve starts all the same."""
    config = write(tmp_path, server={"hostname": "vm"})
    warning = "mailfort: warning: server.hostname: 'vm' is not fully qualified (no dot)"
    r = run(tmp_path, "config", "check", "--config", str(config))
    assert r.returncode == 0 and warning in r.stderr, r.stderr
    assert tomllib.loads(r.stdout)["server"]["hostname"] == "vm"
    proc = subprocess.Popen([sys.executable, "-m", "mailfort", "serve", "--config", str(config)],
                            cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": SRC, "PYTHONWARNINGS": "ignore"})
    try:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stderr.readline()
        assert first.startswith(warning), first
        assert "mailfort is running" in proc.stdout.readline()  # served all the same
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    r = run(tmp_path, "config", "check", "--config",
            str(write(tmp_path, server={"hostname": "mail.example.test"})))
    assert r.returncode == 0 and "warning" not in r.stderr


def test_mta_sts_policy_and_dkim_keygen_only_for_a_local_domain_and_a_full_mx(
        tmp_path: Path) -> None:
    config = str(write(tmp_path, server={"hostname": "vm"}))
    assert run(tmp_path, "domain", "add", "example.test", "--config", config).returncode == 0
    line = refused(tmp_path, "mta-sts", "policy", "example.test", "--config", config)
    assert "mx 'vm' is not a fully qualified host name (no dot)" in line
    r = run(tmp_path, "mta-sts", "policy", "example.test", "--mx", "mail.example.test",
            "--config", config)
    assert r.returncode == 0 and "mx: mail.example.test" in r.stdout, r.stderr
    for command in (("mta-sts", "policy", "other.test", "--mx", "mail.example.test"),
                    ("dkim", "keygen", "other.test")):
        line = refused(tmp_path, *command, "--config", config)
        assert line == ("mailfort: other.test is not a local domain "
                        "(add it with: mailfort domain add other.test)"), line
    assert not (tmp_path / "data" / "dkim" / "other.test").exists()


@pytest.mark.parametrize("command", [
    ("queue", "list"), ("queue", "retry"), ("queue", "show", "X1"), ("user", "list"),
    ("domain", "list"), ("alias", "list"), ("block", "list"), ("dkim", "list"),
    ("tls", "show"),
    ("mta-sts", "policy", "example.test", "--mx", "mail.example.test"),
])
def test_read_only_commands_create_no_data_directory(tmp_path: Path,
                                                     command: tuple[str, ...]) -> None:
    line = refused(tmp_path, *command)
    assert line == ("mailfort: no data directory here (use --config or the directory where "
                    "serve runs): mailfort-data does not exist"), line
    assert list(tmp_path.iterdir()) == []


def test_commands_that_write_may_create_it(tmp_path: Path) -> None:
    assert run(tmp_path, "domain", "add", "example.test").returncode == 0
    assert (tmp_path / "mailfort-data").is_dir()
    assert run(tmp_path, "queue", "list").returncode == 0


def test_password_from_standard_input(tmp_path: Path) -> None:
    assert run(tmp_path, "domain", "add", "example.test").returncode == 0
    r = run(tmp_path, "user", "add", "alice@example.test", "--password-file", "-",
            stdin="correct horse battery\n")
    assert r.returncode == 0, r.stderr
    from mailfort.directory.sqlite import SQLiteDirectory

    d = SQLiteDirectory(tmp_path / "mailfort-data" / "directory.sqlite3")
    stored = d.password_hash("alice@example.test")
    assert stored is not None and verify_password(stored, "correct horse battery")
    # Piped without --password-file: a reason, not an empty "mailfort: ".
    line = refused(tmp_path, "user", "add", "bob@example.test", stdin="correct horse\n")
    assert line == ("mailfort: the password is asked twice, and standard input ended: to "
                    "pipe it once, use --password-file -")
    line = refused(tmp_path, "user", "add", "bob@example.test", "--password-file", "-")
    assert line == "mailfort: --password-file -: nothing on standard input"


def test_status_where_there_is_no_data_directory(tmp_path: Path) -> None:
    """Exit 3 as for a server not running (what monitoring reads), the reason said, and
    nothing created."""
    r = run(tmp_path, "status")
    assert r.returncode == 3, r.stderr
    assert r.stdout == ("mailfort is not running (no data directory here (use --config or the "
                        "directory where serve runs): mailfort-data does not exist)\n")
    assert list(tmp_path.iterdir()) == []
