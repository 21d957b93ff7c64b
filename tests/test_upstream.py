"""Tests for runner_gateway/upstream.py: the proxy's HTTP/1.1 client and its pool.

In memory: a connection on a StringTransport, the pool on a MemoryReactorClock.
The idle-close check reads a real socket, so that test uses a socketpair.
"""

from __future__ import annotations

import io
import socket
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from runner_gateway.proxy import classify
from runner_gateway.upstream import (
    CHUNK,
    UpstreamClient,
    UpstreamPool,
    UpstreamProtocolError,
    _Connection,
    request_head,
)

KEY = ("http", "127.0.0.1", 80, None)


class Handler:
    def __init__(self) -> None:
        self.head: tuple[int, bytes, list[tuple[bytes, bytes]], int | None] | None = None
        self.body: list[bytes] = []
        self.ended: list[Failure | None] = []
        self.failed: list[Failure] = []
        self.calls: list[str] = []

    def hold(self) -> None:
        self.calls.append("hold")

    def release(self) -> None:
        self.calls.append("release")

    def response_head(
        self,
        code: int,
        phrase: bytes,
        headers: list[tuple[bytes, bytes]],
        length: int | None,
        dropped: int,
    ) -> None:
        self.head = (code, phrase, headers, length)
        self.dropped = dropped
        self.calls.append("head")

    def response_body(self, data: bytes) -> None:
        assert self.head is not None and not self.ended
        self.body.append(data)
        self.calls.append("body")

    def response_end(self, reason: Failure | None) -> None:
        assert self.head is not None and not self.ended
        self.ended.append(reason)
        self.calls.append("end")

    def request_failed(self, reason: Failure) -> None:
        assert self.head is None and not self.failed
        self.failed.append(reason)


def _connection(
    pool: UpstreamPool | None = None,
) -> tuple[_Connection, StringTransport, UpstreamPool]:
    pool = pool or UpstreamPool(MemoryReactorClock())
    connection = _Connection(pool, KEY)
    transport = StringTransport()
    transport.protocol = connection  # type: ignore[attr-defined]
    connection.makeConnection(transport)
    return connection, transport, pool


def _exchange(
    pieces: list[bytes], method_head: bool = False
) -> tuple[Handler, StringTransport, UpstreamPool]:
    connection, transport, pool = _connection()
    handler = Handler()
    connection.send(b"GET / HTTP/1.1\r\n\r\n", None, 0, method_head, handler)
    for piece in pieces:
        connection.dataReceived(piece)
    return handler, transport, pool


def _splits(raw: bytes) -> list[list[bytes]]:
    out = [[raw[:i], raw[i:]] for i in range(1, len(raw))]
    out.append([raw[i : i + 1] for i in range(len(raw))])
    return out


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
    b'8\r\n{"a":1}\n\r\n'
    b"A;ext=1\r\n0123456789\r\n"
    b"0\r\nX-Trailer: yes\r\n\r\n"
)


def test_chunked_split_at_every_byte_boundary() -> None:
    for pieces in _splits(CHUNKED):
        handler, transport, pool = _exchange(pieces)
        assert handler.head is not None
        code, phrase, headers, length = handler.head
        assert (code, phrase, length) == (200, b"OK", None)
        assert (b"Content-Type", b"application/x-ndjson") in headers
        assert b"".join(handler.body) == b'{"a":1}\n0123456789'
        assert handler.ended == [None]
        assert pool.idle_count(KEY) == 1 and not transport.disconnecting


def test_each_read_is_bracketed_by_hold_and_release() -> None:
    """The proxy sends what one read from the runner produced in one piece."""
    cut = CHUNKED.index(b"A;ext")
    handler, _, _ = _exchange([CHUNKED[:cut], CHUNKED[cut:]])
    assert handler.calls == ["hold", "head", "body", "release", "hold", "body", "end", "release"]


def test_chunks_are_delivered_as_they_arrive() -> None:
    connection, _, _ = _connection()
    handler = Handler()
    connection.send(b"GET / HTTP/1.1\r\n\r\n", None, 0, False, handler)
    connection.dataReceived(CHUNKED[: CHUNKED.index(b"8\r\n")])
    assert handler.head is not None and handler.body == []
    connection.dataReceived(b'8\r\n{"a"')
    assert handler.body == [b'{"a"']  # a partial chunk is passed on at once
    connection.dataReceived(b":1}\n\r\n")
    assert b"".join(handler.body) == b'{"a":1}\n' and not handler.ended


