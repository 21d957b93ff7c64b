"""Limits end to end: the real twistd process tree (``server.workers: 2``, the
``local`` backend) in front of a stand-in runner with slow streams, and the
official ollama and openai clients against its 429s."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import ollama
import openai
import pytest

from runner_gateway.testing.process import start_standin
from tests.conftest import GatewaySettings, StandIn
from tests.gateway_process import GatewayProcess, start_gateway

pytestmark = pytest.mark.timeout(180)

CHAT = json.dumps({"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}]})


@dataclass
class Limited:
    gw: GatewayProcess
    settings: GatewaySettings
    metrics_port: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _records(gw: GatewayProcess) -> list[dict[str, object]]:
    found = []
    for line in list(gw.lines):
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def _workers(gw: GatewayProcess) -> dict[int, int]:
    """worker index -> pid of its latest 'serving' line."""
    found: dict[int, int] = {}
    for record in _records(gw):
        message = str(record.get("message", ""))
        if message.startswith("worker ") and message.endswith(" serving"):
            found[int(str(record["worker"]))] = int(str(record["pid"]))
    return found


def _access(gw: GatewayProcess, sub: str, status: int | None = None) -> list[dict[str, object]]:
    """Access lines of a subject (and status)."""
    return [
        r
        for r in _records(gw)
        if r.get("sub") == sub and "path" in r and (status is None or r.get("status") == status)
    ]


def _wait(test: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not test():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, standin: StandIn) -> Iterator[Limited]:
    # Streams of 120 chunks 0.25 s apart (30 s, unless closed): slow enough
    # to overlap, and to outlive a worker's restart and its lease.
    with start_standin(["--chunks", "120", "--interval", "0.25", "--quiet"]) as (host, port, _):
        from runner_gateway.paseto import V4SecretKey, public_key_pem, secret_key_pem

        directory = tmp_path_factory.mktemp("limits") / "settings"
        directory.mkdir()
        key = V4SecretKey.generate()
        (directory / "paseto.key").write_bytes(secret_key_pem(key))
        (directory / "paseto.pub").write_bytes(public_key_pem(key.public_key()))
        metrics_port = _free_port()
        (directory / "settings.yaml").write_text(
            f"paseto:\n  publicPath: {directory}/paseto.pub\n  keyPath: {directory}/paseto.key\n"
            "logging:\n  format: json\n"
            f"runners:\n  - name: r0\n    host: {host}:{port}\n    path: /\n"
            f"  - name: fast\n    host: {standin.address}\n    path: /fast\n"
            f"  - name: raw\n    host: {standin.address}\n    path: /raw\n"
            "    requestUsage: false\n"
            "server:\n  address: 127.0.0.1:0\n  workers: 2\n  drainTimeout: 2s\n"
            f"metrics:\n  address: 127.0.0.1:{metrics_port}\n"
            "limits:\n"
            "  backend: local\n"
            "  tiers:\n"
            "    rpm: {requestsPerMinute: 30}\n"
            "    conc: {concurrentRequests: 3}\n"
            "    one: {concurrentRequests: 1}\n"
            "    quota: {tokensPerDay: 3}\n"
        )
        settings = GatewaySettings(directory, key)
        with start_gateway(directory) as gw:
            _wait(lambda: len(_workers(gw)) == 2, "two workers serving")
            yield Limited(gw, settings, metrics_port)


def _connection(gw: GatewayProcess) -> http.client.HTTPConnection:
    parts = urlsplit(gw.url)
    return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)


def _get(gw: GatewayProcess, path: str, token: str) -> tuple[int, dict[str, str], bytes]:
    conn = _connection(gw)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


@dataclass
class _Stream:
    conn: http.client.HTTPConnection
    response: http.client.HTTPResponse

    @property
    def status(self) -> int:
        return self.response.status

    def close(self) -> None:
        self.conn.close()


def _open_stream(gw: GatewayProcess, token: str) -> _Stream:
    conn = _connection(gw)
    conn.request("POST", "/api/chat", body=CHAT, headers={"Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    if response.status != 200:
        response.read()
    else:
        response.readline()  # the stream is running
    return _Stream(conn, response)


def _usage(port: int) -> dict[str, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/usage")
    data: dict[str, object] = json.loads(conn.getresponse().read())
    conn.close()
    return data


def _metrics(limited: Limited) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", limited.metrics_port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return text


def _concurrent(limited: Limited, subject: str) -> int:
    limits = _usage(limited.metrics_port)["limits"]
    assert isinstance(limits, dict)
    entry = limits["subjects"].get(subject)
    return int(entry["concurrent"]) if entry else 0


def test_requests_per_minute_exact_across_workers(limited: Limited) -> None:
    token = limited.settings.token(sub="burst", tier="rpm")
    with ThreadPoolExecutor(90) as pool:
        answers = list(pool.map(lambda _: _get(limited.gw, "/api/tags", token), range(90)))
    statuses = [status for status, _, _ in answers]
    assert statuses.count(200) == 30
    assert statuses.count(429) == 60
    # Both workers served some of them (the counts are shared, not per worker).
    _wait(lambda: len(_access(limited.gw, "burst")) == 90, "90 access lines")
    assert len({r["pid"] for r in _access(limited.gw, "burst")}) == 2
    status, headers, body = next(a for a in answers if a[0] == 429)
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["ratelimit-policy"] == '"requests";q=30;w=60'
    assert headers["ratelimit"].startswith('"requests";r=0;t=')
    assert "30 requests per minute" in json.loads(body)["error"]
    ok_headers = next(a for a in answers if a[0] == 200)[1]
    assert ok_headers["ratelimit-policy"] == '"requests";q=30;w=60'
    # The OpenAI shape under /v1.
    status, headers, body = _get(limited.gw, "/v1/models", token)
    assert status == 429
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("rate_limit_exceeded", "rate_limit_exceeded")
    usage = _usage(limited.metrics_port)
    limits = usage["limits"]
    assert isinstance(limits, dict)
    assert limits["subjects"]["burst"]["requests_last_minute"] == 30
    assert limits["subjects"]["burst"]["requests_remaining"] == 0
    metrics = _metrics(limited)
    assert 'runner_gateway_limit_refusals_total{kind="requests"} 61.0' in metrics
    assert "runner_gateway_limits_backend_down 0.0" in metrics


def test_concurrency_exact_and_slots_come_back(limited: Limited) -> None:
    token = limited.settings.token(sub="streamer", tier="conc")
    with ThreadPoolExecutor(6) as pool:
        streams = list(pool.map(lambda _: _open_stream(limited.gw, token), range(6)))
    try:
        statuses = sorted(s.status for s in streams)
        assert statuses == [200, 200, 200, 429, 429, 429]
        assert _concurrent(limited, "streamer") == 3
        # A stream that ends gives its slot back; the client leaving does too.
        running = [s for s in streams if s.status == 200]
        running[0].close()
        _wait(lambda: _concurrent(limited, "streamer") == 2, "the slot given back")
        replacement = _open_stream(limited.gw, token)
        streams.append(replacement)
        assert replacement.status == 200
        assert _open_stream(limited.gw, token).status == 429
    finally:
        for s in streams:
            s.close()
    _wait(lambda: _concurrent(limited, "streamer") == 0, "every slot given back")


def _worker_of(gw: GatewayProcess, stream: _Stream, workers: dict[int, int]) -> int:
    """The pid of the worker serving a stream's connection (from /proc)."""
    client_port = stream.conn.sock.getsockname()[1]
    gateway_port = urlsplit(gw.url).port
    inode = None
    with open("/proc/net/tcp") as table:
        for line in table.read().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.split(":")[1], 16) == gateway_port and (
                int(remote.split(":")[1], 16) == client_port
            ):
                inode = fields[9]
    assert inode is not None
    for pid in workers.values():
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
    raise AssertionError("no worker holds the stream's connection")


