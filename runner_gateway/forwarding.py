"""Who the client is when a proxy stands in front: ``server.trustedProxies``.

Pure logic, no Twisted. What a peer says in ``X-Forwarded-For``,
``Forwarded``, ``X-Real-IP`` or ``X-Request-Id`` is believed only when the
peer is a configured proxy (a load balancer in front of the gateway);
anybody else could claim any address. :class:`TrustedProxies` is the parsed
setting, with :meth:`~TrustedProxies.is_trusted` for any layer that needs it
(the header rewriting in proxy.py, the request id and access log in site.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["TrustedProxies", "client_address", "parse_trusted_proxies"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_KEPT = 4096  # is_trusted answers remembered (peer addresses repeat)


@dataclass(frozen=True)
class TrustedProxies:
    """A set of networks; empty (the default) trusts nobody and costs nothing."""

    networks: tuple[_Network, ...] = ()
    _answers: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def is_trusted(self, ip: str) -> bool:
        """Whether ``ip`` (an address as text; an IPv4-mapped IPv6 counts as
        its IPv4 address) is in one of the networks. Anything unparsable is not."""
        if not self.networks:
            return False
        answer = self._answers.get(ip)
        if answer is None:
            answer = self._lookup(ip)
            if len(self._answers) >= _KEPT:
                self._answers.clear()
            self._answers[ip] = answer
        return answer

    def _lookup(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip.strip().removeprefix("[").removesuffix("]"))
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


def parse_trusted_proxies(items: Iterable[object]) -> TrustedProxies:
    """Parse CIDR texts (``10.0.0.0/8``, ``::1``); ValueError names the bad one.

    Strict: host bits set (``10.0.0.1/8``) are an error, as a typo there
    would trust more (or other) peers than meant.
    """
    networks: list[_Network] = []
    for item in items:
        if not isinstance(item, str) or isinstance(item, bool):
            raise ValueError(f"expected a network such as 10.0.0.0/8, got {item!r}")
        try:
            network = ipaddress.ip_network(item.strip(), strict=True)
        except ValueError as exc:
            raise ValueError(f"invalid network {item!r}: {exc}") from None
        networks.append(network)
    return TrustedProxies(tuple(networks))


def client_address(peer: str, trusted: TrustedProxies, forwarded_for: Sequence[bytes]) -> str:
    """The client's address: ``peer``, or for a trusted peer the right-most
    address in its ``X-Forwarded-For`` chain that is not a trusted proxy
    (the left-most when all are). A malformed entry ends the walk: what is
    left of it was written by someone not trusted."""
    if not trusted.is_trusted(peer):
        return peer
    client = peer
    hops = [h.strip() for value in forwarded_for for h in value.split(b",")]
    for hop in reversed(hops):
        try:
            text = hop.decode("ascii")
            ipaddress.ip_address(text)
        except (UnicodeDecodeError, ValueError):
            break
        client = text
        if not trusted.is_trusted(text):
            break
    return client
