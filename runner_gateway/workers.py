"""Multi-core serving: ``server.workers`` > 1 makes twistd a supervisor of N workers.

The supervisor binds the listening sockets itself, before twistd drops any
privileges, and starts N worker processes (``twistd runner-gateway ...
--worker-fd 3 --worker-index I``) that each run the ordinary GatewayService
on an adopted socket. It restarts a worker that dies (with backoff),
forwards SIGHUP to every worker (each one reloads its own settings), and on
SIGTERM/SIGINT closes its sockets, sends SIGTERM to every worker and waits
for all of them to drain (``server.drainTimeout`` plus a margin, then
SIGKILL).

Sockets: on Linux (and wherever ``SO_REUSEPORT`` exists) the supervisor binds
one socket per worker to the same address with ``SO_REUSEPORT``, and the
kernel spreads new connections over them. One shared socket would be the
other choice, but every worker wakes up for each connection and the first one
accepts a whole burst (Twisted accepts in a loop), so a benchmark's 32
connections opened at once mostly land on one worker. A worker's socket stays
open in the supervisor while that worker restarts: connections hashed to it
wait in its backlog for the replacement rather than being refused. Without
``SO_REUSEPORT`` all workers share one socket.

TLS is per worker (each wraps its adopted socket in ``TLSMemoryBIOFactory``
with its own reloading context). The redirect listener (plain HTTP, no
state) is served by the supervisor. Metrics: each worker keeps its own
counters and serves them on a loopback port of its own (any free one, told
to the supervisor in its ready line); the supervisor serves
``metrics.address`` itself and answers ``/metrics`` and ``/usage`` by asking
every worker and adding their numbers up (``*_created`` timestamps: the
earliest), so Prometheus scrapes one target as without workers. Every log
line of a worker carries ``worker`` and ``pid`` fields (JSON) or ``/wI``
after the logger name (text).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from twisted.application.service import MultiService
from twisted.internet import defer, protocol
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody
from twisted.web.resource import IResource, NoResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import directlyProvides, implementer

from runner_gateway.connections import BACKLOG, defer_accept
from runner_gateway.limits_local import STORE_VARIABLE, new_store_path, remove_store
from runner_gateway.logs import ACCESS_NAMESPACE
from runner_gateway.service import (
    GatewayService,
    StartupError,
    _endpoint,
    _LevelControl,
    _QuietPool,
    _QuietSite,
)
from runner_gateway.settings import Address, Settings

__all__ = [
    "WORKER_FD",
    "AdoptedEndpoint",
    "Supervisor",
    "WorkerService",
    "bind_sockets",
    "make_worker",
    "restart_delay",
    "worker_argv",
    "worker_settings",
]

_log = Logger()

WORKER_FD = 3  # the listening socket's number in a worker
READY_FD = 4  # a worker writes one line here once it serves (and handles SIGHUP)
KILL_MARGIN = 5.0  # seconds past drainTimeout before a worker that is still there is killed
_BACKOFF_FIRST = 0.2
_BACKOFF_MAX = 30.0
_HEALTHY_AFTER = 10.0  # a worker that ran this long resets its backoff
_BOOT = "import sys; from twisted.scripts.twistd import run; sys.exit(run())"


# ---------------------------------------------------------------- pure parts


def restart_delay(failures: int) -> float:
    """Seconds to wait before the next restart after ``failures`` quick deaths in a row."""
    return float(min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** max(0, failures)))


def worker_settings(settings: Settings, index: int) -> Settings:
    """A worker's view: no redirect listener, metrics on a private loopback port.

    The supervisor serves ``server.redirectAddress`` and ``metrics.address``;
    ``index`` is not used today (every worker is configured alike).
    """
    metrics = settings.metrics
    if metrics.address is not None:
        metrics = dataclasses.replace(metrics, address=Address("127.0.0.1", 0))
    server = dataclasses.replace(settings.server, redirect_address=None)
    return dataclasses.replace(settings, server=server, metrics=metrics)


def merge_exposition(texts: Sequence[str]) -> list[Metric]:
    """Prometheus text expositions of the workers, added up sample by sample."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
                values[family.name] = {}
            table = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in table:
                    table[key] = sample.value
                elif sample.name.endswith("_created"):
                    table[key] = min(table[key], sample.value)
                else:
                    table[key] = table[key] + sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(families.values())


_COUNTS = ("requests", "prompt_tokens", "completion_tokens")
_PER = ("models", "hosts")  # per-model and per-host counts of a subject


