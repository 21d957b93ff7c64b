"""The benchmark suite: ``python -m bench.run`` (full) or ``python -m bench.run --smoke``.

One run, one machine, one fast upstream (nginx answering a fixed Ollama
``/api/chat`` JSON), load from wrk:

* HTTP: the upstream directly, nginx reverse proxy, Caddy reverse_proxy,
  LiteLLM proxy and runner-gateway (2 workers and 1 worker), authenticated
  POST chat requests at concurrency 1 and 32: requests/s, p50, p99 and the
  ratios to Caddy and to direct;
* streaming: time to first byte and the gaps between chunks, through the
  gateway and direct, in front of the stand-in runner streaming N chunks at
  a fixed interval;
* capacity: the gateway's resident memory with 1,000 and 10,000 open streams;
* auth: a cached token check, uncached v4.public and v4.local verification
  and a bare PyNaCl Ed25519 verification;
* instructions: CPU instructions per request (callgrind) of a 1-worker
  gateway, with each hot-path fix switched off in turn: unlike CPU time,
  the count does not move with the machine's load.

The Python targets (the gateway, LiteLLM, the bare twisted.web floor) run on
the production-like interpreter when the machine has one: Debian's
python3.11, built with PGO and LTO as the python:3.11-slim image the
Dockerfile ships on is (venvs bench/.venv-gateway, an editable install of
this tree, and bench/.venv-litellm). The dev venv's interpreter may be a
plain build (pyenv's default: no PGO, no LTO); the HTTP stage measures the
gateway on it as well ("gateway-2w-dev"), and the instructions stage counts
on it, as earlier rounds did.

The full run installs what it misses (apt: nginx caddy wrk valgrind; the two venvs;
matplotlib into this venv) and
writes bench/results/latest.json, docs/benchmarks.md (between the results
markers) and docs/benchmarks.png. ``--smoke`` runs every stage with tiny
durations and counts, installs nothing, skips what is not installed (and
LiteLLM, whose start alone takes ~10 s), writes into ``--out`` (default
bench/results/tmp/smoke/, git-ignored) and never touches docs/.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
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


# ------------------------------------------------------------------ tools


def have(tool: str) -> bool:
    if tool == "litellm":
        return (LITELLM_VENV / "bin" / "litellm").exists()
    if tool == "matplotlib":
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return False
        return True
    return shutil.which(tool) is not None


def install_missing(run: Run) -> None:
    """Full run only: bring in nginx, Caddy, wrk, valgrind, LiteLLM (own venv), matplotlib."""
    apt = [t for t in ("nginx", "caddy", "wrk", "valgrind") if not have(t)]
    if apt:
        run.note(f"installing {' '.join(apt)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *apt], check=False, env=env)
    base = str(PROD_PYTHON) if PROD_PYTHON.exists() else "python3"
    if PROD_PYTHON.exists():
        if not _venv_of(GATEWAY_VENV, PROD_PYTHON):
            run.note(f"making bench/.venv-gateway on {PROD_PYTHON}")
            subprocess.run([base, "-m", "venv", "--clear", str(GATEWAY_VENV)], check=False)
        pip = str(GATEWAY_VENV / "bin" / "pip")
        subprocess.run([pip, "install", "-q", "-e", str(ROOT)], check=False)  # this tree's code
    if not have("litellm") or (PROD_PYTHON.exists() and not _venv_of(LITELLM_VENV, PROD_PYTHON)):
        run.note(f"installing litellm[proxy] into bench/.venv-litellm on {base}")
        subprocess.run([base, "-m", "venv", "--clear", str(LITELLM_VENV)], check=False)
        pip = str(LITELLM_VENV / "bin" / "pip")
        subprocess.run([pip, "install", "-q", "litellm[proxy]"], check=False)
    if not have("matplotlib"):
        run.note("installing matplotlib into this venv")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=False)


def _venv_of(venv: Path, python: Path) -> bool:
    """Whether ``venv`` exists and was made from ``python``."""
    try:
        config = (venv / "pyvenv.cfg").read_text()
    except OSError:
        return False
    for line in config.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "executable":
            return Path(value.strip()).resolve() == python.resolve()
    return False


def raise_nofile() -> int:
    """As many open files as we may have: 10,000 streams need ~20,000 in the gateway."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (262144, 65536, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
            return want
        except (ValueError, OSError):
            continue
    return soft


