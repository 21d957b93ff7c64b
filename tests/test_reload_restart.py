"""A SIGHUP change that only a restart applies is named in the log."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, globalLogPublisher

from runner_gateway.service import GatewayService
from runner_gateway.settings import load_settings, restart_needed

BASE = (
    "runners: [{name: r, host: '127.0.0.1:1', path: /}]\n"
    "paseto: {secretKey: '" + "ab" * 32 + "'}\n"
    "server: {workers: 1}\n"
)


@pytest.mark.parametrize(
    ("extra", "keys"),
    [
        ("metrics: {address: '127.0.0.1:9464'}\n", ["metrics.address"]),
        ("metrics: {perSubject: true}\n", ["metrics.perSubject"]),
        (
            "server: {workers: 1, address: ':9443', headerTimeout: 5s}\n",
            ["server.address", "server.headerTimeout"],
        ),
        ("logging: {format: json}\n", ["logging.format"]),
        ("redis: {url: 'redis://127.0.0.1:6390'}\n", ["redis.url"]),
        ("server: {corsOrigins: ['https://a.example']}\n", []),  # applied live
        ("logging: {level: debug}\n", []),
    ],
)
def test_restart_needed_names_the_keys(tmp_path: Path, extra: str, keys: list[str]) -> None:
    (tmp_path / "settings.yaml").write_text(BASE)
    old = load_settings(tmp_path, environ={})
    (tmp_path / "new.yaml").write_text(extra)
    assert restart_needed(old, load_settings(tmp_path, env="new", environ={})) == keys


def test_reload_warns_naming_metrics_address(tmp_path: Path) -> None:
    (tmp_path / "settings.yaml").write_text(BASE)
    service = GatewayService(lambda: load_settings(tmp_path, environ={}), MemoryReactorClock())
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        (tmp_path / "settings.yaml").write_text(BASE + "metrics: {address: '127.0.0.1:9464'}\n")
        assert service.reload()
    finally:
        globalLogPublisher.removeObserver(observer)
    warnings = [
        e for e in events if e.get("log_level") is not None and e["log_level"].name == "warn"
    ]
    assert [e["keys"] for e in warnings if "restart" in e.get("log_format", "")] == [
        "metrics.address"
    ]
