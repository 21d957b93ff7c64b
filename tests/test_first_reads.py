"""A new connection's first read (edge/accept.py, connections.FairQueue): read
at accept while the turn's budget lasts, then rationed fairly by peer, so one
peer's flood delays another peer's connection by one of its own at most."""

from __future__ import annotations

import socket
from typing import Any, cast

import pytest
from twisted.internet.interfaces import IReactorTime

from runner_gateway.connections import DEFER_ACCEPT_SECONDS, FairQueue, defer_accept
from runner_gateway.edge.accept import FirstReads


def test_the_fair_queue_takes_one_peer_at_a_time() -> None:
    queue: FairQueue[str] = FairQueue()
    for n in range(4):
        queue.push("flood", f"f{n}")
    queue.push("probe", "p0")
    queue.push("other", "o0")
    queue.push("probe", "p1")
    assert len(queue) == 7
    assert queue.waiting("flood") and not queue.waiting("nobody")
    taken = [queue.pop() for _ in range(7)]
    assert taken == ["f0", "p0", "o0", "f1", "p1", "f2", "f3"]
    assert len(queue) == 0 and not queue.waiting("flood")
    with pytest.raises(IndexError):
        queue.pop()


class _Transport:
    """What FirstReads uses of a tcp.Server; each read costs ``cost`` seconds."""

    def __init__(self, name: str, log: list[str], clock: list[float], cost: float) -> None:
        self.name = name
        self.log = log
        self.clock = clock
        self.cost = cost
        self.reading = True
        self.disconnected = False
        self.disconnecting = False
        self.aborted = False

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True

    def doRead(self) -> None:
        assert self.reading
        self.log.append(self.name)
        self.clock[0] += self.cost
        if self.name == "boom":
            raise RuntimeError("a protocol bug")

    def abortConnection(self) -> None:
        self.aborted = True


class _Turns:
    """A reactor's callLater(0) as the real one runs it: a call made during a
    turn runs in the next one (task.Clock would run it at once)."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def callLater(self, delay: float, f: Any, *args: Any) -> None:
        assert delay == 0
        self.calls.append((f, args))

    def advance(self, _: float) -> None:
        calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)


def _reads(budget: float = 0.004) -> tuple[FirstReads, _Turns, list[str], Any]:
    now = [0.0]
    reactor = _Turns()
    reads = FirstReads(cast(IReactorTime, reactor), budget=budget, clock=lambda: now[0])
    log: list[str] = []

    def made(name: str, peer: str, cost: float = 0.001) -> _Transport:
        transport = _Transport(name, log, now, cost)
        reads.connection_made(transport, peer)
        return transport

    return reads, reactor, log, made


def test_connections_are_read_at_accept_while_the_budget_lasts() -> None:
    reads, reactor, log, made = _reads()
    first = [made(f"a{n}", "10.0.0.1") for n in range(4)]  # 4 ms: the budget
    assert log == ["a0", "a1", "a2", "a3"] and all(t.reading for t in first)
    late = made("a4", "10.0.0.1")
    assert log == ["a0", "a1", "a2", "a3"]  # past the budget: waits, unpolled
    assert not late.reading and reads.queued == 1
    reactor.advance(0)  # the next turn
    assert log[-1] == "a4" and late.reading
    assert len(reads.queue) == 0


def test_a_flood_from_one_peer_delays_another_by_one_connection() -> None:
    reads, reactor, log, made = _reads()
    for n in range(40):  # in one turn: 4 read, 36 wait
        made(f"f{n}", "203.0.113.9")
    probe = made("probe", "192.0.2.7")
    assert not probe.reading  # the turn's budget is spent
    reactor.advance(0)  # next turn: the flood's oldest, then the probe
    assert log[4:6] == ["f4", "probe"]
    while len(reads.queue):
        reactor.advance(0)
    assert sorted(log) == sorted([f"f{n}" for n in range(40)] + ["probe"])
    assert log.index("probe") == 5  # not after the flood's 36


def test_a_new_connection_waits_behind_its_own_peers() -> None:
    """Order is kept within a peer: a flood cannot jump its own queue by
    connecting again when a turn's budget is fresh."""
    _, reactor, log, made = _reads()
    for n in range(6):
        made(f"f{n}", "203.0.113.9")
    reactor.advance(0)  # the turn reads f4, f5; the queue is empty again
    assert log == [f"f{n}" for n in range(6)]
    for n in range(6, 12):
        made(f"f{n}", "203.0.113.9")
    made("g0", "198.51.100.1")
    reactor.advance(0)
    reactor.advance(0)
    assert log.index("g0") < log.index("f11")


def test_a_connection_gone_while_it_waited_is_skipped() -> None:
    _, reactor, log, made = _reads(budget=0)
    gone = made("gone", "10.0.0.1")
    kept = made("kept", "10.0.0.2")
    gone.disconnecting = True
    reactor.advance(0)  # a budget of 0 still takes one a turn: the one gone
    assert log == [] and not gone.reading
    reactor.advance(0)
    assert log == ["kept"] and kept.reading


def test_a_failing_first_read_stays_with_its_connection() -> None:
    """Inside the listener's accept loop an exception would stop the loop:
    the connection is aborted and the next one is read."""
    _, _, log, made = _reads()
    boom = made("boom", "10.0.0.1")
    after = made("after", "10.0.0.1")
    assert boom.aborted and not after.aborted
    assert log == ["boom", "after"]


@pytest.mark.skipif(not hasattr(socket, "TCP_DEFER_ACCEPT"), reason="Linux only")
def test_the_listener_defers_accepts_until_the_client_sends() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        defer_accept(listener)
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
        listener.setblocking(False)
        with socket.create_connection(listener.getsockname()) as client:
            with pytest.raises(BlockingIOError):
                listener.accept()  # connected, silent: not handed over
            client.sendall(b"GET / HTTP/1.1\r\n")
            import select

            assert select.select([listener], [], [], 5)[0]
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.recv(100) == b"GET / HTTP/1.1\r\n"
    assert DEFER_ACCEPT_SECONDS > 0


def test_a_tls_connection_is_read_in_the_next_turn_in_the_same_order() -> None:
    """TLS (not at once): its first read would run the handshake inside the
    TLS protocol's connectionMade, so it waits for the next turn, fairly."""
    reads, reactor, log, _ = _reads()
    now = reads.clock
    tls = _Transport("tls", log, [now()], 0.001)
    reads.connection_made(tls, "192.0.2.7", at_once=False)
    assert log == [] and not tls.reading
    assert reads.queued == 0  # not for want of budget
    reactor.advance(0)
    assert log == ["tls"] and tls.reading
