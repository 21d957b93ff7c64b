"""site.GatewayChannel: the whole-head path (fastpath "whole-head") against
Twisted's line-by-line parser (for any bytes a client sends, the same
requests reach the resource and the same bytes go back), the deadline for a
head that comes slowly, and the keep-alive idle timer."""

from __future__ import annotations

import contextlib
import re
import socket
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver
from twisted.python.failure import Failure
from twisted.web import http, resource
from twisted.web.http_headers import Headers
from twisted.web.server import Request, Site

from runner_gateway.edge.site import GatewayChannel, GatewaySite
from tests.helpers_site import Unanswered, needs_fastpath


class _Record(resource.Resource):
    """Writes down what each request carried and answers at once."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[Any, ...]] = []

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        self.seen.append(
            (
                request.method,
                request.uri,
                request.clientproto,
                list(request.requestHeaders.getAllRawHeaders()),
                request.content.read(),
            )
        )
        return b"ok"


_VARYING = re.compile(rb"(?im)^(date|x-request-id): [^\r\n]*\r\n")


class _Side:
    def __init__(self, whole_head: bool, answer: resource.Resource | None = None) -> None:
        self.answer: Any = answer or _Record()
        self.clock = MemoryReactorClock()
        site = GatewaySite(
            self.answer, self.clock, max_body_size=1024, header_timeout=30, keep_alive_timeout=75
        )
        channel = site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 5555))
        assert isinstance(channel, GatewayChannel)
        channel.whole_head = whole_head
        self.lines = 0
        line_received = channel.lineReceived

        def counting(line: bytes) -> None:
            self.lines += 1
            line_received(line)

        channel.lineReceived = counting  # type: ignore[method-assign]
        self.channel = channel
        self.transport = StringTransport()
        channel.makeConnection(self.transport)

    def send(self, *pieces: bytes) -> tuple[Any, ...]:
        for piece in pieces:
            if self.transport.disconnecting:
                break  # a closing TCP transport reads no more
            self.channel.dataReceived(piece)
        return (
            getattr(self.answer, "seen", None),
            _VARYING.sub(b"", self.transport.value()),
            self.transport.disconnecting,
            len(self.channel.requests),
        )


def _both(*pieces: bytes) -> tuple[tuple[Any, ...], _Side]:
    fast, twisted = _Side(True), _Side(False)
    outcome = fast.send(*pieces)
    assert outcome == twisted.send(*pieces)
    return outcome, fast


@needs_fastpath
def test_a_plain_head_takes_the_whole_head_path() -> None:
    raw = b"POST /api/chat?x=1 HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nX-A:  b \r\n\r\nhi"
    (seen, answer, closing, _), fast = _both(raw)
    assert fast.lines == 0
    assert seen == [
        (
            b"POST",
            b"/api/chat?x=1",
            b"HTTP/1.1",
            [(b"Host", [b"gw"]), (b"Content-Length", [b"2"]), (b"X-A", [b"b"])],
            b"hi",
        )
    ]
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"ok")
    assert not closing


def test_a_head_over_two_reads_goes_line_by_line() -> None:
    (seen, _, _, _), fast = _both(b"GET / HTTP/1.1\r\nHost: gw\r\n", b"\r\n")
    assert fast.lines == 3 and len(seen) == 1


def test_too_many_headers_are_refused_as_twisted_does() -> None:
    raw = b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 501 + b"\r\n"
    (seen, answer, closing, _), _ = _both(raw)
    assert not seen and answer.startswith(b"HTTP/1.1 400 ") and closing


def test_a_head_over_the_size_limit_is_refused_as_twisted_does() -> None:
    # Twisted closes without an answer when a line is over its limit.
    raw = b"GET / HTTP/1.1\r\nX-A: " + b"b" * 17000 + b"\r\n\r\n"
    (seen, _, closing, _), fast = _both(raw)
    assert not seen and closing and fast.lines == 1


def _header_deadlines(side: _Side) -> list[Any]:
    calls: list[Any] = list(side.clock.getDelayedCalls())
    return [c for c in calls if "_head_timed_out" in repr(c.func)]


@pytest.mark.parametrize("whole_head", [pytest.param(True, marks=needs_fastpath), False])
def test_a_head_in_one_read_arms_no_header_deadline(whole_head: bool) -> None:
    side = _Side(whole_head)
    side.send(b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\n\r\nab")
    assert side.lines == (0 if whole_head else 4)
    assert not _header_deadlines(side)  # the body may take its time
    side.clock.advance(31)
    side.send(b"cd")
    assert side.answer.seen[0][-1] == b"abcd" and not side.transport.disconnecting


@pytest.mark.parametrize(
    "pieces",
    [
        [b"GET / HTTP/1.1\r\nHost: gw\r\n"],
        [b"GET / HT"],
        # After a whole request, the start of a pipelined one.
        [b"GET /a HTTP/1.1\r\nHost: gw\r\n\r\nGET /b HTTP/1.1\r\n"],
    ],
)
def test_a_head_that_does_not_finish_in_time_is_cut_off(pieces: list[bytes]) -> None:
    side = _Side(True)
    side.send(*pieces)
    assert len(_header_deadlines(side)) == 1
    side.clock.advance(29.9)
    assert not side.transport.disconnecting
    side.clock.advance(0.2)
    assert side.transport.disconnecting


def test_a_head_finished_in_time_cancels_its_deadline() -> None:
    side = _Side(True)
    raw = b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n"
    side.send(*[raw[i : i + 1] for i in range(len(raw))])
    assert side.answer.seen and not _header_deadlines(side)
    side.clock.advance(31)
    assert not side.transport.disconnecting


@needs_fastpath
def test_kept_alive_requests_share_one_idle_timer() -> None:
    side = _Side(True)
    made: list[Any] = []
    call_later = side.clock.callLater

    def counting(delay: float, f: Any, *args: Any, **kw: Any) -> Any:
        made.append(f)
        return call_later(delay, f, *args, **kw)

    channel: Any = side.channel
    channel.callLater = counting
    for _ in range(5):
        side.send(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert len(side.answer.seen) == 5
    assert made == []  # the connection's timer was switched off and on, not remade
    side.clock.advance(74.9)
    assert not side.transport.disconnecting
    side.clock.advance(0.2)
    assert side.transport.disconnecting


def test_a_request_longer_than_the_idle_timeout_is_not_cut() -> None:
    later = Unanswered()
    side = _Side(True, later)
    side.send(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    side.clock.advance(200)
    assert not side.transport.disconnecting
    later.requests[0].write(b"done")
    later.requests[0].finish()
    side.clock.advance(74.9)  # the idle time counts from the end of the answer
    assert not side.transport.disconnecting
    side.clock.advance(0.2)
    assert side.transport.disconnecting


@pytest.mark.parametrize("whole_head", [True, False])
def test_a_read_with_a_head_and_part_of_its_body_restarts_the_idle_time(whole_head: bool) -> None:
    side = _Side(whole_head)
    side.clock.advance(70)  # idle, 5 s before the keep-alive timeout
    side.send(b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\n\r\nab")
    side.clock.advance(74.9)  # the idle time counts from that read
    assert not side.transport.disconnecting
    side.send(b"cd")
    assert side.answer.seen[0][-1] == b"abcd"
    side.clock.advance(74.9)
    assert not side.transport.disconnecting
    side.clock.advance(0.2)
    assert side.transport.disconnecting


def test_a_closed_connection_leaves_no_timer() -> None:
    side = _Side(True)
    side.send(b"GET / HTTP/1.1\r\nHost: gw\r\n")  # a head deadline and the idle timer
    assert len(side.clock.getDelayedCalls()) == 2
    side.channel.connectionLost(Failure(ConnectionDone()))
    assert not side.clock.getDelayedCalls()


_LINES = [
    b"Host: gw",
    b"Content-Length: 0",
    b"Content-Length: 2",
    b"Content-Length: 2",
    b"Content-Length: x",
    b"Content-Length: -1",
    b"content-length:2",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: identity",
    b"Transfer-Encoding: gzip",
    b"Expect: 100-continue",
    b"Connection: close",
    b"X-Request-Id: abc",
    b"Authorization: Bearer v4.public.x",
    b"X-Empty:",
    b"X-Spaces: \t a b \t",
    b"X-High: \xe9\xff",
    b"X-Ctl: a\x01b",
    b"X-Nul: a\x00b",
    b"X-Cr: a\rb",
    b"X-Lf: a\nb",
    b" folded",
    b"\tfolded",
    b"Bad Name: v",
    b"Bad\x00Name: v",
    b": no name",
    b"no colon",
    b"X-Dup: 1",
    b"x-dup: 2",
]


@settings(max_examples=400, deadline=None)
@given(
    lead=st.sampled_from([b"", b"\r\n"]),
    method=st.sampled_from([b"GET", b"POST", b"HEAD", b"G@T", b"", b"get"]),
    target=st.sampled_from([b"/a?b=1", b"/x y", b"*", b"/\x7f", b"/\xb0", b"/\xb1", b""]),
    version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1"]),
    headers=st.lists(st.sampled_from(_LINES), max_size=6),
    end=st.sampled_from([b"\r\n", b"\n"]),
    body=st.sampled_from([b"", b"ok", b"2\r\nok\r\n0\r\n\r\n", b"zz\r\n"]),
    then=st.sampled_from([b"", b"GET /next HTTP/1.1\r\nHost: gw\r\n\r\n", b"GET /part"]),
    split=st.booleans(),
)
def test_any_request_gets_the_same_treatment_on_both_paths(
    lead: bytes,
    method: bytes,
    target: bytes,
    version: bytes,
    headers: list[bytes],
    end: bytes,
    body: bytes,
    then: bytes,
    split: bool,
) -> None:
    head = lead + b" ".join(filter(None, [method, target, version])) + b"\r\n"
    head += b"".join(line + end for line in headers) + b"\r\n"
    raw = head + body + then
    pieces = [raw[: len(head) + 1], raw[len(head) + 1 :]] if split else [raw]
    _both(*pieces)
    # And a plain request after it on the same connection, if it is still open.
    _both(*pieces, b"GET /after HTTP/1.1\r\n\r\n")


# ------------------------------------------------------------ connecting


def _tcp_server_transport(protocol: Any, reactor: MemoryReactorClock) -> Any:
    """A real loopback TCP connection, our side wrapped in Twisted's transport."""
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    ours, address = listener.accept()
    listener.close()
    ours.setblocking(False)
    transport = tcp.Server(ours, protocol, address, None, 1, reactor)  # type: ignore[arg-type]
    transport.peer_socket = peer  # type: ignore[attr-defined]  # kept open for the test
    return transport


