"""Shared fixtures: a stand-in runner process, keys, settings and a token minter."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runner_gateway.paseto import V4SecretKey, issue, public_key_pem, rfc3339, secret_key_pem
from runner_gateway.testing.process import start_standin


@dataclass
class StandIn:
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@pytest.fixture(scope="session")
def standin() -> Iterator[StandIn]:
    """One stand-in runner for the session (3 chunks, 150 ms apart)."""
    with start_standin(["--chunks", "3", "--interval", "0.15", "--quiet"]) as (host, port, _):
        yield StandIn(host, port)


@dataclass
class GatewaySettings:
    directory: Path
    key: V4SecretKey

    def token(self, lifetime: float = 3600, **claims: Any) -> str:
        now = time.time()
        payload = {
            "sub": "tester",
            "iat": rfc3339(now),
            "nbf": rfc3339(now),
            "exp": rfc3339(now + lifetime),
            **claims,
        }
        return issue(self.key, payload)

    def write(self, name: str, text: str) -> Path:
        path = self.directory / name
        path.write_text(text)
        return path


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[[str], GatewaySettings]:
    """settings/ with a fresh v4 key pair and the given settings.yaml body."""

    def make(body: str) -> GatewaySettings:
        directory = tmp_path / "settings"
        directory.mkdir(exist_ok=True)
        key = V4SecretKey.generate()
        (directory / "paseto.key").write_bytes(secret_key_pem(key))
        (directory / "paseto.pub").write_bytes(public_key_pem(key.public_key()))
        header = (
            f"paseto:\n  publicPath: {directory}/paseto.pub\n  keyPath: {directory}/paseto.key\n"
        )
        (directory / "settings.yaml").write_text(header + body)
        return GatewaySettings(directory, key)

    return make
