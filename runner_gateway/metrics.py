"""Prometheus metrics, the per-subject usage table and the metrics listener's resource.

:class:`Metrics` is an observer of the request context (site.py calls
``response_started`` when upstream headers are in and ``request_finished``
once per request). It owns its own ``CollectorRegistry`` so tests and several
gateways in one process never share series.

Every label value is bounded: runner names come from the settings, route and
reasons from fixed vocabularies, subjects are capped in number (past the cap
they count as ``other``). A model name becomes a label only once a runner
answered 2xx for it (a name nobody serves is ``other``), and the model table
keeps the most recently used ``MODELS_MAX``: junk names cannot fill it, and
a model that was evicted (its series removed) comes back when next used.

:func:`metrics_resource` serves ``/metrics`` and ``/usage``; it belongs on
the separate ``metrics.address`` listener only, never on the public one.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from runner_gateway.admission import REFUSED_KEY
from runner_gateway.context import RequestContext
from runner_gateway.edge import fastpath
from runner_gateway.limits import KINDS as LIMIT_KINDS
from runner_gateway.paseto.errors import REASONS as PASETO_REASONS
from runner_gateway.settings import MetricsSettings

__all__ = [
    "AUTH_FAILURE_REASONS",
    "DURATION_BUCKETS",
    "MODELS_MAX",
    "UPSTREAM_ERROR_KINDS",
    "Metrics",
    "PoolCollector",
    "UsageTable",
    "metrics_resource",
]

# The auth layer's vocabulary for ctx.auth_failure (its own labels plus the
# PASETO verifier's reasons); anything else is "other".
AUTH_FAILURE_REASONS = (
    "missing",
    "malformed",
    "error",
    "revoked",
    *sorted(PASETO_REASONS - {"malformed"}),
    "other",
)
# The proxy's vocabulary for ctx.upstream_error; anything else is "other".
UPSTREAM_ERROR_KINDS = ("connect", "tls", "timeout", "reset", "protocol", "unavailable", "other")
# Why the limits layer (admission.py) refused: a limit, an unknown tier, a
# token without sub or jti, or the backend.
LIMIT_REFUSALS = (*LIMIT_KINDS, "tier", "subject", "backend")
# Seconds a request waited in a runner's queue (maxConcurrent).
QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Model runs take from milliseconds (cached embeddings) to many minutes
# (long generations on slow hardware).
DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
)
# The first byte comes after model load and prompt evaluation.
TTFB_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
MODELS_MAX = 200  # distinct model label values
ROUTES_MAX = 100  # distinct route label values (the policy's set is far smaller)
_LABEL_LEN_MAX = 200
OTHER = "other"
NO_RUNNER = "none"  # requests the gateway answered itself (health, 404, ...)
NO_MODEL = "unknown"
NO_STATUS = "none"  # the client went away before a status was sent
NO_SUBJECT = "none"
_STREAM_KEY = "metrics.active_runner"  # ctx.extra: the gauge child to decrement


class _Models:
    """The model label table: names a runner answered 2xx for, least recently
    used evicted past ``limit`` (``on_evict`` drops the name's series)."""

    def __init__(self, limit: int, on_evict: Callable[[str], None]) -> None:
        self.limit = limit
        self.on_evict = on_evict
        self._seen: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, value: object) -> bool:
        return value in self._seen

    def __call__(self, value: str, answered: bool) -> str:
        """The label for ``value``; ``answered``: the runner said 2xx for it."""
        seen = self._seen
        if value in seen:
            seen.move_to_end(value)
            return value
        if not answered or len(value) > _LABEL_LEN_MAX:
            return OTHER
        while len(seen) >= self.limit:
            evicted, _ = seen.popitem(last=False)
            self.on_evict(evicted)
        seen[value] = None
        return value


