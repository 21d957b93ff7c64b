"""write_now (fastpath ``send-now``) and GatewayChannel's hold/release.

write_now is driven over real connected sockets (a socketpair) wrapped in
Twisted's own TCP transport on a MemoryReactor, so what reaches the peer and
what stays queued for the reactor are both visible.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web import resource
from twisted.web.server import Request

from runner_gateway.context import RequestContext
from runner_gateway.edge import fastpath
from runner_gateway.edge.fastpath import write_now
from runner_gateway.edge.site import GatewayChannel, GatewaySite, new_request_id
from runner_gateway.forwarding import parse_trusted_proxies
from tests.helpers_site import Unanswered, needs_fastpath

pytestmark = needs_fastpath  # the send-now and hold fixes, installed by the fixture below


@pytest.fixture(autouse=True)
def _installed() -> None:
    fastpath.install({})


class Pair:
    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        ours, self.peer = socket.socketpair()
        ours.setblocking(False)
        self.peer.settimeout(0)
        self.transport = tcp.Server(ours, Protocol(), ("127.0.0.1", 1), None, 1, self.reactor)  # type: ignore[arg-type]

    def received(self) -> bytes:
        out = b""
        while True:
            try:
                data = self.peer.recv(1 << 20)
            except BlockingIOError:
                return out
            if not data:
                return out
            out += data

    def queued(self) -> int:
        return len(self.transport.dataBuffer) + self.transport._tempDataLen

    def writing(self) -> bool:
        return self.transport in self.reactor.getWriters()

    def close(self) -> None:
        self.transport.socket.close()
        self.peer.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


def test_idle_tcp_transport_sends_at_once(pair: Pair) -> None:
    write_now(pair.transport, b"HTTP/1.1 200 OK\r\n\r\n")
    assert pair.received() == b"HTTP/1.1 200 OK\r\n\r\n"
    assert pair.queued() == 0 and not pair.writing()  # no reactor turn, no epoll change


def test_queued_bytes_keep_their_order(pair: Pair) -> None:
    pair.transport.write(b"first ")
    write_now(pair.transport, b"second")
    assert pair.received() == b""  # both wait for the reactor, in order
    assert pair.writing()
    pair.transport.doWrite()
    assert pair.received() == b"first second"


def test_what_the_kernel_does_not_take_is_queued(pair: Pair) -> None:
    pair.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = bytes(range(256)) * 4096  # 1 MiB: more than the socket buffers hold
    write_now(pair.transport, payload)
    assert 0 < pair.queued() < len(payload)
    assert pair.writing()
    got = pair.received()
    while pair.queued():
        pair.transport.doWrite()
        got += pair.received()
    assert got == payload


@pytest.mark.parametrize("case", ["tls", "disconnecting", "not-installed"])
def test_other_states_use_transport_write(pair: Pair, case: str, monkeypatch: Any) -> None:
    if case == "tls":
        monkeypatch.setattr(pair.transport, "TLS", True)  # bytes must go through TLS
    elif case == "disconnecting":
        pair.transport.disconnecting = True
    else:
        monkeypatch.setattr(fastpath, "_TCP_TRANSPORTS", ())
    written: list[bytes] = []
    monkeypatch.setattr(pair.transport, "write", written.append)
    write_now(pair.transport, b"data")
    assert written == [b"data"]
    assert pair.received() == b""


def test_non_tcp_transport_is_written_normally() -> None:
    transport = StringTransport()
    write_now(transport, b"abc")
    assert transport.value() == b"abc"


# ---------------------------------------------------------------- GatewayChannel


class _Seen:
    """An observer that records what the client had received when the request ended."""

    def __init__(self, transport: StringTransport) -> None:
        self.transport = transport
        self.at_end: list[bytes] = []

    def response_started(self, ctx: RequestContext) -> None:
        pass

    def request_finished(self, ctx: RequestContext) -> None:
        self.at_end.append(self.transport.value())


def _channel() -> tuple[GatewayChannel, StringTransport, Unanswered, _Seen]:
    answer = Unanswered()
    site = GatewaySite(answer, MemoryReactorClock(), max_body_size=1024)
    channel = site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 5555))
    assert isinstance(channel, GatewayChannel)
    transport = StringTransport()
    channel.makeConnection(transport)
    seen = _Seen(transport)
    site.observers.append(seen)
    channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\n")
    return channel, transport, answer, seen


def test_held_response_goes_out_in_one_write_before_the_access_log() -> None:
    channel, transport, answer, seen = _channel()
    request = answer.requests[0]
    writes: list[bytes] = []
    original = transport.write

    def write(data: bytes) -> None:
        writes.append(data)
        original(data)

    transport.write = write  # type: ignore[method-assign]
    channel.hold()
    request.setHeader(b"content-type", b"text/plain")
    request.write(b"hello ")
    request.write(b"world")
    assert transport.value() == b""  # held
    request.finish()
    # finish() released the held bytes before the observers (and the access log) ran.
    assert len(writes) == 1
    assert seen.at_end == [transport.value()]
    response = transport.value()
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\ncontent-type: text/plain\r\n".lower() in response.lower()
    assert response.endswith(b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n")
    channel.release()  # nothing left: a second release writes nothing
    assert len(writes) == 1


def test_unheld_channel_writes_as_twisted_does() -> None:
    _, transport, answer, _ = _channel()
    request = answer.requests[0]
    request.write(b"x")
    assert transport.value().endswith(b"1\r\nx\r\n")


def test_close_sends_what_is_held_first() -> None:
    channel, transport, answer, _ = _channel()
    request = answer.requests[0]
    channel.hold()
    request.write(b"last words")
    channel.loseConnection()
    assert transport.value().endswith(b"a\r\nlast words\r\n")
    assert transport.disconnecting


def test_channel_asks_the_transport_for_its_addresses_once() -> None:
    class Done(resource.Resource):
        isLeaf = True

        def render(self, request: Request) -> bytes:
            hosts.append(request.getHost())
            peers.append(request.getClientAddress())
            return b"ok"

    hosts: list[object] = []
    peers: list[object] = []
    site = GatewaySite(Done(), MemoryReactorClock(), max_body_size=1024)
    channel = site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 5555))
    peer = IPv4Address("TCP", "192.0.2.7", 5555)
    transport = StringTransport(peerAddress=peer)
    asked: list[str] = []
    host, original_peer = transport.getHost, transport.getPeer

    def get_host() -> object:
        asked.append("host")
        return host()

    def get_peer() -> object:
        asked.append("peer")
        return original_peer()

    transport.getHost = get_host  # type: ignore[method-assign]
    transport.getPeer = get_peer  # type: ignore[method-assign]
    channel.makeConnection(transport)
    asked.clear()  # what connecting asked is Twisted's business
    for path in (b"/a", b"/b", b"/c"):
        channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert len(hosts) == 3 and all(h == host() for h in hosts)
    assert peers == [peer] * 3
    assert sorted(asked) == ["host", "peer"]


def test_request_ids_are_unique_uuids_and_differ_per_process() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    # Version-4 UUIDs as text (llama-cpp-python's server refuses anything else).
    assert all(str(uuid.UUID(i)) == i and uuid.UUID(i).version == 4 for i in ids)
    assert all(uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker: its own prefix
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert child[:18] != new_request_id()[:18]


def test_answers_the_gateway_writes_itself_carry_its_headers() -> None:
    class Sync(resource.Resource):
        isLeaf = True

        def render(self, request: Request) -> bytes:
            return b"{}"

    site = GatewaySite(Sync(), MemoryReactorClock(), max_body_size=1024)
    channel = site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 5555))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: gw\r\nX-Request-Id: abc-1\r\n\r\n")
    head = transport.value().split(b"\r\n\r\n", 1)[0].lower()
    assert b"\r\nserver: runner-gateway\r\n" in head
    assert b"twisted" not in head
    # The gateway's own id: the peer is not a trusted proxy.
    given = re.search(rb"\r\nx-request-id: ([^\r]*)\r\n", head)
    assert given is not None and uuid.UUID(given.group(1).decode()).version == 4
    # From a trusted proxy, its id is kept.
    site.trusted_proxies = parse_trusted_proxies([channel.getPeer().host])
    transport.clear()
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: gw\r\nX-Request-Id: abc-1\r\n\r\n")
    assert b"\r\nx-request-id: abc-1\r\n" in transport.value().lower()
