"""The head check and the lingering close, with a clock (GatewayChannel):
a request refused on its head is answered before its body, nothing of the
body is kept, and the connection is closed after a bounded lingering read."""

from __future__ import annotations

import socket
import struct
import sys
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web import resource
from twisted.web.server import Request

from runner_gateway.edge.site import LINGER_IDLE, LINGER_TOTAL, GatewayChannel, GatewaySite
from tests.helpers_site import needs_fastpath

_HEAD = b"POST /x HTTP/1.1\r\nHost: gw\r\nContent-Length: 10000000\r\n"


class _Refusing(resource.Resource):
    """A root whose head check refuses everything (as GatewayRoot's for a
    request without a token) and that records what it rendered."""

    isLeaf = True

    def __init__(self, refuse: bool = True) -> None:
        super().__init__()
        self.refuse = refuse
        self.rendered: list[tuple[int, bytes]] = []

    def check_head(self, method: bytes, uri: bytes, raw: Any, ctx: Any) -> bool:
        return self.refuse

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        self.rendered.append((len(request.content.read()), request.method))
        request.setResponseCode(401 if self.refuse else 200)
        return b"no"


def _channel(root: _Refusing, whole_head: bool) -> tuple[GatewayChannel, StringTransport, Any]:
    clock = MemoryReactorClock()
    site = GatewaySite(root, clock, max_body_size=100 * 1024 * 1024)
    channel = site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 5555))
    assert isinstance(channel, GatewayChannel)
    channel.whole_head = whole_head
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport, clock


@pytest.mark.parametrize("whole_head", [True, False])
@pytest.mark.parametrize("expect", [b"", b"Expect: 100-continue\r\n"])
def test_refused_on_the_head_is_answered_before_the_body(whole_head: bool, expect: bytes) -> None:
    root = _Refusing()
    channel, transport, clock = _channel(root, whole_head)
    channel.dataReceived(_HEAD + expect + b"\r\n" + b"a" * 5000)
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 401 ")  # no 100 Continue before it
    assert b"\r\nConnection: close\r\n" in answer
    assert root.rendered == [(0, b"POST")]  # rendered with nothing of the body kept
    assert not transport.disconnecting  # lingering: still reading
    for _ in range(6):  # the client keeps sending (24 s): read and dropped
        clock.advance(LINGER_IDLE - 1)
        channel.dataReceived(b"b" * 65536)
    assert transport.value() == answer
    assert not transport.disconnecting
    clock.advance(LINGER_TOTAL)  # but not for longer than the total
    assert transport.disconnecting


@pytest.mark.parametrize("whole_head", [True, False])
def test_a_lingering_connection_closes_once_the_client_is_quiet(whole_head: bool) -> None:
    channel, transport, clock = _channel(_Refusing(), whole_head)
    channel.dataReceived(_HEAD + b"\r\n")
    assert transport.value().startswith(b"HTTP/1.1 401 ")
    clock.advance(LINGER_IDLE - 0.1)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


@pytest.mark.parametrize("whole_head", [True, False])
def test_a_request_that_passes_gets_100_continue_and_its_body(whole_head: bool) -> None:
    root = _Refusing(refuse=False)
    channel, transport, _ = _channel(root, whole_head)
    channel.dataReceived(
        b"POST /x HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    )
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    channel.dataReceived(b"abc")
    assert root.rendered == [(3, b"POST")]
    assert b"HTTP/1.1 200 " in transport.value()


@pytest.mark.parametrize("whole_head", [True, False])
def test_a_refused_request_without_a_body_keeps_the_connection(whole_head: bool) -> None:
    root = _Refusing()
    channel, transport, _ = _channel(root, whole_head)
    channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\nGET /x HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert transport.value().count(b"HTTP/1.1 401 ") == 2
    assert b"Connection: close" not in transport.value()


# ------------------------------------------------------ server.bodyMinRate


def _rated(whole_head: bool) -> tuple[GatewayChannel, StringTransport, Any, _Refusing]:
    root = _Refusing(refuse=False)
    clock = MemoryReactorClock()
    site = GatewaySite(
        root, clock, max_body_size=100 * 1024 * 1024, body_min_rate=1024, body_min_rate_grace=30
    )
    channel = site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 5555))
    assert isinstance(channel, GatewayChannel)
    channel.whole_head = whole_head
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"POST /v1/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000000\r\n\r\n")
    return channel, transport, clock, root


