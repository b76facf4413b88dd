"""The node as ``mailfort serve`` runs it: a real subprocess, its own TLS, real clients.

The other end-to-end tests build listeners or a ``Node`` in-process with the test fixture's
TLS context, which sets its own floor; here nothing is handed in. ``mailfort serve --config``
starts on free loopback ports (port 0; the ports are read from what it prints) and builds
its TLS context from the self-signed certificate it makes on first start, or from a
configured certificate (RSA here, so that the RSA-authenticated suites can be probed too).

* POP3 end to end: mail in over MX, then read, deleted and gone over POP3 STLS and POP3S.
* The TLS floor on every TLS port (MX and submission STARTTLS, 465, POP3 STLS, 995): TLS 1.0
  and 1.1 are refused, TLS 1.2 and 1.3 are accepted, and no weak suite class is ever
  agreed. Each refusal is made meaningful first: the same client completes that handshake
  against a permissive server holding the same certificate, or the case is skipped with the
  reason (this OpenSSL cannot offer it at all). The node sends no alert when it refuses
  (asyncio drops the connection), so a refusal shows as an EOF in the handshake.
"""

from __future__ import annotations

import contextlib
import json
import os
import poplib
import queue
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest
import trustme

import mailfort
from mailfort import config as config_mod
from mailfort.store.maildir import maildir_for
from tests.conftest import HOSTNAME, refusing_dns_port, seed_directory

ALICE = "alice@example.test"
PASSWORD = "alice-pw"  # seed_directory's
SRC = Path(mailfort.__file__).resolve().parents[1]  # the tree under test, not an install
START_TIMEOUT = 60.0
TLS_PORTS = ("mx", "submission", "submissions", "pop3", "pop3s", "imap", "imaps",
             "managesieve")
# The others: implicit TLS.
STARTTLS = {"mx": "smtp", "submission": "smtp", "pop3": "pop3", "imap": "imap",
            "managesieve": "managesieve"}
WEAK = "@SECLEVEL=0:ALL"  # lets this OpenSSL offer TLS 1.0/1.1 and every old suite class


# ------------------------------------------------------------------ the served node

@dataclass
class Served:
    """One ``mailfort serve`` process."""

    name: str
    proc: subprocess.Popen[str]
    data_dir: Path
    log: Path
    ca_file: Path  # what a client trusts to verify this node
    cert_file: Path  # the node's own certificate and key (for the control server)
    key_file: Path
    ports: dict[str, int]

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def maildir_files(self, user: str) -> list[str]:
        md = maildir_for(self.data_dir / "mail", user)
        return sorted(os.listdir(md / "new") + os.listdir(md / "cur"))


def _write_config(root: Path, tls: dict[str, str]) -> Path:
    listen = {name: ["127.0.0.1:0"] for name in TLS_PORTS}
    lines = [
        "[server]", f"hostname = {json.dumps(HOSTNAME)}",
        f"data_dir = {json.dumps(str(root / 'data'))}",
        "[store]", 'flush = "fsync"',  # a shared test disk: flush our own files only
        # Never the system resolver (see tests/conftest.py): lookups fail at once.
        "[dns]", 'nameservers = ["127.0.0.1"]', f"port = {refusing_dns_port()}",
        "timeout = 1.0",
        "[listen]", *(f"{k} = {json.dumps(v)}" for k, v in listen.items()),
        "[tls]", *(f"{k} = {json.dumps(v)}" for k, v in tls.items()),
    ]
    path = root / "mailfort.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _launch(root: Path, tls: dict[str, str]) -> tuple[subprocess.Popen[str], Path]:
    root.mkdir(parents=True)
    cfg_path = _write_config(root, tls)
    seed_directory(config_mod.load(cfg_path))  # domain example.test, alice and bob
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
    log = root / "serve.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailfort", "serve", "--config", str(cfg_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
            cwd=root)
    return proc, log