class _Capped:
    """A label's value set, capped: past ``limit`` distinct values, "other"."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self.limit or len(value) > _LABEL_LEN_MAX:
            return OTHER
        self._seen.add(value)
        return value


# --------------------------------------------------------------- usage table


@dataclass
class _Counts:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, prompt: int, completion: int) -> None:
        self.requests += 1
        self.prompt_tokens += prompt
        self.completion_tokens += completion

    def as_json(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


@dataclass
class _SubjectUsage:
    first_seen: float
    last_seen: float
    total: _Counts = field(default_factory=_Counts)
    models: dict[str, _Counts] = field(default_factory=dict)
    hosts: dict[str, _Counts] = field(default_factory=dict)  # the runner hosts that served


class UsageTable:
    """Per-subject counters in memory, at most ``max_subjects`` (least recently used go).

    Counts run from the gateway's start (or the subject's return after
    eviction); ``first_seen`` tells a reader from when.
    """

    def __init__(self, max_subjects: int, started: float) -> None:
        self.max_subjects = max_subjects
        self.started = started
        self.evicted = 0
        self._subjects: OrderedDict[str, _SubjectUsage] = OrderedDict()

    def __len__(self) -> int:
        return len(self._subjects)

    def __contains__(self, subject: object) -> bool:
        return subject in self._subjects

    def record(
        self,
        subject: str,
        model: str | None,
        prompt: int,
        completion: int,
        now: float,
        host: str | None = None,
    ) -> None:
        if self.max_subjects <= 0:
            return
        entry = self._subjects.get(subject)
        if entry is None:
            while len(self._subjects) >= self.max_subjects:
                self._subjects.popitem(last=False)
                self.evicted += 1
            entry = self._subjects[subject] = _SubjectUsage(now, now)
        else:
            self._subjects.move_to_end(subject)
        entry.last_seen = now
        entry.total.add(prompt, completion)
        if model is not None:
            # Model names come from the metric's table; evicted ones may still be
            # here, so a subject's own list is capped too.
            if model not in entry.models and len(entry.models) >= MODELS_MAX:
                model = OTHER
            entry.models.setdefault(model, _Counts()).add(prompt, completion)
        if host is not None:  # host:port from the settings: a bounded set
            entry.hosts.setdefault(host, _Counts()).add(prompt, completion)

    def snapshot(self, subject: str | None = None) -> dict[str, Any]:
        """The table as JSON-ready data; only ``subject`` when given."""
        subjects: dict[str, Any] = {}
        for name, entry in self._subjects.items():
            if subject is not None and name != subject:
                continue
            subjects[name] = {
                **entry.total.as_json(),
                "first_seen": entry.first_seen,
                "last_seen": entry.last_seen,
                "models": {m: c.as_json() for m, c in sorted(entry.models.items())},
                "hosts": {h: c.as_json() for h, c in sorted(entry.hosts.items())},
            }
        return {
            "since": self.started,
            "subjects_max": self.max_subjects,
            "evicted": self.evicted,
            "subjects": dict(sorted(subjects.items())),
        }


# ------------------------------------------------------------------ metrics


class _FastpathInfo:
    """runner_gateway_fastpath_info{fix,state}: each hot-path fix (fastpath.py),
    1 while on; read from fastpath's own record at each scrape."""

    def describe(self) -> list[GaugeMetricFamily]:
        return []

    def collect(self) -> list[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "runner_gateway_fastpath_info",
            "Hot-path fixes: 1 while on; state is on, switched-off, unavailable "
            "(this Twisted lacks what it needs) or not-applicable.",
            labels=["fix", "state"],
        )
        for fix, state in sorted(fastpath.states().items()):
            family.add_metric([fix, state], 1.0 if state == "on" else 0.0)
        return [family]


class ConnectionRefusals:
    """``runner_gateway_connections_refused_total{reason}``, read at scrape
    time from the site's ConnectionLimits (connections.py)."""

    def __init__(self, refused: Callable[[], dict[str, int] | None]) -> None:
        self.refused = refused

    def describe(self) -> list[CounterMetricFamily]:
        return self.collect()

    def collect(self) -> list[CounterMetricFamily]:
        family = CounterMetricFamily(
            "runner_gateway_connections_refused",
            "Client connections closed at accept: over server.maxConnections "
            "or server.maxConnectionsPerClient.",
            labels=["reason"],
        )
        for reason, count in sorted((self.refused() or {}).items()):
            family.add_metric([reason], count)
        return [family]


@dataclass(frozen=True)
class EdgeCounts:
    """What the edge counts of the connections it rations (edge/site.py,
    edge/accept.py), read at scrape time."""

    lingering: int  # connections in a lingering close now
    lingering_skipped: int  # refused requests closed without one
    first_reads_waiting: int  # new connections waiting for their first read now
    first_reads_queued: int  # new connections that waited
    rejected: dict[int, int]  # answers without a request (bare LF, 414, 431, 408), by status


