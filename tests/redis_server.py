"""A real redis-server for tests: started on a free loopback port in a temporary directory.

``stop()`` and ``start()`` again (same port, same directory, append-only file on)
let a test take Redis away and bring it back with its data.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner_gateway.testing.process import stop_process
from tests.certs import ServerFiles

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, directory: Path, password: str = "", tls: ServerFiles | None = None) -> None:
        self.directory = directory
        self.password = password
        self.tls = tls  # rediss:// only, with this certificate
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None and self.proc is None
        ports = ["--port", str(self.port)]
        if self.tls is not None:
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            ports += ["--tls-cert-file", str(self.tls.fullchain), "--tls-key-file"]
            ports += [str(self.tls.key), "--tls-ca-cert-file", str(self.tls.root)]
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                *ports,
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--save", "",
                "--appendonly", "yes",
                "--protected-mode", "no",
                *(["--requirepass", self.password] if self.password else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while self.cli("PING") != "PONG":
            assert self.proc.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=10)
            self.proc = None

    def cli(self, *args: str) -> str:
        assert REDIS_CLI is not None
        auth = ["-a", self.password, "--no-auth-warning"] if self.password else []
        if self.tls is not None:
            auth += ["--tls", "--cacert", str(self.tls.root)]
        result = subprocess.run(
            [REDIS_CLI, "-p", str(self.port), *auth, *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return result.stdout.strip()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
