"""HTTP plumbing shared by the simple_grpo servers: JSON error answers, a size-capped body reader,
and a waitress server whose own 413s are JSON too, runnable on a background thread."""
from __future__ import annotations

import hmac
import json
import threading
import time

import bottle
from waitress import create_server
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.utilities import RequestEntityTooLarge


class ApiError(Exception):
    """An HTTP error answer: status, one-line message, optional extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def json_response(obj: dict, status: int = 200, headers: dict | None = None) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(json.dumps(obj), status=status, headers={
        "Content-Type": "application/json", **(headers or {})})


def raw_header(name: str) -> str | None:
    """The current request's header as WSGI holds it (its bytes as latin-1). bottle's get_header
    re-decodes it as UTF-8 and raises UnicodeDecodeError (a 500) on other bytes."""
    return bottle.request.environ.get("HTTP_" + name.upper().replace("-", "_"))


def iter_body(environ: dict, limit: int, *, required: bool = False):
    """The request body in chunks of at most 1 MiB, refusing more than `limit` bytes (413) before
    reading when the length is declared, and while reading a chunked body. No body: nothing, or
    411 when `required`."""
    stream, cl = environ["wsgi.input"], environ.get("CONTENT_LENGTH") or ""
    if cl:
        if not cl.isdigit():
            raise ApiError(400, f"bad Content-Length {cl[:40]!r}")
        n = int(cl)
        if n > limit:
            raise ApiError(413, f"body too large: {n} bytes > limit {limit}")
    elif environ.get("wsgi.input_terminated"):  # chunked, de-chunked by the server
        n = limit + 1
    elif required:
        raise ApiError(411, "this endpoint needs Content-Length or a chunked body")
    else:
        return
    got = 0
    while got < n:
        chunk = stream.read(min(n - got, 1 << 20))
        if not chunk:
            break
        got += len(chunk)
        if got > limit:
            raise ApiError(413, f"body too large: more than {limit} bytes")
        yield chunk
    if cl and got < n:
        raise ApiError(400, f"truncated body: got {got} of {n} bytes")


def read_body(environ: dict, limit: int) -> bytes:
    """The whole request body as bytes (see iter_body)."""
    return b"".join(iter_body(environ, limit))


class _Json413(RequestEntityTooLarge):
    def to_response(self, ident=None):
        body = json.dumps({"error": f"body too large: {self.body}"}).encode()
        return (f"{self.code} {self.reason}", [("Content-Type", "application/json")], body)


class _LimitedAdj:
    """waitress's Adjustments with another max_request_body_size, for one request."""

    def __init__(self, adj, max_request_body_size: int):
        self._adj, self.max_request_body_size = adj, max_request_body_size

    def __getattr__(self, name):
        return getattr(self._adj, name)


class _Parser(HTTPRequestParser):
    """waitress's parser, answering its own 413 (declared or streamed size) with our JSON.

    waitress's cap (`max_request_body_size`) is the largest body of any endpoint (a weights
    upload); every other request is held to `adj.small_body_size` as soon as its headers are
    parsed, so an oversized /upload is refused before its body is buffered, not after. A request
    without the server's bearer token never gets the large cap (no multi-GiB spool before its
    401). `started` and `large` let the server close requests that arrive too slowly."""

    large = False

    def __init__(self, adj):
        super().__init__(adj)
        self.started = time.monotonic()

    def parse_header(self, header_plus):
        super().parse_header(header_plus)
        small = getattr(self.adj, "small_body_size", None)
        large = getattr(self.adj, "large_body_paths", ())
        token = getattr(self.adj, "token", "")
        auth = self.headers.get("AUTHORIZATION", "").encode("latin-1")
        self.large = (self.command == "POST" and self.path.rstrip("/") in large and (
            not token or hmac.compare_digest(auth, f"Bearer {token}".encode())))
        if small is not None and not self.large:
            self.adj = _LimitedAdj(self.adj, small + _SLACK)
        if not self.chunked and not self.content_length:  # waitress would send "100 Continue",
            self.expect_continue = False  # mark the request unfinished and never answer it

    def received(self, data):
        n = super().received(data)
        if type(self.error) is RequestEntityTooLarge:
            self.error = _Json413(f"more than {self.adj.max_request_body_size - _SLACK} bytes")
        return n