@needs_fastpath
def test_connection_made_on_tcp_leaves_the_state_twisted_leaves() -> None:
    reactor = MemoryReactorClock()
    site = GatewaySite(Unanswered(), reactor, max_body_size=1024, keep_alive_timeout=75.0)
    ours = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    # Twisted's own channel, built the way its Site builds one (HTTP/1.1 only).
    plain = Site(Unanswered(), timeout=75.0, reactor=reactor)
    plain.protocol = http.HTTPChannel  # type: ignore[assignment]
    theirs = plain.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    channel: Any
    before = {}
    transport_state = []
    for channel in (ours, theirs):
        before[channel] = set(vars(channel))
        transport = _tcp_server_transport(channel, reactor)
        channel.makeConnection(transport)
        transport_state.append(
            {k: (v is channel) if k == "producer" else v for k, v in vars(transport).items()}
            | dict.fromkeys(("socket", "fileno", "protocol", "logstr", "repstr", "client"))
            | dict.fromkeys(("hostname", "peer_socket"))
        )
        sock = transport.socket
        assert channel.getPeer() == transport.getPeer()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert channel._networkProducer is transport
        assert transport.producer is channel and transport.streamingProducer
        transport.peer_socket.close()
        sock.close()
    assert transport_state[0] == transport_state[1]  # the producer registered alike
    assert isinstance(ours, GatewayChannel)
    assert ours._idle_call is not None and ours._idle_call.getTime() == 75.0
    assert ours._gateway_secure is False  # known without asking for ISSLTransport
    # Connecting set the same attributes, but for each one's own idle timer (and
    # ours's TLS answer): a Twisted whose connectionMade does more fails here.
    set_by_ours = set(vars(ours)) - before[ours] - {"_idle_call", "_gateway_secure", "_peer"}
    set_by_theirs = set(vars(theirs)) - before[theirs] - {"_TimeoutMixin__timeoutCall"}
    assert set_by_ours == set_by_theirs