class EdgeCollector:
    """The gauges and counters of :class:`EdgeCounts`."""

    def __init__(self, counts: Callable[[], EdgeCounts]) -> None:
        self.counts = counts

    def describe(self) -> list[Metric]:
        return self.collect()

    def collect(self) -> list[Metric]:
        counts = self.counts()
        rejections = CounterMetricFamily(
            "runner_gateway_edge_rejections",
            "Answers given and the connection closed with no request to log: a bare-LF "
            "head (400), a request line over 16 KiB (414), a header line or head over "
            "16 KiB (431), a body slower than server.bodyMinRate (408).",
            labels=["status"],
        )
        for status, count in sorted(counts.rejected.items()):
            rejections.add_metric([str(status)], count)
        return [
            GaugeMetricFamily(
                "runner_gateway_lingering_connections",
                "Connections in a lingering close: a request refused on its head, "
                "what its client still sends read and dropped.",
                value=counts.lingering,
            ),
            CounterMetricFamily(
                "runner_gateway_lingering_closes_skipped",
                "Requests refused on their head whose connection was closed without "
                "a lingering close, because as many as the gateway allows were lingering.",
                value=counts.lingering_skipped,
            ),
            GaugeMetricFamily(
                "runner_gateway_first_reads_waiting",
                "New connections waiting for their first read, fairly by peer address, "
                "because a reactor turn's budget for first reads was spent.",
                value=counts.first_reads_waiting,
            ),
            CounterMetricFamily(
                "runner_gateway_first_reads_queued",
                "New connections that waited for their first read.",
                value=counts.first_reads_queued,
            ),
            rejections,
        ]


class _Limits(Protocol):
    """What the metrics read of admission.Limiter."""

    @property
    def healthy(self) -> bool: ...

    def usage(self) -> dict[str, Any] | Awaitable[dict[str, Any]] | None: ...


