"""Metrics: counters from synthetic request contexts, exposition, usage table, dashboard."""

from __future__ import annotations

import base64
import json
import re
import secrets
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.web.error import UnsupportedMethod
from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from runner_gateway.context import RequestContext
from runner_gateway.metrics import (
    AUTH_FAILURE_REASONS,
    MODELS_MAX,
    Metrics,
    UsageTable,
    metrics_resource,
)
from runner_gateway.settings import MetricsSettings, RunnerSettings

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "runner-gateway.json"
OLLAMA = RunnerSettings(name="ollama", host="127.0.0.1", port=11434, path="/")
VLLM = RunnerSettings(name="vllm", host="127.0.0.1", port=8000, path="/vllm")

OLLAMA_STREAM = (
    b'{"model":"llama3.2","response":"Hi","done":false}\n'
    b'{"model":"llama3.2","response":"","done":true,"prompt_eval_count":26,"eval_count":290}\n'
)


def make(per_subject: bool = False, subjects_max: int = 100) -> tuple[Metrics, Clock]:
    clock = Clock()
    clock.advance(1_700_000_000)
    settings = MetricsSettings(per_subject=per_subject, subjects_max=subjects_max)
    return Metrics(settings, clock.seconds), clock


def request(
    metrics: Metrics,
    clock: Clock,
    *,
    runner: RunnerSettings | None = OLLAMA,
    route: str = "generate",
    status: int | None = 200,
    sub: str | None = "alice",
    model: str | None = "llama3.2",
    body: bytes | None = OLLAMA_STREAM,
    content_type: str = "application/x-ndjson",
    ttfb: float | None = 0.4,
    duration: float = 3.0,
    **fields: Any,
) -> RequestContext:
    """Drive one context through the observer calls the way site.py and proxy.py do."""
    ctx = RequestContext(request_id="r", started=clock.seconds(), runner=runner, route=route)
    ctx.upstream_path = b"/api/generate"
    ctx.claims = {"sub": sub} if sub is not None else None
    ctx.model = model
    for name, value in fields.items():
        setattr(ctx, name, value)
    if body is not None:
        ctx.response_started(content_type)
        metrics.response_started(ctx)
        ctx.status = status
        if ttfb is not None:
            clock.advance(ttfb)
            ctx.first_byte = clock.seconds()
        ctx.response_chunk(body)
        ctx.after_send()
        clock.advance(duration - (ttfb or 0.0))
    else:
        ctx.status = status
        clock.advance(duration)
    metrics.request_finished(ctx)
    return ctx


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    result: float | None = metrics.registry.get_sample_value(name, labels)
    return result


# ------------------------------------------------------------------ counters


def test_counters_after_one_request() -> None:
    metrics, clock = make()
    request(metrics, clock)
    labels = {"runner": "ollama", "route": "generate"}
    assert value(metrics, "runner_gateway_requests_total", code="200", **labels) == 1
    assert value(metrics, "runner_gateway_request_duration_seconds_count", **labels) == 1
    assert value(metrics, "runner_gateway_request_duration_seconds_sum", **labels) == pytest.approx(
        3.0
    )
    # 3 s falls in the 5 s bucket, not the 2.5 s one.
    assert value(metrics, "runner_gateway_request_duration_seconds_bucket", le="2.5", **labels) == 0
    assert value(metrics, "runner_gateway_request_duration_seconds_bucket", le="5.0", **labels) == 1
    assert value(
        metrics, "runner_gateway_time_to_first_byte_seconds_sum", **labels
    ) == pytest.approx(0.4)
    tokens = {"runner": "ollama", "model": "llama3.2"}
    assert value(metrics, "runner_gateway_tokens_total", type="prompt", **tokens) == 26
    assert value(metrics, "runner_gateway_tokens_total", type="completion", **tokens) == 290
    assert value(metrics, "runner_gateway_active_streams", runner="ollama") == 0
    assert value(metrics, "runner_gateway_client_aborts_total", **labels) is None
    assert (
        value(metrics, "runner_gateway_upstream_errors_total", runner="ollama", kind="connect")
        is None
    )