def test_connection_made_on_another_transport_is_twisted_own() -> None:
    # Not a plain TCP transport (TLS, a test's): Twisted's connectionMade, with
    # its interface look-ups, decides.
    site = GatewaySite(Unanswered(), MemoryReactorClock(), max_body_size=1024)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    channel.makeConnection(transport)
    assert channel._networkProducer is transport
    assert transport.producer is channel


# ------------------------------------------------------------ building


def test_build_protocol_matches_twisted_site_chain() -> None:
    # GatewaySite.buildProtocol does Site's, HTTPFactory's and Factory's work
    # in one step: the channel must come out as theirs would.
    reactor = MemoryReactorClock()
    site = GatewaySite(Unanswered(), reactor, max_body_size=1024, keep_alive_timeout=42.0)
    ours = site.buildProtocol(None)
    theirs = Site.buildProtocol(site, IPv4Address("TCP", "127.0.0.1", 1))
    assert type(ours) is type(theirs) is GatewayChannel
    assert vars(ours) == vars(theirs)
    assert ours.timeOut == 42.0 and ours.site is site and ours.factory is site  # type: ignore[attr-defined]


@needs_fastpath
def test_request_set_up_matches_twisted_request() -> None:
    # GatewayRequest.__init__ sets what twisted.web's Request.__init__ chain
    # sets, with ``host`` looked up only when read: a Twisted whose Request
    # sets more fails here.
    site = GatewaySite(Unanswered(), MemoryReactorClock(), max_body_size=1024)
    channel = site.buildProtocol(None)
    channel.makeConnection(StringTransport())
    ours = site.requestFactory(channel)
    theirs = Request(channel)
    ours_vars, theirs_vars = vars(ours), vars(theirs)
    assert set(theirs_vars) - set(ours_vars) == {"host"}
    for name, value in theirs_vars.items():
        if name == "host":
            continue
        if isinstance(value, Headers):
            assert type(ours_vars[name]) is Headers
            assert list(ours_vars[name].getAllRawHeaders()) == list(value.getAllRawHeaders())
        else:
            assert ours_vars[name] == value, name
    assert "_gateway_host" not in ours_vars  # not asked for yet
    assert ours.host == theirs.host == channel.getHost()
    ours.setHost(b"10.0.0.1", 8443)
    theirs.setHost(b"10.0.0.1", 8443)
    assert ours.getHost() == theirs.getHost()


