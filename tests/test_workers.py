"""server.workers > 1: the supervisor and its worker processes (workers.py).

The end-to-end test runs the real twistd supervisor with two workers in front
of the stand-in runner and checks, from the workers' JSON log lines (each
carries its ``pid``), that both serve, both reload on SIGHUP, a killed worker
is replaced, and SIGTERM drains a stream in flight before everything exits.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet.error import CannotListenError

from runner_gateway.settings import Address, MetricsSettings, ServerSettings, Settings
from runner_gateway.workers import (
    WORKER_FD,
    bind_sockets,
    merge_exposition,
    merge_usage,
    restart_delay,
    worker_argv,
    worker_settings,
)
from tests.conftest import GatewaySettings, StandIn
from tests.gateway_process import GatewayProcess, start_gateway

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------ pure parts


def test_restart_delay_doubles_up_to_a_cap() -> None:
    delays = [restart_delay(n) for n in range(12)]
    assert delays[0] == pytest.approx(0.2)
    assert delays[1] == pytest.approx(0.4)
    assert delays == sorted(delays)
    assert delays[-1] == 30.0


def test_worker_settings_private_metrics_and_no_redirect() -> None:
    settings = Settings(
        server=ServerSettings(
            address=Address("127.0.0.1", 8443),
            redirect_address=Address("127.0.0.1", 8080),
            workers=3,
        ),
        metrics=MetricsSettings(address=Address("", 9464)),
    )
    mine = worker_settings(settings, 2)
    # The supervisor serves 9464 (the sum of all workers) and the redirect.
    assert mine.metrics.address == Address("127.0.0.1", 0)
    assert mine.server.redirect_address is None
    assert mine.server.address == settings.server.address
    assert worker_settings(Settings(), 0).metrics.address is None


_EXPOSITION = """# HELP rg_requests_total Requests.
# TYPE rg_requests_total counter
rg_requests_total{{runner="a",code="200"}} {a}
rg_requests_total{{runner="b",code="200"}} {b}
# HELP rg_requests_created Requests.
# TYPE rg_requests_created gauge
rg_requests_created{{runner="a",code="200"}} {created}
# HELP rg_active Streams.
# TYPE rg_active gauge
rg_active {active}
# HELP rg_seconds Duration.
# TYPE rg_seconds histogram
rg_seconds_bucket{{le="0.1"}} {a}
rg_seconds_bucket{{le="+Inf"}} {b}
rg_seconds_count {b}
rg_seconds_sum 1.5
"""


def test_merge_exposition_adds_up_and_keeps_earliest_created() -> None:
    texts = [
        _EXPOSITION.format(a=1, b=2, created=200.0, active=3),
        _EXPOSITION.format(a=10, b=20, created=100.0, active=1),
    ]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(merge_exposition(texts)))
    out = generate_latest(registry).decode()
    assert 'rg_requests_total{code="200",runner="a"} 11.0' in out
    assert 'rg_requests_total{code="200",runner="b"} 22.0' in out
    assert 'rg_requests_created{code="200",runner="a"} 100.0' in out
    assert "rg_active 4.0" in out
    assert 'rg_seconds_bucket{le="0.1"} 11.0' in out
    assert "rg_seconds_sum 3.0" in out
    # Buckets stay in order: Prometheus needs le ascending.
    assert out.index('le="0.1"') < out.index('le="+Inf"')


class _Collector:
    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> list[Any]:
        return self.families


def test_merge_usage_sums_subjects_and_models() -> None:
    def snap(requests: int, first: float, last: float, model: str) -> dict[str, Any]:
        counts = {"requests": requests, "prompt_tokens": 2 * requests, "completion_tokens": 1}
        return {
            "since": first,
            "subjects_max": 10,
            "evicted": 1,
            "subjects": {
                "alice": {
                    **counts,
                    "first_seen": first,
                    "last_seen": last,
                    "models": {model: counts},
                }
            },
        }

    merged = merge_usage(
        [snap(1, 5.0, 6.0, "m1"), snap(2, 3.0, 4.0, "m2"), snap(3, 4.0, 9.0, "m1")]
    )
    alice = merged["subjects"]["alice"]
    assert (alice["requests"], alice["prompt_tokens"], alice["completion_tokens"]) == (6, 12, 3)
    assert (alice["first_seen"], alice["last_seen"]) == (3.0, 9.0)
    assert alice["models"]["m1"]["requests"] == 4
    assert alice["models"]["m2"]["requests"] == 2
    assert (merged["since"], merged["evicted"], merged["workers"]) == (3.0, 3, 3)
    assert merge_usage([])["subjects"] == {}


def test_worker_argv_passes_settings_env_and_fd() -> None:
    argv = worker_argv(
        {"settings": "settings", "env": "prod", "logging-level": None}, 1, executable="/py"
    )
    assert argv[0] == "/py"
    assert argv[argv.index("--settings") + 1] == os.path.abspath("settings")
    assert argv[argv.index("--env") + 1] == "prod"
    assert "--logging-level" not in argv
    assert argv[-6:-2] == ["--worker-fd", str(WORKER_FD), "--worker-index", "1"]
    assert argv[-2:] == ["--supervisor-pid", str(os.getpid())]


def test_bind_sockets_share_one_port() -> None:
    sockets = bind_sockets(Address("127.0.0.1", 0), 2)
    try:
        ports = {s.getsockname()[1] for s in sockets}
        assert len(ports) == 1
        assert len(sockets) == (2 if hasattr(socket, "SO_REUSEPORT") else 1)
        # Both accept: a connection lands on one of them.
        port = ports.pop()
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        for s in sockets:
            s.close()


def test_bind_sockets_port_in_use_is_cannot_listen() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(CannotListenError):
            bind_sockets(Address("127.0.0.1", taken.getsockname()[1]), 2)
    finally:
        taken.close()


def test_bind_sockets_does_not_join_another_reuseport_group() -> None:
    """Another supervisor's SO_REUSEPORT listener: a second one must not share its port."""
    first = bind_sockets(Address("127.0.0.1", 0), 2)
    try:
        with pytest.raises(CannotListenError):
            bind_sockets(Address("127.0.0.1", first[0].getsockname()[1]), 2)
    finally:
        for s in first:
            s.close()