def test_counters_accumulate_per_label_set() -> None:
    metrics, clock = make()
    for _ in range(3):
        request(metrics, clock)
    request(metrics, clock, status=404, body=None, route="other")
    request(
        metrics, clock, runner=VLLM, route="chat", status=502, body=None, upstream_error="reset"
    )
    request(metrics, clock, runner=None, route="healthz", body=None, sub=None, model=None)
    get = value
    assert (
        get(metrics, "runner_gateway_requests_total", runner="ollama", route="generate", code="200")
        == 3
    )
    assert (
        get(metrics, "runner_gateway_requests_total", runner="ollama", route="other", code="404")
        == 1
    )
    assert (
        get(metrics, "runner_gateway_requests_total", runner="vllm", route="chat", code="502") == 1
    )
    assert (
        get(metrics, "runner_gateway_requests_total", runner="none", route="healthz", code="200")
        == 1
    )
    assert get(metrics, "runner_gateway_upstream_errors_total", runner="vllm", kind="reset") == 1
    assert (
        get(
            metrics, "runner_gateway_tokens_total", runner="ollama", model="llama3.2", type="prompt"
        )
        == 78
    )
    # No first byte: no time-to-first-byte observation.
    assert (
        get(metrics, "runner_gateway_time_to_first_byte_seconds_count", runner="vllm", route="chat")
        is None
    )


def test_active_streams_gauge() -> None:
    metrics, clock = make()
    contexts = []
    for i in range(3):
        ctx = RequestContext(request_id=str(i), started=clock.seconds(), runner=OLLAMA)
        metrics.response_started(ctx)
        metrics.response_started(ctx)  # a second call does not count twice
        contexts.append(ctx)
    assert value(metrics, "runner_gateway_active_streams", runner="ollama") == 3
    metrics.request_finished(contexts[0])
    assert value(metrics, "runner_gateway_active_streams", runner="ollama") == 2
    # A request that never started a response does not decrement.
    metrics.request_finished(RequestContext(request_id="x", started=clock.seconds(), runner=OLLAMA))
    assert value(metrics, "runner_gateway_active_streams", runner="ollama") == 2
    for ctx in contexts[1:]:
        metrics.request_finished(ctx)
    assert value(metrics, "runner_gateway_active_streams", runner="ollama") == 0


def test_aborted_stream_counts_what_was_seen() -> None:
    metrics, clock = make()
    cut = OLLAMA_STREAM[: OLLAMA_STREAM.index(b"\n") + 10]
    request(metrics, clock, body=cut, aborted=True)
    assert (
        value(metrics, "runner_gateway_client_aborts_total", runner="ollama", route="generate") == 1
    )
    tokens = {"runner": "ollama", "model": "llama3.2"}
    assert value(metrics, "runner_gateway_tokens_total", type="completion", **tokens) == 1
    assert value(metrics, "runner_gateway_tokens_total", type="prompt", **tokens) == 0
    assert value(metrics, "runner_gateway_active_streams", runner="ollama") == 0


def test_client_gone_before_status() -> None:
    metrics, clock = make()
    request(metrics, clock, status=None, body=None, aborted=True)
    assert (
        value(
            metrics, "runner_gateway_requests_total", runner="ollama", route="generate", code="none"
        )
        == 1
    )


def test_auth_failure_reasons_are_a_fixed_set() -> None:
    metrics, clock = make()
    for reason in AUTH_FAILURE_REASONS:
        assert value(metrics, "runner_gateway_auth_failures_total", reason=reason) == 0
    request(metrics, clock, status=401, body=None, auth_failure="expired", sub=None)
    request(metrics, clock, status=401, body=None, auth_failure="v4.public.eyJzdWIi", sub=None)
    assert value(metrics, "runner_gateway_auth_failures_total", reason="expired") == 1
    assert value(metrics, "runner_gateway_auth_failures_total", reason="other") == 1
    assert "eyJzdWIi" not in generate_latest(metrics.registry).decode()


def test_upstream_error_kinds_are_bounded() -> None:
    metrics, clock = make()
    request(metrics, clock, status=504, body=None, upstream_error="timeout")
    request(metrics, clock, status=502, body=None, upstream_error="ECONNREFUSED 10.0.0.7:11434")
    assert (
        value(metrics, "runner_gateway_upstream_errors_total", runner="ollama", kind="timeout") == 1
    )
    assert (
        value(metrics, "runner_gateway_upstream_errors_total", runner="ollama", kind="other") == 1
    )


def _model_labels(metrics: Metrics) -> set[str]:
    return {
        s.labels["model"]
        for family in metrics.registry.collect()
        if family.name == "runner_gateway_tokens"
        for s in family.samples
    }


