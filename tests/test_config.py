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


@pytest.mark.parametrize("table, key", [
    ({"relay": {"trusted_networks": ["nonsense"]}}, "relay.trusted_networks[0]"),
    ({"listen": {"mx": ["localhost:25"]}}, "listen.mx[0]"),
    ({"listen": {"pop3": ["127.0.0.1:70000"]}}, "listen.pop3[0]"),
    ({"limits": {"max_errors": 0}}, "limits.max_errors"),
    ({"tls": {"min_version": "TLSv1.0"}}, "tls.min_version"),
    ({"store": {"flush": "never"}}, "store.flush"),
    ({"store": {"watch_poll": "sometimes"}}, "store.watch_poll"),
    ({"store": {"watch_poll_interval": 0}}, "store.watch_poll_interval"),
    ({"tls": {"cert_file": "/x.pem"}}, "tls.cert_file"),
    ({"server": {"hostname": "a b"}}, "server.hostname"),
    ({"server": {"data_dir": ""}}, "server.data_dir"),
    ({"server": {"workers": -1}}, "server.workers"),
    ({"server": {"shutdown_grace": -1.0}}, "server.shutdown_grace"),
    ({"auth": {"block_after_failures": 0}}, "auth.block_after_failures"),
    ({"auth": {"delay_after_failures": -1}}, "auth.delay_after_failures"),
    ({"auth": {"block_seconds": 0}}, "auth.block_seconds"),
    ({"auth": {"failure_delay": -0.5}}, "auth.failure_delay"),
    ({"submission": {"messages_per_hour": 0}}, "submission.messages_per_hour"),
    ({"submission": {"recipients_per_hour": 0}}, "submission.recipients_per_hour"),
    ({"dns": {"port": 0}}, "dns.port"),
    ({"dns": {"nameservers": ["127.0.0.1", "dns.google"]}}, "dns.nameservers[1]"),
    ({"routes": {"example.net": {"host": "h", "port": 0}}}, "routes.example.net.port"),
    ({"dnsbl": {"zones": [{"zone": "nodot"}]}}, "dnsbl.zones[0].zone"),
    ({"dnsbl": {"zones": [{"zone": "bl.test", "weight": 0}]}}, "dnsbl.zones[0].weight"),
    ({"dnsbl": {"zones": [{"zone": "bl.test", "codes": ["127.0.0.2", "10.0.0.1"]}]}},
     "dnsbl.zones[0].codes[1]"),
    ({"dnsbl": {"zones": [{"weight": 2}]}}, "dnsbl.zones[0]"),
    ({"dnsbl": {"sender_zones": [{"zone": "a b.test"}]}}, "dnsbl.sender_zones[0].zone"),
    ({"dnsbl": {"threshold": 0}}, "dnsbl.threshold"),
    ({"dnsbl": {"reject_at": "data"}}, "dnsbl.reject_at"),
    ({"dnsbl": {"timeout": 0}}, "dnsbl.timeout"),
    ({"screen": {"greeting_delay": -1}}, "screen.greeting_delay"),
    ({"screen": {"allow_networks": ["192.0.2.0/24", "x"]}}, "screen.allow_networks[1]"),
    ({"greylist": {"delay": 200000}}, "greylist.delay"),
    ({"greylist": {"auto_allow_after": -1}}, "greylist.auto_allow_after"),
    ({"limits": {"max_connection_rate_per_ip": -1}}, "limits.max_connection_rate_per_ip"),
])
def test_cross_checks_name_the_key(table: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config_mod.from_dict(table)  # type: ignore[arg-type]
    assert str(exc.value).startswith(key)


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config_mod.load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_text(tmp_path, "[server\n")


def test_effective_is_plain_data() -> None:
    eff = config_mod.effective(Config())
    assert eff["auth"]["block_after_failures"] == 10
    assert eff["relay"]["trusted_networks"] == []


def test_sender_auth_is_on_by_default_and_validated(tmp_path: Path) -> None:
    sa = config_mod.load(None).sender_auth
    assert sa.enabled and sa.dmarc_enforce and sa.sign_submissions
    assert sa.spf_fail == "mark" and sa.quarantine == "header"
    cfg = load_text(tmp_path, '[sender_auth]\nspf_fail = "reject"\nquarantine = "junk"\n')
    assert (cfg.sender_auth.spf_fail, cfg.sender_auth.quarantine) == ("reject", "junk")
    for bad, key in (('spf_fail = "drop"', "sender_auth.spf_fail"),
                     ('quarantine = "spam"', "sender_auth.quarantine"),
                     ('quarantine_header = "X Bad: y"', "sender_auth.quarantine_header"),
                     ("spf_time_budget = 0", "sender_auth.spf_time_budget"),
                     ("dkim_max_bytes = -1", "sender_auth.dkim_max_bytes"),
                     ("enabled = 1", "sender_auth.enabled")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_text(tmp_path, f"[sender_auth]\n{bad}\n")


def test_antiabuse_tables(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, """
[dnsbl]
zones = [{ zone = "zen.example.org", weight = 2, codes = ["127.0.0.2-127.0.0.11"] },
         { zone = "bl.example.net" }]
threshold = 2
reject_at = "rcpt"
[screen]
greeting_delay = 1.5
allow_networks = ["192.0.2.0/24", "2001:db8::/32"]
[greylist]
enabled = true
delay = 120
""")
    assert [(z.zone, z.weight, z.codes) for z in cfg.dnsbl.zones] == [
        ("zen.example.org", 2, ["127.0.0.2-127.0.0.11"]), ("bl.example.net", 1, [])]
    assert cfg.dnsbl.reject_at == "rcpt" and cfg.screen.greeting_delay == 1.5
    assert cfg.greylist.enabled and cfg.greylist.delay == 120.0
    # every anti-abuse check is off by default
    d = Config()
    assert d.dnsbl.zones == [] and d.screen.greeting_delay == 0 and not d.greylist.enabled
    assert d.limits.max_connection_rate_per_ip == 0


def test_default_hostname_is_the_machines(monkeypatch: pytest.MonkeyPatch) -> None:
    """As an MTA's own name is by default: the fully qualified name, never the software's."""
    import socket

    monkeypatch.setattr(socket, "getfqdn", lambda: "mx1.example.org")
    assert Config().server.hostname == "mx1.example.org"
    monkeypatch.setattr(socket, "getfqdn", lambda: "localhost")
    monkeypatch.setattr(socket, "gethostname", lambda: "box")
    assert Config().server.hostname == "box"


@pytest.mark.parametrize("text, key", [
    ("[limits]\nstress_threshold = 1.5\n", "limits.stress_threshold"),
    ("[limits]\nstress_threshold = -0.1\n", "limits.stress_threshold"),
    ("[limits]\nstress_idle_timeout = 0\n", "limits.stress_idle_timeout"),
    ("[limits]\nstress_max_errors = 0\n", "limits.stress_max_errors"),
])
def test_stress_mode_limits_are_checked(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_text(tmp_path, text)
    assert str(exc.value).startswith(f"{key}:")


@pytest.mark.parametrize("text, key", [
    ("[limits]\nimap_login_timeout = 0\n", "limits.imap_login_timeout"),
    ("[limits]\nimap_timeout = -1\n", "limits.imap_timeout"),
    ("[limits]\nimap_idle_timeout = 0\n", "limits.imap_idle_timeout"),
    ("[limits]\nimap_sessions_per_user = 0\n", "limits.imap_sessions_per_user"),
    ("[limits]\nimap_append_limit = 0\n", "limits.imap_append_limit"),
    ('[listen]\nimap = ["127.0.0.1"]\n', "listen.imap[0]"),
    ('[listen]\nimaps = ["127.0.0.1:2525"]\nmx = ["127.0.0.1:2525"]\n', "listen.imaps[0]"),
])
def test_imap_settings_are_checked(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg = load_text(tmp_path, text)
        config_mod.preflight(cfg)
    assert str(exc.value).startswith(f"{key}:")


def test_imap_defaults() -> None:
    lim = Config().limits
    assert (lim.imap_login_timeout, lim.imap_timeout, lim.imap_idle_timeout) == (60, 1800, 1800)
    assert (lim.imap_sessions_per_user, lim.imap_append_limit) == (20, 25 * 1024 * 1024)


def test_stress_mode_settings_come_from_limits(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "[limits]\nstress_threshold = 0.5\nstress_idle_timeout = 4\n")
    assert (cfg.limits.stress.threshold, cfg.limits.stress.idle_timeout,
            cfg.limits.stress.max_errors) == (0.5, 4.0, 3)


def test_mail_dir_defaults_to_mail_under_data_dir() -> None:
    default = config_mod.from_dict({"server": {"data_dir": "/srv/d"}})
    assert default.mail_path == Path("/srv/d/mail")
    shared = config_mod.from_dict({"server": {"data_dir": "/srv/d", "mail_dir": "/shared/m"}})
    assert shared.mail_path == Path("/shared/m")


def test_directory_backend_is_embedded_by_default_and_checked() -> None:
    assert Config().directory.backend == "sqlite"
    ok = config_mod.from_dict({"directory": {"backend": "postgresql",
                                             "url": "postgresql://mf@db.example:5432/mail"}})
    assert ok.directory.url.endswith("/mail")
    for table, message in (
        ({"backend": "mysql"}, "directory.backend"),
        ({"backend": "postgresql", "url": "http://x"}, "directory.url"),
        ({"backend": "postgresql", "url": "postgresql://mf:hunter2@db/mail"}, "password"),
        ({"backend": "postgresql", "url": "postgresql://mf@db/mail?password=x"}, "password"),
        ({"url": "postgresql://mf@db/mail"}, "only for"),
    ):
        with pytest.raises(ConfigError, match=message) as err:
            config_mod.from_dict({"directory": table})
        assert "hunter2" not in str(err.value)


def test_pop3_lease_seconds_defaults_to_30_and_must_cover_its_renewals() -> None:
    """The lease is renewed every third of it: below a second it would not survive a slow
    Redis round trip; a node that dies keeps its maildrops locked this long."""
    assert config_mod.from_dict({}).counters.pop3_lease_seconds == 30.0
    assert config_mod.from_dict(
        {"counters": {"pop3_lease_seconds": 5}}).counters.pop3_lease_seconds == 5
    with pytest.raises(ConfigError, match=r"counters\.pop3_lease_seconds"):
        config_mod.from_dict({"counters": {"pop3_lease_seconds": 0.5}})


@pytest.mark.parametrize("table, key", [
    ({"listen": {"mx": ["127.0.0.1:2525"], "pop3": ["127.0.0.1:2525"]}}, "listen.pop3[0]"),
    ({"listen": {"mx": ["[::]:2525"], "pop3": ["[::1]:2525"]}}, "listen.pop3[0]"),
    ({"listen": {"mx": [], "submission": [], "submissions": [], "pop3": [], "pop3s": [],
                 "imap": [], "imaps": [], "managesieve": []}}, "listen"),
    ({"server": {"user": "no-such-user-here"}}, "server.user"),
    ({"tls": {"cert_file": "/nonexistent/c.pem", "key_file": "/nonexistent/k.pem"}},
     "tls.cert_file"),
    ({"log": {"file": "/nonexistent/mailfort.log"}}, "log.file"),
])
def test_preflight_names_the_key(table: dict[str, object], key: str) -> None:
    """serve's own checks (also run by ``config check``); the TOML itself is valid."""
    cfg = config_mod.from_dict(table)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as exc:
        config_mod.preflight(cfg)
    assert str(exc.value).startswith(f"{key}:")


def test_preflight_accepts_the_families_apart_and_warns_of_a_short_host_name() -> None:
    cfg = config_mod.from_dict({"server": {"hostname": "mail.example.test"},
                                "listen": {"mx": ["0.0.0.0:2525"], "pop3": ["[::]:2525"]}})
    assert config_mod.preflight(cfg) == []
    short = config_mod.from_dict({"server": {"hostname": "vm"}})
    (warning,) = config_mod.preflight(short)
    assert warning.startswith("server.hostname: 'vm' is not fully qualified")


def test_milter_entries_are_read_in_order_with_safe_defaults(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[[milter]]\naddress = "inet:127.0.0.1:11332"\n'
                              '[[milter]]\naddress = "unix:/run/clamav/milter.sock"\n'
                              'on_error = "accept"\nservices = ["mx"]\ncommand_timeout = 5\n')
    rspamd, clam = cfg.milter
    assert rspamd.on_error == "tempfail"  # never unfiltered unless the operator says so
    assert rspamd.services == ["mx", "submission", "submissions"]
    assert rspamd.reuse == "continue"  # kept only where every milter takes QUIT_NC
    assert (clam.on_error, clam.services, clam.command_timeout) == ("accept", ["mx"], 5.0)
    assert Config().milter == []


@pytest.mark.parametrize("entry, message", [
    ('address = "127.0.0.1:11332"', r"milter\[0\]\.address: expected inet:HOST:PORT"),
    ('address = "inet:localhost:11332"', r"milter\[0\]\.address: 'localhost' is not an IP"),
    ('address = "inet:127.0.0.1:0"', r"milter\[0\]\.address"),
    ('address = "unix:run/m.sock"', r"milter\[0\]\.address: .*must be absolute"),
    ('address = "inet:[::1]:1"\non_error = "reject"', r"milter\[0\]\.on_error: allowed"),
    ('address = "inet:[::1]:1"\nservices = ["pop3"]', r"milter\[0\]\.services: "),
    ('address = "inet:[::1]:1"\nservices = []', r"milter\[0\]\.services: "),
    ('address = "inet:[::1]:1"\ncommand_timeout = 0', r"milter\[0\]\.command_timeout: "),
    ('address = "inet:[::1]:1"\nmessage_timeout = 5', r"milter\[0\]\.message_timeout: "),
    ('address = "inet:[::1]:1"\nreuse = "yes"', r"milter\[0\]\.reuse: allowed"),
    ('on_error = "accept"', r"^milter\[0\]: .*address"),
    ('address = "inet:[::1]:1"\nactions = 1', r"^milter\[0\]\.actions: unknown key"),
])
def test_milter_mistakes_are_named(tmp_path: Path, entry: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_text(tmp_path, f"[[milter]]\n{entry}\n")


def test_milter_connection_limit_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"limits\.max_milter_connections"):
        load_text(tmp_path, '[limits]\nmax_milter_connections = 0\n'
                            '[[milter]]\naddress = "inet:127.0.0.1:11332"\n')
    with pytest.raises(ConfigError, match=r"limits\.milter_wait"):
        load_text(tmp_path, "[limits]\nmilter_wait = -1\n")
