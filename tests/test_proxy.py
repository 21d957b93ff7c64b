"""Tests for runner_gateway/proxy.py.

Two kinds:

- loopback tests: tests/helpers_upstream.py runs an upstream and a proxy-only
  gateway in a subprocess; the test drives it with http.client and raw
  sockets and reads back what the upstream saw. Streaming is asserted by
  arrival times against the upstream's write times (time.monotonic is one
  clock across processes on Linux).
- in-memory tests: a MemoryReactorClock, the real Twisted HTTP server channel
  on a StringTransport for the client side, and the Agent's connection on a
  StringTransport for the runner side, so timers and flow control are exact.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.http_headers import Headers
from zope.interface import implementer

from runner_gateway import context, usage
from runner_gateway.context import RequestContext
from runner_gateway.edge.site import GatewaySite
from runner_gateway.proxy import ReverseProxyResource, classify, upstream_headers
from runner_gateway.settings import RunnerSettings

HELPER = Path(__file__).resolve().parent / "helpers_upstream.py"

# ===================================================================== loopback


class Harness:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HELPER), "--tls"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 15)
        if not ready:
            self.proc.kill()
            raise RuntimeError("helper did not start")
        ports = json.loads(self.proc.stdout.readline())
        self.gateway: int = ports["gateway"]
        self.upstream: int = ports["upstream"]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        port: int | None = None,
    ) -> tuple[http.client.HTTPResponse, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port or self.gateway, timeout=5)
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response, data

    def events(self, tag: str) -> dict[str, float]:
        _, data = self.request("GET", "/_events", port=self.upstream)
        events: dict[str, float] = json.loads(data)["events"].get(tag, {})
        return events

    def big_written(self, tag: str) -> int:
        _, data = self.request("GET", "/_events", port=self.upstream)
        written: int = json.loads(data)["big"].get(tag, 0)
        return written

    def wait_event(self, tag: str, name: str, timeout: float = 3.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.events(tag)
            if name in events:
                return events[name]
            time.sleep(0.01)
        raise AssertionError(f"upstream never recorded {name} for {tag}")

    def ctx(self, request_id: str) -> dict[str, Any]:
        _, data = self.request("GET", f"/_ctx?id={request_id}")
        result: dict[str, Any] = json.loads(data)
        return result

    def logs(self) -> list[dict[str, str]]:
        _, data = self.request("GET", "/_logs")
        result: list[dict[str, str]] = json.loads(data)
        return result

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


def _stream_lines(
    h: Harness, path: str, port: int | None = None
) -> tuple[list[dict[str, Any]], list[float]]:
    conn = http.client.HTTPConnection("127.0.0.1", port or h.gateway, timeout=5)
    conn.request("GET", path)
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("transfer-encoding") == "chunked"
    records: list[dict[str, Any]] = []
    arrivals: list[float] = []
    while True:
        line = response.readline()
        if not line:
            break
        if line.strip() in (b"",):
            continue
        arrivals.append(time.monotonic())
        text = line.removeprefix(b"data: ")
        records.append(json.loads(text))
    conn.close()
    return records, arrivals


def _assert_streamed(records: list[dict[str, Any]], arrivals: list[float], n: int) -> list[float]:
    assert [r["i"] for r in records] == list(range(n))
    latencies = [a - r["t"] for r, a in zip(records, arrivals, strict=True)]
    # Each line reaches the client right after the runner wrote it, long
    # before the next one is written (0.2 s later): no buffering anywhere.
    assert max(latencies) < 0.1, latencies
    assert arrivals[0] < records[-1]["t"] - 0.5
    return latencies


@pytest.mark.timeout(20)
def test_ndjson_streams_line_by_line(harness: Harness) -> None:
    records, arrivals = _stream_lines(harness, "/ok/stream?n=5&gap=0.2")
    latencies = _assert_streamed(records, arrivals, 5)
    direct, direct_arrivals = _stream_lines(harness, "/stream?n=5&gap=0.2", port=harness.upstream)
    direct_latencies = _assert_streamed(direct, direct_arrivals, 5)
    print(
        "\nNDJSON per-line latency via gateway:"
        f" median {statistics.median(latencies) * 1e3:.2f} ms,"
        f" max {max(latencies) * 1e3:.2f} ms; direct median"
        f" {statistics.median(direct_latencies) * 1e3:.2f} ms"
    )


@pytest.mark.timeout(20)
def test_sse_streams_event_by_event(harness: Harness) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", harness.gateway, timeout=5)
    conn.request("GET", "/ok/stream?n=4&gap=0.2&kind=sse")
    response = conn.getresponse()
    assert response.getheader("content-type") == "text/event-stream"
    records, arrivals = _read_sse(response)
    conn.close()
    latencies = _assert_streamed(records, arrivals, 4)
    print(f"\nSSE per-event latency: median {statistics.median(latencies) * 1e3:.2f} ms")


def _read_sse(response: http.client.HTTPResponse) -> tuple[list[dict[str, Any]], list[float]]:
    records: list[dict[str, Any]] = []
    arrivals: list[float] = []
    while True:
        line = response.readline()
        if not line:
            return records, arrivals
        if line.startswith(b"data: "):
            arrivals.append(time.monotonic())
            records.append(json.loads(line[6:]))


@pytest.mark.timeout(20)
def test_request_headers_rewritten(harness: Harness) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", harness.gateway, timeout=5)
    conn.putrequest("GET", "/ok/echo?x=1&y=%20z&x=2", skip_accept_encoding=True)
    for name, value in [
        ("Authorization", "Bearer v4.local.sekrit-token"),
        ("Origin", "http://evil.example"),
        ("Connection", "keep-alive, X-Hop-Named"),
        ("X-Hop-Named", "1"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Proxy-Authorization", "Basic eDp5"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("X-Forwarded-Proto", "https"),
        ("X-Request-Id", "client-chosen"),
        ("Cookie", "a=b"),
        ("Accept-Encoding", "gzip"),
        ("X-Keep", "yes"),
    ]:
        conn.putheader(name, value)
    conn.endheaders()
    response = conn.getresponse()
    seen = json.loads(response.read())
    conn.close()
    headers: dict[str, list[str]] = {}
    for name, value in seen["headers"]:
        headers.setdefault(name, []).append(value)
    for dropped in (
        "authorization",
        "origin",
        "x-hop-named",
        "keep-alive",
        "te",
        "proxy-authorization",
        "connection",
        "cookie",  # a credential for something else (forwardHeaders can allow it)
    ):
        assert dropped not in headers, dropped
    assert headers["host"] == [f"127.0.0.1:{harness.upstream}"]
    # The peer is not a trusted proxy: what it says of the client is replaced.
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["x-real-ip"] == ["127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["http"]
    assert headers["x-forwarded-host"] == [f"127.0.0.1:{harness.gateway}"]
    request_id = response.getheader("x-gateway-request-id")
    assert request_id and headers["x-request-id"] == [request_id]
    assert headers["accept-encoding"] == ["gzip"]
    assert headers["x-keep"] == ["yes"]
    assert seen["uri"] == "/echo?x=1&y=%20z&x=2"
    # Response side: hop-by-hop and CORS headers of the runner dropped, one
    # Server and one Date (the runner's), end-to-end headers kept.
    assert response.getheader("x-end") == "yes"
    for dropped in ("keep-alive", "proxy-authenticate", "trailer", "access-control-allow-origin"):
        assert response.getheader(dropped) is None, dropped
    assert response.headers.get_all("server") == ["upstream/1.0"]
    assert len(response.headers.get_all("date") or []) == 1
    # The token never reaches a log line.
    assert not any("sekrit" in line["text"] for line in harness.logs())


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (os.urandom(1024 * 1024 + 17), "application/octet-stream"),
        (json.dumps({"model": "m", "prompt": "ß\u2603" * 1000}).encode(), "application/json"),
        (bytes(range(256)) * 3, "image/png"),
    ],
)
def test_request_body_byte_for_byte(harness: Harness, body: bytes, content_type: str) -> None:
    import hashlib

    response, data = harness.request(
        "POST", "/ok/echo", body=body, headers={"Content-Type": content_type}
    )
    seen = json.loads(data)
    assert response.status == 200
    assert seen["method"] == "POST"
    assert seen["length"] == len(body)
    assert seen["sha256"] == hashlib.sha256(body).hexdigest()
    assert ["content-type", content_type] in seen["headers"]
    assert ["content-length", str(len(body))] in seen["headers"]


@pytest.mark.timeout(20)
def test_body_over_limit_is_413_without_contacting_runner(harness: Harness) -> None:
    response, data = harness.request("POST", "/small/echo?tag=big413", body=b"x" * 1001)
    assert response.status == 413
    assert "runner small" in json.loads(data)["error"]
    response, data = harness.request("POST", "/small/echo?tag=ok413", body=b"x" * 1000)
    assert response.status == 200
    harness.wait_event("ok413", "received")
    assert "received" not in harness.events("big413")


@pytest.mark.timeout(20)
def test_dead_runner_502_in_both_shapes(harness: Harness) -> None:
    response, data = harness.request("POST", "/dead/api/generate", body=b"{}")
    assert response.status == 502
    assert json.loads(data) == {"error": "the runner is unreachable (runner dead)"}
    response, data = harness.request("POST", "/dead/v1/chat/completions", body=b"{}")
    assert response.status == 502
    error = json.loads(data)["error"]
    assert error["message"] == "the runner is unreachable (runner dead)"
    assert error["type"] == "api_error"
    ctx = harness.ctx(response.getheader("x-gateway-request-id") or "")
    assert ctx["status"] == 502 and ctx["upstream_error"] == "connect"


@pytest.mark.timeout(20)
def test_first_byte_timeout_504_and_runner_released(harness: Harness) -> None:
    start = time.monotonic()
    response, data = harness.request("GET", "/fbt/hang?tag=fbt1")
    elapsed = time.monotonic() - start
    assert response.status == 504
    assert json.loads(data) == {"error": "the runner did not answer within 0.3s (runner fbt)"}
    assert 0.25 < elapsed < 2.0
    lost = harness.wait_event("fbt1", "lost")
    assert lost - start < 2.0
    ctx = harness.ctx(response.getheader("x-gateway-request-id") or "")
    assert ctx["upstream_error"] == "timeout" and ctx["status"] == 504
    response, data = harness.request("GET", "/fbt/v1/hang")
    assert response.status == 504
    assert json.loads(data)["error"]["type"] == "timeout_error"


@pytest.mark.timeout(20)
def test_total_timeout_before_headers_is_504(harness: Harness) -> None:
    response, _ = harness.request("GET", "/total/hang")
    assert response.status == 504


@pytest.mark.timeout(20)
@pytest.mark.parametrize("path", ["/ok/die?n=2", "/ok/die-length", "/idle/hang-stream"])
def test_runner_dying_mid_stream_cuts_client_stream(harness: Harness, path: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", harness.gateway, timeout=5)
    conn.request("GET", path)
    response = conn.getresponse()
    assert response.status == 200
    request_id = response.getheader("x-gateway-request-id") or ""
    with pytest.raises(http.client.IncompleteRead) as excinfo:
        response.read()
    assert excinfo.value.partial  # what the runner did send arrived
    conn.close()
    ctx = harness.ctx(request_id)
    assert ctx["aborted"] is True
    assert ctx["upstream_error"] == ("timeout" if path.startswith("/idle") else "reset")
    warnings = [line for line in harness.logs() if request_id in line["text"]]
    assert warnings and warnings[0]["level"] == "warn"
    assert "runner " in warnings[0]["text"]


def _raw_get(h: Harness, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", h.gateway), timeout=5)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
    return sock


@pytest.mark.timeout(20)
def test_client_disconnect_mid_stream_closes_upstream_fast(harness: Harness) -> None:
    sock = _raw_get(harness, "/ok/hang-stream?tag=cancel1")
    received = b""
    while b'{"i": 0}' not in received:
        received += sock.recv(65536)
    sock.close()
    closed = time.monotonic()
    lost = harness.wait_event("cancel1", "lost")
    delay = lost - closed
    print(f"\ncancel propagation mid-stream: {delay * 1e3:.2f} ms")
    assert delay < 1.0


@pytest.mark.timeout(20)
def test_client_disconnect_before_headers_closes_upstream_fast(harness: Harness) -> None:
    sock = _raw_get(harness, "/ok/hang?tag=cancel2")
    harness.wait_event("cancel2", "received")
    sock.close()
    closed = time.monotonic()
    lost = harness.wait_event("cancel2", "lost")
    delay = lost - closed
    print(f"\ncancel propagation before headers: {delay * 1e3:.2f} ms")
    assert delay < 1.0


@pytest.mark.timeout(20)
def test_persistent_upstream_connections_are_reused(harness: Harness) -> None:
    ports = set()
    for _ in range(5):
        response, data = harness.request("GET", "/ok/echo")
        assert response.status == 200
        ports.add(json.loads(data)["peer_port"])
    assert len(ports) == 1


@pytest.mark.timeout(20)
def test_https_runner_verified_with_ca_path(harness: Harness) -> None:
    ports = set()
    for _ in range(3):
        response, data = harness.request("POST", "/tls/echo?q=1", body=b'{"x": 1}')
        assert response.status == 200
        seen = json.loads(data)
        assert seen["uri"] == "/echo?q=1" and seen["length"] == 8
        ports.add(seen["peer_port"])
    assert len(ports) == 1  # TLS connections are pooled too
    records, arrivals = _stream_lines(harness, "/tls/stream?n=4&gap=0.2")
    _assert_streamed(records, arrivals, 4)


@pytest.mark.timeout(20)
def test_shared_pool_keeps_tls_connections_per_runner(harness: Harness) -> None:
    def port(path: str) -> int:
        response, data = harness.request("GET", path)
        assert response.status == 200
        peer: int = json.loads(data)["peer_port"]
        return peer

    # Plain http: one upstream connection serves both runners of the pool.
    assert port("/oka/echo") == port("/okb/echo") == port("/oka/echo")
    # https: each runner's TLS policy gets connections of its own.
    a, b = port("/tlsa/echo"), port("/tlsb/echo")
    assert a != b
    assert port("/tlsa/echo") == a and port("/tlsb/echo") == b


@pytest.mark.timeout(20)
def test_https_runner_with_untrusted_certificate_is_502(harness: Harness) -> None:
    response, data = harness.request("GET", "/tlsbad/api/tags")
    assert response.status == 502
    assert json.loads(data) == {"error": "the TLS handshake with the runner failed (runner tlsbad)"}
    ctx = harness.ctx(response.getheader("x-gateway-request-id") or "")
    assert ctx["upstream_error"] == "tls"


@pytest.mark.timeout(20)
def test_head_and_options(harness: Harness) -> None:
    response, data = harness.request("GET", "/ok/fixed")
    assert response.getheader("content-length") == "100" and len(data) == 100
    response, data = harness.request("HEAD", "/ok/fixed")
    assert response.status == 200
    assert response.getheader("content-length") == "100"
    assert response.getheader("content-type") == "text/plain"
    assert data == b""
    response, data = harness.request("OPTIONS", "/ok/echo")
    assert response.status == 200
    assert json.loads(data)["method"] == "OPTIONS"


@pytest.mark.timeout(30)
def test_slow_client_pauses_the_runner(harness: Harness) -> None:
    mib = 48
    before = harness.rss_kib()
    sock = _raw_get(harness, f"/ok/big?mb={mib}&tag=bp")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    head = sock.recv(65536)
    assert b"200 OK" in head
    time.sleep(1.0)  # the client does not read; everything upstream of it must stall
    stalled_at = harness.big_written("bp")
    grown = harness.rss_kib() - before
    assert stalled_at < 24 * 1024 * 1024, stalled_at
    assert grown < 24 * 1024, grown
    total = len(head.partition(b"\r\n\r\n")[2])
    while True:
        data = sock.recv(1 << 20)
        if not data:
            break
        total += len(data)
        if total >= mib * 1024 * 1024:
            break
    sock.close()
    assert total == mib * 1024 * 1024
    assert harness.big_written("bp") == mib * 1024 * 1024
    print(
        f"\nbackpressure: runner stalled after {stalled_at / 2**20:.1f} MiB of {mib} MiB,"
        f" gateway RSS grew {grown / 1024:.1f} MiB"
    )


# ===================================================================== in memory


def _runner(**kwargs: Any) -> RunnerSettings:
    base: dict[str, Any] = {"name": "r1", "host": "10.0.0.5", "port": 11434, "path": "/r1"}
    base.update(kwargs)
    return RunnerSettings(**base)


class _MemRequest(server.Request):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gateway_context = RequestContext(request_id="mem-1", started=0.0)


class _Root(resource.Resource):
    isLeaf = True

    def __init__(self, proxy: ReverseProxyResource, transform: Any = None) -> None:
        super().__init__()
        self.proxy = proxy
        self.transform = transform
        self.ctx: RequestContext | None = None

    def render(self, request: server.Request) -> bytes | int:
        ctx: RequestContext = request.gateway_context  # type: ignore[attr-defined]
        self.ctx = ctx
        ctx.runner = self.proxy.runner
        ctx.upstream_path = request.uri.removeprefix(b"/r1")
        ctx.response_transform = self.transform
        return self.proxy.render(request)


class Mem:
    """A client connection into a Site holding the proxy, and the runner's side by hand."""

    def __init__(self, transform: Any = None, gateway: bool = False, **runner: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.proxy = ReverseProxyResource(_runner(**runner), self.reactor)
        self.root = _Root(self.proxy, transform)
        site: server.Site
        if gateway:  # the gateway's own Site and channel (hold/release, access log)
            site = self.site = GatewaySite(self.root, self.reactor, max_body_size=1 << 20)
        else:
            site = server.Site(self.root, reactor=self.reactor)
            site.requestFactory = _MemRequest
        self.channel = site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 5555))
        self.client = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 5555))
        self.channel.makeConnection(self.client)
        self.upstream: Any = None
        self.up_transport: StringTransport | None = None

    def send(self, raw: bytes) -> None:
        self.channel.dataReceived(raw)

    def connect_upstream(self) -> None:
        self.reactor.advance(0)
        host, port, factory, timeout, _ = self.reactor.tcpClients[-1]
        assert (port, timeout) == (11434, 10.0)  # MemoryReactor resolves all to 127.0.0.1
        self.upstream = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.up_transport = StringTransport()
        self.upstream.makeConnection(self.up_transport)

    def runner_sends(self, data: bytes) -> None:
        self.upstream.dataReceived(data)

    @property
    def request_ctx(self) -> RequestContext:
        assert self.root.ctx is not None
        return self.root.ctx