def test_model_label_table_keeps_the_most_recently_used() -> None:
    metrics, clock = make()
    for i in range(MODELS_MAX + 20):
        request(metrics, clock, model=f"model-{i}", duration=0.01)
    request(metrics, clock, model=None)
    models = _model_labels(metrics)
    # Bounded: the oldest 20 were evicted with their series.
    assert len(models) == MODELS_MAX + 1  # + "unknown"
    assert "model-0" not in models and f"model-{MODELS_MAX + 19}" in models
    assert "other" not in models
    # An evicted model comes back when next answered, evicting the least recent.
    request(metrics, clock, model="model-0")
    models = _model_labels(metrics)
    assert "model-0" in models and "model-20" not in models
    m0 = value(
        metrics, "runner_gateway_tokens_total", runner="ollama", model="model-0", type="prompt"
    )
    assert m0 == 26


def test_junk_model_names_do_not_become_labels() -> None:
    """Finding 5 of issue 16: names the runner answered 404 for filled the table."""
    metrics, clock = make()
    for i in range(MODELS_MAX + 10):
        request(metrics, clock, model=f"junk-{i}", status=404, duration=0.01)
    request(metrics, clock, model="llama3.2", status=200)
    models = _model_labels(metrics)
    assert not any(m.startswith("junk-") for m in models)
    assert "llama3.2" in models
    # Nor does a 2xx status that the proxy turned into an upstream error.
    request(metrics, clock, model="cut-short", upstream_error="reset")
    assert "cut-short" not in _model_labels(metrics)
    # Once answered, a model keeps its label even on a later error.
    request(metrics, clock, model="llama3.2", status=500)
    assert "llama3.2" in _model_labels(metrics)


def test_route_label_values_are_capped() -> None:
    metrics, clock = make()
    for i in range(150):
        request(metrics, clock, route=f"/raw/{i}", body=None)
    routes = {
        s.labels["route"]
        for family in metrics.registry.collect()
        if family.name == "runner_gateway_requests"
        for s in family.samples
    }
    assert len(routes) == 101
    assert "other" in routes


def test_no_token_series_without_usage() -> None:
    metrics, clock = make()
    request(metrics, clock, body=b'{"status":"success"}\n')
    request(metrics, clock, body=None)
    assert "runner_gateway_tokens_total{" not in generate_latest(metrics.registry).decode()


def test_subject_label_only_when_per_subject() -> None:
    metrics, clock = make(per_subject=False)
    request(metrics, clock, sub="alice")
    text = generate_latest(metrics.registry).decode()
    assert "alice" not in text
    assert "runner_gateway_subject_requests" not in text

    metrics, clock = make(per_subject=True, subjects_max=2)
    for sub in ("alice", "bob", "carol", "alice"):
        request(metrics, clock, sub=sub)
    request(metrics, clock, sub=None)
    get = value
    assert get(metrics, "runner_gateway_subject_requests_total", subject="alice") == 2
    assert get(metrics, "runner_gateway_subject_requests_total", subject="bob") == 1
    assert get(metrics, "runner_gateway_subject_requests_total", subject="other") == 1  # carol
    labels = {"runner": "ollama", "model": "llama3.2", "type": "prompt"}
    assert get(metrics, "runner_gateway_tokens_total", subject="alice", **labels) == 52
    assert get(metrics, "runner_gateway_tokens_total", subject="none", **labels) == 26


# ---------------------------------------------------------------- exposition


def test_exposition_text() -> None:
    metrics, clock = make()
    request(metrics, clock, route="chat")
    text = generate_latest(metrics.registry).decode()
    dur = 'runner_gateway_request_duration_seconds_bucket{le="%s",route="chat",runner="ollama"}'
    ttfb = 'runner_gateway_time_to_first_byte_seconds_bucket{le="%s",route="chat",runner="ollama"}'
    expected = [
        "# TYPE runner_gateway_requests_total counter",
        'runner_gateway_requests_total{code="200",route="chat",runner="ollama"} 1.0',
        "# TYPE runner_gateway_request_duration_seconds histogram",
        dur.replace("%s", "2.5") + " 0.0",
        dur.replace("%s", "5.0") + " 1.0",
        dur.replace("%s", "+Inf") + " 1.0",
        ttfb.replace("%s", "0.25") + " 0.0",
        ttfb.replace("%s", "0.5") + " 1.0",
        'runner_gateway_tokens_total{model="llama3.2",runner="ollama",type="completion"} 290.0',
        'runner_gateway_active_streams{runner="ollama"} 0.0',
        'runner_gateway_auth_failures_total{reason="missing"} 0.0',
    ]
    for line in expected:
        assert line in text.splitlines(), line


