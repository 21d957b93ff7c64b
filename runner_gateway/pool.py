"""A runner's hosts as one pool: placement, in-flight counts and the fair queue.

Each host has an :class:`~runner_gateway.upstream.UpstreamClient` (its own
keep-alive connections) and a :class:`~runner_gateway.placement.HostState`.
The proxy asks :meth:`RunnerPool.acquire` for a host per request (and per
retry) and gives it back with :meth:`RunnerPool.release`. With
``maxConcurrent`` set, a request that finds every up host full waits in a
FIFO queue of at most ``maxQueue`` requests for ``queueTimeout``; a slot
that frees goes to the head of the queue. health.py keeps the states
current; placement.py decides.

A pool of one host without ``maxConcurrent`` is the common case and costs a
flag test and two counter updates per request over a plain client.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS

from runner_gateway.placement import HostState, choose, model_listed
from runner_gateway.settings import RunnerSettings
from runner_gateway.upstream import UpstreamCall, UpstreamClient, UpstreamPool

__all__ = ["DOWN", "FULL", "QUEUED", "Collected", "Collector", "PoolHost", "RunnerPool", "Waiter"]

log = Logger(namespace="runner_gateway.pool")

# acquire()'s answers when there is no host to send to at once.
DOWN = "down"  # no up host (none left that this request has not failed on)
FULL = "full"  # every up host is busy and the queue is full
QUEUED = "queued"  # the waiter is queued: granted() or queue_expired() follows


class Waiter(Protocol):
    """A request waiting in the queue (the proxy's exchange)."""

    @property
    def model(self) -> str | None: ...

    def granted(self, host: PoolHost) -> None: ...

    def queue_expired(self, reason: str) -> None: ...


def _netloc(host: str, port: int, scheme: str) -> bytes:
    shown = f"[{host}]" if ":" in host else host
    default = 443 if scheme == "https" else 80
    return (shown if port == default else f"{shown}:{port}").encode("ascii")


# What a Collector reports: the status (None: no answer) and the body.
Collected = Callable[[int | None, bytes], None]


class Collector:
    """A whole small answer (a check, a listing): an upstream ResponseHandler that
    reports the status and body once, or (None, b"") on failure, timeout or a
    body over ``limit``."""

    def __init__(self, done: Collected, limit: int) -> None:
        self.done: Collected | None = done
        self.limit = limit
        self.code = 0
        self.body: list[bytes] = []
        self.size = 0
        self.call: UpstreamCall | None = None
        self.timer: IDelayedCall | None = None

    def response_head(
        self,
        code: int,
        phrase: bytes,
        headers: list[tuple[bytes, bytes]],
        length: int | None,
        dropped: int,
    ) -> None:
        self.code = code

    def response_body(self, data: bytes) -> None:
        self.size += len(data)
        if self.size <= self.limit:
            self.body.append(data)

    def response_end(self, reason: Failure | None) -> None:
        if reason is None and self.size <= self.limit:
            self._finish(self.code, b"".join(self.body))
        else:
            self._finish(None, b"")

    def request_failed(self, reason: Failure) -> None:
        self._finish(None, b"")

    def hold(self) -> None:
        pass

    def release(self) -> None:
        pass

    def timed_out(self) -> None:
        self.timer = None
        self.cancel()

    def cancel(self) -> None:
        call, self.call = self.call, None
        if call is not None:
            call.abort()
        self._finish(None, b"")

    def _finish(self, code: int | None, body: bytes) -> None:
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        done, self.done = self.done, None
        if done is not None:
            done(code, body)


class PoolHost:
    """One host of a pool."""

    __slots__ = ("client", "index", "label", "netloc", "state")

    def __init__(self, index: int, label: str, netloc: bytes, client: UpstreamClient) -> None:
        self.index = index
        self.label = label
        self.netloc = netloc  # the Host header it expects
        self.client = client
        self.state = HostState(label)


class RunnerPool:
    """The hosts of one runner and its queue."""

    def __init__(
        self,
        runner: RunnerSettings,
        reactor: Any,
        upstream: UpstreamPool,
        tls_policy: IPolicyForHTTPS | None = None,
    ) -> None:
        self.runner = runner
        self.reactor = reactor
        https = runner.scheme == "https"
        tag = object() if https else None  # an https runner's TLS policy is its own
        self.hosts: list[PoolHost] = []
        for i, address in enumerate(runner.addresses):
            client = UpstreamClient(
                reactor,
                upstream,
                scheme=runner.scheme,
                host=address.host,
                port=address.port,
                connect_timeout=runner.connect_timeout,
                tls_policy=tls_policy,
                tag=tag,
                idle_timeout=runner.keep_alive,
            )
            netloc = _netloc(address.host, address.port, runner.scheme)
            self.hosts.append(PoolHost(i, str(address), netloc, client))
        self.states = [h.state for h in self.hosts]
        # The fast path: one host, nothing to place and no queue.
        self.single = len(self.hosts) == 1 and runner.max_concurrent <= 0
        self.queue: deque[Waiter] = deque()
        self._timers: dict[int, IDelayedCall] = {}  # id(waiter) -> its queue timeout
        self.turn = 0
        # Set while health checks run (health.py): only then may a failed
        # request take a host out, since only a check brings it back.
        self.checking = False
        self.on_models: Callable[[PoolHost], None] | None = None  # a manage request ended

    # ------------------------------------------------------------ state

    @property
    def name(self) -> str:
        return self.runner.name

    def up_count(self) -> int:
        return sum(1 for s in self.states if s.up)

    def queue_depth(self) -> int:
        return len(self.queue)

    def model_listed(self, model: str) -> bool | None:
        """placement.model_listed over this pool's hosts."""
        return model_listed(self.states, model)

    def passive_failure(self, host: PoolHost) -> None:
        """A request found the host refusing, resetting or not answering in time."""
        if not self.checking:
            return
        state = host.state
        state.passes = 0
        state.fails += 1
        if state.up and state.fails >= self.runner.health_check.unhealthy_after:
            self.mark(host, False, "requests to it failed")

    def mark(self, host: PoolHost, up: bool, why: str) -> None:
        """Record a host going up or down (the state's counters are already set)."""
        host.state.up = up
        if not up:
            host.state.inventory = False
        emit = log.info if up else log.warn
        emit(
            "runner {runner} host {host} is {state} ({why})",
            runner=self.runner.name,
            host=host.label,
            state="up" if up else "down",
            why=why,
        )
        if up:
            self._drain()
        elif not any(s.up for s in self.states):
            for waiter in self._take_all():
                waiter.queue_expired(DOWN)

    # ------------------------------------------------------------ placement

    def acquire(self, waiter: Waiter, tried: tuple[int, ...] = ()) -> PoolHost | str:
        """A host for ``waiter`` (counted as in flight), or DOWN, FULL or QUEUED."""
        if self.single:
            host = self.hosts[0]
            if tried or not host.state.up:
                return DOWN
            host.state.outstanding += 1
            host.state.served += 1
            return host
        runner = self.runner
        if not self.queue or tried:  # a retry does not queue behind new requests
            index = choose(
                self.states, runner.balance, waiter.model, runner.max_concurrent, tried, self.turn
            )
            if index is not None:
                return self._take(index)
        if not any(s.up for i, s in enumerate(self.states) if i not in tried):
            return DOWN
        if tried or len(self.queue) >= runner.max_queue:
            return FULL
        self.queue.append(waiter)
        self._timers[id(waiter)] = self.reactor.callLater(
            runner.queue_timeout, self._expire, waiter
        )
        return QUEUED

    def _take(self, index: int) -> PoolHost:
        self.turn = index + 1
        state = self.states[index]
        state.outstanding += 1
        state.served += 1
        return self.hosts[index]

    def release(self, host: PoolHost) -> None:
        """The request placed on ``host`` is done with it."""
        host.state.outstanding -= 1
        if self.queue:
            self._drain()

    def leave(self, waiter: Waiter) -> None:
        """A queued request gives up (its client left): out of the queue at once."""
        timer = self._timers.pop(id(waiter), None)
        if timer is not None:
            if timer.active():
                timer.cancel()
            with contextlib.suppress(ValueError):
                self.queue.remove(waiter)

    def _drain(self) -> None:
        runner = self.runner
        while self.queue:
            head = self.queue[0]
            index = choose(
                self.states, runner.balance, head.model, runner.max_concurrent, (), self.turn
            )
            if index is None:
                return
            self.queue.popleft()
            timer = self._timers.pop(id(head), None)
            if timer is not None and timer.active():
                timer.cancel()
            head.granted(self._take(index))

    def _expire(self, waiter: Waiter) -> None:
        self._timers.pop(id(waiter), None)
        try:
            self.queue.remove(waiter)
        except ValueError:
            return
        waiter.queue_expired(FULL)

    def _take_all(self) -> list[Waiter]:
        waiters = list(self.queue)
        self.queue.clear()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        return waiters