# ------------------------------------------------------------ the servers


def start_upstream(run: Run) -> int:
    """nginx answering the fixed chat JSON (and 'Ollama is running' on GET /)."""
    port = free_port()
    conf = run.work / "upstream.conf"
    conf.write_text(
        _nginx_main(run.work, "upstream", 1)
        + f"""
http {{
  access_log off;
  {_nginx_temp(run.work, "upstream")}
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location = /api/chat {{ default_type application/json; return 200 '{UPSTREAM_REPLY}'; }}
    location / {{ default_type text/plain; return 200 'Ollama is running'; }}
  }}
}}
"""
    )
    wait_port(port, proc=run.start("upstream", ["nginx", "-p", str(run.work), "-c", str(conf)]))
    return port


def _nginx_main(work: Path, name: str, workers: int) -> str:
    return (
        f"daemon off;\nmaster_process on;\nworker_processes {workers};\n"
        f"pid {work}/{name}.pid;\nerror_log {work}/{name}-error.log warn;\n"
        "events { worker_connections 20000; }\n"
    )


def _nginx_temp(work: Path, name: str) -> str:
    temp = work / f"{name}-tmp"
    temp.mkdir(exist_ok=True)
    return " ".join(
        f"{kind}_temp_path {temp}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )


def start_nginx_proxy(run: Run, upstream: int) -> int:
    port = free_port()
    conf = run.work / "proxy.conf"
    conf.write_text(
        _nginx_main(run.work, "proxy", 2)
        + f"""
http {{
  access_log off;
  {_nginx_temp(run.work, "proxy")}
  keepalive_requests 1000000;
  upstream runner {{ server 127.0.0.1:{upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      if ($http_authorization != "Bearer {STATIC_KEY}") {{ return 401; }}
      proxy_pass http://runner;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""
    )
    wait_port(port, proc=run.start("nginx-proxy", ["nginx", "-p", str(run.work), "-c", str(conf)]))
    return port


def start_caddy(run: Run, upstream: int) -> int:
    port = free_port()
    conf = run.work / "Caddyfile"
    conf.write_text(
        f"""{{
  admin off
  auto_https off
}}
http://127.0.0.1:{port} {{
  @unauthorized not header Authorization "Bearer {STATIC_KEY}"
  respond @unauthorized 401
  reverse_proxy 127.0.0.1:{upstream}
}}
"""
    )
    env = {"XDG_DATA_HOME": str(run.work / "caddy"), "XDG_CONFIG_HOME": str(run.work / "caddy")}
    argv = ["caddy", "run", "--config", str(conf), "--adapter", "caddyfile"]
    wait_port(port, proc=run.start("caddy", argv, env))
    return port


def start_litellm(run: Run, upstream: int) -> int:
    port = free_port()
    conf = run.work / "litellm.yaml"
    conf.write_text(
        f"""model_list:
  - model_name: "{MODEL}"
    litellm_params:
      model: "ollama_chat/{MODEL}"
      api_base: "http://127.0.0.1:{upstream}"
general_settings:
  master_key: {LITELLM_KEY}
litellm_settings:
  telemetry: false