def test_registries_are_isolated() -> None:
    a, clock_a = make()
    b, _ = make()
    request(a, clock_a)
    assert (
        value(a, "runner_gateway_requests_total", runner="ollama", route="generate", code="200")
        == 1
    )
    assert (
        value(b, "runner_gateway_requests_total", runner="ollama", route="generate", code="200")
        is None
    )


# --------------------------------------------------------------- usage table


def test_usage_table_is_bounded_lru() -> None:
    table = UsageTable(max_subjects=3, started=100.0)
    for now, sub in enumerate(["a", "b", "c"]):
        table.record(sub, "m", 1, 2, float(now))
    table.record("a", "m", 1, 2, 10.0)  # a is now the most recent
    table.record("d", "m", 1, 2, 11.0)  # evicts b, the least recently used
    assert len(table) == 3
    assert "b" not in table and {"a", "c", "d"} <= {s for s in "acd" if s in table}
    assert table.evicted == 1
    for i in range(100):
        table.record(f"s{i}", None, 0, 0, 20.0)
    assert len(table) == 3
    assert table.evicted == 101


def test_usage_table_snapshot() -> None:
    metrics, clock = make(subjects_max=10)
    start = clock.seconds()
    request(metrics, clock, sub="alice")
    request(metrics, clock, sub="alice", model="qwen3")
    request(metrics, clock, sub="bob", status=403, body=None)
    request(metrics, clock, sub=None)
    snap = metrics.usage.snapshot()
    assert snap["since"] == start
    assert snap["subjects_max"] == 10
    assert sorted(snap["subjects"]) == ["alice", "bob"]
    alice = snap["subjects"]["alice"]
    assert (alice["requests"], alice["prompt_tokens"], alice["completion_tokens"]) == (2, 52, 580)
    assert alice["models"] == {
        "llama3.2": {"requests": 1, "prompt_tokens": 26, "completion_tokens": 290},
        "qwen3": {"requests": 1, "prompt_tokens": 26, "completion_tokens": 290},
    }
    assert alice["first_seen"] == start + 3.0 and alice["last_seen"] == start + 6.0
    assert snap["subjects"]["bob"]["requests"] == 1
    assert list(metrics.usage.snapshot("bob")["subjects"]) == ["bob"]
    assert metrics.usage.snapshot("nobody")["subjects"] == {}
    json.dumps(snap)


def test_usage_table_off_when_subjects_max_is_zero() -> None:
    metrics, clock = make(subjects_max=0)
    request(metrics, clock)
    assert len(metrics.usage) == 0


# ------------------------------------------------------------------ resource


def get(resource: Any, path: bytes, method: bytes = b"GET", **args: list[bytes]) -> DummyRequest:
    req = DummyRequest(path.strip(b"/").split(b"/") if path != b"/" else [b""])
    req.method = method
    req.args = {k.encode(): v for k, v in args.items()}
    leaf = getChildForRequest(resource, req)
    body = leaf.render(req)
    if body is not NOT_DONE_YET:
        req.write(body)
    return req


def test_metrics_resource_routes() -> None:
    metrics, clock = make()
    request(metrics, clock)
    root = metrics_resource(metrics)
    req = get(root, b"/metrics")
    assert req.responseHeaders.getRawHeaders(b"content-type", [b""])[0].startswith(b"text/plain")
    text = b"".join(req.written).decode()
    assert 'runner_gateway_requests_total{code="200",route="generate",runner="ollama"} 1.0' in text
    req = get(root, b"/usage", sub=[b"alice"])
    assert req.responseHeaders.getRawHeaders(b"content-type") == [
        b"application/json; charset=utf-8"
    ]
    assert json.loads(b"".join(req.written))["subjects"]["alice"]["requests"] == 1
    assert b"/metrics" in b"".join(get(root, b"/").written)
    assert get(root, b"/nope").responseCode == 404
    with pytest.raises(UnsupportedMethod):
        get(root, b"/metrics", method=b"POST")


