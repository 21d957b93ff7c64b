"""The benchmark suite's common ground: paths, request bodies, the plan, processes."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
LITELLM_VENV = BENCH / ".venv-litellm"
GATEWAY_VENV = BENCH / ".venv-gateway"
PROD_PYTHON = Path("/usr/bin/python3.11")  # Debian's: PGO + LTO
DOCS = ROOT / "docs" / "benchmarks.md"
CHART = ROOT / "docs" / "benchmarks.png"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
MODEL = "llama3.2:1b"
STATIC_KEY = "bench-static-key"  # nginx's and Caddy's bearer check (a fixed string)
LITELLM_KEY = "sk-bench"
CHAT_BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "stream": False},
    separators=(",", ":"),
)
OPENAI_BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}]}, separators=(",", ":")
)
# What Ollama answers to a small non-streamed chat.
UPSTREAM_REPLY = json.dumps(
    {
        "model": MODEL,
        "created_at": "2025-01-01T00:00:00.000000Z",
        "message": {"role": "assistant", "content": "Hi! How can I help you today?"},
        "done_reason": "stop",
        "done": True,
        "total_duration": 123456789,
        "load_duration": 1234567,
        "prompt_eval_count": 26,
        "prompt_eval_duration": 12345678,
        "eval_count": 10,
        "eval_duration": 23456789,
    },
    separators=(",", ":"),
)
DEV_TWISTD = str(Path(sys.executable).parent / "twistd")


def target_python() -> str:
    """The Python targets' interpreter: bench/.venv-gateway's once a full run made it."""
    venv = GATEWAY_VENV / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def target_twistd() -> str:
    return str(Path(target_python()).parent / "twistd")


@dataclass(frozen=True)
class Plan:
    """Durations and counts: the full run's or the smoke's."""

    smoke: bool
    duration: int  # seconds per wrk measurement
    warmup: int
    concurrencies: tuple[int, ...]
    stream_requests: int
    stream_chunks: int
    stream_interval: float
    capacity: tuple[int, ...]
    auth_min_time: float

    @classmethod
    def make(cls, smoke: bool) -> Plan:
        if smoke:
            return cls(True, 1, 0, (1, 4), 2, 3, 0.01, (20, 50), 0.01)
        return cls(False, 6, 1, (1, 32), 100, 10, 0.02, (1000, 10000), 0.3)


@dataclass
class Run:
    plan: Plan
    work: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        print(f"bench: {text}", flush=True)
        self.notes.append(text)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = (self.work / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.work,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.procs.append(proc)
        return Proc(name, proc, self.work / f"{name}.log")

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        self.procs.clear()


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 60) -> list[Any]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = regex.findall(self.text())
            if len(found) >= count:
                return found
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: no {pattern!r} in its log:\n{self.text()[-3000:]}")


def stop(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited:\n{proc.text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def post(port: int, path: str, body: str, token: str, timeout: float = 30) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    conn.request("POST", path, body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data