def test_request_content_file_is_twisteds_choice() -> None:
    site = GatewaySite(Unanswered(), MemoryReactorClock(), max_body_size=10**9)
    channel = site.buildProtocol(None)
    channel.makeConnection(StringTransport())
    for length in (None, 0, 99_999, 100_000):
        ours, theirs = site.requestFactory(channel), Request(channel)
        ours.gotLength(length)
        theirs.gotLength(length)
        assert ours.content is not None and theirs.content is not None
        assert type(ours.content) is type(theirs.content), length
        ours.content.close()
        theirs.content.close()


@settings(max_examples=60, deadline=None)
@given(
    pieces=st.lists(st.binary(max_size=40), max_size=6),
    method=st.sampled_from([b"GET", b"HEAD", b"POST"]),
    code=st.sampled_from([200, 204, 304, 404]),
    length=st.sampled_from([None, b"0", b"12"]),
    version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]),
    content_type=st.sampled_from([None, b"application/json", b"absent, no default"]),
    extra=st.sampled_from([None, "etag", "cookie", "last-modified"]),
)
def test_request_write_sends_what_twisted_sends(
    pieces: list[bytes],
    method: bytes,
    code: int,
    length: bytes | None,
    version: bytes,
    content_type: bytes | None,
    extra: str | None,
) -> None:
    # GatewayRequest.write takes a chunked body piece in one step: whatever
    # is written, the bytes on the wire are Twisted's Request.write's.
    sent = []
    for factory in ("ours", "theirs"):
        site = GatewaySite(Unanswered(), MemoryReactorClock(), max_body_size=1024)
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        request = site.requestFactory(channel) if factory == "ours" else Request(channel)
        channel.requests.append(request)
        request.method, request.clientproto = method, version
        request.setResponseCode(code)
        request.responseHeaders.setRawHeaders(b"date", [b"then"])
        if length is not None:
            request.responseHeaders.setRawHeaders(b"content-length", [length])
        if content_type == b"absent, no default":
            request.defaultContentType = None
        elif content_type is not None:
            request.responseHeaders.setRawHeaders(b"content-type", [content_type])
        if extra == "etag":
            request.setETag(b'"v1"')
        elif extra == "cookie":
            request.addCookie(b"k", b"v")
        elif extra == "last-modified":
            request.lastModified = 0
        for piece in pieces:
            request.write(piece)
        request.finish()
        sent.append((transport.value(), request.sentLength, request.finished))
    assert sent[0] == sent[1]


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"Cookie", b"a=1; b=2")],
        [(b"Expect", b"100-continue"), (b"Content-Length", b"4")],
        [(b"Expect", b"100-Continue")],
        [(b"Connection", b"close")],
        [(b"Cookie", b""), (b"Connection", b"keep-alive"), (b"Expect", b"nothing")],
    ],
)
@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"])
def test_all_headers_received_is_twisteds(
    headers: list[tuple[bytes, bytes]], version: bytes
) -> None:
    # GatewayChannel.allHeadersReceived reads the header table directly: the
    # request and channel come out as Twisted's own method leaves them.
    outcomes = []
    for method in (GatewayChannel.allHeadersReceived, http.HTTPChannel.allHeadersReceived):
        site = GatewaySite(Unanswered(), MemoryReactorClock(), max_body_size=1024)
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        request = site.requestFactory(channel)
        channel.requests.append(request)
        for name, value in headers:
            request.requestHeaders.addRawHeader(name, value)
        channel._version = version
        channel.length = 4 if any(n == b"Content-Length" for n, _ in headers) else None
        method(channel)
        outcomes.append(
            (
                transport.value(),
                channel.persistent,
                request.received_cookies,
                type(request.content),
                list(request.responseHeaders.getAllRawHeaders()),
            )
        )
    assert outcomes[0] == outcomes[1]


