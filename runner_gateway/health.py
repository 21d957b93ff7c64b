"""Active health checks and model inventories for a runner pool.

Every ``healthCheck.interval`` each host gets ``GET healthCheck.path``; an
answer below 500 within ``timeout`` passes. ``unhealthyAfter`` failures in a
row (checks, or requests that found the host refusing, resetting or timing
out: pool.py's passive ejection) take a host out; ``healthyAfter`` passes
bring it back. Passive ejection is on only while checks run, because only a
check brings a host back.

When the pool places by model or refuses unknown models, a passing check is
followed by the host's inventory: ``/api/tags`` (pulled) and ``/api/ps``
(loaded) for Ollama, ``/v1/models`` when ``/api/tags`` is not served
(OpenAI-compatible servers). A ``models:manage`` request that ends marks its
host's inventory stale and fetches it again at once.

The requests go through the hosts' own keep-alive clients (upstream.py).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall

from runner_gateway.placement import note_check, parse_inventory
from runner_gateway.pool import Collected, Collector, PoolHost, RunnerPool
from runner_gateway.upstream import request_head

__all__ = ["HealthChecker"]

_LISTING_LIMIT = 4 * 1024 * 1024  # a model listing bigger than this is not read
_USER_AGENT = b"runner-gateway-health"


class HealthChecker:
    """Checks one pool's hosts on the interval (start/stop with the service)."""

    def __init__(self, pool: RunnerPool, reactor: Any) -> None:
        self.pool = pool
        self.reactor = reactor
        self.settings = pool.runner.health_check
        runner = pool.runner
        self.inventories = runner.balance == "model-aware" or runner.strict_models
        self._timer: IDelayedCall | None = None
        self._probes: set[Collector] = set()
        self._busy: set[int] = set()  # hosts with a check in flight
        # Per host: bumped when its models change, so an older read in flight
        # cannot overwrite what the newer one finds.
        self._reads = [0] * len(pool.hosts)
        self.running = False

    def start(self) -> None:
        if self.running or self.settings.interval <= 0:
            return
        self.running = True
        self.pool.checking = True
        self.pool.on_models = self.refresh
        self._timer = self.reactor.callLater(0, self._tick)

    def stop(self) -> None:
        self.running = False
        self.pool.checking = False
        self.pool.on_models = None
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        for probe in list(self._probes):
            probe.done = None
            probe.cancel()
        self._probes.clear()
        self._busy.clear()

    def refresh(self, host: PoolHost) -> None:
        """The host's models changed (a models:manage request ended): read them again."""
        host.state.inventory = False
        if self.running and self.inventories and host.state.up:
            self._inventory(host)

    # ------------------------------------------------------------ checks

    def _tick(self) -> None:
        self._timer = self.reactor.callLater(self.settings.interval, self._tick)
        for host in self.pool.hosts:
            if host.index not in self._busy:
                self._check(host)

    def _check(self, host: PoolHost) -> None:
        self._busy.add(host.index)

        def done(code: int | None, body: bytes) -> None:
            self._busy.discard(host.index)
            self._checked(host, code is not None and code < 500)

        self._get(host, self.settings.path.encode("ascii"), done, 64 * 1024)

    def _checked(self, host: PoolHost, ok: bool) -> None:
        if not self.running:
            return
        state = host.state
        check = self.settings
        if note_check(state, ok, check.unhealthy_after, check.healthy_after):
            why = "health check passed" if ok else f"{check.unhealthy_after} check(s) failed"
            self.pool.mark(host, state.up, why)
        if ok and state.up and self.inventories:
            self._inventory(host)

    def _inventory(self, host: PoolHost) -> None:
        state = host.state
        self._reads[host.index] += 1
        read = self._reads[host.index]

        def tags(code: int | None, body: bytes) -> None:
            if read != self._reads[host.index]:
                return
            pulled = parse_inventory(body) if code == 200 else None
            if pulled is None:
                self._get(host, b"/v1/models", models, _LISTING_LIMIT)
                return
            state.pulled = pulled
            self._get(host, b"/api/ps", running, _LISTING_LIMIT)

        def running(code: int | None, body: bytes) -> None:
            if read != self._reads[host.index]:
                return
            loaded = parse_inventory(body) if code == 200 else None
            state.loaded = loaded or frozenset()
            state.inventory = self.running and state.up

        def models(code: int | None, body: bytes) -> None:
            if read != self._reads[host.index]:
                return
            listed = parse_inventory(body) if code == 200 else None
            if listed is not None:
                state.pulled, state.loaded = listed, frozenset()
                state.inventory = self.running and state.up

        self._get(host, b"/api/tags", tags, _LISTING_LIMIT)

    def _get(self, host: PoolHost, path: bytes, done: Collected, limit: int) -> None:
        if not self.running:
            return
        probes = self._probes

        def finished(code: int | None, body: bytes) -> None:
            probes.discard(probe)
            if self.running:
                done(code, body)

        probe = Collector(finished, limit)
        probes.add(probe)
        head = request_head(b"GET", path, [(b"User-Agent", _USER_AGENT), (b"Host", host.netloc)], 0)
        probe.timer = self.reactor.callLater(self.settings.timeout, probe.timed_out)
        probe.call = host.client.request(head, None, 0, False, probe)