def test_content_length_split_at_every_byte_boundary() -> None:
    raw = b"HTTP/1.1 201 Created\r\nContent-Length: 10\r\nServer: x\r\n\r\n0123456789"
    for pieces in _splits(raw):
        handler, transport, pool = _exchange(pieces)
        assert handler.head is not None and handler.head[0] == 201 and handler.head[3] == 10
        assert b"".join(handler.body) == b"0123456789"
        assert handler.ended == [None]
        assert pool.idle_count(KEY) == 1 and not transport.disconnecting


def test_bytes_after_the_response_make_the_connection_unusable() -> None:
    handler, transport, pool = _exchange([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA"])
    assert b"".join(handler.body) == b"ok" and handler.ended == [None]
    assert pool.idle_count(KEY) == 0 and transport.disconnecting


def test_read_until_close() -> None:
    handler, transport, pool = _exchange([b"HTTP/1.1 200 OK\r\n\r\nabc", b"def"])
    assert handler.head is not None and handler.head[3] is None
    assert b"".join(handler.body) == b"abcdef" and not handler.ended
    # The clean close is the end of the body; the connection is not pooled.
    transport.protocol.connectionLost(Failure(ConnectionDone()))  # type: ignore[attr-defined]
    assert handler.ended == [None] and pool.idle_count(KEY) == 0
    # A reset is not a complete body.
    handler, transport, pool = _exchange([b"HTTP/1.0 200 OK\r\n\r\nabc"])
    transport.protocol.connectionLost(Failure(ConnectionLost()))  # type: ignore[attr-defined]
    assert len(handler.ended) == 1 and handler.ended[0] is not None


def test_early_close_of_a_framed_body_is_an_error() -> None:
    for raw in (
        b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
    ):
        connection, _, _ = _connection()
        handler = Handler()
        connection.send(b"GET / HTTP/1.1\r\n\r\n", None, 0, False, handler)
        connection.dataReceived(raw)
        connection.connectionLost(Failure(ConnectionDone()))
        assert len(handler.ended) == 1 and handler.ended[0] is not None
        assert handler.ended[0].check(ConnectionDone)


def test_head_and_no_body_codes_have_no_body() -> None:
    handler, _, pool = _exchange(
        [b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n"], method_head=True
    )
    assert handler.head is not None and handler.head[3] == 17
    assert handler.body == [] and handler.ended == [None] and pool.idle_count(KEY) == 1
    handler, _, pool = _exchange([b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"])
    assert handler.body == [] and handler.ended == [None] and pool.idle_count(KEY) == 1


def test_100_continue_is_skipped() -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    for pieces in _splits(raw):
        handler, _, _ = _exchange(pieces)
        assert handler.head is not None and handler.head[0] == 200
        assert b"".join(handler.body) == b"ok" and handler.ended == [None]


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * 70000,
    ],
)
def test_bad_responses_are_protocol_errors(raw: bytes) -> None:
    connection, transport, pool = _connection()
    handler = Handler()
    connection.send(b"GET / HTTP/1.1\r\n\r\n", None, 0, False, handler)
    connection.dataReceived(raw)
    assert len(handler.failed) == 1 and handler.failed[0].check(UpstreamProtocolError)
    assert classify(handler.failed[0])[:2] == ("protocol", 502)
    assert transport.disconnected and pool.idle_count(KEY) == 0


def _outcome(pieces: list[bytes]) -> tuple[Any, ...]:
    handler, transport, pool = _exchange(pieces)
    failure = handler.failed[0].value if handler.failed else None
    return (
        handler.head,
        getattr(handler, "dropped", None),
        b"".join(handler.body),
        [None if e is None else type(e.value) for e in handler.ended],
        (type(failure), str(failure)) if failure is not None else None,
        pool.idle_count(KEY),
        transport.disconnecting,
    )


_HEAD_LINES = st.sampled_from(
    [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.0 200 OK",
        b"HTTP/1.1 100 Continue",
        b"HTTP/1.1 204 No Content",
        b"HTTP/1.1 20 OK",
        b"Content-Length: 2",
        b"Content-Length: 2, 2",
        b"Content-Length: x",
        b"Transfer-Encoding: chunked",
        b"Connection: close",
        b"Connection: keep-alive",
        b"X-A: b\rc",
        b"X-N: a\x00b",
        b"X-V: a\x0bb\x7f",
        b"X-T: a\tb",
        b"Content-Length: 2\x0b",
        b"Connection: close\x00",
        b"X\x00Y: v",
        b" fold\x00ed",
        b" folded",
        b"\tfolded",
        b"bad name: v",
        b"X-B\t: v",
        b"X-C : v",
        b":empty name",
        b"no colon",
        b"Server:runner",
        b"",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(_HEAD_LINES, max_size=7),
    ends=st.lists(st.sampled_from([b"\r\n", b"\n", b"\r\r\n"]), min_size=8, max_size=8),
    body=st.sampled_from([b"ok", b"2\r\nok\r\n0\r\n\r\n", b"", b"okHTTP/1.1 200 OK\r\n\r\n"]),
)
def test_a_head_read_whole_or_byte_by_byte_gives_the_same_answer(
    lines: list[bytes], ends: list[bytes], body: bytes
) -> None:
    # A head that arrives in one read takes the one-split path; byte by byte it
    # goes line by line. Both must agree, for good heads and bad ones.
    head = [b"HTTP/1.1 200 OK", *lines]
    raw = b"".join(line + end for line, end in zip(head, ends, strict=False))
    raw += b"\r\n" + body
    whole = _outcome([raw])
    assert whole == _outcome([raw[i : i + 1] for i in range(len(raw))])
    assert whole == _outcome([raw[:-1], raw[-1:]]) or len(body) == 0


@pytest.mark.parametrize(
    "body", [b"zz\r\nab\r\n", b"2\r\nabXX", b"-2\r\nab\r\n", b"2\r\nab\r\n0x1\r\n"]
)
def test_bad_chunks_end_the_body_with_a_protocol_error(body: bytes) -> None:
    connection, transport, _ = _connection()
    handler = Handler()
    connection.send(b"GET / HTTP/1.1\r\n\r\n", None, 0, False, handler)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert len(handler.ended) == 1 and handler.ended[0] is not None
    assert handler.ended[0].check(UpstreamProtocolError) and transport.disconnected


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n",
    ],
)
def test_connections_that_must_not_be_reused(raw: bytes) -> None:
    handler, transport, pool = _exchange([raw])
    assert b"".join(handler.body) == b"ok" and handler.ended == [None]
    assert pool.idle_count(KEY) == 0 and transport.disconnecting


def test_request_head_framing() -> None:
    head = request_head(b"POST", b"/api/chat?x=1", [(b"Host", b"h:1"), (b"X-A", b"1")], 2)
    assert (
        head == b"POST /api/chat?x=1 HTTP/1.1\r\nContent-Length: 2\r\nHost: h:1\r\nX-A: 1\r\n\r\n"
    )
    assert b"Content-Length: 0\r\n" in request_head(b"POST", b"/", [], 0)
    assert b"Content-Length" not in request_head(b"GET", b"/", [], 0)
    with pytest.raises(ValueError):
        request_head(b"GET", b"/a b", [], 0)


class _PausingTransport(StringTransport):
    """Pauses its streaming producer after every write, as a full socket buffer would."""

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and self.streaming:
            self.producer.pauseProducing()


def test_request_body_follows_flow_control_in_64k_pieces() -> None:
    pool = UpstreamPool(MemoryReactorClock())
    connection = _Connection(pool, KEY)
    transport = _PausingTransport()
    connection.makeConnection(transport)
    body = bytes(range(256)) * (CHUNK * 3 // 256) + b"tail"
    head = request_head(b"POST", b"/", [], len(body))
    connection.send(head, io.BytesIO(body), len(body), False, Handler())
    assert transport.value() == head + body[:CHUNK]  # head and first piece in one write
    writer = transport.producer
    assert writer is not None
    for n in (2, 3):
        writer.resumeProducing()
        assert transport.value() == head + body[: n * CHUNK]
    writer.resumeProducing()
    assert transport.value() == head + body
    assert transport.producer is None  # unregistered once the body is out


def _client(reactor: MemoryReactorClock, pool: UpstreamPool) -> UpstreamClient:
    return UpstreamClient(
        reactor, pool, scheme="http", host="127.0.0.1", port=8080, connect_timeout=3.0
    )


def _connect(reactor: MemoryReactorClock) -> tuple[Any, StringTransport]:
    reactor.advance(0)
    host, port, factory, timeout, _ = reactor.tcpClients[-1]
    assert (port, timeout) == (8080, 3.0)
    protocol: Any = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_pool_reuses_a_connection_and_drops_an_unfinished_one() -> None:
    reactor = MemoryReactorClock()
    pool = UpstreamPool(reactor)
    client = _client(reactor, pool)
    first = Handler()
    first_call = client.request(b"GET /1 HTTP/1.1\r\n\r\n", None, 0, False, first)
    protocol, transport = _connect(reactor)
    assert transport.value() == b"GET /1 HTTP/1.1\r\n\r\n"
    protocol.dataReceived(OK)
    assert first.ended == [None] and pool.idle_count() == 1
    first_call.abort()  # too late: the connection is the pool's now
    assert not transport.disconnected and pool.idle_count() == 1
    second = Handler()
    call = client.request(b"GET /2 HTTP/1.1\r\n\r\n", None, 0, False, second)
    assert len(reactor.tcpClients) == 1  # no new connection
    assert transport.value().endswith(b"GET /2 HTTP/1.1\r\n\r\n")
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npart")
    call.abort()  # the caller gave up before the body was read
    assert transport.disconnected and pool.idle_count() == 0
    assert second.ended == []  # no callbacks after abort
    client.request(b"GET /3 HTTP/1.1\r\n\r\n", None, 0, False, Handler())
    assert len(reactor.tcpClients) == 2


def test_pool_cap_and_idle_timeout() -> None:
    reactor = MemoryReactorClock()
    pool = UpstreamPool(reactor, max_idle_per_key=2, idle_timeout=60)
    connections = [_connection(pool) for _ in range(3)]
    for connection, _, _ in connections:
        pool.release(connection)
    assert pool.idle_count(KEY) == 2
    assert connections[0][1].disconnecting  # the oldest went over the cap
    reactor.advance(30)
    assert pool.take(KEY) is connections[2][0]  # most recent first
    pool.release(connections[2][0])  # idle again from t=30
    reactor.advance(30)
    assert connections[1][1].disconnecting and not connections[2][1].disconnecting
    reactor.advance(30)
    assert connections[2][1].disconnecting and pool.idle_count() == 0
    assert not reactor.getDelayedCalls()


class _SocketTransport(StringTransport):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock

    def getHandle(self) -> socket.socket:
        return self._sock


@pytest.mark.parametrize("peer_action", ["close", "send"])
def test_idle_connection_closed_by_runner_is_replaced_before_writing(peer_action: str) -> None:
    reactor = MemoryReactorClock()
    pool = UpstreamPool(reactor)
    client = _client(reactor, pool)
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        dead = _Connection(pool, client.key)
        dead_transport = _SocketTransport(ours)
        dead.makeConnection(dead_transport)
        live = _Connection(pool, client.key)
        spare, spare_peer = socket.socketpair()
        spare.setblocking(False)
        live_transport = _SocketTransport(spare)
        live.makeConnection(live_transport)
        pool.release(dead)
        handler = Handler()
        client.request(b"GET / HTTP/1.1\r\n\r\n", None, 0, False, handler)
        assert dead_transport.value() == b"GET / HTTP/1.1\r\n\r\n"  # alive: used
        dead.dataReceived(OK)
        assert handler.ended == [None] and pool.idle_count() == 1
        pool.release(live)  # now the older of two idle connections
        pool._idle[client.key].reverse()  # make the dead one the next to be taken
        if peer_action == "close":
            theirs.close()
        else:
            theirs.send(b"X")
        handler = Handler()
        client.request(b"GET /again HTTP/1.1\r\n\r\n", None, 0, False, handler)
        # Nothing was written to the closed connection; the live one took the request.
        assert dead_transport.value() == b"GET / HTTP/1.1\r\n\r\n"
        assert dead_transport.disconnected
        assert live_transport.value() == b"GET /again HTTP/1.1\r\n\r\n"
        assert handler.failed == [] and len(reactor.tcpClients) == 0
    finally:
        ours.close()
        theirs.close()
        spare.close()
        spare_peer.close()


def test_failed_fresh_connection_is_not_retried() -> None:
    reactor = MemoryReactorClock()
    client = _client(reactor, UpstreamPool(reactor))
    handler = Handler()
    client.request(b"GET / HTTP/1.1\r\n\r\n", None, 0, False, handler)
    reactor.advance(0)
    _, _, factory, _, _ = reactor.tcpClients[-1]
    factory.clientConnectionFailed(reactor.connectors[-1], Failure(ConnectionRefusedError()))
    reactor.advance(1)
    assert len(handler.failed) == 1 and classify(handler.failed[0])[0] == "connect"
    assert len(reactor.tcpClients) == 1


def test_abort_while_connecting_cancels_the_attempt() -> None:
    reactor = MemoryReactorClock()
    client = _client(reactor, UpstreamPool(reactor))
    handler = Handler()
    call = client.request(b"GET / HTTP/1.1\r\n\r\n", None, 0, False, handler)
    reactor.advance(0)
    connector = reactor.connectors[-1]
    call.abort()
    assert connector.stoppedConnecting
    assert handler.failed == []


def test_close_cached_connections() -> None:
    pool = UpstreamPool(MemoryReactorClock())
    connection, transport, _ = _connection(pool)
    pool.release(connection)
    done = pool.closeCachedConnections()
    fired: list[object] = []
    done.addCallback(fired.append)
    assert transport.disconnecting and not fired
    connection.connectionLost(Failure(ConnectionDone()))
    assert fired == [None] and pool.idle_count() == 0


def test_connection_paused_by_the_caller_is_resumed_before_reuse() -> None:
    connection, transport, pool = _connection()

    class Pausing(Handler):
        def response_body(self, data: bytes) -> None:
            super().response_body(data)
            connection.pause()  # the client is slow: stop reading from the runner

    handler = Pausing()
    connection.send(b"GET / HTTP/1.1\r\n\r\n", None, 0, False, handler)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert handler.ended == [None] and pool.idle_count(KEY) == 1
    assert transport.producerState == "producing"


def test_a_tcp_connection_to_the_runner_sends_without_nagle() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    try:

        class _Transport(StringTransport):
            def getHandle(self) -> socket.socket:
                return client

        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        connection = _Connection(UpstreamPool(MemoryReactorClock()), KEY)
        connection.makeConnection(_Transport())
        assert connection.sock is client
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        for s in (client, peer, listener):
            s.close()


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(_HEAD_LINES, max_size=7), body=st.sampled_from([b"ok", b""]))
def test_a_crlf_head_in_one_read_gives_the_line_by_line_answer(
    lines: list[bytes], body: bytes
) -> None:
    # CRLF throughout: the one-split path (with its plain header lines taken
    # inline) against the line-by-line one.
    raw = b"".join(line + b"\r\n" for line in [b"HTTP/1.1 200 OK", *lines]) + b"\r\n" + body
    assert _outcome([raw]) == _outcome([raw[i : i + 1] for i in range(len(raw))])


@pytest.mark.parametrize("split", [False, True])
def test_control_characters_in_a_head(split: bool) -> None:
    """Issue 16, finding 6: no control character from a runner's head is passed on."""
    raw = (
        b"HTTP/1.1 200 OK\rSet-Cookie: evil=1\r\nX-Nul: a\x00b\r\nX-Vt: a\x0bb\r\n"
        b"X-Del: a\x7fb\r\nX-Tab: a\tb\r\nContent-Length: 2\r\n\r\nok"
    )
    pieces = [raw[i : i + 1] for i in range(len(raw))] if split else [raw]
    handler, _, _ = _exchange(pieces)
    assert handler.head is not None
    code, phrase, headers, length = handler.head
    assert (code, phrase, length) == (200, b"", 2)
    assert headers == [(b"X-Tab", b"a\tb"), (b"Content-Length", b"2")]
    assert handler.dropped == 3
    for bad in (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\x0b\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\x00\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX\x00Y: 1\r\nContent-Length: 2\r\n\r\nok",
    ):
        handler, _, _ = _exchange([bad])
        assert handler.head is None and handler.failed, bad
        assert handler.failed[0].check(UpstreamProtocolError)
