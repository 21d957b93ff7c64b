"""Run the real gateway (``twistd -n runner-gateway``) in a subprocess for end-to-end tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from runner_gateway.testing.process import stop_process

TWISTD = str(Path(sys.executable).parent / "twistd")
_LISTENING = re.compile(r"listening on (https?)://([0-9.]+):(\d+)")


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[str]
    settings_dir: Path
    url: str = ""
    lines: list[str] = field(default_factory=list)
    _ready: threading.Event = field(default_factory=threading.Event)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            match = _LISTENING.search(line)
            if match and not self.url:
                self.url = f"{match.group(1)}://{match.group(2)}:{match.group(3)}"
                self._ready.set()
        self._ready.set()

    def wait_for(self, pattern: str, timeout: float = 10.0) -> str:
        """Wait until a log line matches (for events that happen after a request)."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if regex.search(line):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no log line matched {pattern!r}; output:\n{self.output}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)


def run_twistd(
    settings_dir: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    """Run twistd to completion (for start-up failures)."""
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "runner-gateway", "--settings", str(settings_dir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=settings_dir.parent,
        env={**_clean_env(), **(env or {})},
        check=False,
    )


def _clean_env() -> dict[str, str]:
    drop = {"GO_ENV", "RUNNER_GATEWAY_ENV", "LOGGING_LEVEL", "PASETO_SECRET_KEY"}
    drop |= {"SERVER_ADDRESS", "SERVER_CERTIFICATE_PATH", "SERVER_KEY_PATH"}
    return {k: v for k, v in os.environ.items() if k not in drop}


@contextmanager
def start_gateway(
    settings_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    startup_timeout: float = 20.0,
) -> Iterator[GatewayProcess]:
    """Start the gateway; yields once it logged its listening address."""
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "runner-gateway", "--settings", str(settings_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=settings_dir.parent,
        env={**_clean_env(), **(env or {})},
    )
    gateway = GatewayProcess(proc, settings_dir)
    pump = threading.Thread(target=gateway._pump, daemon=True)
    pump.start()
    try:
        if not gateway._ready.wait(startup_timeout) or not gateway.url:
            raise AssertionError(f"gateway did not start:\n{gateway.output}")
        yield gateway
    finally:
        stop_process(proc, timeout=15)
        pump.join(timeout=5)
