"""A stand-in model runner speaking Ollama's and the OpenAI-compatible HTTP API.

It serves the gateway's tests, the benchmarks and ``make demo``: the official
``ollama`` and ``openai`` Python clients work against it, streams really
stream (one write per chunk, each at its own time on the reactor), and every
number it reports is a function of the request (see docs/stand-in-runner.md).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from hashlib import sha256
from typing import Any, Protocol, cast

from twisted.internet.interfaces import IListeningPort
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from runner_gateway.testing import replies

__all__ = [
    "DEFAULT_ALLOWED_HOSTS",
    "DEFAULT_ALLOWED_ORIGINS",
    "RecordedRequest",
    "StandInRunner",
    "listen",
]

DEFAULT_ALLOWED_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0"})  # noqa: S104
DEFAULT_ALLOWED_ORIGINS: tuple[str, ...] = tuple(
    f"{scheme}://{host}{port}"
    for scheme in ("http", "https")
    for host in ("localhost", "127.0.0.1")
    for port in ("", ":*")
)

# "slow-load" waits this long before headers unless header_delay is set.
SLOW_LOAD_SECONDS = 2.0
CRASH_AFTER_CHUNKS = 2
ERROR_MESSAGE = "llama runner process has terminated: exit status 2 (stand-in 'error' model)"
KEEP_ALIVE_SECONDS = 300.0

_NDJSON = b"application/x-ndjson"
_JSON = b"application/json; charset=utf-8"
_SSE = b"text/event-stream"
_TEXT = b"text/plain; charset=utf-8"


class _Clock(Protocol):
    """The part of a reactor the stand-in times itself with (a Clock will do)."""

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> Any: ...

    def seconds(self) -> float: ...


class _TCPReactor(Protocol):
    def listenTCP(
        self, port: int, factory: Any, backlog: int = ..., interface: str = ...
    ) -> IListeningPort: ...


def _default_reactor() -> _Clock:
    from twisted.internet import reactor

    return cast(_Clock, reactor)


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the stand-in received it."""

    method: str
    path: str  # with the query string
    headers: dict[str, list[str]]  # lower-case names
    body: bytes
    time: float  # reactor.seconds() on arrival

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[-1] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class _Finish(Exception):
    """Raised inside a handler to answer at once with (status, content type, body)."""

    def __init__(self, status: int, body: bytes, content_type: bytes = _JSON) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.content_type = content_type


