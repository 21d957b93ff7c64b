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
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runner_gateway.paseto import V4SecretKey, public_key_pem
from runner_gateway.testing.process import start_standin
from tests.gateway_process import start_gateway

_BODY = 64 * 1024 * 1024
_CHUNK = b"a" * (256 * 1024)
_TICKS = os.sysconf("SC_CLK_TCK")


_HEAD = (
    b"POST /api/chat HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % _BODY
)


class _Upload:
    """One anonymous client's connection: the head, then the body as fast as
    the socket takes it, until an answer comes (or the connection ends)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setblocking(False)
        self.sock.connect_ex(("127.0.0.1", port))
        self.out = memoryview(_HEAD)
        self.sent = 0
        self.answer = b""


def _upload(port: int, clients: int, seconds: float, whole: bool) -> None:
    """``clients`` connections uploading at once, each replaced as soon as it
    ends, for ``seconds``; prints the answers that were a 401 and the others.
    ``whole``: each sends its whole body whatever the answer (as an HTTP
    library that reads the answer after the body, or an attacker that does
    not read); else each stops at the answer.
    One thread with a selector, in a process of its own: 200 threads would
    keep 200 runnable tasks on the bench machine's two cores, and the
    scheduler, not the gateway, would set the probe's latency."""
    until = time.monotonic() + seconds
    selector = selectors.DefaultSelector()
    chunk = memoryview(_CHUNK)
    refused = other = sent = 0

    def start() -> None:
        upload = _Upload(port)
        selector.register(upload.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, upload)

    def end(upload: _Upload) -> None:
        nonlocal refused, other, sent
        sent += upload.sent
        selector.unregister(upload.sock)
        upload.sock.close()
        if upload.answer.startswith(b"HTTP/1.1 401 "):
            refused += 1
        else:
            other += 1
        start()

    for _ in range(clients):
        start()
    while time.monotonic() < until:
        for key, events in selector.select(timeout=0.1):
            upload: _Upload = key.data
            try:
                if events & selectors.EVENT_READ:
                    got = upload.sock.recv(4096)
                    upload.answer += got
                    if not got or (
                        b"\r\n" in upload.answer and (not whole or upload.sent >= _BODY)
                    ):
                        end(upload)
                        continue
                if events & selectors.EVENT_WRITE:
                    if upload.out:
                        upload.out = upload.out[upload.sock.send(upload.out) :]
                    elif upload.sent < _BODY:
                        upload.sent += upload.sock.send(chunk[: _BODY - upload.sent])
                    else:
                        selector.modify(upload.sock, selectors.EVENT_READ, upload)
                        if b"\r\n" in upload.answer:
                            end(upload)
            except BlockingIOError:
                pass
            except OSError:
                end(upload)
    print(refused, other, sent, flush=True)


def _probe(port: int, seconds: float) -> None:
    """/healthz every 50 ms from 127.0.0.2 (its own per-client count), for
    ``seconds``: one line per probe, the seconds it took or ``failed``. Run in
    a process of its own, so that nothing but the gateway delays it."""
    until = time.monotonic() + seconds
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
        print(f"{time.monotonic() - start:.6f}" if ok else "failed", flush=True)
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


def _split_cpus() -> tuple[set[int], set[int]]:
    """The CPUs for the server under test and for the load: half each (on the
    2-core bench machine, one each), as a load generator on another machine
    would leave the server its own cores."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return set(cpus), set(cpus)
    half = len(cpus) // 2
    return set(cpus[:half]), set(cpus[half:])


def measure(
    name: str, port: int, pids: list[int], clients: int, seconds: float, whole: bool
) -> str:
    cpu0, written0 = _cpu(pids), _written(pids)
    this = [sys.executable, "-m", "bench.anonymous", "--seconds", str(seconds)]
    server_cpus, client_cpus = _split_cpus()
    for pid in pids:
        os.sched_setaffinity(pid, server_cpus)

    def on_client_cpus() -> None:
        os.sched_setaffinity(0, client_cpus)

    prober = subprocess.Popen(
        [*this, "--probe", str(port)], stdout=subprocess.PIPE, text=True, preexec_fn=on_client_cpus
    )
    uploads = subprocess.Popen(
        [*this, "--upload", str(port), "--clients", str(clients)] + (["--whole"] if whole else []),
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=on_client_cpus,
    )
    counts, _ = uploads.communicate(timeout=seconds + 30)
    cpu = _cpu(pids) - cpu0
    refused, other, sent = (int(count) for count in counts.split())
    out, _ = prober.communicate(timeout=30)
    health = sorted(float(line) for line in out.split() if line != "failed")
    failed = out.split().count("failed")
    p50, p99 = (
        (
            health[len(health) // 2] * 1000,
            health[min(len(health) - 1, int(len(health) * 0.99))] * 1000,
        )
        if health
        else (float("nan"), float("nan"))
    )
    slow = sum(1 for took in health if took > 0.9)
    per = cpu / refused * 1e6 if refused else float("nan")
    return (
        f"{name}: {clients} clients, {seconds:.0f} s: {refused} refused ({other} other), "
        f"{sent / 2**20 / max(1, refused + other):.1f} MiB sent per connection, "
        f"CPU {cpu:.2f} s ({per:.0f} us per refusal), peak RSS {_peak_rss(pids) / 2**20:.0f} MiB, "
        f"disk writes {_written(pids) - written0} B, /healthz p50 {p50:.1f} ms, p99 {p99:.1f} ms "
        f"({len(health)} answered, {slow} over 900 ms, {failed} failed)"
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
            yield int(gw.url.rsplit(":", 1)[1]), _children(gw.proc.pid)


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
    parser.add_argument(
        "--whole",
        action="store_true",
        help="clients send their whole body whatever the answer (default: stop at the answer)",
    )
    parser.add_argument("--upload", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--probe", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.upload:
        _upload(args.upload, args.clients, args.seconds, args.whole)
        return 0
    if args.probe:
        _probe(args.probe, args.seconds)
        return 0
    with start_standin(["--quiet"]) as (host, port, _):
        runner = f"{host}:{port}"
        with _gateway(runner) as (gw_port, pids):
            print(
                measure("gateway", gw_port, pids, args.clients, args.seconds, args.whole),
                flush=True,
            )
        if args.nginx:
            with _nginx(runner) as (ng_port, pids):
                print(
                    measure("nginx", ng_port, pids, args.clients, args.seconds, args.whole),
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
