"""A small upstream and a proxy-only gateway in one process, for tests/test_proxy.py.

Run as ``python tests/helpers_upstream.py [--tls]``: it listens on loopback ports,
prints ``{"gateway": G, "upstream": U}`` on one line, and serves until killed.

The gateway here is deliberately minimal (no auth, no tree.py): a request
subclass attaches a RequestContext and ``/<runner>/<rest>`` picks a
ReverseProxyResource, so these tests exercise proxy.py alone.

Upstream behaviours (query ``tag`` names events the test can read back from
``/_events`` on the upstream port; times are ``time.monotonic()``, which is
one clock for all processes on Linux):

- ``/stream?n=&gap=&kind=ndjson|sse``: n lines, ``gap`` seconds apart, each
  carrying its own write time ``t``.
- ``/echo``: the request as JSON (method, uri, headers, body sha256/length,
  client port); adds hop-by-hop and Server headers to its answer.
- ``/fixed``: 100 bytes with a Content-Length.
- ``/die?n=``: n NDJSON lines chunked, then the connection closes mid-body;
  ``/die-length``: 10 of 100 promised bytes, then close.
- ``/hang``: never answers; ``/hang-stream``: one line, then silence.
- ``/big?mb=``: as fast as the gateway takes it, counting what it wrote.

With ``--tls`` the same upstream also listens with TLS (a fresh test CA),
behind runners ``tls`` (caPath = ca.cer) and ``tlsbad`` (system trust, which
does not know the test CA). ``tlsa``/``tlsb`` and ``oka``/``okb`` are pairs of
runners for one upstream sharing one pool, as service.py does.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IPushProducer
from twisted.logger import ILogObserver, LogLevel, globalLogBeginner, textFileLogObserver
from twisted.web import resource, server
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner_gateway.context import RequestContext
from runner_gateway.proxy import ReverseProxyResource
from runner_gateway.settings import RunnerSettings
from runner_gateway.upstream import UpstreamPool

reactor: Any = _reactor
EVENTS: dict[str, dict[str, float]] = {}
BIG_WRITTEN: dict[str, int] = {}
LOGS: list[dict[str, Any]] = []


def event(request: Request, name: str) -> None:
    tag = request.args.get(b"tag", [b""])[0].decode()
    if tag:
        EVENTS.setdefault(tag, {})[name] = time.monotonic()


def _close(request: Request) -> None:
    # Without finish(): the body ends early, as when a runner crashes.
    assert request.transport is not None
    request.transport.loseConnection()


def watch_close(request: Request) -> None:
    def lost(_: object) -> None:
        event(request, "lost")

    request.notifyFinish().addBoth(lost)


def arg(request: Request, name: str, default: str) -> str:
    value: bytes = request.args.get(name.encode(), [default.encode()])[0]
    return value.decode()


class Upstream(resource.Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes | int:
        event(request, "received")
        path = request.path
        if path == b"/_events":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"events": EVENTS, "big": BIG_WRITTEN}).encode()
        if path.startswith(b"/stream"):
            return self.stream(request)
        if path == b"/fixed":
            request.setHeader(b"content-type", b"text/plain")
            return b"0123456789" * 10
        if path == b"/die":
            return self.die(request)
        if path == b"/die-length":
            request.setHeader(b"content-length", b"100")
            request.write(b"x" * 10)
            reactor.callLater(0.05, _close, request)
            return NOT_DONE_YET
        if path.endswith(b"/hang"):
            watch_close(request)
            return NOT_DONE_YET
        if path == b"/hang-stream":
            watch_close(request)
            request.setHeader(b"content-type", b"application/x-ndjson")
            request.write(b'{"i": 0}\n')
            return NOT_DONE_YET
        if path == b"/big":
            return self.big(request)
        return self.echo(request)

    def echo(self, request: Request) -> bytes:
        assert request.content is not None
        body = request.content.read()
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"server", b"upstream/1.0")
        request.setHeader(b"keep-alive", b"timeout=5")
        request.setHeader(b"proxy-authenticate", b"Basic")
        request.setHeader(b"trailer", b"X-Foo")
        request.setHeader(b"access-control-allow-origin", b"*")
        request.setHeader(b"x-end", b"yes")
        return json.dumps(
            {
                "method": request.method.decode(),
                "uri": request.uri.decode(),
                "headers": [
                    [k.decode().lower(), v.decode()]
                    for k, vs in request.requestHeaders.getAllRawHeaders()
                    for v in vs
                ],
                "sha256": hashlib.sha256(body).hexdigest(),
                "length": len(body),
                "peer_port": request.getClientAddress().port,
            }
        ).encode()

    def stream(self, request: Request) -> int:
        n = int(arg(request, "n", "5"))
        gap = float(arg(request, "gap", "0.2"))
        sse = arg(request, "kind", "ndjson") == "sse"
        request.setHeader(b"content-type", b"text/event-stream" if sse else b"application/x-ndjson")
        watch_close(request)

        def write(i: int) -> None:
            if request._disconnected:
                return
            line = json.dumps({"i": i, "t": time.monotonic()}).encode()
            request.write(b"data: " + line + b"\n\n" if sse else line + b"\n")
            if i + 1 < n:
                reactor.callLater(gap, write, i + 1)
            else:
                request.finish()

        write(0)
        return NOT_DONE_YET

    def die(self, request: Request) -> int:
        n = int(arg(request, "n", "2"))
        request.setHeader(b"content-type", b"application/x-ndjson")
        for i in range(n):
            request.write(json.dumps({"i": i}).encode() + b"\n")
        # Close without the last chunk: a runner that crashed mid-generation.
        reactor.callLater(0.05, _close, request)
        return NOT_DONE_YET

    def big(self, request: Request) -> int:
        total = int(float(arg(request, "mb", "32")) * 1024 * 1024)
        tag = arg(request, "tag", "big")
        block = b"b" * 65536
        BIG_WRITTEN[tag] = 0

        @implementer(IPushProducer)
        class Producer:
            paused = False
            stopped = False

            def pump(self) -> None:
                while not self.paused and not self.stopped:
                    if BIG_WRITTEN[tag] >= total:
                        request.unregisterProducer()
                        request.finish()
                        self.stopped = True
                        return
                    BIG_WRITTEN[tag] += len(block)
                    request.write(block)

            def pauseProducing(self) -> None:
                self.paused = True

            def resumeProducing(self) -> None:
                self.paused = False
                reactor.callLater(0, self.pump)

            def stopProducing(self) -> None:
                self.stopped = True

        producer = Producer()
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", b"%d" % total)
        request.registerProducer(producer, True)
        reactor.callLater(0, producer.pump)
        return NOT_DONE_YET


class TestRequest(Request):
    """Stands in for site.py's GatewayRequest: a context with a known id."""

    counter = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        TestRequest.counter += 1
        self.gateway_context = RequestContext(
            request_id=f"req-{TestRequest.counter}", started=reactor.seconds()
        )
        CONTEXTS[self.gateway_context.request_id] = self.gateway_context
        self.responseHeaders.setRawHeaders(
            b"x-gateway-request-id", [self.gateway_context.request_id.encode()]
        )


