"""The gateway service: settings -> resource tree -> listeners, plus signals.

entry.py builds it (or workers.py's supervisor and workers, which build on
it) for the twistd plugin. A bad start (settings,
keys, certificates, a port that cannot be bound) ends the process with one
line on stderr and a non-zero status, never a traceback.

SIGHUP re-reads settings (and TLS files) and swaps the whole resource tree in
one assignment: requests in flight keep the chain they started with. SIGTERM
and SIGINT stop accepting, let requests in flight finish for up to
``server.drainTimeout``, then cut what is left.
"""

from __future__ import annotations

import gc
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.client import _HTTP11ClientFactory as HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from runner_gateway import __version__
from runner_gateway.admission import Limiter
from runner_gateway.connections import (
    BACKLOG,
    HEALTH_RESERVE,
    ConnectionLimits,
    default_max_connections,
    defer_accept,
)
from runner_gateway.context import RequestObserver
from runner_gateway.edge.site import GatewaySite
from runner_gateway.logs import (
    ACCESS_NAMESPACE,
    access_line,
    logs_access,
    make_observer,
    write_line,
)
from runner_gateway.revocation import RevocationState
from runner_gateway.settings import (
    Address,
    RunnerSettings,
    Settings,
    SettingsError,
    restart_needed,
)
from runner_gateway.tree import CorsPolicy, GatewayRoot, Route
from runner_gateway.upstream import UpstreamPool

if TYPE_CHECKING:
    from runner_gateway.health import HealthChecker
    from runner_gateway.pool import RunnerPool

__all__ = ["GatewayService", "StartupError", "build_root"]

_log = Logger()


class StartupError(SystemExit):
    """Ends a bad start with one line on stderr and exit status 1."""

    def __init__(self, message: str) -> None:
        line = f"runner-gateway: cannot start: {message}"
        if sys.stderr is not sys.__stderr__ and sys.__stderr__ is not None:
            # twistd has already swapped sys.stderr for its log file.
            sys.__stderr__.write(line + "\n")
            sys.__stderr__.flush()
            super().__init__(1)
        else:
            super().__init__(line)


@dataclass
class _Generation:
    """Everything built from one version of the settings."""

    settings: Settings
    root: GatewayRoot
    pools: list[RunnerPool]
    checkers: list[HealthChecker]


def build_root(
    settings: Settings,
    reactor: Any,
    pool: UpstreamPool,
    readiness: Callable[[], list[str]],
    limiter: Limiter | None = None,
    revocations: RevocationState | None = None,
    details: Callable[[], dict[str, str]] | None = None,
    pools: list[RunnerPool] | None = None,
    states: Callable[[], dict[str, object]] | None = None,
) -> GatewayRoot:
    """The resource tree for one settings generation; raises SettingsError on bad keys.

    Each runner's :class:`RunnerPool` is appended to ``pools`` when given.
    """
    from runner_gateway import oauth
    from runner_gateway.admission import AdmissionResource
    from runner_gateway.auth import AuthResource, TokenCache
    from runner_gateway.authz import AuthorizationResource
    from runner_gateway.paseto import build_verifier
    from runner_gateway.proxy import ReverseProxyResource

    verifier = build_verifier(settings.paseto, reactor.seconds, settings.source_of)
    cache = TokenCache.from_settings(settings.paseto, revocations)
    routes = []
    for runner in settings.runners:
        proxy = ReverseProxyResource(runner, reactor, pool)
        if pools is not None:
            pools.append(proxy.runner_pool)
        admitted: Any = proxy if limiter is None else AdmissionResource(proxy, limiter)
        policy = AuthorizationResource(admitted, runner, settings.authorization)
        extra = oauth.challenge_parameter(settings, runner)
        guarded = AuthResource(policy, verifier, cache, reactor.seconds, extra)
        routes.append(Route(runner, guarded))
    paths = oauth.resources(settings, verifier, cache, reactor.seconds)
    cors = CorsPolicy(settings.server.cors_origins)
    return GatewayRoot(routes, cors, readiness, details, paths, states)


