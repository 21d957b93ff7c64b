"""What anonymous traffic costs the gateway (issue 16): while N clients without
a token each upload 64 MiB bodies, for a bounded time,

    .venv/bin/python -m bench.anonymous [--clients 200] [--seconds 50] [--nginx]

records the gateway's CPU per refused request, its peak RSS, the bytes it
wrote to disk (target: 0) and /healthz p99 from another client (target: under
50 ms on the 2-core bench machine). With ``--nginx``, the same for nginx in
front of the same stand-in runner, refusing a request without Authorization
on its head (``return 401``) as the gateway does. Not a test: numbers go to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from runner_gateway.paseto import V4SecretKey, public_key_pem
from runner_gateway.testing.process import start_standin
from tests.gateway_process import start_gateway

_BODY = 64 * 1024 * 1024
_CHUNK = b"a" * (256 * 1024)
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Load:
    refused: int = 0
    other: int = 0
    health: list[float] = field(default_factory=list)
    health_failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _uploader(port: int, until: float, load: Load) -> None:
    head = (
        b"POST /api/chat HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % _BODY
    )
    while time.monotonic() < until:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(head)
                sock.setblocking(False)
                sent, answer = 0, b""
                while sent < _BODY and time.monotonic() < until:
                    try:
                        answer += sock.recv(4096)
                        if answer:
                            break
                    except BlockingIOError:
                        pass
                    try:
                        sent += sock.send(_CHUNK)
                    except BlockingIOError:
                        time.sleep(0.001)
                sock.settimeout(10)
                while b"\r\n" not in answer and time.monotonic() < until:
                    got = sock.recv(4096)
                    if not got:
                        break
                    answer += got
            with load.lock:
                if answer.startswith(b"HTTP/1.1 401 "):
                    load.refused += 1
                else:
                    load.other += 1
        except OSError:
            with load.lock:
                load.other += 1


def _prober(port: int, until: float, load: Load) -> None:
    while time.monotonic() < until:
        start = time.monotonic()
        try:
            with socket.create_connection(
                ("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)
            ) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                ok = sock.recv(64).startswith(b"HTTP/1.1 200 ")
        except OSError:
            ok = False
        with load.lock:
            if ok:
                load.health.append(time.monotonic() - start)
            else:
                load.health_failed += 1
        time.sleep(0.05)


def _cpu(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICKS


def _written(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                total += int(line.split()[1])
    return total


def _peak_rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) * 1024
    return total


def _children(pid: int) -> list[int]:
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        found += [int(child) for child in children]
    return found


def measure(name: str, port: int, pids: list[int], clients: int, seconds: float) -> str:
    load = Load()
    cpu0, written0 = _cpu(pids), _written(pids)
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=_uploader, args=(port, until, load)) for _ in range(clients)]
    threads.append(threading.Thread(target=_prober, args=(port, until, load)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    cpu = _cpu(pids) - cpu0
    health = sorted(load.health)
    p99 = health[min(len(health) - 1, int(len(health) * 0.99))] * 1000 if health else float("nan")
    per = cpu / load.refused * 1e6 if load.refused else float("nan")
    return (
        f"{name}: {clients} clients, {seconds:.0f} s: {load.refused} refused ({load.other} other), "
        f"CPU {cpu:.2f} s ({per:.0f} us per refusal), peak RSS {_peak_rss(pids) / 2**20:.0f} MiB, "
        f"disk writes {_written(pids) - written0} B, /healthz p99 {p99:.1f} ms "
        f"({len(health)} answered, {load.health_failed} failed)"
    )


@contextmanager
def _gateway(runner: str) -> Iterator[tuple[int, list[int]]]:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "settings"
        directory.mkdir()
        key = V4SecretKey.generate()
        (directory / "paseto.pub").write_bytes(public_key_pem(key.public_key()))
        (directory / "settings.yaml").write_text(
            f"paseto:\n  publicPath: {directory}/paseto.pub\n"
            f"runners:\n  - name: r0\n    host: {runner}\n    path: /\n"
            "server:\n  address: 127.0.0.1:0\n  workers: 1\n"
        )
        with start_gateway(directory) as gw:
            yield int(gw.url.rsplit(":", 1)[1]), [gw.proc.pid]


@contextmanager
def _nginx(runner: str) -> Iterator[tuple[int, list[int]]]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(
            f"daemon off; worker_processes 1; pid {tmp}/nginx.pid; error_log {tmp}/error.log;\n"
            "events { worker_connections 4096; }\n"
            f"http {{ access_log off; client_body_temp_path {tmp}/body; "
            f"client_max_body_size 64m;\n"
            f"  server {{ listen 127.0.0.1:{port}; location = /healthz {{ return 200 ok; }}\n"
            '    location / { if ($http_authorization = "") { return 401; }\n'
            f"      proxy_pass http://{runner}; }} }} }}\n"
        )
        proc = subprocess.Popen([nginx, "-c", str(conf), "-p", tmp])
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            yield port, _children(proc.pid)
        finally:
            proc.terminate()
            proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=50)
    parser.add_argument("--nginx", action="store_true", help="also measure nginx")
    args = parser.parse_args(argv)
    with start_standin(["--quiet"]) as (host, port, _):
        runner = f"{host}:{port}"
        with _gateway(runner) as (gw_port, pids):
            print(measure("gateway", gw_port, pids, args.clients, args.seconds), flush=True)
        if args.nginx:
            with _nginx(runner) as (ng_port, pids):
                print(measure("nginx", ng_port, pids, args.clients, args.seconds), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