# ------------------------------------------------------------------ end to end


def _records(gw: GatewayProcess) -> list[dict[str, object]]:
    found = []
    for line in list(gw.lines):
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def _wait(gw: GatewayProcess, test: Callable[[list[dict[str, object]]], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if test(_records(gw)):
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; output:\n{gw.output}")


def _serving(records: list[dict[str, object]]) -> dict[int, int]:
    """worker index -> pid of its latest 'serving' line."""
    found: dict[int, int] = {}
    for r in records:
        if str(r.get("message", "")).startswith("worker ") and "serving" in str(r["message"]):
            found[int(str(r["worker"]))] = int(str(r["pid"]))
    return found


def _get(gw: GatewayProcess, path: str, token: str, request_id: str) -> int:
    parts = urlsplit(gw.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    conn.request(
        "GET", path, headers={"Authorization": f"Bearer {token}", "X-Request-Id": request_id}
    )
    status = conn.getresponse().status
    conn.close()
    return status


def _served_by(gw: GatewayProcess, request_id: str) -> int:
    line = gw.wait_for(f'"request_id": ?"{request_id}"')
    return int(json.loads(line)["pid"])


def _pids_serving(gw: GatewayProcess, token: str, want: set[int], tag: str) -> set[int]:
    """Send requests on fresh connections until every pid in ``want`` served one."""
    seen: set[int] = set()
    for i in range(60):
        rid = f"{tag}-{i}"
        assert _get(gw, "/api/tags", token, rid) == 200
        seen.add(_served_by(gw, rid))
        if want <= seen:
            break
    return seen


def _fetch(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    assert response.status == 200, body
    return body


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_workers_serve_reload_restart_and_drain(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn
) -> None:
    metrics_port = _free_port()
    settings = make_settings(
        "logging:\n  format: json\n"
        f"runners:\n  - name: r0\n    host: {standin.address}\n    path: /\n"
        "server:\n  address: 127.0.0.1:0\n  workers: 2\n  drainTimeout: 10s\n"
        # The test is the trusted proxy: it picks the request ids it looks for.
        "  trustedProxies: [127.0.0.1/32]\n"
        f"metrics:\n  address: 127.0.0.1:{metrics_port}\n"
    )
    token = settings.token()
    with start_gateway(settings.directory) as gw:
        assert "supervisor" in gw.wait_for("listening on")
        _wait(gw, lambda r: len(_serving(r)) == 2, "two workers serving")
        pids = _serving(_records(gw))
        supervisor_pid = gw.proc.pid
        assert len(set(pids.values())) == 2
        assert supervisor_pid not in pids.values()

        # Both workers take connections from the one address.
        assert _pids_serving(gw, token, set(pids.values()), "a") == set(pids.values())

        # The supervisor's metrics listener adds both workers up.
        served = sum(1 for r in _records(gw) if r.get("path") == "/api/tags")
        metrics = _fetch(metrics_port, "/metrics").decode()
        total = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("runner_gateway_requests_total{")
        )
        assert total == served
        usage = json.loads(_fetch(metrics_port, "/usage"))
        assert usage["workers"] == 2
        assert usage["subjects"]["tester"]["requests"] == served

        # SIGHUP to the supervisor reaches both workers; each reloads.
        gw.signal(signal.SIGHUP)
        _wait(
            gw,
            lambda r: (
                {int(str(x["pid"])) for x in r if "settings reloaded" in str(x.get("message"))}
                == set(pids.values())
            ),
            "both workers reloading",
        )

        # A worker that dies is replaced, and the replacement serves.
        os.kill(pids[1], signal.SIGKILL)
        gw.wait_for(r"worker 1 \(pid \d+\) exited unexpectedly \(signal SIGKILL\)")
        _wait(gw, lambda r: _serving(r).get(1) not in (None, pids[1]), "worker 1 replaced")
        replaced = _serving(_records(gw))[1]
        assert _pids_serving(gw, token, {replaced}, "b") >= {replaced}

        # SIGTERM while a stream is in flight: the stream finishes, then all exit.
        parts = urlsplit(gw.url)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
        body = json.dumps({"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}]})
        conn.request("POST", "/api/chat", body=body, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        assert response.status == 200
        first = response.readline()
        gw.signal(signal.SIGTERM)
        rest = response.read()
        conn.close()
        lines = [first, *rest.splitlines()]
        assert json.loads(lines[-1])["done"] is True
        assert len(lines) >= 3  # every chunk of the stand-in's 3, not cut at SIGTERM
        assert gw.proc.wait(timeout=30) in (0, -signal.SIGTERM)
        stopped = {
            int(str(x["pid"]))
            for x in _records(gw)
            if x.get("message") == "Server Shut Down." and "pid" in x
        }
        assert stopped == {pids[0], replaced}
    for pid in (pids[0], replaced):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _workers_of(supervisor: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"--supervisor-pid" in argv and str(supervisor).encode() in argv:
                found.add(int(entry))
    return found


def test_workers_stop_when_the_supervisor_dies_while_they_start(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn
) -> None:
    """Killed (SIGKILL) before its workers serve, the supervisor leaves no orphan
    holding the port: each worker knows its supervisor's pid from the command line."""
    settings = make_settings(
        f"runners:\n  - name: r0\n    host: {standin.address}\n    path: /\n"
        "server:\n  address: 127.0.0.1:0\n  workers: 2\n"
    )
    with start_gateway(settings.directory) as gw:
        gw.wait_for("listening on")
        supervisor = gw.proc.pid
        deadline = time.monotonic() + 10
        while len(_workers_of(supervisor)) < 2:  # spawned, still starting up
            assert time.monotonic() < deadline, gw.output
            time.sleep(0.02)
        os.kill(supervisor, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while _workers_of(supervisor):
            assert time.monotonic() < deadline, "workers outlived their supervisor"
            time.sleep(0.1)