@pytest.mark.parametrize("whole_head", [True, False])
def test_a_stalled_body_gets_408_after_the_grace(whole_head: bool) -> None:
    channel, transport, clock, root = _rated(whole_head)
    channel.dataReceived(b"x" * 2048)  # earns two seconds
    clock.advance(31.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.value().startswith(b"HTTP/1.1 408 Request Time-out\r\n")
    assert transport.value().endswith(b'{"error": "the request body came too slowly"}\n')
    assert transport.disconnecting
    assert root.rendered == []  # the request never went on
    assert channel.site.rejected == {408: 1}  # counted for the metrics (no request to log)


@pytest.mark.parametrize("whole_head", [True, False])
def test_a_body_at_half_the_rate_is_cut_after_twice_the_grace(whole_head: bool) -> None:
    channel, transport, clock, _ = _rated(whole_head)
    for _ in range(58):
        clock.advance(1)
        channel.dataReceived(b"x" * 512)
    assert not transport.disconnecting
    clock.advance(1.1)
    assert transport.value().startswith(b"HTTP/1.1 408 ")


@pytest.mark.parametrize("whole_head", [True, False])
def test_a_body_at_the_rate_is_never_cut(whole_head: bool) -> None:
    channel, transport, clock, root = _rated(whole_head)
    for _ in range(200):
        clock.advance(1)
        channel.dataReceived(b"x" * 1024)
    assert not transport.disconnecting
    channel.dataReceived(b"x" * (1000000 - 200 * 1024))
    assert root.rendered == [(1000000, b"POST")]
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    clock.advance(60)  # the check's timer finds no body coming: nothing happens
    assert not transport.disconnecting


@pytest.mark.parametrize("whole_head", [True, False])
def test_a_refused_body_that_came_with_its_head_is_dropped_and_the_connection_kept(
    whole_head: bool,
) -> None:
    root = _Refusing()
    channel, transport, _ = _channel(root, whole_head)
    channel.dataReceived(
        b"POST /x HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nGET /"
        b"GET /y HTTP/1.1\r\nHost: gw\r\n\r\n"
    )
    answer = transport.value()
    assert answer.count(b"HTTP/1.1 401 ") == 2  # the body was not read as a request
    assert b"Connection: close" not in answer and not transport.disconnecting
    assert root.rendered == [(0, b"POST"), (0, b"GET")]


# ------------------------------------------- how many linger at once (a flood)


@pytest.mark.parametrize("whole_head", [True, False])
def test_past_linger_max_a_refused_upload_is_closed_without_lingering(whole_head: bool) -> None:
    """A flood of refused uploads: past site.linger_max lingering at once, the
    answer is sent and the connection closed, so draining cannot grow without
    bound; the count is kept for the metrics and freed as lingering ends."""
    root = _Refusing()
    clock = MemoryReactorClock()
    site = GatewaySite(root, clock, max_body_size=100 * 1024 * 1024)
    site.linger_max = 1
    transports = []
    for port in (5555, 5556):
        channel = site.buildProtocol(IPv4Address("TCP", "192.0.2.7", port))
        assert isinstance(channel, GatewayChannel)
        channel.whole_head = whole_head
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(_HEAD + b"\r\n" + b"a" * 100)
        assert transport.value().startswith(b"HTTP/1.1 401 ")
        transports.append((channel, transport))
    (first, first_transport), (_, second_transport) = transports
    assert not first_transport.disconnecting  # lingering
    assert second_transport.disconnecting  # answered, then closed
    assert (site.lingering, site.linger_shed) == (1, 1)
    clock.advance(LINGER_IDLE + 0.1)
    assert first_transport.disconnecting
    first.connectionLost()
    assert site.lingering == 0


@needs_fastpath
def test_the_drain_drops_what_it_reads_in_the_kernel() -> None:
    """The "linger-drain" fix over a real loopback connection: what the
    client sends is consumed without being copied out (the buffer recv is
    given stays untouched), each read with data keeps the lingering close
    alive, and the client's close and reset read as Twisted's doRead says."""
    from twisted.internet import main

    from runner_gateway.edge import fastpath, site

    if not sys.platform.startswith("linux"):
        pytest.skip("MSG_TRUNC drops TCP data on Linux only; elsewhere the fix stays off")
    fastpath.install({})
    assert "linger-drain" in fastpath.installed(), fastpath.states()

    class _Channel:
        reads = 0

        def _linger_read(self, data: bytes) -> None:
            self.reads += 1

    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        with client, server:
            server.setblocking(False)
            channel = _Channel()
            drain = site._Drain(channel, server)  # type: ignore[arg-type]
            assert drain() is None and channel.reads == 0  # nothing yet
            client.sendall(b"x" * (256 * 1024))
            while True:  # the kernel keeps up to a window; drained in turns
                assert drain() is None
                try:
                    server.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
            assert channel.reads >= 1
            assert not any(site._DRAIN_BUFFER)  # nothing was copied into it
            client.shutdown(socket.SHUT_WR)
            assert _until_not_none(drain) is main.CONNECTION_DONE
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        with server:
            server.setblocking(False)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # a reset
            assert _until_not_none(site._Drain(_Channel(), server)) is main.CONNECTION_LOST  # type: ignore[arg-type]


def _until_not_none(drain: Any) -> Any:
    """The drain's result once the kernel has what the peer sent (loopback:
    a moment; select says when)."""
    import select

    select.select([drain.socket], [], [], 5)
    return drain()
