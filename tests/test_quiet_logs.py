"""A /metrics scrape writes nothing to the log at info, with or without workers.

Each scrape used to give an access line and, behind the supervisor, a
"Starting factory" / "Stopping factory" pair per worker asked: some 29,000
lines a day at a 15 s scrape interval.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable

import pytest
from twisted.logger import LogLevel

from runner_gateway.logs import make_observer
from tests.conftest import GatewaySettings, StandIn
from tests.gateway_process import GatewayProcess, start_gateway


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str, request_id: str = "") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers={"X-Request-Id": request_id} if request_id else {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def _scrape_until_workers(port: int, workers: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, body = _get(port, "/usage")
        if status == 200 and json.loads(body).get("workers", 1) >= workers:
            return
        time.sleep(0.1)
    raise AssertionError("the workers did not come up")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_scrapes_log_nothing(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn, workers: int
) -> None:
    metrics_port = _free_port()
    settings = make_settings(
        f"runners:\n  - name: r0\n    host: {standin.address}\n    path: /\n"
        f"server:\n  address: 127.0.0.1:0\n  workers: {workers}\n"
        # The test is the trusted proxy: it marks the log with request ids of its own.
        "  trustedProxies: [127.0.0.1/32]\n"
        f"metrics:\n  address: 127.0.0.1:{metrics_port}\n"
    )
    with start_gateway(settings.directory) as gw:
        _scrape_until_workers(metrics_port, workers)
        # Start-up lines that come late (each serving process probes the runner).
        deadline = time.monotonic() + 30
        while sum("runner r0 at" in line for line in list(gw.lines)) < workers:
            assert time.monotonic() < deadline, gw.output
            time.sleep(0.05)
        gw_port = int(gw.url.rsplit(":", 1)[1])
        _mark(gw, gw_port, "before")
        start = len(gw.lines)
        for _ in range(3):
            assert _get(metrics_port, "/metrics")[0] == 200
            assert _get(metrics_port, "/usage")[0] == 200
        _mark(gw, gw_port, "after")
        between = [line for line in gw.lines[start:] if "id=mark-after" not in line]
    assert between == []


def _mark(gw: GatewayProcess, port: int, tag: str) -> None:
    """An access line on the main port: everything logged before it is in."""
    assert _get(port, "/healthz", f"mark-{tag}")[0] == 200
    gw.wait_for(f"id=mark-{tag}")


def test_factory_chatter_is_dropped_from_any_factory() -> None:
    lines: list[str] = []

    class Out:
        def write(self, text: str) -> None:
            lines.append(text)

        def flush(self) -> None:
            pass

    observer = make_observer("info", "text", Out())  # type: ignore[arg-type]
    for verb in ("Starting", "Stopping"):
        observer(
            {
                "log_format": verb + " factory {factory!r}",
                "factory": object(),
                "log_level": LogLevel.info,
                "log_namespace": "twisted.web.client._HTTP11ClientFactory",
                "log_time": time.time(),
            }
        )
    observer(
        {
            "log_format": "kept",
            "log_level": LogLevel.info,
            "log_namespace": "x",
            "log_time": time.time(),
        }
    )
    assert len(lines) == 1 and "kept" in lines[0]
