"""The benchmark stages: HTTP, instructions, streaming, capacity, auth."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import re
import selectors
import socket
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    CHAT_BODY,
    DEV_TWISTD,
    LITELLM_KEY,
    MODEL,
    OPENAI_BODY,
    STATIC_KEY,
    Run,
    post,
    stop,
    target_python,
)
from bench.targets import (
    Gateway,
    Target,
    have,
    raise_nofile,
    start_caddy,
    start_floor,
    start_gateway,
    start_litellm,
    start_nginx_proxy,
    start_upstream,
)

# --------------------------------------------------------------- HTTP stage

_LUA = """wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCHJSON {{\\"requests\\": %d, \\"duration_us\\": %d, \\"socket_errors\\": %d, "
    .. "\\"non_2xx\\": %d, \\"p50_us\\": %d, \\"p99_us\\": %d, \\"mean_us\\": %.1f}}\\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout,
    e.status, latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


def wrk(
    run: Run,
    name: str,
    url: str,
    body: str,
    token: str,
    connections: int,
    pids: list[int] | None = None,
    duration: int | None = None,
) -> dict[str, Any]:
    script = run.work / f"{name}.lua"
    script.write_text(_LUA.format(body=body, token=token))
    script.chmod(0o600)
    base = ["wrk", "-t1", f"-c{connections}", "-s", str(script), "--timeout", "10s", url]
    if run.plan.warmup:
        subprocess.run([*base[:1], f"-d{run.plan.warmup}s", *base[1:]], capture_output=True)
    before = [cpu_seconds(pid) for pid in pids or []]
    out = subprocess.run(
        [*base[:1], f"-d{duration or run.plan.duration}s", *base[1:]],
        capture_output=True,
        text=True,
    )
    cpu = [round(cpu_seconds(pid) - b, 3) for pid, b in zip(pids or [], before, strict=True)]
    match = re.search(r"BENCHJSON (\{.*\})", out.stdout)
    if match is None:
        raise RuntimeError(f"wrk gave no result for {name}:\n{out.stdout}\n{out.stderr}")
    raw = json.loads(match.group(1))
    seconds = raw["duration_us"] / 1e6
    extra: dict[str, Any] = {}
    if pids and raw["requests"]:
        # CPU per request is steadier than req/s on a shared machine.
        extra["cpu_us_per_request"] = round(sum(cpu) / raw["requests"] * 1e6, 1)
        extra["cpu_seconds_per_process"] = cpu
    return {
        **extra,
        "requests": raw["requests"],
        "rps": round(raw["requests"] / seconds, 1) if seconds else 0.0,
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "mean_ms": round(raw["mean_us"] / 1000, 3),
        "errors": raw["socket_errors"] + raw["non_2xx"],
    }


def http_stage(run: Run) -> dict[str, Any]:
    missing = [t for t in ("nginx", "wrk") if not have(t)]
    if missing:
        run.note(f"HTTP stage skipped: {', '.join(missing)} not installed")
        return {"skipped": f"missing {', '.join(missing)}"}
    upstream = start_upstream(run)

    def gateway(name: str, workers: int, twistd: str | None = None) -> Target:
        gw = start_gateway(run, name, upstream, workers, twistd=twistd)
        return gw.port, "/api/chat", CHAT_BODY, gw.token, gw.worker_pids

    # Each target runs only while it is measured: idle proxies still cost CPU
    # (LiteLLM's workers do background work), and the machine has 2 cores.
    starters: dict[str, Callable[[], Target]] = {
        "direct": lambda: (upstream, "/api/chat", CHAT_BODY, STATIC_KEY, []),
        "nginx": lambda: (start_nginx_proxy(run, upstream), "/api/chat", CHAT_BODY, STATIC_KEY, []),
    }
    if have("caddy"):
        starters["caddy"] = lambda: (
            start_caddy(run, upstream),
            "/api/chat",
            CHAT_BODY,
            STATIC_KEY,
            [],
        )
    else:
        run.note("Caddy skipped: not installed")
    if run.plan.smoke:
        run.note("LiteLLM skipped in the smoke run (its start alone takes ~10 s)")
    elif have("litellm"):
        starters["litellm"] = lambda: (
            start_litellm(run, upstream),
            "/chat/completions",
            OPENAI_BODY,
            LITELLM_KEY,
            [],
        )
    else:
        run.note("LiteLLM skipped: bench/.venv-litellm missing")
    starters["twisted-web-2p"] = lambda: start_floor(run)
    starters["gateway-2w"] = lambda: gateway("gateway-2w", 2)
    starters["gateway-1w"] = lambda: gateway("gateway-1w", 1)
    if target_python() != sys.executable:
        starters["gateway-2w-dev"] = lambda: gateway("gateway-2w-dev", 2, DEV_TWISTD)
    results: dict[str, Any] = {"targets": {}}
    for name, starter in starters.items():
        already = len(run.procs)
        port, path, body, token, pids = starter()
        status, data = post(port, path, body, token)
        if status != 200:
            raise RuntimeError(f"{name}: HTTP {status} {data[:300]!r}")
        url = f"http://127.0.0.1:{port}{path}"
        results["targets"][name] = {
            str(c): wrk(run, f"{name}-c{c}", url, body, token, c, pids)
            for c in run.plan.concurrencies
        }
        print(f"bench: {name}: {results['targets'][name]}", flush=True)
        for proc in run.procs[already:]:
            stop(proc)
        del run.procs[already:]
    results["ratios"] = ratios(results["targets"])
    if "caddy" in starters:
        results["paired"] = paired(run, starters, "caddy", "gateway-2w")
    results["optimisations"] = optimisations(run, upstream)
    return results


PAIRED_TURNS = 4


def paired(
    run: Run, starters: dict[str, Callable[[], Target]], ref: str, name: str
) -> dict[str, Any]:
    """``name`` against ``ref`` at the top concurrency, in alternating turns.

    This machine's speed drifts by up to a fifth over minutes (Caddy alone
    gave 6,048 to 9,241 req/s at c=32 in seven runs of one day), so a ratio
    of two measurements taken a minute or more apart, as in the table above,
    carries that drift. Here both run side by side (the one not measured
    idles) and are measured in turns, ABBA order, each ratio from one pair of
    neighbouring measurements.
    """
    already = len(run.procs)
    targets = {label: starters[label]() for label in (ref, name)}
    c = max(run.plan.concurrencies)
    idle_pids = targets[name][4]  # measured while idle, in ref's turns
    turns: list[dict[str, Any]] = []
    for turn in range(2 if run.plan.smoke else PAIRED_TURNS):
        row: dict[str, Any] = {}
        for label in (ref, name) if turn % 2 == 0 else (name, ref):
            port, path, body, token, pids = targets[label]
            url = f"http://127.0.0.1:{port}{path}"
            before = sum(cpu_seconds(pid) for pid in idle_pids)
            row[label] = wrk(run, f"paired-{turn}-{label}", url, body, token, c, pids)
            if label == ref:  # what the idle one took meanwhile: should be next to nothing
                idle = sum(cpu_seconds(pid) for pid in idle_pids) - before
        ratio = row[name]["rps"] / row[ref]["rps"] if row[ref]["rps"] else 0.0
        turns.append(
            {
                f"{ref}_rps": row[ref]["rps"],
                f"{name}_rps": row[name]["rps"],
                f"{name}_cpu_us_per_request": row[name].get("cpu_us_per_request"),
                "ratio": round(ratio, 3),
                f"{name}_idle_cpu_seconds": round(idle, 3),
            }
        )
    for proc in run.procs[already:]:
        stop(proc)
    del run.procs[already:]
    ratios_ = [t["ratio"] for t in turns]
    return {
        "ref": ref,
        "name": name,
        "concurrency": c,
        "seconds": run.plan.duration,
        "turns": turns,
        "ratio_median": round(statistics.median(ratios_), 3),
        "ratio_min": min(ratios_),
    }


# What each hot-path fix (runner_gateway/edge/fastpath.py) is worth, in the same run:
# one gateway per variant, measured in turns so all see the same background load.
VARIANTS = {
    "all fixes off": "off",
    "without content-type cache": "content-type",
    "without send-now": "send-now",
    "without whole-head": "whole-head",
    "without date cache": "date",
    "all fixes on": "",
}


def optimisations(run: Run, upstream: int) -> dict[str, Any]:
    gateways: dict[str, Gateway] = {}
    for label, value in VARIANTS.items():
        gateways[label] = start_gateway(
            run,
            f"gateway-fastpath-{len(gateways)}",
            upstream,
            1,
            env={"RUNNER_GATEWAY_FASTPATH": value},
        )
    rounds: dict[str, list[dict[str, Any]]] = {label: [] for label in VARIANTS}
    for turn in range(1 if run.plan.smoke else 5):
        for label, gw in gateways.items():
            url = f"http://127.0.0.1:{gw.port}/api/chat"
            name = f"fastpath-{turn}-{gw.port}"
            rounds[label].append(
                wrk(
                    run,
                    name,
                    url,
                    CHAT_BODY,
                    gw.token,
                    1,
                    gw.worker_pids,
                    run.plan.duration // 3 or 1,
                )
            )
    for gw in gateways.values():
        stop(gw.proc.popen)
    out = {}
    for label, rows in rounds.items():
        out[label] = {
            "rps": round(statistics.median(r["rps"] for r in rows), 1),
            "p50_ms": round(statistics.median(r["p50_ms"] for r in rows), 3),
            "cpu_us_per_request": round(
                statistics.median(r["cpu_us_per_request"] for r in rows), 1
            ),
            "cpu_us_per_request_min": min(r["cpu_us_per_request"] for r in rows),
        }
    return out


def ratios(targets: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, by_c in targets.items():
        out[name] = {}
        for c, r in by_c.items():
            entry: dict[str, Any] = {}
            for ref in ("caddy", "direct"):
                base = targets.get(ref, {}).get(c)
                if base and base["rps"]:
                    entry[f"rps_vs_{ref}"] = round(r["rps"] / base["rps"], 3)
            direct = targets.get("direct", {}).get(c)
            if direct:
                entry["p50_added_ms"] = round(r["p50_ms"] - direct["p50_ms"], 3)
            out[name][c] = entry
    return out


# ------------------------------------------------------ instructions stage


def _instructions(run: Run, label: str, upstream: int, fastpath: str, requests: int) -> float:
    """Instructions per request of a 1-worker gateway run under callgrind.

    Counting starts after a warm-up (``--instr-atstart=no``, then
    ``callgrind_control -i on``) and covers ``requests`` keep-alive POSTs sent
    one after another. Instruction counts do not depend on what else the
    machine is doing, so small differences between variants show.
    """
    name = f"instructions-{label}"
    out = f"--callgrind-out-file={run.work}/{name}.callgrind.%p"
    gw = start_gateway(
        run,
        name,
        upstream,
        1,
        start_timeout=300,
        env={"RUNNER_GATEWAY_FASTPATH": fastpath},
        prefix=("valgrind", "--tool=callgrind", "--instr-atstart=no", out),
        twistd=DEV_TWISTD,  # counts comparable with earlier rounds' (docs/benchmarks.md)
    )
    pid = gw.worker_pids[0]
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=120)
    headers = {"Authorization": f"Bearer {gw.token}", "Content-Type": "application/json"}

    def send(count: int) -> None:
        for _ in range(count):
            conn.request("POST", "/api/chat", body=CHAT_BODY, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"instructions stage: HTTP {response.status}")

    send(max(5, requests // 10))
    subprocess.run(["callgrind_control", "-i", "on", str(pid)], capture_output=True, check=True)
    send(requests)
    subprocess.run(["callgrind_control", "-i", "off", str(pid)], capture_output=True, check=True)
    subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, check=True)
    conn.close()
    total = 0
    deadline = time.monotonic() + 60
    while not total and time.monotonic() < deadline:  # the dump is written asynchronously
        time.sleep(0.2)
        for dump in run.work.glob(f"{name}.callgrind.{pid}.*"):
            total += max(
                (
                    int(line.split()[1])
                    for line in dump.read_text(errors="replace").splitlines()
                    if line.startswith(("summary:", "totals:"))
                ),
                default=0,
            )
    stop(gw.proc.popen)
    if not total:
        raise RuntimeError(f"instructions stage: no callgrind totals for {label}")
    return total / requests


def instructions_stage(run: Run) -> dict[str, Any]:
    missing = [t for t in ("nginx", "valgrind", "callgrind_control") if not have(t)]
    if missing:
        run.note(f"instructions stage skipped: {', '.join(missing)} not installed")
        return {"skipped": f"missing {', '.join(missing)}"}
    upstream = start_upstream(run)
    requests = 20 if run.plan.smoke else 1500
    variants = {"all fixes on": ""} if run.plan.smoke else VARIANTS
    out: dict[str, Any] = {"requests": requests, "variants": {}}
    for number, (label, value) in enumerate(variants.items()):
        per_request = _instructions(run, str(number), upstream, value, requests)
        out["variants"][label] = round(per_request)
    return out


# ---------------------------------------------------------- streaming stage


def _stream_once(port: int, path: str, token: str) -> tuple[float, list[float]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    started = time.perf_counter()
    conn.request("POST", path, body=body, headers=headers)
    response = conn.getresponse()
    arrivals = []
    while response.readline():
        arrivals.append(time.perf_counter())
    conn.close()
    if response.status != 200 or not arrivals:
        raise RuntimeError(f"stream through port {port}: HTTP {response.status}")
    return arrivals[0] - started, [b - a for a, b in itertools.pairwise(arrivals)]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def streaming_stage(run: Run) -> dict[str, Any]:
    from runner_gateway.testing.process import start_standin

    plan = run.plan
    args = ["--chunks", str(plan.stream_chunks), "--interval", str(plan.stream_interval)]
    with start_standin([*args, "--quiet"]) as (_, standin_port, _proc):
        gw = start_gateway(run, "gateway-stream", standin_port, 1)
        ttfb: dict[str, list[float]] = {"direct": [], "gateway": []}
        gaps: dict[str, list[float]] = {"direct": [], "gateway": []}
        _stream_once(gw.port, "/api/chat", gw.token)  # warm the token cache and the pool
        for _ in range(plan.stream_requests):
            # Alternate, so both sides see the same background load.
            for name, port in (("direct", standin_port), ("gateway", gw.port)):
                first, between = _stream_once(port, "/api/chat", gw.token)
                ttfb[name].append(first)
                gaps[name].extend(between)
        stop(gw.proc.popen)
    ms = 1000.0
    result: dict[str, Any] = {
        "chunks": plan.stream_chunks,
        "interval_ms": plan.stream_interval * ms,
        "requests": plan.stream_requests,
    }
    for name in ("direct", "gateway"):
        result[name] = {
            "ttfb_p50_ms": round(statistics.median(ttfb[name]) * ms, 3),
            "ttfb_p99_ms": round(_pct(ttfb[name], 99) * ms, 3),
            "gap_p50_ms": round(statistics.median(gaps[name]) * ms, 3),
            "gap_p99_ms": round(_pct(gaps[name], 99) * ms, 3),
        }
    result["ttfb_overhead_ms"] = round(
        result["gateway"]["ttfb_p50_ms"] - result["direct"]["ttfb_p50_ms"], 3
    )
    result["gap_added_p50_ms"] = round(
        result["gateway"]["gap_p50_ms"] - result["direct"]["gap_p50_ms"], 3
    )
    result["gap_added_p99_ms"] = round(
        result["gateway"]["gap_p99_ms"] - result["direct"]["gap_p99_ms"], 3
    )
    return result


# ----------------------------------------------------------- capacity stage


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextlib.contextmanager
def open_streams(
    port: int, token: str, count: int, timeout: float
) -> Iterator[list[socket.socket]]:
    """``count`` chat streams, each open once its headers and first chunk arrived."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = (
        b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    sockets: list[socket.socket] = []
    selector = selectors.DefaultSelector()
    buffers: dict[socket.socket, bytes] = {}
    opened = 0
    in_flight = 0
    deadline = time.monotonic() + timeout
    try:
        while opened < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {opened} of {count} streams opened in {timeout}s")
            while len(sockets) < count and in_flight < 200:
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))
                sockets.append(sock)
                buffers[sock] = b""
                selector.register(sock, selectors.EVENT_WRITE)
                in_flight += 1
            for key, mask in selector.select(1.0):
                sock = key.fileobj  # type: ignore[assignment]
                if mask & selectors.EVENT_WRITE:
                    sock.sendall(request)
                    selector.modify(sock, selectors.EVENT_READ)
                    continue
                data = sock.recv(65536)
                if not data:
                    raise RuntimeError(f"a stream closed early: {buffers[sock][:200]!r}")
                buffers[sock] += data
                head, sep, rest = buffers[sock].partition(b"\r\n\r\n")
                if sep and rest:
                    if not head.startswith(b"HTTP/1.1 200"):
                        raise RuntimeError(f"stream refused: {head[:100]!r}")
                    selector.unregister(sock)
                    del buffers[sock]
                    opened += 1
                    in_flight -= 1
        yield sockets
    finally:
        selector.close()
        for sock in sockets:
            sock.close()


def capacity_stage(run: Run) -> dict[str, Any]:
    """Open streams through the gateway as deployed by default: 2 workers (one per CPU).

    Each stream holds two descriptors in a worker (client and runner side);
    with 2 workers, 10,000 streams fit the 20,000 open files a process may
    have here. RSS is the sum of the workers and the supervisor.
    """
    from runner_gateway.testing.process import start_standin

    limit = raise_nofile()
    workers = 2
    need = 2 * max(run.plan.capacity) // workers + 500
    if limit < need:
        run.note(f"capacity stage skipped: open files limit {limit} < {need}")
        return {"skipped": f"nofile {limit}"}
    # Streams that stay open: the second chunk comes an hour later.
    with start_standin(["--chunks", "2", "--interval", "3600", "--quiet"]) as (_, sport, _p):
        gw = start_gateway(run, "gateway-capacity", sport, workers)
        pids = [gw.proc.popen.pid, *gw.worker_pids]
        for _ in range(40):  # warm up both workers: imports, token cache, the pool
            post(gw.port, "/api/tags", "", gw.token)
        time.sleep(0.5)
        base = sum(rss_bytes(pid) for pid in pids)
        result: dict[str, Any] = {
            "workers": workers,
            "baseline_rss_bytes": base,
            "baseline_rss_bytes_per_process": [rss_bytes(pid) for pid in pids],
            "levels": {},
        }
        for count in sorted(run.plan.capacity):
            with open_streams(gw.port, gw.token, count, timeout=300):
                time.sleep(1.0)
                rss = sum(rss_bytes(pid) for pid in pids)
                result["levels"][str(count)] = _level(rss, base, count)
            print(f"bench: capacity {count}: {result['levels'][str(count)]}", flush=True)
        stop(gw.proc.popen)
    return result


def _level(rss: int, base: int, count: int) -> dict[str, Any]:
    return {"rss_bytes": rss, "bytes_per_stream": round((rss - base) / count)}


# --------------------------------------------------------------- auth stage


def _per_call_us(fn: Callable[[], object], min_time: float) -> float:
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    number = max(1, int(number * min_time / 0.2))
    runs = timer.repeat(repeat=5, number=number)
    return round(min(runs) / number * 1e6, 3)


def auth_stage(run: Run) -> dict[str, Any]:
    import nacl.signing

    from runner_gateway.auth import TokenCache, parse_authorization
    from runner_gateway.paseto import TokenVerifier, V4LocalKey, V4SecretKey, issue, rfc3339

    secret = V4SecretKey.generate()
    local = V4LocalKey.generate()
    verifier = TokenVerifier("v4", [secret.public_key()], [local])
    now = time.time()
    claims = {"sub": "bench", "iat": rfc3339(now), "exp": rfc3339(now + 3600), "scope": "inference"}
    public_token = issue(secret, claims)
    local_token = issue(local, claims)
    cache = TokenCache(10000)
    cache.put(public_token, verifier.verify(public_token), now)
    header = [f"Bearer {public_token}".encode()]

    def cached() -> object:
        token = parse_authorization(header)
        assert token is not None
        return cache.get(token, now)

    from bench.revocation import ENTRIES, guarded_cache

    guarded = guarded_cache(public_token, verifier.verify(public_token), now)

    def cached_revocations() -> object:  # issue 18: the same with 10,000 revocations
        token = parse_authorization(header)
        assert token is not None
        return guarded.get(token, now)

    signing = nacl.signing.SigningKey.generate()
    signed = signing.sign(b"x" * 120)  # about a v4.public token's signed message
    verify_key = signing.verify_key
    t = run.plan.auth_min_time
    return {
        "cached_us": _per_call_us(cached, t),
        "cache_get_only_us": _per_call_us(lambda: cache.get(public_token, now), t),
        f"cached_with_{ENTRIES}_revocations_us": _per_call_us(cached_revocations, t),
        "uncached_v4_public_us": _per_call_us(lambda: verifier.verify(public_token), t),
        "uncached_v4_local_us": _per_call_us(lambda: verifier.verify(local_token), t),
        "pynacl_ed25519_verify_us": _per_call_us(lambda: verify_key.verify(signed), t),
    }
