"""What a runner pool costs on the request path, and how evenly it spreads requests.

``python -m bench.pool [--turns N] [--seconds S] [--out FILE]`` (a minute or
less; not part of ``make bench``):

1. **Added latency at c=1, end to end.** Three bare twisted.web upstreams
   (bench/floor_server.py, one process each) and three gateways with one
   worker: ``host:`` (the first upstream), ``hosts:`` (all three,
   ``least-outstanding``), and ``hosts:`` with the first upstream and two
   addresses nothing listens on (marked down: the pool's code with every
   request on one upstream process). One keep-alive client sends
   authenticated POST /api/chat one after another, in turns (A B C C B A
   ...); the result is each gateway's median of its turns' p50s and the
   differences to ``host:``.
2. **The pool's own work per request, in process:** ``RunnerPool.acquire``
   and ``release`` (what the proxy adds per request) for a pool of one and
   for three hosts by least-outstanding and by model (inventories known),
   plus rebuilding the request head for another host's ``Host`` header.
3. **Spread:** the hosts the three-host gateway's access log names for the
   requests of step 1 (c=1), and 1,000 requests through a three-host pool
   at 8 in flight with random (exponential, seeded) service times on a fake
   clock, counted per host.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
import timeit
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import (
    CHAT_BODY,
    ROOT,
    UPSTREAM_REPLY,
    Plan,
    Run,
    free_port,
    target_python,
    wait_port,
)
from bench.targets import start_gateway


def _upstreams(run: Run, count: int) -> list[int]:
    reply = run.work / "floor-reply.json"
    reply.write_text(UPSTREAM_REPLY)
    ports = []
    for n in range(count):
        port = free_port()
        argv = [target_python(), "-m", "bench.floor_server", str(port), str(reply)]
        proc = run.start(f"upstream-{n}", argv, env={"PYTHONPATH": str(ROOT)})
        wait_port(port, proc=proc)
        ports.append(port)
    return ports


def _gateway(run: Run, name: str, runner: str) -> tuple[int, str, Any]:
    gateway = start_gateway(run, name, None, workers=1, runner_settings=runner)
    return gateway.port, gateway.token, gateway.proc


def _turn(port: int, token: str, seconds: float) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    body = CHAT_BODY.encode()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        conn.request("POST", "/api/chat", body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        times.append(time.perf_counter() - started)
        if response.status != 200:
            raise RuntimeError(f"status {response.status}")
    conn.close()
    return times


def end_to_end(run: Run, turns: int, seconds: float) -> dict[str, Any]:
    ports = _upstreams(run, 3)
    single = _gateway(run, "gateway-host", f"    host: 127.0.0.1:{ports[0]}\n")
    listed = ", ".join(f"127.0.0.1:{p}" for p in ports)
    pool = _gateway(
        run, "gateway-hosts", f"    hosts: [{listed}]\n    balance: least-outstanding\n"
    )
    # Three hosts, two of them down (nothing listens): the pool's code path
    # with every request on one upstream process, as with host:.
    dead = ", ".join(f"127.0.0.1:{free_port()}" for _ in range(2))
    one_up = _gateway(
        run,
        "gateway-one-up",
        f"    hosts: [127.0.0.1:{ports[0]}, {dead}]\n    balance: least-outstanding\n"
        "    healthCheck: {interval: 1s, timeout: 500ms, unhealthyAfter: 1}\n",
    )
    one_up[2].wait_log(r"is down", count=2, timeout=10)
    gateways = {"host": single, "hosts": pool, "hosts-one-up": one_up}
    for port, token, _ in gateways.values():
        _turn(port, token, 0.5)  # warm-up: connections, caches
    p50: dict[str, list[float]] = {label: [] for label in gateways}
    order = ["host", "hosts", "hosts-one-up", "hosts-one-up", "hosts", "host"]
    for _ in range(turns):
        for label in order:
            port, token, _ = gateways[label]
            p50[label].append(statistics.median(_turn(port, token, seconds)) * 1000)
    time.sleep(0.5)  # the last access lines
    hosts = Counter(
        json.loads(line).get("host")
        for line in pool[2].text().splitlines()
        if line.startswith("{") and '"path":"/api/chat"' in line
    )
    host_ms = statistics.median(p50["host"])
    hosts_ms = statistics.median(p50["hosts"])
    one_up_ms = statistics.median(p50["hosts-one-up"])
    return {
        "turns": turns,
        "seconds_per_turn": seconds,
        "p50_ms_host": round(host_ms, 4),
        "p50_ms_hosts": round(hosts_ms, 4),
        "p50_ms_hosts_one_up": round(one_up_ms, 4),
        "added_p50_ms": round(hosts_ms - host_ms, 4),
        "added_p50_ms_one_up": round(one_up_ms - host_ms, 4),
        "turn_p50s_ms": {k: [round(v, 4) for v in vs] for k, vs in p50.items()},
        "requests_per_host_c1": sorted(hosts.values(), reverse=True),
    }


class _Waiter:
    model: str | None = "llama3.2:1b"

    def granted(self, host: Any) -> None:
        pass

    def queue_expired(self, reason: str) -> None:
        pass


def in_process() -> dict[str, Any]:
    from twisted.internet.testing import MemoryReactorClock

    from runner_gateway.placement import model_forms
    from runner_gateway.pool import RunnerPool
    from runner_gateway.settings import Address, RunnerSettings
    from runner_gateway.upstream import UpstreamPool, request_head

    reactor = MemoryReactorClock()
    upstream = UpstreamPool(reactor)
    base = RunnerSettings(name="r", host="127.0.0.1", port=9000, path="/")
    three = tuple(Address("127.0.0.1", 9000 + i) for i in range(3))
    pools = {
        "one host": RunnerPool(base, reactor, upstream),
        "three, least-outstanding": RunnerPool(
            replace(base, hosts=three, balance="least-outstanding"), reactor, upstream
        ),
        "three, model-aware": RunnerPool(
            replace(base, hosts=three, balance="model-aware"), reactor, upstream
        ),
    }
    for state in pools["three, model-aware"].states:
        state.inventory = True
        state.pulled = model_forms("llama3.2:1b") | model_forms("other")
    waiter = _Waiter()
    results: dict[str, float] = {}
    for label, pool in pools.items():

        def once(pool: RunnerPool = pool) -> None:
            host = pool.acquire(waiter)
            pool.release(host)  # type: ignore[arg-type]

        number = 200_000
        best = min(timeit.repeat(once, number=number, repeat=5))
        results[label] = round(best / number * 1e6, 3)
    headers = [(b"Content-Type", b"application/json"), (b"X-Request-Id", b"x" * 22)] * 4
    headers.append((b"Host", b"127.0.0.1:9001"))
    number = 200_000
    best = min(
        timeit.repeat(
            lambda: request_head(b"POST", b"/api/chat", headers, 120), number=number, repeat=5
        )
    )
    results["request head for another host"] = round(best / number * 1e6, 3)
    return {"us_per_request": results}


def spread(requests: int = 1000, in_flight: int = 8, seed: int = 7) -> dict[str, Any]:
    """1,000 requests at 8 in flight, exponential service times, on a fake clock."""
    import heapq

    from twisted.internet.testing import MemoryReactorClock

    from runner_gateway.pool import PoolHost, RunnerPool
    from runner_gateway.settings import Address, RunnerSettings
    from runner_gateway.upstream import UpstreamPool

    reactor = MemoryReactorClock()
    hosts = tuple(Address("127.0.0.1", 9000 + i) for i in range(3))
    runner = RunnerSettings(
        name="r", host="127.0.0.1", port=9000, path="/", hosts=hosts, balance="least-outstanding"
    )
    pool = RunnerPool(runner, reactor, UpstreamPool(reactor))
    rng = random.Random(seed)
    waiter = _Waiter()
    running: list[tuple[float, int, PoolHost]] = []
    now, sent = 0.0, 0
    while sent < requests or running:
        while sent < requests and len(running) < in_flight:
            host = pool.acquire(waiter)
            assert isinstance(host, PoolHost)
            heapq.heappush(running, (now + rng.expovariate(1.0), sent, host))
            sent += 1
        now, _, host = heapq.heappop(running)
        pool.release(host)
    counts = [s.served for s in pool.states]
    return {
        "requests": requests,
        "in_flight": in_flight,
        "per_host": counts,
        "max_over_min": round(max(counts) / min(counts), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pool")
    parser.add_argument("--turns", type=int, default=4, help="turns per gateway (alternating)")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per turn")
    parser.add_argument("--out", type=Path, default=None, help="write the results here (JSON)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-pool-"))
    run = Run(Plan.make(smoke=True), work)
    try:
        results = {
            "end_to_end_c1": end_to_end(run, args.turns, args.seconds),
            "in_process": in_process(),
            "spread_least_outstanding": spread(),
        }
    finally:
        run.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
