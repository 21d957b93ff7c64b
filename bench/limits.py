"""What limits cost: ``python -m bench.limits`` (about a minute; needs wrk).

The same 2-worker gateway twice, in front of one bare twisted.web upstream
(bench/floor_server.py answering a fixed Ollama chat reply): without limits,
and with the ``local`` backend and a default tier that sets all three limits
(high enough never to refuse), so every request pays for an admission and a
finish transaction. Measured in alternating turns (the machine is shared, so
one turn of each side after the other, medians over the turns): p50 latency
at c=1 (target: at most 0.1 ms added) and requests/s at c=32 (target: at
least 0.8x). Then, in this process, the CPU time the admission layer takes
per request with and without limits (best of 5): the steadiest number on a
busy machine. Prints one JSON object; docs/benchmarks.md has the results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.common import CHAT_BODY, UPSTREAM_REPLY, Plan, Run, free_port, target_python, wait_port
from bench.stages import wrk
from bench.targets import raise_nofile, start_gateway

LIMITS = """limits:
  backend: local
  default: {requestsPerMinute: 1000000000, concurrentRequests: 1000000, tokensPerDay: 1000000000000}
"""


def admission_us(limits: bool, calls: int = 20000, repeats: int = 5) -> float:
    """CPU µs per request of the admission layer alone, in process (best of
    ``repeats``): render (admit) plus request_finished (the queued finish and
    its share of the batched write), the part of a request limits add."""
    import io
    import time

    from twisted.internet.task import Clock
    from twisted.web.resource import Resource
    from twisted.web.test.requesthelper import DummyRequest

    from runner_gateway.admission import AdmissionResource, Limiter
    from runner_gateway.context import RequestContext
    from runner_gateway.settings import LimitsSettings, RunnerSettings, TierLimits

    class Proxy(Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            return b""

    settings = LimitsSettings(default=TierLimits(10**9, 10**6, 10**12)) if limits else None
    clock = Clock()
    clock.advance(time.time())
    limiter = Limiter(clock, settings or LimitsSettings())
    limiter.start()
    resource = AdmissionResource(Proxy(), limiter)
    runner = RunnerSettings(name="r", host="127.0.0.1", port=1, path="/")
    claims = {"sub": "bench"}
    best = float("inf")
    try:
        for _ in range(repeats):
            requests = []
            for _ in range(calls):
                request: Any = DummyRequest([])
                request.method = b"POST"
                request.content = io.BytesIO(CHAT_BODY.encode())
                request.gateway_context = RequestContext(
                    "r", clock.seconds(), runner, b"/api/chat", claims=claims
                )
                requests.append(request)
            started = time.process_time()
            for n, request in enumerate(requests):
                resource.render(request)
                limiter.request_finished(request.gateway_context)
                if n % 32 == 31:
                    clock.advance(0.02)  # the batched write, as at c=32
            best = min(best, (time.process_time() - started) / calls * 1e6)
    finally:
        limiter.stop()  # and its own store with it
    return round(best, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.limits", description=__doc__)
    parser.add_argument("--turns", type=int, default=3, help="alternating turns per side")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk measurement")
    args = parser.parse_args(argv)
    raise_nofile()
    run = Run(Plan.make(smoke=False), Path(tempfile.mkdtemp(prefix="rg-bench-limits-")))
    try:
        reply = run.work / "reply.json"
        reply.write_text(UPSTREAM_REPLY)
        upstream = free_port()
        floor = run.start(
            "upstream",
            [target_python(), "-m", "bench.floor_server", str(upstream), str(reply)],
            env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        wait_port(upstream, proc=floor)
        sides = {
            "plain": start_gateway(run, "plain", upstream, 2),
            "limits": start_gateway(run, "limits", upstream, 2, extra_settings=LIMITS),
        }
        results: dict[str, dict[str, list[Any]]] = {n: {"c1": [], "c32": []} for n in sides}
        for turn in range(args.turns):
            for name, gw in sides.items() if turn % 2 == 0 else reversed(sides.items()):
                url = f"http://127.0.0.1:{gw.port}/api/chat"
                for c in (1, 32):
                    out = wrk(
                        run,
                        f"{name}-c{c}-{turn}",
                        url,
                        CHAT_BODY,
                        gw.token,
                        c,
                        pids=gw.worker_pids,
                        duration=args.duration,
                    )
                    if out["errors"]:
                        raise RuntimeError(f"{name} c={c}: {out['errors']} errors")
                    results[name][f"c{c}"].append(out)
    finally:
        run.stop_all()

    def median(name: str, c: str, key: str) -> float:
        return float(statistics.median(r[key] for r in results[name][c]))

    summary = {
        "turns": args.turns,
        "duration_s": args.duration,
        "p50_ms_c1": {n: median(n, "c1", "p50_ms") for n in results},
        "rps_c32": {n: median(n, "c32", "rps") for n in results},
        "cpu_us_per_request_c32": {n: median(n, "c32", "cpu_us_per_request") for n in results},
    }
    summary["p50_added_ms_c1"] = round(
        summary["p50_ms_c1"]["limits"] - summary["p50_ms_c1"]["plain"], 3
    )
    summary["rps_ratio_c32"] = round(summary["rps_c32"]["limits"] / summary["rps_c32"]["plain"], 3)
    plain_us, limits_us = admission_us(False), admission_us(True)
    summary["admission_cpu_us"] = {
        "plain": plain_us,
        "limits": limits_us,
        "added": round(limits_us - plain_us, 1),
    }
    summary["turn_results"] = results
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
