"""``mailfort dns check`` against the tests' own DNS server on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailfort import config as config_mod
from mailfort.cli import main
from mailfort.policy import clientsetup
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
    for service in clientsetup.SERVICES:  # RFC 6186: what this configuration offers
        name = clientsetup.srv_name(service, "example.test")
        if port := clientsetup.port(cfg, service):
            dns_server.add_srv(name, service.priority, 1, port, HOST)
        else:
            dns_server.add_srv(name, 0, 0, 0, ".")


def test_everything_published_is_ok(dns_server: DNSServer, config_file: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    publish_all(dns_server, config_file)
    code, out = check(config_file, capsys)
    assert code == 0, out
    assert "FIX" not in out
    assert [line.split()[1] for line in out.splitlines()] == [
        "MX", "SPF", "DKIM", "DMARC", "DNSBL", *["SRV"] * 7, "autoconfig"]


def test_nothing_published_prints_every_record_to_publish(
        dns_server: DNSServer, config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(config_file, capsys, "--address", ADDRESS)
    assert code == 1
    assert f"publish: example.test. 3600 IN MX 10 {HOST}." in out
    assert 'publish: example.test. 3600 IN TXT "v=spf1 mx -all"' in out
    assert "mailfort dkim keygen example.test" in out
    assert 'publish: _dmarc.example.test. 3600 IN TXT "v=DMARC1; p=quarantine' in out
    # RFC 6186 / RFC 8314 with the standard public ports: implicit TLS preferred
    for line in (f"_submissions._tcp.example.test. 3600 IN SRV 0 1 465 {HOST}.",
                 f"_submission._tcp.example.test. 3600 IN SRV 10 1 587 {HOST}.",
                 f"_pop3s._tcp.example.test. 3600 IN SRV 20 1 995 {HOST}.",
                 f"_pop3._tcp.example.test. 3600 IN SRV 30 1 110 {HOST}."):
        assert f"publish: {line}" in out
    if getattr(config_mod.load(config_file).listen, "imaps", None):  # IMAP served
        assert f"publish: _imaps._tcp.example.test. 3600 IN SRV 0 1 993 {HOST}." in out
        assert f"publish: _imap._tcp.example.test. 3600 IN SRV 10 1 143 {HOST}." in out
    if getattr(config_mod.load(config_file).listen, "managesieve", None):
        assert f"publish: _sieve._tcp.example.test. 3600 IN SRV 0 1 4190 {HOST}." in out


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


def _srv_fixes(out: str) -> dict[str, str]:
    return {line.split()[2]: line for line in out.splitlines()
            if line.startswith("FIX  SRV")}


def test_wrong_srv_records_are_named(dns_server: DNSServer, config_file: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    publish_all(dns_server, config_file)
    pop3s = "_pop3s._tcp.example.test"
    dns_server.remove(pop3s).add_srv(pop3s, 20, 1, 2995, HOST)  # the embedded port
    pop3 = "_pop3._tcp.example.test"  # not judged against a _pop3s that is itself wrong
    dns_server.remove(pop3).add_srv(pop3, 0, 1, 110, HOST)
    smtp = "_submission._tcp.example.test"  # STARTTLS preferred to implicit TLS (at 5)
    dns_server.remove(smtp).add_srv(smtp, 0, 1, 587, HOST)
    sub = "_submissions._tcp.example.test"
    dns_server.remove(sub).add_srv(sub, 5, 1, 465, HOST)
    imaps = "_imaps._tcp.example.test"  # elsewhere, whether offered here or not
    dns_server.remove(imaps).add_srv(imaps, 0, 1, 993, "mail.elsewhere.test")
    code, out = check(config_file, capsys)
    assert code == 1
    fixes = _srv_fixes(out)
    imap_served = bool(getattr(config_mod.load(config_file).listen, "imaps", None))
    assert set(fixes) == {"_pop3s._tcp", "_submission._tcp",
                          *(["_imaps._tcp"] if imap_served else [])}, out
    assert "20 1 2995 mx.example.test: not mx.example.test port 995" in fixes["_pop3s._tcp"]
    assert "preferred to implicit TLS" in fixes["_submission._tcp"]
    assert f"publish: _submission._tcp.example.test. 3600 IN SRV 10 1 587 {HOST}." in out


def test_a_service_not_offered_must_not_point_here(
        dns_server: DNSServer, tmp_path: Path, config_file: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """POP3 switched off in [client_setup]: "." or no record is fine, a record naming this
    server sends clients to a door that is shut."""
    config_file.write_text(config_file.read_text() + "[client_setup]\npop3 = 0\npop3s = 0\n")
    publish_all(dns_server, config_file)
    assert not _srv_fixes(check(config_file, capsys)[1])
    dns_server.remove("_pop3s._tcp.example.test")  # none at all: fine too
    dns_server.remove("_pop3._tcp.example.test").add_srv("_pop3._tcp.example.test", 0, 1,
                                                         110, HOST)
    code, out = check(config_file, capsys)
    assert code == 1
    assert set(_srv_fixes(out)) == {"_pop3._tcp"}
    assert "publish: _pop3._tcp.example.test. 3600 IN SRV 0 0 0 ." in out


def test_autoconfig_name_when_the_file_is_served(
        dns_server: DNSServer, config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_file.write_text(config_file.read_text()
                           + '[mta_sts]\nlisten = "127.0.0.1:8443"\n')
    publish_all(dns_server, config_file)
    code, out = check(config_file, capsys)
    assert code == 1
    assert "FIX  autoconfig" in out and "autoconfig.example.test does not resolve" in out
    assert f"publish: autoconfig.example.test. 3600 IN CNAME {HOST}." in out
    dns_server.add_a("autoconfig.example.test", "192.0.2.99")
    code, out = check(config_file, capsys)
    assert "is 192.0.2.99, not this server (192.0.2.25)" in out and code == 1
    dns_server.remove("autoconfig.example.test").add_cname("autoconfig.example.test", HOST)
    code, out = check(config_file, capsys)
    assert code == 0, out
    assert "ok   autoconfig" in out and "autoconfig.example.test is 192.0.2.25" in out
