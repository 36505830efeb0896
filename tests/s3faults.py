"""An HTTP proxy in front of moto's S3 server that makes chosen requests fail the way S3 throttles.

Clients reach it through ``AWS_ENDPOINT_URL`` like any S3-compatible store (the ``faulty_s3``
fixture sets that), so pyarrow and boto3 go through it unchanged; so do Ray workers started after
the variable is set (a running Ray's workers keep the endpoint they started with). It forwards every
request byte for byte (headers, chunked bodies with their trailers, HEAD) except those a
``FaultPlan`` selects, which get S3's ``503 SlowDown`` answer instead (a plan can also hold chosen
object reads unanswered until the test lets them go, so a job is surely still running when the test
acts on it); and it counts requests by kind, so a test can check how many object reads or list pages
a piece of code really issued.

Requests are path-style (``/bucket/key?query``), which is what both SDKs send to an IP endpoint.
"""
from __future__ import annotations

import http.client
import os
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

ALWAYS = -1
"""``FaultPlan.get_failures`` / ``list_failures`` value: fail every matching request."""
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}
"""Response headers the proxy sets itself (it re-frames every response body with a Content-Length)."""
SLOW_DOWN_BODY = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                  '<Message>Please reduce your request rate.</Message><Resource>{resource}</Resource>'
                  '<RequestId>{request_id}</RequestId></Error>')
OBJECT_SUBRESOURCES = {"acl", "attributes", "legal-hold", "retention", "tagging", "torrent", "uploadId"}
"""Query parameters that make a GET of a key something other than reading the object."""
LIST_PARAMETERS = {"list-type", "prefix", "delimiter", "marker", "max-keys", "encoding-type",
                   "continuation-token", "start-after", "fetch-owner", "x-id"}
"""The query parameters of ListObjects(V2); a bucket GET with any other (``?location``, ...) is not a listing."""
UPSTREAM_TIMEOUT_S = 60.0  # a forwarded request that takes longer than this is a broken test, not a slow store


@dataclass(frozen=True)
class FaultPlan:
    """Which requests the proxy answers with ``503 SlowDown`` instead of forwarding them."""

    get_keys: Callable[[str, str], bool] | None = None
    """(bucket, key) → whether GETs of that object may fail; None: no object GET fails."""
    get_failures: int = 0
    """The first this many GETs of each selected object fail (``ALWAYS``: every one)."""
    list_failures: int = 0
    """The first this many list requests (any bucket) fail (``ALWAYS``: every one)."""
    hold_keys: Callable[[str, str], bool] | None = None
    """(bucket, key) → whether GETs of that object wait, unanswered, until the plan is changed
    (``configure``, ``heal``): a read that hangs, so the job reading it cannot end meanwhile."""


def keys(names: Iterable[str]) -> Callable[[str, str], bool]:
    """A ``FaultPlan.get_keys`` that selects objects by key (in any bucket)."""
    chosen = frozenset(names)
    return lambda bucket, key: key in chosen


class FaultyS3Proxy:
    """The proxy: ``start()``, point clients at ``url``, ``configure()`` faults, read ``counts``.

    ``counts`` keys: ``get`` (object GETs, failed ones included), ``list`` (ListObjects pages),
    ``head``, ``put``, ``other``, ``injected`` (answers the proxy made up).
    """

    def __init__(self, upstream: str):
        parsed = urllib.parse.urlsplit(upstream)
        self._upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self._lock = threading.Lock()
        self._plan = FaultPlan()
        self._failed: Counter[tuple[str, str]] = Counter()  # (bucket, key) → GET failures injected
        self._lists_failed = 0
        self._counts: Counter[str] = Counter()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-s3", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultyS3Proxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def configure(self, plan: FaultPlan) -> None:
        """Use ``plan`` from now on; failures already injected no longer count against it."""
        with self._lock:
            self._plan, self._lists_failed = plan, 0
            self._failed.clear()

    def heal(self) -> None:
        """Forward everything from now on, as a store does once it has stopped throttling."""
        self.configure(FaultPlan())

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()

    def _decide(self, method: str, bucket: str, key: str, query: dict[str, list[str]]) -> tuple[bool, bool]:
        """Count the request; (whether it is to be failed, whether it is held first)."""
        kind = _kind(method, bucket, key, query)
        with self._lock:
            self._counts[kind] += 1
            plan = self._plan
            fail = False
            if kind == "get" and plan.get_keys is not None and plan.get_keys(bucket, key):
                if plan.get_failures == ALWAYS or self._failed[bucket, key] < plan.get_failures:
                    self._failed[bucket, key] += 1
                    fail = True
            elif kind == "list" and (plan.list_failures == ALWAYS or self._lists_failed < plan.list_failures):
                self._lists_failed += 1
                fail = True
            if fail:
                self._counts["injected"] += 1
            return fail, kind == "get" and self._held(bucket, key)

    def _held(self, bucket: str, key: str) -> bool:
        """Whether the plan in force holds GETs of this object (the caller holds the lock, or polls)."""
        hold = self._plan.hold_keys
        return hold is not None and hold(bucket, key)