def _client_producer(m: Mem) -> Any:
    # HTTPChannel registers itself as its transport's producer; the transport
    # pauses it when the client's socket buffer is full.
    assert m.client.producer is not None
    return m.client.producer


def _proxy_timers(m: Mem) -> list[Any]:
    calls: list[Any] = list(m.reactor.getDelayedCalls())
    return [
        c
        for c in calls
        if c.active() and type(getattr(c.func, "__self__", None)).__name__ == "_Exchange"
    ]


_CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.mark.timeout(10)
def test_mem_streams_and_records_context() -> None:
    m = Mem()
    m.send(
        b"POST /r1/api/chat?stream=1 HTTP/1.1\r\nHost: gw.example\r\nContent-Length: 2\r\n\r\n{}"
    )
    m.connect_upstream()
    assert m.up_transport is not None
    sent = m.up_transport.value()
    assert sent.startswith(b"POST /api/chat?stream=1 HTTP/1.1\r\n")
    assert b"Host: 10.0.0.5:11434\r\n" in sent and sent.endswith(b"\r\n\r\n{}")
    assert b"X-Forwarded-For: 192.0.2.7" in sent
    m.reactor.advance(1.5)
    m.runner_sends(_CHUNKED_HEAD)
    ctx = m.request_ctx
    assert ctx.status == 200 and ctx.first_byte is None
    assert b"HTTP/1.1 200 OK" in m.client.value()  # headers go out before any body
    m.reactor.advance(0.5)
    m.runner_sends(_chunk(b'{"a":1}\n'))
    assert m.client.value().endswith(_chunk(b'{"a":1}\n'))
    assert ctx.first_byte == 2.0 and ctx.bytes_sent == 8
    m.runner_sends(b"0\r\n\r\n")
    assert m.client.value().endswith(b"0\r\n\r\n")
    assert not ctx.aborted and ctx.upstream_error is None
    assert not m.up_transport.disconnecting  # back in the pool, not closed
    assert not _proxy_timers(m)