class Metrics:
    """The gateway's metrics; an observer of every request's context."""

    def __init__(
        self,
        settings: MetricsSettings,
        clock: Callable[[], float],
        limiter: _Limits | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.limiter = limiter
        self.registry = CollectorRegistry(auto_describe=True)
        self.usage = UsageTable(settings.subjects_max, clock())
        self._models = _Models(MODELS_MAX, self._forget_model)
        self._routes = _Capped(ROUTES_MAX)
        self._subjects = _Capped(max(settings.subjects_max, 1))
        reg = self.registry
        self.requests = Counter(
            "runner_gateway_requests",
            "Requests completed (or aborted), by runner, route class and status code.",
            ["runner", "route", "code"],
            registry=reg,
        )
        self.duration = Histogram(
            "runner_gateway_request_duration_seconds",
            "Time from the request line to the end of the response.",
            ["runner", "route"],
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self.ttfb = Histogram(
            "runner_gateway_time_to_first_byte_seconds",
            "Time from the request line to the first response body byte sent.",
            ["runner", "route"],
            buckets=TTFB_BUCKETS,
            registry=reg,
        )
        self.active_streams = Gauge(
            "runner_gateway_active_streams",
            "Upstream responses being relayed right now.",
            ["runner"],
            registry=reg,
        )
        self.aborts = Counter(
            "runner_gateway_client_aborts",
            "Requests whose client went away before the response was complete.",
            ["runner", "route"],
            registry=reg,
        )
        self.auth_failures = Counter(
            "runner_gateway_auth_failures",
            "Requests refused by the authentication layer, by reason.",
            ["reason"],
            registry=reg,
        )
        self.upstream_errors = Counter(
            "runner_gateway_upstream_errors",
            "Failed exchanges with a runner, by kind.",
            ["runner", "kind"],
            registry=reg,
        )
        self.header_values_dropped = Counter(
            "runner_gateway_upstream_header_values_dropped",
            "Runner response header values not relayed for holding a control character.",
            ["runner"],
            registry=reg,
        )
        token_labels = ["runner", "model", "type"]
        if settings.per_subject:
            token_labels.append("subject")
        self.tokens = Counter(
            "runner_gateway_tokens",
            "Tokens processed, as the runners reported them (type: prompt or completion).",
            token_labels,
            registry=reg,
        )
        self.subject_requests: Counter | None = None
        if settings.per_subject:
            self.subject_requests = Counter(
                "runner_gateway_subject_requests",
                "Requests by token subject (metrics.perSubject).",
                ["subject"],
                registry=reg,
            )
        self.limit_refusals = Counter(
            "runner_gateway_limit_refusals",
            "Requests refused by the limits layer, by kind (limits.md).",
            ["kind"],
            registry=reg,
        )
        # 1 per process in an outage, so the supervisor's sum counts the
        # workers that cannot reach the backend.
        self.limits_backend_down = Gauge(
            "runner_gateway_limits_backend_down",
            "1 while the limits backend fails (onBackendError decides meanwhile), else 0.",
            registry=reg,
        )
        if limiter is not None:
            self.limits_backend_down.set_function(lambda: 0.0 if limiter.healthy else 1.0)
        self.queue_wait = Histogram(
            "runner_gateway_queue_wait_seconds",
            "Time requests waited in a runner's queue for a free host (maxConcurrent).",
            ["runner"],
            buckets=QUEUE_BUCKETS,
            registry=reg,
        )
        reg.register(_FastpathInfo())
        # Fixed vocabularies start at zero so rate() sees the first failure.
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason=reason)
        for kind in LIMIT_REFUSALS:
            self.limit_refusals.labels(kind=kind)

    def watch_shared_state(self, state: Any, shared: Any) -> None:
        """Gauges read at scrape time: the revocation state, the Redis link (when set)."""
        reg = self.registry
        Gauge(
            "runner_gateway_revocations",
            "Revocation entries in force (file and Redis together).",
            registry=reg,
        ).set_function(lambda: len(state))
        if shared is not None:
            Gauge(
                "runner_gateway_redis_up",
                "1 while the Redis connection (redis.url) is up, else 0.",
                registry=reg,
            ).set_function(lambda: 1.0 if shared.up else 0.0)

    # The observer protocol (site.py).

    def response_started(self, ctx: RequestContext) -> None:
        if _STREAM_KEY in ctx.extra:
            return  # counted once per request
        runner = _runner_label(ctx)
        ctx.extra[_STREAM_KEY] = runner
        self.active_streams.labels(runner=runner).inc()

    def request_finished(self, ctx: RequestContext) -> None:
        now = self.clock()
        runner = _runner_label(ctx)
        route = self._routes(ctx.route or OTHER)
        code = str(ctx.status) if ctx.status is not None else NO_STATUS

        streaming = ctx.extra.pop(_STREAM_KEY, None)
        if streaming is not None:
            self.active_streams.labels(runner=streaming).dec()

        self.requests.labels(runner=runner, route=route, code=code).inc()
        self.duration.labels(runner=runner, route=route).observe(max(0.0, now - ctx.started))
        if ctx.first_byte is not None:
            ttfb = max(0.0, ctx.first_byte - ctx.started)
            self.ttfb.labels(runner=runner, route=route).observe(ttfb)
        if ctx.aborted:
            self.aborts.labels(runner=runner, route=route).inc()
        if ctx.auth_failure is not None:
            reason = ctx.auth_failure if ctx.auth_failure in AUTH_FAILURE_REASONS else OTHER
            self.auth_failures.labels(reason=reason).inc()
        if ctx.upstream_error is not None:
            kind = ctx.upstream_error if ctx.upstream_error in UPSTREAM_ERROR_KINDS else OTHER
            self.upstream_errors.labels(runner=runner, kind=kind).inc()
        if ctx.header_values_dropped:
            self.header_values_dropped.labels(runner=runner).inc(ctx.header_values_dropped)
        refused = ctx.extra.get(REFUSED_KEY)
        if refused is not None:
            self.limit_refusals.labels(kind=refused).inc()
        if ctx.queue_wait is not None:
            self.queue_wait.labels(runner=runner).observe(max(0.0, ctx.queue_wait))

        prompt = completion = 0
        if ctx.usage is not None:
            prompt, completion = ctx.usage.prompt_tokens, ctx.usage.completion_tokens
        model = None
        if ctx.model:
            answered = (
                ctx.status is not None and 200 <= ctx.status < 300 and ctx.upstream_error is None
            )
            model = self._models(ctx.model, answered)
        subject = ctx.subject
        subject_label = self._subjects(subject) if subject is not None else NO_SUBJECT
        if prompt or completion:
            labels = {"runner": runner, "model": model or NO_MODEL}
            if self.settings.per_subject:
                labels["subject"] = subject_label
            self.tokens.labels(type="prompt", **labels).inc(prompt)
            self.tokens.labels(type="completion", **labels).inc(completion)
        if self.subject_requests is not None and subject is not None:
            self.subject_requests.labels(subject=subject_label).inc()
        if subject is not None:
            self.usage.record(subject, model, prompt, completion, now, ctx.host)

    def _forget_model(self, model: str) -> None:
        """Remove an evicted model's token series, so the series stay bounded too."""
        for labels in list(self.tokens._metrics):  # label-value tuples, in token_labels order
            if labels[1] == model:
                self.tokens.remove(*labels)


class _PoolHostView(Protocol):
    label: str

    @property
    def up(self) -> bool: ...

    @property
    def outstanding(self) -> int: ...


class _PoolView(Protocol):
    """What the pool gauges read from a runner pool (pool.RunnerPool)."""

    @property
    def name(self) -> str: ...

    @property
    def states(self) -> Sequence[_PoolHostView]: ...

    def queue_depth(self) -> int: ...


class PoolCollector:
    """Host health, requests in flight per host and queue depth, read at scrape time."""

    def __init__(self, pools: Callable[[], Sequence[_PoolView]]) -> None:
        self.pools = pools

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "runner_gateway_upstream_up",
            "1 while a runner's host passes its health checks, else 0.",
            labels=["runner", "host"],
        )
        in_flight = GaugeMetricFamily(
            "runner_gateway_upstream_in_flight",
            "Requests sent to a runner's host and not finished.",
            labels=["runner", "host"],
        )
        depth = GaugeMetricFamily(
            "runner_gateway_queue_depth",
            "Requests waiting in a runner's queue for a free host.",
            labels=["runner"],
        )
        for pool in self.pools():
            for state in pool.states:
                up.add_metric([pool.name, state.label], 1.0 if state.up else 0.0)
                in_flight.add_metric([pool.name, state.label], float(state.outstanding))
            depth.add_metric([pool.name], float(pool.queue_depth()))
        yield up
        yield in_flight
        yield depth


