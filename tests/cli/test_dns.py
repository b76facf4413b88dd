"""``mailfort dns check`` against the tests' own DNS server on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailfort import config as config_mod
from mailfort.cli import main
from mailfort.policy.dkim import KeyStore
from tests.dnsserver import DNSServer

HOST = "mx.example.test"
ADDRESS = "192.0.2.25"  # only ever looked up in the test DNS, never connected to



@pytest.fixture
def config_file(tmp_path: Path, dns_server: DNSServer) -> Path:
    path = tmp_path / "mailfort.toml"
    path.write_text(
        f'[server]\nhostname = "{HOST}"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns_server.port}\ntimeout = 2.0\n'
        '[dnsbl]\nzones = [{ zone = "bl.test" }]\n')
    return path


def check(config_file: Path, capsys: pytest.CaptureFixture[str], *extra: str
          ) -> tuple[int, str]:
    code = main(["dns", "check", "example.test", "--config", str(config_file), *extra])
    return code, capsys.readouterr().out


def publish_all(dns_server: DNSServer, config_file: Path) -> None:
    cfg = config_mod.load(config_file)
    key = KeyStore(cfg.data_path).generate("example.test", "s1", "ed25519")
    dns_server.add_mx("example.test", HOST)
    dns_server.add_a(HOST, ADDRESS)
    dns_server.add_txt("example.test", "v=spf1 mx -all")
    dns_server.add_txt(key.dns_name, key.dns_record())
    dns_server.add_txt("_dmarc.example.test", "v=DMARC1; p=reject")


def test_everything_published_is_ok(dns_server: DNSServer, config_file: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    publish_all(dns_server, config_file)
    code, out = check(config_file, capsys)
    assert code == 0, out
    assert "FIX" not in out
    assert [line.split()[1] for line in out.splitlines()] == [
        "MX", "SPF", "DKIM", "DMARC", "DNSBL"]


def test_nothing_published_prints_every_record_to_publish(
        dns_server: DNSServer, config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(config_file, capsys, "--address", ADDRESS)
    assert code == 1
    assert f"publish: example.test. 3600 IN MX 10 {HOST}." in out
    assert 'publish: example.test. 3600 IN TXT "v=spf1 mx -all"' in out
    assert "mailfort dkim keygen example.test" in out
    assert 'publish: _dmarc.example.test. 3600 IN TXT "v=DMARC1; p=quarantine' in out


def test_each_wrong_record_is_named(dns_server: DNSServer, config_file: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    publish_all(dns_server, config_file)
    dns_server.remove("example.test", "TXT").add_txt("example.test",
                                                     "v=spf1 ip4:198.51.100.0/24 -all")
    dns_server.remove("_dmarc.example.test").add_txt("_dmarc.example.test", "v=DMARC1; p=none")
    dns_server.remove("example.test", "MX").add_mx("example.test", "mx.elsewhere.test")
    dns_server.list_ip("bl.test", ADDRESS)
    code, out = check(config_file, capsys)
    assert code == 1
    fixes = {line.split()[1] for line in out.splitlines() if line.startswith("FIX")}
    assert fixes == {"MX", "SPF", "DMARC", "DNSBL"}, out
    assert f"{ADDRESS}: fail" in out and "p=none" in out and "listed: 192.0.2.25" in out


def test_a_key_not_yet_published_gets_its_zone_line(
        dns_server: DNSServer, config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    publish_all(dns_server, config_file)
    cfg = config_mod.load(config_file)
    late = KeyStore(cfg.data_path).generate("example.test", "s2", "rsa")
    code, out = check(config_file, capsys)
    assert code == 1
    assert f"publish: {late.zone_line()}" in out


def test_a_bad_address_is_a_usage_error(config_file: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["dns", "check", "example.test", "--config", str(config_file),
              "--address", "not-an-ip"])
    assert exc.value.code == 2
