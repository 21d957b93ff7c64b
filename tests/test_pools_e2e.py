"""Runner pools end to end: the real twistd process in front of stand-in runners.

Three stand-in processes form one pool; hosts are killed (SIGKILL) and
started again on the same port while clients keep sending.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest

from runner_gateway.testing.process import start_standin
from tests.conftest import GatewaySettings
from tests.gateway_process import GatewayProcess, start_gateway

pytestmark = pytest.mark.timeout(120)


class Host:
    """One stand-in runner process that can be killed and started again on its port."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.port = 0
        self._stack: contextlib.ExitStack | None = None
        self.proc: Any = None

    def start(self) -> None:
        stack = contextlib.ExitStack()
        extra = ["--port", str(self.port)] if self.port else []
        _, port, proc = stack.enter_context(start_standin([*self.args, "--quiet", *extra]))
        self.port, self.proc, self._stack = port, proc, stack

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
        self.stop()

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def requests(self) -> list[dict[str, Any]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", "/_standin/requests")
        listing: list[dict[str, Any]] = json.loads(conn.getresponse().read())
        conn.close()
        return [r for r in listing if r["method"] == "POST"]  # not the checks


@contextlib.contextmanager
def hosts(*args_per_host: list[str]) -> Iterator[list[Host]]:
    started = [Host(args) for args in args_per_host]
    try:
        for host in started:
            host.start()
        yield started
    finally:
        for host in started:
            host.stop()


def pool_yaml(addresses: list[str], extra: str = "", interval: str = "1s") -> str:
    listed = ", ".join(addresses)
    return (
        "logging:\n  format: json\n"
        "runners:\n"
        "  - name: gpu\n"
        "    path: /\n"
        f"    hosts: [{listed}]\n"
        f"    healthCheck: {{path: /api/version, interval: {interval}, timeout: 500ms,"
        " unhealthyAfter: 1, healthyAfter: 1}\n"
        f"{extra}"
        "server:\n  address: 127.0.0.1:0\n  workers: 1\n"
    )


def connect(gw: GatewayProcess) -> http.client.HTTPConnection:
    parts = urlsplit(gw.url)
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)


def get(gw: GatewayProcess, path: str, token: str | None = None) -> tuple[int, Any]:
    conn = connect(gw)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, json.loads(body) if body else None