CONTEXTS: dict[str, RequestContext] = {}


class Router(resource.Resource):
    isLeaf = True

    def __init__(self, proxies: dict[bytes, ReverseProxyResource]) -> None:
        super().__init__()
        self.proxies = proxies

    def render(self, request: Request) -> bytes | int:
        path, _, query = request.uri.partition(b"?")
        if path == b"/_ctx":
            ctx = CONTEXTS[request.args[b"id"][0].decode()]
            fields = ("status", "bytes_sent", "aborted", "upstream_error", "request_id")
            out = {f: getattr(ctx, f) for f in fields}
            out["first_byte"] = ctx.first_byte is not None
            return json.dumps(out).encode()
        if path == b"/_logs":
            return json.dumps(LOGS).encode()
        _, name, rest = path.split(b"/", 2) if path.count(b"/") >= 2 else (b"", b"", b"")
        proxy = self.proxies[name]
        ctx = request.gateway_context  # type: ignore[attr-defined]
        ctx.runner = proxy.runner
        rest = b"/" + rest
        ctx.upstream_path = rest + b"?" + query if query else rest
        return proxy.render(request)


def record_log(event: dict[str, Any]) -> None:
    if str(event.get("log_namespace", "")).startswith("runner_gateway"):
        from twisted.logger import formatEvent

        level = event.get("log_level")
        LOGS.append({"level": getattr(level, "name", ""), "text": formatEvent(event)})


