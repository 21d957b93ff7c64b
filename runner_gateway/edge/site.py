"""GatewaySite and GatewayRequest: per-request context, limits and the access log.

The Site is where every request begins and ends: the request gets its
RequestContext and id here, the body is capped while it is read, and when the
request is over (finished or cut off) one access line is written and the
observers (metrics) are told.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import socket
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any, cast
from urllib.parse import unquote_to_bytes

from twisted.internet import main, tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource, Resource, getChildForRequest
from twisted.web.server import Request, Site

from runner_gateway.connections import ConnectionLimits
from runner_gateway.context import RequestContext, RequestObserver
from runner_gateway.edge import fastpath
from runner_gateway.edge.accept import FirstReads
from runner_gateway.edge.fastpath import Unavailable, cached_header_name, canonical_name, write_now
from runner_gateway.edge.framing import OBS_FOLD, framing_error
from runner_gateway.errors import error_body, send_error
from runner_gateway.forwarding import TrustedProxies, client_address
from runner_gateway.logs import ACCESS_FORMAT, ACCESS_NAMESPACE, access_message

__all__ = ["GatewayChannel", "GatewayRequest", "GatewaySite", "RequestObserver"]

_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:@/+=-]{1,128}$")
# A request head the whole-head path takes (GatewayChannel.dataReceived): a
# request line and header lines as Twisted's parser accepts them (token method
# and names, a target of bytes 0x21-0xb0, HTTP/1.0 or 1.1, values without NUL,
# CR or LF), CRLF between lines, nothing folded. Anything else, valid or not,
# goes to Twisted's line-by-line parser, which answers it as it always has.
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_WHOLE_HEAD = re.compile(
    _TCHAR + rb"+ [!-\xb0]+ HTTP/1\.[01](?:\r\n" + _TCHAR + rb"+:[^\x00\r\n]*)*"
)
# The lingering close after a request refused on its head: nginx's
# lingering_time and lingering_timeout (GatewayChannel._linger).
LINGER_TOTAL = 30.0
LINGER_IDLE = 5.0
# At most this many lingering closes at once per process; past it, a refused
# request's connection is closed once its answer is out.
LINGER_MAX = 64
# The lingering close's reads with the "linger-drain" fix: recv(MSG_TRUNC) on
# a TCP socket makes Linux drop what it takes instead of copying it out
# (tcp(7)): a syscall per 64 KiB (one a turn, as Twisted reads), no copy and no
# bytes object. The buffer is only there for the call's signature.
_DRAIN_BUFFER = bytearray(1 << 16)
_drain_flags = 0  # MSG_TRUNC while the fix is on
_UNCOUNTED: Any = object()  # a connection the site's ConnectionLimits does not count
# Header values never written to a log, whatever the level.
_SECRET_HEADERS = frozenset(
    {b"authorization", b"proxy-authorization", b"cookie", b"x-api-key", b"api-key"}
)
_access = Logger(namespace=ACCESS_NAMESPACE)

_log = Logger()


def log_access_event(fields: dict[str, Any]) -> None:
    """An access record as a twisted.logger event (info, ACCESS_NAMESPACE)."""
    _access.info(ACCESS_FORMAT, fields=fields, access=access_message(fields))


class _Discard:
    """A content file that keeps nothing: used once a body is over the cap."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args: Any) -> int:
        return 0

    def tell(self) -> int:
        return 0  # Twisted's requestReceived asks how much was kept

    def read(self, *args: Any) -> bytes:
        return b""

    def close(self) -> None:
        pass