def test_a_killed_worker_gives_its_slots_back(limited: Limited) -> None:
    gw = limited.gw
    token = limited.settings.token(sub="crasher", tier="conc")
    streams = [_open_stream(gw, token) for _ in range(3)]
    try:
        assert [s.status for s in streams] == [200, 200, 200]
        assert _open_stream(gw, token).status == 429
        workers = _workers(gw)
        holders = [_worker_of(gw, s, workers) for s in streams]
        # SIGKILL the worker holding most of the streams: it dies without a word.
        victim = max(set(holders), key=holders.count)
        lost = holders.count(victim)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        survivors = [s for s, pid in zip(streams, holders, strict=True) if pid != victim]
        again: list[_Stream] = []
        while len([s for s in again if s.status == 200]) < lost:
            assert time.monotonic() - killed_at < 10, "slots not back within 10 s"
            # A connection hashed to the worker still restarting may fail.
            with contextlib.suppress(ConnectionError, http.client.HTTPException, OSError):
                again.append(_open_stream(gw, token))
            time.sleep(0.1)
        streams += again
        # Exactly the dead worker's slots came back: the survivors still hold theirs.
        assert _open_stream(gw, token).status == 429
        for s in survivors:
            assert s.response.readline()  # still streaming
    finally:
        for s in streams:
            s.close()


def test_unknown_tier_is_refused_and_counted(limited: Limited) -> None:
    token = limited.settings.token(sub="stranger", tier="platinum")
    status, _, body = _get(limited.gw, "/api/tags", token)
    assert status == 403
    assert "tier" in json.loads(body)["error"]
    assert 'runner_gateway_limit_refusals_total{kind="tier"} 1.0' in _metrics(limited)


