"""TLS-RPT (RFC 8460): events recorded per policy domain, the daily aggregate report built
as §4 says, and sent to the rua of _smtp._tls by mail (queued) and by HTTPS POST."""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import trustme

from mailfort.delivery.mx import make_resolver
from mailfort.delivery.tlspolicy import TLSEvent
from mailfort.delivery.tlsrpt import TLSReportStore, build_report, gzip_report
from mailfort.delivery.tlsrpt_send import send_reports
from mailfort.queue.store import Queue
from tests.delivery.conftest import ConfigFactory
from tests.dnsserver import DNSServer

DAY_START = 1795824000.0  # 2026-11-28T00:00:00Z
DAY = "2026-11-28"


def _record(store: TLSReportStore) -> None:
    for result, mx in [("success", "mx1.remote.test"), ("success", "mx1.remote.test"),
                       ("starttls-not-supported", "mx2.remote.test"),
                       ("starttls-not-supported", "mx2.remote.test")]:
        store.record(TLSEvent(result, "sts", "remote.test", mx, "127.0.0.1"), DAY_START + 60)
    store.record(TLSEvent("validation-failure", "tlsa", "other.test", "mx.other.test",
                          "127.0.0.1"), DAY_START + 120)
    store.record(TLSEvent("success", "sts", "remote.test"), DAY_START - 10)  # the day before


def test_report_aggregates_one_day_of_one_domain(tmp_path: Path) -> None:
    store = TLSReportStore(tmp_path)
    _record(store)
    assert store.domains(DAY) == {"remote.test", "other.test"}
    rep = build_report(store, DAY, "remote.test", organization="mailfort.example.test",
                       contact="postmaster@mailfort.example.test",
                       policy_strings={"sts": ["version: STSv1", "mode: enforce",
                                               "mx: *.remote.test"]})
    assert rep["date-range"] == {"start-datetime": "2026-11-28T00:00:00Z",
                                 "end-datetime": "2026-11-28T23:59:59Z"}
    (pol,) = rep["policies"]
    assert pol["policy"]["policy-type"] == "sts"
    assert pol["policy"]["policy-domain"] == "remote.test"
    assert pol["policy"]["policy-string"][1] == "mode: enforce"
    assert pol["policy"]["mx-host"] == ["*.remote.test"]
    assert pol["summary"] == {"total-successful-session-count": 2,
                              "total-failure-session-count": 2}
    assert pol["failure-details"] == [{
        "result-type": "starttls-not-supported", "receiving-ip": "127.0.0.1",
        "receiving-mx-hostname": "mx2.remote.test", "failed-session-count": 2}]
    assert json.loads(gzip.decompress(gzip_report(rep))) == rep


class _Collector(BaseHTTPRequestHandler):
    posts: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length", "0"))
        _Collector.posts.append((self.headers.get("Content-Type", ""), self.rfile.read(n)))
        self.send_response(201)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


