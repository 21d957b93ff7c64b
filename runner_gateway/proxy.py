"""ReverseProxyResource: one runner prefix, relayed over HTTP/1.1 with keep-alive.

Twisted's own ``twisted.web.proxy.ReverseProxyResource`` speaks HTTP/1.0, opens a
connection per request and cannot do https; this one is built on the lean
HTTP/1.1 client of :mod:`runner_gateway.upstream` with its keep-alive
:class:`~runner_gateway.upstream.UpstreamPool` (``Agent`` cost a third of the
gateway's CPU per request, docs/benchmarks.md).

Every request becomes an :class:`_Exchange`, which owns the upstream call,
the timers and the body relay. The body is written to the client chunk by
chunk as the runner sends it (NDJSON and SSE stream); the upstream transport
is registered as the request's streaming producer, so a slow client pauses
reads from the runner and memory stays bounded.

The runner's hosts are a :class:`~runner_gateway.pool.RunnerPool`: the
exchange takes a host from it (or waits in its queue), sends again on
another host when a request could not be sent, or when a request without
side effects lost its host before the first response byte, and gives the
host back when it is done (docs/pools.md).

See docs/proxy.md for the headers passed and dropped, timeouts and statuses.
"""

from __future__ import annotations

import functools
import importlib
import io
import json
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import IO, Any

from OpenSSL import SSL
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource
from twisted.web._newclient import ParseError
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.http import NO_BODY_CODES
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from runner_gateway.broadcast import BROADCAST_ROUTES, Broadcast, streamed
from runner_gateway.context import RequestContext, context_of
from runner_gateway.edge.fastpath import cached_header_name, canonical_name
from runner_gateway.edge.site import on_finish
from runner_gateway.errors import send_error
from runner_gateway.policy import INFERENCE, MODELS_MANAGE, MODELS_READ
from runner_gateway.pool import DOWN, QUEUED, Collector, PoolHost, RunnerPool
from runner_gateway.poolviews import POOL_LISTINGS, merge_listings
from runner_gateway.settings import FORWARDABLE_HEADERS, RunnerSettings
from runner_gateway.upstream import (
    UpstreamCall,
    UpstreamPool,
    UpstreamProtocolError,
    request_head,
)

__all__ = [
    "CREDENTIAL_HEADERS",
    "HOP_BY_HOP",
    "ReverseProxyResource",
    "response_headers",
    "upstream_headers",
]

log = Logger(namespace="runner_gateway.proxy")