def test_openmetrics_negotiation() -> None:
    metrics, clock = make()
    request(metrics, clock)
    req = DummyRequest([b"metrics"])
    req.requestHeaders.setRawHeaders(b"accept", [b"application/openmetrics-text; version=1.0.0"])
    body = getChildForRequest(metrics_resource(metrics), req).render(req)
    content_type = req.responseHeaders.getRawHeaders(b"content-type", [b""])[0]
    assert content_type.startswith(b"application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


LISTENER = textwrap.dedent(
    """
    import sys
    from twisted.internet import reactor
    from twisted.web.server import Site
    from runner_gateway.context import RequestContext
    from runner_gateway.metrics import Metrics, metrics_resource
    from runner_gateway.settings import MetricsSettings, RunnerSettings

    metrics = Metrics(MetricsSettings(), reactor.seconds)
    ctx = RequestContext(request_id="1", started=reactor.seconds(), route="chat",
                         runner=RunnerSettings(name="ollama", host="h", port=1, path="/"))
    ctx.claims, ctx.model, ctx.status = {"sub": "alice"}, "m", 200
    ctx.upstream_path = b"/api/chat"
    ctx.response_started("application/json")
    ctx.response_chunk(b'{"model":"m","done":true,"prompt_eval_count":3,"eval_count":4}')
    ctx.after_send()
    metrics.request_finished(ctx)
    port = reactor.listenTCP(0, Site(metrics_resource(metrics)), interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()
    """
)


def test_served_over_a_real_socket() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", LISTENER], stdout=subprocess.PIPE, cwd=ROOT, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
            text = resp.read().decode()
            assert resp.headers["content-type"].startswith("text/plain")
        assert (
            'runner_gateway_tokens_total{model="m",runner="ollama",type="completion"} 4.0' in text
        )
        with urllib.request.urlopen(f"{base}/usage", timeout=10) as resp:
            assert json.load(resp)["subjects"]["alice"]["prompt_tokens"] == 3
        head = urllib.request.Request(f"{base}/metrics", method="HEAD")
        with urllib.request.urlopen(head, timeout=10) as resp:
            assert resp.status == 200 and resp.read() == b""
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/metrics/x", timeout=10)
        assert err.value.code == 404
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ----------------------------------------------------------------- dashboard


def dashboard_exprs() -> list[str]:
    exprs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, item in node.items():
                promql = key in ("expr", "definition") or (
                    key == "query" and "runner_gateway" in str(item)
                )
                if promql and isinstance(item, str):
                    exprs.append(item)
                else:
                    walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text()))
    return exprs


def observed_everything() -> Metrics:
    metrics, clock = make()
    request(metrics, clock)
    request(metrics, clock, status=502, body=None, upstream_error="connect", aborted=True)
    request(metrics, clock, status=401, body=None, auth_failure="missing", sub=None)
    return metrics


def test_dashboard_queries_only_existing_metrics_and_labels() -> None:
    metrics = observed_everything()
    labels_of: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            labels_of.setdefault(sample.name, set()).update(sample.labels)
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    whole = DASHBOARD.read_text()
    everywhere = set(re.findall(r"runner_gateway_\w+", whole))
    assert everywhere
    for expr in exprs:
        names = set(re.findall(r"runner_gateway_\w+", expr))
        assert names, expr
        for name in names:
            assert name in labels_of, f"{name} (in {expr!r}) is not exposed"
        known = set().union(*(labels_of[n] for n in names))
        # Labels named in by (...), matchers {x="..."} and label_values(m, x).
        used = set()
        for group in re.findall(r"by \(([^)]*)\)", expr):
            used |= {label.strip() for label in group.split(",")}
        used |= set(re.findall(r"[{,]\s*(\w+)\s*(?:=~|!~|!=|=)", expr))
        used |= set(re.findall(r"label_values\(\w+,\s*(\w+)\)", expr))
        assert used <= known, f"{sorted(used - known)} not labels of {sorted(names)}: {expr!r}"
    assert {
        "runner_gateway_requests_total",
        "runner_gateway_request_duration_seconds_bucket",
        "runner_gateway_time_to_first_byte_seconds_bucket",
        "runner_gateway_tokens_total",
        "runner_gateway_active_streams",
        "runner_gateway_auth_failures_total",
        "runner_gateway_upstream_errors_total",
    } <= everywhere


def test_dashboard_check_catches_a_typo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = DASHBOARD.read_text().replace(
        "runner_gateway_tokens_total", "runner_gateway_token_total", 1
    )
    path = tmp_path / "d.json"
    path.write_text(broken)
    monkeypatch.setattr(sys.modules[__name__], "DASHBOARD", path)
    with pytest.raises(AssertionError, match="runner_gateway_token_total"):
        test_dashboard_queries_only_existing_metrics_and_labels()


