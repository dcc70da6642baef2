"""A small HTTP server for the metrics endpoints and the dashboard, bounded so that no client can starve
the process it runs in.

``http.server``'s threaded server (and ``prometheus_client.start_http_server``) starts a thread per
connection and waits forever for a request: idle connections then cost a thread and a file descriptor
each, until the process cannot accept anything else (its RPC clients included). Here each request must
arrive within ``TIMEOUT`` seconds, a connection serves one request (no keep-alive), and beyond
``MAX_CONNECTIONS`` at once a new connection is closed at once.
"""

from __future__ import annotations

import http.server
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["MAX_CONNECTIONS", "TIMEOUT", "BoundedHTTPServer", "Handler", "Response"]

log = logging.getLogger("pyrorpc.httpd")

MAX_CONNECTIONS = 32
TIMEOUT = 5.0  # seconds for a request to arrive and its answer to be taken
Response = tuple[int, bytes, str]  # status, body, content type


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers GET and HEAD through the server's ``route(path) -> Response | None``; anything else 405."""

    server: "BoundedHTTPServer"
    server_version = "pyrorpc"
    protocol_version = "HTTP/1.0"  # one request per connection
    timeout = TIMEOUT

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        try:
            answer = self.server.route(self.path.split("?", 1)[0])
        except Exception:  # the page or the scrape failed: say so, keep serving
            log.exception("%s: %s failed", self.server.name, self.path[:200])
            answer = (500, b"internal error\n", "text/plain")
        if answer is None:
            answer = (404, b"not found\n", "text/plain")
        self._send(*answer)

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def _refuse(self) -> None:
        self._send(405, b"read-only\n", "text/plain", allow="GET, HEAD")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse  # noqa: N815

    def _send(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in {**self.server.headers, **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s %s", self.address_string(), format % args)


class BoundedHTTPServer(http.server.ThreadingHTTPServer):
    """``ThreadingHTTPServer`` answering ``route(path)`` with at most ``max_connections`` at once."""

    daemon_threads = True
    request_queue_size = 128  # (socketserver's 5 makes a burst of connections wait out SYN retries)

    def __init__(self, address: tuple[str, int], route: Callable[[str], Response | None], *, name: str = "http",
                 max_connections: int = MAX_CONNECTIONS, headers: dict[str, str] | None = None) -> None:
        self.route = route
        self.name = name
        self.headers = headers or {}
        self._slots = threading.BoundedSemaphore(max_connections)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: this one is closed at once, the others go on
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("%s: error serving %s", self.name, client_address, exc_info=True)

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name=f"{self.name}-http", daemon=True)
        thread.start()
        return thread
