"""admission.py: AdmissionResource and Limiter in front of a fake proxy, on a fake clock."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from runner_gateway.admission import AdmissionResource, Limiter
from runner_gateway.context import RequestContext
from runner_gateway.limits import BackendError, Verdict
from runner_gateway.limits_local import LEASE
from runner_gateway.settings import LimitsSettings, RunnerSettings, TierLimits
from runner_gateway.usage import UsageChunkFilter

RUNNER = RunnerSettings(name="r", host="127.0.0.1", port=11434, path="/")
T0 = 1_800_000_000.0
LIMITS = LimitsSettings(
    tiers=(
        ("rpm", TierLimits(requests_per_minute=2)),
        ("one", TierLimits(concurrent_requests=1)),
        ("quota", TierLimits(tokens_per_day=10)),
    )
)


class FakeProxy(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []

    def render(self, request: Any) -> bytes:
        self.seen.append(request.content.read())
        return b"proxied"


@dataclass
class Gate:
    limiter: Limiter
    proxy: FakeProxy
    resource: AdmissionResource
    clock: Clock

    def request(
        self,
        claims: dict[str, Any] | None,
        path: bytes = b"/api/chat",
        body: bytes = b"{}",
        method: bytes = b"POST",
        runner: RunnerSettings = RUNNER,
    ) -> tuple[Any, bytes]:
        request: Any = DummyRequest([])
        request.method = method
        request.content = io.BytesIO(body)
        request.gateway_context = RequestContext(
            request_id="r1",
            started=self.clock.seconds(),
            runner=runner,
            upstream_path=path,
            claims=claims,
        )
        result = self.resource.render(request)
        assert isinstance(result, bytes)
        return request, result


def _gate(tmp_path: Path, settings: LimitsSettings = LIMITS) -> Gate:
    clock = Clock()
    clock.advance(T0)
    limiter = Limiter(clock, settings, str(tmp_path / "limits"))
    limiter.start()
    proxy = FakeProxy()
    return Gate(limiter, proxy, AdmissionResource(proxy, limiter), clock)


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Gate]:
    g = _gate(tmp_path)
    yield g
    g.limiter.stop()


def _header(request: Any, name: bytes) -> str | None:
    values = request.responseHeaders.getRawHeaders(name)
    return values[0].decode() if values else None


def test_rate_limit_429_ollama_shape_with_headers(gate: Gate) -> None:
    claims = {"sub": "alice", "tier": "rpm"}
    for _ in range(2):
        request, result = gate.request(claims)
        assert result == b"proxied"
        assert _header(request, b"ratelimit-policy") == '"requests";q=2;w=60'
    assert _header(request, b"ratelimit") == '"requests";r=0;t=60'
    gate.clock.advance(10)
    request, body = gate.request(claims)
    assert request.responseCode == 429
    assert _header(request, b"retry-after") == "50"
    assert _header(request, b"x-should-retry") is None
    assert json.loads(body) == {
        "error": "rate limit reached: 2 requests per minute (tier rpm); retry in 50s"
    }
    assert request.gateway_context.extra["limits.refused"] == "requests"
    assert len(gate.proxy.seen) == 2


def test_openai_shapes_under_v1(gate: Gate) -> None:
    claims = {"sub": "bob", "tier": "one"}
    gate.request(claims, path=b"/v1/chat/completions")
    request, body = gate.request(claims, path=b"/v1/chat/completions")
    assert request.responseCode == 429
    assert _header(request, b"retry-after") == "1"
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("rate_limit_exceeded", "rate_limit_exceeded")


def test_token_quota_charged_at_the_end_then_insufficient_quota(gate: Gate) -> None:
    claims = {"jti": "token-1", "tier": "quota"}  # no sub: counted by jti
    request, _ = gate.request(claims, path=b"/v1/completions")
    ctx = request.gateway_context
    ctx.usage = _Usage(prompt=4, completion=9, reported=False)
    gate.limiter.request_finished(ctx)
    request, body = gate.request(claims, path=b"/v1/completions")
    assert request.responseCode == 429
    assert _header(request, b"x-should-retry") == "false"
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    usage = gate.limiter.usage()
    assert isinstance(usage, dict)
    entry = usage["subjects"]["jti:token-1"]
    assert (entry["tokens_today"], entry["tokens_estimated"], entry["tokens_remaining"]) == (
        13,
        13,
        0,
    )


@dataclass
class _Usage:
    prompt: int
    completion: int
    reported: bool

    @property
    def prompt_tokens(self) -> int:
        return self.prompt

    @property
    def completion_tokens(self) -> int:
        return self.completion


def test_unknown_tier_and_no_subject_are_refused(gate: Gate) -> None:
    request, body = gate.request({"sub": "eve", "tier": "gold"})
    assert request.responseCode == 403
    assert "tier" in json.loads(body)["error"]
    assert request.gateway_context.extra["limits.refused"] == "tier"
    request, body = gate.request({"tier": "rpm"})
    assert request.responseCode == 403
    assert request.gateway_context.extra["limits.refused"] == "subject"
    # A default tier without limits needs no subject.
    _, result = gate.request({})
    assert result == b"proxied"


def test_limits_off_ignore_the_tier_claim(tmp_path: Path) -> None:
    g = _gate(tmp_path, LimitsSettings())
    try:
        request, result = g.request({"sub": "eve", "tier": "gold"})
        assert result == b"proxied"
        assert _header(request, b"ratelimit-policy") is None
        assert g.limiter.backend is None  # nothing opened while nothing is limited
    finally:
        g.limiter.stop()


def test_slot_given_back_when_the_client_leaves(gate: Gate) -> None:
    claims = {"sub": "carol", "tier": "one"}
    first, _ = gate.request(claims)
    assert gate.request(claims)[0].responseCode == 429
    first.gateway_context.aborted = True
    gate.limiter.request_finished(first.gateway_context)
    assert gate.request(claims)[1] == b"proxied"


def test_stop_gives_slots_back_and_removes_its_own_store(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(T0)
    own = Limiter(clock, LIMITS)  # a lone process: makes its own store
    own.start()
    assert own.backend is not None
    store = own._store
    assert store is not None and os.path.exists(store)
    own.stop()
    assert not os.path.exists(store)

    shared = str(tmp_path / "shared")
    one, two = Limiter(clock, LIMITS, shared), Limiter(clock, LIMITS, shared)
    one.start()
    two.start()
    r1 = AdmissionResource(FakeProxy(), one)
    r2 = AdmissionResource(FakeProxy(), two)
    claims = {"sub": "dan", "tier": "one"}
    assert _render(r1, claims) == b"proxied"
    refused = _render(r2, claims)
    assert b"concurrency limit" in refused
    one.stop()  # drained: its slot is free at once, not after the lease
    assert _render(r2, claims) == b"proxied"
    assert os.path.exists(shared)  # a worker never removes the supervisor's store
    two.stop()


def _render(resource: AdmissionResource, claims: dict[str, Any]) -> bytes:
    request: Any = DummyRequest([])
    request.method = b"GET"
    request.content = io.BytesIO(b"")
    request.gateway_context = RequestContext(
        request_id="r", started=T0, runner=RUNNER, upstream_path=b"/api/tags", claims=claims
    )
    result = resource.render(request)
    assert isinstance(result, bytes)
    return result


def test_the_lease_is_renewed_by_the_timer(gate: Gate, tmp_path: Path) -> None:
    claims = {"sub": "frank", "tier": "one"}
    assert gate.request(claims)[1] == b"proxied"
    other = Limiter(gate.clock, LIMITS, str(tmp_path / "limits"))
    other.start()
    resource = AdmissionResource(FakeProxy(), other)
    for _ in range(int(LEASE * 3)):
        gate.clock.advance(1)  # gate's timer renews its lease every second
    assert b"concurrency limit" in _render(resource, claims)
    gate.limiter._renew.stop()  # type: ignore[union-attr]  # as if the process died
    gate.clock.advance(LEASE + 1)
    assert _render(resource, claims) == b"proxied"
    other.stop()


class _Broken:
    def admit(self, *args: object) -> None:
        raise BackendError("cannot lock the limits table: I/O error")


@pytest.mark.parametrize("policy", ["allow", "deny"])
def test_on_backend_error(tmp_path: Path, policy: str) -> None:
    settings = LimitsSettings(on_backend_error=policy, tiers=LIMITS.tiers)
    g = _gate(tmp_path, settings)
    warnings: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.warn and "limits" in event.get("log_format", ""):
            warnings.append(event)

    globalLogPublisher.addObserver(observe)  # type: ignore[arg-type]
    working = g.limiter.backend
    try:
        g.limiter.backend = _Broken()  # type: ignore[assignment]
        for _ in range(3):
            request, result = g.request({"sub": "gina", "tier": "rpm"})
            if policy == "allow":
                assert result == b"proxied"
            else:
                assert request.responseCode == 503
                assert _header(request, b"retry-after") == "1"
                assert request.gateway_context.extra["limits.refused"] == "backend"
        assert len(warnings) == 1  # once per outage
        assert not g.limiter.healthy
        g.limiter.backend = working
        assert g.request({"sub": "gina", "tier": "rpm"})[1] == b"proxied"
        assert g.limiter.healthy
    finally:
        globalLogPublisher.removeObserver(observe)  # type: ignore[arg-type]
        g.limiter.stop()


def test_streams_asked_for_usage_limits_or_not(tmp_path: Path) -> None:
    g = _gate(tmp_path, LimitsSettings())
    try:
        body = b'{"model":"m","stream":true}'
        request, _ = g.request({"sub": "h"}, path=b"/v1/chat/completions", body=body)
        assert g.proxy.seen[-1] == b'{"stream_options":{"include_usage":true},' + body[1:]
        assert isinstance(request.gateway_context.body_filter, UsageChunkFilter)
        # Not on Ollama's paths, not when the client asked, not with requestUsage: false.
        request, _ = g.request({"sub": "h"}, path=b"/api/chat", body=body)
        assert g.proxy.seen[-1] == body and request.gateway_context.body_filter is None
        asked = b'{"stream":true,"stream_options":{"include_usage":true}}'
        request, _ = g.request({"sub": "h"}, path=b"/v1/chat/completions", body=asked)
        assert g.proxy.seen[-1] == asked and request.gateway_context.body_filter is None
        quiet = RunnerSettings(name="q", host="h", port=1, path="/", request_usage=False)
        request, _ = g.request({"sub": "h"}, path=b"/v1/completions", body=body, runner=quiet)
        assert g.proxy.seen[-1] == body and request.gateway_context.body_filter is None
    finally:
        g.limiter.stop()


class _Later:
    """A backend that answers admissions later, as the redis backend does."""

    def __init__(self) -> None:
        self.waiting: list[defer.Deferred[Verdict]] = []
        self.finished: list[tuple[str, bool]] = []

    def admit(self, key: str, tier: str, limits: TierLimits, now: float) -> Any:
        d: defer.Deferred[Verdict] = defer.Deferred()
        self.waiting.append(d)
        return d

    def finish(self, key: str, slot: bool, tokens: int, estimated: bool, now: float) -> None:
        self.finished.append((key, slot))

    def close(self) -> None:
        pass


def _waiting(g: Gate, claims: dict[str, Any]) -> Any:
    request: Any = DummyRequest([])
    request.method = b"GET"
    request.content = io.BytesIO(b"")
    request.gateway_context = RequestContext(
        request_id="r", started=T0, runner=RUNNER, upstream_path=b"/api/tags", claims=claims
    )
    assert g.resource.render(request) == NOT_DONE_YET
    assert not request.written and not request.finished
    return request


@pytest.mark.parametrize("policy", ["allow", "deny"])
def test_an_asynchronous_backend_is_waited_for(tmp_path: Path, policy: str) -> None:
    g = _gate(tmp_path, LimitsSettings(on_backend_error=policy, tiers=LIMITS.tiers))
    later = _Later()
    g.limiter.backend = later  # type: ignore[assignment]
    try:
        claims = {"sub": "hana", "tier": "one"}
        allowed, refused, failing, gone = (_waiting(g, claims) for _ in range(4))
        later.waiting[0].callback(Verdict(True, policy="p", state="s"))
        assert b"".join(allowed.written) == b"proxied" and allowed.finished
        assert _header(allowed, b"ratelimit-policy") == "p"
        assert "limits.ticket" in allowed.gateway_context.extra
        later.waiting[1].callback(Verdict(False, "concurrency", 1, "p", "s"))
        assert refused.responseCode == 429 and refused.finished
        assert b"concurrency limit" in b"".join(refused.written)
        later.waiting[2].errback(BackendError("Redis did not answer"))
        if policy == "allow":
            assert b"".join(failing.written) == b"proxied"
        else:
            assert failing.responseCode == 503 and failing.finished
        assert not g.limiter.healthy
        assert "onBackendError: " + policy in g.limiter.detail()["limits"]
        # The client left while Redis decided: the slot it was given goes back.
        gone._disconnected = True
        later.waiting[3].callback(Verdict(True, policy="p", state="s"))
        assert not gone.written
        assert later.finished == [("s:hana", True)]
    finally:
        g.limiter.stop()