# ------------------------------------------------------ end to end (twistd)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _post_stream(url: str, body: dict[str, Any], token: str | None) -> list[bytes]:
    """POST and read the streamed response line by line, as a client would."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    with urllib.request.urlopen(req, timeout=20) as resp:
        return [line.rstrip(b"\r\n") for line in resp]


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text: str = resp.read().decode()
        return text


def _sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


STAND_IN_ARGS = ("--port", "0", "--chunks", "4", "--interval", "0.01", "--quiet")


@pytest.fixture(scope="module")
def stand_in() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner_gateway.testing", *STAND_IN_ARGS],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_end_to_end_counters_usage_and_no_public_metrics(tmp_path: Path, stand_in: str) -> None:
    gateway_process = pytest.importorskip("tests.gateway_process")
    secret = "k4.local." + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    metrics_port = _free_port()
    settings_dir = tmp_path / "settings"
    settings_dir.mkdir()
    (settings_dir / "settings.yaml").write_text(
        textwrap.dedent(
            f"""
            logging: {{level: info, format: json}}
            paseto: {{secretKey: "{secret}", expiration: 1h}}
            server: {{address: "127.0.0.1:0"}}
            metrics: {{address: "127.0.0.1:{metrics_port}"}}
            runners:
              - {{name: standin, host: "{stand_in}", path: /}}
            """
        )
    )
    tool = subprocess.run(
        [sys.executable, str(ROOT / "bin" / "paseto-tool"), "-action=private", "-sub=alice"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    token = tool.stdout.strip()
    with gateway_process.start_gateway(settings_dir) as gw:
        model = "llama3.2:1b"
        # Ollama NDJSON stream: the runner's own final counts are the truth.
        lines = _post_stream(
            f"{gw.url}/api/generate", {"model": model, "prompt": "why is the sky blue"}, token
        )
        final = json.loads(lines[-1])
        assert final["done"] is True
        prompt, completion = final["prompt_eval_count"], final["eval_count"]
        # OpenAI SSE stream with the usage chunk.
        events = _post_stream(
            f"{gw.url}/v1/chat/completions",
            {
                "model": model,
                "messages": [{"role": "user", "content": "hello there"}],
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            token,
        )
        decoded = [json.loads(e[6:]) for e in events if e.startswith(b"data: {")]
        usage_event = next(e for e in decoded if isinstance(e.get("usage"), dict))
        prompt += usage_event["usage"]["prompt_tokens"]
        completion += usage_event["usage"]["completion_tokens"]
        # No token: an auth failure, no tokens counted.
        with pytest.raises(urllib.error.HTTPError) as refused:
            _post_stream(f"{gw.url}/api/generate", {"model": model, "prompt": "x"}, None)
        assert refused.value.code == 401

        metrics_url = f"http://127.0.0.1:{metrics_port}"
        text = _scrape(f"{metrics_url}/metrics")
        tokens = {"runner": "standin", "model": model}
        assert _sample(text, "runner_gateway_tokens_total", type="prompt", **tokens) == prompt
        assert (
            _sample(text, "runner_gateway_tokens_total", type="completion", **tokens) == completion
        )
        assert _sample(text, "runner_gateway_auth_failures_total", reason="missing") == 1
        ok = {"runner": "standin", "code": "200"}
        assert _sample(text, "runner_gateway_requests_total", route="/api/generate", **ok) == 1
        assert (
            _sample(text, "runner_gateway_requests_total", route="/v1/chat/completions", **ok) == 1
        )
        assert _sample(text, "runner_gateway_active_streams", runner="standin") == 0
        assert (
            _sample(
                text,
                "runner_gateway_time_to_first_byte_seconds_count",
                runner="standin",
                route="/api/generate",
            )
            == 1
        )

        with urllib.request.urlopen(f"{metrics_url}/usage?sub=alice", timeout=10) as resp:
            alice = json.load(resp)["subjects"]["alice"]
        assert (alice["requests"], alice["prompt_tokens"], alice["completion_tokens"]) == (
            2,
            prompt,
            completion,
        )

        # The public listener serves neither /metrics nor /usage.
        for path in ("/metrics", "/usage"):
            for headers in ({}, {"Authorization": f"Bearer {token}"}):
                req = urllib.request.Request(f"{gw.url}{path}", headers=headers)
                try:
                    with urllib.request.urlopen(req, timeout=10) as resp:
                        body = resp.read().decode("utf-8", "replace")
                except urllib.error.HTTPError as err:
                    body = err.read().decode("utf-8", "replace")
                assert "runner_gateway_" not in body and '"subjects"' not in body, (path, body)
