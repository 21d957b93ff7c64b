"""The ``redis`` limits backend end to end: two replicas (real twistd process
trees, ``server.workers: 2`` each) counting in one real redis-server.

Replica A says ``onBackendError: allow``, replica B ``deny``; while Redis is
up the setting makes no difference, and the outage test checks both at once.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from runner_gateway.paseto import V4SecretKey, public_key_pem, secret_key_pem
from runner_gateway.testing.process import start_standin
from tests.conftest import GatewaySettings
from tests.gateway_process import GatewayProcess, start_gateway
from tests.redis_server import REDIS_CLI, REDIS_SERVER, RedisServer
from tests.test_limits_e2e import (
    _free_port,
    _get,
    _open_stream,
    _records,
    _Stream,
    _usage,
    _wait,
    _workers,
)

pytestmark = pytest.mark.timeout(180)


@dataclass
class Replica:
    gw: GatewayProcess
    metrics_port: int


@dataclass
class Replicas:
    a: Replica  # onBackendError: allow
    b: Replica  # onBackendError: deny
    settings: GatewaySettings
    redis: RedisServer
    upstream: str  # host:port of the slow stand-in
    root: Path

    @property
    def both(self) -> tuple[Replica, Replica]:
        return self.a, self.b


def _settings(directory: Path, key: V4SecretKey, upstream: str, redis: str, on_error: str) -> int:
    directory.mkdir(parents=True)
    (directory / "paseto.key").write_bytes(secret_key_pem(key))
    (directory / "paseto.pub").write_bytes(public_key_pem(key.public_key()))
    metrics_port = _free_port()
    (directory / "settings.yaml").write_text(
        f"paseto:\n  publicPath: {directory}/paseto.pub\n  keyPath: {directory}/paseto.key\n"
        "logging:\n  format: json\n"
        f"runners:\n  - name: r0\n    host: {upstream}\n    path: /\n"
        "server:\n  address: 127.0.0.1:0\n  workers: 2\n  drainTimeout: 2s\n"
        f"metrics:\n  address: 127.0.0.1:{metrics_port}\n"
        f'redis:\n  url: {redis}\n  keyPrefix: "t:"\n  commandTimeout: 2s\n'
        "limits:\n"
        "  backend: redis\n"
        f"  onBackendError: {on_error}\n"
        "  tiers:\n"
        "    rpm: {requestsPerMinute: 30}\n"
        "    conc: {concurrentRequests: 3}\n"
        "    wide: {requestsPerMinute: 1000}\n"
    )
    return metrics_port


@contextlib.contextmanager
def _replica(
    directory: Path, key: V4SecretKey, upstream: str, redis: str, on_error: str
) -> Iterator[Replica]:
    port = _settings(directory, key, upstream, redis, on_error)
    with start_gateway(directory) as gw:
        _wait(lambda: len(_workers(gw)) == 2, "two workers serving")
        # A worker serves before its Redis link is up (a request then meets
        # onBackendError): the tests count from a connected start.
        _wait(lambda: _connected(gw) == {"w0", "w1"}, "both workers connected to Redis")
        yield Replica(gw, port)


def _connected(gw: GatewayProcess) -> set[str]:
    """The workers (w0, w1) that said their Redis link is up."""
    return {
        str(record.get("logger", "")).rpartition("/")[2]
        for record in _records(gw)
        if str(record.get("message", "")).startswith("Redis at ")
        and str(record.get("message", "")).endswith(" is connected")
    }


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    root = tmp_path_factory.mktemp("limits-redis")
    (root / "redis").mkdir()
    redis = RedisServer(root / "redis")
    redis.start()
    key = V4SecretKey.generate()
    with ExitStack() as stack:
        stack.callback(redis.stop)
        # Streams of 120 chunks 0.25 s apart: they outlast every test.
        host, port, _ = stack.enter_context(
            start_standin(["--chunks", "120", "--interval", "0.25", "--quiet"])
        )
        upstream = f"{host}:{port}"
        a = stack.enter_context(_replica(root / "a", key, upstream, redis.url, "allow"))
        b = stack.enter_context(_replica(root / "b", key, upstream, redis.url, "deny"))
        yield Replicas(a, b, GatewaySettings(root / "a", key), redis, upstream, root)


def _limits(replica: Replica) -> dict[str, object]:
    limits = _usage(replica.metrics_port)["limits"]
    assert isinstance(limits, dict)
    return limits


def _concurrent(replica: Replica, subject: str) -> int:
    entry = _limits(replica)["subjects"].get(subject)  # type: ignore[attr-defined]
    return int(entry["concurrent"]) if entry else 0


def _metric(replica: Replica, name: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", replica.metrics_port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def test_requests_per_minute_exact_across_replicas(replicas: Replicas) -> None:
    token = replicas.settings.token(sub="burst", tier="rpm")
    targets = [replicas.both[i % 2].gw for i in range(90)]
    with ThreadPoolExecutor(90) as pool:
        answers = list(pool.map(lambda gw: _get(gw, "/api/tags", token), targets))
    statuses = [status for status, _, _ in answers]
    assert statuses.count(200) == 30
    assert statuses.count(429) == 60
    for i in (0, 1):  # both replicas admitted some and refused some
        mine = [answers[n][0] for n in range(i, 90, 2)]
        assert 200 in mine and 429 in mine
    _, headers, body = next(a for a in answers if a[0] == 429)
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["ratelimit-policy"] == '"requests";q=30;w=60'
    assert headers["ratelimit"].startswith('"requests";r=0;t=')
    assert "30 requests per minute" in json.loads(body)["error"]
    for replica in replicas.both:  # the same counts, seen from either replica
        limits = _limits(replica)
        assert limits["backend"] == "redis"
        entry = limits["subjects"]["burst"]  # type: ignore[index]
        assert (entry["requests_last_minute"], entry["requests_remaining"]) == (30, 0)
        assert _metric(replica, "runner_gateway_limits_backend_down") == 0.0


def test_concurrency_exact_across_replicas(replicas: Replicas) -> None:
    token = replicas.settings.token(sub="streamer", tier="conc")
    targets = [replicas.both[i % 2].gw for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        streams = list(pool.map(lambda gw: _open_stream(gw, token), targets))
    try:
        assert sorted(s.status for s in streams) == [200, 200, 200, 429, 429, 429]
        assert _concurrent(replicas.a, "streamer") == 3
        # A stream that ends gives its slot back, to either replica.
        next(s for s in streams if s.status == 200).close()
        _wait(lambda: _concurrent(replicas.b, "streamer") == 2, "the slot given back")
        replacement = _open_stream(replicas.b.gw, token)
        streams.append(replacement)
        assert replacement.status == 200
        assert _open_stream(replicas.a.gw, token).status == 429
    finally:
        for s in streams:
            s.close()
    _wait(lambda: _concurrent(replicas.a, "streamer") == 0, "every slot given back")


def test_redis_down_follows_on_backend_error_and_recovers(replicas: Replicas) -> None:
    token = replicas.settings.token(sub="outage", tier="wide")
    assert _get(replicas.a.gw, "/api/tags", token)[0] == 200
    replicas.redis.stop()
    try:
        # allow: served uncounted; deny: 503 with Retry-After. Never a hang (the
        # client would time out after 60 s).
        _wait(lambda: _get(replicas.b.gw, "/api/tags", token)[0] == 503, "deny refuses")
        status, headers, body = _get(replicas.b.gw, "/api/tags", token)
        assert status == 503 and headers["retry-after"] == "1"
        assert "limits backend" in json.loads(body)["error"]
        for _ in range(5):
            assert _get(replicas.a.gw, "/api/tags", token)[0] == 200
        for replica in replicas.both:
            # Each worker notices (its own renewal fails within a second).
            _wait(
                lambda r=replica: _metric(r, "runner_gateway_limits_backend_down") == 2.0,  # type: ignore[misc]
                "both workers report the backend down",
            )
            _, _, body = _get(replica.gw, "/readyz", token)
            assert json.loads(body)["detail"]["limits"].startswith("the redis backend fails")
    finally:
        replicas.redis.start()
    for replica in replicas.both:
        _wait(
            lambda r=replica: _metric(r, "runner_gateway_limits_backend_down") == 0.0,  # type: ignore[misc]
            "the backend back",
        )
        _wait(lambda r=replica: _get(r.gw, "/api/tags", token)[0] == 200, "served again")  # type: ignore[misc]
    # Counted again: the first request and those after the outage, none in it.
    entry = _limits(replicas.a)["subjects"]["outage"]  # type: ignore[index]
    counted = entry["requests_last_minute"]
    assert _get(replicas.b.gw, "/api/tags", token)[0] == 200
    entry = _limits(replicas.a)["subjects"]["outage"]  # type: ignore[index]
    assert entry["requests_last_minute"] == counted + 1
    # A warning once per outage and worker, and a line when it is back.
    for replica in replicas.both:
        records = _records(replica.gw)
        failed = [r for r in records if "limits: the redis backend failed" in str(r["message"])]
        back = [r for r in records if "limits: the redis backend works again" in str(r["message"])]
        workers = {r["pid"] for r in failed}
        assert len(failed) == len(workers) == 2
        assert {r["pid"] for r in back} == workers


def test_a_killed_replica_gives_its_slots_back(replicas: Replicas) -> None:
    token = replicas.settings.token(sub="crasher", tier="conc")
    streams: list[_Stream] = []
    directory = replicas.root / "c"
    with _replica(
        directory, replicas.settings.key, replicas.upstream, replicas.redis.url, "allow"
    ) as c:
        try:
            streams += [_open_stream(c.gw, token) for _ in range(3)]
            assert [s.status for s in streams] == [200, 200, 200]
            assert _open_stream(replicas.a.gw, token).status == 429
            # SIGKILL the whole replica: supervisor and workers, without a word.
            killed_at = time.monotonic()
            for pid in (c.gw.proc.pid, *_workers(c.gw).values()):
                os.kill(pid, signal.SIGKILL)
            again: list[_Stream] = []
            while len([s for s in again if s.status == 200]) < 3:
                assert time.monotonic() - killed_at < 10, "slots not back within 10 s"
                again.append(_open_stream(replicas.both[len(again) % 2].gw, token))
                if again[-1].status != 200:
                    time.sleep(0.1)
            streams += again
            assert _open_stream(replicas.b.gw, token).status == 429
        finally:
            for s in streams:
                s.close()


def _quick_get(replica: Replica, token: str) -> int:
    """A request that fails the test if the gateway holds it (Redis silent)."""
    parts = urlsplit(replica.gw.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        conn.request("GET", "/api/tags", headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_a_silent_redis_never_holds_a_request(replicas: Replicas) -> None:
    token = replicas.settings.token(sub="silence", tier="wide")
    assert _quick_get(replicas.b, token) == 200
    proc = replicas.redis.proc
    assert proc is not None
    seen = [(r, len(r.gw.lines)) for r in replicas.both]
    proc.send_signal(signal.SIGSTOP)  # connected, but no answer ever comes
    try:
        # Each answer comes within the deadline (redis.commandTimeout: 2 s; longer than
        # a loaded CI machine can take to answer, shorter than the client waits).
        for _ in range(3):
            assert _quick_get(replicas.a, token) == 200
            assert _quick_get(replicas.b, token) == 503
        time.sleep(3)  # renewals, reconnects and their PINGs go unanswered meanwhile
    finally:
        proc.send_signal(signal.SIGCONT)
    # One warning per process and outage, however many renewals went unanswered.
    for replica, start in seen:
        lines = [json.loads(x) for x in replica.gw.lines[start:] if x.startswith("{")]
        warned = [r["pid"] for r in lines if "redis backend failed" in str(r["message"])]
        assert warned and len(warned) == len(set(warned))
    for replica in replicas.both:
        _wait(lambda r=replica: _quick_get(r, token) == 200, "served again")  # type: ignore[misc]
