"""The ``mailfort`` CLI run as a real subprocess (``python -m mailfort``) in a temp cwd."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mailfort.directory.sqlite import SQLiteDirectory
from mailfort.passwords import verify_password


def run(cwd: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailfort", *args], cwd=cwd, input=stdin, text=True,
        capture_output=True, timeout=60, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def ok(cwd: Path, *args: str) -> str:
    r = run(cwd, *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def fails(cwd: Path, *args: str, stdin: str = "") -> str:
    r = run(cwd, *args, stdin=stdin)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    # Without a terminal getpass prompts (and warns) on stderr; the error itself is one line.
    lines = [ln for ln in r.stderr.splitlines()
             if ln.strip() and not ln.startswith(("Warning: Password", "Password"))]
    assert len(lines) == 1 and lines[0].startswith("mailfort: ")
    return lines[0]


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    (tmp_path / "pw.txt").write_text("correct horse battery\n")
    return tmp_path


def directory(cwd: Path) -> SQLiteDirectory:
    return SQLiteDirectory(cwd / "mailfort-data" / "directory.sqlite3")


def test_domain_user_alias_in_default_data_dir(cwd: Path) -> None:
    ok(cwd, "domain", "add", "Example.TEST")
    out = ok(cwd, "user", "add", "Alice@example.test", "--password-file", "pw.txt")
    assert "alice@example.test" in out
    ok(cwd, "alias", "add", "team@example.test", "alice@example.test", "friend@remote.test")
    assert ok(cwd, "domain", "list").split() == ["example.test"]
    assert ok(cwd, "user", "list").split() == ["alice@example.test"]
    assert "team@example.test\talice@example.test, friend@remote.test" in ok(cwd, "alias", "list")

    d = directory(cwd)
    h = d.password_hash("alice@example.test")
    assert h is not None and h.startswith("$argon2id$")
    assert verify_password(h, "correct horse battery")  # trailing newline not included
    res = d.resolve("team@example.test")
    assert res is not None and res.remote == ("friend@remote.test",)


def test_user_for_foreign_domain_and_unsafe_name_refused(cwd: Path) -> None:
    ok(cwd, "domain", "add", "example.test")
    assert "not a local domain" in fails(cwd, "user", "add", "x@other.test",
                                         "--password-file", "pw.txt")
    assert "local part" in fails(cwd, "user", "add", "../x@example.test",
                                 "--password-file", "pw.txt")
    assert directory(cwd).list_users() == []


def test_password_prompt_twice_and_mismatch(cwd: Path) -> None:
    ok(cwd, "domain", "add", "example.test")
    # getpass falls back to stdin without a terminal: first entry, then confirmation.
    r = run(cwd, "user", "add", "bob@example.test", stdin="s3cret-pass\ns3cret-pass\n")
    assert r.returncode == 0, r.stderr
    h = directory(cwd).password_hash("bob@example.test")
    assert h is not None and verify_password(h, "s3cret-pass")
    assert "do not match" in fails(cwd, "user", "passwd", "bob@example.test",
                                   stdin="new-password-1\nnew-password-2\n")
    assert verify_password(directory(cwd).password_hash("bob@example.test") or "", "s3cret-pass")


def test_short_password_and_no_password_argv(cwd: Path) -> None:
    ok(cwd, "domain", "add", "example.test")
    (cwd / "short.txt").write_text("abc\n")
    assert "at least 8" in fails(cwd, "user", "add", "c@example.test",
                                 "--password-file", "short.txt")
    r = run(cwd, "user", "add", "c@example.test", "--password", "hunter22")
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr


def test_passwd_remove_and_catchall(cwd: Path) -> None:
    ok(cwd, "domain", "add", "example.test")
    ok(cwd, "user", "add", "alice@example.test", "--password-file", "pw.txt")
    (cwd / "pw2.txt").write_text("another-password")
    ok(cwd, "user", "passwd", "ALICE@example.test", "--password-file", "pw2.txt")
    assert verify_password(directory(cwd).password_hash("alice@example.test") or "",
                           "another-password")
    ok(cwd, "domain", "catchall", "example.test", "alice@example.test")
    assert "catch-all -> alice@example.test" in ok(cwd, "domain", "list")
    assert directory(cwd).resolve("whatever@example.test") is not None
    ok(cwd, "domain", "catchall", "example.test", "--off")
    assert directory(cwd).resolve("whatever@example.test") is None
    fails(cwd, "domain", "catchall", "example.test")
    assert "still has 1 user" in fails(cwd, "domain", "remove", "example.test")
    ok(cwd, "user", "remove", "alice@example.test")
    ok(cwd, "domain", "remove", "example.test")
    assert ok(cwd, "domain", "list") == ""
    assert "no such user" in fails(cwd, "user", "remove", "alice@example.test")


def test_alias_remove(cwd: Path) -> None:
    ok(cwd, "domain", "add", "example.test")
    ok(cwd, "alias", "add", "a@example.test", "x@remote.test", "y@remote.test")
    ok(cwd, "alias", "remove", "a@example.test", "x@remote.test")
    assert directory(cwd).list_aliases() == {"a@example.test": ["y@remote.test"]}
    ok(cwd, "alias", "remove", "a@example.test")
    assert directory(cwd).list_aliases() == {}
    assert "no such alias" in fails(cwd, "alias", "remove", "a@example.test")


def test_config_file_moves_the_data_dir(cwd: Path) -> None:
    (cwd / "m.toml").write_text(f'[server]\ndata_dir = "{cwd / "elsewhere"}"\n')
    ok(cwd, "domain", "add", "example.test", "--config", "m.toml")
    ok(cwd, "--config", "m.toml", "user", "add", "a@example.test", "--password-file", "pw.txt")
    assert (cwd / "elsewhere" / "directory.sqlite3").is_file()
    assert not (cwd / "mailfort-data").exists()
    assert ok(cwd, "user", "list", "--config", "m.toml").split() == ["a@example.test"]


def test_config_check_prints_loadable_effective_settings(cwd: Path) -> None:
    (cwd / "m.toml").write_text('[limits]\nmax_recipients = 7\n'
                                '[routes."example.net"]\nhost = "10.0.0.1"\n')
    eff = tomllib.loads(ok(cwd, "config", "check", "--config", "m.toml"))
    assert eff["limits"]["max_recipients"] == 7
    assert eff["routes"]["example.net"] == {
        "host": "10.0.0.1", "port": 25, "require_tls": False, "tls": "may", "auth_user": "",
        "auth_password_file": "", "cafile": ""}
    assert eff["relay"]["trusted_networks"] == []
    as_json = json.loads(ok(cwd, "config", "check", "--json"))
    assert as_json["server"]["data_dir"] == "./mailfort-data"


def test_config_check_bad_key_exits_1_naming_it(cwd: Path) -> None:
    (cwd / "bad.toml").write_text("[limits]\nmax_recipents = 5\n")
    err = fails(cwd, "config", "check", "--config", "bad.toml")
    assert "limits.max_recipents" in err and "unknown key" in err
    (cwd / "relay.toml").write_text('[relay]\ntrusted_networks = ["0.0.0.0/0"]\n')
    err = fails(cwd, "config", "check", "--config", "relay.toml")
    assert "relay.trusted_networks[0]" in err and "open relay" in err
    assert "cannot read" in fails(cwd, "config", "check", "--config", "missing.toml")


def test_serve_with_bad_config_fails_cleanly(cwd: Path) -> None:
    (cwd / "bad.toml").write_text("[server]\nport = 25\n")
    assert "server.port" in fails(cwd, "serve", "--config", "bad.toml")


def test_console_script_installed(cwd: Path) -> None:
    exe = Path(sys.executable).parent / "mailfort"
    if not exe.exists():
        pytest.skip("console script not installed next to this interpreter")
    r = subprocess.run([str(exe), "domain", "add", "example.test"], cwd=cwd,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert directory(cwd).list_domains() == ["example.test"]


def test_dkim_keygen_prints_the_record_and_list_shows_it(cwd: Path) -> None:
    ok(cwd, "domain", "add", "example.test")
    out = ok(cwd, "dkim", "keygen", "Example.TEST", "--selector", "s1")
    key = cwd / "mailfort-data" / "dkim" / "example.test" / "s1.pem"
    assert (key.stat().st_mode & 0o777) == 0o600
    assert "name:   s1._domainkey.example.test" in out
    value = next(ln for ln in out.splitlines() if ln.startswith("value:")).split(None, 1)[1]
    assert value.startswith("v=DKIM1; k=rsa; p=MII")
    # The zone-file line holds the same record, in strings of at most 255 characters.
    zone = next(ln for ln in out.splitlines() if ln.startswith("zone:"))
    strings = zone.split(" TXT ", 1)[1].strip('"').split('" "')
    assert "".join(strings) == value and all(len(s) <= 255 for s in strings)
    ed = ok(cwd, "dkim", "keygen", "example.test", "--selector", "e1", "--algorithm", "ed25519")
    assert "k=ed25519; p=" in ed
    listed = ok(cwd, "dkim", "list").splitlines()
    assert listed[0].split("\t")[:3] == ["example.test", "e1", "ed25519"]
    assert listed[1].split("\t")[:3] == ["example.test", "s1", "rsa"]
    assert value in ok(cwd, "dkim", "list", "example.test", "--records")
    # A published key is never overwritten.
    assert "exists already" in fails(cwd, "dkim", "keygen", "example.test", "--selector", "s1")
    assert "selector" in fails(cwd, "dkim", "keygen", "example.test", "--selector", "../x")
