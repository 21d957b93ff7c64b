"""`make demo` (python -m runner_gateway.demo): the README's first command works.

The demo runs the gateway as configured by default (one worker per CPU, so
on a multi-core machine the supervisor's "listening on ..., starting N
workers" line is the one it reads) in front of the stand-in runner, and
``--check`` exercises the chain: token, 401 without one, /healthz.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_check_passes(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner_gateway.demo",
            "--check",
            "--port",
            str(_free_port()),
            "--dir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo check: ok" in done.stdout
