"""What clients are told (policy/clientsetup.py): the autoconfig XML and the SRV zone lines
agree with [client_setup] and [listen], in the order RFC 8314 and RFC 6186 ask for."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from types import SimpleNamespace

from mailfort.config import Config, from_dict
from mailfort.policy import clientsetup

ALL = ("imaps", "imap", "pop3s", "pop3", "submissions", "submission")


def _with_listeners(cfg: Config, *names: str) -> Config:
    """``cfg`` whose [listen] serves exactly ``names`` (the IMAP ones included, whatever
    this build's ListenConfig holds)."""
    listen = SimpleNamespace(**{n: (["127.0.0.1:0"] if n in names else []) for n in ALL})
    return dataclasses.replace(cfg, listen=listen)  # type: ignore[arg-type]


def test_implicit_tls_first_imap_before_pop3() -> None:
    cfg = _with_listeners(from_dict({"server": {"hostname": "mx.example.test"}}), *ALL)
    root = ET.fromstring(clientsetup.config_xml(cfg, "example.test"))
    got = [(el.get("type"), el.findtext("port"), el.findtext("socketType"))
           for el in root.iter() if el.tag.endswith("Server")]
    assert got == [("imap", "993", "SSL"), ("imap", "143", "STARTTLS"),
                   ("pop3", "995", "SSL"), ("pop3", "110", "STARTTLS"),
                   ("smtp", "465", "SSL"), ("smtp", "587", "STARTTLS")]
    assert {el.text for el in root.iter("hostname")} == {"mx.example.test"}
    assert {el.text for el in root.iter("authentication")} == {"password-cleartext"}


def test_a_service_without_listener_or_port_is_not_told() -> None:
    cfg = _with_listeners(from_dict({"client_setup": {"submission": 0, "hostname":
                                                      "Mail.Example.TEST."}}),
                          "imaps", "submissions", "submission", "pop3")
    assert [(s.name, p) for s, p in clientsetup.offered(cfg)] == [
        ("imaps", 993), ("pop3", 110), ("submissions", 465)]
    lines = {s.name: clientsetup.srv_record(cfg, s, "example.test")
             for s in clientsetup.SERVICES}
    assert lines["imaps"] == "_imaps._tcp.example.test. 3600 IN SRV 0 1 993 mail.example.test."
    assert lines["pop3"] == "_pop3._tcp.example.test. 3600 IN SRV 30 1 110 mail.example.test."
    # RFC 6186 §4: "." says the service is not offered at all
    assert lines["imap"] == "_imap._tcp.example.test. 3600 IN SRV 0 0 0 ."
    assert lines["submission"] == "_submission._tcp.example.test. 3600 IN SRV 0 0 0 ."


def test_markup_in_a_name_is_escaped_not_pasted() -> None:
    cfg = Config()
    body = clientsetup.config_xml(cfg, 'a"&<b>')
    provider = ET.fromstring(body).find("emailProvider")
    assert provider is not None and provider.get("id") == 'a"&<b>'
    assert provider.findtext("domain") == 'a"&<b>'
    assert b"<b>" not in body


def test_asked_domain() -> None:
    ask = clientsetup.asked_domain
    assert ask("autoconfig.example.test", "") == "example.test"
    assert ask("example.test", "") == "example.test"
    assert ask("x.test", "emailaddress=alice%40Example.TEST") == "example.test"
    assert ask("x.test", "emailaddress=a@ex%20ample.test") is None
    assert ask("x.test", "emailaddress=a@ex%C3%A4mple.test") is None
    assert ask("x.test", "emailaddress=a@") is None
    assert ask("", "") is None
    assert ask("x.test", "&".join(["a=1"] * 9)) is None  # more fields than a client sends


def test_readme_block_is_valid_and_names_the_defaults() -> None:
    """The README's [client_setup] example loads, and the defaults it states are these."""
    import re
    import tomllib
    from pathlib import Path

    from mailfort.config import ClientSetupConfig

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```toml\n(\[client_setup\]\n.*?)```", readme, re.DOTALL)
    assert block is not None
    cfg = from_dict(tomllib.loads(block.group(1)))
    assert cfg.client_setup.hostname == "mail.example.org"
    told = dict(re.findall(r"(\w+) = (\d+)", block.group(1)))
    d = ClientSetupConfig()
    assert {k: int(v) for k, v in told.items()} == {k: getattr(d, k) for k in told}
    assert set(told) == {s.name for s in clientsetup.SERVICES}