def _connection_limits(settings: Settings) -> ConnectionLimits:
    """server.maxConnections (0: sized from this process's descriptor limit)
    and maxConnectionsPerClient (0: no cap per peer)."""
    import resource

    server = settings.server
    total = server.max_connections
    if not total:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        total = default_max_connections(soft if soft != resource.RLIM_INFINITY else 1 << 20)
    per_client = server.max_connections_per_client or total + HEALTH_RESERVE
    return ConnectionLimits(total, per_client)


def _endpoint(reactor: Any, address: Address, tls_creator: Any = None) -> IStreamServerEndpoint:
    host = address.host
    if tls_creator is not None:
        from runner_gateway.httpsonly import HTTPSOnlyEndpoint

        return HTTPSOnlyEndpoint(_endpoint(reactor, address), tls_creator)
    if ":" in host:
        return TCP6ServerEndpoint(reactor, address.port, backlog=BACKLOG, interface=host)
    return TCP4ServerEndpoint(reactor, address.port, backlog=BACKLOG, interface=host)


class GatewayService(MultiService):
    """Owns the listeners and the current settings generation."""

    def __init__(
        self,
        load: Callable[[], Settings],
        reactor: Any,
        observer: ILogObserver | None = None,
    ) -> None:
        super().__init__()
        self.load = load
        self.reactor = reactor
        self.observer = observer
        self.pool = UpstreamPool(reactor, max_idle_per_key=32, idle_timeout=60)
        self.ports: list[IListeningPort] = []
        self.listening = False
        self.tls: Any = None
        self.observers: list[RequestObserver] = []
        self.metrics: Any = None
        settings = load()
        from runner_gateway.revocation_feed import RevocationFeed

        # Redis (redis.url): one connection per process, for whatever replicas share.
        self.shared: Any = None
        if settings.redis.enabled:
            from runner_gateway.shared_state import SharedState

            self.shared = SharedState(settings.redis, reactor)
        self.limiter = Limiter(reactor, settings.limits, self._limits_store(), self.shared)
        self.observers.append(self.limiter)
        self.revocations = RevocationState()
        self.revocation_feed = RevocationFeed(self.revocations, settings, reactor, self.shared)
        self.generation = self._build(settings)
        self.site = GatewaySite(
            self.generation.root,
            reactor,
            max_body_size=max(r.max_body_size for r in settings.runners),
            header_timeout=settings.server.header_timeout,
            keep_alive_timeout=settings.server.keep_alive_timeout,
            body_min_rate=settings.server.body_min_rate,
            body_min_rate_grace=settings.server.body_min_rate_grace,
            connection_limits=_connection_limits(settings),
            observers=self.observers,
            trace=settings.logging.level == "trace",
        )
        self.site.trusted_proxies = settings.server.trusted_proxies
        limits = self.site.connection_limits
        if limits is not None:
            # A trusted proxy is exempt from maxConnectionsPerClient (and may
            # use the health reserve): the set in force, as SIGHUP replaces it.
            limits.exempt = lambda peer: self.site.trusted_proxies.is_trusted(peer)
        if isinstance(observer, _LevelControl):
            self.site.access_log = observer.access
        if settings.server.tls:
            from runner_gateway.tls import ReloadingServerTLS, TLSConfigError

            try:
                self.tls = ReloadingServerTLS(
                    settings.server.certificate_path,
                    settings.server.key_path,
                    settings.server.client_ca_path,
                    reactor=reactor,
                    interval=settings.server.certificate_reload_interval,
                    labels=_tls_labels(settings),
                )
            except TLSConfigError as exc:
                raise StartupError(str(exc)) from None
        if settings.metrics.address is not None:
            from runner_gateway.metrics import Metrics

            self.metrics = Metrics(settings.metrics, reactor.seconds, self.limiter)
            self.metrics.watch_shared_state(self.revocations, self.shared)
            self.observers.append(self.metrics)
            from runner_gateway.metrics import PoolCollector

            self.metrics.registry.register(PoolCollector(lambda: self.generation.pools))
            from runner_gateway.metrics import ConnectionRefusals, EdgeCollector, EdgeCounts

            limits = self.site.connection_limits
            self.metrics.registry.register(
                ConnectionRefusals(lambda: limits.refused if limits is not None else None)
            )
            site = self.site
            self.metrics.registry.register(
                EdgeCollector(
                    lambda: EdgeCounts(
                        site.lingering,
                        site.linger_shed,
                        len(site.first_reads.queue),
                        site.first_reads.queued,
                        dict(site.rejected),
                    )
                )
            )

    @property
    def settings(self) -> Settings:
        return self.generation.settings

    def _build(self, settings: Settings) -> _Generation:
        from runner_gateway.health import HealthChecker

        pools: list[RunnerPool] = []
        root = build_root(
            settings,
            self.reactor,
            self.pool,
            self.problems,
            self.limiter,
            self.revocations,
            self.details,
            pools,
            self.runner_states,
        )
        checkers = [HealthChecker(p, self.reactor) for p in pools]
        return _Generation(settings, root, pools, checkers)

    def _limits_store(self) -> str | None:
        """The limits' shared store (a worker's is its supervisor's); None: make one."""
        return None

    def details(self) -> dict[str, str]:
        """Degraded but serving (for /readyz detail)."""
        found = self.revocation_feed.problems()
        if self.shared is not None:
            found.update(self.shared.detail())
        found.update(self.limiter.detail())
        return found

    def runner_states(self) -> dict[str, object]:
        """Each runner's hosts up and in total (names, never addresses: /readyz
        is public); empty while every host is up."""
        pools = self.generation.pools
        if all(p.up_count() == len(p.hosts) for p in pools):
            return {}
        return {
            p.runner.name: {"hosts": len(p.hosts), "up": p.up_count(), "queued": p.queue_depth()}
            for p in pools
        }

    def problems(self) -> list[str]:
        """What keeps the gateway from being ready (for /readyz)."""
        found = []
        if not self.listening:
            found.append("not listening")
        pools = self.generation.pools
        down = [p.runner.name for p in pools if p.up_count() == 0]
        if down and (self.settings.server.ready_when == "all" or len(down) == len(pools)):
            found.append(f"no healthy host: runner(s) {', '.join(down)}")
        if self.tls is not None and self.tls.error:
            # /readyz is public: say what is wrong, the log says where (file paths).
            found.append("tls: the certificate files changed but could not be loaded (see the log)")
        return found

    # -- twistd hooks

    def setServiceParent(self, parent: Any) -> None:
        # twistd starts logging after makeService, with the application's
        # ILogObserver component when one is set: that is how our level
        # filter and JSON format replace its default text observer.
        if self.observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        # Bind here, before the reactor runs, so a port in use is a clean
        # start-up failure rather than a log line from a running process.
        settings = self.settings
        try:
            self._listen(self._main_endpoint(), self.site)
            if settings.server.redirect_address is not None:
                from runner_gateway.tls import RedirectResource

                port = settings.server.public_port or settings.server.address.port
                redirect = _QuietSite(RedirectResource(port))
                self._listen(_endpoint(self.reactor, settings.server.redirect_address), redirect)
            if self.metrics is not None and settings.metrics.address is not None:
                from runner_gateway.metrics import metrics_resource

                self._listen(
                    _endpoint(self.reactor, settings.metrics.address),
                    _QuietSite(metrics_resource(self.metrics)),
                )
        except CannotListenError as exc:
            # Logging has started by now and twistd's sys.stderr feeds the log:
            # the one-line reason goes to the real stderr, like other bad starts.
            raise StartupError(
                f"cannot listen on {exc.interface or '*'}:{exc.port}: {exc.socketError}"
            ) from None
        super().privilegedStartService()

    def _main_endpoint(self) -> IStreamServerEndpoint:
        # A worker (workers.py) overrides this to adopt the supervisor's socket.
        return _endpoint(self.reactor, self.settings.server.address, self._creator())

    def _creator(self) -> Any:
        return self.tls.creator() if self.tls is not None else None

    def _listen(self, endpoint: IStreamServerEndpoint, factory: Site) -> None:
        result: list[Any] = []
        endpoint.listen(factory).addBoth(result.append)
        if not result:  # pragma: no cover - TCP/SSL endpoints listen synchronously
            raise StartupError("listener did not start")
        outcome = result[0]
        if hasattr(outcome, "raiseException"):
            outcome.raiseException()
        with socket.fromfd(outcome.fileno(), socket.AF_INET, socket.SOCK_STREAM) as listener:
            defer_accept(listener)  # a duplicate descriptor: the same socket
        self.ports.append(outcome)

    def startService(self) -> None:
        super().startService()
        self.listening = True
        settings = self.settings
        address: Any = self.ports[0].getHost()
        scheme = "https" if settings.server.tls else "http"
        _log.info(
            "runner-gateway {version} listening on {scheme}://{host}:{port} ({n} runner(s): "
            "{runners})",
            version=__version__,
            scheme=scheme,
            host=address.host,
            port=address.port,
            n=len(settings.runners),
            runners=", ".join(f"{r.path} -> {r.base_url}" for r in settings.runners),
        )
        if not settings.server.tls:
            _log.warn(
                "TLS is off (server.certificatePath and server.keyPath are empty): tokens "
                "travel in clear text; use this only on loopback or behind a TLS proxy"
            )
        if self.tls is not None:
            self.tls.start()
        self.revocation_feed.start()
        if self.shared is not None:
            self.shared.start()
        for runner in settings.runners:
            probe_runner(self.reactor, runner)
        for checker in self.generation.checkers:
            checker.start()
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, self._on_sighup)
        self.limiter.start()
        _settle_gc()

    def _on_sighup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """Re-read settings and TLS files; keep the running ones if anything is wrong."""
        if self.tls is not None:
            self.tls.reload()
        try:
            settings = self.load()
            generation = self._build(settings)
            self.revocation_feed.configure(settings)
        except (SettingsError, ValueError) as exc:  # ValueError: TLSConfigError, key errors
            _log.error(
                "settings reload refused, keeping the running settings: {error}", error=str(exc)
            )
            return False
        restart = restart_needed(self.settings, settings)
        if restart:
            _log.warn(
                "settings reloaded, but these changes need a restart: {keys}",
                keys=", ".join(restart),
            )
        old_generation, self.generation = self.generation, generation
        for checker in old_generation.checkers:
            checker.stop()
        if self.listening:
            for checker in generation.checkers:
                checker.start()
        self.limiter.configure(settings.limits)
        self.site.resource = generation.root
        self.site.max_body_size = max(r.max_body_size for r in settings.runners)
        self.site.trace = settings.logging.level == "trace"
        self.site.trusted_proxies = settings.server.trusted_proxies
        if isinstance(self.observer, _LevelControl):
            self.observer.set_level(settings.logging.level)
        _log.info("settings reloaded: {n} runner(s)", n=len(settings.runners))
        return True

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self.listening = False
        for checker in self.generation.checkers:
            checker.stop()
        if self.tls is not None:
            self.tls.stop()
        self.revocation_feed.stop()
        stopping = [defer.maybeDeferred(port.stopListening) for port in self.ports]
        self.ports = []
        return defer.gatherResults(stopping).addBoth(lambda _: self._drain())

    def _drain(self) -> defer.Deferred[None]:
        timeout = self.settings.server.drain_timeout
        if self.site.inflight:
            _log.info("draining {n} request(s), up to {t}s", n=len(self.site.inflight), t=timeout)
        idle = self.site.wait_idle()
        timer = self.reactor.callLater(timeout, idle.cancel)

        def done(result: object) -> defer.Deferred[None]:
            if timer.active():
                timer.cancel()
            if self.site.inflight:
                _log.warn("drain timeout: cutting {n} request(s)", n=len(self.site.inflight))
                self.site.abort_inflight()
            closed = self.pool.closeCachedConnections()
            # After the cut requests have ended (a turn later): their tokens
            # are charged, then this process's slots go with its lease.
            return closed.addBoth(lambda _: self._stop_limits())

        return idle.addBoth(done)

    def _stop_limits(self) -> defer.Deferred[Any] | None:
        # Redis goes last: the limits give their slots back through it.
        self.limiter.stop()
        if self.shared is not None:
            stopped: defer.Deferred[Any] = self.shared.stop()
            return stopped
        return None


