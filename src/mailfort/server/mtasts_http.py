"""Our own MTA-STS policy over HTTPS (RFC 8461 §3.3), ``[mta_sts] listen``, and on the same
listener the mail clients' autoconfig file (``[client_setup]``, policy/clientsetup.py).

Senders fetch ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``; the same policy serves
every domain of ours (it names MX hosts, not domains), so the Host header only has to be an
``mta-sts.`` name. Thunderbird fetches ``https://autoconfig.DOMAIN/mail/config-v1.1.xml``
and ``https://DOMAIN/.well-known/autoconfig/mail/config-v1.1.xml`` (with
``?emailaddress=``): answered only for a local domain, 404 for any other, so the listener
tells nothing about domains that are not ours. ``respond`` is the whole protocol, bytes in
and bytes out, and answers only GET and HEAD of those paths; everything read from the
network is bounded (the request head, the time to send it, the connections at once). The
asyncio part only moves bytes. The certificate is the one of [tls], which must name
``mta-sts.DOMAIN`` (and ``autoconfig.DOMAIN``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable

from mailfort.config import Config
from mailfort.delivery.mtasts import publish
from mailfort.directory.base import Directory, is_blocking
from mailfort.policy import clientsetup

log = logging.getLogger("mailfort.mta_sts")

PATH = "/.well-known/mta-sts.txt"
MAX_HEAD = 8192  # octets of request line and headers
REQUEST_TIMEOUT = 10.0  # seconds for the client to send its request
MAX_CONNECTIONS = 64


def policy_text(cfg: Config) -> str:
    """The policy file, exactly as ``mailfort mta-sts policy`` prints it."""
    m = cfg.mta_sts
    _, text = publish("", m.mx or [cfg.server.hostname], mode=m.mode, max_age=m.max_age)
    return text


def _response(status: str, body: bytes, *, head_only: bool = False,
              extra: tuple[str, ...] = (), ctype: str = "text/plain; charset=utf-8") -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Type: {ctype}", f"Content-Length: {len(body)}",
             "Cache-Control: max-age=300", "Connection: close", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (b"" if head_only else body)


def respond(head: bytes, policy: str,
            autoconfig: Callable[[str], bytes | None] | None = None) -> bytes:
    """The answer to one request head (request line and headers, CRLF CRLF excluded).
    ``autoconfig``: the autoconfig file of a domain, None when it is not ours (None: the
    autoconfig paths are not served)."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return _response("400 Bad Request", b"bad request\n")
    request_line, _, header_text = text.partition("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return _response("400 Bad Request", b"bad request\n")
    method, target, _ = parts
    hosts = [v.strip().lower() for k, _, v in (h.partition(":") for h in header_text.split("\r\n"))
             if k.strip().lower() == "host"]
    if len(hosts) > 1 or (parts[2] == "HTTP/1.1" and not hosts):
        return _response("400 Bad Request", b"bad request\n")  # RFC 9112 §3.2
    host = hosts[0].rsplit(":", 1)[0] if hosts and not hosts[0].endswith("]") else ""
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", b"method not allowed\n",
                         extra=("Allow: GET, HEAD",))
    path, _, query = target.partition("?")
    if autoconfig is not None and path in clientsetup.PATHS:
        return _autoconfig(method, path, query, host, autoconfig)
    if target != PATH or (host and not host.startswith("mta-sts.")):
        return _response("404 Not Found", b"not found\n", head_only=method == "HEAD")
    # RFC 8461 §3.3: media type text/plain; no redirects, no other content.
    return _response("200 OK", policy.encode("ascii"), head_only=method == "HEAD",
                     ctype="text/plain")


def _autoconfig(method: str, path: str, query: str, host: str,
                autoconfig: Callable[[str], bytes | None]) -> bytes:
    """``/mail/config-v1.1.xml`` is the path on ``autoconfig.DOMAIN`` only; the well-known
    one is asked of the domain itself (or of any name of ours that its certificate names)."""
    head_only = method == "HEAD"
    domain = clientsetup.asked_domain(host, query)
    if (path == clientsetup.PATHS[1] and host and not host.startswith("autoconfig.")) \
            or domain is None:
        return _response("404 Not Found", b"not found\n", head_only=head_only)
    body = autoconfig(domain)
    if body is None:  # not a domain of ours: the same 404 as any unknown path
        return _response("404 Not Found", b"not found\n", head_only=head_only)
    return _response("200 OK", body, head_only=head_only, ctype="text/xml; charset=utf-8")


class PolicyServer:
    """The HTTPS listener; ``start`` binds it, ``close`` stops it."""

    def __init__(self, cfg: Config, ssl_context: ssl.SSLContext,
                 directory: Directory | None = None) -> None:
        """``directory``: whose local domains get the autoconfig file ([client_setup]
        autoconfig); None: the autoconfig paths are not served."""
        self.policy = policy_text(cfg)
        self.ssl_context = ssl_context
        self.autoconfig: Callable[[str], bytes | None] | None = None
        self._blocking = is_blocking(directory)
        if directory is not None and cfg.client_setup.autoconfig:
            local = directory.is_local_domain

            def autoconfig(domain: str) -> bytes | None:
                return clientsetup.config_xml(cfg, domain) if local(domain) else None

            self.autoconfig = autoconfig
        self.server: asyncio.base_events.Server | None = None
        self._open = 0

    async def start(self, hostport: str, sock: socket.socket | None = None) -> int:
        """Listen on ``hostport``, or on ``sock`` when one is already bound there (worker
        processes: the supervisor binds it before it drops privileges)."""
        host, _, port = hostport.rpartition(":")
        if sock is not None:
            self.server = await asyncio.start_server(
                self._client, sock=sock, ssl=self.ssl_context,
                ssl_handshake_timeout=REQUEST_TIMEOUT, limit=MAX_HEAD)
        else:
            self.server = await asyncio.start_server(
                self._client, host.strip("[]"), int(port), ssl=self.ssl_context,
                ssl_handshake_timeout=REQUEST_TIMEOUT, limit=MAX_HEAD, reuse_address=True)
        bound = int(self.server.sockets[0].getsockname()[1])
        log.info("MTA-STS policy on https://%s:%d%s", host, bound, PATH)
        if self.autoconfig is not None:
            log.info("mail client autoconfig on https://%s:%d%s", host, bound,
                     clientsetup.PATHS[0])
        return bound

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2.0)
            self.server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > MAX_CONNECTIONS:
                return  # closed at once: a flood gets nothing, the policy stays cacheable
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                writer.write(_response("431 Request Header Fields Too Large", b"too large\n"))
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                return
            else:
                try:
                    if self._blocking:  # a network directory (PostgreSQL): off the loop
                        answer = await asyncio.to_thread(respond, head[:-4], self.policy,
                                                         self.autoconfig)
                    else:
                        answer = respond(head[:-4], self.policy, self.autoconfig)
                except Exception as exc:  # the directory failed (its database is down)
                    log.warning("autoconfig: the directory did not answer: %s", exc)
                    answer = _response("503 Service Unavailable", b"try again later\n")
                writer.write(answer)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    await writer.drain()
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await writer.wait_closed()