async def test_reports_sent_by_mail_and_https(
    tmp_path: Path, dns_server: DNSServer, outbound_config: ConfigFactory, tls_ca: trustme.CA,
) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls_ca.issue_cert("tlsrpt.other.test").configure_cert(ctx)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True)
    t.start()
    try:
        cfg = outbound_config()
        store = TLSReportStore(cfg.data_path / "tlsrpt")
        _record(store)
        dns_server.add_txt("_smtp._tls.remote.test", "v=TLSRPTv1; rua=mailto:tls@remote.test")
        dns_server.add_txt("_smtp._tls.other.test", "v=TLSRPTv1; "
                           f"rua=https://tlsrpt.other.test:{httpd.server_address[1]}/r")
        dns_server.add_a("tlsrpt.other.test", "127.0.0.1")  # allowed: the tests' opt-in
        client_ctx = ssl.create_default_context()
        tls_ca.configure_trust(client_ctx)
        queue = Queue(cfg.data_path / "queue")
        done = await send_reports(cfg, queue.enqueue_bytes, make_resolver(cfg), DAY, ctx=client_ctx)
        assert any("queued for tls@remote.test" in d for d in done), done
        assert any("-> 201" in d for d in done), done
        ((ctype, body),) = _Collector.posts
        assert ctype == "application/tlsrpt+gzip"
        assert json.loads(gzip.decompress(body))["policies"][0]["policy"]["policy-domain"] \
            == "other.test"
        (entry,) = queue.list()
        assert entry.sender == "" and [r.address for r in entry.recipients] == \
            ["tls@remote.test"]
        raw = (queue.msg_dir / entry.id).read_bytes()
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert msg["TLS-Report-Domain"] == "remote.test"
        assert msg.get_content_type() == "multipart/report"
        assert msg.get_param("report-type") == "tlsrpt"
        (att,) = [p for p in msg.iter_attachments()]
        assert att.get_content_type() == "application/tlsrpt+gzip"
        rep = json.loads(gzip.decompress(att.get_content()))
        assert rep["policies"][0]["summary"]["total-failure-session-count"] == 2
    finally:
        httpd.shutdown()
        httpd.server_close()


async def test_reports_are_never_posted_inward(
    dns_server: DNSServer, outbound_config: ConfigFactory, tls_ca: trustme.CA,
) -> None:
    """A rua is anyone's to publish: by default a POST to a name that resolves to loopback
    (or an address literal that is one) is refused before any connection."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls_ca.issue_cert("tlsrpt.other.test", "127.0.0.1").configure_cert(ctx)
    _Collector.posts.clear()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True)
    t.start()
    try:
        cfg = outbound_config(delivery={"allow_private_destinations": False})
        assert not cfg.delivery.allow_private_destinations
        _record(TLSReportStore(cfg.data_path / "tlsrpt"))
        port = httpd.server_address[1]
        dns_server.add_txt("_smtp._tls.remote.test",
                           f"v=TLSRPTv1; rua=https://tlsrpt.other.test:{port}/r")
        dns_server.add_txt("_smtp._tls.other.test",
                           f"v=TLSRPTv1; rua=https://127.0.0.1:{port}/r")
        dns_server.add_a("tlsrpt.other.test", "127.0.0.1")
        client_ctx = ssl.create_default_context()
        tls_ca.configure_trust(client_ctx)
        done = await send_reports(cfg, Queue(cfg.data_path / "queue").enqueue_bytes,
                                  make_resolver(cfg),
                                  DAY, ctx=client_ctx)
        other, remote = done
        assert other.startswith("other.test: POST") and other.endswith(
            "failed: 127.0.0.1 is not a public address"), done
        assert remote.startswith("remote.test: POST") and remote.endswith(
            "failed: tlsrpt.other.test resolves only to non-public 127.0.0.1"), done
        assert _Collector.posts == []
    finally:
        httpd.shutdown()
        httpd.server_close()


async def test_daily_task_sends_yesterday_once(
    dns_server: DNSServer, outbound_config: ConfigFactory,
) -> None:
    import asyncio

    from mailfort.delivery.tlsrpt_send import daily

    cfg = outbound_config()
    _record(TLSReportStore(cfg.data_path / "tlsrpt"))
    dns_server.add_txt("_smtp._tls.remote.test", "v=TLSRPTv1; rua=mailto:tls@remote.test")
    queue = Queue(cfg.data_path / "queue")
    woken: list[int] = []
    clock = lambda: DAY_START + 86400 + 300  # noqa: E731 (five past midnight the day after)
    for _ in range(2):  # a restart the same day sends nothing again
        task = asyncio.create_task(daily(cfg, queue.enqueue_bytes, make_resolver(cfg),
                                         lambda: woken.append(1), clock))
        for _ in range(200):
            if (cfg.data_path / "tlsrpt" / f"sent-{DAY}").exists():
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert len(queue.list()) == 1 and woken == [1]