def _tls_labels(settings: Settings) -> tuple[str, str, str]:
    """How TLS errors name the files: settings key and where it was set."""
    keys = ("server.certificatePath", "server.keyPath", "server.clientCAPath")
    a, b, c = (f"{settings.source_of(key)}: {key}" for key in keys)
    return a, b, c


def probe_runner(reactor: Any, runner: RunnerSettings) -> defer.Deferred[bool]:
    """Say at start whether a runner answers, so a missing Ollama is obvious at once."""
    from twisted.web.client import Agent

    policy = None
    if runner.scheme == "https":
        from runner_gateway.tls import upstream_tls_policy

        policy = upstream_tls_policy(runner)
    pool = _QuietPool(reactor, persistent=False)
    timeout = min(runner.connect_timeout, 5)
    agent = (
        Agent(reactor, contextFactory=policy, connectTimeout=timeout, pool=pool)
        if policy is not None
        else Agent(reactor, connectTimeout=timeout, pool=pool)
    )
    d = agent.request(
        b"GET", runner.base_url.encode() + b"/", Headers({b"host": [runner.netloc.encode()]})
    )

    def answered(response: Any) -> bool:
        response.deliverBody(_Discard())
        _log.info(
            "runner {name} at {url} answers (HTTP {code})",
            name=runner.name,
            url=runner.base_url,
            code=response.code,
        )
        return True

    def silent(failure: Failure) -> bool:
        _log.warn(
            "runner {name} at {url} does not answer ({why}): requests under {path} fail "
            "until it does",
            name=runner.name,
            url=runner.base_url,
            why=failure.getErrorMessage() or repr(failure.value),
            path=runner.path,
        )
        return False

    return d.addCallbacks(answered, silent)