class _Paths(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[list[bytes], list[bytes]]] = []

    def render(self, request: Request) -> bytes:
        self.seen.append((list(request.prepath or []), list(request.postpath or [])))
        return b"ok"


@settings(max_examples=200, deadline=None)
@given(
    segments=st.lists(
        st.sampled_from([b"api", b"", b"a%2Fb", b"%7E", b"x%", b"%zz", b"chat", b"%25"]),
        min_size=1,
        max_size=5,
    )
)
def test_the_path_is_split_and_decoded_as_twisted_does(segments: list[bytes]) -> None:
    path = b"/" + b"/".join(segments)
    raw = b"GET " + path + b"?q=%41 HTTP/1.1\r\nHost: gw\r\n\r\n"
    seen = []
    for make in ("ours", "twisted"):
        answer = _Paths()
        site: Site
        if make == "ours":
            site = GatewaySite(answer, MemoryReactorClock(), max_body_size=1024)
        else:
            site = Site(answer, reactor=MemoryReactorClock())
        channel = site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 5555))
        assert channel is not None
        channel.makeConnection(StringTransport())
        channel.dataReceived(raw)
        seen.append(answer.seen)
    assert seen[0] == seen[1] and len(seen[0]) == 1


_NEXT = b"GET /next HTTP/1.1\r\nHost: gw\r\n\r\n"