def _runner_label(ctx: RequestContext) -> str:
    return ctx.runner.name if ctx.runner is not None else NO_RUNNER


# ----------------------------------------------------------- metrics listener


class _Page(Resource):
    def getChild(self, path: bytes, request: Request) -> IResource:
        return notFound()


class _Exposition(_Page):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader("accept") or ""
        encoder, content_type = choose_encoder(accept)
        request.setHeader(b"content-type", content_type.encode())
        request.setHeader(b"cache-control", b"no-store")
        return encoder(self.registry)


class _UsageJson(_Page):
    def __init__(self, table: UsageTable, limiter: _Limits | None = None) -> None:
        super().__init__()
        self.table = table
        self.limiter = limiter

    def render_GET(self, request: Request) -> bytes | int:
        wanted = (request.args or {}).get(b"sub")
        subject = wanted[0].decode("utf-8", "replace") if wanted else None
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        snapshot = self.table.snapshot(subject)
        limits = self.limiter.usage() if self.limiter is not None else None

        def body(limits: dict[str, Any] | None) -> bytes:
            if limits is not None:
                if subject is not None:
                    found = limits["subjects"].items()
                    limits["subjects"] = {k: v for k, v in found if k == subject}
                snapshot["limits"] = limits
            return json.dumps(snapshot, separators=(",", ":")).encode() + b"\n"

        if limits is None or isinstance(limits, dict):
            return body(limits)
        # The redis backend reads Redis first.
        reading = cast("defer.Deferred[dict[str, Any]]", limits)

        def unreadable(failure: Failure) -> dict[str, Any]:
            return {"error": f"cannot read the limits backend ({failure.value})", "subjects": {}}

        def send(limits: dict[str, Any]) -> None:
            if not request.finished and not request._disconnected:
                request.write(body(limits))
                request.finish()

        reading.addErrback(unreadable).addCallback(send)
        return NOT_DONE_YET


class _Index(_Page):
    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"runner-gateway metrics listener: /metrics (Prometheus), /usage (JSON)\n"

    def getChild(self, path: bytes, request: Request) -> IResource:
        return self if path == b"" else notFound()


def metrics_resource(metrics: Metrics) -> IResource:
    """``/metrics`` and ``/usage``, for the metrics listener only."""
    root = _Index()
    root.putChild(b"metrics", _Exposition(metrics.registry))
    root.putChild(b"usage", _UsageJson(metrics.usage, metrics.limiter))
    return root