def generate(
    gw: GatewayProcess, token: str, model: str, prompt: str, stream: bool = False
) -> tuple[int, bytes]:
    conn = connect(gw)
    body = json.dumps({"model": model, "prompt": prompt, "stream": stream})
    conn.request("POST", "/api/generate", body=body, headers={"Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Outcomes:
    ok: int = 0
    cut: int = 0  # failed after the response head (first byte) arrived: allowed
    failed: list[str] = field(default_factory=list)  # failed before it: not allowed
    lock: threading.Lock = field(default_factory=threading.Lock)


def _load(gw: GatewayProcess, token: str, stream: bool, stop: threading.Event, out: Outcomes):
    n = 0
    while not stop.is_set():
        n += 1
        conn = connect(gw)
        headers_seen = False
        try:
            body = json.dumps({"model": "llama3.2:1b", "prompt": f"load {n}", "stream": stream})
            conn.request(
                "POST", "/api/generate", body=body, headers={"Authorization": f"Bearer {token}"}
            )
            response = conn.getresponse()
            headers_seen = response.status == 200
            data = response.read()
            if response.status != 200:
                raise AssertionError(f"status {response.status}: {data[:200]!r}")
            last = json.loads(data.splitlines()[-1])
            if not last.get("done"):
                raise AssertionError("incomplete answer")
            with out.lock:
                out.ok += 1
        except Exception as exc:
            with out.lock:
                if headers_seen:
                    out.cut += 1
                else:
                    out.failed.append(repr(exc))
        finally:
            conn.close()


def test_a_host_killed_under_load_costs_no_request_before_its_first_byte(
    make_settings: Callable[[str], GatewaySettings],
) -> None:
    args = ["--chunks", "4", "--interval", "0.05"]
    with hosts(args, args, args) as pool:
        balance = "    balance: least-outstanding\n"
        settings = make_settings(pool_yaml([h.address for h in pool], balance, interval="2s"))
        token = settings.token()
        with start_gateway(settings.directory) as gw:
            out = Outcomes()
            stop = threading.Event()
            workers = [
                threading.Thread(target=_load, args=(gw, token, stream, stop, out))
                for stream in (True, False, True, False)
            ]
            for worker in workers:
                worker.start()
            try:
                wait_until(lambda: out.ok >= 20, 30, "steady load")
                victim = pool[1]
                assert len(victim.requests()) > 0  # it takes its share of the load
                victim.kill()
                # Marked down within one check interval (2 s) of the kill.
                gw.wait_for(rf"host {victim.address} is down", timeout=2.0)
                before = out.ok
                wait_until(lambda: out.ok >= before + 40, 30, "load on two hosts")
                victim.start()
                gw.wait_for(rf"host {victim.address} is up", timeout=2.0 * 2 + 1)
                before = out.ok
                wait_until(lambda: out.ok >= before + 20, 30, "load on three hosts")
            finally:
                stop.set()
                for worker in workers:
                    worker.join(30)
            assert out.failed == []
            assert out.cut <= 4  # at most the requests in flight on the killed host
            # The host came back and takes requests again.
            wait_until(lambda: len(pool[1].requests()) > 0, 10, "requests on the returned host")


def test_readyz_follows_the_pool(make_settings: Callable[[str], GatewaySettings]) -> None:
    with hosts([], [], []) as pool:
        settings = make_settings(pool_yaml([h.address for h in pool]))
        with start_gateway(settings.directory) as gw:
            assert get(gw, "/readyz") == (200, {"status": "ready"})
            for host in pool:
                host.kill()
            wait_until(lambda: get(gw, "/readyz")[0] == 503, 5, "/readyz 503")
            status, body = get(gw, "/readyz")
            assert body["runners"] == {"gpu": {"hosts": 3, "up": 0, "queued": 0}}
            assert "127.0.0.1" not in json.dumps(body)  # names, never addresses
            # A request does not wait on hosts known to be down.
            status, data = generate(gw, settings.token(), "llama3.2:1b", "hi")
            assert status == 503 and b"no host of the runner is up" in data
            pool[2].start()
            wait_until(lambda: get(gw, "/readyz")[0] == 200, 5, "/readyz 200")
            assert get(gw, "/readyz")[1]["runners"]["gpu"]["up"] == 1
            status, _ = generate(gw, settings.token(), "llama3.2:1b", "hi")
            assert status == 200


def test_model_aware_placement_prefers_loaded_then_pulled(
    make_settings: Callable[[str], GatewaySettings],
) -> None:
    one = ["--model", "other:1b"]
    two = ["--model", "other:1b", "--model", "alpha:7b", "--loaded", "alpha:7b"]
    three = ["--model", "other:1b", "--model", "alpha:7b"]
    with hosts(one, two, three) as pool:
        settings = make_settings(pool_yaml([h.address for h in pool]))
        token = settings.token()
        with start_gateway(settings.directory) as gw:

            def asked(host: Host, model: str) -> int:
                return sum(1 for r in host.requests() if json.loads(r["body"])["model"] == model)

            def inventories_known() -> bool:
                # Then the gateway answers for an unknown model itself.
                before = sum(asked(h, "beta:1b") for h in pool)
                status, _ = generate(gw, token, "beta:1b", "x")
                return status == 404 and sum(asked(h, "beta:1b") for h in pool) == before

            wait_until(inventories_known, 10, "the hosts' inventories")

            for i in range(20):
                status, _ = generate(gw, token, "alpha:7b", f"a {i}")
                assert status == 200
            assert [asked(h, "alpha:7b") for h in pool] == [0, 20, 0]
            pool[1].kill()
            for i in range(20):
                status, _ = generate(gw, token, "alpha:7b", f"b {i}")
                assert status == 200
            assert asked(pool[0], "alpha:7b") == 0 and asked(pool[2], "alpha:7b") == 20
            # strictModels: a model no host lists gets the runner's own 404 shape
            # from the gateway; no runner sees it.
            seen = [asked(pool[0], "beta:1b"), asked(pool[2], "beta:1b")]
            status, data = generate(gw, token, "beta:1b", "x")
            assert status == 404
            assert json.loads(data) == {"error": 'model "beta:1b" not found, try pulling it first'}
            assert [asked(pool[0], "beta:1b"), asked(pool[2], "beta:1b")] == seen


def _raw_generate(port: int, token: str, prompt: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    body = json.dumps({"model": "llama3.2:1b", "prompt": prompt, "stream": False}).encode()
    sock.sendall(
        b"POST /api/generate HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
        + token.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )
    return sock


def _status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        piece = sock.recv(4096)
        if not piece:
            break
        data += piece
    sock.close()
    return int(data.split(b" ", 2)[1]) if data else 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _metric(port: int, name: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_the_fair_queue(make_settings: Callable[[str], GatewaySettings]) -> None:
    with hosts(["--header-delay", "0.6", "--chunks", "1", "--interval", "0"]) as pool:
        metrics = _free_port()
        extra = "    maxConcurrent: 1\n    maxQueue: 2\n    queueTimeout: 20s\n"
        body = pool_yaml([pool[0].address], extra)
        body += f"metrics:\n  address: 127.0.0.1:{metrics}\n"
        settings = make_settings(body)
        token = settings.token()

        def depth() -> float:
            return _metric(metrics, "runner_gateway_queue_depth")

        def runner_saw(n: int) -> Callable[[], bool]:
            return lambda: len(pool[0].requests()) >= n

        with start_gateway(settings.directory) as gw:
            port = urlsplit(gw.url).port or 0
            # Four slow requests at once: one runs, two wait, the fourth is refused.
            socks = [_raw_generate(port, token, "q0")]
            wait_until(runner_saw(1), 10, "the first request on the runner")
            socks.append(_raw_generate(port, token, "q1"))
            wait_until(lambda: depth() == 1, 10, "one queued")
            socks.append(_raw_generate(port, token, "q2"))
            wait_until(lambda: depth() == 2, 10, "two queued")
            socks.append(_raw_generate(port, token, "q3"))
            assert _status(socks[3]) == 503
            assert [_status(s) for s in socks[:3]] == [200, 200, 200]
            seen = pool[0].requests()
            assert [json.loads(r["body"])["prompt"] for r in seen] == ["q0", "q1", "q2"]
            times = [r["time"] for r in seen]
            assert times[1] - times[0] >= 0.5 and times[2] - times[1] >= 0.5  # one at a time
            line = gw.wait_for(r'"queue_ms"')
            assert json.loads(line)["queue_ms"] > 0
            assert _metric(metrics, "runner_gateway_queue_wait_seconds_count") == 2

            # A queued client that leaves is out of the queue at once and never
            # reaches the runner.
            first = _raw_generate(port, token, "r0")
            wait_until(runner_saw(4), 10, "r0 on the runner")
            leaver = _raw_generate(port, token, "r1")
            wait_until(lambda: depth() == 1, 10, "r1 queued")
            leaver.close()
            wait_until(lambda: depth() == 0, 10, "r1 out of the queue")
            assert len(pool[0].requests()) == 4  # r0 still runs: r1 left before a slot freed
            third = _raw_generate(port, token, "r2")
            assert _status(first) == 200 and _status(third) == 200
            prompts = [json.loads(r["body"])["prompt"] for r in pool[0].requests()]
            assert prompts[3:] == ["r0", "r2"]


class _ClosingRunner:
    """A runner that closes every fourth reused connection as a request arrives,
    without answering (a uvicorn-style idle timeout racing the request)."""

    ANSWER = b'{"model":"m","response":"ok","done":true}'

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        self.reused = 0
        self.closed = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        first = True
        with conn:
            while True:
                while b"\r\n\r\n" not in data:
                    piece = conn.recv(65536)
                    if not piece:
                        return
                    data += piece
                head, _, data = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(data) < length:
                    data += conn.recv(65536)
                data = data[length:]
                if not first:
                    with self.lock:
                        self.reused += 1
                        close = self.reused % 4 == 0
                        self.closed += close
                    if close:
                        return
                first = False
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(self.ANSWER) + self.ANSWER
                )

    def close(self) -> None:
        self.server.close()


def test_a_runner_closing_reused_connections_costs_no_request(
    make_settings: Callable[[str], GatewaySettings],
) -> None:
    runner = _ClosingRunner()
    try:
        settings = make_settings(
            "runners:\n  - name: r\n    path: /\n"
            f"    host: 127.0.0.1:{runner.port}\n"
            "server:\n  address: 127.0.0.1:0\n  workers: 1\n"
        )
        token = settings.token()
        with start_gateway(settings.directory) as gw:
            conn = connect(gw)  # one client connection: the runner's are reused
            statuses = []
            for i in range(40):
                body = json.dumps({"model": "m", "prompt": f"p{i}", "stream": False})
                conn.request(
                    "POST", "/api/generate", body=body, headers={"Authorization": f"Bearer {token}"}
                )
                response = conn.getresponse()
                response.read()
                statuses.append(response.status)
            conn.close()
        assert runner.closed >= 8  # the runner did close connections under requests
        assert statuses == [200] * 40
    finally:
        runner.close()


def test_listings_are_the_union_over_healthy_hosts(
    make_settings: Callable[[str], GatewaySettings],
) -> None:
    one = ["--model", "a:1b", "--model", "b:1b", "--loaded", "a:1b"]
    two = ["--model", "b:1b", "--model", "c:1b", "--loaded", "c:1b"]
    three = ["--model", "a:1b", "--loaded", "a:1b"]
    with hosts(one, two, three) as pool:
        settings = make_settings(pool_yaml([h.address for h in pool]))
        token = settings.token()
        with start_gateway(settings.directory) as gw:
            status, tags = get(gw, "/api/tags", token)
            assert status == 200
            assert [m["name"] for m in tags["models"]] == ["a:1b", "b:1b", "c:1b"]
            status, running = get(gw, "/api/ps", token)
            assert sorted(m["name"] for m in running["models"]) == ["a:1b", "a:1b", "c:1b"]
            status, models = get(gw, "/v1/models", token)
            assert (status, models["object"]) == (200, "list")
            assert sorted(m["id"] for m in models["data"]) == ["a:1b", "b:1b", "c:1b"]
            # The token's model filter applies to the union.
            status, tags = get(gw, "/api/tags", settings.token(models=["a*", "c*"]))
            assert [m["name"] for m in tags["models"]] == ["a:1b", "c:1b"]
            line = gw.wait_for(r'"path":"/api/tags".*"host"')
            assert sorted(json.loads(line)["host"].split(",")) == sorted(h.address for h in pool)
            # A host that is down is left out.
            pool[1].kill()
            wait_until(lambda: get(gw, "/readyz")[1].get("runners") is not None, 5, "host down")
            status, tags = get(gw, "/api/tags", token)
            assert [m["name"] for m in tags["models"]] == ["a:1b", "b:1b"]


def _post(gw: GatewayProcess, method: str, path: str, token: str, body: object) -> Any:
    conn = connect(gw)
    conn.request(method, path, body=json.dumps(body), headers={"Authorization": f"Bearer {token}"})
    return conn, conn.getresponse()


def test_manage_requests_go_to_every_healthy_host_in_turn(
    make_settings: Callable[[str], GatewaySettings],
) -> None:
    with hosts(["--interval", "0.05"], ["--interval", "0.05"], ["--interval", "0.05"]) as pool:
        settings = make_settings(pool_yaml([h.address for h in pool]))
        token = settings.token(scope="inference models:read models:manage")
        with start_gateway(settings.directory) as gw:
            # A streamed pull: each host's progress in turn, then which hosts succeeded.
            conn, response = _post(gw, "POST", "/api/pull", token, {"model": "fresh:1b"})
            assert response.status == 200
            assert response.getheader("content-type") == "application/x-ndjson"
            lines = [json.loads(line) for line in response.read().splitlines()]
            conn.close()
            assert [line["status"] for line in lines].count("pulling manifest") == 3
            assert lines[-1] == {
                "status": "success",
                "hosts": {h.address: "success" for h in pool},
            }
            seen = [[r["time"] for r in h.requests() if r["path"] == "/api/pull"] for h in pool]
            assert all(len(times) == 1 for times in seen)
            assert seen[0][0] < seen[1][0] < seen[2][0]  # one after another, in order
            # Every host now lists it (the inventories are read again after a pull).
            status, _ = generate(gw, token, "fresh:1b", "hi")
            assert status == 200
            # A host that fails says so; the others still get the request.
            pool[1].kill()
            wait_until(lambda: get(gw, "/readyz")[1].get("runners") is not None, 5, "down")
            conn, response = _post(gw, "DELETE", "/api/delete", token, {"model": "fresh:1b"})
            body = json.loads(response.read())
            conn.close()
            assert (response.status, body["status"]) == (200, "success")
            assert set(body["hosts"]) == {pool[0].address, pool[2].address}  # the healthy ones
            conn, response = _post(gw, "DELETE", "/api/delete", token, {"model": "fresh:1b"})
            body = json.loads(response.read())
            conn.close()
            assert response.status == 404  # the first failing host's status
            assert body["hosts"][pool[0].address] == "model 'fresh:1b' not found"
            assert "failed on" in body["error"]
            # An {"error": ...} line in a host's stream is that host's failure.
            conn, response = _post(gw, "POST", "/api/pull", token, {"model": "error"})
            lines = [json.loads(line) for line in response.read().splitlines()]
            conn.close()
            assert not any("error" in line for line in lines[:-1])  # clients stop at one
            assert lines[-1]["hosts"] == {
                h.address: "pull model manifest: file does not exist" for h in (pool[0], pool[2])
            }
