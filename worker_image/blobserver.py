"""The worker's blob server: verified chunks for peers, over plain HTTP.

The standard library's threaded HTTP server with ``sendfile`` is used rather
than uvicorn: it is one small handler, zero-copy, and paces every byte through
one upload rate limiter. It answers ``GET /v1/blobs/<sha256>`` (with one
``Range`` allowed) only to requests signed with a key derived from the pool token
(``tokens.sign_peer_request``: the token itself never crosses the pool), and at most
``upload_slots`` transfers at once (more get 503 so the newcomer asks elsewhere), on at most
``max_connections`` connections, each dropped after ``idle_timeout`` seconds of silence.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional

from pcm_service.protocol import API_PREFIX, CODE_OF_STATUS, ErrorBody, ErrorCode
from pcm_service.tokens import PEER_AUTH_SCHEME, check_peer_signature, peer_key
from pcm_service.weights.chunks import CHUNK_RE, RateLimiter, Slots
from pcm_service.weights.ranges import RangeNotSatisfiable, Span, byte_range

log = logging.getLogger("pcm.blobs")
Locate = Callable[[str], Optional[tuple[Path, int, int]]]
IDLE_TIMEOUT = 30.0  # seconds a connection may stay silent (reading a request, or taking bytes)


class _Server(ThreadingHTTPServer):
    """One thread per connection, at most ``connections`` of them: a connection over the bound
    is closed at once (its peer asks another source), so idle sockets cannot pile up threads."""

    daemon_threads = True
    request_queue_size = 128  # socketserver's 5 made a burst of newcomers wait for SYN retries
    blob: "BlobServer"
    connections: threading.BoundedSemaphore

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.connections.acquire(blocking=False):
            log.debug("refused a connection from %s: %d open", client_address[0], self.blob.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: give the place back
            self.connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pcm-blob/1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.blob.idle_timeout)  # a silent peer is dropped

    def log_message(self, fmt: str, *args: object) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def _refuse(self, code: int, detail: str, headers: Optional[dict[str, str]] = None) -> None:
        error = CODE_OF_STATUS.get(code, ErrorCode.NOT_FOUND)
        body = json.dumps(ErrorBody(code=error, detail=detail).model_dump(mode="json")).encode()
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        blob = self.server.blob
        refused = check_peer_signature(self.headers.get("Authorization"), blob.key, "GET", self.path)
        if refused is not None:
            self._refuse(*refused, headers={"WWW-Authenticate": PEER_AUTH_SCHEME} if refused[0] == 401 else None)
            return
        prefix = f"{API_PREFIX}/blobs/"
        chunk = self.path[len(prefix):] if self.path.startswith(prefix) else ""
        loc = blob.locate(chunk) if CHUNK_RE.fullmatch(chunk) else None
        if loc is None:
            self._refuse(404, f"no verified chunk {chunk or self.path} here")
            return
        path, offset, length = loc
        try:
            span = byte_range(self.headers.get("Range"), length)
        except RangeNotSatisfiable as e:
            self._refuse(416, str(e), e.headers)
            return
        if not blob.slots.try_acquire():
            self._refuse(503, f"all {blob.slots.n} upload slots are busy", {"Retry-After": "1"})
            return
        try:
            self._send(blob, chunk, path, offset, span)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            log.debug("peer %s went away or stalled mid-chunk", self.address_string())
            self.close_connection = True
        finally:
            blob.slots.release()

    def _send(self, blob: "BlobServer", chunk: str, path: Path, offset: int, span: Span) -> None:
        try:
            fh = path.open("rb")
        except FileNotFoundError:  # renamed from its .pcm-part- name just now
            loc = blob.locate(chunk)
            fh = (loc[0] if loc else path).open("rb")
        with fh:
            self.send_response(span.status)
            self.send_header("Content-Type", "application/octet-stream")
            for k, v in span.headers.items():
                self.send_header(k, v)
            self.end_headers()
            sent = span.start
            while sent < span.end:
                n = min(blob.limiter.piece, span.end - sent)
                blob.limiter.take(n)
                n = self.connection.sendfile(fh, offset + sent, n)
                if n == 0:
                    raise BrokenPipeError("short file")
                sent += n
                blob.count(n)


class BlobServer:
    def __init__(self, locate: Locate, token: Optional[str], host: str = "127.0.0.1", port: int = 0,
                 upload_rate: float = 0.0, upload_slots: int = 4, max_connections: int = 0,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        """``token``: the pool token, whose derived key checks request signatures (None: open);
        ``max_connections``: open connections at once (0: 64, or 8 per upload slot if more)."""
        self.locate = locate
        self.key = peer_key(token) if token else None
        self.limiter = RateLimiter(upload_rate)
        self.slots = Slots(upload_slots)
        self.bytes_served = 0
        self._count_lock = threading.Lock()
        self.max_connections = max_connections or max(64, 8 * upload_slots)
        self.idle_timeout = idle_timeout
        self._httpd = _Server((host, port), _Handler)
        self._httpd.blob = self
        self._httpd.connections = threading.BoundedSemaphore(self.max_connections)
        self.url = f"http://{host}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        name="pcm-blob-server")

    def count(self, n: int) -> None:
        with self._count_lock:
            self.bytes_served += n

    def start(self) -> "BlobServer":
        self._thread.start()
        log.info("serving verified chunks to peers at %s", self.url)
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def outward_address(service_url: str) -> str:
    """The local address that routes to the service: what peers on that network can reach."""
    from urllib.parse import urlsplit

    u = urlsplit(service_url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((u.hostname or "127.0.0.1", u.port or 80))
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())