def _ports_printed(proc: subprocess.Popen[str], log: Path) -> dict[str, int]:
    """Read what ``serve`` prints at start: ``  <service> <host>:<port>``, then ``data``."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:  # the pipe is read to its end, so serve never blocks on it
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=read, daemon=True).start()
    ports: dict[str, int] = {}
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = ""
        if not line:
            proc.kill()
            raise AssertionError(f"mailfort serve did not start:\n{log.read_text()}")
        fields = line.split()
        if len(fields) == 2 and fields[0] in TLS_PORTS:
            ports[fields[0]] = int(fields[1].rpartition(":")[2])
        if fields and fields[0] == "data":
            return ports


def _stop(served: Served) -> str | None:
    """SIGTERM, as an operator would: what is wrong with the exit, or None if it was clean
    (status 0, no traceback and no password in the log)."""
    served.proc.send_signal(signal.SIGTERM)
    try:
        code = served.proc.wait(20)
    except subprocess.TimeoutExpired:
        served.proc.kill()
        served.proc.wait()
        return f"{served.name}: mailfort serve did not stop on SIGTERM"
    text = served.log.read_text(errors="replace")
    if code != 0 or "Traceback" in text or PASSWORD in text:
        return f"{served.name}: exit status {code}, log:\n{text}"
    return None


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Served]]:
    """Two nodes, started together: one on the self-signed certificate that ``serve`` makes
    (EC P-256), one on a configured RSA certificate from a test CA."""
    base = tmp_path_factory.mktemp("served")
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    issued = ca.issue_cert(HOSTNAME, "localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
    cert, key, ca_file = base / "rsa-cert.pem", base / "rsa-key.pem", base / "rsa-ca.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    own = base / "self-signed" / "data" / "tls"  # where serve makes its certificate
    # name: (tls config, what a client trusts, the node's certificate, its key)
    kinds = {
        "self-signed": ({}, own / "cert.pem", own / "cert.pem", own / "key.pem"),
        "configured": ({"cert_file": str(cert), "key_file": str(key)}, ca_file, cert, key),
    }
    launched = {name: _launch(base / name, kind[0]) for name, kind in kinds.items()}
    try:
        nodes = {
            name: Served(name, proc, base / name / "data", log, *kinds[name][1:],
                         ports=_ports_printed(proc, log))
            for name, (proc, log) in launched.items()
        }
    except BaseException:
        for proc, _ in launched.values():
            proc.kill()
            proc.wait()
        raise
    assert all(set(n.ports) == set(TLS_PORTS) for n in nodes.values())
    try:
        yield nodes
    finally:
        stopped = [_stop(node) for node in nodes.values()]
        for failure in filter(None, stopped):
            raise AssertionError(failure)


# ------------------------------------------------------------------ POP3 end to end

def _mx_deliver(node: Served, subject: str) -> None:
    """Mail from outside to alice, over MX with STARTTLS, as another server sends it."""
    msg = EmailMessage()
    msg["From"] = "sender@remote.test"
    msg["To"] = ALICE
    msg["Subject"] = subject
    msg.set_content(f"body of {subject}\n.leading dot\n")
    with smtplib.SMTP("127.0.0.1", node.ports["mx"], timeout=10) as smtp:
        smtp.starttls(context=node.client_context())
        refused = smtp.send_message(msg, "sender@remote.test", [ALICE])
    assert refused == {}


def _read_and_delete(client: poplib.POP3) -> tuple[list[bytes], bytes]:
    """Log in, RETR the one message there is, DELE it, QUIT."""
    client.user(ALICE)
    client.pass_(PASSWORD)
    count, _ = client.stat()
    assert count == 1
    lines = client.retr(1)[1]
    client.dele(1)
    return lines, client.quit()


def test_mx_in_then_pop3_stls_retr_dele_quit(served: dict[str, Served]) -> None:
    node = served["self-signed"]
    _mx_deliver(node, "over STLS")
    assert len(node.maildir_files(ALICE)) == 1
    client = poplib.POP3("127.0.0.1", node.ports["pop3"], timeout=10)
    with pytest.raises(poplib.error_proto):
        client.user(ALICE)  # not before STLS, even on loopback (the default config)
    client.stls(node.client_context())
    lines, bye = _read_and_delete(client)
    assert b"Subject: over STLS" in lines
    assert b"body of over STLS" in lines and b".leading dot" in lines
    assert bye.startswith(b"+OK")
    assert node.maildir_files(ALICE) == []  # +OK to QUIT: the deletion is done


def test_mx_in_then_pop3s_retr_dele_quit(served: dict[str, Served]) -> None:
    node = served["configured"]
    _mx_deliver(node, "over POP3S")
    client = poplib.POP3_SSL("127.0.0.1", node.ports["pop3s"],
                             context=node.client_context(), timeout=10)
    assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
    lines, bye = _read_and_delete(client)
    assert b"Subject: over POP3S" in lines and bye.startswith(b"+OK")
    assert node.maildir_files(ALICE) == []


# ------------------------------------------------------------------ the TLS floor

def _read_smtp_reply(f: object) -> bytes:
    reply = b""
    while True:
        line = f.readline()  # type: ignore[attr-defined]
        assert line, "connection closed"
        reply += line
        if line[3:4] != b"-":
            return reply


def _handshake(port_name: str, port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    """Open a TLS session on one port, as its protocol does it (STARTTLS, STLS or at once),
    and prove it carries the protocol: the reply to EHLO / CAPA inside TLS."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        kind = STARTTLS.get(port_name)
        with sock.makefile("rb") as f:
            if kind == "smtp":
                assert _read_smtp_reply(f).startswith(b"220")
                sock.sendall(b"EHLO probe.test\r\n")
                assert b"STARTTLS" in _read_smtp_reply(f)
                sock.sendall(b"STARTTLS\r\n")
                assert _read_smtp_reply(f).startswith(b"220")
            elif kind == "pop3":
                assert f.readline().startswith(b"+OK")
                sock.sendall(b"STLS\r\n")
                assert f.readline().startswith(b"+OK")
            elif kind == "imap":
                assert f.readline().startswith(b"* OK")
                sock.sendall(b"t STARTTLS\r\n")
                assert f.readline().startswith(b"t OK")
            elif kind == "managesieve":
                while not f.readline().startswith(b"OK"):  # capabilities, then OK
                    pass
                sock.sendall(b"STARTTLS\r\n")
                assert f.readline().startswith(b"OK")
        tls = ctx.wrap_socket(sock, server_hostname="localhost")
    except BaseException:
        sock.close()
        raise
    try:
        with tls.makefile("rb") as f:
            if port_name in ("mx", "submission", "submissions"):
                if kind is None:
                    assert _read_smtp_reply(f).startswith(b"220")
                tls.sendall(b"EHLO probe.test\r\n")
                assert _read_smtp_reply(f).startswith(b"250")
            elif port_name in ("imap", "imaps"):
                if kind is None:
                    assert f.readline().startswith(b"* OK")
                tls.sendall(b"t CAPABILITY\r\n")
                assert f.readline().startswith(b"* CAPABILITY")
            elif port_name == "managesieve":  # the capabilities re-sent after TLS
                assert f.readline().startswith(b'"IMPLEMENTATION"')
            else:
                if kind is None:
                    assert f.readline().startswith(b"+OK")
                tls.sendall(b"CAPA\r\n")
                assert f.readline().startswith(b"+OK")
    except BaseException:
        tls.close()
        raise
    return tls