@needs_fastpath
@pytest.mark.parametrize(
    "raw",
    [
        b"POST /a HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\nok",
        b"POST /a HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\nok" + _NEXT,
        b"POST /a HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\nok" + _NEXT + b"GET /part",
        b"POST /a HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n" + _NEXT,
        b"GET /a HTTP/1.1\r\nHost: gw\r\n\r\n" + _NEXT,
        b"POST /a HTTP/1.0\r\nContent-Length: 2\r\n\r\nok" + _NEXT,
        b"POST /a HTTP/1.1\r\nHost: gw\r\nContent-Length: 2000\r\n\r\n"
        + b"x" * 2000
        + _NEXT,  # over the cap
        b"POST /a HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok" + _NEXT,
    ],
)
@pytest.mark.parametrize("answered", [True, False])
def test_a_body_that_comes_with_its_head_is_taken_as_twisted_takes_it(
    raw: bytes, answered: bool
) -> None:
    """The whole-head path hands a Content-Length body that arrived with its
    head straight to the request: the same request bodies, the same answers,
    and a pipelined request after it kept for its turn (also while the first
    is still being answered)."""
    sides = [_Side(whole_head, None if answered else Unanswered()) for whole_head in (True, False)]
    outcomes = []
    for side in sides:
        outcome = side.send(raw)
        if not answered:
            pending = side.answer.requests
            bodies = []
            while pending:
                request = pending.pop(0)
                too_large = getattr(request, "body_too_large", False)
                bodies.append((request.uri, None if too_large else request.content.read()))
                request.write(b"later")
                request.finish()
            outcome = (*outcome[1:], bodies, _VARYING.sub(b"", side.transport.value()))
        outcomes.append(outcome)
    assert outcomes[0] == outcomes[1]
    # The first head (and the body with it) took the whole-head path.
    assert sides[0].lines < sides[1].lines


@pytest.mark.parametrize("whole_head", [True, False])
@pytest.mark.parametrize(
    "raw",
    [
        b"POST /a HTTP/1.1\r\nHost: gw\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000,
        b"POST /a HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"7d0\r\n"
        + b"x" * 2000
        + b"\r\n0\r\n\r\n",
    ],
)
def test_a_body_over_the_sites_cap_is_answered_413(raw: bytes, whole_head: bool) -> None:
    """Over the largest runner limit the body is not kept, and the tree answers
    413 (Twisted's requestReceived asks the discarding content file its size).
    The head check passes here (as for a route the token may use), so a
    chunked body's size is found while it is read."""
    from runner_gateway.tree import CorsPolicy, GatewayRoot

    class _Passing(GatewayRoot):
        def check_head(self, *args: Any) -> bool:
            return False

    side = _Side(whole_head, _Passing([], CorsPolicy(()), list))
    side.send(raw)
    assert side.transport.value().startswith(b"HTTP/1.1 413 ")


def _finishing_request() -> tuple[Any, StringTransport]:
    site = GatewaySite(Unanswered(), MemoryReactorClock(), max_body_size=1024)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\n")
    (request,) = site.resource.requests
    return request, transport


@pytest.mark.parametrize("ending", ["finish", "lost"])
def test_on_finish_fires_as_a_notify_finish_deferred(ending: str) -> None:
    """on_finish's hooks and notifyFinish's Deferreds, side by side on one
    request, hear the same ending, in the order they were added; a hook that
    raises is logged and the others still hear it."""
    from twisted.logger import globalLogPublisher

    from runner_gateway.edge.site import on_finish

    request, _ = _finishing_request()
    heard: list[tuple[str, Any]] = []

    def note(name: str) -> Any:
        return lambda result: heard.append((name, type(result)))

    def broken(result: object) -> None:
        raise RuntimeError("a buggy hook")

    on_finish(request, done=note("hook"), lost=note("hook"))
    request.notifyFinish().addBoth(note("deferred"))
    on_finish(request, done=broken, lost=broken)
    on_finish(request, lost=note("lost only"))
    on_finish(request, done=note("done only"))
    logged: list[dict[str, Any]] = []
    observer = cast(ILogObserver, logged.append)
    globalLogPublisher.addObserver(observer)
    expected: list[tuple[str, type]]
    try:
        if ending == "finish":
            request.write(b"ok")
            request.finish()
            expected = [("hook", type(None)), ("deferred", type(None)), ("done only", type(None))]
        else:
            request.connectionLost(Failure(ConnectionDone()))
            expected = [("hook", Failure), ("deferred", Failure), ("lost only", Failure)]
    finally:
        globalLogPublisher.removeObserver(observer)
    assert heard == expected
    assert [
        "a buggy hook" in str(e["log_failure"].value) for e in logged if "log_failure" in e
    ] == [True]