# RFC 9110 section 7.6.1 plus the historical ones; any ``Proxy-*`` header is
# dropped as well (_upstream_header_list, _copy_response_headers).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Request headers the gateway never forwards: its credential is for the
# gateway (never the runner), Ollama answers 403 to a foreign Origin (the
# gateway does CORS), framing is the body producer's business, and the
# request id is the gateway's (site.py takes a trusted proxy's).
_REQUEST_DROP = frozenset(
    {b"authorization", b"origin", b"host", b"content-length", b"expect", b"x-request-id"}
)
# Credentials for something else than the runner: forwarded only when the
# runner's forwardHeaders names them (Proxy-Authorization is hop-by-hop).
CREDENTIAL_HEADERS = frozenset(name.encode() for name in FORWARDABLE_HEADERS)
# What a proxy in front says about the client: dropped unless the peer is in
# server.trustedProxies (then extended), as is any other X-Forwarded-*.
_FORWARDING = frozenset(
    {b"forwarded", b"x-real-ip", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"}
)
# What _upstream_header_list does with a header, by lower-cased name: one
# dict look-up tells a plain header (absent) from these.
_DROP, _HOST, _CREDENTIAL, _FORWARDING_HEADER = range(4)
_SPECIAL: dict[bytes, int] = {
    **dict.fromkeys(HOP_BY_HOP | _REQUEST_DROP, _DROP),
    b"host": _HOST,
    **dict.fromkeys(CREDENTIAL_HEADERS, _CREDENTIAL),
    **dict.fromkeys(_FORWARDING, _FORWARDING_HEADER),
}
_PREFIXES = (b"proxy-", b"x-forwarded-")
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
_CHUNK = 64 * 1024
# A transformed body (a model listing) is buffered; beyond this it is refused.
_TRANSFORM_LIMIT = 16 * 1024 * 1024
# After cutting a client stream short, give the kernel this long to flush
# what was already written before the connection is aborted outright.
_CLIENT_ABORT_GRACE = 5.0
# A host's part of a pool-wide listing: a listing is quick, and one host that
# does not answer must not hold up the others' for the first-byte timeout.
_LISTING_TIMEOUT = 30.0
# Requests that may be sent twice: no side effects on the runner.
_REPEATABLE = frozenset({INFERENCE, MODELS_READ})
# Failures before the request reached the runner: another host may take it.
_NOT_SENT = frozenset({"connect", "timeout", "tls"})
# Failures that count against a host's health (passive checks).
_HOST_FAILURES = frozenset({"connect", "timeout", "reset"})


def _tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for value in values:
        tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def _forwarded_node(ip: bytes) -> bytes:
    """An address as RFC 7239's ``for=`` takes it (IPv6 quoted, in brackets)."""
    return b'"[' + ip + b']"' if b":" in ip else ip


def _upstream_header_list(
    incoming: Headers,
    *,
    netloc: bytes,
    client_ip: str | None,
    secure: bool,
    request_id: str,
    identity: bool,
    trusted: bool = False,
    forward: Collection[str] = (),
) -> list[tuple[bytes, bytes]]:
    """The runner's request headers as (name, value) lines, in the order they are sent.

    ``trusted``: the peer is in server.trustedProxies, so the forwarding
    headers it sent are kept and extended; otherwise they are dropped and
    the gateway's own are sent. ``forward``: the credential headers
    (:data:`CREDENTIAL_HEADERS`) this runner gets.
    """
    out: list[tuple[bytes, bytes]] = []
    forwarded_for: list[bytes] = []
    forwarded: list[bytes] = []
    kept: set[bytes] = set()  # forwarding headers a trusted proxy set
    client_host: bytes | None = None
    connection: list[bytes] | None = None
    raw = list(incoming.getAllRawHeaders())
    for raw_name, values in raw:
        if raw_name.lower() == b"connection":
            connection = list(values)
    tokens = _tokens(connection) if connection else frozenset()
    append = out.append
    for raw_name, values in raw:
        name = raw_name.lower()
        kind = _SPECIAL.get(name)  # one look-up for the usual, plain header
        if kind is None:
            if name in tokens:
                continue
            if name.startswith(_PREFIXES):
                if name.startswith(b"proxy-"):
                    continue
                kind = _FORWARDING_HEADER  # another X-Forwarded-*
            elif identity and name == b"accept-encoding":
                continue
            else:
                for value in values:
                    append((raw_name, value))
                continue
        if kind == _DROP:
            continue
        if kind == _HOST:
            if values and client_host is None:
                client_host = values[0]
            continue
        if kind == _CREDENTIAL:
            if name.decode("ascii") not in forward:  # the runner's forwardHeaders
                continue
        elif not trusted:  # _FORWARDING_HEADER
            continue
        elif name == b"x-forwarded-for":
            forwarded_for.extend(v.strip() for v in values if v.strip())
            continue
        elif name == b"forwarded":
            forwarded.extend(v.strip() for v in values if v.strip())
            continue
        else:
            kept.add(name)
        for value in values:
            append((raw_name, value))
    peer = client_ip.encode("ascii", "replace") if client_ip else None
    if peer is not None:
        forwarded_for.append(peer)
        if forwarded:  # a trusted proxy's chain, extended by one hop
            forwarded.append(b"for=" + _forwarded_node(peer))
    if forwarded_for:
        out.append((b"X-Forwarded-For", b", ".join(forwarded_for)))
    if forwarded:
        out.append((b"Forwarded", b", ".join(forwarded)))
    if b"x-forwarded-proto" not in kept:
        out.append((b"X-Forwarded-Proto", b"https" if secure else b"http"))
    if client_host is not None and b"x-forwarded-host" not in kept:
        out.append((b"X-Forwarded-Host", client_host))
    if peer is not None and b"x-real-ip" not in kept:
        out.append((b"X-Real-IP", peer))
    out.append((b"X-Request-Id", request_id.encode("ascii", "replace")))
    out.append((b"Host", netloc))
    return out


def upstream_headers(
    incoming: Headers,
    *,
    netloc: str,
    client_ip: str | None,
    secure: bool,
    request_id: str,
    identity: bool = False,
    trusted: bool = False,
    forward: Collection[str] = (),
) -> Headers:
    """The headers sent to the runner for a client request's headers.

    ``identity`` strips Accept-Encoding so the runner answers uncompressed
    (used when the gateway must rewrite the body); ``trusted`` and
    ``forward`` as for :func:`_upstream_header_list`.
    """
    out = Headers()
    for name, value in _upstream_header_list(
        incoming,
        netloc=netloc.encode("ascii"),  # settings allow ASCII hosts only
        client_ip=client_ip,
        secure=secure,
        request_id=request_id,
        identity=identity,
        trusted=trusted,
        forward=forward,
    ):
        out.addRawHeader(name, value)
    return out


# What the exchange sends a host: head, header lines, path, body, body length.
_Out = tuple[bytes, list[tuple[bytes, bytes]], bytes, IO[bytes] | None, int]

# The runner's response headers by lower-cased name: (name as sent, values), in order.
_Grouped = dict[bytes, tuple[bytes, list[bytes]]]


def _grouped(lines: Iterable[tuple[bytes, bytes]]) -> _Grouped:
    groups: _Grouped = {}
    for name, value in lines:
        lower = name.lower()
        group = groups.get(lower)
        if group is None:
            groups[lower] = (name, [value])
        else:
            group[1].append(value)
    return groups


def _copy_response_headers(upstream: _Grouped, target: Headers, head: bool) -> None:
    connection = upstream.get(b"connection")
    tokens = _tokens(connection[1]) if connection is not None else frozenset()
    # What target.setRawHeaders does, into its table directly: the name in
    # Twisted's canonical form, line breaks in a value made spaces (the
    # runner's head parser passes no control character, but a value is not
    # trusted).
    table = target._rawHeaders
    for name, (raw_name, values) in upstream.items():
        if name in HOP_BY_HOP or name in tokens or name.startswith((b"proxy-", b"access-control-")):
            continue
        if name == b"content-length" and not head:
            continue
        clean = []
        for value in values:
            if b"\r" in value or b"\n" in value:
                value = b" ".join(value.splitlines())
            clean.append(value)
        table[cached_header_name(raw_name) or canonical_name(raw_name)] = clean


def response_headers(upstream: Headers, target: Headers, head: bool) -> None:
    """Copy the runner's end-to-end response headers onto the client response.

    Hop-by-hop headers (Connection, Transfer-Encoding, ...) and, except for
    HEAD, Content-Length are left out; the caller sets the length.
    ``setRawHeaders`` replaces, so the runner's Date and Server take the
    place of the ones Twisted's server put there (no duplicates). CORS headers
    are the gateway's to answer (tree.py), so the runner's are dropped.
    """
    _copy_response_headers(_grouped(_lines(upstream)), target, head)


def _tls_policy(runner: RunnerSettings) -> IPolicyForHTTPS:
    """The runner's TLS policy from tls.py, or system CAs until that module exists."""
    if runner.scheme != "https":
        return BrowserLikePolicyForHTTPS()
    try:
        module = importlib.import_module("runner_gateway.tls")
    except ImportError:
        return BrowserLikePolicyForHTTPS()
    factory: Callable[[RunnerSettings], IPolicyForHTTPS] | None = getattr(
        module, "upstream_tls_policy", None
    )
    if factory is None:
        return BrowserLikePolicyForHTTPS()
    return factory(runner)


def _reasons(failure: Failure) -> list[Failure]:
    """A failure and, recursively, the failures a ResponseFailed & co. wrap."""
    found = [failure]
    inner = getattr(failure.value, "reasons", None)
    if isinstance(inner, list):
        for reason in inner:
            if isinstance(reason, Failure):
                found.extend(_reasons(reason))
    return found


def classify(failure: Failure) -> tuple[str, int, str]:
    """(ctx.upstream_error, status, message) for a failed upstream request.

    Messages are fixed texts: exception strings could carry addresses or
    worse, and clients print these bodies verbatim.
    """
    reasons = _reasons(failure)
    if any(r.check(net_error.TimeoutError) for r in reasons):
        return "timeout", 504, "the runner did not accept the connection in time"
    if any(r.check(net_error.DNSLookupError) for r in reasons):
        return "connect", 502, "the runner's host name could not be resolved"
    if any(r.check(SSL.Error) for r in reasons) or any(
        type(r.value).__module__.startswith("service_identity") for r in reasons
    ):
        return "tls", 502, "the TLS handshake with the runner failed"
    if any(r.check(net_error.ConnectError) for r in reasons):
        return "connect", 502, "the runner is unreachable"
    if any(r.check(ParseError, UpstreamProtocolError) for r in reasons):
        return "protocol", 502, "the runner sent an invalid HTTP response"
    if any(r.check(net_error.ConnectionLost, net_error.ConnectionDone) for r in reasons):
        return "reset", 502, "the runner closed the connection without answering"
    return "protocol", 502, "the request to the runner failed"


@implementer(IPushProducer)
class _UpstreamProducer:
    """Registered on the client request: relays the client's flow control to the runner."""

    def __init__(self, exchange: _Exchange) -> None:
        self._exchange = exchange

    def pauseProducing(self) -> None:
        self._exchange.client_paused(True)

    def resumeProducing(self) -> None:
        self._exchange.client_paused(False)

    def stopProducing(self) -> None:
        self._exchange.client_lost(None)


def _upstream_method(method: bytes, ctx: RequestContext) -> bytes:
    """HEAD for a filtered listing goes as GET: its length is known only from
    the listing (the runner's would be the unfiltered one's)."""
    if method == b"HEAD" and ctx.response_transform is not None:
        return b"GET"
    return method


def _request_length(content: IO[bytes] | None) -> int:
    if content is None:
        return 0
    content.seek(0, io.SEEK_END)
    length = content.tell()
    content.seek(0)
    return length


def _lines(headers: Headers) -> Iterator[tuple[bytes, bytes]]:
    for name, values in headers.getAllRawHeaders():
        for value in values:
            yield name, value


def _first(headers: _Grouped, name: bytes) -> list[bytes] | None:
    group = headers.get(name)
    return group[1] if group is not None else None


class _Exchange:
    """One client request relayed to the runner (the upstream client's ResponseHandler)."""

    def __init__(self, proxy: ReverseProxyResource, request: Request) -> None:
        self.pool = proxy.runner_pool
        self.runner: RunnerSettings = proxy.runner
        self.reactor: IReactorTime = proxy.reactor
        self.request = request
        self._channel = request.channel  # Twisted drops request.channel when it finishes
        self.ctx: RequestContext = context_of(request)
        self.call: UpstreamCall | None = None
        self._pending = False  # sent, no response head yet
        # One timer watches the first-byte, total and idle deadlines (_check).
        self._watch: IDelayedCall | None = None
        self._first_at: float | None = None  # first-byte deadline, while pending
        self._total_at: float | None = None
        self._idle_from: float | None = None  # last runner activity, while idle-watched
        self._client_abort: IDelayedCall | None = None
        self._done = False  # no more writes to the client from us
        self._buffer: list[bytes] | None = None  # set while buffering for a transform
        self._buffered = 0
        self._paused = False
        self._producer: _UpstreamProducer | None = None
        self._headers_at: float | None = None
        self._method = request.method
        self._code = 0
        self._headers: _Grouped = {}
        self.host: PoolHost | None = None  # the host this request holds a slot on
        self._tried: tuple[int, ...] = ()  # hosts this request failed on
        self._resent = False  # sent again after its host died before answering
        self._queued_at: float | None = None
        # What goes to a host: head (for the first host), header lines, path, body, length.
        # Few attributes: past 30, CPython gives every instance its own dict keys.
        self._out: _Out = (b"", [], b"/", None, 0)
        # A pool-wide listing's requests, or a models:manage request to every host.
        self._fanout: list[Collector] | Broadcast | None = None

    # ------------------------------------------------------------ start

    def start(self) -> bytes | int:
        request, ctx, runner = self.request, self.ctx, self.runner
        content: IO[bytes] | None = request.content
        length = _request_length(content)
        if length > runner.max_body_size:
            ctx.status = 413
            return send_error(
                request,
                413,
                f"request body too large: {length} bytes, at most "
                f"{runner.max_body_size} allowed (runner {runner.name})",
            )
        client = request.getClientAddress()
        headers = _upstream_header_list(
            request.requestHeaders,
            netloc=self.pool.hosts[0].netloc,
            client_ip=getattr(client, "host", None),
            secure=request.isSecure(),
            request_id=ctx.request_id,
            identity=ctx.response_transform is not None,
            trusted=ctx.trusted_peer,
            forward=runner.forward_headers,
        )
        path = ctx.upstream_path or b"/"
        if not path.startswith(b"/"):
            path = b"/" + path
        try:
            head = request_head(_upstream_method(self._method, ctx), path, headers, length)
        except ValueError:
            ctx.status = 400
            return send_error(request, 400, "invalid request target")
        if (
            runner.strict_models
            and ctx.model
            and ctx.scope == INFERENCE
            and self.pool.model_listed(ctx.model) is False
        ):
            return self._no_such_model(ctx.model)
        self._out = (head, headers, path, content if length else None, length)
        on_finish(request, lost=self.client_lost)
        pool = self.pool
        if not pool.single and len(pool.hosts) > 1:
            if ctx.route in POOL_LISTINGS and self._method == b"GET":
                self._gather()
                return NOT_DONE_YET
            if ctx.route in BROADCAST_ROUTES and ctx.scope == MODELS_MANAGE:
                self._send_to_all()
                return NOT_DONE_YET
        # A host of the pool, a place in its queue, or 503.
        got = pool.acquire(self)
        if isinstance(got, PoolHost):
            self._send(got)
        elif got == QUEUED:
            self._queued_at = self.reactor.seconds()
        else:
            self._unavailable(got)
        return NOT_DONE_YET

    # ------------------------------------------------------------ hosts

    def _send(self, host: PoolHost) -> None:
        self.host = host
        ctx = self.ctx
        ctx.host = host.label
        out = self._out
        head = out[0] if host.index == 0 else self._head_for(host)
        if self._watch is None:
            self._start_watch()
        self._pending = True
        try:
            self.call = host.client.request(
                head,
                out[3],
                out[4],
                _upstream_method(self._method, ctx) == b"HEAD",
                self,
                ctx.scope in _REPEATABLE,
            )
        except Exception:
            self._bug(Failure())

    def _head_for(self, host: PoolHost) -> bytes:
        head, lines, path, _, length = self._out
        if host.netloc == self.pool.hosts[0].netloc:
            return head
        for i in range(len(lines) - 1, -1, -1):  # Host is the last line, or near it
            if lines[i][0].lower() == b"host":
                lines[i] = (lines[i][0], host.netloc)
                break
        return request_head(_upstream_method(self._method, self.ctx), path, lines, length)

    def _gather(self) -> None:
        """A model listing of a pool: every healthy host's, as one (poolviews.py)."""
        hosts = [h for h in self.pool.hosts if h.state.up]
        if not hosts:
            self._unavailable(DOWN)
            return
        answers: dict[int, bytes | None] = {}
        collectors: list[Collector] = []
        self._fanout = collectors
        first_byte = self.runner.first_byte_timeout
        timeout = min(first_byte, _LISTING_TIMEOUT) if first_byte > 0 else _LISTING_TIMEOUT

        def collected(host: PoolHost, code: int | None, body: bytes) -> None:
            answers[host.index] = body if code == 200 else None
            if len(answers) == len(hosts):
                self._fanout = None
                self._gathered(hosts, answers)

        for host in hosts:
            collector = Collector(functools.partial(collected, host), _TRANSFORM_LIMIT)
            collectors.append(collector)
            collector.timer = self.reactor.callLater(timeout, collector.timed_out)
            head = self._head_for(host)
            collector.call = host.client.request(head, None, 0, False, collector, True)

    def _send_to_all(self) -> None:
        """A models:manage request: every healthy host's models change (broadcast.py)."""
        hosts = [h for h in self.pool.hosts if h.state.up]
        if not hosts:
            self._unavailable(DOWN)
            return
        content, length = self._out[3], self._out[4]
        body = b""
        if content is not None:
            content.seek(0)
            body = content.read()
            content.seek(0)
        ctx = self.ctx
        ctx.host = ",".join(h.label for h in hosts)

        def host_done(host: PoolHost) -> None:
            if self.pool.on_models is not None:
                self.pool.on_models(host)  # its model inventory changed

        broadcast = self._fanout = Broadcast(
            self.request,
            ctx,
            hosts,
            self._head_for,
            content,
            length,
            streamed(ctx.route, body),
            self.runner.first_byte_timeout,
            self.reactor,
            host_done,
        )
        broadcast.start()

    def _gathered(self, hosts: list[PoolHost], answers: dict[int, bytes | None]) -> None:
        if self._done:
            return
        ctx = self.ctx
        bodies = [b for h in hosts if (b := answers[h.index]) is not None]
        ctx.host = ",".join(h.label for h in hosts if answers[h.index] is not None) or None
        try:
            body = merge_listings(ctx.route, bodies)
            if ctx.response_transform is not None:
                body = ctx.response_transform(body)
        except Exception:
            self._error("protocol", 502, "no host of the runner sent its listing")
            return
        request = self.request
        ctx.status = 200
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        ctx.response_started("application/json")
        request.write(body)
        ctx.bytes_sent += len(body)
        ctx.first_byte = self._headers_at = self.reactor.seconds()
        ctx.response_chunk(body)
        self._finish()

    @property
    def model(self) -> str | None:
        """The model the request names, for placement (pool.Waiter)."""
        return self.ctx.model

    def _release(self) -> PoolHost | None:
        host = self.host
        if host is not None:
            self.host = None
            self.pool.release(host)
        return host

    def granted(self, host: PoolHost) -> None:
        """A slot freed up for this queued request (pool.Waiter)."""
        if self._queued_at is not None:
            self.ctx.queue_wait = self.reactor.seconds() - self._queued_at
        if self._done:  # pragma: no cover - a client that leaves is taken out of the queue
            self.pool.release(host)
            return
        self._send(host)

    def queue_expired(self, reason: str) -> None:
        """The queue gave up on this request (pool.Waiter)."""
        if self._queued_at is not None:
            self.ctx.queue_wait = self.reactor.seconds() - self._queued_at
        if not self._done:
            self._unavailable(reason)

    def _unavailable(self, reason: str) -> None:
        runner = self.runner
        if reason == DOWN:
            retry = max(1, round(runner.health_check.interval or 1))
            message = "no host of the runner is up"
        else:
            retry = 1
            message = "the runner is busy and its queue is full"
            if self._queued_at is not None:
                message = f"the runner stayed busy for {runner.queue_timeout:g}s"
        self._error("unavailable", 503, message, {"Retry-After": str(retry)})

    def _no_such_model(self, model: str) -> bytes:
        """What the runner would say (Ollama's or OpenAI's 404), without asking it."""
        request, ctx = self.request, self.ctx
        ctx.status = 404
        request.setResponseCode(404)
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        payload: object
        if ctx.openai_style:
            payload = {
                "error": {
                    "message": f"The model `{model}` does not exist.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "model_not_found",
                }
            }
        else:
            payload = {"error": f'model "{model}" not found, try pulling it first'}
        return b"" if self._method == b"HEAD" else json.dumps(payload).encode()

    # ------------------------------------------------------------ timers

    # One timer per exchange instead of one per deadline: it is armed once, at
    # the soonest any deadline could fall, and when it fires it acts on what is
    # due or waits for the next deadline. A chunk from the runner only moves the
    # idle deadline later, so it just notes the time (no timer call per chunk).

    def _start_watch(self) -> None:
        runner = self.runner
        now = self.reactor.seconds()
        if runner.first_byte_timeout > 0:
            self._first_at = now + runner.first_byte_timeout
        if runner.total_timeout > 0:
            self._total_at = now + runner.total_timeout
        soonest = 0.0
        for limit in (runner.first_byte_timeout, runner.total_timeout, runner.idle_timeout):
            if limit > 0 and (soonest == 0.0 or limit < soonest):
                soonest = limit
        if soonest:
            # The idle deadline (from the head on) cannot fall before now + idle.
            self._watch = self.reactor.callLater(soonest, self._check)

    def _next_deadline(self) -> float | None:
        due = self._total_at
        if self._pending and self._first_at is not None and (due is None or self._first_at < due):
            due = self._first_at
        if self._idle_from is not None:
            idle_at = self._idle_from + self.runner.idle_timeout
            if due is None or idle_at < due:
                due = idle_at
        return due

    def _watch_until(self, due: float | None) -> None:
        """Make sure the watch fires no later than ``due``."""
        if due is None:
            return
        call = self._watch
        if call is not None and call.active():
            if call.getTime() <= due:
                return
            call.cancel()
        self._watch = self.reactor.callLater(max(0.0, due - self.reactor.seconds()), self._check)

    def _check(self) -> None:
        self._watch = None
        if self._done:
            return
        now = self.reactor.seconds()
        if self._pending and self._first_at is not None and now >= self._first_at:
            self._first_byte_timeout()
        elif self._total_at is not None and now >= self._total_at:
            self._total_timeout()
        elif self._idle_from is not None and now >= self._idle_from + self.runner.idle_timeout:
            self._idle_timeout()
        else:
            self._watch_until(self._next_deadline())

    def _stop_watch(self) -> None:
        self._idle_from = None
        call, self._watch = self._watch, None
        if call is not None and call.active():
            call.cancel()

    def _first_byte_timeout(self) -> None:
        self._cancel_pending(
            f"the runner did not answer within {self.runner.first_byte_timeout:g}s"
        )

    def _total_timeout(self) -> None:
        limit = f"{self.runner.total_timeout:g}s"
        if self._pending:
            self._cancel_pending(f"the runner did not answer within the {limit} limit")
        else:
            self._abort("timeout", f"total timeout {limit}", 504, f"the {limit} limit ran out")

    def _idle_timeout(self) -> None:
        idle = f"{self.runner.idle_timeout:g}s"
        self._abort("timeout", f"idle for {idle}", 504, f"the runner was silent for {idle}")

    def _cancel_pending(self, message: str) -> None:
        if not self._pending or self._done:
            return
        self._pending = False
        self._stop_upstream()
        self._error("timeout", 504, message)

    # ------------------------------------------------------------ upstream answers

    def response_head(
        self,
        code: int,
        phrase: bytes,
        lines: list[tuple[bytes, bytes]],
        length: int | None,
        dropped: int,
    ) -> None:
        self._pending = False  # the first-byte deadline is met
        if self._done:  # cannot happen (client_lost aborts), but never write twice
            self._stop_upstream()
            return
        host = self.host
        if host is not None:
            host.state.fails = 0  # it answers: failures in a row start over
        request, ctx = self.request, self.ctx
        headers = self._headers = _grouped(lines)
        head = self._method == b"HEAD"
        ctx.status = code
        ctx.header_values_dropped = dropped
        content_type = _first(headers, b"content-type")
        if ctx.body_filter is not None and (
            code != 200
            or not content_type
            or not content_type[0].lower().startswith(b"text/event-stream")
        ):
            ctx.body_filter = None  # not the stream the usage was asked for in
        if ctx.response_transform is not None and code == 200:
            encoding = _first(headers, b"content-encoding") or [b"identity"]
            if any(v.strip().lower() != b"identity" for v in encoding):
                self._stop_upstream()
                self._error("protocol", 502, "the runner sent an encoded listing")
                return
            self._code = code
            self._buffer = []
            ctx.response_started(content_type[0].decode("latin-1") if content_type else None)
            self._arm_idle()
            return
        # The reason phrase is the gateway's, from the code: the runner's is
        # not relayed (a bare CR in it would end the line for some clients).
        request.setResponseCode(code)
        _copy_response_headers(headers, request.responseHeaders, head)
        if not head and code not in NO_BODY_CODES and length is not None:
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % length])
        if not content_type:
            request.defaultContentType = None
        ctx.response_started(content_type[0].decode("latin-1") if content_type else None)
        request.write(b"")  # headers go out now: clients wait on them to start streaming
        self._headers_at = self.reactor.seconds()
        self._producer = _UpstreamProducer(self)
        request.registerProducer(self._producer, True)
        self._arm_idle()

    def _arm_idle(self) -> None:
        if self.runner.idle_timeout > 0 and not self._paused and not self._done:
            watched = self._idle_from is not None
            self._idle_from = now = self.reactor.seconds()
            if not watched:  # else the watch already fires by the earlier idle deadline
                self._watch_until(now + self.runner.idle_timeout)

    def response_body(self, data: bytes) -> None:
        if self._done:
            return
        self._arm_idle()
        if self._buffer is not None:
            self._buffer.append(data)
            self._buffered += len(data)
            if self._buffered > _TRANSFORM_LIMIT:
                self._abort(
                    "protocol", "listing too large", 502, "the runner's listing is too large"
                )
            return
        if not data:
            return
        ctx = self.ctx
        ctx.response_chunk(data)  # the runner's bytes: usage is read from all of them
        if ctx.body_filter is not None:
            data = ctx.body_filter.feed(data)
            if not data:
                return
        self.request.write(data)
        ctx.bytes_sent += len(data)
        if ctx.first_byte is None:
            ctx.first_byte = self.reactor.seconds()

    def hold(self) -> None:
        """A read from the runner begins: keep what goes to the client until :meth:`release`."""
        hold = getattr(self._channel, "hold", None)
        if hold is not None and not self._done:
            hold()

    def release(self) -> None:
        """The read is handled: send what it produced for the client in one piece,
        then do what could wait for that (observers, usage: ``ctx.after_send``)."""
        release = getattr(self._channel, "release", None)
        if release is not None:
            release()
        self.ctx.after_send()

    def response_end(self, reason: Failure | None) -> None:
        self.call = None
        host = self.host
        if host is not None:  # _release(), inline: once per request
            self.host = None
            self.pool.release(host)
            if self.ctx.scope == MODELS_MANAGE and self.pool.on_models is not None:
                self.pool.on_models(host)  # its model inventory changed
        if self._done:
            return
        if reason is None:
            if self._buffer is not None:
                self._send_transformed()
            else:
                self._finish()
            return
        kind = "protocol" if _is_protocol_error(reason) else "reset"
        self._abort(
            kind, "the runner ended the stream early", 502, "the runner ended the response early"
        )

    def _send_transformed(self) -> None:
        assert self._buffer is not None and self.ctx.response_transform is not None
        body = b"".join(self._buffer)
        self._buffer = None
        try:
            body = self.ctx.response_transform(body)
        except Exception:
            log.warn(
                "runner {runner} sent a listing that could not be filtered (request {request_id})",
                runner=self.runner.name,
                request_id=self.ctx.request_id,
            )
            self._error("protocol", 502, "the runner sent an unreadable listing")
            return
        request = self.request
        request.setResponseCode(self._code)
        _copy_response_headers(self._headers, request.responseHeaders, False)
        request.responseHeaders.removeHeader(b"content-encoding")
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        if _first(self._headers, b"content-type") is None:
            request.defaultContentType = None
        request.write(b"")
        self._headers_at = self.reactor.seconds()
        if body and self._method != b"HEAD":
            request.write(body)
            self.ctx.bytes_sent += len(body)
            self.ctx.first_byte = self.reactor.seconds()
            self.ctx.response_chunk(body)
        self._finish()

    def request_failed(self, failure: Failure) -> None:
        self._pending = False
        self.call = None
        host = self._release()
        if self._done:
            return  # the client went away or a timeout answered: nothing more to say
        kind, status, message = classify(failure)
        if host is not None:
            if kind in _HOST_FAILURES:
                self.pool.passive_failure(host)
            # Not sent: any other host may take it. Lost before the answer:
            # once more elsewhere, when sending it twice does no harm.
            again = kind in _NOT_SENT
            if not again and kind == "reset" and not self._resent:
                again = self._resent = self.ctx.scope in _REPEATABLE
            if again and len(self.pool.hosts) > 1:
                self._tried += (host.index,)
                got = self.pool.acquire(self, self._tried)
                if isinstance(got, PoolHost):
                    self._send(got)
                    return
        log.warn(
            "runner {runner} request {request_id} failed ({kind}: {error})",
            runner=self.runner.name,
            request_id=self.ctx.request_id,
            kind=kind,
            error=", ".join(sorted({type(r.value).__name__ for r in _reasons(failure)})),
        )
        self._error(kind, status, message)

    def _bug(self, failure: Failure) -> None:
        log.failure("proxy bug (request {request_id})", failure, request_id=self.ctx.request_id)
        self._stop_upstream()
        if not self._done:
            if self.request.startedWriting:
                self._abort("protocol", "internal error", 502, "internal error")
            else:
                self._error("protocol", 502, "internal error in the gateway")

    # ------------------------------------------------------------ endings

    def _error(
        self, kind: str, status: int, message: str, headers: dict[str, str] | None = None
    ) -> None:
        """Answer with an error body (nothing was written to the client yet)."""
        self.ctx.upstream_error = kind
        self.ctx.status = status
        self._done = True
        self._stop_watch()
        request = self.request
        body = send_error(
            request, status, f"{message} (runner {self.runner.name})", headers=headers
        )
        if body:
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        request.write(body)
        now = self.reactor.seconds()
        self.ctx.first_byte = now
        self.ctx.bytes_sent += len(body)
        request.finish()

    def _finish(self) -> None:
        body_filter = self.ctx.body_filter
        if body_filter is not None:
            rest = body_filter.flush()
            if rest:
                self.request.write(rest)
                self.ctx.bytes_sent += len(rest)
        self._done = True
        self._stop_watch()
        self._unregister()
        if self.ctx.first_byte is None:
            self.ctx.first_byte = self._headers_at
        self.request.finish()

    def _abort(self, kind: str, what: str, status: int, message: str) -> None:
        """Something went wrong after the request was sent: stop both sides."""
        if self._done:
            return
        if not self.request.startedWriting:
            # Still buffering a listing: nothing went out, a clean error is possible.
            self._stop_upstream()
            self._error(kind, status, message)
            return
        self._done = True
        self.ctx.aborted = True
        self.ctx.upstream_error = kind
        self._stop_watch()
        self._unregister()
        self._stop_upstream()
        log.warn(
            "runner {runner}: {what}; client stream aborted (request {request_id})",
            runner=self.runner.name,
            what=what,
            request_id=self.ctx.request_id,
        )
        # No request.finish(): that would write the last chunk and make a cut
        # stream look complete. Closing without it is what tells the client.
        transport: Any = self.request.transport
        if transport is not None:
            transport.loseConnection()
            if hasattr(transport, "abortConnection"):
                self._arm_abort_client(transport)

    def _arm_abort_client(self, transport: Any) -> None:
        def abort() -> None:
            transport.abortConnection()

        self._client_abort = self.reactor.callLater(_CLIENT_ABORT_GRACE, abort)

    def client_lost(self, reason: Failure | None) -> None:
        """The client connection is gone: free the runner as soon as possible."""
        call, self._client_abort = self._client_abort, None
        if call is not None and call.active():
            call.cancel()
        if self._done:
            return
        self._done = True
        self.ctx.aborted = not self.ctx.stream_complete()
        self._stop_watch()
        self._producer = None  # the request's channel is gone with the connection
        if self._queued_at is not None and self.host is None:
            self.pool.leave(self)  # still queued: out at once, it never reaches a runner
        fanout, self._fanout = self._fanout, None
        if isinstance(fanout, Broadcast):
            fanout.stop()
        elif fanout is not None:
            for collector in fanout:
                collector.done = None
                collector.cancel()
        self._stop_upstream()

    def client_paused(self, paused: bool) -> None:
        self._paused = paused
        call = self.call
        if paused:
            self._idle_from = None  # our pause, not the runner's silence
            if call is not None:
                call.pause()
        else:
            self._arm_idle()
            if call is not None:
                call.resume()

    def _stop_upstream(self) -> None:
        # Abort (RST) rather than a graceful close: the runner notices at once
        # even over TLS, where a close would wait on the close_notify exchange.
        call, self.call = self.call, None
        self._pending = False
        if call is not None:
            call.abort()
        self._release()

    def _unregister(self) -> None:
        if self._producer is not None:
            self._producer = None
            if self.request.channel is not None:
                self.request.unregisterProducer()


