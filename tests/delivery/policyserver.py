"""A loopback HTTPS server serving ``/.well-known/mta-sts.txt`` (trustme certificate)."""

from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class PolicyServer:
    """``body`` is served as text/plain (``content_type`` to change it); ``requests``
    counts the GETs so a test can see what the cache saved."""

    def __init__(self, ctx: ssl.SSLContext, body: str = "") -> None:
        self.body = body
        self.content_type = "text/plain"
        self.status = 200
        self.requests = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests += 1
                data = owner.body.encode()
                if self.path != "/.well-known/mta-sts.txt":
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(owner.status)
                self.send_header("Content-Type", owner.content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> PolicyServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def policy_text(mode: str, *mx: str, max_age: int = 86400) -> str:
    mx_lines = "".join(f"mx: {m}\r\n" for m in mx)
    return f"version: STSv1\r\nmode: {mode}\r\n{mx_lines}max_age: {max_age}\r\n"