def merge_usage(snapshots: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The workers' ``/usage`` tables as one (metrics.UsageTable.snapshot's shape)."""
    subjects: dict[str, dict[str, Any]] = {}
    for snapshot in snapshots:
        for name, entry in snapshot.get("subjects", {}).items():
            merged = subjects.get(name)
            if merged is None:
                subjects[name] = {
                    **entry,
                    **{k: {m: dict(c) for m, c in entry.get(k, {}).items()} for k in _PER},
                }
                continue
            for key in _COUNTS:
                merged[key] += entry[key]
            merged["first_seen"] = min(merged["first_seen"], entry["first_seen"])
            merged["last_seen"] = max(merged["last_seen"], entry["last_seen"])
            for per in _PER:
                for model, counts in entry.get(per, {}).items():
                    into = merged[per].setdefault(model, dict.fromkeys(_COUNTS, 0))
                    for key in _COUNTS:
                        into[key] += counts[key]
    for entry in subjects.values():
        for per in _PER:
            entry[per] = dict(sorted(entry[per].items()))
    result: dict[str, Any] = {
        "since": min((s["since"] for s in snapshots), default=None),
        "subjects_max": max((s["subjects_max"] for s in snapshots), default=0),
        "evicted": sum(s["evicted"] for s in snapshots),
        "workers": len(snapshots),
        "subjects": dict(sorted(subjects.items())),
    }
    # The limits' counts live in the one store every worker shares: each
    # worker reports the same numbers, so one answer is taken, not a sum.
    limits = next((s["limits"] for s in snapshots if "limits" in s), None)
    if limits is not None:
        result["limits"] = limits
    return result


def worker_argv(options: Any, index: int, executable: str = sys.executable) -> list[str]:
    """The command line of worker ``index``: the same plugin and settings, plus the fd."""
    argv = [executable, "-c", _BOOT, "-n", "--pidfile=", "runner-gateway"]
    argv += ["--settings", os.path.abspath(options["settings"])]
    if options.get("env") is not None:
        argv += ["--env", options["env"]]
    if options.get("logging-level") is not None:
        argv += ["--logging-level", options["logging-level"]]
    argv += ["--worker-fd", str(WORKER_FD), "--worker-index", str(index)]
    return [*argv, "--supervisor-pid", str(os.getpid())]


def bind_sockets(address: Address, count: int) -> list[socket.socket]:
    """``count`` SO_REUSEPORT sockets on one address (one socket if that option is missing)."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    host = address.host or "0.0.0.0"  # noqa: S104 - "" means all interfaces, as in settings
    reuse_port = hasattr(socket, "SO_REUSEPORT")
    sockets: list[socket.socket] = []
    port = address.port
    if reuse_port and port:
        # SO_REUSEPORT would let us join another process's listener on this
        # port (same user): a second gateway must fail as "port in use".
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise CannotListenError(host, port, exc) from None
    try:
        for _ in range(count if reuse_port else 1):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise CannotListenError(host, port, exc) from None
            sock.listen(BACKLOG)
            defer_accept(sock)
            sock.setblocking(False)
            port = sock.getsockname()[1]  # port 0: the others join the one the first got
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


# ---------------------------------------------------------------- the worker


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """Listens on an inherited, already listening socket (TLS on top when a creator is given)."""

    def __init__(self, reactor: Any, fd: int, tls_creator: Any = None) -> None:
        self.reactor = reactor
        self.fd = fd
        self.tls_creator = tls_creator

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        probe = socket.socket(fileno=self.fd)  # only to learn the family
        family = probe.family
        probe.detach()
        wrapped: IProtocolFactory = factory
        if self.tls_creator is not None:
            from runner_gateway.httpsonly import refuse_plain_http

            wrapped = refuse_plain_http(TLSMemoryBIOFactory(self.tls_creator, False, factory))
        try:
            port = self.reactor.adoptStreamPort(self.fd, family, wrapped)
        except Exception:
            return defer.fail()
        # The reactor made its own copy; ours would keep the socket open after a drain.
        os.close(self.fd)
        return defer.succeed(port)


