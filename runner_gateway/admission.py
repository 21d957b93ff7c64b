"""Limits and quotas at the door (Twisted glue for limits.py and its backend).

:class:`AdmissionResource` sits between the authorization layer and the
proxy: it picks the token's tier, asks the backend to admit the request and
either answers 429 (or 403 for a tier the settings do not know) or renders
the proxy, with the ``RateLimit-Policy`` / ``RateLimit`` fields on the
response either way. :class:`Limiter` owns the backend for the service: it
renews this process's lease on its concurrency slots every second, and as a
request observer (site.py) gives a slot back and charges the tokens when a
request ends, however it ends (finished, client gone, drain cut it).

The ``local`` backend answers at once; the ``redis`` one (limits_redis.py)
answers with a Deferred, which the request waits for (no longer than its
deadline, ``redis.commandTimeout``) before it is answered or proxied.

On the way to an OpenAI-compatible runner, a streaming chat or completions
request whose client did not ask for usage gets ``stream_options:
{"include_usage": true}`` (unless the runner's ``requestUsage`` is false), and
the proxy takes the usage-only chunk out of what that client receives.
"""

from __future__ import annotations

import io
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from runner_gateway.context import RequestContext, context_of
from runner_gateway.errors import send_error
from runner_gateway.limits import (
    Backend,
    BackendError,
    Verdict,
    message_for,
    subject_key,
    tier_for,
)
from runner_gateway.limits_local import LocalBackend, new_store_path, remove_store
from runner_gateway.settings import LimitsSettings, TierLimits
from runner_gateway.usage import UsageChunkFilter, ask_for_usage, may_ask_for_usage

__all__ = ["REFUSED_KEY", "AdmissionResource", "Limiter"]

_log = Logger()

RENEW_EVERY = 1.0  # seconds; the lease (limits_local.LEASE) is five times that
# Finished requests are written together this long after the first of them,
# unless this process's next admission writes them first (busy: every
# request; idle: the timer). Other workers see a slot given back this late
# at most; a write of its own right after every response would run while
# the next request waits.
FLUSH_AFTER = 0.02
_TICKET_KEY = "limits.ticket"  # ctx.extra: what to give back when the request ends
REFUSED_KEY = "limits.refused"  # ctx.extra: why admission refused (metrics reads it)
# OpenAI's error codes (and types) for a 429: its client tells them apart.
_OPENAI_CODES = {
    "requests": "rate_limit_exceeded",
    "concurrency": "rate_limit_exceeded",
    "tokens": "insufficient_quota",
}


@dataclass(frozen=True, slots=True)
class _Ticket:
    key: str
    slot: bool  # a concurrency slot was taken
    tokens: bool  # the tier counts tokens: charge them at the end


