"""What a mail client is told about this server, so that a user types only an address and a
password: Thunderbird's autoconfig file (``config-v1.1.xml``) and the RFC 6186 SRV records
(``_imaps._tcp`` …) and RFC 5804's ``_sieve._tcp`` that ``mailfort dns check`` asks for.

Both say the same thing, from ``[client_setup]``: the public host name and ports (which may
differ from ``[listen]``'s: a firewall forwards 993 to the embedded 2993). A service is told
only when its port there is not 0 and its ``[listen]`` list is not empty; implicit TLS comes
before STARTTLS and IMAP before POP3 (RFC 8314 §5.1, RFC 6186 §3.4: the order is in the SRV
priorities, across the services a client supports). The XML is built with ElementTree, so
that whatever reaches it (a domain of ours, a configured host name) is escaped, never pasted.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import parse_qs

from mailfort.config import Config

PATHS = ("/.well-known/autoconfig/mail/config-v1.1.xml", "/mail/config-v1.1.xml")


@dataclass(frozen=True)
class Service:
    name: str  # the [client_setup] and [listen] key, and the SRV label (_imaps._tcp)
    protocol: str  # Thunderbird's server type: imap, pop3, smtp
    socket: str  # Thunderbird's socketType: SSL (implicit TLS) or STARTTLS
    priority: int  # SRV priority: lower is preferred
    label: str = ""  # the SRV label when it is not ``name`` (ManageSieve: _sieve._tcp)


# In order of preference: implicit TLS first (RFC 8314 §5.1), IMAP before POP3. Submission
# is a namespace of its own, so its priorities start again at 0.
SERVICES: tuple[Service, ...] = (
    Service("imaps", "imap", "SSL", 0),
    Service("imap", "imap", "STARTTLS", 10),
    Service("pop3s", "pop3", "SSL", 20),
    Service("pop3", "pop3", "STARTTLS", 30),
    Service("submissions", "smtp", "SSL", 0),
    Service("submission", "smtp", "STARTTLS", 10),
    # RFC 5804 §1.8: ManageSieve's record is _sieve._tcp; STARTTLS is its only TLS. Not in
    # the autoconfig file (clientConfig 1.1 has no element for it).
    Service("managesieve", "sieve", "STARTTLS", 0, "sieve"),
)


def public_host(cfg: Config) -> str:
    """The name clients connect to: ``client_setup.hostname``, else ``server.hostname``."""
    return (cfg.client_setup.hostname or cfg.server.hostname).rstrip(".").lower()


def port(cfg: Config, service: Service) -> int:
    """The public port of ``service``; 0 when it is not told to clients: its port is 0 in
    [client_setup], or nothing listens for it ([listen] empty, or not a listener here)."""
    listening = getattr(cfg.listen, service.name, ())
    return int(getattr(cfg.client_setup, service.name)) if listening else 0


def offered(cfg: Config) -> list[tuple[Service, int]]:
    """(service, public port) of what clients are told, in order of preference."""
    return [(s, p) for s in SERVICES if (p := port(cfg, s))]


def config_xml(cfg: Config, domain: str) -> bytes:
    """Thunderbird's autoconfig file (clientConfig 1.1) for one of our domains. The user
    name is the whole address (``%EMAILADDRESS%``, which the client fills in): mailfort's
    accounts are addresses. ``password-cleartext`` is a password sent inside TLS: every
    socket told here is TLS, implicit or after STARTTLS."""
    root = ET.Element("clientConfig", version="1.1")
    provider = ET.SubElement(root, "emailProvider", id=domain)
    for tag in ("domain", "displayName", "displayShortName"):
        ET.SubElement(provider, tag).text = domain
    host = public_host(cfg)
    for service, number in offered(cfg):
        if service.protocol == "sieve":
            continue
        kind = "outgoingServer" if service.protocol == "smtp" else "incomingServer"
        server = ET.SubElement(provider, kind, type=service.protocol)
        for tag, text in (("hostname", host), ("port", str(number)),
                          ("socketType", service.socket),
                          ("authentication", "password-cleartext"),
                          ("username", "%EMAILADDRESS%")):
            ET.SubElement(server, tag).text = text
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def asked_domain(host: str, query: str) -> str | None:
    """The domain an autoconfig request is about: that of ``?emailaddress=`` when given
    (Thunderbird sends it), else the Host name without ``autoconfig.``. None when neither
    names a domain. Whether it is ours is the caller's question (the directory)."""
    try:
        addresses = parse_qs(query, max_num_fields=8, strict_parsing=False).get("emailaddress")
    except ValueError:  # more fields than a client sends
        return None
    name = addresses[0].rpartition("@")[2] if addresses else host.removeprefix("autoconfig.")
    name = name.strip().rstrip(".").lower()
    if not name or len(name) > 253 or not all(c.isalnum() or c in ".-" for c in name) \
            or not name.isascii():
        return None
    return name


def srv_name(service: Service, domain: str) -> str:
    return f"_{service.label or service.name}._tcp.{domain}"


def srv_record(cfg: Config, service: Service, domain: str) -> str:
    """The zone line to publish: the public host and port, or the RFC 6186 §4 form for a
    service that is not offered here (target ".": clients do not try it)."""
    number = port(cfg, service)
    if not number:
        return f"{srv_name(service, domain)}. 3600 IN SRV 0 0 0 ."
    return (f"{srv_name(service, domain)}. 3600 IN SRV {service.priority} 1 {number} "
            f"{public_host(cfg)}.")
