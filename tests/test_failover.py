"""Failover in a runner pool, in memory: which failures go to another host, and how often.

Two hosts (ports 11434 and 11435: the MemoryReactor resolves every name to
127.0.0.1, so the port tells them apart); the runner's side is driven by hand.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web import resource, server

from runner_gateway.context import RequestContext
from runner_gateway.proxy import ReverseProxyResource
from runner_gateway.settings import Address, RunnerSettings

GENERATE = b"POST /api/generate HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{}"
PULL = b"POST /api/pull HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{}"
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class _Request(server.Request):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gateway_context = RequestContext(request_id="f-1", started=0.0)


class _Root(resource.Resource):
    isLeaf = True

    def __init__(self, proxy: ReverseProxyResource) -> None:
        super().__init__()
        self.proxy = proxy
        self.ctx: RequestContext | None = None

    def render(self, request: server.Request) -> bytes | int:
        ctx: RequestContext = request.gateway_context  # type: ignore[attr-defined]
        self.ctx = ctx
        ctx.runner = self.proxy.runner
        ctx.upstream_path = request.uri
        ctx.scope = "models:manage" if request.uri == b"/api/pull" else "inference"
        return self.proxy.render(request)


class Pool:
    def __init__(self, hosts: int = 2) -> None:
        self.reactor = MemoryReactorClock()
        runner = RunnerSettings(
            name="gpu",
            host="10.0.0.5",
            port=11434,
            path="/",
            hosts=(Address("10.0.0.5", 11434), Address("10.0.0.6", 11435))[:hosts],
            balance="round-robin",
        )
        self.proxy = ReverseProxyResource(runner, self.reactor)
        self.root = _Root(self.proxy)
        site = server.Site(self.root, reactor=self.reactor)
        site.requestFactory = _Request
        self.channel = site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 5555))
        self.client = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 5555))
        self.channel.makeConnection(self.client)
        self.attempts = 0

    def send(self, raw: bytes) -> None:
        self.channel.dataReceived(raw)

    def attempt(self) -> tuple[int, Any]:
        """The next connection attempt: (port, its factory)."""
        self.reactor.advance(0)
        assert len(self.reactor.tcpClients) == self.attempts + 1, "no new connection"
        _, port, factory, _, _ = self.reactor.tcpClients[self.attempts]
        self.attempts += 1
        return port, factory

    def refuse(self) -> int:
        port, factory = self.attempt()
        factory.clientConnectionFailed(
            self.reactor.connectors[self.attempts - 1], Failure(ConnectionRefusedError())
        )
        self.reactor.advance(1)  # HostnameEndpoint gives up on its addresses
        return port

    def accept(self) -> tuple[int, Any, StringTransport]:
        port, factory = self.attempt()
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return port, protocol, transport

    def no_more_attempts(self) -> bool:
        self.reactor.advance(0)
        return len(self.reactor.tcpClients) == self.attempts

    @property
    def ctx(self) -> RequestContext:
        assert self.root.ctx is not None
        return self.root.ctx


@pytest.mark.timeout(10)
def test_a_request_that_could_not_be_sent_goes_to_the_other_host() -> None:
    p = Pool()
    p.send(GENERATE)
    assert p.refuse() == 11434
    port, protocol, transport = p.accept()
    assert port == 11435
    assert b"Host: 10.0.0.6:11435\r\n" in transport.value()  # the host's own Host header
    protocol.dataReceived(OK)
    assert p.client.value().startswith(b"HTTP/1.1 200 ")
    assert p.ctx.host == "10.0.0.6:11435"
    assert [h.state.outstanding for h in p.proxy.runner_pool.hosts] == [0, 0]


@pytest.mark.timeout(10)
def test_an_inference_request_lost_before_its_answer_is_retried_once() -> None:
    p = Pool()
    p.send(GENERATE)
    _, first, _ = p.accept()
    first.connectionLost(Failure(ConnectionLost()))  # sent, then the host died
    port, second, transport = p.accept()
    assert port == 11435 and transport.value().endswith(b"{}")
    second.connectionLost(Failure(ConnectionLost()))  # this one too: no third try
    assert p.no_more_attempts()
    assert p.client.value().startswith(b"HTTP/1.1 502 ")
    assert p.ctx.upstream_error == "reset"


@pytest.mark.timeout(10)
def test_a_manage_request_is_never_sent_twice() -> None:
    p = Pool()
    p.send(PULL)
    _, first, transport = p.accept()
    assert transport.value().startswith(b"POST /api/pull ")
    first.connectionLost(Failure(ConnectionLost()))
    assert p.no_more_attempts()
    out = p.client.value()
    assert out.startswith(b"HTTP/1.1 502 ")
    assert "closed the connection" in json.loads(out.partition(b"\r\n\r\n")[2])["error"]


@pytest.mark.timeout(10)
def test_nothing_is_retried_after_the_first_response_byte() -> None:
    p = Pool()
    p.send(GENERATE)
    _, first, _ = p.accept()
    first.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    first.connectionLost(Failure(ConnectionLost()))
    assert p.no_more_attempts()
    assert p.ctx.aborted and p.client.value().startswith(b"HTTP/1.1 200 ")


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("second", "resent"), [(GENERATE, True), (PULL, False)])
def test_a_reused_connection_closed_before_the_answer(second: bytes, resent: bool) -> None:
    p = Pool(hosts=1)
    p.send(GENERATE)
    _, protocol, transport = p.accept()
    protocol.dataReceived(OK)
    transport.clear()
    p.send(second)  # on the same client connection, so on the idle runner connection
    request_line = second.split(b"\r\n", 1)[0]
    assert transport.value().startswith(request_line)  # written to the idle connection
    protocol.connectionLost(Failure(ConnectionLost()))  # the runner closed it as idle
    if resent:  # sent again on a fresh connection to the same host
        port, fresh, again = p.accept()
        assert port == 11434 and again.value() == transport.value()
        fresh.dataReceived(OK)
        assert p.client.value().count(b"HTTP/1.1 200 ") == 2
    else:  # a models:manage request may have been read: never sent twice
        assert p.no_more_attempts()
        assert p.client.value().count(b"HTTP/1.1 502 ") == 1


@pytest.mark.timeout(10)
def test_an_idle_connection_keeps_nothing_of_its_last_request() -> None:
    p = Pool(hosts=1)
    p.send(GENERATE)
    _, protocol, _ = p.accept()
    protocol.dataReceived(OK)
    p.send(GENERATE)  # reuses the connection: a stale retry would need the request
    protocol.dataReceived(OK)
    assert p.no_more_attempts()
    assert protocol._wrappedProtocol.call is None  # not the request, nor its body