def test_on_finish_on_a_request_double_uses_its_deferred() -> None:
    from twisted.internet.defer import Deferred

    from runner_gateway.edge.site import on_finish

    class Double:
        def __init__(self) -> None:
            self.finished: Deferred[None] = Deferred()

        def notifyFinish(self) -> Deferred[None]:
            return self.finished

    heard: list[Any] = []
    double = Double()
    on_finish(double, done=heard.append, lost=heard.append)  # type: ignore[arg-type]
    double.finished.callback(None)
    assert heard == [None]


@needs_fastpath
def test_a_body_is_not_taken_once_the_connection_is_closing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If the connection starts closing while the head is taken, the body that
    came with it is left alone, as Twisted's line parser leaves it."""
    from runner_gateway.edge.site import GatewayRequest

    got_length = GatewayRequest.gotLength

    def closing(self: GatewayRequest, length: int | None) -> None:
        transport = self.channel.transport
        assert transport is not None
        transport.loseConnection()
        got_length(self, length)

    monkeypatch.setattr(GatewayRequest, "gotLength", closing)
    (seen, _, closing_now, _), fast = _both(
        b"POST /a HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\nok"
    )
    assert seen == [] and closing_now and fast.lines == 0


@needs_fastpath
@pytest.mark.parametrize(
    "raw",
    [
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n",
        b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /a HTTP/1.0\r\n\r\n",
    ],
)
def test_request_done_leaves_the_state_twisteds_leaves_without_its_resume(
    monkeypatch: pytest.MonkeyPatch, raw: bytes
) -> None:
    """On an epoll reactor, with the connection's descriptor registered for
    reading, GatewayChannel.requestDone skips Twisted's resumeProducing (it
    would find the descriptor registered and do nothing) and leaves the
    channel, the reactor and the bytes sent as Twisted's requestDone does."""
    from twisted.internet.epollreactor import EPollReactor

    import runner_gateway.edge.site as site_module

    resumes: list[object] = []
    resume = tcp.Server.resumeProducing

    def counted(self: tcp.Server) -> None:
        resumes.append(self)
        resume(self)

    monkeypatch.setattr(tcp.Server, "resumeProducing", counted)
    seen: dict[str, Any] = {}
    for path in ("ours", "twisted"):
        if path == "twisted":
            monkeypatch.setattr(site_module, "_EPOLL_REACTOR", None)  # Twisted's requestDone
        del resumes[:]
        reactor: Any = EPollReactor()
        answer = _Record()
        site = GatewaySite(answer, reactor, max_body_size=1024, keep_alive_timeout=75.0)
        channel: Any = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = _tcp_server_transport(channel, reactor)
        transport.startReading()
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        peer = transport.peer_socket
        peer.setblocking(False)
        sent = b""
        for _ in range(500):  # until the answers are out (queued ones go on the reactor's turn)
            if sent.count(b"\r\n\r\nok") >= len(answer.seen):
                break
            reactor.doIteration(0.01)
            with contextlib.suppress(BlockingIOError):
                sent += peer.recv(65536)
        idle = channel._idle_call
        seen[path] = {
            "sent": _VARYING.sub(b"", sent),
            "requests": answer.seen,
            "reading": transport.fileno() in reactor._reads,
            "disconnecting": transport.disconnecting,
            "idle_in": round(idle.getTime() - reactor.seconds())
            if idle is not None and idle.active()
            else None,
            "state": {
                k: getattr(channel, k)
                for k in (
                    "line_mode",
                    "_handlingRequest",
                    "_dataBuffer",
                    "_buffer",
                    "persistent",
                    "timeOut",
                    "_savedTimeOut",
                    "_waitingForTransport",
                )
            },
            "pending": len(channel.requests),
            "resumes": len(resumes),
        }
        if not transport.disconnected:  # else closed on the reactor's turn (Connection: close)
            transport.socket.close()
        peer.close()
    ours, theirs = seen["ours"], seen["twisted"]
    assert theirs["resumes"] >= 1
    assert ours["resumes"] == 0
    assert {**ours, "resumes": None} == {**theirs, "resumes": None}
