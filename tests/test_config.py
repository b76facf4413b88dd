"""Configuration loading: every mistake is named by its dotted key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mailfort import config as config_mod
from mailfort.config import Config, ConfigError
from tests.server.production import cli


def load_text(tmp_path: Path, text: str) -> Config:
    p = tmp_path / "mailfort.toml"
    p.write_text(text)
    return config_mod.load(p)


def test_defaults_are_safe() -> None:
    cfg = config_mod.load(None)
    assert cfg == Config()
    assert cfg.relay.trusted_networks == []
    assert cfg.tls.min_version == "TLSv1.2"
    assert cfg.tls.cert_file == ""
    assert not cfg.server.allow_plaintext_auth_on_loopback
    assert all(hp.startswith("127.0.0.1:") for hp in cfg.listen.mx + cfg.listen.submission)
    assert cfg.data_path == Path("./mailfort-data")
    assert cfg.auth.block_after_failures > cfg.auth.delay_after_failures > 0


def test_file_values_override_defaults(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[server]\nhostname = "mx.example.org"\n'
                              '[limits]\nidle_timeout = 60\n'
                              '[routes."example.net"]\nhost = "10.0.0.1"\nport = 2525\n')
    assert cfg.server.hostname == "mx.example.org"
    assert cfg.limits.idle_timeout == 60.0 and isinstance(cfg.limits.idle_timeout, float)
    assert cfg.routes["example.net"].port == 2525
    assert cfg.limits.max_recipients == 100


@pytest.mark.parametrize("text, key", [
    ("[server]\nhostnme = 'x'\n", "server.hostnme"),
    ("[nosuch]\nx = 1\n", "nosuch"),
    ("[relay]\ntrusted = []\n", "relay.trusted"),
])
def test_unknown_key_is_named_with_allowed_ones(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_text(tmp_path, text)
    msg = str(exc.value)
    assert msg.startswith(f"{key}: unknown key")
    assert "allowed here" in msg


@pytest.mark.parametrize("text, key", [
    ("[limits]\nmax_recipients = '100'\n", "limits.max_recipients"),
    ("[limits]\nmax_recipients = true\n", "limits.max_recipients"),
    ("[server]\nallow_plaintext_auth_on_loopback = 1\n", "server.allow_plaintext_auth_on_loopback"),
    ("[listen]\nmx = '127.0.0.1:25'\n", "listen.mx"),
    ("[listen]\nmx = [25]\n", "listen.mx[0]"),
    ("server = 3\n", "server"),
    ("[routes.x]\nport = 25\n", "routes.x"),
])
def test_wrong_type_is_named(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_text(tmp_path, text)
    assert str(exc.value).startswith(f"{key}:")


@pytest.mark.parametrize("net", ["0.0.0.0/0", "::/0", "0.0.0.0/1", "10.0.0.0/4"])
def test_open_relay_networks_refused(tmp_path: Path, net: str) -> None:
    with pytest.raises(ConfigError, match=r"relay\.trusted_networks\[1\].*open relay"):
        load_text(tmp_path, f'[relay]\ntrusted_networks = ["192.168.1.0/24", "{net}"]\n')


OWN_NETWORKS = ["10.0.0.0/8", "172.16.0.0/12", "192.168.1.0/24", "127.0.0.1", "169.254.0.0/16",
                "fd12:3456::/48", "fe80::/10", "::1", "::ffff:10.1.0.0/112"]


def test_own_networks_accepted(tmp_path: Path) -> None:
    """Private (RFC 1918, RFC 4193), loopback and link-local space, IPv4 and IPv6."""
    cfg = config_mod.from_dict({"relay": {"trusted_networks": OWN_NETWORKS}})
    assert cfg.relay.trusted_networks == OWN_NETWORKS


@pytest.mark.parametrize("net", [
    "11.0.0.0/8", "12.0.0.0/8", "8.8.8.0/24", "172.0.0.0/11",  # 172.16/12 and public 172/12
    "100.64.0.0/10",  # CGNAT (RFC 6598): the carrier's other customers share it
    "203.0.113.0/24", "2001:db8::/48", "2a00:1450::/32", "::ffff:11.0.0.0/104", "0.0.0.0/8",
    "64:ff9b::a00:0/120",  # NAT64 of 10.0.0.0/24: the translator's public clients relay
])
def test_public_trusted_networks_refused(tmp_path: Path, net: str) -> None:
    """Every host of a public network could relay through us: refused, naming the entry."""
    with pytest.raises(ConfigError) as exc:
        config_mod.from_dict({"relay": {"trusted_networks": ["10.0.0.0/8", net]}})
    msg = str(exc.value)
    assert msg.startswith("relay.trusted_networks[1]: ")
    assert net in msg and "not private" in msg and "relay.i_know_these_are_public" in msg


def test_public_network_accepted_when_named_as_public() -> None:
    cfg = config_mod.from_dict({"relay": {
        "trusted_networks": ["192.168.0.0/16", "203.0.113.0/24", "2001:DB8::/48"],
        "i_know_these_are_public": ["2001:db8::/48", "203.0.113.0/24"]}})
    assert cfg.relay.trusted_networks[1] == "203.0.113.0/24"
    # The acknowledgement must name an entry of trusted_networks, and never waives the
    # open-relay bound.
    with pytest.raises(ConfigError, match=r"^relay\.i_know_these_are_public\[0\]: "
                                          r"198\.51\.100\.0/24 is not in relay"):
        config_mod.from_dict({"relay": {"trusted_networks": ["203.0.113.0/24"],
                                        "i_know_these_are_public": ["198.51.100.0/24"]}})
    with pytest.raises(ConfigError, match=r"^relay\.trusted_networks\[0\]: .*open relay"):
        config_mod.from_dict({"relay": {"trusted_networks": ["0.0.0.0/0"],
                                        "i_know_these_are_public": ["0.0.0.0/0"]}})


@pytest.mark.parametrize("net, suggestion", [
    ("10.0.0.1/8", "10.0.0.0/8"), ("192.168.1.77/24", "192.168.1.0/24"),
    ("fd00::1/8", "fd00::/8"),
])
def test_host_bits_refused_with_the_network_suggested(net: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config_mod.from_dict({"relay": {"trusted_networks": [net]}})
    msg = str(exc.value)
    assert msg.startswith(f"relay.trusted_networks[0]: {net} has host bits set")
    assert f"did you mean {suggestion}" in msg


def test_config_check_and_serve_refuse_public_trusted_networks(tmp_path: Path) -> None:
    """The real commands: ``config check`` and ``serve`` load the configuration alike."""
    public, hostbits, named = tmp_path / "public.toml", tmp_path / "hostbits.toml", \
        tmp_path / "named.toml"
    public.write_text('[relay]\ntrusted_networks = ["10.0.0.0/8", "11.0.0.0/8", "12.0.0.0/8"]\n')
    hostbits.write_text('[relay]\ntrusted_networks = ["10.0.0.1/8"]\n')
    for command in (["config", "check"], ["serve"]):
        r = cli(public, *command, cwd=tmp_path)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert "relay.trusted_networks[1]: 11.0.0.0/8 is public" in r.stderr
        r = cli(hostbits, *command, cwd=tmp_path)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert "10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8" in r.stderr
    named.write_text('[relay]\ntrusted_networks = ["10.0.0.0/8", "11.0.0.0/8"]\n'
                     'i_know_these_are_public = ["11.0.0.0/8"]\n')
    r = cli(named, "config", "check", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert tomllib.loads(r.stdout)["relay"] == {
        "trusted_networks": ["10.0.0.0/8", "11.0.0.0/8"],
        "i_know_these_are_public": ["11.0.0.0/8"]}
