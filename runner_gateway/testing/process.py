"""Run the stand-in runner in a subprocess (for end-to-end tests and benchmarks).

    with start_standin(["--chunks", "3"]) as (host, port, proc):
        ...  # http://{host}:{port}/api/tags

No Twisted here: the caller may be a plain pytest test, a benchmark script or
a test that runs its own reactor.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["StandInStartError", "die_with_parent", "start_standin", "stop_process"]

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class StandInStartError(RuntimeError):
    """The subprocess exited or said nothing before the timeout."""


def _read_first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(timeout=max(0.0, deadline - time.monotonic())):
                return proc.stdout.readline()
            if proc.poll() is not None:
                break
    return ""


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> bool:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; True when it stopped on SIGTERM."""
    if proc.poll() is not None:
        return True
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
        return False


def die_with_parent() -> None:
    """A ``preexec_fn``: the child gets SIGTERM when the process that started
    it dies, even by SIGKILL, so it never outlives it (Linux; elsewhere a no-op)."""
    if sys.platform != "linux":
        return
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextmanager
def start_standin(
    args: Sequence[str] = (),
    *,
    timeout: float = 15.0,
    stderr: int | IO[str] | None = None,
    python: str = sys.executable,
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[tuple[str, int, subprocess.Popen[str]]]:
    """Start ``python -m runner_gateway.testing --port 0 ARGS``; yield (host, port, proc).

    ``args`` may also set ``--host``, ``--chunks``, ``--interval``,
    ``--header-delay``, ``--quiet`` ... (a later ``--port`` wins over ours).
    The per-request log goes to ``stderr`` (default: inherited, so pytest
    captures it and shows it when a test fails). The process is terminated
    (then killed) on exit.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    command = [python, "-m", "runner_gateway.testing", "--port", "0", *args]
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        command,
        stdout=subprocess.PIPE,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
        preexec_fn=preexec_fn,
    )
    try:
        line = _read_first_line(proc, timeout).strip()
        prefix = "listening on "
        if not line.startswith(prefix):
            raise StandInStartError(
                f"stand-in runner did not start (exit code {proc.poll()}, first line {line!r})"
            )
        address = line[len(prefix) :]
        host, _, port = address.rpartition(":")
        yield host.strip("[]"), int(port), proc
    finally:
        stop_process(proc, timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
