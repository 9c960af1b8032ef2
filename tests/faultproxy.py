"""A fault-injecting HTTP/1.1 reverse proxy for tests, placed between the worker and an S3 (moto) or
GCS (gcp-storage-emulator) server.

    with FaultProxy("http://127.0.0.1:5000", rates={"slowdown": 0.05, "reset_mid_body": 0.05},
                    seed=1) as proxy:
        os.environ["AWS_ENDPOINT_URL_S3"] = proxy.url
        ...
        print(proxy.counts)   # {"requests": 812, "forwarded": 731, "slowdown": 40, ...}

Fault kinds (``FaultProxy.KINDS``), each drawn per eligible request with its own probability; a
request gets at most one fault, so the rates must add up to at most 1:

    slowdown        503 with S3's ``SlowDown`` XML body (GCS dialect: a JSON 503), not forwarded
    throttle        429 Too Many Requests, not forwarded
    error500        500 InternalError, not forwarded
    reset_before    TCP RST instead of any response, not forwarded
    reset_mid_body  forwarded; the upstream status and headers are sent, then part of the body,
                    then a TCP RST (the upstream DID apply the request: the ambiguous case)
    truncate        forwarded; the status, headers (full Content-Length) and part of the body are
                    sent, then a clean close (FIN): the client sees a short body
    latency         forwarded after ``latency`` seconds (waited on an Event, not slept)

Decisions come from one ``random.Random(seed)`` under a lock, so a run that sends its requests in
the same order sees the same faults; concurrent clients interleave, so only the rates reproduce.

Why a ThreadingHTTPServer + http.client and not aiohttp (or mitmproxy, which needs Python 3.12):
it is the standard library, so the test tree needs no new dependency; blocking sockets give exact
control of the failure points (SO_LINGER 0 for a real RST after N body bytes, a FIN after a short
body) that aiohttp's response machinery hides; and bodies stream through in 64 KiB pieces in both
directions (Content-Length and chunked requests, Content-Length or until-EOF responses), so a
32 MiB object never sits in memory. Threads are bounded by ``max_connections`` (extra connections
are closed at once and counted as ``rejected``), every socket has a timeout, and the server listens
on 127.0.0.1 only. The Host header is passed through unchanged, so servers that build URLs from it
(GCS resumable-upload session URIs) point clients back at the proxy; a Location header naming the
upstream is rewritten to the proxy as well.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import socket
import struct
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

PIECE = 64 * 1024
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "expect",
}

S3_ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    429: ("TooManyRequests", "Too many requests (fault injected)."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
}


def _error_body(status: int, dialect: str) -> tuple[bytes, str]:
    code, text = S3_ERRORS[status]
    if dialect == "gcs":
        error = {"code": status, "message": text, "errors": [{"reason": code, "message": text}]}
        return json.dumps({"error": error}).encode(), "application/json; charset=UTF-8"
    xml = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{text}</Message><RequestId>FAULTPROXY</RequestId>"
        "<HostId>faultproxy</HostId></Error>"
    )
    return xml.encode(), "application/xml"


class FaultProxy:
    """A reverse proxy to ``upstream_url`` that injects faults at ``rates``; see the module doc."""

    KINDS = (
        "slowdown",
        "throttle",
        "error500",
        "reset_before",
        "reset_mid_body",
        "truncate",
        "latency",
    )
    STATUS: ClassVar[dict[str, int]] = {"slowdown": 503, "throttle": 429, "error500": 500}

    def __init__(
        self,
        upstream_url: str,
        rates: Mapping[str, float] | None = None,
        seed: int = 0,
        *,
        dialect: str = "s3",
        latency: float = 0.2,
        max_connections: int = 64,
        client_timeout: float = 30.0,
        upstream_timeout: float = 60.0,
        applies: Callable[[str, str], bool] | None = None,
        port: int = 0,
    ) -> None:
        parts = urllib.parse.urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream_url!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.upstream_url = f"http://{parts.hostname}:{self.upstream[1]}"
        self.dialect = dialect
        self.latency = latency
        self.client_timeout = client_timeout
        self.upstream_timeout = upstream_timeout
        self.applies = applies
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._rates: dict[str, float] = {}
        self.set_rates(rates or {})
        self._slots = threading.BoundedSemaphore(max_connections)
        self._sockets: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server = self._make_server(port)
        self._thread: threading.Thread | None = None

    # -- control ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def counts(self) -> dict[str, int]:
        """requests, forwarded, rejected, upstream_errors and one entry per injected fault kind."""
        with self._lock:
            return {
                "requests": 0,
                "forwarded": 0,
                "rejected": 0,
                "upstream_errors": 0,
                **{k: 0 for k in self.KINDS},
                **self._counts,
            }

    @property
    def injected(self) -> int:
        counts = self.counts
        return sum(counts[k] for k in self.KINDS)

    def set_rates(self, rates: Mapping[str, float]) -> None:
        unknown = set(rates) - set(self.KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {self.KINDS}")
        if any(r < 0 for r in rates.values()) or sum(rates.values()) > 1.0 + 1e-9:
            raise ValueError("fault rates must be >= 0 and add up to at most 1")
        with self._lock:
            self._rates = dict(rates)

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"faultproxy-{self._server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(10)
        self._server.server_close()
        with self._lock:
            open_sockets = list(self._sockets)
        for sock in open_sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals --------------------------------------------------------------------------------

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + n

    def _draw(self, method: str, path: str) -> tuple[str | None, float]:
        """The fault for one request (or None) and a fraction used to place cuts in a body."""
        self._count("requests")
        if self.applies is not None and not self.applies(method, path):
            return None, 0.0
        with self._lock:
            roll, where = self._rng.random(), self._rng.random()
            total = 0.0
            for kind in self.KINDS:
                total += self._rates.get(kind, 0.0)
                if roll < total:
                    self._counts[kind] = self._counts.get(kind, 0) + 1
                    return kind, where
        return None, where

    def _make_server(self, port: int) -> ThreadingHTTPServer:
        proxy = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 128

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients that vanish mid-request are normal here

            def process_request(self, request: Any, client_address: Any) -> None:
                if not proxy._slots.acquire(blocking=False):
                    proxy._count("rejected")
                    self.shutdown_request(request)
                    return
                with proxy._lock:
                    proxy._sockets.add(request)
                try:
                    super().process_request(request, client_address)
                except BaseException:
                    proxy._release(request)
                    raise

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    proxy._release(request)

        class Handler(_ProxyHandler):
            timeout = self.client_timeout
            owner = proxy

        return Server(("127.0.0.1", port), Handler)

    def _release(self, request: socket.socket) -> None:
        with self._lock:
            present = request in self._sockets
            self._sockets.discard(request)
        if present:
            self._slots.release()


def _reset(sock: socket.socket) -> None:
    """Close with RST: SO_LINGER on with a zero timeout discards unsent data and resets."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy
    server_version = "faultproxy"
    _upstream: http.client.HTTPConnection | None = None

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        if self._upstream is not None:
            self._upstream.close()

    # every method goes through the same path
    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    # -- request body -----------------------------------------------------------------------------

    def _request_body(self) -> tuple[Iterator[bytes] | None, bool]:
        """The request body as 64 KiB pieces (None without one) and whether it is chunked."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._chunked_body(), True
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0:
            return None, False
        return self._sized_body(length), False

    def _sized_body(self, length: int) -> Iterator[bytes]:
        left = length
        while left > 0:
            piece = self.rfile.read(min(PIECE, left))
            if not piece:
                raise ConnectionError("client closed the connection mid-body")
            left -= len(piece)
            yield piece

    def _chunked_body(self) -> Iterator[bytes]:
        while True:
            size_line = self.rfile.readline(1024)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            yield from self._sized_body(size)
            self.rfile.readline(8)  # the CRLF after the chunk

    # -- the proxy --------------------------------------------------------------------------------

    def _proxy(self) -> None:
        owner = self.owner
        kind, where = owner._draw(self.command, self.path)
        body, chunked = self._request_body()
        if kind == "reset_before":
            self.close_connection = True
            _reset(self.connection)
            return
        if kind in FaultProxy.STATUS:
            for _ in body or ():
                pass  # drain, so the client reads our answer instead of a broken pipe
            self._send_error(FaultProxy.STATUS[kind])
            return
        if kind == "latency":
            owner._stopping.wait(owner.latency)
        try:
            response = self._forward(body, chunked)
        except (OSError, http.client.HTTPException) as exc:
            owner._count("upstream_errors")
            self._send_plain(502, f"faultproxy: upstream failed: {exc}\n".encode())
            return
        owner._count("forwarded")
        self._relay(response, kind, where)

    def _forward(self, body: Iterator[bytes] | None, chunked: bool) -> http.client.HTTPResponse:
        owner = self.owner
        if self._upstream is None:
            self._upstream = http.client.HTTPConnection(
                *owner.upstream, timeout=owner.upstream_timeout
            )
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
        try:
            self._upstream.request(
                self.command, self.path, body=body, headers=headers, encode_chunked=chunked
            )
            return self._upstream.getresponse()
        except (OSError, http.client.HTTPException):
            self._upstream.close()
            self._upstream = None
            raise

    def _relay(self, response: http.client.HTTPResponse, kind: str | None, where: float) -> None:
        owner = self.owner
        length_header = response.getheader("Content-Length")
        length = int(length_header) if length_header is not None else None
        has_body = self.command != "HEAD" and response.status not in (204, 304)
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() in HOP_BY_HOP or key.lower() in ("date", "server"):
                continue
            if key.lower() == "location" and value.startswith(owner.upstream_url):
                value = owner.url + value[len(owner.upstream_url) :]
            self.send_header(key, value)
        if kind == "latency":  # says what was done, so a test need not guess from the clock
            self.send_header("X-Fault-Injected", "latency")
        if has_body and length is None:
            self.close_connection = True  # body until EOF: the close ends it
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        cut = None
        if kind in ("reset_mid_body", "truncate"):
            cut = int((length or PIECE) * where) if has_body else 0
        sent = 0
        while has_body:
            piece = response.read(PIECE)
            if not piece:
                break
            if cut is not None and sent + len(piece) >= cut:
                self.wfile.write(piece[: cut - sent])
                sent = cut
                break
            self.wfile.write(piece)
            sent += len(piece)
        if cut is None:
            if response.will_close and self._upstream is not None:
                self._upstream.close()
                self._upstream = None
            return
        # A faulted response: the upstream connection is mid-body, throw it away.
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
        if kind == "reset_mid_body":
            _reset(self.connection)
        else:
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_WR)

    def _send_error(self, status: int) -> None:
        body, content_type = _error_body(status, self.owner.dialect)
        self._send_plain(status, body, content_type)

    def _send_plain(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.close_connection = True
        self.send_response_only(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