class _Channel(HTTPChannel):
    parser_class = _Parser


_SLACK = 1 << 16  # chunk framing bytes waitress counts against its limit


def url_host(host: str) -> str:
    """IPv6 literals go in brackets inside a URL."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _close_slow_requests(server, timeout: float) -> None:
    """Make waitress's once-a-second maintenance also close connections whose request (headers,
    and the body unless it is a large-body upload) has been arriving for over `timeout` seconds,
    so slow clients (slowloris) cannot hold connection slots; idle ones close after `timeout`."""
    close_idle = server.maintenance

    def maintenance(now):
        close_idle(now)
        cutoff = time.monotonic() - timeout
        for channel in list(server.active_channels.values()):
            req = channel.request
            if (isinstance(req, _Parser) and not req.completed and req.started < cutoff
                    and not (req.large and req.headers_finished)):
                channel.will_close = True

    server.maintenance = maintenance


def make_server(app, host: str = "127.0.0.1", port: int = 0, threads: int = 8,
                max_body_bytes: int = 64 << 20, large_body_paths: dict[str, int] | None = None,
                request_timeout: float | None = None, token: str | None = None):
    """A waitress server (not started) whose 413s are JSON; `.effective_port` is the bound port.
    Bodies are capped at `max_body_bytes`, except POSTs to `large_body_paths` {path: cap} that
    carry `Authorization: Bearer <token>` (when a token is set). Requests must arrive within
    `request_timeout` seconds (see _close_slow_requests). `request_timeout` and `token` default
    to the app's config entries "request_timeout_s" and "token" (server.make_app sets them), the
    connection limit is its "connection_limit" (waitress' default 100 without one)."""
    host = "127.0.0.1" if host == "localhost" else host  # one socket, so one effective_port
    config = getattr(app, "config", {})
    timeout = config.get("request_timeout_s", 60) if request_timeout is None else request_timeout
    cap = max([max_body_bytes, *(large_body_paths or {}).values()])
    # poll(), not select(): select() cannot watch descriptors above 1023
    server = create_server(app, host=host, port=port, threads=threads, asyncore_use_poll=True,
                           connection_limit=config.get("connection_limit", 100),
                           max_request_body_size=cap + _SLACK, ident="ref_server",
                           channel_timeout=max(1, round(timeout)), cleanup_interval=1,
                           clear_untrusted_proxy_headers=True)
    server.adj.small_body_size = max_body_bytes
    server.adj.large_body_paths = frozenset(large_body_paths or ())
    server.adj.token = token if token is not None else config.get("token", "")
    server.channel_class = _Channel
    _close_slow_requests(server, timeout)
    return server


class RunningServer:
    """A waitress server for `app` on a background thread; close() stops it (tests, tools)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, threads: int = 8,
                 max_body_bytes: int = 64 << 20, large_body_paths: dict[str, int] | None = None,
                 request_timeout: float | None = None, token: str | None = None):
        self.server = make_server(app, host, port, threads, max_body_bytes, large_body_paths,
                                  request_timeout, token)
        self.url = f"http://{url_host(host)}:{self.server.effective_port}"
        self.thread = threading.Thread(target=self.server.run, name="waitress", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Close the sockets from the server's own loop thread, then stop the worker threads."""
        from waitress import wasyncore

        try:
            self.server.trigger.pull_trigger(
                lambda: wasyncore.close_all(self.server._map, ignore_all=True))
        except OSError:  # the loop is already gone (closed twice, or it died)
            pass
        self.thread.join(timeout=10)
        if self.thread.is_alive():  # the loop did not run the thunk: close from here
            wasyncore.close_all(self.server._map, ignore_all=True)
            self.thread.join(timeout=5)
        self.server.task_dispatcher.shutdown(timeout=5)
