"""ConnectionLimits: the arithmetic of server.maxConnections and maxConnectionsPerClient."""

from __future__ import annotations

import pytest

from runner_gateway.connections import (
    HEALTH_RESERVE,
    ConnectionLimits,
    default_max_connections,
)


def test_default_from_the_descriptor_limit() -> None:
    assert default_max_connections(65536) == (65536 - 128) // 2 - HEALTH_RESERVE
    assert default_max_connections(1024) == 448 - HEALTH_RESERVE
    assert default_max_connections(100) == 16


def test_per_client_cap_and_release() -> None:
    limits = ConnectionLimits(100, 2)
    assert limits.admit("10.0.0.1") and limits.admit("10.0.0.1")
    assert not limits.admit("10.0.0.1")
    assert limits.admit("10.0.0.2")
    assert limits.refused == {"max_connections": 0, "max_connections_per_client": 1}
    limits.release("10.0.0.1")
    assert limits.admit("10.0.0.1")
    for peer in ("10.0.0.1", "10.0.0.1", "10.0.0.2"):
        limits.release(peer)
    assert limits.open == 0 and limits.by_peer == {}


def test_exempt_peers_skip_the_per_client_cap() -> None:
    limits = ConnectionLimits(100, 1, exempt=lambda peer: peer == "10.9.9.9")
    assert all(limits.admit("10.9.9.9") for _ in range(50))
    assert limits.admit("10.0.0.1") and not limits.admit("10.0.0.1")


def test_the_process_cap_keeps_a_reserve_for_local_probes_and_exempt_peers() -> None:
    limits = ConnectionLimits(3, 100, exempt=lambda peer: peer == "10.9.9.9")
    assert all(limits.admit(f"10.0.0.{i}") for i in range(3))
    assert not limits.admit("10.0.0.7")
    assert limits.admit("127.0.0.1") and limits.admit("10.9.9.9")
    for _ in range(HEALTH_RESERVE - 2):
        assert limits.admit("::1")
    assert not limits.admit("127.0.0.1")  # the reserve is bounded too
    assert limits.refused == {"max_connections": 2, "max_connections_per_client": 0}


def test_refusals_are_exposed_as_a_counter() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from runner_gateway.metrics import ConnectionRefusals

    limits = ConnectionLimits(2, 1)
    assert limits.admit("10.0.0.1")
    assert not limits.admit("10.0.0.1")  # per client
    assert limits.admit("10.0.0.2")
    assert not limits.admit("10.0.0.3")  # in all
    registry = CollectorRegistry()
    registry.register(ConnectionRefusals(lambda: limits.refused))
    text = generate_latest(registry).decode()
    assert 'runner_gateway_connections_refused_total{reason="max_connections"} 1.0' in text
    assert (
        'runner_gateway_connections_refused_total{reason="max_connections_per_client"} 1.0' in text
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_listener_queues_a_burst_of_connections(host: str) -> None:
    """The listening socket's accept queue is BACKLOG, not Twisted's 50: a
    refused flood reconnecting at once would fill 50 and the kernel would
    drop the SYN of a health probe behind it (a 1 s retransmit)."""
    from twisted.internet.testing import MemoryReactor
    from twisted.web.server import Site

    from runner_gateway.connections import BACKLOG
    from runner_gateway.service import _endpoint
    from runner_gateway.settings import Address

    reactor = MemoryReactor()
    _endpoint(reactor, Address(host, 8443)).listen(Site(None))
    servers = reactor.tcpServers
    assert [(port, backlog, interface) for port, _, backlog, interface in servers] == [
        (8443, BACKLOG, host)
    ]
    assert BACKLOG >= 1024


def test_the_edge_counts_are_exposed() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from runner_gateway.metrics import EdgeCollector, EdgeCounts

    registry = CollectorRegistry()
    registry.register(EdgeCollector(lambda: EdgeCounts(3, 7, 2, 11, {431: 4, 408: 1})))
    text = generate_latest(registry).decode()
    assert "runner_gateway_lingering_connections 3.0" in text
    assert "runner_gateway_lingering_closes_skipped_total 7.0" in text
    assert "runner_gateway_first_reads_waiting 2.0" in text
    assert "runner_gateway_first_reads_queued_total 11.0" in text
    assert 'runner_gateway_edge_rejections_total{status="431"} 4.0' in text
    assert 'runner_gateway_edge_rejections_total{status="408"} 1.0' in text
