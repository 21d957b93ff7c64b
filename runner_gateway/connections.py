"""How many client connections a process takes, in all and per peer address.

Pure arithmetic (no Twisted): GatewaySite asks :meth:`ConnectionLimits.admit`
for every accepted connection, before any byte of it is read, and tells
:meth:`ConnectionLimits.release` when it closes.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = [
    "HEALTH_RESERVE",
    "LOCAL_PROBES",
    "ConnectionLimits",
    "default_max_connections",
]

# Descriptors kept for the process itself (listeners, logs, settings and key
# files, Redis, the metrics listener) before client and upstream connections.
_OWN_DESCRIPTORS = 128
# Past maxConnections, this many more connections from LOCAL_PROBES or exempt
# peers (a load balancer) are still taken, so their health probes are answered
# while a flood from elsewhere is refused.
HEALTH_RESERVE = 16
LOCAL_PROBES = frozenset({"127.0.0.1", "::1"})

REFUSED_REASONS = ("max_connections", "max_connections_per_client")


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