class Limiter:
    """The service's limits: settings (swapped on reload), backend and lease timer."""

    def __init__(
        self,
        reactor: Any,
        settings: LimitsSettings,
        store: str | None = None,
        shared: Any = None,
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        self.shared = shared  # shared_state.SharedState (redis.url), for backend: redis
        self._kind = ""  # the backend open: local or redis
        # A worker is given the supervisor's store; a lone process makes its own.
        self._store = store
        self._owns_store = store is None
        self.backend: Backend | None = None
        self._renew: LoopingCall | None = None
        self._flush: IDelayedCall | None = None
        self._failing = False

    # ------------------------------------------------------------ lifecycle

    def configure(self, settings: LimitsSettings) -> None:
        """New settings (start, reload): open the backend the first time limits are on."""
        self.settings = settings
        if self.backend is not None and settings.backend != self._kind:
            self._close()  # local <-> redis: the counts start again in the new one
        if settings.enabled and self.backend is None and self._renew is not None:
            self._open()

    def start(self) -> None:
        self._renew = LoopingCall(self._tick)
        self._renew.clock = self.reactor
        if self.settings.enabled:
            self._open()

    def _open(self) -> None:
        assert self._renew is not None
        if not self._renew.running:  # also retries an open that failed
            self._renew.start(RENEW_EVERY, now=False)
        self._kind = self.settings.backend
        if self._kind == "redis":
            from runner_gateway.limits_redis import RedisBackend

            if self.shared is None:  # settings.py refuses it; fail closed all the same
                self._backend_failed(BackendError("limits.backend: redis needs redis.url"))
                return
            self.backend = RedisBackend(self.shared, self._report)
            return
        try:
            if self._store is None:
                self._store = new_store_path()
            self.backend = LocalBackend(self._store, self.reactor.seconds())
        except (BackendError, OSError) as exc:
            self._backend_failed(exc)

    def _report(self, error: Exception | None) -> None:
        """What an asynchronous backend step ended with."""
        if error is None:
            self._backend_ok()
        else:
            self._backend_failed(error)

    def stop(self) -> None:
        """Give back this process's slots (after the drain) and close the store."""
        if self._renew is not None and self._renew.running:
            self._renew.stop()
        if self._flush is not None and self._flush.active():
            self._flush.cancel()  # close() writes what is queued
        self._flush = None
        self._close()
        if self._owns_store and self._store is not None:
            remove_store(self._store)

    def _close(self) -> None:
        backend, self.backend = self.backend, None
        if backend is not None:
            try:
                backend.close()
            except BackendError:
                _log.failure("limits: closing the {backend} backend failed", backend=self._kind)

    def _tick(self) -> None:
        backend = self.backend
        if backend is None:
            if self.settings.enabled:
                self._open()
            return
        try:
            backend.renew(self.reactor.seconds())
        except BackendError as exc:
            self._backend_failed(exc)
        else:
            if self._kind == "local":  # the redis backend reports when Redis answered
                self._backend_ok()

    def _backend_failed(self, exc: Exception) -> None:
        if not self._failing:  # once per outage
            self._failing = True
            _log.warn(
                "limits: the {backend} backend failed ({error}); onBackendError: {policy}",
                backend=self.settings.backend,
                error=str(exc),
                policy=self.settings.on_backend_error,
            )

    def _backend_ok(self) -> None:
        if self._failing:
            self._failing = False
            _log.info("limits: the {backend} backend works again", backend=self.settings.backend)

    @property
    def healthy(self) -> bool:
        return not self._failing

    def detail(self) -> dict[str, str]:
        """For /readyz: the backend failing (serving meanwhile as onBackendError says)."""
        if not self._failing:
            return {}
        return {
            "limits": f"the {self.settings.backend} backend fails; "
            f"onBackendError: {self.settings.on_backend_error}"
        }

    def usage(self) -> dict[str, Any] | Awaitable[dict[str, Any]] | None:
        """Each subject's use and what remains (for /usage); None when limits are off.
        A Deferred from the redis backend."""
        backend = self.backend
        if backend is None or not self.settings.enabled:
            return None
        try:
            return backend.snapshot(self.settings, self.reactor.seconds())
        except BackendError as exc:
            return {"backend": self.settings.backend, "error": str(exc), "subjects": {}}

    # ------------------------------------------------------------ observer (site.py)

    def response_started(self, ctx: RequestContext) -> None:
        pass

    def request_finished(self, ctx: RequestContext) -> None:
        ticket: _Ticket | None = ctx.extra.pop(_TICKET_KEY, None)
        backend = self.backend
        if ticket is None or backend is None:
            return
        tokens = 0
        estimated = False
        usage = ctx.usage
        if ticket.tokens and usage is not None:
            tokens = usage.prompt_tokens + usage.completion_tokens
            estimated = not usage.reported
        backend.finish(ticket.key, ticket.slot, tokens, estimated, self.reactor.seconds())
        if self._flush is None:
            self._flush = self.reactor.callLater(FLUSH_AFTER, self._write_finished)

    def _write_finished(self) -> None:
        self._flush = None
        backend = self.backend
        if backend is None:
            return
        try:
            backend.flush()
        except BackendError as exc:
            self._backend_failed(exc)  # kept queued: the next transaction retries


class AdmissionResource(Resource):
    """Admits a request under its tier's limits, else answers 429 (or 403)."""

    isLeaf = True

    def __init__(self, wrapped: IResource, limiter: Limiter) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.limiter = limiter

    def render(self, request: Request) -> bytes | int:
        # Also asks runners for the usage a stream's client did not ask for
        # (_pass), so that token counts can be billed on, limits or not.
        limiter = self.limiter
        settings = limiter.settings
        if not settings.enabled:
            return self._pass(request)
        ctx = context_of(request)
        claims = ctx.claims
        found = tier_for(claims, settings)
        if found is None:
            ctx.extra[REFUSED_KEY] = "tier"
            return send_error(
                request,
                403,
                "the token's tier is not one this gateway knows",
                code="unknown_tier",
            )
        tier, limits = found
        if limits.unlimited:
            return self._pass(request)
        key = subject_key(claims)
        if key is None:
            ctx.extra[REFUSED_KEY] = "subject"
            return send_error(
                request,
                403,
                "the token has neither sub nor jti to count its use by",
                code="no_subject",
            )
        now = limiter.reactor.seconds()
        try:
            if limiter.backend is None:  # it could not be opened (logged)
                raise BackendError(f"the {settings.backend} backend is not open")
            answer = limiter.backend.admit(key, tier, limits, now)
        except BackendError as exc:
            return self._failed(request, exc)
        if isinstance(answer, Verdict):
            limiter._backend_ok()
            return self._decided(request, key, tier, limits, answer)
        # The redis backend: answer when Redis has (within the backend's deadline).
        waiting = cast("defer.Deferred[Verdict]", answer)
        backend = limiter.backend

        def decided(verdict: Verdict) -> None:
            if _gone(request):  # the client left while Redis decided
                if verdict.allowed and limits.concurrent_requests:
                    backend.finish(key, True, 0, False, limiter.reactor.seconds())
                return
            self._later(request, lambda: self._decided(request, key, tier, limits, verdict))

        def failed(failure: Failure) -> None:
            value = failure.value
            error = value if isinstance(value, Exception) else BackendError(repr(value))
            if not _gone(request):
                self._later(request, lambda: self._failed(request, error))

        waiting.addCallbacks(decided, failed).addErrback(
            lambda f: _log.failure("limits: answering after the admission", f)
        )
        return NOT_DONE_YET

    def _later(self, request: Request, render: Any) -> None:
        """Render now what render() could not answer at once."""
        try:
            body = render()
        except Exception:
            request.processingFailed(Failure())
            return
        if body is not NOT_DONE_YET and isinstance(body, bytes):
            request.write(body)
            request.finish()

    def _failed(self, request: Request, exc: Exception) -> bytes | int:
        """The backend could not count: onBackendError decides."""
        self.limiter._backend_failed(exc)
        if self.limiter.settings.on_backend_error == "allow":
            return self._pass(request)
        context_of(request).extra[REFUSED_KEY] = "backend"
        return send_error(
            request,
            503,
            "the limits backend cannot be reached; try again shortly",
            headers={"Retry-After": "1"},
        )

    def _decided(
        self, request: Request, key: str, tier: str, limits: TierLimits, verdict: Verdict
    ) -> bytes | int:
        ctx = context_of(request)
        headers = request.responseHeaders
        if verdict.policy:
            headers.setRawHeaders(b"ratelimit-policy", [verdict.policy.encode()])
            headers.setRawHeaders(b"ratelimit", [verdict.state.encode()])
        if not verdict.allowed:
            kind = verdict.kind or "requests"
            ctx.extra[REFUSED_KEY] = kind
            refusal = {"Retry-After": str(verdict.retry_after)}
            if kind == "tokens":
                # The day's quota does not come back within a client's retries:
                # OpenAI's client honours this and gives up at once.
                refusal["x-should-retry"] = "false"
            return send_error(
                request,
                429,
                message_for(kind, limits, tier, verdict.retry_after),
                code=_OPENAI_CODES[kind],
                headers=refusal,
                error_type=_OPENAI_CODES[kind],
            )
        ctx.extra[_TICKET_KEY] = _Ticket(
            key, limits.concurrent_requests > 0, limits.tokens_per_day > 0
        )
        return self._pass(request)

    def _pass(self, request: Request) -> bytes | int:
        ctx = context_of(request)
        runner = ctx.runner
        if (
            runner is not None
            and runner.request_usage
            and request.method == b"POST"
            and may_ask_for_usage(ctx.upstream_path)
            and request.content is not None
        ):
            _ask_for_usage(request, ctx)
        result: bytes | int = self.wrapped.render(request)
        return result


def _gone(request: Request) -> bool:
    return bool(request.finished or getattr(request, "_disconnected", False))


def _ask_for_usage(request: Request, ctx: RequestContext) -> None:
    """Ask the runner for the usage of a stream whose client did not (usage.py);
    the proxy takes the usage chunk out again (ctx.body_filter)."""
    content = request.content
    assert content is not None
    content.seek(0)
    body = content.read()
    content.seek(0)
    asked = ask_for_usage(ctx.upstream_path, body)
    if asked is not None:
        content.close()
        request.content = io.BytesIO(asked)
        ctx.body_filter = UsageChunkFilter()