class _WorkerLogControl(_LevelControl):
    """The level-filtered observer, tagging every event with the worker's index and pid."""

    def __init__(self, level: str, fmt: str, index: int) -> None:
        super().__init__(level, fmt)
        self.tag = {"worker": index, "pid": os.getpid()}
        self.suffix = f"/w{index}"

    def __call__(self, event: dict[str, Any]) -> None:
        tagged = dict(event)
        fields = event.get("fields")
        tagged["fields"] = {**fields, **self.tag} if isinstance(fields, dict) else self.tag
        tagged["log_namespace"] = f"{event.get('log_namespace', '-')}{self.suffix}"
        super().__call__(tagged)

    def access(self, fields: dict[str, Any], namespace: str = ACCESS_NAMESPACE) -> None:
        super().access({**fields, **self.tag}, namespace + self.suffix)


class WorkerService(GatewayService):
    """The ordinary gateway service on the supervisor's socket, watching its parent."""

    def __init__(
        self,
        load: Callable[[], Settings],
        reactor: Any,
        fd: int,
        index: int,
        observer: ILogObserver | None = None,
        supervisor_pid: int | None = None,
    ) -> None:
        super().__init__(load, reactor, observer)
        self.fd = fd
        self.index = index
        # Given on the command line, not read with getppid() here: a supervisor
        # that dies while this worker starts up would otherwise leave the
        # worker adopted by init, watching the wrong parent and serving forever.
        self.parent_pid = os.getppid() if supervisor_pid is None else supervisor_pid
        self._watch: LoopingCall | None = None

    def _main_endpoint(self) -> IStreamServerEndpoint:
        return AdoptedEndpoint(self.reactor, self.fd, self._creator())

    def _limits_store(self) -> str | None:
        return os.environ.get(STORE_VARIABLE)

    def startService(self) -> None:
        super().startService()
        # Ctrl-C reaches the whole process group: the supervisor alone decides
        # when workers stop (it sends SIGTERM), so a worker is never stopped twice.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self._watch = LoopingCall(self._check_parent)
        self._watch.clock = self.reactor
        self._watch.start(1.0, now=False)
        _log.info("worker {index} (pid {pid}) serving", index=self.index, pid=os.getpid())
        # Tell the supervisor: from now on a SIGHUP reloads instead of killing
        # us; and where our metrics are (ports: main, then metrics when on).
        metrics_port = self.ports[1].getHost().port if len(self.ports) > 1 else 0  # type: ignore[attr-defined]
        with contextlib.suppress(OSError):
            if stat.S_ISFIFO(os.fstat(READY_FD).st_mode):  # the supervisor's pipe, nothing else
                os.write(READY_FD, f"ready {metrics_port}\n".encode())
                os.close(READY_FD)

    def _check_parent(self) -> None:
        if os.getppid() != self.parent_pid:
            _log.warn("worker {index}: the supervisor is gone; stopping", index=self.index)
            self.reactor.stop()

    def stopService(self) -> defer.Deferred[None]:
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        return super().stopService()


def make_worker(
    options: Any, load: Callable[[], Settings], reactor: Any, control: _LevelControl
) -> WorkerService:
    index = int(options.get("worker-index") or 0)
    fd = int(options["worker-fd"])
    observer = _WorkerLogControl(control.level, control.fmt, index)
    directlyProvides(observer, ILogObserver)

    def load_worker() -> Settings:
        return worker_settings(load(), index)

    supervisor = options.get("supervisor-pid")
    return WorkerService(
        load_worker,
        reactor,
        fd,
        index,
        observer=observer,  # type: ignore[arg-type]
        supervisor_pid=int(supervisor) if supervisor is not None else None,
    )


# ------------------------------------------------------------ the supervisor


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, supervisor: Supervisor, index: int, started: float) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started = started
        self.pid: int | None = None
        self.ready = False
        self.metrics_port = 0
        self.reload_pending = False  # a SIGHUP came before the worker could take it
        self.ended: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == READY_FD and not self.ready:
            self.ready = True
            words = data.split()
            if len(words) == 2 and words[1].isdigit():
                self.metrics_port = int(words[1])
            self.supervisor._ready(self)

    def describe(self, reason: Failure) -> str:
        status = getattr(reason.value, "status", None)
        if status is None:
            return "exit status 0"
        if os.WIFSIGNALED(status):
            return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
        return f"exit status {os.WEXITSTATUS(status)}"

    def processEnded(self, reason: Failure) -> None:
        self.supervisor._ended(self, reason)
        self.ended.callback(None)


