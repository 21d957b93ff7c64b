"""Issue 16, findings 3 to 8 (and HEAD on a filtered listing), replayed as an
attacker would: the real ``twistd -n runner-gateway`` process over loopback,
in front of a runner that misbehaves on purpose (tests/helpers_raw_runner.py).

Requests go out on raw sockets, byte for byte, so nothing on the client side
cleans up what is sent or read.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from urllib.parse import quote, urlsplit

import pytest

from tests.conftest import GatewaySettings
from tests.gateway_process import GatewayProcess, start_gateway
from tests.helpers_raw_runner import RawRunner

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def runner() -> Iterator[RawRunner]:
    raw = RawRunner()
    yield raw
    raw.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _settings(
    make_settings: Callable[[str], GatewaySettings],
    runner: RawRunner,
    *,
    server: str = "",
    logging: str = "",
    metrics_port: int | None = None,
    runners: str = "",
) -> GatewaySettings:
    # Only what today's settings know unless a test needs a new key (server,
    # runners): each test must be able to fail on the code before issue 16.
    text = (
        f"runners:\n"
        f"  - {{name: corp, host: '{runner.address}', path: /corp}}\n"
        f"  - name: vllm\n    host: '{runner.address}'\n    path: /vllm\n"
        "    endpoints:\n"
        "      - {methods: [GET], path: /v1/models, scope: 'models:read'}\n"
        f"  - {{name: raw, host: '{runner.address}', path: /raw}}\n"
        + runners
        + "server:\n  address: 127.0.0.1:0\n  workers: 1\n"
        + server
    )
    if logging:
        text += "logging:\n" + logging
    if metrics_port is not None:
        text += f"metrics:\n  address: 127.0.0.1:{metrics_port}\n"
    return make_settings(text)


class Answer:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.status_line = lines[0]
        self.status = int(lines[0].split(b" ")[1])
        self.head = head
        self.headers: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers.setdefault(name.strip().lower(), []).append(value.strip())
        if self.headers.get(b"transfer-encoding") == [b"chunked"]:
            self.body = _unchunk(self.body)

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name)
        return values[0] if values else None

    def json(self) -> object:
        return json.loads(self.body)


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def send(
    gw: GatewayProcess,
    method: str,
    target: bytes | str,
    token: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
) -> Answer:
    """One request on its own connection (Connection: close), read to the end."""
    parts = urlsplit(gw.url)
    if isinstance(target, str):
        target = target.encode()
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: gw", b"Connection: close"]
    if token:
        lines.append(b"Authorization: Bearer " + token.encode())
    for name, value in headers:
        lines.append(f"{name}: {value}".encode("latin-1"))
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    request = b"\r\n".join(lines) + b"\r\n\r\n" + body
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(request)
        raw = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            raw += data
    return Answer(raw)


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def _sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def _wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


# ------------------------------------------------ finding 3: one canonical path


def test_a_percent_encoded_path_gets_the_filtered_listing(
    make_settings: Callable[[str], GatewaySettings], runner: RawRunner
) -> None:
    """``GET /corp/api/%74ags`` was forwarded as is, and a runner that decodes the
    path answered the unfiltered listing; likewise a runner's endpoints table."""
    settings = _settings(make_settings, runner)
    token = settings.token(scope="admin", models=["llama3.2:*"])
    with start_gateway(settings.directory) as gw:
        answer = send(gw, "GET", "/corp/api/%74ags", token, body=b'{"model":"llama3.2:1b"}')
        assert answer.status == 200, answer.body
        assert [m["name"] for m in answer.json()["models"]] == ["llama3.2:1b"]  # type: ignore[index]
        # What was classified is what was forwarded.
        assert runner.paths()[-1] == b"/api/tags"

        answer = send(gw, "GET", "/vllm/v1/%6dodels", token)
        assert answer.status == 200, answer.body
        assert answer.json() == {"object": "list", "data": []}
        assert runner.paths()[-1] == b"/v1/models"


@pytest.mark.parametrize(
    "target",
    [
        b"/corp/api%2Ftags",
        b"/corp/api%5ctags",
        b"/corp/api/../api/tags",
        b"/corp/api/%2e%2e/api/tags",
        b"/corp/api/./tags",
        b"/corp/api/%00",
        b"/corp/api/%0d%0aX-Injected:%201",
        b"/corp/%ff",
        b"/corp/%c3%28",
    ],
)
def test_a_path_that_reads_two_ways_is_refused(
    make_settings: Callable[[str], GatewaySettings], runner: RawRunner, target: bytes
) -> None:
    settings = _settings(make_settings, runner)
    with start_gateway(settings.directory) as gw:
        answer = send(gw, "GET", target, settings.token(scope="admin"))
        assert answer.status == 400, answer.body
        assert "path" in answer.json()["error"]  # type: ignore[index]
        assert runner.requests == []