def _kind(method: str, bucket: str, key: str, query: dict[str, list[str]]) -> str:
    if method == "GET" and key and not query.keys() & OBJECT_SUBRESOURCES:
        return "get"
    if method == "GET" and bucket and not key and not query.keys() - LIST_PARAMETERS:
        return "list"  # ListObjectsV2, or V1
    return {"HEAD": "head", "PUT": "put"}.get(method, "other")


def _handler(proxy: FaultyS3Proxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue answered by the base class

        def do_GET(self):
            self._relay()

        do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            pass  # quiet: pytest shows failures, not every request

        def _relay(self) -> None:
            split = urllib.parse.urlsplit(self.path)
            bucket, _, key = urllib.parse.unquote(split.path).lstrip("/").partition("/")
            query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
            body = self._read_body()
            fail, held = proxy._decide(self.command, bucket, key, query)
            while held:  # this request's own thread: other requests go on meanwhile
                time.sleep(0.05)
                with proxy._lock:
                    held = proxy._held(bucket, key)
            if fail:
                self._slow_down(split.path)
                return
            status, reason, headers, data = _forward(proxy._upstream, self.command, self.path, self.headers, body)
            self.send_response_only(status, reason)
            for name, value in headers:
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            if self.command == "HEAD" or status in (204, 304):
                # No body; a HEAD's Content-Length is the object's size, which clients read.
                length = next((v for n, v in headers if n.lower() == "content-length"), None)
                if length is not None:
                    self.send_header("Content-Length", length)
                self.end_headers()
                return
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _read_body(self) -> bytes:
            """The request body exactly as sent: chunked framing and trailers are kept, not decoded."""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                return b"".join(_raw_chunks(self.rfile))
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _slow_down(self, resource: str) -> None:
            data = SLOW_DOWN_BODY.format(resource=resource, request_id=uuid.uuid4().hex).encode()
            self.send_response_only(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Retry-After", "0")
            if self.command == "HEAD":
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def _raw_chunks(stream) -> Iterator[bytes]:
    """A chunked request body, framing included, up to and including the blank line after the trailers."""
    while True:
        line = stream.readline()
        yield line
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            break
        yield stream.read(size + 2)  # the chunk and its CRLF
    while True:  # trailers (aws-chunked puts its checksum here), then an empty line
        line = stream.readline()
        yield line
        if line in (b"\r\n", b"\n", b""):
            return


def _forward(upstream: tuple[str, int], method: str, path: str, headers, body: bytes):
    """Send the request upstream unchanged; (status, reason, headers, body) of the answer."""
    conn = http.client.HTTPConnection(*upstream, timeout=UPSTREAM_TIMEOUT_S)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            if name.lower() != "expect":  # the proxy has answered 100-continue itself
                conn.putheader(name, value)
        conn.endheaders(body or None)
        response = conn.getresponse()
        data = response.read()  # de-chunked if upstream chunked it; re-framed with a Content-Length
        return response.status, response.reason, response.getheaders(), data
    finally:
        conn.close()


@pytest.fixture
def faulty_s3(s3_server):
    """A ``FaultyS3Proxy`` in front of the session's moto server, set as ``AWS_ENDPOINT_URL`` for one test.

    storage caches one filesystem per (bucket, endpoint), so the new endpoint gets fresh clients.
    """
    proxy = FaultyS3Proxy(s3_server).start()
    saved = {name: os.environ.get(name) for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}
    os.environ["AWS_ENDPOINT_URL"] = proxy.url
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    try:
        yield proxy
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        proxy.stop()
