"""A stand-in model runner for tests, benchmarks and demos (as treq ships treq.testing).

It speaks Ollama's API and the OpenAI-compatible one closely enough for the
official ``ollama`` and ``openai`` clients; see docs/stand-in-runner.md.

    runner = StandInRunner(chunks=5, interval=0.05)
    port = listen(runner, reactor)              # in-process, same reactor
    python -m runner_gateway.testing --port 0   # standalone
    with start_standin() as (host, port, proc): ...   # in a subprocess
"""

from __future__ import annotations

from runner_gateway.testing.process import start_standin
from runner_gateway.testing.replies import DEFAULT_MODELS, SPECIAL_MODELS, make_model
from runner_gateway.testing.runner import (
    DEFAULT_ALLOWED_HOSTS,
    DEFAULT_ALLOWED_ORIGINS,
    RecordedRequest,
    StandInRunner,
    listen,
)

__all__ = [
    "DEFAULT_ALLOWED_HOSTS",
    "DEFAULT_ALLOWED_ORIGINS",
    "DEFAULT_MODELS",
    "SPECIAL_MODELS",
    "RecordedRequest",
    "StandInRunner",
    "listen",
    "make_model",
    "start_standin",
]