class _RequestIds:
    """Fresh request ids, shaped as RFC 9562 version-4 UUIDs (some runners,
    llama-cpp-python's server among them, answer 400 to any other X-Request-Id):
    a random prefix per process and a counter.

    Unique without a getrandom() call per request; ids name requests in logs
    and headers and grant nothing, so they need not be unpredictable. A
    forked child (a worker) draws its own prefix.
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # 74 random bits around the version (4) and variant (8-b) digits,
        # then a 48-bit counter: xxxxxxxx-xxxx-4xxx-yxxx-<counter>.
        r = secrets.token_hex(10)
        variant = "89ab"[int(r[18], 16) & 3]
        self._prefix = f"{r[:8]}-{r[8:12]}-4{r[12:15]}-{variant}{r[15:18]}-"
        self._next = itertools.count().__next__

    def __call__(self) -> str:
        n = self._next()
        if n > 0xFFFFFFFFFFFF:  # 2**48 ids: draw a new prefix
            self._reset()
            n = self._next()
        return f"{self._prefix}{n:012x}"


new_request_id = _RequestIds()


# LineReceiver's own loop, for what follows a head taken whole (body, next request).
_line_receiver_data_received = LineReceiver.dataReceived
# Header names as twisted.web's Headers keeps them (its canonical form), for
# reading and writing its table directly.
_SERVER, _DATE, _X_REQUEST_ID, _COOKIE, _EXPECT, _CONNECTION = (
    canonical_name(name)
    for name in (b"server", b"date", b"x-request-id", b"cookie", b"expect", b"connection")
)
_CONTENT_TYPE, _CONTENT_LENGTH, _TRANSFER_ENCODING, _X_FORWARDED_FOR = (
    canonical_name(name)
    for name in (b"content-type", b"content-length", b"transfer-encoding", b"x-forwarded-for")
)
_NO_DEFAULT_TYPE = (http.NOT_MODIFIED, http.NO_CONTENT)
_NO_BODY_CODES = http.NO_BODY_CODES


def _write_nothing(data: bytes) -> None:
    """A HEAD or no-body response's writes after the head (as Twisted's lambda)."""


class GatewayChannel(http.HTTPChannel):
    """Twisted's HTTPChannel with the site's header deadline.

    A request head, from its first byte to its blank line, must arrive within
    the site's header_timeout; the deadline is armed only while a head is
    still coming. Everything else is Twisted's, unless a fastpath fix puts
    its copies in (``channel``, ``hold``, ``whole-head``: see the classes
    below and runner_gateway/edge/reaches.py).
    """

    _held: list[bytes] | None = None
    _host: Any = None
    _peer: Any = None
    _gateway_secure: bool | None = None  # GatewayRequest.isSecure's answer, once known
    # Set by fastpath's "whole-head" fix once it has checked that this
    # Twisted has the parser state _take_head sets.
    whole_head = False
    _head_deadline: IDelayedCall | None = None
    _gateway_lost = False
    # The keep-alive idle timer of the "channel" fix (see _ChannelCopies).
    _idle_call: IDelayedCall | None = None
    # A request refused on its head with a body to come (_refuse_body): the
    # close that follows its answer lingers (_linger).
    _linger_wanted = False
    _linger_calls: tuple[IDelayedCall, IDelayedCall] | None = None
    _body_call: IDelayedCall | None = None  # the body rate check (_watch_body)
    # The peer address the site's ConnectionLimits counts this connection
    # under, released when it closes (_UNCOUNTED: not counted).
    _counted_peer: Any = _UNCOUNTED

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self._watch_head()

    def _watch_head(self) -> None:
        # A request head, from its first byte to its blank line, must arrive
        # within the site's header_timeout; the body is held to the site's
        # body_min_rate instead (_watch_body). Checked after each read rather
        # than armed per request, so a head that comes in one read (nearly
        # all) needs no timer.
        requests = self.requests
        in_head = self.line_mode and (self._buffer or (requests and not requests[-1].head_done))
        deadline = self._head_deadline
        if in_head:
            buffer = self._buffer
            if (
                b"\n" in buffer
                and buffer.count(b"\n") != buffer.count(b"\r\n")
                and not cast(Any, self.transport).disconnecting
                # (not while LineReceiver's loop is still taking lines: it may yet)
                and not getattr(self, "_busyReceiving", False)
            ):
                # Lines end at CRLF only: a head with a bare LF would wait for
                # the header deadline.
                self._reject(400, "request lines must end in CRLF")
                return
            if deadline is None and self.transport is not None and not self._gateway_lost:
                site = cast(GatewaySite, self.site)  # type: ignore[attr-defined]
                self._head_deadline = site.reactor.callLater(
                    site.header_timeout, self._head_timed_out
                )
        elif deadline is not None:
            self._cancel_head_deadline()
        if (
            not self.line_mode
            and self._body_call is None
            and requests
            # Twisted's flag for a request whose body is in (absent: no check)
            and not getattr(self, "_handlingRequest", True)
        ):
            self._watch_body()

    def _watch_body(self) -> None:
        """A request body is coming: it must be in by the request's start plus
        the site's grace plus a second per body_min_rate bytes received
        (Apache mod_reqtimeout's MinRate), checked by one timer that moves
        on as bytes arrive; a body read whole with its head needs none."""
        site = cast(GatewaySite, self.site)  # type: ignore[attr-defined]
        if not site.body_min_rate or self.transport is None or self._gateway_lost:
            return
        request: GatewayRequest = self.requests[-1]
        due = (
            request.gateway_context.started
            + site.body_min_rate_grace
            + request._body_received / site.body_min_rate
        )
        now = site.reactor.seconds()
        if now < due:
            self._body_call = site.reactor.callLater(due - now, self._body_due)
        else:
            self._body_too_slow(request)

    def _body_due(self) -> None:
        self._body_call = None
        if (
            not self._gateway_lost
            and not self.line_mode
            and self.requests
            and not getattr(self, "_handlingRequest", True)
        ):
            self._watch_body()  # the same body still coming, or the next one's

    def _body_too_slow(self, request: GatewayRequest) -> None:
        """408, and the connection closed: the body came too slowly. The
        runner has not been asked yet (a request goes on once its body is in)."""
        _log.info("closing a connection whose request body came slower than bodyMinRate")
        if request.content is not None:
            request.content.close()  # a spooled body's temporary file goes now
        request.content = cast(IO[bytes], _Discard())
        self._reject(
            408,
            "the request body came too slowly",
            request.gateway_context.openai_style,
            code="request_timeout",
        )

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        _log.info("closing a connection whose request headers did not arrive in time")
        self.forceAbortClient()

    def _cancel_head_deadline(self) -> None:
        deadline, self._head_deadline = self._head_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def allHeadersReceived(self) -> None:
        refused = self._check_head()
        http.HTTPChannel.allHeadersReceived(self)
        if refused:
            self._refuse_body()

    def _check_head(self) -> bool:
        """Ask the site's resource (GatewayRoot.check_head) whether the request
        whose head just arrived is refused before its body: True if so (no
        ``100 Continue`` then, and gotLength keeps nothing)."""
        request = self.requests[-1]
        if not isinstance(request, GatewayRequest):
            return False
        try:
            method, uri, version = self._command, self._path, self._version
        except AttributeError:  # a Twisted without them: everything is decided on render
            return False
        raw = request.requestHeaders._rawHeaders
        error = request.framing_error or framing_error(version, uri, raw)
        if error is not None:
            request.framing_error = error  # answered 400 (GatewaySite.getResourceFor)
            request.refused_at_head = True
            raw.pop(_EXPECT, None)
            return True
        check = getattr(self.site.resource, "check_head", None)  # type: ignore[attr-defined]
        if check is None:
            return False
        length = self.length
        try:
            if length is not None and length > request._gateway_site.max_body_size:
                request.body_too_large = True  # answered 413 by the tree, at once
                refused = True
            else:
                refused = bool(check(method, uri, raw, request.gateway_context))
        except Exception:
            # The render decides again, in full: a failure here costs only the early answer.
            _log.failure("the request head check failed")
            return False
        if refused:
            request.refused_at_head = True
            raw.pop(_EXPECT, None)
        return refused

    def _refuse_body(self) -> None:
        """A refused request with a body to come: answered now (the body
        counts as empty), on a connection closed after a lingering read."""
        request = self.requests[-1]
        length = self.length
        if request.framing_error is None:
            if length == 0:
                return  # nothing to come: answered as usual, the connection kept
            buffer = self._buffer
            if length is not None and len(buffer) >= length:
                # The whole body came with the head: dropped unread, and the
                # connection kept for what follows it.
                self._buffer = buffer[length:]
                self.length = 0
                return
        self.length = 0
        self.persistent = False
        self._linger_wanted = True
        request.responseHeaders._rawHeaders[_CONNECTION] = [b"close"]

    def loseConnection(self) -> None:
        _lose_connection(self)

    def lineReceived(self, line: bytes) -> None:
        requests = self.requests
        if line[:1] in (b" ", b"\t") and requests and not requests[-1].head_done:
            requests[-1].framing_error = OBS_FOLD  # Twisted would unfold it
        # Twisted's own check of the head's size, a step earlier, to answer 431
        # rather than 400 (a Twisted without the count: its own answer).
        if getattr(self, "_receivedHeaderSize", 0) + len(line) > self.totalHeadersSize:
            self._reject(431, "the request head is over 16 KiB")
            return
        http.HTTPChannel.lineReceived(self, line)

    def lineLengthExceeded(self, line: bytes) -> None:
        # One line over 16 KiB: a header line, or the request line (the URL).
        requests = self.requests
        if requests and not requests[-1].head_done:
            self._reject(431, "a request header line is over 16 KiB")
        else:
            self._reject(414, "the request line is over 16 KiB")

    def _reject(
        self, status: int, message: str, openai: bool = False, code: str | None = None
    ) -> None:
        """Answer ``status`` without a request to render it, and close."""
        body = error_body(status, message, openai, code=code)
        self.release()
        self._linger_wanted = False
        transport: Any = self.transport
        if transport is None or self._gateway_lost or transport.disconnecting:
            return
        rejected = cast(GatewaySite, self.site).rejected  # type: ignore[attr-defined]
        rejected[status] = rejected.get(status, 0) + 1
        transport.write(
            b"HTTP/1.1 %d %s\r\nConnection: close\r\n"
            b"Content-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n\r\n"
            % (status, http.RESPONSES.get(status, b"Error"), len(body))
            + body
        )
        http.HTTPChannel.loseConnection(self)

    def _linger(self) -> None:
        """nginx's lingering close: the answer is sent and the write side shut;
        what the client still sends is read and dropped (so it can read the
        answer rather than meet a reset) until it stops for linger_idle
        seconds, or linger_total seconds have passed."""
        self._linger_wanted = False
        self._buffer = b""
        self.release()
        site = cast(GatewaySite, self.site)  # type: ignore[attr-defined]
        if site.lingering >= site.linger_max:
            # A flood of refused uploads: the courtesy is rationed, so that
            # draining them cannot lengthen every other connection's turn.
            site.linger_shed += 1
            http.HTTPChannel.loseConnection(self)
            return
        site.lingering += 1
        self.dataReceived = self._linger_read  # type: ignore[method-assign]
        transport: Any = self.transport
        if type(transport) is tcp.Server:
            transport.loseWriteConnection()  # FIN once the answer is out
            if _drain_flags:
                # This connection only: its reads from now on (reaches.py lists it).
                transport.doRead = _Drain(self, transport.getHandle())  # type: ignore[method-assign]
        self._linger_calls = (
            site.reactor.callLater(site.linger_total, self._linger_over),
            site.reactor.callLater(site.linger_idle, self._linger_over),
        )

    def _linger_read(self, data: bytes) -> None:
        calls = self._linger_calls
        if calls is not None and calls[1].active():
            calls[1].reset(cast(GatewaySite, self.site).linger_idle)  # type: ignore[attr-defined]

    def _linger_over(self) -> None:
        self._cancel_linger()
        if self.transport is not None and not self._gateway_lost:
            http.HTTPChannel.loseConnection(self)

    def _cancel_linger(self) -> None:
        calls, self._linger_calls = self._linger_calls, None
        if calls is None:
            return
        cast(GatewaySite, self.site).lingering -= 1  # type: ignore[attr-defined]
        for call in calls:
            if call.active():
                call.cancel()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        peer, self._counted_peer = self._counted_peer, _UNCOUNTED
        if peer is not _UNCOUNTED:
            limits = cast(GatewaySite, self.site).connection_limits  # type: ignore[attr-defined]
            if limits is not None:
                limits.release(peer)
        self._gateway_lost = True
        self._cancel_head_deadline()
        self._cancel_linger()
        body_call, self._body_call = self._body_call, None
        if body_call is not None and body_call.active():
            body_call.cancel()
        call, self._idle_call = self._idle_call, None
        if call is not None and call.active():
            call.cancel()
        super().connectionLost(reason)

    def hold(self) -> None:
        """Keep what is written until :meth:`release` (the "hold" fix; else nothing)."""

    def release(self) -> None:
        held, self._held = self._held, None
        if held and self.transport is not None:
            write_now(self.transport, b"".join(held))


class _Drain:
    """A lingering connection's ``doRead`` ("linger-drain" fix): what Twisted's
    ``tcp.Connection.doRead`` does (read what is there, say when the peer is
    gone), with what is read dropped by the kernel."""

    __slots__ = ("channel", "socket")

    def __init__(self, channel: GatewayChannel, sock: socket.socket) -> None:
        self.channel = channel
        self.socket = sock

    def __call__(self) -> Any:
        try:
            count = self.socket.recv_into(_DRAIN_BUFFER, 0, _drain_flags)
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not count:
            return main.CONNECTION_DONE
        self.channel._linger_read(b"")
        return None


class _BadFraming(Resource):
    """The 400 for a request head that breaks a framing rule (edge/framing.py)."""

    isLeaf = True

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def render(self, request: Request) -> bytes:
        return send_error(request, 400, self.message, code="invalid_request")


class _Refused(Protocol):
    """A connection over server.maxConnections(PerClient): closed as soon as
    it is made, before a byte of it is read."""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.abortConnection()


def _admit(site: GatewaySite, addr: Any) -> tuple[Any, Protocol | None]:
    """The peer address a new connection is counted under (_UNCOUNTED without
    limits), or the protocol that refuses it."""
    limits = site.connection_limits
    if limits is None:
        return _UNCOUNTED, None
    peer = getattr(addr, "host", None)
    if not limits.admit(peer):
        return peer, _Refused()
    return peer, None


def _lose_connection(channel: GatewayChannel) -> None:
    """HTTPChannel.loseConnection, or the lingering close after an answer to
    a request refused on its head."""
    if channel._linger_wanted:
        channel._linger()
    else:
        http.HTTPChannel.loseConnection(channel)


class _OnFinish:
    """An entry of a Request's ``notifications`` that calls its functions
    directly: Twisted's Request fires each entry with ``callback(None)`` when
    the response is done, or ``errback(reason)`` when the connection is lost,
    as it would a :meth:`~twisted.web.http.Request.notifyFinish` Deferred (made,
    with its callback added, for every request; three calls, and more to fire)."""

    __slots__ = ("done", "lost")
    done: Callable[[object], object] | None
    lost: Callable[[Failure], object] | None

    def callback(self, result: object) -> None:
        if self.done is not None:
            _hook(self.done, None)

    def errback(self, reason: object = None) -> None:
        failure = reason if isinstance(reason, Failure) else Failure(reason)
        if self.lost is not None:
            _hook(self.lost, failure)


def _hook(function: Callable[[Any], object], argument: object) -> None:
    try:
        function(argument)
    except Exception:
        # A Deferred would have kept the error to log later; the other
        # entries must still be fired.
        _log.failure("a request's finish hook failed")


def on_finish(
    request: Request,
    done: Callable[[object], object] | None = None,
    lost: Callable[[Failure], object] | None = None,
) -> None:
    """``request.notifyFinish().addCallbacks(done, lost)`` without the Deferred:
    ``done(None)`` once the response is finished, ``lost(failure)`` if the
    connection goes first."""
    notifications = getattr(request, "notifications", None)
    if type(notifications) is not list:  # not a twisted.web Request (a test's double)
        finished = request.notifyFinish()
        if done is not None:
            finished.addCallback(done)
        if lost is not None:
            finished.addErrback(lost)
        return
    hook = _OnFinish.__new__(_OnFinish)
    hook.done, hook.lost = done, lost
    notifications.append(hook)


def _new_headers() -> Headers:
    """``Headers()``: an empty table, without its initialiser's call."""
    headers = Headers.__new__(Headers)
    headers._rawHeaders = {}
    return headers


class GatewayRequest(Request):
    """Twisted's Request with the gateway's context, id and body cap.

    Everything else is Twisted's, unless the fastpath fix ``request`` puts
    its copies in (_RequestCopies below).
    """

    gateway_context: RequestContext
    site: GatewaySite
    body_too_large: bool = False
    refused_at_head: bool = False  # GatewayChannel._check_head: no body is kept
    framing_error: str | None = None  # an RFC 9112 framing rule it breaks (edge/framing.py)
    _gateway_host: Any = None  # the "request" fix's host, once asked for

    def __init__(self, channel: http.HTTPChannel, *args: Any) -> None:
        super().__init__(channel, *args)
        self._gateway_init(channel)

    def _gateway_init(self, channel: http.HTTPChannel) -> None:
        site: GatewaySite = channel.site  # type: ignore[attr-defined]
        self._gateway_site = site
        self._gateway_channel = channel  # Twisted drops self.channel when the request ends
        self.gateway_context = RequestContext(request_id="", started=site.reactor.seconds())
        self._body_received = 0
        self._ended = False
        self.head_done = False

    def gotLength(self, length: int | None) -> None:
        if not self._keeps_no_body(length):
            super().gotLength(length)

    def _keeps_no_body(self, length: int | None) -> bool:
        """gotLength's first part: the head is in; True when none of the body
        will be kept (a request refused on its head, or one declaring a body
        over the cap, answered 413 by the tree)."""
        self.head_done = True
        if self.refused_at_head:
            self.content = cast(IO[bytes], _Discard())
            return True
        if length is not None and length > self._gateway_site.max_body_size:
            self.body_too_large = True
            self.content = cast(IO[bytes], _Discard())
            return True
        return False

    def handleContentChunk(self, data: bytes) -> None:
        if not self._past_cap(data):
            super().handleContentChunk(data)

    def _past_cap(self, data: bytes) -> bool:
        """Count ``data`` into the body; True once the body is over the cap,
        and from then on nothing of it is kept (a chunked body declares no
        length, so the cap is met while it is read)."""
        if self.body_too_large:
            return True
        self._body_received += len(data)
        if self._body_received <= self._gateway_site.max_body_size:
            return False
        self.body_too_large = True
        if self.content is not None:
            self.content.close()
        self.content = cast(IO[bytes], _Discard())
        return True

    def _begin(self, given: Sequence[bytes] | None) -> RequestContext:
        """process's first part: the request id (``given``: the client's
        X-Request-Id values), the finish hook, the trace line."""
        ctx = self.gateway_context
        site = self._gateway_site
        if site.trusted_proxies.networks:  # empty by default: nothing to look up
            ctx.trusted_peer = site.trusted_proxies.is_trusted(getattr(self.client, "host", ""))
        if ctx.trusted_peer and given and len(given) == 1 and _REQUEST_ID.match(given[0]):
            ctx.request_id = given[0].decode("ascii")  # a trusted proxy's id
        else:
            ctx.request_id = new_request_id()
        on_finish(self, self._finished, self._finished)
        if site.trace:
            # The path only: a query may carry anything, a credential included.
            query = b"?[query not shown]" if b"?" in self.uri else b""
            _log.debug(
                "request {request_id}: {method} {uri} headers {headers}",
                request_id=ctx.request_id,
                method=self.method.decode("ascii", "replace"),
                uri=(self.path[:512] + query).decode("utf-8", "replace"),
                headers=redacted_headers(self),
            )
        return ctx

    def process(self) -> None:
        ctx = self._begin(self.requestHeaders.getRawHeaders(b"x-request-id"))
        self.setHeader(b"x-request-id", ctx.request_id.encode())
        if self.framing_error is not None:  # before Twisted's own answer to "*"
            site = self._gateway_site
            self.site = site
            try:
                self.render(site.getResourceFor(self))
            except BaseException:
                self.processingFailed(Failure())
            return
        # Twisted's, which sets its own Server header: GatewaySite.getResourceFor
        # puts ours back. The answers the gateway writes itself (401, 404,
        # /healthz) carry it; a proxied response takes the runner's (proxy.py).
        super().process()

    def _finished(self, result: object) -> None:
        if self._ended:
            return
        self._ended = True
        ctx = self.gateway_context
        if isinstance(result, Failure) and not ctx.stream_complete():
            ctx.aborted = True
        if ctx.status is None:
            ctx.status = self.code
        if not ctx.bytes_sent:
            ctx.bytes_sent = self.sentLength
        release = getattr(self._gateway_channel, "release", None)
        if release is not None:
            release()  # the client gets its last bytes before the access log is written
        self._gateway_site.request_ended(self)


class GatewaySite(Site):
    """A Site that tracks its requests so they can be logged, observed and drained."""

    requestFactory = GatewayRequest  # type: ignore[assignment]
    # Where access lines go: twisted.logger events in ACCESS_NAMESPACE, unless
    # the service sets its direct writer (_LevelControl.access, same lines).
    access_log: Callable[[dict[str, Any]], None] = staticmethod(log_access_event)
    # HTTP/1.1 only (tls.py offers no h2 either): Twisted's default wraps the
    # channel in a proxy that could switch to HTTP/2, one more call per read.
    protocol = GatewayChannel  # type: ignore[assignment]
    # server.trustedProxies (set by the service): whose forwarding headers count.
    trusted_proxies = TrustedProxies()

    def __init__(
        self,
        resource: IResource,
        reactor: IReactorTime,
        max_body_size: int,
        header_timeout: float = 30.0,
        keep_alive_timeout: float = 75.0,
        observers: list[RequestObserver] | None = None,
        trace: bool = False,
        body_min_rate: int = 0,
        body_min_rate_grace: float = 30.0,
        connection_limits: ConnectionLimits | None = None,
    ) -> None:
        # Never parse form bodies into request.args: the gateway never reads
        # them, and Twisted would parse a big one whole before auth is checked.
        super().__init__(
            resource, timeout=keep_alive_timeout, reactor=reactor, parsePOSTFormSubmission=False
        )
        fastpath.install()  # hot-path fixes found by profiling (fastpath.py)
        self.reactor = reactor
        self._call_later = reactor.callLater
        self.max_body_size = max_body_size
        self.header_timeout = header_timeout
        # The lingering close after a request refused on its head (as nginx's
        # lingering_time and lingering_timeout).
        self.linger_total = LINGER_TOTAL
        self.linger_idle = LINGER_IDLE
        self.linger_max = LINGER_MAX
        self.first_reads = FirstReads(reactor)
        self.lingering = 0  # connections in a lingering close now
        self.linger_shed = 0  # refused requests closed without one (linger_max reached)
        # Answers the channel gives without a request (GatewayChannel._reject), by status.
        self.rejected: dict[int, int] = {}
        self.body_min_rate = body_min_rate  # bytes a second; 0: no minimum
        self.body_min_rate_grace = body_min_rate_grace
        # server.maxConnections and maxConnectionsPerClient, checked at accept
        # (buildProtocol); its ``exempt`` is the per-client exemption.
        self.connection_limits = connection_limits
        self.trace = trace  # logging.level trace: a detail line per request
        # Kept, not copied: the service adds observers (metrics) to this list.
        self.observers: list[RequestObserver] = [] if observers is None else observers
        self.inflight: set[GatewayRequest] = set()
        self._idle_waiters: list[Deferred[None]] = []
        self.displayTracebacks = False
        self.noisy = False

    def buildProtocol(self, addr: Any) -> Any:
        peer, refused = _admit(self, addr)
        if refused is not None:
            return refused
        channel = Site.buildProtocol(self, addr)
        if peer is not _UNCOUNTED:
            channel._counted_peer = peer
        return channel

    def getResourceFor(self, request: Request) -> IResource:
        gateway_request: GatewayRequest = request  # type: ignore[assignment]
        self.inflight.add(gateway_request)
        gateway_request.gateway_context.observers = self.observers
        request.setHeader(b"server", b"runner-gateway")
        if gateway_request.framing_error is not None:
            return _BadFraming(gateway_request.framing_error)
        found: IResource = super().getResourceFor(request)
        return found

    def log(self, request: http.Request) -> None:
        """Twisted's combined log line is replaced by ours (request_ended)."""

    def request_ended(self, request: GatewayRequest) -> None:
        self.inflight.discard(request)
        ctx = request.gateway_context
        ctx.after_send()
        close = getattr(ctx.usage, "close", None)
        if close is not None:
            close()  # a non-stream JSON body is parsed once it is complete
        now = self.reactor.seconds()
        fields = access_fields(request, ctx, now)
        self.access_log(fields)
        for observer in self.observers:
            try:
                observer.request_finished(ctx)
            except Exception:
                _log.failure("request observer failed")
        if not self.inflight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def wait_idle(self) -> Deferred[None]:
        """Fires once no request is in flight (at once when none is)."""
        d: Deferred[None] = Deferred()
        if not self.inflight:
            d.callback(None)
        else:
            self._idle_waiters.append(d)
        return d

    def abort_inflight(self) -> None:
        for request in list(self.inflight):
            request.gateway_context.aborted = True
            if request.channel is not None:
                request.channel.forceAbortClient()


class _ChannelCopies(GatewayChannel):
    """The "channel" fix: Twisted's HTTPChannel methods (and TimeoutMixin's)
    with fewer calls, installed on GatewayChannel while the fix is on.

    The keep-alive idle timer: Twisted cancels it when a request arrives and
    makes a new one when the answer is done. Here it is switched off (timeOut
    None, while a request is handled: a firing then does nothing) and on
    again, one timer per connection, not per request.
    """

    def setTimeout(self, period: float | None) -> float | None:
        previous: float | None = self.timeOut
        self.timeOut = period  # type: ignore[assignment]
        if period is not None:
            call = self._idle_call
            if call is not None and call.active():
                call.reset(period)
            else:
                self._idle_call = self.callLater(period, self._idle_fired)
        return previous

    def resetTimeout(self) -> None:
        call = self._idle_call
        if call is not None and self.timeOut is not None and call.active():
            call.reset(self.timeOut)

    def _idle_fired(self) -> None:
        self._idle_call = None
        if self.timeOut is not None:
            self.timeoutConnection()

    def requestDone(self, request: Request) -> None:
        """Twisted's, without five calls in the usual case: ``Request.__eq__``
        (an identity test), and ``resumeProducing`` on a connection whose
        reading was never paused, which on the epoll reactor goes down
        through three more calls to find the descriptor already registered."""
        requests = self.requests
        transport: Any = self._networkProducer
        if (
            not requests
            or requests[0] is not request
            or self._waitingForTransport
            or type(transport) is not tcp.Server
            or type(transport.reactor) is not _EPOLL_REACTOR
            # (a reactor without this set: Twisted's path)
            or transport.fileno() not in getattr(transport.reactor, "_reads", ())
        ):
            http.HTTPChannel.requestDone(self, request)
            return
        del requests[0]
        if not self.persistent:
            self.loseConnection()
            return
        self._handlingRequest = False
        if self._savedTimeOut:
            self.setTimeout(self._savedTimeOut)
        # Receive what was buffered meanwhile, if anything.
        data = b"".join(self._dataBuffer)
        self._dataBuffer = []
        self.setLineMode(data)

    def allHeadersReceived(self) -> None:
        # Twisted's, reading the header table directly: most requests carry
        # no Cookie and no Expect header, and asking for each costs a call
        # and a name encoding.
        refused = self._check_head()
        request = self.requests[-1]
        raw = request.requestHeaders._rawHeaders
        if _COOKIE in raw:
            request.parseCookies()
        if _CONNECTION not in raw and self._version == b"HTTP/1.1":
            self.persistent = True  # checkPersistence's answer, without its look-up
        else:
            self.persistent = self.checkPersistence(request, self._version)
        request.gotLength(self.length)
        expect = raw.get(_EXPECT)
        if expect and expect[0].lower() == b"100-continue" and self._version == b"HTTP/1.1":
            self._send100Continue()
        if refused:
            self._refuse_body()

    def connectionMade(self) -> None:
        transport = self.transport
        if type(transport) is not tcp.Server:
            http.HTTPChannel.connectionMade(self)
            return
        # Twisted's, without its two zope interface look-ups, whose answers are
        # known for a plain TCP connection: an ITCPTransport and its own producer.
        transport.setTcpNoDelay(True)
        self.setTimeout(self.timeOut)
        self._networkProducer = transport
        if transport.producer is None and not transport.disconnected and not transport.TLS:
            # registerProducer(self, True) on a new connection, without its two calls.
            transport.producer = self
            transport.streamingProducer = True
        else:
            transport.registerProducer(self, True)
        self._gateway_secure = False  # GatewayRequest.isSecure: plain TCP is not TLS

    def getHost(self) -> Any:
        # Twisted's Request asks on every request (a getsockname() call and an
        # address object); a connection's own address never changes.
        if self._host is None:
            self._host = http.HTTPChannel.getHost(self)
        return self._host

    def getPeer(self) -> Any:
        # Likewise asked by every Request (a new address object each time).
        if self._peer is None:
            if type(self.transport) is tcp.Server:
                # tcp.Server.getPeer, without the two calls down to it.
                server: Any = self.transport
                self._peer = server._addressType("TCP", *server.client)
            else:
                self._peer = http.HTTPChannel.getPeer(self)
        return self._peer


class _HoldCopies(GatewayChannel):
    """The "hold" fix: between :meth:`hold` and :meth:`release` (the proxy
    brackets each read from the runner with them) the response's head, body
    pieces and closing chunk are kept, then handed over with
    :func:`~runner_gateway.edge.fastpath.write_now`: one ``send()`` at once instead
    of several queued writes sent on the reactor's next turn."""

    def hold(self) -> None:
        if self._held is None:
            self._held = []

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        held = self._held
        if held is None or not isinstance(headers, Headers):
            self.release()
            http.HTTPChannel.writeHeaders(self, version, code, reason, headers)
            return
        # As Twisted's writeHeaders, into the held pieces.
        held.extend((version, b" ", code, b" ", reason, b"\r\n"))
        for name, values in headers.getAllRawHeaders():
            for value in values:
                held.extend((name, b": ", value, b"\r\n"))
        held.append(b"\r\n")

    def write(self, data: bytes) -> None:
        if self._held is None:
            http.HTTPChannel.write(self, data)
        else:
            self._held.append(data)

    def writeSequence(self, iovec: Any) -> None:
        if self._held is None:
            http.HTTPChannel.writeSequence(self, iovec)
        else:
            self._held.extend(iovec)

    def loseConnection(self) -> None:
        self.release()  # a non-persistent request's last bytes go before the close
        _lose_connection(self)


class _WholeHeadCopies(GatewayChannel):
    """The "whole-head" fix: a request head that arrives whole in one read, in
    the plain form, is taken in one pass (:meth:`_take_head`); every other
    head goes through Twisted's line-by-line parser."""

    def dataReceived(self, data: bytes) -> None:
        end = self._whole_head_end(data) if self.whole_head else -1
        if end > 0:
            self._take_head(data, end)
        else:
            http.HTTPChannel.dataReceived(self, data)
        self._watch_head()

    def _whole_head_end(self, data: bytes) -> int:
        """Where the head ends in ``data`` if the whole-head path may take it, else -1."""
        if not (
            self.line_mode
            and not self._buffer
            and not self._busyReceiving
            and self._HTTPChannel__first_line == 1
            and self.persistent
        ):
            return -1
        end = data.find(b"\r\n\r\n")
        if (
            0 < end <= min(self.totalHeadersSize, self.MAX_LENGTH)
            and data.count(b"\r\n", 0, end) <= self.maxHeaders
            and _WHOLE_HEAD.fullmatch(data, 0, end)
        ):
            return end
        return -1

    def _take_head(self, data: bytes, end: int) -> None:
        """A whole request head at the start of ``data``, as Twisted's
        lineReceived would take it line by line, in one pass.

        Twisted's checks are kept (request line, header count and size, the
        Content-Length and Transfer-Encoding rules) and its state is left as
        its own parser leaves it; what follows the head goes through
        LineReceiver as usual (body, or a pipelined request).
        """
        lines = data[:end].split(b"\r\n")
        self._buffer = data[end + 4 :]
        self._busyReceiving = True
        try:
            self._receivedHeaderSize += end - 2 * (len(lines) - 1)
            request = self.requestFactory(self, len(self.requests))
            self.requests.append(request)
            self._HTTPChannel__first_line = 0
            try:
                self._command, self._path, self._version = _parse_request_line(lines[0])
            except ValueError:
                self._respondToBadRequestAndDisconnect()
                return
            raw = request.requestHeaders._rawHeaders
            encode = canonical_name
            canonical = cached_header_name
            for line in lines[1:]:
                name, value = line.split(b":", 1)
                name = canonical(name) or encode(name)
                value = value.strip(b" \t")
                if (
                    name == b"Content-Length" or name == b"Transfer-Encoding"
                ) and not self._maybeChooseTransferDecoder(name, value):
                    return  # it has answered 400
                values = raw.get(name)
                if values is None:
                    raw[name] = [value]
                else:
                    values.append(value)
            self._receivedHeaderCount += len(lines) - 1
            self.allHeadersReceived()
            if self.length == 0:
                self._all_content_received(request)
            else:
                self.line_mode = 0  # setRawMode()
                decoder: Any = self._transferDecoder
                transport: Any = self.transport
                if (
                    type(decoder) is _identity_decoder
                    and decoder.contentLength is not None
                    and len(self._buffer) >= decoder.contentLength
                    and not self.paused
                    and not (transport is not None and transport.disconnecting)
                ):
                    # The whole body came with the head: what LineReceiver,
                    # rawDataReceived and the decoder would do with it.
                    length = decoder.contentLength
                    data, self._buffer = self._buffer, b""
                    decoder.dataCallback = decoder.finishCallback = None
                    decoder.contentLength = 0
                    request.handleContentChunk(data[:length])
                    self._dataBuffer.append(data[length:])  # _finishRequestBody
                    self._all_content_received(request)
        finally:
            self._busyReceiving = False
        if self.timeOut is not None:
            # Twisted resets the idle timer on every read. After a read that
            # held a whole request the timer is off (timeOut None) until the
            # answer is done, and a reset would change nothing.
            self.resetTimeout()
        transport = self.transport
        if self._buffer and not (transport is not None and transport.disconnecting):
            _line_receiver_data_received(self, b"")  # the body, or the next request

    def _all_content_received(self, request: Any) -> None:
        """Twisted's allContentReceived, for a head _take_head took: the
        request line is known here, and the idle timer is switched off
        without a call (setTimeout(None) only does that)."""
        command, path, version = self._command, self._path, self._version
        self.length = 0
        self._receivedHeaderCount = 0
        self._receivedHeaderSize = 0
        self._HTTPChannel__first_line = 1
        self._transferDecoder = None
        del self._command, self._path, self._version
        if self.timeOut:
            self._savedTimeOut, self.timeOut = self.timeOut, None
        self._handlingRequest = True
        self.line_mode = 0
        request.requestReceived(command, path, version)


class _RequestCopies(GatewayRequest):
    """The "request" fix: twisted.web's Request methods in fewer calls, reading
    and writing the header tables directly (``Headers._rawHeaders``),
    installed on GatewayRequest while the fix is on."""

    # Twisted's Request.__hash__ is id(self) in Python; object's is the same
    # identity hash in C (the site's in-flight set hashes every request twice).
    __hash__ = object.__hash__

    def __init__(self, channel: http.HTTPChannel, queued: object = None) -> None:
        # What twisted.web.server.Request.__init__ (and http.Request's and
        # Componentized's under it) set, in one step and without asking the
        # connection for its own address, a getsockname() call and an address
        # object per connection: ``host`` is looked up when first read.
        # tests/test_channel.py holds this to Twisted's.
        self.notifications = []
        self.channel = channel
        self.client = channel.getPeer()
        self.requestHeaders = _new_headers()
        self.received_cookies = {}
        self.responseHeaders = _new_headers()
        self.cookies = []
        self.transport = channel.transport
        self.queued = False
        self._parsePOSTFormSubmission = False  # as GatewaySite asks Twisted's
        self._adapterCache = {}
        self._gateway_init(channel)

    @property
    def host(self) -> Any:
        host = self._gateway_host
        if host is None:
            host = self._gateway_host = self._gateway_channel.getHost()
        return host

    @host.setter
    def host(self, address: Any) -> None:  # Request.setHost
        self._gateway_host = address

    def gotLength(self, length: int | None) -> None:
        if self._keeps_no_body(length):
            return
        # twisted.web.server.Request.gotLength for a Site without a
        # getContentFile (GatewaySite), minus the AttributeError it raises
        # and catches to find that out.
        self.content = _content_file(length)

    def handleContentChunk(self, data: bytes) -> None:
        if not self._past_cap(data):
            self.content.write(data)  # type: ignore[union-attr]  # Twisted's handleContentChunk

    def process(self) -> None:
        ctx = self._begin(self.requestHeaders._rawHeaders.get(_X_REQUEST_ID))
        site = self._gateway_site
        # twisted.web.server.Request.process, with the default headers put
        # straight into the table (known names and safe values, so without
        # setHeader's name encoding and value checks), and ours instead of its
        # Server header: the answers the gateway writes itself (401, 404,
        # /healthz) carry them; a proxied response takes the runner's Server
        # header instead (proxy.py). Twisted's check for an encoding resource
        # is left out: the gateway's tree has none.
        self.site = site
        headers = self.responseHeaders._rawHeaders
        headers[_SERVER] = [b"runner-gateway"]
        headers[_DATE] = [server.datetimeToString()]  # type: ignore[attr-defined]
        headers[_X_REQUEST_ID] = [ctx.request_id.encode()]
        self.prepath = []
        segments = self.path[1:].split(b"/")
        # unquote_to_bytes returns a segment without "%" as it is.
        self.postpath = list(map(unquote_to_bytes, segments)) if b"%" in self.path else segments
        if self.path == b"*" and self.framing_error is None:
            self._handleStar()
            return
        try:
            self.render(site.getResourceFor(self))
        except BaseException:
            self.processingFailed(Failure())

    def write(self, data: bytes) -> None:
        # twisted.web's two Request.write layers in one step for the two writes
        # every response makes: the first (the head) and a piece of a chunked
        # body. Same bytes on the wire (tests/test_channel.py); anything else
        # (Last-Modified, ETag or cookies to add, an encoder, a faked HEAD, a
        # finished or disconnected request, a body of known length) is Twisted's.
        if self.finished or self._disconnected or self._inFakeHead or self._encoder is not None:
            server.Request.write(self, data)
            return
        if self.startedWriting:
            if not self.chunked:
                server.Request.write(self, data)
            elif data:
                self.sentLength += len(data)
                self.channel.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
            return
        if self.lastModified is not None or self.etag is not None or self.cookies:
            server.Request.write(self, data)
            return
        headers = self.responseHeaders
        raw = headers._rawHeaders
        code = self.code
        length = raw.get(_CONTENT_LENGTH)
        if (
            code not in _NO_DEFAULT_TYPE
            and _CONTENT_TYPE not in raw
            and self.defaultContentType is not None
            and not (length and length[0] == b"0")
        ):
            raw[_CONTENT_TYPE] = [self.defaultContentType]
        self.startedWriting = 1
        version = self.clientproto
        method = self.method
        if (
            version == b"HTTP/1.1"
            and length is None
            and method != b"HEAD"
            and code not in _NO_BODY_CODES
        ):
            raw[_TRANSFER_ENCODING] = [b"chunked"]
            self.chunked = 1
        self.channel.writeHeaders(version, b"%d" % (code,), self.code_message, headers)
        if method == b"HEAD" or code in _NO_BODY_CODES:
            self.write = _write_nothing  # type: ignore[method-assign]
            return
        self.sentLength += len(data)
        if data:
            if self.chunked:
                self.channel.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
            else:
                self.channel.write(data)

    def isSecure(self) -> bool:
        # As Twisted's, but the channel's answer (an ISSLTransport adaptation,
        # ~2 us) is kept on it: a connection's transport never changes.
        if self._forceSSL:
            return True
        channel = self.channel
        if channel is None:
            return False
        secure: bool | None = getattr(channel, "_gateway_secure", None)
        if secure is None:
            secure = bool(channel.isSecure())
            channel._gateway_secure = secure  # type: ignore[attr-defined]
        return secure


class _SiteCopies(GatewaySite):
    """Site methods of the "channel" (buildProtocol) and "request"
    (getResourceFor) fixes."""

    def buildProtocol(self, addr: Any) -> Any:
        peer, refused = _admit(self, addr)
        if refused is not None:
            return refused
        # Twisted's three layers (Site, HTTPFactory, Factory) in one.
        channel: GatewayChannel = self.protocol()
        if peer is not _UNCOUNTED:
            channel._counted_peer = peer
        channel.factory = self
        channel.callLater = self._call_later  # type: ignore[assignment]
        channel.timeOut = self.timeOut  # type: ignore[assignment]
        channel.requestFactory = self.requestFactory  # type: ignore[assignment]
        channel.site = self  # type: ignore[attr-defined]
        return channel

    def getResourceFor(self, request: Request) -> IResource:
        gateway_request: GatewayRequest = request  # type: ignore[assignment]
        self.inflight.add(gateway_request)
        gateway_request.gateway_context.observers = self.observers
        # Site.getResourceFor without its copy.copy of the (empty) prepath.
        request.site = self
        request.sitepath = list(request.prepath or ())  # type: ignore[attr-defined]
        if gateway_request.framing_error is not None:
            return _BadFraming(gateway_request.framing_error)
        found: IResource = getChildForRequest(self.resource, request)
        return found


# ---------------------------------------------------------------- fastpath fixes
# Each fix below installs its copies (the methods defined in a _*Copies class)
# on the gateway's own classes; while a fix is off, those classes use
# Twisted's own methods (tests/test_fastpath.py checks both ways).

# (fix, the class the copies go on, the class that holds them, method names)
COPIES: list[tuple[str, type, type, tuple[str, ...]]] = [
    (
        "channel",
        GatewayChannel,
        _ChannelCopies,
        (
            "setTimeout",
            "resetTimeout",
            "_idle_fired",
            "requestDone",
            "allHeadersReceived",
            "connectionMade",
            "getHost",
            "getPeer",
        ),
    ),
    ("channel", GatewaySite, _SiteCopies, ("buildProtocol",)),
    (
        "hold",
        GatewayChannel,
        _HoldCopies,
        ("hold", "writeHeaders", "write", "writeSequence", "loseConnection"),
    ),
    (
        "whole-head",
        GatewayChannel,
        _WholeHeadCopies,
        ("dataReceived", "_whole_head_end", "_take_head", "_all_content_received"),
    ),
    (
        "request",
        GatewayRequest,
        _RequestCopies,
        (
            "__init__",
            "__hash__",
            "host",
            "gotLength",
            "handleContentChunk",
            "process",
            "write",
            "isSecure",
        ),
    ),
    ("request", GatewaySite, _SiteCopies, ("getResourceFor",)),
]


def _put_copies(fix: str) -> None:
    for name, target, copies, methods in COPIES:
        if name == fix:
            for method in methods:
                setattr(target, method, vars(copies)[method])


def _check_header_table() -> None:
    """The header-table shortcuts read and write ``Headers._rawHeaders`` by
    canonical name: check that this Twisted keeps its table that way."""
    headers = Headers()
    headers.addRawHeader(b"x-request-id", b"1")
    if headers._rawHeaders != {_X_REQUEST_ID: [b"1"]}:
        raise Unavailable("Headers._rawHeaders is not a table by canonical name")


def _install_channel() -> None:
    global _EPOLL_REACTOR
    _check_header_table()
    channel = http.HTTPChannel()
    _ = (
        channel._savedTimeOut,
        channel._waitingForTransport,
        channel._dataBuffer,
        channel._handlingRequest,
        channel._send100Continue,
        tcp.Server._addressType,
        tcp.Server.producer,
    )
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # no epoll here: requestDone keeps Twisted's path
        EPollReactor = None  # type: ignore[assignment,misc]
    _EPOLL_REACTOR = EPollReactor
    _put_copies("channel")


def _install_hold() -> None:
    _put_copies("hold")


def _install_whole_head() -> None:
    global _parse_request_line, _identity_decoder
    from twisted.protocols.basic import LineReceiver

    # The parser state _take_head reads and sets; a Twisted without one of
    # them raises AttributeError here and keeps its own parser.
    channel = http.HTTPChannel()
    _ = (
        channel._HTTPChannel__first_line,  # type: ignore[attr-defined]
        channel._receivedHeaderSize,
        channel._receivedHeaderCount,
        channel._maybeChooseTransferDecoder,
        channel._respondToBadRequestAndDisconnect,
        channel.maxHeaders,
        channel.totalHeadersSize,
        LineReceiver._busyReceiving,
        LineReceiver._buffer,
        LineReceiver.paused,
        channel._transferDecoder,
        http._IdentityTransferDecoder(0, None, None).finishCallback,
    )
    _check_header_table()
    # Bound once: twisted.web.http is a deprecation proxy module, where each
    # attribute lookup is a Python-level __getattribute__ call (2.4 us).
    _parse_request_line = http._parseRequestLine
    _identity_decoder = http._IdentityTransferDecoder
    _put_copies("whole-head")
    GatewayChannel.whole_head = True


def _install_request() -> None:
    global _content_file
    _check_header_table()
    from twisted.python.components import Componentized

    _ = (
        Request._disconnected,
        Request._inFakeHead,
        Request._encoder,
        Request._forceSSL,
        Request._handleStar,
        Componentized()._adapterCache,
    )
    _content_file = http._getContentFile
    _put_copies("request")


def _connection_made_reading(channel: GatewayChannel) -> None:
    """GatewayChannel.connectionMade with the "read-at-accept" fix (edge/accept.py)."""
    _made(channel)
    transport: Any = channel.transport
    at_once = type(transport) is tcp.Server
    if not at_once:  # TLS: the TCP connection under the TLS protocol
        transport = getattr(transport, "transport", None)
    if type(transport) is tcp.Server and not transport.disconnecting:
        site = cast(GatewaySite, channel.site)  # type: ignore[attr-defined]
        peer = getattr(channel.getPeer(), "host", None)
        site.first_reads.connection_made(transport, peer, at_once)


def _install_read_at_accept() -> None:
    global _made
    # What edge/accept.py calls on the transport (public FileDescriptor methods).
    _ = (tcp.Server.doRead, tcp.Server.stopReading, tcp.Server.startReading)
    _made = GatewayChannel.connectionMade
    GatewayChannel.connectionMade = _connection_made_reading  # type: ignore[method-assign,assignment]


def _install_linger_drain() -> None:
    global _drain_flags
    if not sys.platform.startswith("linux"):
        raise Unavailable("only Linux drops TCP data read with MSG_TRUNC")
    # What _Drain relies on: the transport's socket, and the read results
    # Twisted's reactors act on.
    _ = (tcp.Server.getHandle, tcp.Server.doRead, main.CONNECTION_DONE, main.CONNECTION_LOST)
    _drain_flags = socket.MSG_TRUNC


_EPOLL_REACTOR: type[Any] | None = None
_made: Callable[[GatewayChannel], None]
_parse_request_line: Callable[[bytes], tuple[bytes, bytes, bytes]]
_identity_decoder: type[Any]
_content_file: Callable[[int | None], IO[bytes]]
fastpath.register("channel", _install_channel)
fastpath.register("hold", _install_hold)
fastpath.register("whole-head", _install_whole_head, needs="channel")
fastpath.register("request", _install_request)
fastpath.register("linger-drain", _install_linger_drain)
fastpath.register("read-at-accept", _install_read_at_accept)


def redacted_headers(request: Request) -> dict[str, str]:
    """Request headers for a trace line, with credentials replaced."""
    shown = {}
    for name, values in request.requestHeaders.getAllRawHeaders():
        key = name.lower()
        if key in _SECRET_HEADERS:
            shown[key.decode("ascii", "replace")] = "[redacted]"
        else:
            shown[key.decode("ascii", "replace")] = b", ".join(values).decode("utf-8", "replace")[
                :256
            ]
    return shown


def access_fields(request: Request, ctx: RequestContext, now: float) -> dict[str, Any]:
    """The access log record: only safe, bounded facts (never headers or bodies)."""
    path = request.path.decode("utf-8", "replace") if request.path else "-"
    client: str = getattr(request.client, "host", None) or "-"
    if ctx.trusted_peer:
        forwarded_for = request.requestHeaders._rawHeaders.get(_X_FORWARDED_FOR) or ()
        trusted = cast(GatewayRequest, request)._gateway_site.trusted_proxies
        client = client_address(client, trusted, forwarded_for)
    fields: dict[str, Any] = {
        "request_id": ctx.request_id,
        "client": client,
        "method": (request.method or b"-").decode("ascii", "replace"),
        "path": path[:512],
        "runner": ctx.runner.name if ctx.runner is not None else None,
        "status": ctx.status,
        "bytes": ctx.bytes_sent,
        "duration_ms": round((now - ctx.started) * 1000, 2),
        "ttfb_ms": round((ctx.first_byte - ctx.started) * 1000, 2)
        if ctx.first_byte is not None
        else None,
        "sub": ctx.subject,
        "model": ctx.model,
        "prompt_tokens": ctx.usage.prompt_tokens if ctx.usage is not None else None,
        "completion_tokens": ctx.usage.completion_tokens if ctx.usage is not None else None,
        "aborted": ctx.aborted,
    }
    if ctx.host is not None:
        fields["host"] = ctx.host
    if ctx.queue_wait is not None:
        fields["queue_ms"] = round(ctx.queue_wait * 1000, 2)
    if ctx.upstream_error:
        fields["upstream_error"] = ctx.upstream_error
    usage = ctx.usage
    if usage is not None and not usage.reported and usage.completion_tokens:
        fields["usage_estimated"] = True  # counted from the chunks, not reported
    if ctx.auth_failure:
        fields["auth_failure"] = ctx.auth_failure
    return fields