def main() -> None:
    stderr_observer = textFileLogObserver(sys.stderr)

    @implementer(ILogObserver)
    def observer(event: dict[str, Any]) -> None:
        record_log(event)
        if event.get("log_level", LogLevel.info) >= LogLevel.warn:
            stderr_observer(event)

    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    upstream_port = reactor.listenTCP(0, server.Site(Upstream()), interface="127.0.0.1")
    up = upstream_port.getHost().port
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()

    tls_port = dead_port
    tls = "--tls" in sys.argv[1:]
    if tls:
        # An https upstream with a certificate from a throw-away test CA.
        import tempfile

        from twisted.internet import ssl

        # tests/ is sys.path[0] when this file is run as a script.
        certs: Any = importlib.import_module("certs")
        pem = Path(tempfile.mkdtemp(prefix="proxy-tls-"))
        root = certs.make_ca()
        certs.write_server_files(pem, certs.make_leaf(root), root=root)
        cert = ssl.PrivateCertificate.loadPEM(
            (pem / "fullchain.cer").read_bytes() + (pem / "server.key").read_bytes()
        )
        tls_listener = reactor.listenSSL(
            0, server.Site(Upstream()), cert.options(), interface="127.0.0.1"
        )
        tls_port = tls_listener.getHost().port
        ca_path = str(pem / "ca.cer")

    shared = UpstreamPool(reactor)

    def runner(
        name: str, port: int = up, pool: UpstreamPool | None = None, **kwargs: Any
    ) -> ReverseProxyResource:
        settings = RunnerSettings(name=name, host="127.0.0.1", port=port, path=f"/{name}", **kwargs)
        return ReverseProxyResource(settings, reactor, pool)

    proxies = {
        b"ok": runner("ok", first_byte_timeout=5.0, idle_timeout=5.0),
        b"fbt": runner("fbt", first_byte_timeout=0.3),
        b"idle": runner("idle", idle_timeout=0.3),
        b"total": runner("total", total_timeout=0.5),
        b"small": runner("small", max_body_size=1000),
        b"dead": runner("dead", port=dead_port),
        b"oka": runner("oka", pool=shared),
        b"okb": runner("okb", pool=shared),
    }
    if tls:
        proxies[b"tls"] = runner("tls", port=tls_port, scheme="https", ca_path=ca_path)
        # Not signed by any CA the system trusts: the handshake must fail.
        proxies[b"tlsbad"] = runner("tlsbad", port=tls_port, scheme="https")
        for name in ("tlsa", "tlsb"):
            proxies[name.encode()] = runner(
                name, port=tls_port, scheme="https", ca_path=ca_path, pool=shared
            )
    if tls:
        shutil.rmtree(pem)  # the TLS policy and listener have read what they need
    site = server.Site(Router(proxies))
    site.requestFactory = TestRequest
    gateway_port = reactor.listenTCP(0, site, interface="127.0.0.1")
    print(json.dumps({"gateway": gateway_port.getHost().port, "upstream": up}), flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