def _dumps(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _wildcard(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$")


def _host_name(host_header: str) -> str:
    """Host header -> host without port ("[::1]:80" -> "::1")."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host[1:]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


_Step = Callable[["_Script"], None]


class _Script:
    """Steps at fixed offsets from its start; stops when the client goes away.

    Each step runs ``start + offset`` on the clock (not ``previous + interval``)
    so the stream does not drift. A step ends the response by calling
    ``finish()`` or ``abort()``; with no such step the response stays open.
    """

    def __init__(
        self,
        runner: StandInRunner,
        request: Request,
        steps: Sequence[tuple[float, _Step]],
    ) -> None:
        self.runner = runner
        self.request = request
        self.steps = list(steps)
        self.ended = False  # finished or deliberately aborted: not a cancellation
        self.pending: Any = None
        self.start = runner.clock.seconds()
        runner.active += 1
        request.notifyFinish().addErrback(self._client_gone)
        self._schedule(0)

    def _schedule(self, index: int) -> None:
        if index >= len(self.steps) or self.ended:
            return
        offset = self.steps[index][0]
        delay = self.start + offset - self.runner.clock.seconds()
        if delay <= 0 and index == 0:
            self._run(index)  # no header delay: answer inside render()
        else:
            self.pending = self.runner.clock.callLater(max(delay, 0.0), self._run, index)

    def _run(self, index: int) -> None:
        self.pending = None
        if self.ended:
            return
        self.steps[index][1](self)
        self._schedule(index + 1)

    def finish(self) -> None:
        if not self.ended:
            self.ended = True
            self.runner.active -= 1
            self.request.finish()

    def abort(self) -> None:
        """Drop the connection mid-response, as a crashing runner does."""
        if self.ended:
            return
        self.ended = True
        self.runner.active -= 1
        self.runner.crashed += 1
        self.request._standin_crashed = True  # type: ignore[attr-defined]
        # Close (FIN after the data already written, as the kernel does for a
        # dying process) without the chunked terminator: the body is cut short.
        transport = getattr(self.request.channel, "transport", None)
        if transport is not None:
            transport.loseConnection()

    def _client_gone(self, failure: Failure) -> None:
        if self.ended:
            return
        self.ended = True
        self.runner.active -= 1
        self.runner.cancelled += 1
        if self.pending is not None and self.pending.active():
            self.pending.cancel()
        self.pending = None


class StandInRunner:
    """State and configuration of one stand-in runner.

    ``models`` are /api/tags entries (names are turned into entries with
    :func:`replies.make_model`). ``allowed_hosts`` None turns the Host check
    off; ``allowed_origins`` are patterns with ``*`` wildcards.
    """

    def __init__(
        self,
        models: Iterable[str | Mapping[str, Any]] | None = None,
        *,
        chunks: int = 5,
        interval: float = 0.05,
        header_delay: float = 0.0,
        reactor: _Clock | None = None,
        allowed_hosts: Iterable[str] | None = DEFAULT_ALLOWED_HOSTS,
        allowed_origins: Iterable[str] = DEFAULT_ALLOWED_ORIGINS,
        version: str = "0.9.0",
        log: Callable[[str], None] | None = None,
    ) -> None:
        names = replies.DEFAULT_MODELS if models is None else models
        self.models: list[dict[str, Any]] = [
            replies.make_model(m) if isinstance(m, str) else dict(m) for m in names
        ]
        self.chunks = chunks
        self.interval = interval
        self.header_delay = header_delay
        self._reactor = reactor
        self.allowed_hosts: set[str] | None = (
            None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        )
        self.allowed_origins: list[str] = list(allowed_origins)
        self.version = version
        self.log = log
        self.requests: list[RecordedRequest] = []
        self.cancelled = 0  # responses whose client went away before the end
        self.crashed = 0  # responses the "crash" model aborted on purpose
        self.active = 0  # timed responses in progress
        self.blobs: dict[str, bytes] = {}  # hex digest -> content
        self.loaded: dict[str, float] = {}  # model name -> expiry (wall clock)
        self._ids = 0

    @property
    def clock(self) -> _Clock:
        if self._reactor is None:
            self._reactor = _default_reactor()
        return self._reactor

    def resource(self) -> IResource:
        return _StandInResource(self)

    def site(self) -> Site:
        site = Site(self.resource())
        site.displayTracebacks = False
        return site

    def reset(self) -> None:
        """Forget recorded requests and counters (models and blobs stay)."""
        self.requests.clear()
        self.cancelled = self.crashed = 0

    def model(self, name: str) -> Mapping[str, Any] | None:
        return replies.find_model(self.models, name)

    # -- request handling -------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        path = (request.path or b"/").decode("latin-1")
        started = self.clock.seconds()
        internal = path.startswith("/_standin/")
        if not internal:
            self._record(request, started)
        if self.log is not None:
            request.notifyFinish().addBoth(self._log_line, request, started)
        openai = path.startswith("/v1/")
        try:
            self._check_host_and_origin(request)
            if request.method == b"OPTIONS":
                raise _Finish(204, b"")
            return self._route(request, path, openai)
        except _Finish as answer:
            request.setResponseCode(answer.status)
            if answer.body or answer.status not in (204, 403):
                request.setHeader(b"content-type", answer.content_type)
            request.setHeader(b"content-length", str(len(answer.body)).encode())
            return b"" if request.method == b"HEAD" else answer.body

    def _record(self, request: Request, now: float) -> None:
        headers: dict[str, list[str]] = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            headers.setdefault(name.decode("latin-1").lower(), []).extend(
                v.decode("latin-1") for v in values
            )
        self.requests.append(
            RecordedRequest(
                method=request.method.decode("latin-1"),
                path=request.uri.decode("latin-1"),
                headers=headers,
                body=self._body(request),
                time=now,
            )
        )

    @staticmethod
    def _body(request: Request) -> bytes:
        content = request.content
        if content is None:
            return b""
        content.seek(0)
        data = content.read()
        content.seek(0)
        return bytes(data)

    def _log_line(self, result: object, request: Request, started: float) -> None:
        elapsed = self.clock.seconds() - started
        how = ""
        if getattr(request, "_standin_crashed", False):
            how = " (crashed on purpose)"
        elif isinstance(result, Failure):
            how = " (client gone)"
        client = request.getClientAddress()
        peer = getattr(client, "host", "-")
        # the path without the query: nothing secret belongs in a log line
        method = request.method.decode("latin-1")
        path = (request.path or b"").decode("latin-1")
        line = f'{peer} "{method} {path}" {request.code} {elapsed:.3f}s{how}'
        assert self.log is not None
        self.log(line)

    def _check_host_and_origin(self, request: Request) -> None:
        # Ollama refuses foreign Host headers (DNS rebinding) and unknown
        # browser Origins with a bare 403.
        if self.allowed_hosts is not None:
            host = request.getHeader(b"host")
            if host:
                name = _host_name(host.decode("latin-1"))
                if name and name not in self.allowed_hosts:
                    raise _Finish(403, b"")
        origin = request.getHeader(b"origin")
        if origin is not None:
            text = origin.decode("latin-1")
            if not any(_wildcard(p).match(text) for p in self.allowed_origins):
                raise _Finish(403, b"")
            request.setHeader(b"access-control-allow-origin", origin)
            request.setHeader(b"vary", b"Origin")
            if request.method == b"OPTIONS":
                request.setHeader(
                    b"access-control-allow-methods", b"GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
                )
                request.setHeader(
                    b"access-control-allow-headers",
                    b"Authorization, Content-Type, User-Agent, Accept, X-Requested-With",
                )
                request.setHeader(b"access-control-max-age", b"43200")

    def _route(self, request: Request, path: str, openai: bool) -> bytes | int:
        method = request.method.decode("latin-1")
        if method == "HEAD" and path == "/":
            raise _Finish(200, b"Ollama is running", _TEXT)
        if method == "HEAD" and path in ("/api/tags", "/api/version"):
            method = "GET"  # Ollama answers HEAD on these too
        handler = _ROUTES.get((method, path))
        if handler is not None:
            return handler(self, request, openai)
        if path.startswith("/api/blobs/") and method in ("HEAD", "POST"):
            return self._blob(request, path[len("/api/blobs/") :])
        if path.startswith("/v1/models/") and method == "GET":
            return self._v1_model(path[len("/v1/models/") :])
        # gin's answer for an unknown route or method
        raise _Finish(404, b"404 page not found", _TEXT)

    # -- helpers ----------------------------------------------------------

    def _error(self, status: int, message: str, openai: bool) -> _Finish:
        if openai:
            kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
            payload: object = {
                "error": {"message": message, "type": kind, "param": None, "code": None}
            }
        else:
            payload = {"error": message}
        return _Finish(status, _dumps(payload))

    def _json_body(self, request: Request, openai: bool) -> dict[str, Any]:
        raw = self._body(request)
        if not raw.strip():
            raise self._error(400, "missing request body", openai)
        try:
            payload = json.loads(raw)
        except ValueError as exc:
            raise self._error(400, f"invalid JSON: {exc}", openai) from None
        if not isinstance(payload, dict):
            raise self._error(400, "request body must be a JSON object", openai)
        return payload

    def _model_name(self, body: Mapping[str, Any], openai: bool) -> str:
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise self._error(400, "model is required", openai)
        return name

    def _resolve(self, name: str, openai: bool, needs: str | None) -> tuple[str, str | None]:
        """(model name as reported, special mode) or a 404/400 answer."""
        mode = replies.special_mode(name)
        if mode is not None:
            if mode == "error":
                raise self._error(500, ERROR_MESSAGE, openai)
            return name, mode
        model = self.model(name)
        if model is None:
            raise self._error(404, f'model "{name}" not found, try pulling it first', openai)
        caps = model.get("capabilities") or ["completion"]
        if needs == "completion" and "completion" not in caps:
            raise self._error(400, f'"{model["name"]}" does not support generate', openai)
        return str(model["name"]), None

    def _load_delay(self, mode: str | None) -> float:
        if mode == "slow-load":
            return self.header_delay if self.header_delay > 0 else SLOW_LOAD_SECONDS
        return self.header_delay

    def mark_loaded(self, name: str) -> None:
        self.loaded[name] = time.time() + KEEP_ALIVE_SECONDS

    def _next_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-{self._ids}"

    @staticmethod
    def _start(request: Request, content_type: bytes, status: int = 200) -> None:
        request.setResponseCode(status)
        request.setHeader(b"content-type", content_type)

    def _count(self, limit: object) -> tuple[int, bool]:
        """Chunks to emit and whether a token limit cut the reply short."""
        if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < self.chunks:
            return limit, True
        return self.chunks, False

    # -- generation (shared by the Ollama and OpenAI formats) -------------

    def _generate(
        self,
        request: Request,
        *,
        mode: str | None,
        stream: bool,
        count: int,
        content_type: bytes,
        piece: Callable[[int], bytes],
        final: Callable[[float], bytes],
        whole: Callable[[float], bytes],
    ) -> int:
        """Schedule a generation: ``piece(i)`` per chunk, then ``final`` (stream)
        or ``whole`` (one body once the "generation" is over).

        Timeline (D = load delay, I = interval, N = count): stream chunk i at
        D + i*I, the closing write at D + N*I; a non-stream body at D + N*I.
        """
        delay = self._load_delay(mode)
        interval = self.interval
        steps: list[tuple[float, _Step]] = []

        def write_piece(i: int) -> _Step:
            def step(script: _Script) -> None:
                if i == 0:
                    self._start(request, content_type)
                request.write(piece(i))

            return step

        def close_stream(script: _Script) -> None:
            request.write(final(delay))
            script.finish()

        def send_whole(script: _Script) -> None:
            body = whole(delay)
            self._start(request, _JSON)
            request.setHeader(b"content-length", str(len(body)).encode())
            request.write(body)
            script.finish()

        if stream:
            shown = count
            if mode == "crash":
                shown = min(count, CRASH_AFTER_CHUNKS)
            elif mode == "stall":
                shown = min(count, 1)
            steps.extend((delay + i * interval, write_piece(i)) for i in range(shown))
            if mode == "crash":
                steps.append((delay + shown * interval, _Script.abort))
            elif mode != "stall":
                steps.append((delay + count * interval, close_stream))
        elif mode == "crash":
            steps.append((delay + CRASH_AFTER_CHUNKS * interval, _Script.abort))
        elif mode != "stall":
            steps.append((delay + count * interval, send_whole))
        _Script(self, request, steps)
        return NOT_DONE_YET

    def _stats(self, prompt: int, count: int, delay: float, started: float) -> dict[str, int]:
        return {
            "total_duration": _ns(self.clock.seconds() - started),
            "load_duration": _ns(delay),
            "prompt_eval_count": prompt,
            "prompt_eval_duration": 1_000_000,
            "eval_count": count,
            "eval_duration": _ns(count * self.interval),
        }

    def _ollama_generate(self, request: Request, chat: bool) -> bytes | int:
        body = self._json_body(request, False)
        name, mode = self._resolve(self._model_name(body, False), False, "completion")
        stream = body.get("stream") is not False
        started = self.clock.seconds()
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        count, limited = self._count(cast(dict[str, Any], options).get("num_predict"))
        done_reason = "length" if limited else "stop"
        if chat:
            messages = body.get("messages") if isinstance(body.get("messages"), list) else []
            messages = cast(list[object], messages)
            prompt_words = replies.chat_prompt_words(messages)
            source = replies.last_user_text(messages)
            empty = not messages
        else:
            prompt_text = str(body.get("prompt") or "")
            prompt_words = replies.words(str(body.get("system") or "")) + replies.words(prompt_text)
            source = prompt_text
            empty = not prompt_text and not body.get("images")
        if mode is None:
            self.mark_loaded(name)
        if empty:
            return self._load_only(request, name, body, chat, stream, mode)
        pieces = replies.reply_pieces(source, count)

        def line(text: str, done: bool) -> dict[str, Any]:
            out: dict[str, Any] = {"model": name, "created_at": replies.now_rfc3339()}
            if chat:
                out["message"] = {"role": "assistant", "content": text}
            else:
                out["response"] = text
            out["done"] = done
            return out

        def closing(text: str, delay: float) -> dict[str, Any]:
            out = line(text, True)
            out["done_reason"] = done_reason
            out.update(self._stats(len(prompt_words), count, delay, started))
            return out

        return self._generate(
            request,
            mode=mode,
            stream=stream,
            count=count,
            content_type=_NDJSON,
            piece=lambda i: _dumps(line(pieces[i], False)) + b"\n",
            final=lambda delay: _dumps(closing("", delay)) + b"\n",
            whole=lambda delay: _dumps(closing("".join(pieces), delay)),
        )

    def _load_only(
        self,
        request: Request,
        name: str,
        body: Mapping[str, Any],
        chat: bool,
        stream: bool,
        mode: str | None,
    ) -> int:
        # Ollama: no prompt / no messages loads (keep_alive 0: unloads) the model.
        unload = body.get("keep_alive") in (0, "0", "0s")
        if unload:
            self.loaded.pop(name, None)
        out: dict[str, Any] = {"model": name, "created_at": replies.now_rfc3339()}
        if chat:
            out["message"] = {"role": "assistant", "content": ""}
        else:
            out["response"] = ""
        out["done_reason"] = "unload" if unload else "load"
        out["done"] = True
        data = _dumps(out) + b"\n"

        def send(script: _Script) -> None:
            self._start(request, _NDJSON if stream else _JSON)
            request.write(data)
            script.finish()

        _Script(self, request, [(self._load_delay(mode), send)])
        return NOT_DONE_YET

    def _openai_generate(self, request: Request, chat: bool) -> bytes | int:
        body = self._json_body(request, True)
        name, mode = self._resolve(self._model_name(body, True), True, "completion")
        stream = body.get("stream") is True
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        count, limited = self._count(limit)
        finish_reason = "length" if limited else "stop"
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise self._error(400, "messages is required", True)
            prompt_words = replies.chat_prompt_words(messages)
            source = replies.last_user_text(messages)
        else:
            prompts = replies.text_inputs(body.get("prompt"))
            if not prompts:
                raise self._error(400, "prompt is required", True)
            prompt_words = [w for p in prompts for w in replies.words(p)]
            source = prompts[-1]
        if mode is None:
            self.mark_loaded(name)
        pieces = replies.reply_pieces(source, count)
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        ident = self._next_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        usage = {
            "prompt_tokens": len(prompt_words),
            "completion_tokens": count,
            "total_tokens": len(prompt_words) + count,
        }
        kind = "chat.completion" if chat else "text_completion"

        def envelope(obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
            return {
                "id": ident,
                "object": obj,
                "created": created,
                "model": name,
                "system_fingerprint": "fp_ollama",
                "choices": choices,
            }

        def choice(text: str, reason: str | None, delta: bool) -> dict[str, Any]:
            if not chat:
                return {"text": text, "index": 0, "logprobs": None, "finish_reason": reason}
            key = "delta" if delta else "message"
            return {
                "index": 0,
                key: {"role": "assistant", "content": text},
                "finish_reason": reason,
            }

        def event(payload: object) -> bytes:
            return b"data: " + _dumps(payload) + b"\n\n"

        obj = kind + ".chunk" if chat else kind

        def chunk(i: int) -> bytes:
            return event(envelope(obj, [choice(pieces[i], None, True)]))

        def final(delay: float) -> bytes:
            out = event(envelope(obj, [choice("", finish_reason, True)]))
            if include_usage:
                out += event({**envelope(obj, []), "usage": usage})
            return out + b"data: [DONE]\n\n"

        def whole(delay: float) -> bytes:
            return _dumps(
                {**envelope(kind, [choice("".join(pieces), finish_reason, False)]), "usage": usage}
            )

        return self._generate(
            request,
            mode=mode,
            stream=stream,
            count=count,
            content_type=_SSE,
            piece=chunk,
            final=final,
            whole=whole,
        )

    def _later(self, request: Request, mode: str | None, data: bytes) -> int:
        """Answer with one JSON body after the load delay (embeddings)."""
        steps: list[tuple[float, _Step]] = []
        delay = self._load_delay(mode)

        def send(script: _Script) -> None:
            self._start(request, _JSON)
            request.setHeader(b"content-length", str(len(data)).encode())
            request.write(data)
            script.finish()

        if mode == "crash":
            steps.append((delay, _Script.abort))
        elif mode != "stall":
            steps.append((delay, send))
        _Script(self, request, steps)
        return NOT_DONE_YET

    # -- routes -----------------------------------------------------------

    def _root(self, request: Request, openai: bool) -> bytes:
        raise _Finish(200, b"Ollama is running", _TEXT)

    def _version_route(self, request: Request, openai: bool) -> bytes:
        raise _Finish(200, _dumps({"version": self.version}))

    def _tags(self, request: Request, openai: bool) -> bytes:
        raise _Finish(200, _dumps({"models": [replies.tags_entry(m) for m in self.models]}))

    def _ps(self, request: Request, openai: bool) -> bytes:
        now = time.time()
        running = []
        for name, expires in list(self.loaded.items()):
            model = self.model(name)
            if expires < now or model is None:
                del self.loaded[name]
                continue
            entry = replies.tags_entry(model)
            entry.pop("modified_at", None)
            entry["expires_at"] = (
                datetime.fromtimestamp(expires, UTC).isoformat().replace("+00:00", "Z")
            )
            entry["size_vram"] = entry.get("size", 0)
            entry["context_length"] = 4096
            running.append(entry)
        raise _Finish(200, _dumps({"models": running}))

    def _show(self, request: Request, openai: bool) -> bytes:
        body = self._json_body(request, False)
        name = self._model_name(body, False)
        model = self.model(name)
        if model is None:
            raise self._error(404, f"model '{name}' not found", False)
        raise _Finish(200, _dumps(replies.show_payload(model)))

    def _chat(self, request: Request, openai: bool) -> bytes | int:
        return self._ollama_generate(request, chat=True)

    def _generate_route(self, request: Request, openai: bool) -> bytes | int:
        return self._ollama_generate(request, chat=False)

    def _embed(self, request: Request, openai: bool) -> bytes | int:
        body = self._json_body(request, False)
        name, mode = self._resolve(self._model_name(body, False), False, None)
        inputs = replies.text_inputs(body.get("input"))
        prompt = sum(len(replies.words(text)) for text in inputs)
        dims = body.get("dimensions")
        size = dims if isinstance(dims, int) and dims > 0 else replies.EMBEDDING_DIMENSIONS
        delay = self._load_delay(mode)
        if mode is None:
            self.mark_loaded(name)
        data = _dumps(
            {
                "model": name,
                "embeddings": [replies.embedding(text, size) for text in inputs],
                "total_duration": _ns(delay) + 1_000_000,
                "load_duration": _ns(delay),
                "prompt_eval_count": prompt,
            }
        )
        return self._later(request, mode, data)

    def _embeddings(self, request: Request, openai: bool) -> bytes | int:
        body = self._json_body(request, False)
        name, mode = self._resolve(self._model_name(body, False), False, None)
        prompt = str(body.get("prompt") or "")
        if mode is None:
            self.mark_loaded(name)
        vector = replies.embedding(prompt) if prompt else []
        return self._later(request, mode, _dumps({"embedding": vector}))

    def _v1_embeddings(self, request: Request, openai: bool) -> bytes | int:
        body = self._json_body(request, True)
        name, mode = self._resolve(self._model_name(body, True), True, None)
        inputs = replies.text_inputs(body.get("input"))
        if not inputs:
            raise self._error(400, "invalid input", True)
        prompt = sum(len(replies.words(text)) for text in inputs)
        dims = body.get("dimensions")
        size = dims if isinstance(dims, int) and dims > 0 else replies.EMBEDDING_DIMENSIONS
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(inputs):
            vector = replies.embedding(text, size)
            value: object = replies.embedding_base64(vector) if as_base64 else vector
            data.append({"object": "embedding", "embedding": value, "index": index})
        if mode is None:
            self.mark_loaded(name)
        payload = {
            "object": "list",
            "data": data,
            "model": name,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }
        return self._later(request, mode, _dumps(payload))

    def _progress(self, request: Request, stream: bool, lines: Sequence[dict[str, Any]]) -> int:
        """NDJSON status lines one interval apart; non-stream: the last one."""
        steps: list[tuple[float, _Step]] = []
        if stream:
            for i, item in enumerate(lines):

                def step(
                    script: _Script,
                    item: dict[str, Any] = item,
                    first: bool = i == 0,
                    last: bool = i == len(lines) - 1,
                ) -> None:
                    if first:
                        self._start(request, _NDJSON)
                    request.write(_dumps(item) + b"\n")
                    if last:
                        script.finish()

                steps.append((i * self.interval, step))
        else:
            result = lines[-1]
            status = 500 if "error" in result else 200

            def whole(script: _Script) -> None:
                self._start(request, _JSON, status)
                request.write(_dumps(result))
                script.finish()

            steps.append(((len(lines) - 1) * self.interval, whole))
        _Script(self, request, steps)
        return NOT_DONE_YET

    def _pull(self, request: Request, openai: bool) -> bytes | int:
        body = self._json_body(request, False)
        name = replies.normalize_name(self._model_name(body, False))
        stream = body.get("stream") is not False
        if replies.special_mode(name) == "error":
            lines: list[dict[str, Any]] = [
                {"status": "pulling manifest"},
                {"error": "pull model manifest: file does not exist"},
            ]
            return self._progress(request, stream, lines)
        model = self.model(name)
        if model is None:
            model = replies.make_model(name)
            self.models.append(model)
        digest = "sha256:" + str(model["digest"])
        total = int(model.get("size", 0))
        lines = [
            {"status": "pulling manifest"},
            {"status": f"pulling {digest[7:19]}", "digest": digest, "total": total},
            {
                "status": f"pulling {digest[7:19]}",
                "digest": digest,
                "total": total,
                "completed": total,
            },
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        return self._progress(request, stream, lines)

    def _push(self, request: Request, openai: bool) -> bytes | int:
        body = self._json_body(request, False)
        name = self._model_name(body, False)
        model = self.model(name)
        if model is None:
            raise self._error(404, f"model '{name}' not found", False)
        digest = "sha256:" + str(model["digest"])
        lines: list[dict[str, Any]] = [
            {"status": "retrieving manifest"},
            {"status": "starting upload", "digest": digest, "total": int(model.get("size", 0))},
            {"status": "pushing manifest"},
            {"status": "success"},
        ]
        return self._progress(request, body.get("stream") is not False, lines)

    def _create(self, request: Request, openai: bool) -> bytes | int:
        body = self._json_body(request, False)
        name = replies.normalize_name(self._model_name(body, False))
        source = body.get("from")
        files = body.get("files") if isinstance(body.get("files"), dict) else {}
        files = cast(dict[str, Any], files)
        if not source and not files:
            raise self._error(400, "neither 'from' or 'files' was specified", False)
        for digest in files.values():
            hexdigest = replies.parse_digest(str(digest))
            if hexdigest is None or hexdigest not in self.blobs:
                raise self._error(400, f"blob {digest} not found: upload it first", False)
        base = self.model(str(source)) if isinstance(source, str) and source else None
        if source and base is None and replies.parse_digest(str(source)) is None:
            raise self._error(404, f"model '{source}' not found", False)
        overrides: dict[str, Any] = {}
        if base is not None:
            overrides = {
                "details": dict(base.get("details") or {}),
                "capabilities": list(base.get("capabilities") or ["completion"]),
            }
        model = replies.make_model(name, **overrides)
        self.models = [m for m in self.models if replies.normalize_name(str(m["name"])) != name]
        self.models.append(model)
        lines = [
            {"status": "using existing layer sha256:" + str(model["digest"])},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        return self._progress(request, body.get("stream") is not False, lines)

    def _copy(self, request: Request, openai: bool) -> bytes:
        body = self._json_body(request, False)
        source, destination = body.get("source"), body.get("destination")
        if not isinstance(source, str) or not isinstance(destination, str):
            raise self._error(400, "source and destination are required", False)
        model = self.model(source)
        if model is None:
            raise self._error(404, f"model '{source}' not found", False)
        name = replies.normalize_name(destination)
        copy = {**model, "name": name, "model": name}
        self.models = [m for m in self.models if replies.normalize_name(str(m["name"])) != name]
        self.models.append(copy)
        raise _Finish(200, b"")

    def _delete(self, request: Request, openai: bool) -> bytes:
        body = self._json_body(request, False)
        name = self._model_name(body, False)
        model = self.model(name)
        if model is None:
            raise self._error(404, f"model '{name}' not found", False)
        self.models.remove(cast(dict[str, Any], model))
        self.loaded.pop(str(model["name"]), None)
        raise _Finish(200, b"")

    def _blob(self, request: Request, digest: str) -> bytes:
        hexdigest = replies.parse_digest(digest)
        if request.method == b"HEAD":
            raise _Finish(200 if hexdigest in self.blobs else 404, b"")
        if hexdigest is None:
            raise self._error(400, "invalid digest format", False)
        data = self._body(request)
        actual = sha256(data).hexdigest()
        if actual != hexdigest:
            raise self._error(
                400, f'digest mismatch, expected "{digest}", got "sha256:{actual}"', False
            )
        self.blobs[hexdigest] = data
        raise _Finish(201, b"")

    def _v1_entry(self, model: Mapping[str, Any]) -> dict[str, Any]:
        name = str(model["name"])
        modified = str(model.get("modified_at", "2025-01-01T00:00:00Z")).replace("Z", "+00:00")
        owner = name.split("/", 1)[0] if "/" in name else "library"
        return {
            "id": name,
            "object": "model",
            "created": int(datetime.fromisoformat(modified).timestamp()),
            "owned_by": owner,
        }

    def _v1_models(self, request: Request, openai: bool) -> bytes:
        data = [self._v1_entry(m) for m in self.models]
        raise _Finish(200, _dumps({"object": "list", "data": data}))

    def _v1_model(self, name: str) -> bytes:
        model = self.model(name)
        if model is None:
            raise self._error(404, f'model "{name}" not found', True)
        raise _Finish(200, _dumps(self._v1_entry(model)))

    def _v1_chat(self, request: Request, openai: bool) -> bytes | int:
        return self._openai_generate(request, chat=True)

    def _v1_completions(self, request: Request, openai: bool) -> bytes | int:
        return self._openai_generate(request, chat=False)

    def _standin_stats(self, request: Request, openai: bool) -> bytes:
        stats = {
            "requests": len(self.requests),
            "cancelled": self.cancelled,
            "crashed": self.crashed,
            "active": self.active,
        }
        raise _Finish(200, _dumps(stats))

    def _standin_reset(self, request: Request, openai: bool) -> bytes:
        self.reset()
        raise _Finish(200, _dumps({"status": "success"}))

    def _standin_requests(self, request: Request, openai: bool) -> bytes:
        listing = [
            {
                "method": r.method,
                "path": r.path,
                "headers": r.headers,
                "body": r.body.decode("utf-8", "replace"),
                "time": r.time,
            }
            for r in self.requests
        ]
        raise _Finish(200, _dumps(listing))


_Handler = Callable[[StandInRunner, Request, bool], bytes | int]

_ROUTES: dict[tuple[str, str], _Handler] = {
    ("GET", "/"): StandInRunner._root,
    ("GET", "/api/version"): StandInRunner._version_route,
    ("GET", "/api/tags"): StandInRunner._tags,
    ("GET", "/api/ps"): StandInRunner._ps,
    ("POST", "/api/show"): StandInRunner._show,
    ("POST", "/api/generate"): StandInRunner._generate_route,
    ("POST", "/api/chat"): StandInRunner._chat,
    ("POST", "/api/embed"): StandInRunner._embed,
    ("POST", "/api/embeddings"): StandInRunner._embeddings,
    ("POST", "/api/pull"): StandInRunner._pull,
    ("POST", "/api/push"): StandInRunner._push,
    ("POST", "/api/create"): StandInRunner._create,
    ("POST", "/api/copy"): StandInRunner._copy,
    ("DELETE", "/api/delete"): StandInRunner._delete,
    ("GET", "/v1/models"): StandInRunner._v1_models,
    ("POST", "/v1/chat/completions"): StandInRunner._v1_chat,
    ("POST", "/v1/completions"): StandInRunner._v1_completions,
    ("POST", "/v1/embeddings"): StandInRunner._v1_embeddings,
    ("GET", "/_standin/stats"): StandInRunner._standin_stats,
    ("GET", "/_standin/requests"): StandInRunner._standin_requests,
    ("POST", "/_standin/reset"): StandInRunner._standin_reset,
}


class _StandInResource(Resource):
    isLeaf = True

    def __init__(self, runner: StandInRunner) -> None:
        super().__init__()
        self.runner = runner

    def render(self, request: Request) -> bytes | int:
        return self.runner.render(request)


def listen(
    runner: StandInRunner, reactor: _TCPReactor, port: int = 0, interface: str = "127.0.0.1"
) -> IListeningPort:
    """Serve ``runner`` on TCP. Like Ollama, the Host check only applies on a
    loopback address; the bound host is added to the allowed ones."""
    if runner.allowed_hosts is not None:
        if interface in ("", "0.0.0.0", "::"):  # noqa: S104
            runner.allowed_hosts = None
        else:
            runner.allowed_hosts.add(interface.lower())
    return reactor.listenTCP(port, runner.site(), interface=interface)


def stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
