"""The one Redis connection of a process (``redis:`` settings), for state replicas share.

The client is txredisapi (maintained, Twisted-native: no threads, works on
whatever reactor twistd runs, here epoll). It reconnects by itself with
exponential backoff (up to 10 s between tries); this module adds what the
gateway needs around it:

- a deadline on every command (``redis.commandTimeout``): txredisapi's reply
  timeout, which drops a connection that stops answering, and a refusal at
  once while the connection is down, so no request ever waits on Redis;
- health: ``up``, logged once per outage (and once when it is back), for
  /readyz detail and the ``runner_gateway_redis_up`` metric;
- pub/sub on a second connection, re-subscribed on every reconnect, with a
  callback to re-read whatever the process keeps from Redis.

Keys are ``<keyPrefix>{rg}:<name>``: the ``{rg}`` hash tag puts all of them in
one Redis Cluster slot, so multi-key commands stay possible. ``rediss://``
verifies the server's certificate against ``redis.caPath`` or the system's
trust store, and its host name. Log lines name ``display_url`` only, never
the password.

``SharedRevocations`` keeps a RevocationState's Redis half; ``run_tool_call``
is how paseto-tool (which has no reactor running) makes a few calls.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from runner_gateway.revocation import Revocation, RevocationError, RevocationState
from runner_gateway.settings import RedisSettings

__all__ = [
    "RedisReplyError",
    "SharedRevocations",
    "SharedState",
    "SharedStateUnavailable",
    "load_revocations",
    "run_tool_call",
    "store_revocation",
]

_log = Logger()
CONNECT_TIMEOUT = 5.0
RESYNC_DELAY = 1.0
# A PING on both connections this often: a peer gone without a word (a host
# down, a dropped route) is noticed by the reply deadline, not never.
HEARTBEAT = 5.0

T = TypeVar("T")


class SharedStateUnavailable(Exception):
    """Redis is not connected (or did not answer in time)."""


class RedisReplyError(SharedStateUnavailable):
    """Redis answered with an error (e.g. NOSCRIPT); its text, which names no secret."""


class _Protocol(txredisapi.RedisProtocol):  # type: ignore[misc]
    def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
        # The same bytes as txredisapi's, built in one join: its encoder took
        # a fifth of the client's CPU time per limits admission.
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            if isinstance(arg, str):
                raw = arg.encode(self.charset or "utf-8", self.errors)
            elif isinstance(arg, bytes):
                raw = arg
            elif isinstance(arg, float):
                raw = format(arg, "f").encode()
            else:
                raw = str(arg).encode()
            parts.append(b"$%d\r\n%b\r\n" % (len(raw), raw))
        return b"".join(parts)


class _Factory(txredisapi.RedisFactory):  # type: ignore[misc]
    """Tells its owner when the connection comes and goes."""

    protocol = _Protocol

    # Reconnect backoff: 0.5 s, then x e, capped so a replica catches up within 5 s of Redis.
    initialDelay = 0.5
    maxDelay = 5.0

    def __init__(self, owner: Callable[[bool], None], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owner = owner
        self.failed: Callable[[str], None] = lambda why: None

    def connectionError(self, why: str) -> None:
        # AUTH or SELECT refused: txredisapi stops trying (and would leave its
        # start-up Deferred failing unhandled); say why instead.
        self.deferred = None
        self.failed(why)

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        if conn in self.pool:
            # Up once Redis answers: a TLS connection is "made" before its handshake,
            # and one that fails verification must not count as up even briefly.
            ping = conn.execute_command("PING")

            def answered(_: object) -> None:
                if conn in self.pool:
                    self.owner(True)

            ping.addCallbacks(answered, lambda failure: None)

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)
        if not self.size:
            self.owner(False)


class _Subscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    def messageReceived(self, pattern: Any, channel: str, message: str) -> None:
        self.factory.on_message(channel, message)


class _SubscriberFactory(_Factory):
    protocol = _Subscriber

    def __init__(
        self, owner: Callable[[bool], None], on_message: Callable[[str, str], None], **kw: Any
    ) -> None:
        super().__init__(owner, None, None, 1, isLazy=True, **kw)
        self.on_message = on_message


class SharedState:
    """A command connection and a subscriber connection to one Redis."""

    def __init__(self, settings: RedisSettings, reactor: Any) -> None:
        self.settings = settings
        self.reactor = reactor
        self.up = False
        self._subscribed = False
        self._outage_logged = False
        self._ever_up = False  # the first connection is said once (the start)
        self._channels: dict[str, Callable[[str], None]] = {}
        self._on_connect: list[Callable[[], None]] = []
        self._factory: _Factory | None = None
        self._subscriber: _SubscriberFactory | None = None
        self._first: Any = None
        self._heartbeat = LoopingCall(self._ping)
        self._heartbeat.clock = reactor
        self.error = ""  # why Redis refused us (AUTH, SELECT); never holds the password

    def detail(self) -> dict[str, str]:
        """For /readyz: said while down, not a reason to be unready."""
        if self.up:
            return {}
        return {"redis": "unreachable; using the last shared state (revocations)"}

    def key(self, name: str) -> str:
        return f"{self.settings.key_prefix}{{rg}}:{name}"

    # -- connections

    def _endpoint(self) -> Any:
        s = self.settings
        endpoint: Any = HostnameEndpoint(self.reactor, s.host, s.port, timeout=CONNECT_TIMEOUT)
        if s.tls:
            if s.ca_path:
                with open(s.ca_path, "rb") as f:
                    trust: Any = Certificate.loadPEM(f.read())
            else:
                trust = platformTrust()
            endpoint = wrapClientTLS(optionsForClientTLS(s.host, trustRoot=trust), endpoint)
        return endpoint

    def _auth(self) -> dict[str, Any]:
        s = self.settings
        return {
            "password": s.password or None,
            "username": s.username or None,
            "replyTimeout": s.command_timeout,
            "convertNumbers": False,
        }

    def start(self) -> None:
        if self._factory is not None:
            return
        self._factory = _Factory(
            self._command_link,
            f"{self.settings.host}:{self.settings.port}",
            self.settings.database or None,  # no SELECT for db 0
            1,
            isLazy=True,
            **self._auth(),
        )
        self._factory.failed = self._refused
        self._factory.startConnecting(self._endpoint())
        # A Redis that is down from the start never drops a connection: say so here.
        self._first = self.reactor.callLater(CONNECT_TIMEOUT, self._command_link, False)
        self._heartbeat.start(HEARTBEAT, now=False)
        if self._channels:
            self._subscriber = _SubscriberFactory(
                self._subscriber_link, self._message, **self._auth()
            )
            self._subscriber.failed = self._refused
            self._subscriber.startConnecting(self._endpoint())

    def stop(self) -> defer.Deferred[Any]:
        if self._first is not None and self._first.active():
            self._first.cancel()
        if self._heartbeat.running:
            self._heartbeat.stop()
        stopping = []
        for factory in (self._factory, self._subscriber):
            if factory is not None:
                stopping.append(factory.disconnect())
        self._factory = self._subscriber = None
        self.up = False
        return defer.gatherResults(stopping, consumeErrors=True)

    def _command_link(self, up: bool) -> None:
        if self._first is not None and self._first.active():
            self._first.cancel()
        self.up = up
        if up:
            if self._outage_logged:
                _log.info("Redis at {url} is reachable again", url=self.settings.display_url)
            elif not self._ever_up:
                _log.info("Redis at {url} is connected", url=self.settings.display_url)
            self._outage_logged = False
            self._ever_up = True
            self._connected()
        elif not self._outage_logged:
            self._outage_logged = True
            _log.warn(
                "Redis at {url} is unreachable: keeping the last shared state, retrying",
                url=self.settings.display_url,
            )

    def _ping(self) -> None:
        # A missed reply makes txredisapi drop the connection, and so mark it down.
        for factory in (self._factory, self._subscriber):
            if factory is not None and factory.pool:
                factory.pool[0].execute_command("PING").addErrback(lambda failure: None)

    def _refused(self, why: str) -> None:
        if not self.error:
            _log.error(
                "Redis at {url} refused the connection ({why}); not retrying: fix redis.url "
                "or REDIS_PASSWORD and restart",
                url=self.settings.display_url,
                why=why,
            )
        self.error = why

    def _subscriber_link(self, up: bool) -> None:
        self._subscribed = False
        if up and self._subscriber is not None:
            conn = self._subscriber.pool[0]
            d = conn.subscribe(list(self._channels))

            def subscribed(_: object) -> None:
                self._subscribed = True
                self._connected()

            d.addCallbacks(subscribed, lambda f: conn.transport.abortConnection())

    def _connected(self) -> None:
        # Both links up: anything published while either was down is read again.
        if self.up and (self._subscribed or not self._channels):
            for callback in self._on_connect:
                callback()

    def _message(self, channel: str, message: str) -> None:
        handler = self._channels.get(channel)
        if handler is not None:
            handler(message)

    # -- the API

    def subscribe(
        self, channel: str, on_message: Callable[[str], None], on_connect: Callable[[], None]
    ) -> None:
        """Call before start(): messages on channel, and on_connect after each (re)connect."""
        self._channels[channel] = on_message
        self._on_connect.append(on_connect)

    def command(self, name: str, *args: Any) -> defer.Deferred[Any]:
        """A Redis command, failed with SharedStateUnavailable unless answered in time
        (txredisapi's reply timeout, ``redis.commandTimeout``, which also drops the
        connection)."""
        factory = self._factory
        if not self.up or factory is None or not factory.pool:
            return defer.fail(SharedStateUnavailable("Redis is not connected"))
        # Straight to the one connection: txredisapi's handler would look it up
        # through a queue and a generator per command (half the client's CPU
        # time per command, measured with bench/limits.py's redis side).
        try:
            d: defer.Deferred[Any] = factory.pool[0].execute_command(name, *args)
        except txredisapi.ConnectionError:
            return defer.fail(SharedStateUnavailable("Redis is not connected"))

        def unavailable(failure: Any) -> Any:
            if isinstance(failure.value, txredisapi.ResponseError):
                raise RedisReplyError(str(failure.value))
            raise SharedStateUnavailable(
                f"Redis did not answer {name} ({type(failure.value).__name__})"
            )

        return d.addErrback(unavailable)

    def wait_up(self, timeout: float) -> defer.Deferred[None]:
        """Fires once connected; SharedStateUnavailable after timeout."""
        result: defer.Deferred[None] = defer.Deferred()

        def check(deadline: float) -> None:
            if self.up:
                result.callback(None)
            elif self.error or self.reactor.seconds() >= deadline:
                why = f" ({self.error})" if self.error else ""
                result.errback(
                    SharedStateUnavailable(
                        f"cannot reach Redis at {self.settings.display_url}{why}"
                    )
                )
            else:
                self.reactor.callLater(0.02, check, deadline)

        check(self.reactor.seconds() + timeout)
        return result


# ------------------------------------------------------------------ revocations

_REVOCATIONS = "revocations"


def _revocations_key(shared: SharedState) -> str:
    return shared.key(_REVOCATIONS)


def load_revocations(shared: SharedState) -> defer.Deferred[list[Revocation]]:
    """Every entry in Redis; entries that do not parse are skipped (and logged)."""

    def parse_all(raw: list[str] | None) -> list[Revocation]:
        entries = []
        flat = raw or []
        for field, text in zip(flat[::2], flat[1::2], strict=True):
            try:
                entries.append(Revocation.from_mapping(json.loads(text)))
            except (ValueError, RevocationError):
                _log.warn("ignoring a malformed revocation entry in Redis ({field})", field=field)
        return entries

    return shared.command("HGETALL", _revocations_key(shared)).addCallback(parse_all)


@defer.inlineCallbacks
def store_revocation(shared: SharedState, entry: Revocation) -> Any:
    """Add the entry and tell every replica; entries past their expiry are removed."""
    key = _revocations_key(shared)
    yield shared.command("HSET", key, entry.key, entry.to_json())
    yield shared.command("PUBLISH", key, entry.to_json())
    now = shared.reactor.seconds()
    stale = [e.key for e in (yield load_revocations(shared)) if e.expires and e.expires <= now]
    if stale:
        yield shared.command("HDEL", key, *stale)


class SharedRevocations:
    """The Redis half of a RevocationState: full re-read on connect, entries as published."""

    def __init__(self, shared: SharedState, state: RevocationState, clock: Callable[[], float]):
        self.shared = shared
        self.state = state
        self.clock = clock
        self._retry: Any = None
        shared.subscribe(_revocations_key(shared), self._published, self.resync)

    def _published(self, message: str) -> None:
        try:
            entry = Revocation.from_mapping(json.loads(message))
        except (ValueError, RevocationError):
            _log.warn("ignoring a malformed revocation message from Redis")
            return
        if self.state.add_shared([entry], self.clock()):
            _log.info("revocation from Redis in force: {key}", key=entry.key)

    def resync(self) -> None:
        def loaded(entries: list[Revocation]) -> None:
            if self.state.add_shared(entries, self.clock()):
                _log.info("revocation list re-read from Redis: {n} entries", n=len(entries))

        def failed(failure: Any) -> None:
            # Keep what we have; try again while the link is up (the next connect does anyway).
            if self.shared.up:
                self._retry = self.shared.reactor.callLater(RESYNC_DELAY, self.resync)

        load_revocations(self.shared).addCallbacks(loaded, failed)


# ------------------------------------------------------------------ paseto-tool


def run_tool_call(settings: RedisSettings, call: Callable[[SharedState], Any]) -> Any:
    """Run call(shared) to completion on a reactor of its own (paseto-tool)."""
    from twisted.internet import reactor

    shared = SharedState(settings, reactor)
    outcome: list[Any] = []

    @defer.inlineCallbacks
    def work() -> Any:
        try:
            shared.start()
            yield shared.wait_up(CONNECT_TIMEOUT)
            outcome.append((True, (yield defer.maybeDeferred(call, shared))))
        except Exception as exc:  # reported below, after the reactor stops
            outcome.append((False, exc))
        finally:
            yield shared.stop()
            reactor.stop()

    reactor.callWhenRunning(work)
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]
    ok, value = outcome[0]
    if not ok:
        if isinstance(value, SharedStateUnavailable):
            raise RevocationError(str(value))
        raise value
    return value
