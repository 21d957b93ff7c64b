"""The stand-in runner: formats, timing, switches, and the official clients.

In memory (StubTreq / a Request on a DummyChannel, time on a Clock) for the
logic; a subprocess on a loopback socket for real streaming, disconnects and
the ``ollama`` / ``openai`` clients.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import itertools
import json
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import ollama
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.test.requesthelper import DummyChannel

from runner_gateway.testing import StandInRunner, listen, replies, start_standin
from runner_gateway.testing.__main__ import parse_args
from runner_gateway.testing.process import StandInStartError

# -- helpers -----------------------------------------------------------------


def result_of(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def fired(d: Deferred[Any]) -> bool:
    out: list[Any] = []

    def seen(result: Any) -> Any:
        out.append(result)
        return result

    d.addBoth(seen)
    return bool(out)


class Memory:
    """A runner on a Clock, reached through StubTreq."""

    def __init__(self, **kw: Any) -> None:
        self.clock = Clock()
        kw.setdefault("interval", 1.0)
        kw.setdefault("chunks", 3)
        self.runner = StandInRunner(reactor=self.clock, **kw)
        self.stub: Any = StubTreq(self.runner.resource())

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        headers: dict[str, str] | None = None,
        host: str = "localhost",
    ) -> Deferred[Any]:
        data = body if isinstance(body, bytes) else None
        if body is not None and data is None:
            data = json.dumps(body).encode()
        d: Deferred[Any] = self.stub.request(
            method, f"http://{host}{path}", data=data, headers=headers or {}
        )
        self.stub.flush()
        return d

    def call(self, method: str, path: str, body: object = None, **kw: Any) -> tuple[int, Any]:
        """Request, run the clock until the answer is complete, return (code, body)."""
        d = self.request(method, path, body, **kw)
        for _ in range(100):
            if fired(d):
                break
            self.clock.advance(0.5)
            self.stub.flush()
        response = result_of(d)
        content = self.stub.content(response)
        for _ in range(100):
            if fired(content):
                break
            self.clock.advance(0.5)
            self.stub.flush()
        raw = result_of(content)
        return response.code, raw

    def json(self, method: str, path: str, body: object = None, **kw: Any) -> tuple[int, Any]:
        code, raw = self.call(method, path, body, **kw)
        return code, json.loads(raw) if raw else None


def ndjson(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def sse(raw: bytes) -> list[str]:
    return [e[len(b"data: ") :].decode() for e in raw.split(b"\n\n") if e.startswith(b"data: ")]


def real_request(method: bytes, path: bytes, body: bytes = b"") -> tuple[Request, DummyChannel]:
    """A real twisted.web Request whose connection the test can drop."""
    channel = DummyChannel()
    request = Request(channel)
    request.method = method
    request.uri = path
    request.path = path
    request.clientproto = b"HTTP/1.1"
    request.content = io.BytesIO(body)
    request.requestHeaders.setRawHeaders(b"host", [b"127.0.0.1:11434"])
    return request, channel


NOT_FOUND = 'model "%s" not found, try pulling it first'
NO_GENERATE = '"nomic-embed-text:latest" does not support generate'
CHAT = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "why is the sky blue"}]}


# -- pure content ------------------------------------------------------------


@given(st.text(max_size=60), st.integers(min_value=1, max_value=40))
def test_reply_pieces_echo_the_words_cyclically(text: str, count: int) -> None:
    pieces = replies.reply_pieces(text, count)
    source = text.split() or replies.FALLBACK_REPLY.split()
    assert len(pieces) == count
    assert "".join(pieces).split(" ") == [source[i % len(source)] for i in range(count)]


def test_embeddings_are_deterministic_unit_vectors() -> None:
    a, b = replies.embedding("sky"), replies.embedding("grass")
    assert a == replies.embedding("sky") and a != b
    assert len(a) == replies.EMBEDDING_DIMENSIONS
    assert abs(sum(x * x for x in a) - 1.0) < 1e-4


# -- Ollama routes, in memory ------------------------------------------------


def test_root_version_tags_and_head() -> None:
    m = Memory()
    assert m.call("GET", "/") == (200, b"Ollama is running")
    assert m.call("HEAD", "/") == (200, b"")
    code, version = m.json("GET", "/api/version")
    assert code == 200 and version == {"version": m.runner.version}
    code, tags = m.json("GET", "/api/tags")
    assert code == 200
    assert [t["name"] for t in tags["models"]] == list(replies.DEFAULT_MODELS)
    assert all("capabilities" not in t and t["model"] == t["name"] for t in tags["models"])
    assert m.call("GET", "/api/nothing")[0] == 404
    assert m.call("PUT", "/api/tags")[0] == 404


def test_chat_stream_writes_each_chunk_at_its_own_time() -> None:
    m = Memory(chunks=3, interval=1.0)
    d = m.request("POST", "/api/chat", CHAT)
    response = result_of(d)  # headers and chunk 0 at t=0
    assert response.headers.getRawHeaders("content-type") == ["application/x-ndjson"]
    got: list[bytes] = []
    collected = m.stub.collect(response, got.append)
    m.stub.flush()
    seen = [len(ndjson(b"".join(got)))]
    for _ in range(3):
        m.clock.advance(1.0)
        m.stub.flush()
        seen.append(len(ndjson(b"".join(got))))
    assert seen == [1, 2, 3, 4]  # one line per interval, then the final line
    result_of(collected)
    lines = ndjson(b"".join(got))
    assert [line["message"]["content"] for line in lines] == ["why", " is", " the", ""]
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["prompt_eval_count"] == 5 and final["eval_count"] == 3
    assert final["total_duration"] == 3_000_000_000
    assert m.runner.active == 0 and m.runner.cancelled == 0


def test_non_stream_answer_comes_once_generation_is_over() -> None:
    m = Memory(chunks=4, interval=0.25)
    body = {"model": "tinyllama", "prompt": "a b c", "system": "be brief", "stream": False}
    d = m.request("POST", "/api/generate", body)
    m.clock.advance(0.9)
    m.stub.flush()
    assert not fired(d)
    m.clock.advance(0.1)
    m.stub.flush()
    response = result_of(d)
    assert response.code == 200
    payload = json.loads(result_of(m.stub.content(response)))
    assert payload["model"] == "tinyllama:latest"
    assert payload["response"] == "a b c a"
    assert payload["done"] is True and payload["done_reason"] == "stop"
    assert payload["prompt_eval_count"] == 5  # "be brief" + "a b c"
    assert payload["eval_count"] == 4


def test_num_predict_caps_the_reply() -> None:
    m = Memory(chunks=5, interval=0.1)
    body = {**CHAT, "stream": False, "options": {"num_predict": 2}}
    code, payload = m.json("POST", "/api/chat", body)
    assert code == 200
    assert payload["message"]["content"] == "why is"
    assert payload["eval_count"] == 2 and payload["done_reason"] == "length"


def test_chat_token_counts_cover_all_messages() -> None:
    m = Memory(chunks=2)
    messages = [
        {"role": "system", "content": "you are terse"},
        {"role": "user", "content": "first question here"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second one"},
    ]
    code, lines = m.call("POST", "/api/chat", {"model": "qwen2.5:0.5b", "messages": messages})
    final = ndjson(lines)[-1]
    assert code == 200
    assert final["prompt_eval_count"] == 3 + 3 + 1 + 2
    assert "".join(line["message"]["content"] for line in ndjson(lines)) == "second one"


def test_empty_messages_load_and_unload_the_model() -> None:
    m = Memory()
    code, lines = m.call("POST", "/api/chat", {"model": "llama3.2:1b", "messages": []})
    assert code == 200 and ndjson(lines)[0]["done_reason"] == "load"
    assert [p["name"] for p in m.json("GET", "/api/ps")[1]["models"]] == ["llama3.2:1b"]
    body = {"model": "llama3.2:1b", "prompt": "", "keep_alive": 0, "stream": False}
    code, payload = m.json("POST", "/api/generate", body)
    assert code == 200 and payload["done_reason"] == "unload"
    assert m.json("GET", "/api/ps")[1]["models"] == []


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        ("/api/chat", {**CHAT, "model": "nope"}, 404, NOT_FOUND % "nope"),
        ("/api/generate", {"model": "x:1b", "prompt": "a"}, 404, NOT_FOUND % "x:1b"),
        ("/api/chat", b"{not json", 400, None),
        ("/api/chat", b"", 400, "missing request body"),
        ("/api/chat", {"messages": []}, 400, "model is required"),
        ("/api/chat", {**CHAT, "model": "error"}, 500, None),
        ("/api/chat", {**CHAT, "model": "nomic-embed-text"}, 400, NO_GENERATE),
        ("/api/show", {"model": "nope"}, 404, "model 'nope' not found"),
    ],
)  # fmt: skip
def test_ollama_errors(path: str, body: object, status: int, error: str | None) -> None:
    code, payload = Memory().json("POST", path, body)
    assert code == status
    assert set(payload) == {"error"} and isinstance(payload["error"], str)
    if error is not None:
        assert payload["error"] == error


def test_embed_and_embeddings() -> None:
    m = Memory()
    body = {"model": "nomic-embed-text", "input": ["why is the sky blue", "grass"]}
    code, payload = m.json("POST", "/api/embed", body)
    assert code == 200
    assert payload["model"] == "nomic-embed-text:latest"
    assert payload["embeddings"] == [
        replies.embedding("why is the sky blue"),
        replies.embedding("grass"),
    ]
    assert payload["prompt_eval_count"] == 6
    code, single = m.json(
        "POST", "/api/embeddings", {"model": "nomic-embed-text", "prompt": "grass"}
    )
    assert code == 200 and single == {"embedding": replies.embedding("grass")}


def test_show_copy_delete_and_ps() -> None:
    m = Memory()
    code, show = m.json("POST", "/api/show", {"model": "nomic-embed-text"})
    assert code == 200 and show["capabilities"] == ["embedding"]
    assert show["details"]["family"] == "nomic-bert"
    assert m.call("POST", "/api/copy", {"source": "llama3.2:1b", "destination": "mine"}) == (
        200,
        b"",
    )
    assert m.json("POST", "/api/copy", {"source": "gone", "destination": "x"}) == (
        404,
        {"error": "model 'gone' not found"},
    )
    names = [t["name"] for t in m.json("GET", "/api/tags")[1]["models"]]
    assert "mine:latest" in names
    assert m.call("DELETE", "/api/delete", {"model": "mine"}) == (200, b"")
    assert m.json("DELETE", "/api/delete", {"model": "mine"}) == (
        404,
        {"error": "model 'mine' not found"},
    )


def test_pull_streams_status_lines_one_interval_apart() -> None:
    m = Memory(interval=1.0)
    response = result_of(m.request("POST", "/api/pull", {"model": "phi3:mini"}))
    got: list[bytes] = []
    m.stub.collect(response, got.append)
    m.stub.flush()
    assert [line["status"] for line in ndjson(b"".join(got))] == ["pulling manifest"]
    m.clock.advance(1.0)
    m.stub.flush()
    assert len(ndjson(b"".join(got))) == 2
    m.clock.pump([1.0] * 4)
    m.stub.flush()
    lines = ndjson(b"".join(got))
    assert lines[-1] == {"status": "success"}
    assert lines[2]["completed"] == lines[2]["total"] > 0
    assert "phi3:mini" in [t["name"] for t in m.json("GET", "/api/tags")[1]["models"]]
    assert m.json("POST", "/api/pull", {"model": "other", "stream": False}) == (
        200,
        {"status": "success"},
    )
    code, failed = m.json("POST", "/api/pull", {"model": "error", "stream": False})
    assert code == 500 and "error" in failed


def test_blobs_create_and_push() -> None:
    m = Memory(interval=0.1)
    data = b"GGUF model bytes"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert m.call("HEAD", f"/api/blobs/{digest}")[0] == 404
    code, mismatch = m.json("POST", f"/api/blobs/{digest}", b"other bytes")
    assert code == 400 and mismatch["error"].startswith("digest mismatch")
    assert m.call("POST", f"/api/blobs/{digest}", data) == (201, b"")
    assert m.call("HEAD", f"/api/blobs/{digest}")[0] == 200
    assert m.json("POST", "/api/blobs/sha256:zz", b"x")[0] == 400
    code, lines = m.call("POST", "/api/create", {"model": "mine", "files": {"m.gguf": digest}})
    assert code == 200 and ndjson(lines)[-1] == {"status": "success"}
    missing = "sha256:" + "0" * 64
    body = {"model": "bad", "files": {"m.gguf": missing}, "stream": False}
    assert m.json("POST", "/api/create", body)[0] == 400
    assert m.json("POST", "/api/create", {"model": "empty"})[0] == 400
    code, created = m.json(
        "POST", "/api/create", {"model": "m2", "from": "llama3.2:1b", "stream": False}
    )
    assert code == 200 and created == {"status": "success"}
    assert m.json("POST", "/api/push", {"model": "mine", "stream": False}) == (
        200,
        {"status": "success"},
    )
    assert m.json("POST", "/api/push", {"model": "nope"})[0] == 404


# -- OpenAI-compatible routes, in memory -------------------------------------


def test_v1_models() -> None:
    m = Memory()
    code, listing = m.json("GET", "/v1/models")
    assert code == 200 and listing["object"] == "list"
    assert [e["id"] for e in listing["data"]] == list(replies.DEFAULT_MODELS)
    assert all(e["object"] == "model" and e["owned_by"] == "library" for e in listing["data"])
    code, one = m.json("GET", "/v1/models/qwen2.5:0.5b")
    assert code == 200 and one["id"] == "qwen2.5:0.5b"
    code, missing = m.json("GET", "/v1/models/nope")
    assert code == 404
    assert missing == {
        "error": {
            "message": 'model "nope" not found',
            "type": "not_found_error",
            "param": None,
            "code": None,
        }
    }


def test_v1_chat_stream_with_usage() -> None:
    m = Memory(chunks=3, interval=1.0)
    body = {
        **CHAT,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = result_of(m.request("POST", "/v1/chat/completions", body))
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    got: list[bytes] = []
    m.stub.collect(response, got.append)
    m.stub.flush()
    assert len(sse(b"".join(got))) == 1
    m.clock.pump([1.0] * 3)
    m.stub.flush()
    events = sse(b"".join(got))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert (
        "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"])
        == "hi there hi"
    )
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_v1_chat_and_completions_non_stream() -> None:
    m = Memory(chunks=4, interval=0.1)
    body = {**CHAT, "max_tokens": 2}
    code, payload = m.json("POST", "/v1/chat/completions", body)
    assert code == 200 and payload["object"] == "chat.completion"
    assert payload["choices"][0]["message"] == {"role": "assistant", "content": "why is"}
    assert payload["choices"][0]["finish_reason"] == "length"
    assert payload["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    code, payload = m.json("POST", "/v1/completions", {"model": "llama3.2:1b", "prompt": "one two"})
    assert code == 200 and payload["object"] == "text_completion"
    assert payload["choices"][0]["text"] == "one two one two"
    assert payload["usage"]["total_tokens"] == 6
    code, raw = m.call(
        "POST", "/v1/completions", {"model": "llama3.2:1b", "prompt": "x", "stream": True}
    )
    events = sse(raw)
    assert events[-1] == "[DONE]" and len(events) == 4 + 2


def test_v1_embeddings_float_and_base64() -> None:
    m = Memory()
    body = {"model": "nomic-embed-text", "input": ["a b", "c"]}
    code, payload = m.json("POST", "/v1/embeddings", body)
    assert code == 200
    assert [d["embedding"] for d in payload["data"]] == [
        replies.embedding("a b"),
        replies.embedding("c"),
    ]
    assert payload["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    code, payload = m.json("POST", "/v1/embeddings", {**body, "encoding_format": "base64"})
    raw = base64.b64decode(payload["data"][1]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert decoded == pytest.approx(replies.embedding("c"), abs=1e-6)


@pytest.mark.parametrize(
    ("path", "body", "status", "kind"),
    [
        ("/v1/chat/completions", {**CHAT, "model": "nope"}, 404, "not_found_error"),
        ("/v1/chat/completions", b"[", 400, "invalid_request_error"),
        ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "invalid_request_error"),
        ("/v1/chat/completions", {**CHAT, "model": "error"}, 500, "api_error"),
        ("/v1/embeddings", {"model": "nomic-embed-text"}, 400, "invalid_request_error"),
    ],
)  # fmt: skip
def test_v1_errors_have_openai_shape(path: str, body: object, status: int, kind: str) -> None:
    code, payload = Memory().json("POST", path, body)
    assert code == status
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["type"] == kind


# -- Host / Origin -----------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("localhost", True),
        ("127.0.0.1:11434", True),
        ("[::1]:8080", True),
        ("0.0.0.0", True),
        ("LOCALHOST:1", True),
        ("gateway.example.com", False),
        ("10.0.0.5:11434", False),
    ],
)
def test_foreign_host_gets_a_bare_403(host: str, allowed: bool) -> None:
    m = Memory()
    code, body = m.call("GET", "/api/tags", headers={"Host": host})
    assert (code == 200) is allowed
    if not allowed:
        assert code == 403 and body == b""


def test_origin_checks_and_preflight() -> None:
    m = Memory()
    d = m.request("GET", "/api/tags", headers={"Origin": "http://localhost:3000"})
    response = result_of(d)
    assert response.code == 200
    assert response.headers.getRawHeaders("access-control-allow-origin") == [
        "http://localhost:3000"
    ]
    assert m.call("GET", "/api/tags", headers={"Origin": "https://evil.example"}) == (403, b"")
    response = result_of(m.request("OPTIONS", "/api/chat", headers={"Origin": "https://127.0.0.1"}))
    assert response.code == 204
    assert response.headers.getRawHeaders("access-control-allow-methods")
    m.runner.allowed_origins.append("https://*.example")
    assert m.call("GET", "/api/tags", headers={"Origin": "https://evil.example"})[0] == 200


def test_listen_adds_the_bound_host_or_turns_the_check_off() -> None:
    reactor = MemoryReactor()
    runner = StandInRunner(reactor=Clock())
    listen(runner, reactor, port=0, interface="127.0.0.2")
    assert reactor.tcpServers[0][3] == "127.0.0.2"
    assert runner.allowed_hosts is not None and "127.0.0.2" in runner.allowed_hosts
    wide = StandInRunner(reactor=Clock())
    listen(wide, reactor, interface="0.0.0.0")
    assert wide.allowed_hosts is None
    m = Memory(allowed_hosts=None)
    assert m.call("GET", "/api/tags", host="gateway.example.com")[0] == 200


# -- recording, switches, cancellation ---------------------------------------


def test_requests_are_recorded() -> None:
    m = Memory()
    m.clock.advance(7.0)
    m.call("POST", "/api/chat?x=1", CHAT, headers={"X-Test": "yes", "Authorization": "Bearer t"})
    (rec,) = m.runner.requests
    assert rec.method == "POST" and rec.path == "/api/chat?x=1"
    assert rec.headers["x-test"] == ["yes"] and rec.header("authorization") == "Bearer t"
    assert rec.json() == CHAT and rec.time == 7.0
    code, listing = m.json("GET", "/_standin/requests")
    assert code == 200 and listing[0]["path"] == "/api/chat?x=1"
    assert len(m.runner.requests) == 1  # the stand-in's own routes are not recorded
    assert m.json("POST", "/_standin/reset") == (200, {"status": "success"})
    assert m.runner.requests == []


@pytest.mark.parametrize(("header_delay", "wait"), [(0.0, 2.0), (0.5, 0.5)])
def test_slow_load_delays_the_headers(header_delay: float, wait: float) -> None:
    m = Memory(header_delay=header_delay)
    d = m.request("POST", "/api/chat", {**CHAT, "model": "slow-load"})
    m.clock.advance(wait - 0.01)
    m.stub.flush()
    assert not fired(d)
    m.clock.advance(0.01)
    m.stub.flush()
    assert result_of(d).code == 200


def test_header_delay_applies_to_every_generation() -> None:
    m = Memory(header_delay=3.0)
    d = m.request("POST", "/api/embed", {"model": "nomic-embed-text", "input": "x"})
    m.clock.advance(2.9)
    m.stub.flush()
    assert not fired(d)
    m.clock.advance(0.1)
    m.stub.flush()
    assert result_of(d).code == 200
    assert m.call("GET", "/api/tags")[0] == 200  # listings are not delayed


def test_client_gone_mid_stream_stops_the_timers() -> None:
    clock = Clock()
    runner = StandInRunner(reactor=clock, chunks=5, interval=1.0)
    request, channel = real_request(b"POST", b"/api/chat", json.dumps(CHAT).encode())
    assert runner.resource().render(request) == NOT_DONE_YET
    assert runner.active == 1 and len(clock.getDelayedCalls()) == 1
    clock.advance(1.0)
    written = channel.transport.written.getvalue()
    request.connectionLost(Failure(ConnectionDone()))
    assert runner.cancelled == 1 and runner.active == 0
    assert clock.getDelayedCalls() == []
    clock.advance(10.0)
    assert channel.transport.written.getvalue() == written  # nothing more was written


def test_crash_aborts_after_two_chunks_and_is_not_a_cancellation() -> None:
    clock = Clock()
    runner = StandInRunner(reactor=clock, chunks=5, interval=1.0)
    body = json.dumps({**CHAT, "model": "crash"}).encode()
    request, channel = real_request(b"POST", b"/api/chat", body)
    runner.resource().render(request)
    clock.advance(1.0)
    assert not channel.transport.disconnected
    clock.advance(1.0)
    assert channel.transport.disconnected
    assert channel.transport.written.getvalue().count(b'"done":false') == 2
    assert b'"done":true' not in channel.transport.written.getvalue()
    request.connectionLost(Failure(ConnectionDone()))
    assert (runner.crashed, runner.cancelled, runner.active) == (1, 0, 0)


def test_stall_sends_one_chunk_then_nothing() -> None:
    m = Memory(chunks=3, interval=1.0)
    response = result_of(m.request("POST", "/api/chat", {**CHAT, "model": "stall"}))
    got: list[bytes] = []
    m.stub.collect(response, got.append)
    m.clock.pump([1.0] * 20)
    m.stub.flush()
    assert len(ndjson(b"".join(got))) == 1 and m.runner.active == 1


# -- over a real socket, in a subprocess -------------------------------------

INTERVAL = 0.1
CHUNKS = 5


@pytest.fixture(scope="module")
def live_runner() -> Iterator[tuple[str, int]]:
    args = ["--chunks", str(CHUNKS), "--interval", str(INTERVAL)]
    with start_standin(args) as (host, port, proc):
        yield host, port
    assert proc.returncode is not None


def stats(host: str, port: int) -> dict[str, int]:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.request("GET", "/_standin/stats")
    data: dict[str, int] = json.loads(conn.getresponse().read())
    conn.close()
    return data


def post(host: str, port: int, path: str, body: object) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return conn.getresponse()


@pytest.mark.parametrize(
    ("path", "body", "separator"),
    [
        ("/api/chat", CHAT, b"\n"),
        ("/v1/chat/completions", {**CHAT, "stream": True}, b"\n\n"),
    ],
)
def test_streaming_arrival_times_are_spaced_by_interval(
    live_runner: tuple[str, int], path: str, body: object, separator: bytes
) -> None:
    host, port = live_runner
    start = time.monotonic()
    response = post(host, port, path, body)
    arrivals: list[float] = []
    buffer = b""
    while True:
        data = response.read1(65536)
        if not data:
            break
        buffer += data
        while separator in buffer:
            record, buffer = buffer.split(separator, 1)
            if record.strip():
                arrivals.append(time.monotonic() - start)
    # N chunks then the closing write (NDJSON: the done line; SSE: final, [DONE])
    assert len(arrivals) >= CHUNKS + 1
    gaps = [b - a for a, b in itertools.pairwise(arrivals[: CHUNKS + 1])]
    assert min(gaps) > INTERVAL * 0.5, gaps  # not buffered into one write
    assert sum(gaps) / len(gaps) < INTERVAL * 2.5, gaps
    assert arrivals[CHUNKS] - arrivals[0] >= CHUNKS * INTERVAL * 0.9


def test_client_disconnect_is_counted_as_cancelled(live_runner: tuple[str, int]) -> None:
    host, port = live_runner
    before = stats(host, port)
    response = post(host, port, "/api/chat", CHAT)
    assert json.loads(response.readline())["done"] is False
    response.close()  # drops the socket mid-stream
    deadline = time.monotonic() + 5
    while stats(host, port)["cancelled"] == before["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.02)
    after = stats(host, port)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["active"] == 0


def test_crash_drops_the_connection(live_runner: tuple[str, int]) -> None:
    host, port = live_runner
    before = stats(host, port)
    response = post(host, port, "/api/chat", {**CHAT, "model": "crash"})
    with pytest.raises(http.client.IncompleteRead) as info:
        response.read()  # the chunked body ends without its terminator
    assert [line["done"] for line in ndjson(info.value.partial)] == [False, False]
    after = stats(host, port)
    assert after["crashed"] == before["crashed"] + 1
    assert after["cancelled"] == before["cancelled"]


def test_foreign_host_over_the_socket(live_runner: tuple[str, int]) -> None:
    host, port = live_runner
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"GET /api/tags HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 403 ")


def test_official_ollama_client(live_runner: tuple[str, int]) -> None:
    host, port = live_runner
    client = ollama.Client(host=f"http://{host}:{port}")
    assert [m.model for m in client.list().models] == list(replies.DEFAULT_MODELS)
    parts = list(
        client.chat(
            model="llama3.2:1b",
            messages=[{"role": "user", "content": "tell me a story"}],
            stream=True,
        )
    )
    assert "".join(p.message.content or "" for p in parts) == "tell me a story tell"
    assert parts[-1].done and parts[-1].eval_count == CHUNKS
    assert parts[-1].prompt_eval_count == 4
    assert client.embed(model="nomic-embed-text", input="x").embeddings == [replies.embedding("x")]
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404
    assert info.value.error == 'model "nope" not found, try pulling it first'


def test_official_openai_client(live_runner: tuple[str, int]) -> None:
    host, port = live_runner
    client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list()] == list(replies.DEFAULT_MODELS)
    stream = client.chat.completions.create(
        model="llama3.2:1b",
        messages=[{"role": "user", "content": "hello world"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "hello world hello world hello"
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (2, 5, 7)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_start_standin_reports_a_failed_start() -> None:
    with (
        pytest.raises(StandInStartError),
        start_standin(["--chunks", "0"], stderr=subprocess.DEVNULL),
    ):
        pass


def test_cli_arguments() -> None:
    args = parse_args(["--port", "0", "--chunks", "2", "--interval", "0.5", "--model", "a:1"])
    assert (args.port, args.chunks, args.interval, args.models) == (0, 2, 0.5, ["a:1"])
    with pytest.raises(SystemExit):
        parse_args(["--interval", "-1"])