def test_openai_client_retries_honouring_retry_after(limited: Limited) -> None:
    token = limited.settings.token(sub="openai-user", tier="one")
    holder = _open_stream(limited.gw, token)
    try:
        assert holder.status == 200
        client = openai.OpenAI(base_url=f"{limited.gw.url}/v1", api_key=token, max_retries=2)
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(
                model="llama3.2:1b", messages=[{"role": "user", "content": "hi"}]
            )
        elapsed = time.monotonic() - started
    finally:
        holder.close()
    assert info.value.status_code == 429
    assert info.value.code == "rate_limit_exceeded"
    # Two retries, each after the 1 s the gateway asked for (its own backoff
    # would have waited 0.5 s and 1 s at most).
    assert elapsed >= 2.0
    _wait(
        lambda: len(_access(limited.gw, "openai-user", 429)) == 3,
        "three refused attempts in the access log",
        timeout=10,
    )


def test_token_quota_openai_gives_up_at_once_and_ollama_sees_429(limited: Limited) -> None:
    gw = limited.gw
    token = limited.settings.token(sub="spender", tier="quota")
    # The first request is admitted (nothing used yet) and charged at its end.
    # (On the fast runner: the one at / takes 30 s to answer in full.)
    client = openai.OpenAI(base_url=f"{gw.url}/fast/v1", api_key=token, max_retries=3)
    reply = client.chat.completions.create(
        model="llama3.2:1b", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.usage is not None and reply.usage.total_tokens > 3
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(
            model="llama3.2:1b", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.code == "insufficient_quota"
    body = info.value.body
    assert isinstance(body, dict) and body.get("type") == "insufficient_quota"
    ollama_client = ollama.Client(
        host=f"{gw.url}/fast", headers={"Authorization": f"Bearer {token}"}
    )
    with pytest.raises(ollama.ResponseError) as oinfo:
        ollama_client.chat(model="llama3.2:1b", messages=[{"role": "user", "content": "hi"}])
    assert oinfo.value.status_code == 429
    assert "token quota exhausted" in oinfo.value.error
    # Once the ollama refusal is logged, every line before it is in: the openai
    # client tried once (x-should-retry: false), not four times.
    _wait(
        lambda: any(r["path"] == "/fast/api/chat" for r in _access(gw, "spender", 429)),
        "the ollama refusal logged",
        timeout=10,
    )
    openai_refusals = [r for r in _access(gw, "spender", 429) if r["path"] != "/fast/api/chat"]
    assert len(openai_refusals) == 1
    usage = _usage(limited.metrics_port)["limits"]
    assert isinstance(usage, dict)
    assert usage["subjects"]["spender"]["tokens_remaining"] == 0


def _chat_stream(limited: Limited, prefix: str, sub: str, **extra: object) -> list[object]:
    client = openai.OpenAI(
        base_url=f"{limited.gw.url}{prefix}/v1",
        api_key=limited.settings.token(sub=sub),
        max_retries=0,
    )
    stream = client.chat.completions.create(
        model="llama3.2:1b",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        **extra,  # type: ignore[call-overload]
    )
    return list(stream)


def test_usage_asked_for_and_the_usage_chunk_kept_from_the_client(limited: Limited) -> None:
    chunks = _chat_stream(limited, "/fast", "counted")
    assert chunks and all(c.choices for c in chunks)  # type: ignore[attr-defined]
    assert all(c.usage is None for c in chunks)  # type: ignore[attr-defined]
    _wait(lambda: bool(_access(limited.gw, "counted")), "the access line")
    (line,) = _access(limited.gw, "counted")
    assert int(str(line["prompt_tokens"])) > 0  # reported by the runner, not estimated
    assert "usage_estimated" not in line
    # A client that asks gets the usage chunk as usual.
    chunks = _chat_stream(limited, "/fast", "asker", stream_options={"include_usage": True})
    last = chunks[-1]
    assert not last.choices and last.usage is not None  # type: ignore[attr-defined]
    assert last.usage.completion_tokens > 0  # type: ignore[attr-defined]


def test_request_usage_false_sends_the_body_as_it_is_and_estimates(limited: Limited) -> None:
    chunks = _chat_stream(limited, "/raw", "estimated")
    assert all(c.usage is None for c in chunks)  # type: ignore[attr-defined]
    _wait(lambda: bool(_access(limited.gw, "estimated")), "the access line")
    (line,) = _access(limited.gw, "estimated")
    assert line["usage_estimated"] is True
    assert line["prompt_tokens"] == 0
    assert int(str(line["completion_tokens"])) > 0