def _probe_context(version: ssl.TLSVersion | None, ciphers: str = WEAK) -> ssl.SSLContext:
    """A client that offers exactly this version (None: 1.0 to 1.2) and these suites,
    checking nothing: what is probed is what the server agrees to, not who it is."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers(ciphers)  # ssl.SSLError if this OpenSSL has no such suite
    with warnings.catch_warnings():  # "TLSv1 is deprecated": offering it is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version or ssl.TLSVersion.TLSv1
        ctx.maximum_version = version or ssl.TLSVersion.TLSv1_2
    return ctx


@contextlib.contextmanager
def _permissive_server(node: Served) -> Iterator[int]:
    """A server with the node's certificate that agrees to anything this OpenSSL can do:
    the control that shows a probe could succeed, so that its refusal by the node means
    something."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    ctx.load_cert_chain(node.cert_file, node.key_file)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve_one() -> None:  # one control handshake per server
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"+OK\r\n")

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        thread.join(10)
        listener.close()


def _control(node: Served, ctx: ssl.SSLContext) -> str | None:
    """The suite agreed with the permissive server, or None if even it cannot agree."""
    with _permissive_server(node) as port:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
                    ctx.wrap_socket(sock, server_hostname="localhost") as tls:
                tls.recv(16)
                return tls.cipher()[0]  # type: ignore[index]
        except (ssl.SSLError, ConnectionError):
            return None


