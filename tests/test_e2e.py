"""End to end: the real twistd process, the stand-in runner, loopback sockets."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import signal
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests import certs
from tests.conftest import GatewaySettings, StandIn
from tests.gateway_process import GatewayProcess, run_twistd, start_gateway

pytestmark = pytest.mark.timeout(90)


def runners_yaml(standin: StandIn, *paths: str) -> str:
    lines = ["runners:"]
    for i, path in enumerate(paths):
        lines += [f"  - name: r{i}", f"    host: {standin.address}", f"    path: {path}"]
    # One process: these tests look at one process's logs and reloads
    # (tests/test_workers.py covers server.workers > 1). The tests are the
    # trusted proxy: they pick the request ids they look for in the log
    # (tests/test_hostile_proxy.py covers an untrusted client).
    return (
        "\n".join(lines)
        + "\nserver:\n  address: 127.0.0.1:0\n  workers: 1\n  trustedProxies: [127.0.0.1/32]\n"
    )


def send(
    gw: GatewayProcess,
    method: str,
    path: str,
    token: str | None = None,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Send a request; the caller reads the response (as it streams, if it likes)."""
    parts = urlsplit(gw.url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    all_headers = dict(headers or {})
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=all_headers)
    return conn, conn.getresponse()


def request(
    gw: GatewayProcess,
    method: str,
    path: str,
    token: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn, response = send(gw, method, path, token, body, headers)
    data = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


@pytest.fixture
def two_runners(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn
) -> GatewaySettings:
    return make_settings(
        "logging:\n  level: trace\n  format: json\n" + runners_yaml(standin, "/", "/corp")
    )


def test_routes_auth_health_and_access_log(two_runners: GatewaySettings) -> None:
    token = two_runners.token()
    with start_gateway(two_runners.directory) as gw:
        status, headers, body = request(gw, "GET", "/corp/api/tags", token)
        assert status == 200, body
        assert "llama3.2:1b" in {m["name"] for m in json.loads(body)["models"]}
        assert len(headers["x-request-id"]) >= 16

        status, headers, body = request(
            gw, "GET", "/api/version", token, headers={"X-Request-Id": "trace-me-123"}
        )
        assert (status, headers["x-request-id"]) == (200, "trace-me-123")

        status, headers, body = request(gw, "GET", "/corp/api/tags")
        assert status == 401
        # Answered by the gateway itself: its own Server header and a request id.
        assert headers["server"] == "runner-gateway"
        assert len(headers["x-request-id"]) >= 16
        assert headers["www-authenticate"] == 'Bearer realm="runner-gateway"'
        assert json.loads(body)["error"]

        # The gateway's own endpoints need no token and win over the "/" runner.
        assert request(gw, "GET", "/healthz")[0] == 200
        status, _, body = request(gw, "GET", "/readyz")
        assert (status, json.loads(body)["status"]) == (200, "ready")

        line = gw.wait_for(r'"request_id": ?"trace-me-123"')
        record = json.loads(line)
        assert record["method"] == "GET"
        assert record["path"] == "/api/version"
        assert record["runner"] == "r0"
        assert record["status"] == 200
        assert record["sub"] == "tester"
        assert record["duration_ms"] >= 0
        assert record["ttfb_ms"] is not None
        gw.wait_for(r'"status": ?401')
        # Trace shows each request's headers, credentials replaced.
        gw.wait_for(
            r"request trace-me-123: GET /api/version headers .*'authorization': '\[redacted\]'"
        )
    # Trace level, JSON format: still no token anywhere in the output.
    assert token not in gw.output
    assert token[-20:] not in gw.output


def test_no_runner_matches_gives_json_404(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn
) -> None:
    settings = make_settings(runners_yaml(standin, "/corp"))
    with start_gateway(settings.directory) as gw:
        status, _, body = request(gw, "GET", "/corporate/api/tags", settings.token())
        assert status == 404
        assert "error" in json.loads(body)


def test_chat_streams_through_the_gateway(two_runners: GatewaySettings) -> None:
    """Each NDJSON line arrives when the runner writes it (150 ms apart), not at the end."""
    token = two_runners.token()
    with start_gateway(two_runners.directory) as gw:
        body = json.dumps(
            {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "one two three"}]}
        )
        start = time.monotonic()
        conn, response = send(gw, "POST", "/corp/api/chat", token, body)
        assert response.status == 200
        assert response.getheader("content-type", "").startswith("application/x-ndjson")
        arrivals = []
        lines = []
        while True:
            line = response.readline()
            if not line:
                break
            arrivals.append(time.monotonic() - start)
            lines.append(json.loads(line))
        conn.close()
    assert lines[-1]["done"] is True
    assert len(lines) >= 4  # 3 chunks and the final summary
    # Buffering would make every line arrive together at the end.
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert arrivals[-1] - arrivals[0] >= 0.3
    assert sum(1 for gap in gaps if gap >= 0.1) >= 2, arrivals