"""
    )
    argv = [str(LITELLM_VENV / "bin" / "litellm"), "--config", str(conf)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--num_workers", "2"]
    proc = run.start("litellm", argv, {"LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    proc.wait_log("Uvicorn running|Application startup complete", timeout=180)
    wait_port(port)
    return port


@dataclass
class Gateway:
    port: int
    token: str
    proc: Proc
    worker_pids: list[int]


def make_keys(directory: Path) -> Any:
    from runner_gateway.paseto import V4SecretKey, public_key_pem, secret_key_pem

    directory.mkdir(parents=True, exist_ok=True)
    key = V4SecretKey.generate()
    (directory / "paseto.key").write_bytes(secret_key_pem(key))
    (directory / "paseto.pub").write_bytes(public_key_pem(key.public_key()))
    return key


def mint(key: Any, lifetime: float = 7200) -> str:
    from runner_gateway.paseto import issue, rfc3339

    now = time.time()
    claims = {"sub": "bench", "iat": rfc3339(now), "exp": rfc3339(now + lifetime)}
    return str(issue(key, claims))


def start_gateway(
    run: Run,
    name: str,
    upstream: int,
    workers: int,
    start_timeout: float = 60,
    env: dict[str, str] | None = None,
    prefix: tuple[str, ...] = (),
    twistd: str | None = None,
    extra_settings: str = "",
) -> Gateway:
    """A runner-gateway in front of ``upstream``; ``env`` is added to the environment,
    ``prefix`` put before the command (valgrind), ``twistd`` names the interpreter's
    (default: the targets' interpreter); ``extra_settings`` is appended to its
    settings.yaml (bench/limits.py: a ``limits`` section)."""
    directory = run.work / name / "settings"
    key = make_keys(directory)
    port = free_port()
    (directory / "settings.yaml").write_text(
        f"""paseto:
  publicPath: {directory}/paseto.pub
  keyPath: {directory}/paseto.key
logging:
  level: info
  format: json
runners:
  - name: upstream
    host: 127.0.0.1:{upstream}
    path: /
server:
  address: 127.0.0.1:{port}
  workers: {workers}
  drainTimeout: 2s
"""
        + extra_settings
    )
    command = twistd or target_twistd()
    argv = [*prefix, command, "-n", "--pidfile=", "runner-gateway", "--settings", str(directory)]
    proc = run.start(name, argv, env)
    if workers > 1:
        lines = proc.wait_log(
            r'"worker (\d+) \(pid (\d+)\) serving', count=workers, timeout=start_timeout
        )
        pids = [int(pid) for _, pid in lines]
    else:
        level = {**os.environ, **(env or {})}.get("LOGGING_LEVEL")
        if level not in ("warn", "error"):  # quieter: no such line
            proc.wait_log("listening on", timeout=start_timeout)
        pids = [proc.popen.pid]
    wait_port(port, start_timeout)
    return Gateway(port, mint(key), proc, pids)


def start_floor(run: Run) -> Target:
    """Two bare twisted.web processes on one port (bench/floor_server.py): the floor."""
    reply = run.work / "floor-reply.json"
    reply.write_text(UPSTREAM_REPLY)
    port = free_port()
    argv = [target_python(), "-m", "bench.floor_server", str(port), str(reply)]
    procs = [run.start(f"twisted-web-{n}", argv, env={"PYTHONPATH": str(ROOT)}) for n in range(2)]
    wait_port(port, proc=procs[0])
    return port, "/api/chat", CHAT_BODY, STATIC_KEY, [p.popen.pid for p in procs]


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


Target = tuple[int, str, str, str, list[int]]  # port, path, body, token, pids for CPU time


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


# -------------------------------------------------------------- the report


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return "not installed"
        text = (out.stdout + out.stderr).strip().splitlines()
        return text[0] if text else "unknown"

    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_targets": version(
            [target_python(), "-c", "import sys; print(sys.version.split()[0], sys.executable)"]
        ),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "nginx": version(["nginx", "-v"]),
        "caddy": version(["caddy", "version"]),
        "wrk": version(["wrk", "--version"]),
        "litellm": version(
            [
                str(LITELLM_VENV / "bin" / "python"),
                "-c",
                "import importlib.metadata as m; print(m.version('litellm'))",
            ]
        )
        if have("litellm")
        else "not installed",
    }


def targets_met(results: dict[str, Any]) -> dict[str, Any]:
    """Issue 7's targets, each with the measured value and whether it is met."""
    out: dict[str, Any] = {}
    http_ = results.get("http", {})
    ratio = http_.get("ratios", {})
    hi = str(max(int(c) for c in http_["targets"]["direct"])) if "targets" in http_ else None
    if "paired" in http_:
        value = http_["paired"]["ratio_median"]
        out["gateway_2w_vs_caddy_rps"] = {"target": ">= 0.5", "value": value, "met": value >= 0.5}
    elif hi and "caddy" in http_["targets"] and "gateway-2w" in http_["targets"]:
        value = ratio["gateway-2w"][hi]["rps_vs_caddy"]
        out["gateway_2w_vs_caddy_rps"] = {"target": ">= 0.5", "value": value, "met": value >= 0.5}
    if "targets" in http_:
        value = ratio["gateway-2w"]["1"]["p50_added_ms"]
        out["p50_added_c1_ms"] = {"target": "<= 0.5", "value": value, "met": value <= 0.5}
    stream = results.get("streaming", {})
    if "ttfb_overhead_ms" in stream:
        value = stream["ttfb_overhead_ms"]
        out["ttfb_overhead_ms"] = {"target": "<= 1", "value": value, "met": value <= 1.0}
        value = stream["gap_added_p50_ms"]
        out["gap_added_ms"] = {"target": "<= 0.5", "value": value, "met": value <= 0.5}
    levels = results.get("capacity", {}).get("levels", {})
    if levels:
        top = max(levels, key=int)
        value = round(levels[top]["bytes_per_stream"] / 1000, 1)
        out[f"kb_per_stream_at_{top}"] = {"target": "<= 50", "value": value, "met": value <= 50}
    auth = results.get("auth", {})
    if "cached_us" in auth:
        value = auth["cached_us"]
        out["cached_token_us"] = {"target": "<= 5", "value": value, "met": value <= 5}
    return out


def markdown(results: dict[str, Any], chart: str | None) -> str:
    m = results["machine"]
    lines = [
        f"Run of {results['date']} on {m['cpus']} x {m['cpu']}, "
        f"{m['memory_bytes'] // 2**30} GiB, Linux {m['kernel']}, Python targets on "
        f"{m.get('python_targets', m['python'])}, harness and gateway-2w-dev on Python "
        f"{m['python']} (load average at start {m['load_average_at_start']}); {m['nginx']}, "
        f"Caddy {m['caddy']}, {m['wrk'].split(' [')[0]}, LiteLLM "
        f"{m['litellm']}. Raw numbers: `bench/results/latest.json`.",
        "",
    ]
    if chart:
        lines += [f"![requests/s and p50 latency]({chart})", ""]
    lines += [
        "### Targets (issue 7)",
        "",
        "| target | wanted | measured | met |",
        "| --- | --- | --- | --- |",
    ]
    for name, t in results["targets"].items():
        lines.append(
            f"| {name} | {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |"
        )
    http_ = results.get("http", {})
    if "targets" in http_:
        lines += [
            "",
            "### Authenticated small chat (POST /api/chat; LiteLLM: /chat/completions)",
            "",
            "| target | c | req/s | p50 ms | p99 ms | errors | vs Caddy | vs direct "
            "| p50 added ms | gateway CPU µs/request |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, by_c in http_["targets"].items():
            for c, r in by_c.items():
                q = http_["ratios"][name][c]
                lines.append(
                    f"| {name} | {c} | {r['rps']:.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                    f"{r['errors']} | {q.get('rps_vs_caddy', '-')} | {q.get('rps_vs_direct', '-')} "
                    f"| {q.get('p50_added_ms', '-')} | {r.get('cpu_us_per_request', '-')} |"
                )
    pair = http_.get("paired")
    if pair:
        ref, name = pair["ref"], pair["name"]
        lines += [
            "",
            f"### {name} against {ref} in alternating turns (c={pair['concurrency']}, "
            f"{pair['seconds']} s each, ABBA)",
            "",
            f"Median ratio {pair['ratio_median']}, lowest {pair['ratio_min']} "
            "(the target's value is the median).",
            "",
            f"| turn | {ref} req/s | {name} req/s | ratio | {name} CPU µs/request "
            f"| {name} CPU s while idle in {ref}'s turn |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {n + 1} | {t[f'{ref}_rps']:.0f} | {t[f'{name}_rps']:.0f} | {t['ratio']} "
            f"| {t[f'{name}_cpu_us_per_request']} | {t[f'{name}_idle_cpu_seconds']} |"
            for n, t in enumerate(pair["turns"])
        ]
    opt = http_.get("optimisations", {})
    if opt:
        lines += [
            "",
            "### Hot-path fixes, same run (gateway, 1 worker, c=1, 5 turns of 2 s)",
            "",
            "| variant | req/s | p50 ms | CPU µs/request (median) | (min: least disturbed) |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {label} | {r['rps']:.0f} | {r['p50_ms']:.3f} | {r['cpu_us_per_request']} "
            f"| {r['cpu_us_per_request_min']} |"
            for label, r in opt.items()
        ]
    ins = results.get("instructions", {})
    if "variants" in ins:
        off = ins["variants"].get("all fixes off")
        lines += [
            "",
            f"### Instructions per request, same run (callgrind, 1 worker, {ins['requests']} "
            "keep-alive POSTs one after another)",
            "",
            "| variant | instructions/request | vs all fixes off |",
            "| --- | --- | --- |",
        ]
        lines += [
            f"| {label} | {count:,} | {f'{(count - off) / off:+.1%}' if off else '-'} |"
            for label, count in ins["variants"].items()
        ]
    s = results.get("streaming", {})
    if "direct" in s:
        lines += [
            "",
            f"### Streaming ({s['requests']} streams each way, {s['chunks']} chunks "
            f"{s['interval_ms']:.0f} ms apart, stand-in runner, gateway with 1 worker)",
            "",
            "| path | TTFB p50 ms | TTFB p99 ms | gap p50 ms | gap p99 ms |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name in ("direct", "gateway"):
            r = s[name]
            lines.append(
                f"| {name} | {r['ttfb_p50_ms']} | {r['ttfb_p99_ms']} | {r['gap_p50_ms']} "
                f"| {r['gap_p99_ms']} |"
            )
        lines += [
            "",
            f"TTFB overhead (p50): {s['ttfb_overhead_ms']} ms; added gap p50 "
            f"{s['gap_added_p50_ms']} ms, p99 {s['gap_added_p99_ms']} ms.",
        ]
    c = results.get("capacity", {})
    if "levels" in c:
        lines += [
            "",
            f"### Capacity (open streams through the gateway: {c.get('workers', 1)} workers "
            "and the supervisor, RSS added up)",
            "",
            f"Baseline RSS {c['baseline_rss_bytes'] / 2**20:.1f} MiB "
            f"(per process: {_mib(c.get('baseline_rss_bytes_per_process', []))}).",
            "",
            "| streams | RSS MiB | bytes per stream |",
            "| --- | --- | --- |",
        ]
        for n, r in c["levels"].items():
            lines.append(f"| {n} | {r['rss_bytes'] / 2**20:.1f} | {r['bytes_per_stream']} |")
    a = results.get("auth", {})
    if a:
        lines += [
            "",
            "### Auth cost per request (µs, best of 5)",
            "",
            "| check | µs |",
            "| --- | --- |",
        ]
        lines += [f"| {k.removesuffix('_us')} | {v} |" for k, v in a.items()]
    if results.get("notes"):
        lines += ["", "Notes: " + "; ".join(results["notes"]) + "."]
    return "\n".join(lines)


def _mib(values: list[int]) -> str:
    return ", ".join(f"{v / 2**20:.1f} MiB" for v in values) or "-"


def chart(results: dict[str, Any], path: Path) -> bool:
    http_ = results.get("http", {})
    if "targets" not in http_ or not have("matplotlib"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(http_["targets"])
    cs = sorted({c for by_c in http_["targets"].values() for c in by_c}, key=int)
    hi, lo = cs[-1], cs[0]
    colors = ["#1f77b4" if not n.startswith("gateway") else "#d62728" for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (
        (left, [http_["targets"][n][hi]["rps"] for n in names], "requests/s", hi, "higher"),
        (right, [http_["targets"][n][lo]["p50_ms"] for n in names], "p50 latency ms", lo, "lower"),
    )
    for ax, values, what, c, better in panels:
        ax.barh(names, values, color=colors)
        # Log scale: the values span four orders of magnitude.
        ax.set_xscale("log")
        ax.set_title(f"{what}, concurrency {c} ({better} is better; log)")
        ax.invert_yaxis()
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:,.0f}" if value >= 100 else f" {value:.3g}", va="center")
        ax.set_xlim(min(values) / 2, max(values) * 8)
    fig.suptitle(f"authenticated small chat, {results['date']}, {results['machine']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_docs(results: dict[str, Any], docs: Path, chart_name: str | None) -> None:
    section = f"{BEGIN}\n{markdown(results, chart_name)}\n{END}"
    text = docs.read_text() if docs.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + section + tail
    else:
        text += "\n" + section + "\n"
    docs.write_text(text)


# -------------------------------------------------------------------- main


STAGES: dict[str, Callable[[Run], dict[str, Any]]] = {
    "http": http_stage,
    "streaming": streaming_stage,
    "capacity": capacity_stage,
    "auth": auth_stage,
    "instructions": instructions_stage,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny run that only checks the suite")
    parser.add_argument(
        "--out", type=Path, help="results directory (smoke: bench/results/tmp/smoke)"
    )
    parser.add_argument("--stage", action="append", choices=list(STAGES), help="only these stages")
    parser.add_argument("--no-install", action="store_true", help="full run: install nothing")
    args = parser.parse_args(argv)
    plan = Plan.make(args.smoke)
    out = args.out or (BENCH / "results" / ("tmp/smoke" if args.smoke else ""))
    out.mkdir(parents=True, exist_ok=True)
    run = Run(plan, Path(tempfile.mkdtemp(prefix="rg-bench-")))
    if not args.smoke and not args.no_install:
        install_missing(run)
    raise_nofile()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "smoke": args.smoke,
        "machine": machine(),
    }
    failed = []
    try:
        for name in args.stage or list(STAGES):
            started = time.monotonic()
            try:
                results[name] = STAGES[name](run)
            except Exception as exc:  # one broken stage must not hide the others' numbers
                failed.append(name)
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"bench: stage {name} FAILED: {exc}", file=sys.stderr, flush=True)
            finally:
                run.stop_all()
            print(f"bench: stage {name} took {time.monotonic() - started:.1f}s", flush=True)
    finally:
        run.stop_all()
    results["targets"] = targets_met(results)
    results["notes"] = run.notes
    (out / ("smoke.json" if args.smoke else "latest.json")).write_text(
        json.dumps(results, indent=2) + "\n"
    )
    if args.smoke:
        chart(results, out / "smoke.png")
        (out / "smoke.md").write_text(markdown(results, "smoke.png") + "\n")
    else:
        made = chart(results, CHART)
        write_docs(results, DOCS, CHART.name if made else None)
    for name, t in results["targets"].items():
        print(
            f"bench: target {name}: {t['value']} ({t['target']}) {'met' if t['met'] else 'MISSED'}"
        )
    if failed:
        print(f"bench: failed stages: {', '.join(failed)}", file=sys.stderr)
        return 1
    shutil.rmtree(run.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