def _assert_refused(node: Served, port_name: str, probe: ssl.SSLContext) -> None:
    try:
        tls = _handshake(port_name, node.ports[port_name], probe)
    except (ssl.SSLError, ConnectionError):
        return  # no alert comes (asyncio drops the connection): an EOF in the handshake
    with tls:
        raise AssertionError(f"{node.name} {port_name} agreed to {tls.cipher()}")


with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    OLD_VERSIONS = {"TLSv1.0": ssl.TLSVersion.TLSv1, "TLSv1.1": ssl.TLSVersion.TLSv1_1}


@pytest.mark.parametrize("version", OLD_VERSIONS)
def test_tls_1_0_and_1_1_refused_on_every_tls_port(served: dict[str, Served],
                                                   version: str) -> None:
    try:
        probe = _probe_context(OLD_VERSIONS[version])
    except (ssl.SSLError, ValueError) as exc:
        pytest.skip(f"this OpenSSL ({ssl.OPENSSL_VERSION}) cannot offer {version}: {exc}")
    for node in served.values():
        if _control(node, probe) is None:
            pytest.skip(f"this OpenSSL ({ssl.OPENSSL_VERSION}) cannot speak {version} "
                        f"even to a permissive server with the {node.name} certificate")
        for name in TLS_PORTS:
            _assert_refused(node, name, probe)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["TLSv1.2", "TLSv1.3"])
def test_tls_1_2_and_1_3_accepted_on_every_tls_port(served: dict[str, Served],
                                                    version: ssl.TLSVersion) -> None:
    for node in served.values():
        ctx = node.client_context()  # a normal client, verifying the certificate
        ctx.minimum_version = ctx.maximum_version = version
        for name in TLS_PORTS:
            with _handshake(name, node.ports[name], ctx) as tls:
                assert tls.version() == ("TLSv1.2" if version is ssl.TLSVersion.TLSv1_2
                                         else "TLSv1.3")
                suite = tls.cipher()[0]  # type: ignore[index]
                if version is ssl.TLSVersion.TLSv1_2:  # forward secret and AEAD
                    assert suite.startswith(("ECDHE-", "DHE-")), (node.name, name, suite)
                    assert "GCM" in suite or "CHACHA20" in suite, (node.name, name, suite)


# Suite classes of SSLv3 / TLS 1.0-1.2 that must never be agreed, as OpenSSL names them.
WEAK_CLASSES = {
    "NULL (no encryption)": "eNULL",
    "EXPORT": "EXP",
    "RC4": "RC4",
    "DES and 3DES": "DES:3DES",
    "anonymous (no authentication)": "aNULL",
    "MD5 MAC": "MD5",
    "CBC with a SHA-1 MAC": "SHA1",
    "CBC with a SHA-2 MAC (not AEAD)": "SHA256:SHA384",
    "static RSA key exchange (no forward secrecy)": "kRSA",
}


@pytest.mark.parametrize("suites", WEAK_CLASSES.values(), ids=list(WEAK_CLASSES))
def test_weak_suite_classes_never_agreed_on_any_tls_port(served: dict[str, Served],
                                                         suites: str) -> None:
    try:
        probe = _probe_context(None, f"@SECLEVEL=0:{suites}")
    except ssl.SSLError:
        pytest.skip(f"this OpenSSL ({ssl.OPENSSL_VERSION}) has no {suites} suite at all: "
                    "neither the server nor a client built on it can offer one")
    meaningful = 0
    for node in served.values():
        agreed = _control(node, probe)
        if agreed is None:  # e.g. RSA-authenticated suites with the EC certificate
            continue
        meaningful += 1
        for name in TLS_PORTS:
            _assert_refused(node, name, probe)
    if not meaningful:
        pytest.skip(f"no {suites} suite can be agreed with either certificate here")