def _is_protocol_error(failure: Failure) -> bool:
    return any(r.check(ParseError, UpstreamProtocolError) for r in _reasons(failure))


class ReverseProxyResource(resource.Resource):
    """Relays every request below a runner prefix to that runner.

    ``render`` expects the request to carry a RequestContext with ``runner``
    and ``upstream_path`` set (tree.py does this). Without a ``pool`` the
    resource makes its own :class:`UpstreamPool`; call :meth:`close` when
    replacing it (settings reload) to drop the cached connections. With a
    shared pool, plain-http runners share connections to the same host and
    port; each https runner keeps its own, because its TLS policy (CA, client
    certificate) is part of the connection.
    """

    isLeaf = True
    max_persistent_per_host = 32
    cached_connection_timeout = 60

    def __init__(
        self, runner: RunnerSettings, reactor: Any, pool: UpstreamPool | None = None
    ) -> None:
        super().__init__()
        self.runner = runner
        self.reactor = reactor
        self._own_pool = pool is None
        if pool is None:
            pool = UpstreamPool(
                reactor,
                max_idle_per_key=self.max_persistent_per_host,
                idle_timeout=self.cached_connection_timeout,
            )
        self.pool = pool
        https = runner.scheme == "https"
        self.runner_pool = RunnerPool(runner, reactor, pool, _tls_policy(runner) if https else None)
        self.client = self.runner_pool.hosts[0].client
        self.netloc = self.runner_pool.hosts[0].netloc  # settings allow ASCII hosts only

    def render(self, request: Request) -> bytes | int:
        return _Exchange(self, request).start()

    def close(self) -> Deferred[None]:
        """Close the cached connections of the pool this resource made."""
        if self._own_pool:
            return self.pool.closeCachedConnections()
        return succeed(None)
