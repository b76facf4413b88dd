"""Certificates from an ACME CA (RFC 8555) for ``server.hostname``: ``[tls] acme = true``.

The account key, the certificate key and the certificate live in ``<data_dir>/acme/``
(0700, keys 0600). ``ensure`` runs at start, before the listeners exist: it orders a
certificate when there is none or it expires within ``tls.acme_renew_days``. The HTTP-01
challenge is answered by ``ChallengeServer`` on ``tls.acme_http_listen`` (port 80 on the
Internet), bound once, as root when started so, and kept for the process's life, so that a
renewal after the privilege drop can still answer on it. ``renew_if_due`` is what a
periodic task calls; it returns True when new files were written (the caller reloads).
Started as root with ``server.user``, only the listener is made as root: the first order,
which writes into the data directory (the service user's to change), waits for the drop
(server/operations.py).
"""

from __future__ import annotations

import datetime as dt
import http.server
import logging
import socket
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mailfort.config import Config, ConfigError
from mailfort.tls import _write_private
from mailfort.tls import acme_paths as paths

log = logging.getLogger("mailfort")

ACCOUNT_KEY = "account.pem"
ORDER_TIMEOUT = 90.0


def acme_dir(cfg: Config) -> Path:
    return paths(cfg)[0].parent


class ChallengeServer:
    """Answers ``GET /.well-known/acme-challenge/TOKEN`` with the key authorization."""

    PREFIX = "/.well-known/acme-challenge/"

    def __init__(self, hostport: str) -> None:
        host, _, port = hostport.rpartition(":")
        self.tokens: dict[str, str] = {}
        tokens = self.tokens
        prefix = self.PREFIX

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                token = self.path[len(prefix):] if self.path.startswith(prefix) else ""
                body = tokens.get(token)
                if body is None:
                    self.send_error(404)
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("acme challenge: " + fmt, *args)

        server_cls = http.server.ThreadingHTTPServer
        if ":" in host.strip("[]"):
            class V6(http.server.ThreadingHTTPServer):
                address_family = socket.AF_INET6
            server_cls = V6
        self.httpd = server_cls((host.strip("[]"), int(port)), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                       name="acme-http-01")
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _load_or_make_account_key(d: Path) -> rsa.RSAPrivateKey:
    path = d / ACCOUNT_KEY
    if path.is_file():
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        assert isinstance(key, rsa.RSAPrivateKey)
        return key
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return key


def due(cfg: Config, now: dt.datetime | None = None) -> bool:
    """No certificate yet, or it expires within tls.acme_renew_days, or names another host."""
    cert_path, key_path = paths(cfg)
    if not cert_path.is_file() or not key_path.is_file():
        return True
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return True
    now = dt.datetime.now(dt.UTC) if now is None else now
    if cfg.server.hostname.lower() not in [n.lower() for n in
                                           san.get_values_for_type(x509.DNSName)]:
        return True
    return cert.not_valid_after_utc - dt.timedelta(days=cfg.tls.acme_renew_days) <= now


def load_client() -> None:
    """Import the ACME client now, before a privilege drop (``obtain`` imports it when
    first called, which may be after)."""
    import netrc  # noqa: F401 - requests looks for ~/.netrc at each request
    import shlex  # noqa: F401

    import cryptography.hazmat.backends.openssl.backend  # noqa: F401 - josepy's, lazily
    import josepy  # noqa: F401
    from acme import challenges, client, crypto_util, errors, messages  # noqa: F401


def obtain(cfg: Config, challenges_server: ChallengeServer) -> None:
    """Order a certificate for server.hostname (HTTP-01) and write it with its new key."""
    import josepy as jose
    from acme import challenges, client, crypto_util, errors, messages

    d = acme_dir(cfg)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    account_key = jose.JWKRSA(key=_load_or_make_account_key(d))
    verify: bool | str = cfg.tls.acme_ca_file or True
    net = client.ClientNetwork(account_key, user_agent="mailfort", verify_ssl=verify)
    directory = client.ClientV2.get_directory(cfg.tls.acme_directory, net)
    acme = client.ClientV2(directory, net=net)
    reg = messages.NewRegistration.from_data(
        email=cfg.tls.acme_email or None, terms_of_service_agreed=True)
    try:
        acme.new_account(reg)
    except errors.ConflictError as exc:  # the key has an account already: use it
        net.account = acme.query_registration(
            messages.RegistrationResource(uri=exc.location, body=messages.Registration()))
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    order = acme.new_order(crypto_util.make_csr(key_pem, [cfg.server.hostname]))
    tokens = []
    for authz in order.authorizations:
        if authz.body.status == messages.STATUS_VALID:
            continue  # proved recently: the CA reuses it (answering again is an error)
        for chall in authz.body.challenges:
            if isinstance(chall.chall, challenges.HTTP01):
                response, validation = chall.response_and_validation(account_key)
                token = chall.chall.encode("token")
                challenges_server.tokens[token] = validation
                tokens.append(token)
                acme.answer_challenge(chall, response)
                break
        else:
            raise ConfigError("tls.acme: the CA offers no HTTP-01 challenge")
    try:
        deadline = dt.datetime.now() + dt.timedelta(seconds=ORDER_TIMEOUT)
        order = acme.poll_and_finalize(order, deadline)
    finally:
        for token in tokens:
            challenges_server.tokens.pop(token, None)
    cert_path, key_path = paths(cfg)
    _write_private(key_path, key_pem)  # key first: a certificate always has its key
    # 0644 from its creation: no chmod by path afterwards (it would follow a symlink).
    _write_private(cert_path, order.fullchain_pem.encode(), 0o644)
    log.info("acme: certificate for %s obtained from %s", cfg.server.hostname,
             cfg.tls.acme_directory)


def ensure(cfg: Config) -> ChallengeServer:
    """At start: the challenge listener, and a certificate that is not due for renewal."""
    server = ChallengeServer(cfg.tls.acme_http_listen)
    if due(cfg):
        obtain(cfg, server)
    return server


def renew_if_due(cfg: Config, server: ChallengeServer) -> bool:
    if not due(cfg):
        return False
    obtain(cfg, server)
    return True