def test_sigterm_lets_a_stream_in_flight_finish(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn
) -> None:
    settings = make_settings(runners_yaml(standin, "/") + "  drainTimeout: 10s\n")
    token = settings.token()
    with start_gateway(settings.directory) as gw:
        parts = urlsplit(gw.url)
        body = json.dumps({"model": "llama3.2:1b", "prompt": "a b c", "stream": True})
        _, response = send(gw, "POST", "/api/generate", token, body)
        first = response.readline()
        assert json.loads(first)["done"] is False
        gw.signal(signal.SIGTERM)
        rest = response.read()  # completes normally: not cut by the shutdown
        assert json.loads(rest.splitlines()[-1])["done"] is True
        # twistd exits by re-raising the signal it stopped on (systemd counts that as clean).
        assert gw.proc.wait(timeout=15) in (0, -signal.SIGTERM)
        gw.wait_for("Server Shut Down")
        # New connections are refused once draining began.
        with pytest.raises(OSError):
            http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=2).request(
                "GET", "/"
            )


def test_sighup_reloads_good_settings_and_keeps_running_on_bad(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn
) -> None:
    settings = make_settings(runners_yaml(standin, "/a"))
    token = settings.token()
    with start_gateway(settings.directory) as gw:
        assert request(gw, "GET", "/a/api/tags", token)[0] == 200
        assert request(gw, "GET", "/b/api/tags", token)[0] == 404
        original = (settings.directory / "settings.yaml").read_text()
        settings.write("settings.yaml", original.replace("path: /a", "path: /b"))
        gw.signal(signal.SIGHUP)
        gw.wait_for("settings reloaded")
        assert request(gw, "GET", "/b/api/tags", token)[0] == 200
        assert request(gw, "GET", "/a/api/tags", token)[0] == 404

        settings.write("settings.yaml", original + "bogus: 1\n")
        gw.signal(signal.SIGHUP)
        gw.wait_for("settings reload refused.*bogus")
        assert request(gw, "GET", "/b/api/tags", token)[0] == 200


@pytest.mark.parametrize(
    ("overlay", "expected"),
    [
        (None, "broken.yaml: file not found"),
        ("logging:\n  level: [info\n", "broken.yaml: invalid YAML"),
        ("server:\n  adress: :1\n", "broken.yaml: server.adress: unknown key"),
        ("server:\n  address: nowhere\n", "broken.yaml: server.address: invalid address"),
        ("paseto:\n  expiration: 1y\n", "broken.yaml: paseto.expiration: invalid duration"),
        (
            "runners:\n  - {name: a, host: 'h:1', path: /x}\n"
            "  - {name: b, host: 'h:2', path: /x}\n",
            "broken.yaml: runners[1].path: duplicate path",
        ),
        ("paseto:\n  secretKey: notakey\n", "paseto.secretKey"),
    ],
)
def test_bad_start_is_one_line_and_non_zero(
    make_settings: Callable[[str], GatewaySettings],
    standin: StandIn,
    overlay: str | None,
    expected: str,
) -> None:
    settings = make_settings(runners_yaml(standin, "/"))
    if overlay is not None:
        settings.write("broken.yaml", overlay)
    result = run_twistd(settings.directory, "--env", "broken")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    message = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(message) == 1, result.stderr
    assert message[0].startswith("runner-gateway: cannot start: ")
    assert expected in message[0]


