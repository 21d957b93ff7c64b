"""A new connection's first read, fair between peers (the "read-at-accept" fix).

The listener hands over a connection once its client has sent something
(connections.defer_accept), and the first read is made at once, in the turn
that accepted it, so a request is answered without waiting for the reactor's
next round of every ready connection. While one peer floods the gateway with
connections, those reads are rationed: at most ``budget`` seconds of them a
reactor turn, and past that a connection waits unread (not polled) in a
:class:`~runner_gateway.connections.FairQueue` by peer address, served a
peer at a time in the turns that follow. A health probe from another address
then waits for one of the flood's connections at most, not for all of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from runner_gateway.connections import FairQueue

__all__ = ["BUDGET", "FirstReads"]

_log = Logger()

# The first reads one reactor turn makes before new connections wait their
# turn: short enough that a probe behind a flood is answered within a few
# turns, long enough that a burst of ordinary clients is read at accept.
BUDGET = 0.004


class FirstReads:
    """A site's first reads: at once while the turn's budget lasts and the
    peer has none waiting, else queued fairly by peer."""

    def __init__(
        self,
        reactor: IReactorTime,
        budget: float = BUDGET,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.reactor = reactor
        self.budget = budget
        self.clock = clock
        self.queue: FairQueue[Any] = FairQueue()
        self._window_end: float | None = None  # this turn's budget ends then
        self.queued = 0  # connections that waited, for the metrics

    def connection_made(self, transport: Any, peer: Any, at_once: bool = True) -> None:
        """A new connection (a tcp.Server, its protocol connected). Not
        ``at_once`` (TLS: the first read would run the handshake inside the
        TLS protocol's own connectionMade), it is read at the start of the
        next turn, in the same fair order and budget."""
        now = self.clock()
        if self._window_end is None:
            self._window_end = now + self.budget
            self.reactor.callLater(0, self._next_turn)
        if now < self._window_end and not self.queue.waiting(peer):
            if at_once:
                _read(transport)
                return
        else:
            self.queued += 1
        transport.stopReading()  # not polled until its turn
        self.queue.push(peer, transport)

    def _next_turn(self) -> None:
        self._window_end = None
        if not self.queue:
            return
        end = self._window_end = self.clock() + self.budget
        self.reactor.callLater(0, self._next_turn)
        while True:  # one at least, whatever the budget: the queue always moves
            _read(self.queue.pop())
            if not self.queue or self.clock() >= end:
                break


def _read(transport: Any) -> None:
    """The reactor's read of ``transport``, made now. A close or an error it
    meets is left for the reactor's next turn: the socket stays readable."""
    if transport.disconnected or transport.disconnecting:
        return
    transport.startReading()
    try:
        transport.doRead()
    except Exception:
        # Inside the listener's accept loop: what goes wrong stays with this connection.
        _log.failure("the first read of a new connection failed")
        transport.abortConnection()
