"""How client connections come in: how many a process takes, in all and per
peer address; the listener's queue and deferred accept; the fair queue of
first reads.

No Twisted here: GatewaySite asks :meth:`ConnectionLimits.admit` for every
accepted connection, before any byte of it is read, and tells
:meth:`ConnectionLimits.release` when it closes; the service and workers set
:data:`BACKLOG` and :func:`defer_accept` on their listeners; edge/accept.py
keeps new connections waiting for their first read in a :class:`FairQueue`.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = [
    "BACKLOG",
    "HEALTH_RESERVE",
    "LOCAL_PROBES",
    "ConnectionLimits",
    "FairQueue",
    "default_max_connections",
    "defer_accept",
]

# Every listener's accept queue. Twisted's default of 50 drops SYNs when many
# clients connect at once (a refused flood reconnecting, thousands of streams),
# and a dropped SYN costs its client (a health probe too) a 1 s retransmit.
BACKLOG = 1024
# Descriptors kept for the process itself (listeners, logs, settings and key
# files, Redis, the metrics listener) before client and upstream connections.
_OWN_DESCRIPTORS = 128
# Past maxConnections, this many more connections from LOCAL_PROBES or exempt
# peers (a load balancer) are still taken, so their health probes are answered
# while a flood from elsewhere is refused.
HEALTH_RESERVE = 16
LOCAL_PROBES = frozenset({"127.0.0.1", "::1"})

REFUSED_REASONS = ("max_connections", "max_connections_per_client")


# How long the kernel keeps a connection whose client has sent nothing before
# handing it over anyway (then server.headerTimeout applies).
DEFER_ACCEPT_SECONDS = 5


def defer_accept(sock: socket.socket) -> None:
    """Have the kernel hand over a new connection only once its client has
    sent something (Linux TCP_DEFER_ACCEPT, nginx's ``listen ... deferred``):
    no wake-up, descriptor or turn for a connection that says nothing yet,
    and the request is there to read at accept. Elsewhere: nothing."""
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, option, DEFER_ACCEPT_SECONDS)


def default_max_connections(descriptor_limit: int) -> int:
    """``server.maxConnections`` when not set: half the descriptors left after
    the process's own, since each client connection may need one to its runner,
    less the health reserve; at least 16."""
    return max(16, (descriptor_limit - _OWN_DESCRIPTORS) // 2 - HEALTH_RESERVE)


class ConnectionLimits:
    """Counts open connections, in all and by peer address, and says whether
    one more may be taken. ``exempt(address)``: a peer not held to
    ``per_client`` (trusted proxies: behind a load balancer every
    connection comes from it)."""

    def __init__(
        self,
        max_connections: int,
        per_client: int,
        exempt: Callable[[str], bool] | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.per_client = per_client
        self.exempt = exempt
        self.open = 0
        self.by_peer: dict[str, int] = {}
        self.refused = dict.fromkeys(REFUSED_REASONS, 0)

    def admit(self, peer: str | None) -> bool:
        """Take a connection from ``peer`` (None: no address, e.g. a test's), or
        refuse it (counted by reason)."""
        exempt = peer is not None and self.exempt is not None and self.exempt(peer)
        if self.open >= self.max_connections and not (
            (exempt or peer in LOCAL_PROBES) and self.open < self.max_connections + HEALTH_RESERVE
        ):
            self.refused["max_connections"] += 1
            return False
        if peer is not None:
            count = self.by_peer.get(peer, 0)
            if count >= self.per_client and not exempt:
                self.refused["max_connections_per_client"] += 1
                return False
            self.by_peer[peer] = count + 1
        self.open += 1
        return True

    def release(self, peer: str | None) -> None:
        self.open -= 1
        if peer is not None:
            count = self.by_peer.get(peer, 0) - 1
            if count > 0:
                self.by_peer[peer] = count
            else:
                self.by_peer.pop(peer, None)


_Item = TypeVar("_Item")


class FairQueue(Generic[_Item]):
    """Items waiting by peer, taken one peer at a time in turn: a peer with
    a thousand waiting does not delay one with a single item by more than
    one of its own."""

    def __init__(self) -> None:
        self._by_peer: dict[Hashable, deque[_Item]] = {}
        self._turns: deque[Hashable] = deque()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def waiting(self, peer: Hashable) -> bool:
        """Whether ``peer`` has an item waiting (a new one must queue behind it)."""
        return peer in self._by_peer

    def push(self, peer: Hashable, item: _Item) -> None:
        items = self._by_peer.get(peer)
        if items is None:
            items = self._by_peer[peer] = deque()
            self._turns.append(peer)
        items.append(item)
        self._count += 1

    def pop(self) -> _Item:
        """The oldest item of the peer whose turn it is (IndexError when empty)."""
        peer = self._turns.popleft()
        items = self._by_peer[peer]
        item = items.popleft()
        if items:
            self._turns.append(peer)
        else:
            del self._by_peer[peer]
        self._count -= 1
        return item