def test_go_env_selects_the_overlay(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn
) -> None:
    settings = make_settings(runners_yaml(standin, "/"))
    settings.write("my-domain.yaml", "server:\n  adress: typo\n")
    result = run_twistd(settings.directory, env={"GO_ENV": "my-domain"})
    assert result.returncode != 0
    assert "my-domain.yaml: server.adress: unknown key" in result.stderr


def test_no_verification_key_refuses_to_start(tmp_path, standin: StandIn) -> None:
    directory = tmp_path / "settings"
    directory.mkdir()
    (directory / "settings.yaml").write_text(
        f"paseto:\n  publicPath: {directory}/missing.pub\n" + runners_yaml(standin, "/")
    )
    result = run_twistd(directory)
    assert result.returncode != 0
    assert "no verification key" in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_is_a_clean_failure(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn
) -> None:
    settings = make_settings(runners_yaml(standin, "/"))
    with start_gateway(settings.directory) as gw:
        port = urlsplit(gw.url).port
        settings.write("same.yaml", f"server:\n  address: 127.0.0.1:{port}\n")
        result = run_twistd(settings.directory, "--env", "same")
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_access_line_carries_model_and_token_usage(two_runners: GatewaySettings) -> None:
    token = two_runners.token()
    with start_gateway(two_runners.directory) as gw:
        body = json.dumps(
            {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "one two three"}]}
        ).encode()
        status, _, _ = request(
            gw, "POST", "/corp/api/chat", token, body, headers={"X-Request-Id": "usage-1"}
        )
        assert status == 200
        record = json.loads(gw.wait_for(r'"request_id": ?"usage-1"'))
    # The stand-in counts prompt words and emits one token per chunk (3 chunks).
    assert record["model"] == "llama3.2:1b"
    assert (record["prompt_tokens"], record["completion_tokens"]) == (3, 3)
    assert record["aborted"] is False


def test_client_leaving_mid_stream_is_logged_as_aborted(two_runners: GatewaySettings) -> None:
    token = two_runners.token()
    with start_gateway(two_runners.directory) as gw:
        body = json.dumps({"model": "llama3.2:1b", "prompt": "a b", "stream": True})
        conn, response = send(
            gw, "POST", "/api/generate", token, body, headers={"X-Request-Id": "gone-1"}
        )
        response.readline()
        conn.sock.close()
        conn.close()
        record = json.loads(gw.wait_for(r'"request_id": ?"gone-1"'))
    assert record["aborted"] is True
    assert record["status"] == 200


