"""What the benchmark measures: the upstream, nginx, Caddy, LiteLLM, the gateway, the floor."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    CHAT_BODY,
    GATEWAY_VENV,
    LITELLM_KEY,
    LITELLM_VENV,
    MODEL,
    PROD_PYTHON,
    ROOT,
    STATIC_KEY,
    UPSTREAM_REPLY,
    Proc,
    Run,
    free_port,
    target_python,
    target_twistd,
    wait_port,
)

Target = tuple[int, str, str, str, list[int]]  # port, path, body, token, pids for CPU time


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
    upstream: int | None,
    workers: int,
    start_timeout: float = 60,
    env: dict[str, str] | None = None,
    prefix: tuple[str, ...] = (),
    twistd: str | None = None,
    extra_settings: str = "",
    runner_settings: str = "",
) -> Gateway:
    """A runner-gateway in front of ``upstream`` (None: ``runner_settings`` says
    where, e.g. a pool's ``hosts:``); ``env`` is added to the environment,
    ``prefix`` put before the command (valgrind), ``twistd`` names the interpreter's
    (default: the targets' interpreter); ``extra_settings`` is appended to its
    settings.yaml (bench/limits.py: a ``limits`` section), ``runner_settings`` to
    the runner's (indented lines)."""
    directory = run.work / name / "settings"
    key = make_keys(directory)
    port = free_port()
    host = "" if upstream is None else f"    host: 127.0.0.1:{upstream}\n"
    (directory / "settings.yaml").write_text(
        f"""paseto:
  publicPath: {directory}/paseto.pub
  keyPath: {directory}/paseto.key
logging:
  level: info
  format: json
runners:
  - name: upstream
{host}    path: /
{runner_settings}server:
  address: 127.0.0.1:{port}
  workers: {workers}
  drainTimeout: 2s
  maxConnectionsPerClient: 0  # every benchmark client is 127.0.0.1
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