@pytest.mark.timeout(10)
def test_mem_usage_and_observers_wait_until_the_bytes_are_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A read's bytes reach the client before its usage is parsed and before the
    observers hear that the response started: neither delays a stream."""
    m = Mem(gateway=True)
    seen: list[tuple[str, bytes]] = []

    class Observer:
        def response_started(self, ctx: RequestContext) -> None:
            seen.append(("started", m.client.value()))

        def request_finished(self, ctx: RequestContext) -> None:
            seen.append(("finished", m.client.value()))

    m.site.observers.append(Observer())
    real = usage.parser_for

    def spying(content_type: str | None, path: bytes) -> Any:
        parser = real(content_type, path)
        assert parser is not None

        class Spy(type(parser)):  # type: ignore[misc]
            def feed(self, data: bytes) -> None:
                seen.append(("feed", m.client.value()))
                super().feed(data)

        return Spy()

    monkeypatch.setattr(context, "parser_for", spying)
    m.send(b"POST /r1/api/chat HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{}")
    m.connect_upstream()
    line = b'{"model":"m","done":true,"prompt_eval_count":3,"eval_count":4}\n'
    m.runner_sends(_CHUNKED_HEAD + _chunk(line))  # head and first chunk in one read
    first = _chunk(line)
    assert [what for what, _ in seen] == ["started", "feed"]
    assert all(sent.endswith(first) for _, sent in seen)  # already sent, both times
    m.runner_sends(b"0\r\n\r\n")
    assert seen[-1] == ("finished", m.client.value())
    ctx = m.request_ctx
    assert ctx.usage is not None and ctx.usage.completion_tokens == 4 and ctx.usage.reported


@pytest.mark.timeout(10)
def test_mem_idle_timeout_waits_while_client_is_slow() -> None:
    m = Mem(idle_timeout=3.0)
    m.send(b"GET /r1/api/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    m.connect_upstream()
    m.runner_sends(_CHUNKED_HEAD + _chunk(b"1\n"))
    assert m.up_transport is not None
    _client_producer(m).pauseProducing()  # as the transport does when its buffer is full
    assert m.up_transport.producerState == "paused"
    m.reactor.advance(10)  # runner silent because *we* paused it: no timeout
    assert not m.request_ctx.aborted
    _client_producer(m).resumeProducing()
    assert m.up_transport.producerState == "producing"
    m.reactor.advance(2.9)
    m.runner_sends(_chunk(b"2\n"))
    m.reactor.advance(2.9)
    assert not m.request_ctx.aborted
    m.reactor.advance(0.2)
    ctx = m.request_ctx
    assert ctx.aborted and ctx.upstream_error == "timeout"
    assert not m.client.value().endswith(b"0\r\n\r\n")
    assert m.client.disconnecting
    assert m.up_transport.disconnected


@pytest.mark.timeout(10)
def test_mem_one_timer_watches_every_deadline() -> None:
    m = Mem(first_byte_timeout=5.0, idle_timeout=3.0, total_timeout=50.0)
    m.send(b"GET /r1/api/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    m.connect_upstream()
    assert len(_proxy_timers(m)) == 1
    m.reactor.advance(3.5)  # the watch wakes at the idle limit; the first byte is not due
    assert not m.request_ctx.upstream_error and len(_proxy_timers(m)) == 1
    m.runner_sends(_CHUNKED_HEAD + _chunk(b"1\n"))  # at 3.5 s: in time
    for _ in range(5):
        m.reactor.advance(2.9)
        m.runner_sends(_chunk(b"x\n"))  # each chunk just notes the time
        assert len(_proxy_timers(m)) == 1
    assert not m.request_ctx.aborted
    m.reactor.advance(3.01)
    ctx = m.request_ctx
    assert ctx.aborted and ctx.upstream_error == "timeout" and not _proxy_timers(m)


@pytest.mark.timeout(10)
def test_mem_first_byte_deadline_holds_when_the_watch_wakes_early() -> None:
    m = Mem(first_byte_timeout=5.0, idle_timeout=3.0)
    m.send(b"GET /r1/api/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    m.connect_upstream()
    m.reactor.advance(4.9)
    assert m.request_ctx.status is None
    m.reactor.advance(0.2)
    assert m.request_ctx.status == 504 and m.request_ctx.upstream_error == "timeout"
    assert b"HTTP/1.1 504 " in m.client.value()


@pytest.mark.timeout(10)
def test_mem_idle_deadline_after_a_long_pause_is_watched_again() -> None:
    # While paused the watch has only the total deadline left to wait for; on
    # resume the idle deadline must be watched again, well before that.
    m = Mem(idle_timeout=3.0, total_timeout=50.0)
    m.send(b"GET /r1/api/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    m.connect_upstream()
    m.runner_sends(_CHUNKED_HEAD + _chunk(b"1\n"))
    _client_producer(m).pauseProducing()
    m.reactor.advance(20)
    assert not m.request_ctx.aborted
    _client_producer(m).resumeProducing()
    m.reactor.advance(2.9)
    assert not m.request_ctx.aborted
    m.reactor.advance(0.2)
    assert m.request_ctx.aborted and m.request_ctx.upstream_error == "timeout"


@pytest.mark.timeout(10)
def test_mem_total_timeout_after_headers_aborts() -> None:
    m = Mem(total_timeout=5.0)
    m.send(b"GET /r1/api/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    m.connect_upstream()
    m.reactor.advance(1)
    m.runner_sends(_CHUNKED_HEAD)
    for _ in range(3):
        m.reactor.advance(1)
        m.runner_sends(_chunk(b"x\n"))
    m.reactor.advance(1.01)
    ctx = m.request_ctx
    assert ctx.aborted and ctx.upstream_error == "timeout" and m.client.disconnecting
    assert m.up_transport is not None and m.up_transport.disconnected  # aborted, not closed
    assert not m.client.value().endswith(b"0\r\n\r\n")


@pytest.mark.timeout(10)
def test_mem_connect_timeout_is_504() -> None:
    from twisted.internet.error import TimeoutError as ConnectTimeout

    m = Mem(connect_timeout=2.0)
    m.send(b"GET /r1/v1/models HTTP/1.1\r\nHost: gw\r\n\r\n")
    m.reactor.advance(0)
    _, _, factory, timeout, _ = m.reactor.tcpClients[-1]
    assert timeout == 2.0
    factory.clientConnectionFailed(m.reactor.connectors[-1], Failure(ConnectTimeout()))
    m.reactor.advance(1)  # HostnameEndpoint's next-address step notices none are left
    out = m.client.value()
    assert out.startswith(b"HTTP/1.1 504 ")
    body = json.loads(out.partition(b"\r\n\r\n")[2])
    assert body["error"]["type"] == "timeout_error"
    assert "(runner r1)" in body["error"]["message"]
    assert m.request_ctx.upstream_error == "timeout"
    assert not _proxy_timers(m)


@pytest.mark.timeout(10)
def test_mem_client_gone_before_headers_aborts_upstream_and_timers() -> None:
    m = Mem()
    m.send(b"GET /r1/api/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    m.connect_upstream()
    assert m.up_transport is not None
    m.channel.connectionLost(Failure(ConnectionLost()))
    assert m.up_transport.disconnected  # aborted: the runner sees the close at once
    assert m.request_ctx.aborted
    assert not _proxy_timers(m)  # the first-byte timer is cancelled


@pytest.mark.timeout(10)
def test_mem_response_transform_buffers_and_sets_length() -> None:
    def keep_first(body: bytes) -> bytes:
        models = json.loads(body)["models"][:1]
        return json.dumps({"models": models}).encode()

    m = Mem(transform=keep_first)
    m.send(b"GET /r1/api/tags HTTP/1.1\r\nHost: gw\r\nAccept-Encoding: gzip\r\n\r\n")
    m.connect_upstream()
    assert m.up_transport is not None
    assert b"accept-encoding" not in m.up_transport.value().lower()
    body = json.dumps({"models": [{"name": "a"}, {"name": "b"}]}).encode()
    m.runner_sends(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    m.runner_sends(_chunk(body[:10]))
    assert m.client.value() == b""  # buffered until complete
    m.runner_sends(_chunk(body[10:]) + b"0\r\n\r\n")
    out = m.client.value()
    expected = json.dumps({"models": [{"name": "a"}]}).encode()
    assert b"Content-Length: %d\r\n" % len(expected) in out
    assert out.endswith(b"\r\n\r\n" + expected)
    assert m.request_ctx.bytes_sent == len(expected)


@pytest.mark.timeout(10)
def test_mem_runner_dies_while_buffering_is_a_clean_502() -> None:
    m = Mem(transform=lambda body: body)
    m.send(b"GET /r1/api/tags HTTP/1.1\r\nHost: gw\r\n\r\n")
    m.connect_upstream()
    m.runner_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{")
    m.upstream.connectionLost(Failure(ConnectionDone()))
    out = m.client.value()
    assert out.startswith(b"HTTP/1.1 502 ")
    assert b"runner r1" in out
    assert m.request_ctx.upstream_error == "reset"


@pytest.mark.timeout(10)
def test_mem_head_keeps_content_length_and_no_default_type() -> None:
    m = Mem()
    m.send(b"HEAD /r1/ HTTP/1.1\r\nHost: gw\r\n\r\n")
    m.connect_upstream()
    m.runner_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n")
    out = m.client.value()
    assert b"Content-Length: 17\r\n" in out
    assert b"Content-Type" not in out
    assert out.endswith(b"\r\n\r\n")
    assert m.request_ctx.first_byte is not None


@pytest.mark.timeout(10)
def test_mem_warning_names_runner_and_request() -> None:
    events: list[dict[str, Any]] = []
    observer = implementer(ILogObserver)(lambda e: events.append(e))
    globalLogPublisher.addObserver(observer)
    try:
        m = Mem()
        m.send(b"GET /r1/api/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer tok-123\r\n\r\n")
        m.connect_upstream()
        assert m.up_transport is not None
        assert b"tok-123" not in m.up_transport.value()
        m.runner_sends(_CHUNKED_HEAD + _chunk(b"1\n"))
        m.upstream.connectionLost(Failure(ConnectionLost()))
    finally:
        globalLogPublisher.removeObserver(observer)
    from twisted.logger import formatEvent

    warns = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
    assert any("r1" in w and "mem-1" in w for w in warns), warns
    assert not any("tok-123" in formatEvent(e) for e in events)
    assert m.request_ctx.aborted and m.client.disconnecting


def test_upstream_headers_unit() -> None:
    incoming = Headers(
        {
            b"Host": [b"gw:8443"],
            b"X-Forwarded-For": [b"1.1.1.1, 2.2.2.2", b"3.3.3.3"],
            b"Connection": [b"close, X-A"],
            b"X-A": [b"1"],
            b"Proxy-Foo": [b"1"],
            b"Upgrade": [b"websocket"],
            b"Transfer-Encoding": [b"chunked"],
            b"Trailer": [b"x"],
            b"Accept-Encoding": [b"gzip"],
        }
    )
    out = upstream_headers(
        incoming, netloc="[::1]:9", client_ip="::1", secure=True, request_id="r", identity=True
    )
    names = {name.lower() for name, _ in out.getAllRawHeaders()}
    assert names == {
        b"host",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-real-ip",
        b"x-request-id",
    }
    # Not from a trusted proxy: the client's chain is dropped.
    assert out.getRawHeaders(b"x-forwarded-for") == [b"::1"]
    assert out.getRawHeaders(b"x-real-ip") == [b"::1"]
    assert out.getRawHeaders(b"x-forwarded-proto") == [b"https"]
    assert out.getRawHeaders(b"host") == [b"[::1]:9"]
    # From a trusted one, its chain is extended.
    out = upstream_headers(
        incoming, netloc="[::1]:9", client_ip="::1", secure=True, request_id="r", trusted=True
    )
    assert out.getRawHeaders(b"x-forwarded-for") == [b"1.1.1.1, 2.2.2.2, 3.3.3.3, ::1"]


def test_forwarding_and_credential_headers() -> None:
    """Issue 16, finding 7: what an untrusted client says of itself is not passed on."""
    incoming = Headers(
        {
            b"Host": [b"gw"],
            b"X-Forwarded-For": [b"6.6.6.6"],
            b"X-Forwarded-Proto": [b"https"],
            b"X-Forwarded-Host": [b"evil.example"],
            b"X-Forwarded-Port": [b"1"],
            b"Forwarded": [b"for=6.6.6.6;proto=https"],
            b"X-Real-IP": [b"6.6.6.6"],
            b"X-Request-Id": [b"client-chosen"],
            b"Cookie": [b"session=1"],
            b"X-Api-Key": [b"k"],
            b"Api-Key": [b"k"],
            b"Proxy-Authorization": [b"Basic eDp5"],
        }
    )

    def headers(**kwargs: object) -> dict[bytes, list[bytes]]:
        out = upstream_headers(
            incoming,
            netloc="r:1",
            client_ip="192.0.2.1",
            secure=False,
            request_id="id-1",
            **kwargs,  # type: ignore[arg-type]
        )
        return {name.lower(): list(values) for name, values in out.getAllRawHeaders()}

    untrusted = headers()
    assert untrusted == {
        b"x-forwarded-for": [b"192.0.2.1"],
        b"x-forwarded-proto": [b"http"],
        b"x-forwarded-host": [b"gw"],
        b"x-real-ip": [b"192.0.2.1"],
        b"x-request-id": [b"id-1"],
        b"host": [b"r:1"],
    }
    trusted = headers(trusted=True, forward=("cookie",))
    assert trusted[b"x-forwarded-for"] == [b"6.6.6.6, 192.0.2.1"]
    assert trusted[b"forwarded"] == [b"for=6.6.6.6;proto=https, for=192.0.2.1"]
    assert trusted[b"x-forwarded-proto"] == [b"https"]
    assert trusted[b"x-forwarded-host"] == [b"evil.example"]
    assert trusted[b"x-forwarded-port"] == [b"1"]
    assert trusted[b"x-real-ip"] == [b"6.6.6.6"]
    assert trusted[b"x-request-id"] == [b"id-1"]  # site.py decides the id
    assert trusted[b"cookie"] == [b"session=1"]
    for name in (b"x-api-key", b"api-key", b"proxy-authorization"):
        assert name not in trusted


def test_classify_messages_carry_no_exception_text() -> None:
    from twisted.internet import error
    from twisted.web.client import ResponseNeverReceived

    secret = "10.9.8.7-secret"
    cases = [
        (error.ConnectionRefusedError(secret), "connect", 502),
        (error.DNSLookupError(secret), "connect", 502),
        (error.TimeoutError(secret), "timeout", 504),
        (ResponseNeverReceived([Failure(ConnectionLost(secret))]), "reset", 502),
    ]
    for exc, kind, status in cases:
        got_kind, got_status, message = classify(Failure(exc))
        assert (got_kind, got_status) == (kind, status)
        assert secret not in message


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    b"Content-Type",
                    b"content-type",
                    b"X-Trace",
                    b"x-TRACE",
                    b"Connection",
                    b"Keep-Alive",
                    b"Content-Length",
                    b"Proxy-Foo",
                    b"Etag",
                    b"Www-Authenticate",
                    b"Access-Control-Allow-Origin",
                    b"Server",
                    b"X-Odd_Name!",
                ]
            ),
            st.binary(max_size=12),
        ),
        max_size=8,
    ),
    head=st.booleans(),
)
def test_response_headers_are_copied_as_set_raw_headers_would(
    lines: list[tuple[bytes, bytes]], head: bool
) -> None:
    # _copy_response_headers writes into the header table directly; the table
    # must come out as Headers.setRawHeaders leaves it, for any name and value.
    from twisted.web.http_headers import Headers

    from runner_gateway import proxy

    grouped = proxy._grouped(lines)
    ours = Headers({b"Server": [b"runner-gateway"], b"Date": [b"then"]})
    proxy._copy_response_headers(grouped, ours, head)
    theirs = Headers({b"Server": [b"runner-gateway"], b"Date": [b"then"]})
    connection = grouped.get(b"connection")
    tokens = proxy._tokens(connection[1]) if connection is not None else frozenset()
    for name, (raw_name, values) in grouped.items():
        if name in proxy.HOP_BY_HOP or name in tokens:
            continue
        if name.startswith((b"proxy-", b"access-control-")):
            continue
        if name == b"content-length" and not head:
            continue
        theirs.setRawHeaders(raw_name, values)
    assert list(ours.getAllRawHeaders()) == list(theirs.getAllRawHeaders())


_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
_SSE_EVENT = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("head", "events", "aborted"),
    [
        # The openai client closes as soon as it reads [DONE], before the
        # chunked body's last-chunk marker: the stream is complete.
        (_SSE_HEAD, [_SSE_EVENT, b"data: [DONE]\n\n"], False),
        (_SSE_HEAD, [_SSE_EVENT + b"data: [DONE]\n\n"], False),
        (_SSE_HEAD, [_SSE_EVENT], True),
        (
            _CHUNKED_HEAD,
            [b'{"response":"a","done":false}\n', b'{"done":true,"eval_count":1}\n'],
            False,
        ),
        (_CHUNKED_HEAD, [b'{"response":"a","done":false}\n'], True),
    ],
)
def test_mem_client_leaving_after_the_last_event_is_not_an_abort(
    head: bytes, events: list[bytes], aborted: bool
) -> None:
    from runner_gateway.metrics import Metrics
    from runner_gateway.settings import MetricsSettings

    m = Mem(gateway=True)
    metrics = Metrics(MetricsSettings(), m.reactor.seconds)
    m.site.observers.append(metrics)
    m.send(b"POST /r1/v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{}")
    m.connect_upstream()
    m.runner_sends(head)
    for event in events:
        m.runner_sends(_chunk(event))
    assert m.client.value().endswith(_chunk(events[-1]))
    m.channel.connectionLost(Failure(ConnectionDone()))
    assert m.request_ctx.aborted is aborted
    counted = sum(
        sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == "runner_gateway_client_aborts_total"
    )
    assert counted == (1 if aborted else 0)