class Supervisor(MultiService):
    """Binds once, runs N workers, restarts them, forwards SIGHUP, drains on SIGTERM."""

    def __init__(
        self,
        options: Any,
        settings: Settings,
        reactor: Any,
        observer: ILogObserver | None = None,
        spawn_argv: Callable[[int], list[str]] | None = None,
    ) -> None:
        super().__init__()
        # Build (and drop) one gateway here: bad keys or TLS files stop the start
        # with the same one-line error as without workers, instead of workers
        # that fail and are restarted forever.
        GatewayService(lambda: settings, reactor)
        self.options = options
        self.settings = settings
        self.reactor = reactor
        self.observer = observer
        self.count = settings.server.workers
        self.spawn_argv = spawn_argv or (lambda index: worker_argv(options, index))
        self.sockets: list[socket.socket] = []
        self.ports: list[IListeningPort] = []
        self.workers: dict[int, _WorkerProcess] = {}
        self.failures: dict[int, int] = {}
        self.pending: dict[int, Any] = {}  # index -> IDelayedCall of a scheduled restart
        self.stopping = False
        self.limits_store: str | None = None

    def setServiceParent(self, parent: Any) -> None:
        # As GatewayService does: our observer replaces twistd's default one.
        if self.observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        server = self.settings.server
        try:
            self.sockets = bind_sockets(server.address, self.count)
            if server.redirect_address is not None:
                from runner_gateway.tls import RedirectResource

                redirect = _QuietSite(RedirectResource(server.address.port))
                result: list[Any] = []
                _endpoint(self.reactor, server.redirect_address).listen(redirect).addBoth(
                    result.append
                )
                if result and isinstance(result[0], Failure):
                    result[0].raiseException()
                self.ports.extend(r for r in result if not isinstance(r, Failure))
            if self.settings.metrics.address is not None:
                result = []
                site = _QuietSite(_AggregateRoot(self))  # no line per scrape
                _endpoint(self.reactor, self.settings.metrics.address).listen(site).addBoth(
                    result.append
                )
                if result and isinstance(result[0], Failure):
                    result[0].raiseException()
                self.ports.extend(r for r in result if not isinstance(r, Failure))
        except CannotListenError as exc:
            for sock in self.sockets:
                sock.close()
            raise StartupError(
                f"cannot listen on {exc.interface or '*'}:{exc.port}: {exc.socketError}"
            ) from None
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        host, port = self.sockets[0].getsockname()[:2]
        scheme = "https" if self.settings.server.tls else "http"
        _log.info(
            "runner-gateway supervisor (pid {pid}) listening on {scheme}://{host}:{port}, "
            "starting {n} workers",
            pid=os.getpid(),
            scheme=scheme,
            host=host,
            port=port,
            n=self.count,
        )
        # The workers' shared limits table (limits_local.py): named here, made
        # by the first worker that counts; found through their inherited
        # environment (a restarted worker keeps counting in it).
        self.limits_store = os.environ[STORE_VARIABLE] = new_store_path()
        for index in range(self.count):
            self._spawn(index)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, self._on_sighup)

    def _socket_for(self, index: int) -> socket.socket:
        return self.sockets[index % len(self.sockets)]

    def _spawn(self, index: int) -> None:
        self.pending.pop(index, None)
        if self.stopping:
            return
        worker = _WorkerProcess(self, index, self.reactor.seconds())
        self.reactor.spawnProcess(
            worker,
            sys.executable,
            self.spawn_argv(index),
            env=dict(os.environ),
            path=os.getcwd(),
            childFDs={
                0: "w",
                1: 1,
                2: 2,
                WORKER_FD: self._socket_for(index).fileno(),
                READY_FD: "r",
            },
        )
        self.workers[index] = worker
        _log.info("worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def _ended(self, worker: _WorkerProcess, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.stopping:
            _log.info(
                "worker {index} (pid {pid}) stopped ({why})",
                index=worker.index,
                pid=worker.pid,
                why=worker.describe(reason),
            )
            return
        lived = self.reactor.seconds() - worker.started
        failures = 0 if lived >= _HEALTHY_AFTER else self.failures.get(worker.index, 0)
        delay = restart_delay(failures)
        self.failures[worker.index] = failures + 1
        _log.warn(
            "worker {index} (pid {pid}) exited unexpectedly ({why}); restarting in {delay}s",
            index=worker.index,
            pid=worker.pid,
            why=worker.describe(reason),
            delay=round(delay, 2),
        )
        self.pending[worker.index] = self.reactor.callLater(delay, self._spawn, worker.index)

    def _ready(self, worker: _WorkerProcess) -> None:
        if all(w.ready for w in self.workers.values()):
            _log.info("all {n} workers serving", n=len(self.workers))
        if worker.reload_pending and worker.pid is not None:
            # It may have read the settings before they changed.
            worker.reload_pending = False
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGHUP)

    def _on_sighup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.forward, signal.SIGHUP)

    def forward(self, signum: int) -> None:
        """Send a signal to every running worker (SIGHUP: once it can take it)."""
        name = signal.Signals(signum).name
        _log.info("forwarding {sig} to {n} worker(s)", sig=name, n=len(self.workers))
        for worker in list(self.workers.values()):
            if signum == signal.SIGHUP and not worker.ready:
                # Still starting: SIGHUP's default action would kill it.
                worker.reload_pending = True
                continue
            if worker.pid is not None:
                # ProcessLookupError: it just died; _ended restarts it with the new settings.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signum)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self.stopping = True
        for call in self.pending.values():
            if call.active():
                call.cancel()
        self.pending.clear()
        # Close our copies first: once the workers close theirs, the port is
        # shut and new connections are refused instead of waiting in a backlog.
        for sock in self.sockets:
            sock.close()
        for port in self.ports:
            port.stopListening()
        running = list(self.workers.values())
        if not running:
            self._remove_limits_store()
            return defer.succeed(None)
        _log.info("stopping {n} worker(s)", n=len(running))
        self.forward(signal.SIGTERM)
        limit = self.settings.server.drain_timeout + KILL_MARGIN
        timer = self.reactor.callLater(limit, self._kill, running)
        done = defer.DeferredList([w.ended for w in running], consumeErrors=True)

        def finished(_: object) -> None:
            if timer.active():
                timer.cancel()
            self._remove_limits_store()

        return done.addBoth(finished)

    def _remove_limits_store(self) -> None:
        store, self.limits_store = self.limits_store, None
        if store is not None:
            remove_store(store)

    def _kill(self, workers: list[_WorkerProcess]) -> None:
        for worker in workers:
            if worker.pid is not None and not worker.ended.called:
                _log.warn(
                    "worker {index} (pid {pid}) did not stop: killing it",
                    index=worker.index,
                    pid=worker.pid,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)


