"""ACME against a real CA: Debian's ``pebble``, started by the test on loopback.

Pebble resolves ``mx.example.test`` through the test's DNS server (127.0.0.1) and fetches
the HTTP-01 answer from mailfort's challenge listener; its directory is HTTPS with a
certificate from the test CA (trustme), which mailfort trusts through tls.acme_ca_file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import smtplib
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from mailfort import acmecert
from mailfort import config as config_mod
from tests.dnsserver import DNSServer
from tests.server.production import free_port, serving, world_dir, write_config

pytestmark = pytest.mark.skipif(shutil.which("pebble") is None,
                                reason="pebble (Debian package) is not installed")

HOST = "mx.example.test"


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    server = DNSServer().start()
    server.add_a(HOST, "127.0.0.1")
    yield server
    server.stop()


@pytest.fixture
def pebble(tmp_path: Path, dns: DNSServer) -> Iterator[dict[str, object]]:
    yield from _pebble(tmp_path, dns)


@pytest.fixture
def short_pebble(tmp_path: Path, dns: DNSServer) -> Iterator[dict[str, object]]:
    """Certificates valid 10 days: always due with tls.acme_renew_days = 30."""
    yield from _pebble(tmp_path, dns, validity=10 * 86400)


def _pebble(tmp_path: Path, dns: DNSServer,
            validity: int | None = None) -> Iterator[dict[str, object]]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "pebble-key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "pebble-cert.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    port, http_port = free_port(), free_port()
    conf = {"pebble": {
        "listenAddress": f"127.0.0.1:{port}",
        "managementListenAddress": f"127.0.0.1:{free_port()}",
        "certificate": str(tmp_path / "pebble-cert.pem"),
        "privateKey": str(tmp_path / "pebble-key.pem"),
        "httpPort": http_port, "tlsPort": free_port(),
        "ocspResponderURL": "", "externalAccountBindingRequired": False}}
    if validity is not None:
        conf["pebble"]["certificateValidityPeriod"] = validity
    (tmp_path / "pebble.json").write_text(json.dumps(conf))
    env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
    proc = subprocess.Popen(
        ["pebble", "-config", str(tmp_path / "pebble.json"),
         "-dnsserver", f"127.0.0.1:{dns.port}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    directory = f"https://127.0.0.1:{port}/dir"
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(directory, context=ctx, timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise AssertionError(proc.communicate()[0].decode()) from None
            time.sleep(0.1)
    yield {"directory": directory, "ca_file": str(tmp_path / "ca.pem"),
           "http_port": http_port, "dns_port": dns.port}
    proc.terminate()
    proc.wait(10)


def _acme_table(p: dict[str, object]) -> dict[str, object]:
    return {"acme": True, "acme_directory": p["directory"], "acme_ca_file": p["ca_file"],
            "acme_http_listen": f"127.0.0.1:{p['http_port']}"}


def _every_thread_holds_the_supervisor_signals(pid: int) -> None:
    """The supervisor takes its signals with sigtimedwait; a thread of it that did not
    block them (the ACME challenge server's) would take a worker's SIGUSR2, or a SIGHUP,
    with the default action: the node ended."""
    held = {signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
    # Not the main thread: in sigtimedwait the kernel shows the waited signals unblocked.
    tasks = [t for t in Path(f"/proc/{pid}/task").iterdir() if t.name != str(pid)]
    assert tasks  # the challenge server's thread runs beside the main one
    for task in tasks:
        line = next(x for x in (task / "status").read_text().splitlines()
                    if x.startswith("SigBlk:"))
        mask = int(line.split()[1], 16)
        assert all(mask >> (int(sig) - 1) & 1 for sig in held), (task.name, hex(mask))


@pytest.mark.parametrize("workers", [1, 2])
def test_certificate_obtained_and_served_on_starttls(pebble: dict[str, object],
                                                     workers: int) -> None:
    root = world_dir()
    try:
        config = write_config(root, int(pebble["dns_port"]),  # type: ignore[arg-type]
                              tls=_acme_table(pebble), server={"workers": workers})
        with serving(config, root / "data") as server:
            if workers > 1:
                _every_thread_holds_the_supervisor_signals(server.pid)
            mx = int(config_mod.load(config).listen.mx[0].rpartition(":")[2])
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            with smtplib.SMTP("127.0.0.1", mx, timeout=20) as smtp:
                smtp.starttls(context=ctx)
                der = smtp.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        served = x509.load_der_x509_certificate(der)
        assert "Pebble" in served.issuer.rfc4514_string()
        san = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [HOST]
        key = root / "data" / "acme" / "key.pem"
        assert key.stat().st_mode & 0o777 == 0o600
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_renewal_orders_a_new_certificate_when_due(pebble: dict[str, object],
                                                   tmp_path: Path) -> None:
    cfg = config_mod.from_dict({"server": {"hostname": HOST, "data_dir": str(tmp_path / "d")},
                                "tls": _acme_table(pebble)})
    server = acmecert.ensure(cfg)
    try:
        first = x509.load_pem_x509_certificate(acmecert.paths(cfg)[0].read_bytes())
        assert not acmecert.renew_if_due(cfg, server)  # fresh: nothing to do
        # Pebble's certificates live for years; pretend we are near the end of this one.
        near_end = first.not_valid_after_utc - dt.timedelta(days=1)
        assert acmecert.due(cfg, now=near_end)
        acmecert.obtain(cfg, server)
        second = x509.load_pem_x509_certificate(acmecert.paths(cfg)[0].read_bytes())
        assert second.serial_number != first.serial_number
        assert "Pebble" in second.issuer.rfc4514_string()
    finally:
        server.close()


async def test_renewed_certificate_served_to_new_sessions_open_ones_kept(
        pebble: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from mailfort.server import operations
    from mailfort.server.app import Node
    from tests.conftest import make_config

    cfg = make_config(tmp_path / "d", server={"hostname": HOST}, tls=_acme_table(pebble))
    ops = operations.Operations(cfg)  # obtains the first certificate
    node = Node(cfg)
    node.after_bind = ops.after_bind
    await node.start()
    monkeypatch.setattr(operations, "ACME_CHECK_EVERY", 0.05)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE

    def handshake() -> tuple[smtplib.SMTP, int]:
        smtp = smtplib.SMTP("127.0.0.1", node.port("mx"), timeout=20)
        smtp.starttls(context=ctx)
        der = smtp.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        return smtp, x509.load_der_x509_certificate(der).serial_number

    try:
        old_session, first = await asyncio.to_thread(handshake)
        # Pebble's certificates live for years: make the next check find this one due.
        real_due = acmecert.due
        calls = iter([True])
        monkeypatch.setattr(acmecert, "due", lambda c, now=None: next(calls, real_due(c)))
        await ops.started(node)
        deadline = time.monotonic() + 30
        second = first
        while second == first and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            new_session, second = await asyncio.to_thread(handshake)
            await asyncio.to_thread(new_session.quit)
        assert second != first, "the renewed certificate is not served"
        assert (await asyncio.to_thread(old_session.noop))[0] == 250  # still open
        await asyncio.to_thread(old_session.quit)
    finally:
        ops.stopping()
        await node.stop()
        await ops.stopped()


def _starttls_serial(port: int) -> tuple[smtplib.SMTP, int]:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=20)
    smtp.starttls(context=ctx)
    der = smtp.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    return smtp, x509.load_der_x509_certificate(der).serial_number


def test_with_workers_the_supervisor_renews_and_every_worker_serves_it(
        short_pebble: dict[str, object]) -> None:
    """workers = 2: the supervisor renews (here at SIGHUP, the certificate being due) and
    the workers present the new certificate to new sessions; open sessions carry on."""
    import signal

    root = world_dir()
    try:
        config = write_config(root, int(short_pebble["dns_port"]),  # type: ignore[arg-type]
                              tls=_acme_table(short_pebble), server={"workers": 2})
        mx = int(config_mod.load(config).listen.mx[0].rpartition(":")[2])
        with serving(config, root / "data") as server:
            old_sessions = [_starttls_serial(mx) for _ in range(4)]
            first = {serial for _, serial in old_sessions}
            assert len(first) == 1
            server.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                got = []
                for _ in range(4):  # new sessions, on either worker
                    smtp, serial = _starttls_serial(mx)
                    smtp.quit()
                    got.append(serial)
                if not first & set(got):
                    break
                time.sleep(0.2)
            assert not first & set(got), "a worker still presents the old certificate"
            for smtp, _ in old_sessions:
                assert smtp.noop()[0] == 250  # still open
                smtp.quit()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: it starts mailfort as root with "
                    "server.user and plants a symlink as that user")
@pytest.mark.parametrize("workers", [1, 2])
def test_as_root_the_order_is_written_by_the_service_user_not_through_a_symlink(
        pebble: dict[str, object], workers: int) -> None:
    """Issue 24: started as root with server.user, the challenge listener is root's, the
    certificate is ordered and written after the drop, as that user. Then, as that user,
    data/acme -> a directory of root's: at the next start no key or certificate is written
    there (the start fails: the account broke its own directory)."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    root = world_dir()
    try:
        ca = root / "ca.pem"  # readable after the drop (tmp_path is root's alone)
        shutil.copy(str(pebble["ca_file"]), ca)
        ca.chmod(0o644)
        config = write_config(root, int(pebble["dns_port"]),  # type: ignore[arg-type]
                              tls=_acme_table(pebble) | {"acme_ca_file": str(ca)},
                              server={"workers": workers, "user": "nobody"})
        data = root / "data"
        with serving(config, data):
            mx = int(config_mod.load(config).listen.mx[0].rpartition(":")[2])
            smtp, _serial = _starttls_serial(mx)  # served, with the ordered certificate
            smtp.quit()
        for name in ("account.pem", "key.pem", "cert.pem"):
            assert (data / "acme" / name).stat().st_uid == nobody.pw_uid, name
        victim = root / "root-acme"
        victim.mkdir(mode=0o755)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child, as the service account
            try:
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                shutil.rmtree(data / "acme")
                (data / "acme").symlink_to(victim)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert (data / "acme").is_symlink()
        with serving(config, data, ready=False) as server:
            server.proc.wait(60)
        assert os.listdir(victim) == []
    finally:
        shutil.rmtree(root, ignore_errors=True)