def test_an_unclassifiable_path_is_refused_to_a_model_limited_token(
    make_settings: Callable[[str], GatewaySettings], runner: RawRunner
) -> None:
    """Whatever the body names, the gateway cannot know which models an
    endpoint it does not know touches."""
    settings = _settings(make_settings, runner)
    limited = settings.token(scope="admin", models=["llama3.2:*"])
    body = b'{"model":"llama3.2:1b"}'
    with start_gateway(settings.directory) as gw:
        answer = send(gw, "POST", "/corp/api/experimental/copy", limited, body=body)
        assert answer.status == 403, answer.body
        assert runner.requests == []
        # Without a models limit, admin reaches it.
        answer = send(gw, "POST", "/corp/api/experimental/copy", settings.token(scope="admin"))
        assert answer.status == 200, answer.body


def test_head_on_a_filtered_listing_gets_the_filtered_length(
    make_settings: Callable[[str], GatewaySettings], runner: RawRunner
) -> None:
    settings = _settings(make_settings, runner)
    token = settings.token(scope="models:read", models=["llama3.2:*"])
    with start_gateway(settings.directory) as gw:
        get = send(gw, "GET", "/corp/api/tags", token)
        head = send(gw, "HEAD", "/corp/api/tags", token)
    assert get.status == head.status == 200
    assert b"secret-model" not in get.body
    assert head.header(b"content-length") == b"%d" % len(get.body)
    assert head.body == b""


# ---------------------------------------------- finding 4: no token in the logs


def test_a_token_in_the_query_never_reaches_the_log(
    make_settings: Callable[[str], GatewaySettings], runner: RawRunner
) -> None:
    settings = _settings(make_settings, runner, logging="  level: trace\n")
    token = settings.token(scope="admin")
    payload = token.split(".")[2]
    encoded_all = "".join(f"%{b:02X}" for b in token.encode())
    queries = [
        "q=" + token.replace(".", "%2E"),
        "q=" + quote(token, safe=""),
        "q=" + encoded_all,
        "access_token=" + token,
        "access_token=" + encoded_all,
    ]
    with start_gateway(settings.directory) as gw:
        for query in queries:
            # (A query's access_token beside the header is refused: auth.py.)
            assert send(gw, "GET", "/raw/echo?" + query, token).status in (200, 400)
        gw.wait_for(r"\[query not shown\]")
        _wait_for(lambda: sum("/echo" in line for line in gw.lines) >= 2 * len(queries))
    output = gw.output
    for fragment in (token, payload[:16], payload[-16:], encoded_all[:60], encoded_all[-60:]):
        assert fragment not in output


# ------------------------------------------------ finding 5: labels from answers


def test_junk_model_names_do_not_crowd_out_real_ones(
    make_settings: Callable[[str], GatewaySettings], runner: RawRunner
) -> None:
    port = _free_port()
    settings = _settings(make_settings, runner, metrics_port=port)
    token = settings.token(scope="inference")
    with start_gateway(settings.directory) as gw:
        for i in range(210):
            body = json.dumps({"model": f"junk-{i}", "prompt": "x"}).encode()
            assert send(gw, "POST", "/corp/api/generate", token, body=body).status == 404
        body = json.dumps({"model": "llama3.2:1b", "prompt": "x"}).encode()
        assert send(gw, "POST", "/corp/api/generate", token, body=body).status == 200

        def counted() -> bool:
            text = _metrics(port)
            return _sample(text, "runner_gateway_requests_total", code="200") is not None

        _wait_for(counted)
        text = _metrics(port)
    labelled = _sample(
        text, "runner_gateway_tokens_total", runner="corp", model="llama3.2:1b", type="prompt"
    )
    assert labelled == 3.0
    assert 'model="junk-' not in text


# ---------------------------------------------- finding 6: heads rebuilt


def test_a_bare_cr_in_the_runner_status_line_is_not_relayed(
    make_settings: Callable[[str], GatewaySettings], runner: RawRunner
) -> None:
    settings = _settings(make_settings, runner)
    with start_gateway(settings.directory) as gw:
        answer = send(gw, "GET", "/raw/bad-status", settings.token(scope="admin"))
    assert answer.status_line == b"HTTP/1.1 200 OK"
    assert b"evil" not in answer.head.lower()
    assert b"\r" not in answer.head.replace(b"\r\n", b"")


def test_control_characters_in_runner_headers_are_dropped_and_counted(
    make_settings: Callable[[str], GatewaySettings], runner: RawRunner
) -> None:
    port = _free_port()
    settings = _settings(make_settings, runner, metrics_port=port)
    with start_gateway(settings.directory) as gw:
        answer = send(gw, "GET", "/raw/nul-header", settings.token(scope="admin"))
        assert answer.status == 200
        assert answer.header(b"x-fine") == b"yes"
        for name in (b"x-nul", b"x-vt", b"x-del"):
            assert answer.header(name) is None, name
        for byte in (b"\x00", b"\x0b", b"\x7f"):
            assert byte not in answer.head

        def dropped() -> float | None:
            return _sample(
                _metrics(port), "runner_gateway_upstream_header_values_dropped_total", runner="raw"
            )

        _wait_for(lambda: dropped() is not None)
        assert dropped() == 3.0