def test_cors_is_answered_by_the_gateway(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn
) -> None:
    settings = make_settings(
        runners_yaml(standin, "/") + "  corsOrigins: [https://app.example.com]\n"
    )
    token = settings.token()
    with start_gateway(settings.directory) as gw:
        status, headers, _ = request(
            gw,
            "OPTIONS",
            "/api/chat",
            headers={
                "Origin": "https://app.example.com",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert status == 204  # a preflight carries no token and needs none
        assert headers["access-control-allow-origin"] == "https://app.example.com"
        assert "Authorization" in headers["access-control-allow-headers"]

        # The stand-in answers 403 to a foreign Origin, as Ollama does: a 200
        # here shows the gateway did not forward it.
        status, headers, _ = request(
            gw, "GET", "/api/tags", token, headers={"Origin": "https://app.example.com"}
        )
        assert status == 200
        assert headers["access-control-allow-origin"] == "https://app.example.com"

        status, headers, _ = request(
            gw, "GET", "/api/tags", token, headers={"Origin": "https://evil.example.com"}
        )
        assert status == 403
        assert "access-control-allow-origin" not in headers


def test_slow_request_headers_are_cut_off(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn
) -> None:
    settings = make_settings(runners_yaml(standin, "/") + "  headerTimeout: 1s\n")
    with start_gateway(settings.directory) as gw:
        parts = urlsplit(gw.url)
        with socket.create_connection((parts.hostname or "", parts.port or 0), timeout=10) as sock:
            sock.sendall(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n")  # never finishes
            start = time.monotonic()
            with contextlib.suppress(ConnectionResetError):  # aborted outright, or...
                assert sock.recv(1024) == b""  # ...closed by the gateway
            waited = time.monotonic() - start
    assert 0.5 <= waited < 5


def test_stream_in_flight_keeps_its_settings_across_reload(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn
) -> None:
    settings = make_settings(runners_yaml(standin, "/a"))
    token = settings.token()
    with start_gateway(settings.directory) as gw:
        body = json.dumps({"model": "llama3.2:1b", "prompt": "a b c", "stream": True})
        _, response = send(gw, "POST", "/a/api/generate", token, body)
        response.readline()
        original = (settings.directory / "settings.yaml").read_text()
        settings.write("settings.yaml", original.replace("path: /a", "path: /b"))
        gw.signal(signal.SIGHUP)
        gw.wait_for("settings reloaded")
        rest = response.read()
        assert json.loads(rest.splitlines()[-1])["done"] is True
        assert request(gw, "GET", "/a/api/tags", token)[0] == 404


def _tls_gateway(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn, tmp_path: Path
) -> tuple[GatewaySettings, certs.ServerFiles, ssl.SSLContext]:
    """Settings for a gateway serving TLS with a fresh CA, and a client context trusting it."""
    root = certs.make_ca()
    files = certs.write_server_files(tmp_path / "tls", certs.make_leaf(root), root=root)
    settings = make_settings(
        runners_yaml(standin, "/")
        + f"  certificatePath: {files.fullchain}\n  keyPath: {files.key}\n"
    )
    return settings, files, ssl.create_default_context(cafile=str(files.root))


def test_readyz_reports_broken_certificate_files_without_paths(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn, tmp_path
) -> None:
    settings, files, context = _tls_gateway(make_settings, standin, tmp_path)

    def readyz() -> tuple[int, dict[str, object]]:
        port = urlsplit(gw.url).port
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
        conn.request("GET", "/readyz")
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    with start_gateway(settings.directory) as gw:
        assert gw.url.startswith("https://")
        assert readyz() == (200, {"status": "ready"})
        good = files.fullchain.read_bytes()
        certs.write(files.fullchain, good[: len(good) // 2])  # a half-written renewal
        gw.signal(signal.SIGHUP)
        gw.wait_for("settings reloaded")
        status, body = readyz()  # the old pair still serves this handshake
        assert status == 503
        assert "tls" in str(body["problems"])
        assert str(tmp_path) not in json.dumps(body)  # /readyz is public: no file paths
        certs.write(files.fullchain, good)
        gw.signal(signal.SIGHUP)
        gw.wait_for("settings reloaded", timeout=10)
        deadline = time.monotonic() + 10
        while readyz()[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_streams_through_the_tls_listener(
    make_settings: Callable[[str], GatewaySettings], standin: StandIn, tmp_path
) -> None:
    """Over TLS every byte goes through the TLS layer (never sent raw by write_now),
    streamed chunk by chunk, and a kept-alive connection serves the next request."""
    settings, _, context = _tls_gateway(make_settings, standin, tmp_path)
    token = settings.token()
    body = json.dumps({"model": "llama3.2:1b", "prompt": "hi"})
    with start_gateway(settings.directory) as gw:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", urlsplit(gw.url).port, timeout=10, context=context
        )
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        for _ in range(2):
            conn.request("POST", "/api/generate", body=body, headers=headers)
            response = conn.getresponse()
            assert response.status == 200
            lines = [json.loads(line) for line in response.read().splitlines() if line]
            assert len(lines) > 1 and lines[-1]["done"] is True
            assert all(line["model"] == "llama3.2:1b" for line in lines)
        conn.close()
