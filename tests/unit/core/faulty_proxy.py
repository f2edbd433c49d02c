"""A loopback reverse proxy in front of a real MinIO that answers the first N requests with faults.

It stands where a load balancer or an overloaded object store would: every request goes to the
real server, except the ones it is told to answer itself with what stores and proxies return
under load (``503 SlowDown``, ``500 InternalError``, a ``502`` HTML page, an empty ``504``, a
connection reset) or with a plain refusal. Requests are forwarded byte for byte (the ``Host``
header included, so SigV4 signatures stay valid).
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


def _xml(code: str, message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<Resource>/</Resource><RequestId>proxy</RequestId><HostId>proxy</HostId></Error>"
    ).encode()


#: Fault name -> (status, content type, body); "reset" closes the connection with a TCP RST.
FAULTS: dict[str, tuple[int, str, bytes]] = {
    "slowdown": (503, "application/xml", _xml("SlowDown", "Please reduce your request rate.")),
    "internal": (500, "application/xml", _xml("InternalError", "We encountered an error.")),
    "bad-gateway": (502, "text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
    "gateway-timeout": (504, "text/plain", b""),
    "forbidden-html": (403, "text/html", b"<html><body>403 Forbidden by proxy</body></html>"),
    "invalid-argument": (400, "application/xml", _xml("InvalidArgument", "Bad argument.")),
}


@dataclass
class Plan:
    """What the proxy does: ``fault`` for the next ``times`` requests, then passes through."""

    fault: str = ""
    times: int = 0
    injected: int = 0
    forwarded: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> str | None:
        with self.lock:
            if self.fault and self.injected < self.times:
                self.injected += 1
                return self.fault
            self.forwarded += 1
            return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        fault = self.server.plan.take()
        if fault == "reset":
            # SO_LINGER 0: close() sends RST, as a dropped connection behind a balancer does.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        if fault is not None:
            status, ctype, payload = FAULTS[fault]
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        up = http.client.HTTPConnection(self.server.upstream, timeout=30)
        try:
            up.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
            resp = up.getresponse()
            data = resp.read()
            self.send_response(resp.status, resp.reason)
            for key, value in resp.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            declared = resp.getheader("Content-Length")
            size = declared if self.command == "HEAD" and declared else str(len(data))
            self.send_header("Content-Length", size)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            up.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str, plan: Plan):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = upstream
        self.plan = plan


@contextmanager
def faulty_proxy(upstream_endpoint: str) -> Iterator[tuple[str, Plan]]:
    """Run the proxy on 127.0.0.1; yields its endpoint URL and its (mutable) plan."""
    plan = Plan()
    server = _ProxyServer(urlparse(upstream_endpoint).netloc, plan)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", plan
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