def test_an_invalid_runner_response_is_a_502_saying_so(
    make_settings: Callable[[str], GatewaySettings], runner: RawRunner
) -> None:
    port = _free_port()
    settings = _settings(make_settings, runner, metrics_port=port)
    token = settings.token(scope="admin")
    with start_gateway(settings.directory) as gw:
        for path in ("/raw/garbage", "/raw/bad-length"):
            answer = send(gw, "GET", path, token)
            assert answer.status == 502, (path, answer.body)
            message = answer.json()["error"]  # type: ignore[index]
            assert "invalid HTTP response" in message, message

        def errors() -> float | None:
            text = _metrics(port)
            return _sample(
                text, "runner_gateway_upstream_errors_total", runner="raw", kind="protocol"
            )

        _wait_for(lambda: errors() == 2.0)


# ---------------------------------------- finding 7: nothing forwarded on trust


def test_what_an_untrusted_client_says_of_itself_is_not_forwarded(
    make_settings: Callable[[str], GatewaySettings], runner: RawRunner
) -> None:
    settings = _settings(make_settings, runner)
    claims = [
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil.example"),
        ("Forwarded", "for=6.6.6.6"),
        ("X-Real-IP", "6.6.6.6"),
        ("X-Request-Id", "client-chosen"),
        ("Cookie", "session=1"),
        ("X-Api-Key", "k1"),
        ("Api-Key", "k2"),
        ("Proxy-Authorization", "Basic eDp5"),
    ]
    with start_gateway(settings.directory) as gw:
        answer = send(gw, "GET", "/raw/echo", settings.token(scope="admin"), claims)
    assert answer.status == 200
    seen = runner.requests[0]
    assert seen.header(b"x-forwarded-for") == [b"127.0.0.1"]
    assert seen.header(b"x-real-ip") == [b"127.0.0.1"]
    assert seen.header(b"x-forwarded-proto") == [b"http"]
    assert seen.header(b"x-forwarded-host") == [b"gw"]
    for name in (b"forwarded", b"cookie", b"x-api-key", b"api-key", b"proxy-authorization"):
        assert seen.header(name) == [], name
    # The gateway's own id, a UUID (llama-cpp-python's server refuses others),
    # the same the client is told.
    (request_id,) = seen.header(b"x-request-id")
    assert uuid.UUID(request_id.decode()).version == 4
    assert answer.header(b"x-request-id") == request_id


def test_a_runner_gets_the_credential_headers_it_is_allowed(
    make_settings: Callable[[str], GatewaySettings], runner: RawRunner
) -> None:
    settings = _settings(
        make_settings,
        runner,
        runners=f"  - {{name: c, host: '{runner.address}', path: /c, forwardHeaders: [Cookie]}}\n",
    )
    claims = [("Cookie", "session=1"), ("X-Api-Key", "k1"), ("Api-Key", "k2")]
    with start_gateway(settings.directory) as gw:
        assert send(gw, "GET", "/c/echo", settings.token(scope="admin"), claims).status == 200
    (seen,) = runner.requests
    assert seen.header(b"cookie") == [b"session=1"]
    assert seen.header(b"x-api-key") == seen.header(b"api-key") == []


def test_a_trusted_proxy_chain_is_extended_and_logged(
    make_settings: Callable[[str], GatewaySettings], runner: RawRunner
) -> None:
    settings = _settings(
        make_settings,
        runner,
        server="  trustedProxies: [127.0.0.0/8]\n",
        logging="  format: json\n",
    )
    request_id = str(uuid.uuid4())
    with start_gateway(settings.directory) as gw:
        answer = send(
            gw,
            "GET",
            "/raw/echo",
            settings.token(scope="admin"),
            [
                ("X-Forwarded-For", "203.0.113.9, 127.0.0.5"),
                ("X-Forwarded-Proto", "https"),
                ("X-Request-Id", request_id),
            ],
        )
        assert answer.status == 200
        record = json.loads(gw.wait_for(f'"request_id": ?"{request_id}"'))
    seen = runner.requests[0]
    assert seen.header(b"x-forwarded-for") == [b"203.0.113.9, 127.0.0.5, 127.0.0.1"]
    assert seen.header(b"x-forwarded-proto") == [b"https"]
    assert seen.header(b"x-request-id") == [request_id.encode()]
    # The access log names the client, not the proxy in front.
    assert record["client"] == "203.0.113.9"


# ------------------------------------------ finding 8: listings rebuilt


def test_a_llama_cpp_listing_is_rebuilt_not_patched(
    make_settings: Callable[[str], GatewaySettings], runner: RawRunner
) -> None:
    """llama.cpp's /v1/models carries an Ollama-style ``models`` array beside
    ``data``: filtering ``data`` alone let ``tiny-llama`` through."""
    settings = _settings(make_settings, runner)
    with start_gateway(settings.directory) as gw:
        other = send(gw, "GET", "/vllm/v1/models", settings.token(models=["other-model"]))
        tiny = send(gw, "GET", "/vllm/v1/models", settings.token(models=["tiny-*"]))
    assert other.status == tiny.status == 200
    assert other.json() == {"object": "list", "data": []}
    assert tiny.json() == {
        "object": "list",
        "data": [{"id": "tiny-llama", "object": "model", "owned_by": "llamacpp"}],
    }