# ------------------------------------------------- the supervisor's metrics


class _Merged:
    """A collector that yields already merged families (for generate_latest)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class _AggregatePage(Resource):
    """``/metrics`` or ``/usage``: ask every serving worker, answer with the sum."""

    isLeaf = True

    def __init__(self, supervisor: Supervisor, path: bytes) -> None:
        super().__init__()
        self.supervisor = supervisor
        self.path = path
        # Quiet: no "Starting factory" / "Stopping factory" per worker per scrape.
        pool = _QuietPool(supervisor.reactor, persistent=False)
        self.agent = Agent(supervisor.reactor, connectTimeout=5, pool=pool)

    def render_GET(self, request: Request) -> int:
        query = request.uri.partition(b"?")[2]
        ports = [w.metrics_port for w in self.supervisor.workers.values() if w.metrics_port]
        fetches = []
        for port in ports:
            url = b"http://127.0.0.1:%d/%s" % (port, self.path)
            if query:
                url += b"?" + query
            fetches.append(self.agent.request(b"GET", url).addCallback(readBody))
        done = defer.DeferredList(fetches, consumeErrors=True)
        done.addCallback(self._respond, request)
        done.addErrback(lambda failure: _log.failure("metrics aggregation failed", failure))
        return NOT_DONE_YET

    def _respond(self, results: list[tuple[bool, Any]], request: Request) -> None:
        bodies = [body for ok, body in results if ok]
        if len(bodies) < len(results):
            _log.warn("metrics: {n} worker(s) did not answer", n=len(results) - len(bodies))
        if self.path == b"usage":
            merged = merge_usage([json.loads(body) for body in bodies])
            payload = json.dumps(merged, separators=(",", ":")).encode() + b"\n"
            request.setHeader(b"content-type", b"application/json; charset=utf-8")
        else:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Merged(merge_exposition([b.decode() for b in bodies])))
            payload = generate_latest(registry)
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"cache-control", b"no-store")
        if not request.finished and not request._disconnected:
            request.write(payload)
            request.finish()


class _AggregateRoot(Resource):
    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__()
        self.putChild(b"metrics", _AggregatePage(supervisor, b"metrics"))
        self.putChild(b"usage", _AggregatePage(supervisor, b"usage"))

    def getChild(self, path: bytes, request: Request) -> IResource:
        return self if path == b"" else NoResource()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"runner-gateway metrics listener: /metrics (Prometheus), /usage (JSON)\n"
