"""Runner pools in memory: placement.py (pure), pool.py's queue and health.py's checks.

The end-to-end behaviour (hosts killed under load, /readyz, placement across
real stand-in runners) is in tests/test_pools_e2e.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from runner_gateway.health import HealthChecker
from runner_gateway.placement import (
    HostState,
    choose,
    model_forms,
    model_listed,
    note_check,
    parse_inventory,
)
from runner_gateway.pool import DOWN, FULL, QUEUED, PoolHost, RunnerPool
from runner_gateway.settings import Address, HealthCheckSettings, RunnerSettings
from runner_gateway.upstream import UpstreamPool

# ------------------------------------------------------------------ placement


def states(*specs: dict[str, Any]) -> list[HostState]:
    return [HostState(f"h{i}", **spec) for i, spec in enumerate(specs)]


def test_model_aware_prefers_loaded_then_pulled_then_least_busy() -> None:
    a = model_forms("alpha:7b")
    hosts = states(
        {"outstanding": 0},
        {"outstanding": 3, "loaded": a, "pulled": a},
        {"outstanding": 1, "pulled": a},
    )
    assert choose(hosts, "model-aware", "alpha:7b", 0) == 1
    assert choose(hosts, "model-aware", "alpha:7b", 3) == 2  # host 1 full: pulled next
    assert choose(hosts, "model-aware", "alpha:7b", 0, tried=[1]) == 2
    assert choose(hosts, "model-aware", "beta", 0) == 0  # nobody has it: least busy
    assert choose(hosts, "model-aware", None, 0) == 0
    hosts[1].up = False
    assert choose(hosts, "model-aware", "alpha:7b", 0) == 2


def test_least_outstanding_spreads_ties_and_skips_down_and_full_hosts() -> None:
    hosts = states({}, {}, {})
    picks = []
    for _ in range(6):
        i = choose(hosts, "least-outstanding", None, 0)
        assert i is not None
        hosts[i].served += 1
        picks.append(i)
    assert picks == [0, 1, 2, 0, 1, 2]
    hosts[0].outstanding = 2
    hosts[1].up = False
    assert choose(hosts, "least-outstanding", None, 0) == 2
    hosts[2].outstanding = 1
    assert choose(hosts, "least-outstanding", None, 1) is None  # 0 and 2 full, 1 down
    assert choose(hosts, "least-outstanding", None, 0, tried=[0, 2]) is None


def test_round_robin_follows_the_turn() -> None:
    hosts = states({}, {"up": False}, {})
    assert [choose(hosts, "round-robin", None, 0, turn=t) for t in range(4)] == [0, 2, 2, 0]


def test_checks_take_a_host_out_and_bring_it_back() -> None:
    state = HostState("h", inventory=True)
    assert not note_check(state, False, 2, 2)
    assert note_check(state, False, 2, 2) and not state.up and not state.inventory
    assert not note_check(state, True, 2, 2)
    assert not note_check(state, False, 2, 2)  # the passes in a row start over
    assert not note_check(state, True, 2, 2)
    assert note_check(state, True, 2, 2) and state.up


def test_model_names_and_inventories() -> None:
    assert model_forms("llama3") == {"llama3", "llama3:latest"}
    assert model_forms("llama3:latest") == {"llama3", "llama3:latest"}
    assert model_forms("hf.co/x/y:Q4") == {"hf.co/x/y:Q4"}
    tags = {"models": [{"name": "a:1b", "model": "a:1b"}, {"name": "b"}, "junk"]}
    assert parse_inventory(json.dumps(tags).encode()) == frozenset({"a:1b", "b", "b:latest"})
    listed = parse_inventory(b'{"object": "list", "data": [{"id": "gpt"}]}')
    assert listed == frozenset({"gpt", "gpt:latest"})
    assert parse_inventory(b"not json") is None
    assert parse_inventory(b'{"status": "ok"}') is None
    hosts = states({"inventory": True, "pulled": model_forms("a")}, {"inventory": False})
    assert model_listed(hosts, "a") is True  # host 0 lists it
    assert model_listed(hosts, "b") is None  # host 1 might have it
    hosts[1].up = False
    assert model_listed(hosts, "b") is False
    hosts[0].up = False
    assert model_listed(hosts, "a") is None  # nobody up: nothing known
    # Loaded only (an /api/ps entry the last /api/tags did not have yet), by either form.
    loaded = states({"inventory": True, "loaded": model_forms("c:latest")})
    assert model_listed(loaded, "c") is True
    assert model_listed(loaded, "a") is False


# ------------------------------------------------------------------ the queue


class Waiter:
    def __init__(self, name: str, log: list[tuple[str, Any]], model: str | None = None) -> None:
        self.name, self.log, self.model = name, log, model

    def granted(self, host: PoolHost) -> None:
        self.log.append((self.name, host.index))

    def queue_expired(self, reason: str) -> None:
        self.log.append((self.name, reason))


def runner(**kwargs: Any) -> RunnerSettings:
    base = RunnerSettings(
        name="gpu",
        host="127.0.0.1",
        port=8080,
        path="/",
        hosts=(Address("127.0.0.1", 8080), Address("127.0.0.1", 8081)),
        health_check=HealthCheckSettings("/api/version", 5.0, 1.0, 2, 1),
    )
    return replace(base, **kwargs)


def test_queue_is_fifo_bounded_and_timed() -> None:
    reactor = MemoryReactorClock()
    pool = RunnerPool(
        runner(max_concurrent=1, max_queue=2, queue_timeout=10.0), reactor, UpstreamPool(reactor)
    )
    log: list[tuple[str, Any]] = []
    first, second = (pool.acquire(Waiter(n, log)) for n in ("a", "b"))
    assert isinstance(first, PoolHost) and isinstance(second, PoolHost)
    assert {first.index, second.index} == {0, 1}
    c, d, e = Waiter("c", log), Waiter("d", log), Waiter("e", log)
    assert [pool.acquire(w) for w in (c, d, e)] == [QUEUED, QUEUED, FULL]
    assert pool.queue_depth() == 2
    pool.release(second)
    assert log == [("c", second.index)]  # the head of the queue, at once
    pool.leave(d)  # its client left: out of the queue, never granted
    assert pool.queue_depth() == 0
    pool.release(first)
    assert log == [("c", second.index)]
    f = Waiter("f", log)
    assert isinstance(pool.acquire(f), PoolHost)  # a host is free again
    assert pool.acquire(Waiter("g", log)) == QUEUED
    reactor.advance(10)
    assert log[-1] == ("g", FULL)  # queueTimeout
    assert pool.queue_depth() == 0 and not reactor.getDelayedCalls()


def test_queued_requests_fail_when_the_last_host_goes_down() -> None:
    reactor = MemoryReactorClock()
    pool = RunnerPool(runner(max_concurrent=1), reactor, UpstreamPool(reactor))
    log: list[tuple[str, Any]] = []
    held = [pool.acquire(Waiter(n, log)) for n in ("a", "b")]
    assert all(isinstance(h, PoolHost) for h in held)
    assert pool.acquire(Waiter("c", log)) == QUEUED
    for host in pool.hosts:
        host.state.fails = 2
        pool.mark(host, False, "test")
    assert log == [("c", DOWN)]
    assert pool.acquire(Waiter("d", log)) == DOWN  # never waits on hosts known down


def test_a_pool_of_one_without_a_limit_is_the_plain_path() -> None:
    reactor = MemoryReactorClock()
    pool = RunnerPool(runner(hosts=()), reactor, UpstreamPool(reactor))
    assert pool.single
    host = pool.acquire(Waiter("a", []))
    assert isinstance(host, PoolHost) and host.state.outstanding == 1
    assert host.netloc == b"127.0.0.1:8080"
    assert pool.acquire(Waiter("b", []), tried=(0,)) == DOWN  # no other host to retry on
    pool.release(host)
    assert host.state.outstanding == 0


def test_passive_failures_count_only_while_checks_run() -> None:
    reactor = MemoryReactorClock()
    pool = RunnerPool(runner(), reactor, UpstreamPool(reactor))
    host = pool.hosts[0]
    for _ in range(3):
        pool.passive_failure(host)
    assert host.state.up  # nothing would bring it back
    pool.checking = True
    pool.passive_failure(host)
    assert host.state.up
    pool.passive_failure(host)
    assert not host.state.up and pool.up_count() == 1


# ------------------------------------------------------------------ health checks


def _answer(reactor: MemoryReactorClock, index: int, raw: bytes) -> bytes:
    """Connect the client at ``reactor.tcpClients[index]`` and answer its request."""
    host, port, factory, _, _ = reactor.tcpClients[index]
    protocol: Any = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport()
    protocol.makeConnection(transport)
    sent: bytes = transport.value()
    protocol.dataReceived(raw)
    return sent


def _ok(body: bytes = b"{}") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def test_checks_mark_hosts_down_and_up_and_read_inventories() -> None:
    reactor = MemoryReactorClock()
    pool = RunnerPool(runner(hosts=(Address("127.0.0.1", 8080),)), reactor, UpstreamPool(reactor))
    checker = HealthChecker(pool, reactor)
    checker.start()
    assert pool.checking
    host = pool.hosts[0]
    for round_ in range(2):
        reactor.advance(0 if round_ == 0 else 5)
        _, _, factory, _, _ = reactor.tcpClients[-1]
        factory.clientConnectionFailed(reactor.connectors[-1], Failure(ConnectionRefusedError()))
        reactor.advance(0.5)  # the endpoint reports the failure (before the 1 s timeout)
        assert host.state.fails == round_ + 1
    assert not host.state.up  # unhealthyAfter: 2
    reactor.advance(5)
    sent = _answer(reactor, -1, _ok(b'{"version": "0.9"}'))
    assert sent.startswith(b"GET /api/version HTTP/1.1\r\n")
    assert b"Host: 127.0.0.1:8080\r\n" in sent
    assert host.state.up  # healthyAfter: 1
    checker.stop()
    assert not pool.checking
    # What is left is the connection pool's idle sweep: no check, no timeout.
    assert [c.func.__name__ for c in reactor.getDelayedCalls()] == ["_expire"]


def test_inventory_from_ollama_listings() -> None:
    reactor = MemoryReactorClock()
    pool = RunnerPool(runner(hosts=(Address("127.0.0.1", 8080),)), reactor, UpstreamPool(reactor))
    checker = HealthChecker(pool, reactor)
    checker.start()
    reactor.advance(0)
    host, port, factory, _, _ = reactor.tcpClients[-1]
    protocol: Any = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(_ok())  # the check; the inventory follows on its connection
    assert transport.value().startswith(b"GET /api/version HTTP/1.1")
    assert b"GET /api/tags " in transport.value()
    transport.clear()
    protocol.dataReceived(_ok(b'{"models": [{"name": "a:1b"}, {"name": "b:1b"}]}'))
    assert transport.value().startswith(b"GET /api/ps ")
    protocol.dataReceived(_ok(b'{"models": [{"name": "a:1b"}]}'))
    state = pool.hosts[0].state
    assert state.inventory and state.pulled == {"a:1b", "b:1b"} and state.loaded == {"a:1b"}
    assert pool.model_listed("b:1b") is True and pool.model_listed("c") is False
    # A models:manage request that ends makes the inventory stale until read again.
    assert pool.on_models is not None
    transport.clear()
    pool.on_models(pool.hosts[0])
    assert not state.inventory and pool.model_listed("c") is None
    assert transport.value().startswith(b"GET /api/tags ")
    checker.stop()


@pytest.mark.parametrize("tags_status", [404, 500])
def test_inventory_falls_back_to_v1_models(tags_status: int) -> None:
    reactor = MemoryReactorClock()
    pool = RunnerPool(runner(hosts=(Address("127.0.0.1", 8080),)), reactor, UpstreamPool(reactor))
    checker = HealthChecker(pool, reactor)
    checker.start()
    reactor.advance(0)
    host, port, factory, _, _ = reactor.tcpClients[-1]
    protocol: Any = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(_ok())
    transport.clear()
    protocol.dataReceived(b"HTTP/1.1 %d No\r\nContent-Length: 0\r\n\r\n" % tags_status)
    assert transport.value().startswith(b"GET /v1/models ")
    protocol.dataReceived(_ok(b'{"object": "list", "data": [{"id": "qwen"}]}'))
    state = pool.hosts[0].state
    assert state.inventory and state.pulled == {"qwen", "qwen:latest"} and not state.loaded
    checker.stop()


def test_least_outstanding_spreads_a_thousand_requests_evenly() -> None:
    from bench.pool import spread

    result = spread(requests=1000, in_flight=8)
    assert sum(result["per_host"]) == 1000
    assert max(result["per_host"]) - min(result["per_host"]) <= 30  # within 3 % of 1,000


def test_pool_listings_merge_in_host_order() -> None:
    from runner_gateway.poolviews import merge_listings

    tags = [
        b'{"models": [{"name": "a:1b", "size": 1}, {"name": "b:1b"}]}',
        b"not json",
        b'{"models": [{"name": "a:1b", "size": 2}, {"name": "c:1b"}, "odd"]}',
    ]
    merged = json.loads(merge_listings("/api/tags", tags))
    assert merged == {
        "models": [{"name": "a:1b", "size": 1}, {"name": "b:1b"}, {"name": "c:1b"}, "odd"]
    }
    ps = [b'{"models": [{"name": "a:1b"}]}', b'{"models": [{"name": "a:1b"}]}']
    assert len(json.loads(merge_listings("/api/ps", ps))["models"]) == 2  # once per host
    v1 = [
        b'{"object": "list", "data": [{"id": "x"}]}',
        b'{"object": "list", "data": [{"id": "x"}, {"id": "y"}]}',
    ]
    assert json.loads(merge_listings("/v1/models", v1)) == {
        "object": "list",
        "data": [{"id": "x"}, {"id": "y"}],
    }
    with pytest.raises(ValueError):
        merge_listings("/api/tags", [b'{"error": "boom"}'])


def test_usage_counts_per_host_and_workers_merge_them() -> None:
    from runner_gateway.metrics import UsageTable
    from runner_gateway.workers import merge_usage

    tables = [UsageTable(10, 0.0), UsageTable(10, 0.0)]
    tables[0].record("alice", "m", 1, 2, 1.0, host="10.0.0.5:11434")
    tables[1].record("alice", "m", 3, 4, 2.0, host="10.0.0.5:11434")
    tables[1].record("alice", "m", 5, 6, 3.0, host="10.0.0.6:11434")
    tables[1].record("alice", None, 0, 0, 4.0)  # answered by the gateway: no host
    alice = merge_usage([t.snapshot() for t in tables])["subjects"]["alice"]
    assert alice["requests"] == 4
    assert alice["hosts"] == {
        "10.0.0.5:11434": {"requests": 2, "prompt_tokens": 4, "completion_tokens": 6},
        "10.0.0.6:11434": {"requests": 1, "prompt_tokens": 5, "completion_tokens": 6},
    }


def test_an_older_inventory_read_does_not_overwrite_a_newer_one() -> None:
    reactor = MemoryReactorClock()
    pool = RunnerPool(runner(hosts=(Address("127.0.0.1", 8080),)), reactor, UpstreamPool(reactor))
    checker = HealthChecker(pool, reactor)
    checker.start()
    reactor.advance(0)
    old = _connection(reactor, -1)
    old[0].dataReceived(_ok())  # the check passes; /api/tags goes out on this connection
    assert b"GET /api/tags " in old[1].value()
    assert pool.on_models is not None
    pool.on_models(pool.hosts[0])  # a pull ended meanwhile: read again, on a new connection
    reactor.advance(0)
    new = _connection(reactor, -1)
    assert new[1].value().startswith(b"GET /api/tags ")
    old[0].dataReceived(_ok(b'{"models": [{"name": "before:1b"}]}'))
    state = pool.hosts[0].state
    assert not state.inventory and not state.pulled  # the older answer is dropped
    new[0].dataReceived(_ok(b'{"models": [{"name": "before:1b"}, {"name": "pulled:1b"}]}'))
    new[0].dataReceived(_ok(b'{"models": []}'))  # /api/ps
    assert state.inventory and state.pulled == {"before:1b", "pulled:1b"}
    checker.stop()


def _connection(reactor: MemoryReactorClock, index: int) -> tuple[Any, StringTransport]:
    host, port, factory, _, _ = reactor.tcpClients[index]
    protocol: Any = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_pool_gauges() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from runner_gateway.metrics import PoolCollector

    reactor = MemoryReactorClock()
    pool = RunnerPool(runner(max_concurrent=1), reactor, UpstreamPool(reactor))
    held = pool.acquire(Waiter("a", []))
    assert isinstance(held, PoolHost)
    pool.hosts[1].state.up = False
    assert pool.acquire(Waiter("b", [])) == QUEUED
    registry = CollectorRegistry()
    registry.register(PoolCollector(lambda: [pool]))
    text = generate_latest(registry).decode()
    assert 'runner_gateway_upstream_up{host="127.0.0.1:8080",runner="gpu"} 1.0' in text
    assert 'runner_gateway_upstream_up{host="127.0.0.1:8081",runner="gpu"} 0.0' in text
    assert 'runner_gateway_upstream_in_flight{host="127.0.0.1:8080",runner="gpu"} 1.0' in text
    assert 'runner_gateway_queue_depth{runner="gpu"} 1.0' in text