class _QuietSite(Site):
    """Side listeners (metrics, redirect): no per-request or start/stop log lines."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


class _QuietClientFactory(HTTP11ClientFactory):
    noisy = False  # "Starting factory" for every upstream connection is noise


class _QuietPool(HTTPConnectionPool):
    _factory = _QuietClientFactory


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


def _settle_gc() -> None:
    """Keep the start-up objects (modules, settings, the resource tree) out of
    the collector's way: frozen, they are never scanned again. Requests make
    few reference cycles, so young collections can wait longer as well."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_YOUNG, *gc.get_threshold()[1:])


_GC_YOUNG = 10_000  # Python's default is 700 allocations


class _LevelControl:
    """The log observer, with a level that a settings reload can change."""

    def __init__(self, level: str, fmt: str) -> None:
        self.fmt = fmt
        # twistd replaces sys.stdout with a file that feeds the log system,
        # so keep the real stream from before logging starts.
        self.stream = sys.stdout
        self.set_level(level)

    def set_level(self, level: str) -> None:
        self.level = level
        self.access_on = logs_access(level)
        self.observer = make_observer(level, self.fmt, self.stream)

    def __call__(self, event: dict[str, Any]) -> None:
        self.observer(event)

    def access(self, fields: dict[str, Any], namespace: str = ACCESS_NAMESPACE) -> None:
        """One access line, straight to the stream: the same line an info event
        would give, for a third of the cost of twisted.logger's event path."""
        if self.access_on:
            write_line(self.stream, access_line(self.fmt, time.time(), namespace, fields))
