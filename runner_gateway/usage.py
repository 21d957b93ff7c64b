"""Token usage read from runner responses as they stream past.

Pure logic, no Twisted. The proxy hands every body chunk to ``feed()`` right
after writing it on to the client, so parsing never delays a byte; chunks may
split a JSON line, a UTF-8 character or an SSE event anywhere.

Formats:

* Ollama NDJSON (``application/x-ndjson``): the final line, ``"done": true``,
  carries ``prompt_eval_count`` and ``eval_count`` (a missing field counts 0).
* JSON bodies (``application/json``) on the inference paths: Ollama's
  ``prompt_eval_count`` / ``eval_count`` or OpenAI's ``usage`` object
  (``prompt_tokens`` / ``completion_tokens``, or the Responses API's
  ``input_tokens`` / ``output_tokens``).
* OpenAI SSE (``text/event-stream``): ``data: {...}`` events; the usage chunk
  (``stream_options.include_usage``) or a Responses API ``response.completed``
  event carries the usage; ``data: [DONE]`` ends the stream. Anthropic-style
  ``/v1/messages`` streams (``message_start``, ``message_delta``) work too.

Memory stays bounded: streams keep only the current incomplete line (capped,
1 MiB); JSON bodies are kept up to 4 MiB. Past a cap only a head and tail
window survive and the counts are picked out of those with a pattern match
(the counts sit at the end of Ollama's objects, ``model`` at the start).

There is no end-of-body signal: the counts are properties, worked out when
read (normally once, by the access log and metrics when the request ends),
including whatever is still pending (a last line without its newline, an SSE
event without its blank line, the JSON body).

A stream cut short counts what was seen: without the runner's final usage,
``completion_tokens`` is the number of streamed generation chunks (one token
each for Ollama and the usual OpenAI-compatible servers) and ``reported`` is
False.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import orjson

__all__ = [
    "BODY_CAP",
    "LINE_CAP",
    "JsonUsageParser",
    "NdjsonUsageParser",
    "SseUsageParser",
    "UsageChunkFilter",
    "UsageParser",
    "ask_for_usage",
    "may_ask_for_usage",
    "parser_for",
]

LINE_CAP = 1 << 20  # one NDJSON line or SSE event
BODY_CAP = 4 << 20  # one non-stream JSON body
_WINDOW = 64 << 10  # head and tail kept of anything over a cap
_MODEL_MAX = 256  # longest model name taken from a response

# Runner-relative paths whose JSON bodies carry usage; anything else (model
# listings, pulls, version) gets no parser, so it is never buffered.
_JSON_PATHS = frozenset(
    {
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
    }
)


class UsageParser(Protocol):
    """What the request context, access log and metrics read."""

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def completion_tokens(self) -> int: ...

    @property
    def model(self) -> str | None:
        """The model the runner named in its response, if any."""
        ...

    @property
    def reported(self) -> bool:
        """True when the runner reported the usage (else it is counted from chunks)."""
        ...

    @property
    def ended(self) -> bool:
        """True once the stream's last event was fed: SSE ``data: [DONE]``, or
        the NDJSON line with ``"done": true``. A client that leaves after it
        has the whole answer."""
        ...

    def feed(self, data: bytes) -> None: ...


def parser_for(content_type: str | None, path: bytes) -> UsageParser | None:
    """The parser for a response, or None when it cannot carry usage."""
    if not content_type:
        return None
    kind = _parser_kind(content_type, path)
    return kind() if kind is not None else None


@functools.lru_cache(maxsize=512)
def _parser_kind(content_type: str, path: bytes) -> type[_Base] | None:
    # Pure, and a runner answers with a few content types on a few paths.
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "text/event-stream":
        return SseUsageParser
    if media == "application/x-ndjson":
        return NdjsonUsageParser
    if media == "application/json":
        route = path.split(b"?", 1)[0].rstrip(b"/").decode("latin-1")
        if route in _JSON_PATHS:
            return JsonUsageParser
    return None


# ------------------------------------------------------------ what was found


class _Found(NamedTuple):
    """What one JSON object (line, event or body) says."""

    # A NamedTuple, not a frozen dataclass: built for every parsed object, and
    # a frozen dataclass's __init__ pays an object.__setattr__ call per field.

    prompt: int | None = None  # None: not in this object
    completion: int | None = None
    model: str | None = None
    final: bool = False  # carries the request's (completion) usage
    step: bool = False  # one streamed generation chunk


_NOTHING = _Found()


@dataclass(slots=True)
class _Tally:
    prompt: int = 0
    completion: int = 0
    model: str | None = None
    final: bool = False
    steps: int = 0

    def add(self, found: _Found) -> None:
        if self.model is None:
            self.model = found.model
        # The last report wins: servers that repeat usage send it cumulative.
        if found.prompt is not None:
            self.prompt = found.prompt
        if found.completion is not None:
            self.completion = found.completion
        if found.final:
            self.final = True
        elif found.step:
            self.steps += 1

    def copy(self) -> _Tally:
        return _Tally(self.prompt, self.completion, self.model, self.final, self.steps)

    @property
    def completion_tokens(self) -> int:
        return self.completion if self.final else self.steps


def _count(obj: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = obj.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _model_of(obj: dict[str, Any]) -> str | None:
    model = obj.get("model")
    if isinstance(model, str) and 0 < len(model) <= _MODEL_MAX:
        return model
    return None


def _is_step(obj: dict[str, Any]) -> bool:
    if obj.get("done") is False:  # Ollama
        return "response" in obj or "message" in obj
    choices = obj.get("choices")  # OpenAI chat and completions chunks
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if choice.get("text"):
                return True
            delta = choice.get("delta")
            # Every delta with a "content" key is a token, empty ones too:
            # llama-cpp-python's server sends one chunk per token, {"content": ""}
            # for tokens without text of their own (and reports no usage).
            if isinstance(delta, dict) and (
                "content" in delta
                or any(delta.get(k) for k in ("reasoning_content", "reasoning", "tool_calls"))
            ):
                return True
        return False
    kind = obj.get("type")  # Responses API and Anthropic Messages events
    return isinstance(kind, str) and (kind.endswith(".delta") or kind == "content_block_delta")


def _from_object(obj: object, whole_body: bool) -> _Found:
    """Read one decoded JSON value; ``whole_body`` for non-stream responses."""
    if not isinstance(obj, dict):
        return _NOTHING
    model = _model_of(obj)
    usage = obj.get("usage")
    response = obj.get("response")
    if not isinstance(usage, dict) and isinstance(response, dict):
        usage = response.get("usage")  # Responses API "response.completed" event
        model = model or _model_of(response)
    if isinstance(usage, dict):
        prompt = _count(usage, "prompt_tokens", "input_tokens")
        completion = _count(usage, "completion_tokens", "output_tokens")
        return _Found(prompt, completion, model, final=True)
    message = obj.get("message")
    if obj.get("type") == "message_start" and isinstance(message, dict):
        # Anthropic Messages: the prompt side comes first, the output count
        # in later "message_delta" events (handled as "usage" above).
        usage = message.get("usage")
        model = model or _model_of(message)
        prompt = _count(usage, "input_tokens") if isinstance(usage, dict) else None
        return _Found(prompt, None, model)
    ollama_counts = "prompt_eval_count" in obj or "eval_count" in obj
    if obj.get("done") is True or (whole_body and ollama_counts):
        # /api/embed has no "done"; a missing count is 0.
        prompt = _count(obj, "prompt_eval_count") or 0
        return _Found(prompt, _count(obj, "eval_count") or 0, model, final=True)
    return _Found(model=model, step=not whole_body and _is_step(obj))


def _decode(text: bytes | bytearray, whole_body: bool) -> _Found:
    # orjson: a sixth of json.loads's instructions on a small chat reply (callgrind).
    try:
        return _from_object(orjson.loads(text), whole_body)
    except ValueError:  # orjson.JSONDecodeError: bad JSON or UTF-8, nested too deeply
        return _NOTHING


# A key is only ever followed by ':' outside a string (quotes inside strings
# are escaped), so these find genuine keys in a truncated document.
_KEY = re.compile(
    rb'"(prompt_eval_count|eval_count|prompt_tokens|completion_tokens|input_tokens|output_tokens)"'
    rb"\s*:\s*(\d{1,18})"
)
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,%d})"' % _MODEL_MAX)
_PROMPT_KEYS = (b"prompt_eval_count", b"prompt_tokens", b"input_tokens")
_COMPLETION_KEYS = (b"eval_count", b"completion_tokens", b"output_tokens")
_EOL = re.compile(rb"\r\n|\r|\n")


def _salvage(head: bytes, tail: bytes) -> _Found:
    """Counts picked out of the ends of a document too large to parse."""
    counts: dict[bytes, int] = {}
    for part in (head, tail):  # tail last: later values win
        for match in _KEY.finditer(part):
            counts[match.group(1)] = int(match.group(2))
    model_match = _MODEL.search(head) or _MODEL.search(tail)
    model = model_match.group(1).decode("utf-8", "replace") if model_match else None
    if not counts:
        return _Found(model=model)
    prompt = next((counts[k] for k in _PROMPT_KEYS if k in counts), None)
    completion = next((counts[k] for k in _COMPLETION_KEYS if k in counts), None)
    return _Found(prompt, completion, model, final=True)


class _Bounded:
    """Bytes kept up to a cap; past it, only a head and a tail window."""

    __slots__ = ("cap", "data", "size", "tail")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data = bytearray()  # everything, or the head once over the cap
        self.tail = bytearray()
        self.size = 0

    @property
    def overflowed(self) -> bool:
        return self.size > self.cap

    def append(self, chunk: bytes | memoryview) -> None:
        if self.size + len(chunk) <= self.cap:
            self.data += chunk
            self.size += len(chunk)
            return
        if not self.overflowed:  # crossing the cap: keep the head, start the tail
            self.tail = self.data[-2 * _WINDOW :]
            if len(self.data) < _WINDOW:
                self.data += chunk[: _WINDOW - len(self.data)]
            else:
                del self.data[_WINDOW:]
        self.size += len(chunk)
        self.tail += chunk[-2 * _WINDOW :]
        if len(self.tail) > 2 * _WINDOW:  # trim in batches, not on every chunk
            del self.tail[:-_WINDOW]

    def clear(self) -> None:
        self.data.clear()
        self.tail.clear()
        self.size = 0

    def found(self, whole_body: bool) -> _Found:
        if self.overflowed:
            return _salvage(bytes(self.data), bytes(self.tail))
        return _decode(self.data, whole_body)


# ------------------------------------------------------------------ parsers


class _Base:
    """Shared: a committed tally plus what the pending bytes would add."""

    ended = False  # set on the instance by the stream parsers

    def __init__(self) -> None:
        self._tally = _Tally()
        self._failed = False
        self._cached: _Tally | None = None

    def feed(self, data: bytes) -> None:
        if self._failed or not data:
            return
        self._cached = None
        try:
            self._feed(data)
        except Exception:  # a parser bug must never break the response
            self._failed = True

    def _feed(self, data: bytes) -> None:
        raise NotImplementedError

    def _pending(self, tally: _Tally) -> None:
        """Add to ``tally`` (a copy) whatever the bytes not yet complete say."""

    def _result(self) -> _Tally:
        if self._cached is None:
            tally = self._tally.copy()
            try:
                self._pending(tally)
            except Exception:
                tally = self._tally.copy()
            self._cached = tally
        return self._cached

    @property
    def prompt_tokens(self) -> int:
        return self._result().prompt

    @property
    def completion_tokens(self) -> int:
        return self._result().completion_tokens

    @property
    def model(self) -> str | None:
        return self._result().model

    @property
    def reported(self) -> bool:
        return self._result().final


class _LineParser(_Base):
    """Splits a stream into lines; only the current incomplete line is kept."""

    # SSE also ends lines with a lone CR; NDJSON only with LF (CRLF is fine).
    _bare_cr = False

    def __init__(self) -> None:
        super().__init__()
        self._line = _Bounded(LINE_CAP)
        self._skip_lf = False  # the previous chunk ended in CR

    def _feed(self, data: bytes) -> None:
        if self._skip_lf:
            self._skip_lf = False
            if data.startswith(b"\n"):
                data = data[1:]
        if self._bare_cr and b"\r" in data:
            lines = _EOL.split(data)
            # The LF of a CRLF may open the next chunk.
            self._skip_lf = data.endswith(b"\r")
        else:
            lines = data.split(b"\n")  # a CR left before LF is JSON whitespace
        for i in range(len(lines) - 1):
            self._complete(lines[i])
        if lines[-1]:
            self._line.append(lines[-1])

    def _complete(self, piece: bytes) -> None:
        line = self._line
        if line.size:
            line.append(piece)
            self._line_found(line.data, line)
            line.clear()
        elif len(piece) > LINE_CAP:
            whole = _Bounded(LINE_CAP)
            whole.append(piece)
            self._line_found(whole.data, whole)
        else:
            self._line_found(piece, None)

    def _line_found(self, text: bytes | bytearray, over: _Bounded | None) -> None:
        """One complete line; ``over`` is set when the line went over the cap."""
        raise NotImplementedError


class NdjsonUsageParser(_LineParser):
    """Ollama's streamed responses: one JSON object per line."""

    def _line_found(self, text: bytes | bytearray, over: _Bounded | None) -> None:
        found = _line_usage(text, over)
        if found.final:  # "done": true
            self.ended = True
        self._tally.add(found)

    def _pending(self, tally: _Tally) -> None:
        # A last line without its newline still counts if it is whole JSON.
        if self._line.size:
            tally.add(_line_usage(self._line.data, self._line))


def _line_usage(text: bytes | bytearray, over: _Bounded | None) -> _Found:
    if over is not None and over.overflowed:
        return over.found(whole_body=False)
    raw = bytes(text)
    if b'"done"' not in raw:  # not a generation chunk (pull progress, ...)
        return _NOTHING
    return _decode(raw, whole_body=False)


class SseUsageParser(_LineParser):
    """OpenAI's streamed responses: server-sent events with JSON data."""

    _bare_cr = True

    def __init__(self) -> None:
        super().__init__()
        self._data: list[bytes] = []  # data lines of the event being read
        self._data_size = 0
        self._salvaged: _Found | None = None  # the event's data went over the cap

    def _line_found(self, text: bytes | bytearray, over: _Bounded | None) -> None:
        if over is not None and over.overflowed:
            if over.data.startswith(b"data"):
                self._salvaged = over.found(whole_body=False)
            return
        if not text:
            self._tally.add(_event_usage(self._data, self._salvaged))
            self._data, self._data_size, self._salvaged = [], 0, None
            return
        value = _data_value(bytes(text))
        if value is None or self._salvaged is not None:
            return
        if value.strip() == b"[DONE]":
            self.ended = True
        self._data.append(value)
        self._data_size += len(value) + 1
        if self._data_size > LINE_CAP:
            joined = b"\n".join(self._data)
            self._salvaged = _salvage(joined[:_WINDOW], joined[-_WINDOW:])
            self._data, self._data_size = [], 0

    def _pending(self, tally: _Tally) -> None:
        # An event cut short before its blank line (or its last line) still counts.
        data, salvaged, line = list(self._data), self._salvaged, self._line
        if line.size and salvaged is None:
            if line.overflowed:
                if line.data.startswith(b"data"):
                    salvaged = line.found(whole_body=False)
            else:
                value = _data_value(bytes(line.data))
                if value is not None:
                    data.append(value)
        tally.add(_event_usage(data, salvaged))


def _event_usage(data: list[bytes], salvaged: _Found | None) -> _Found:
    if salvaged is not None:
        return salvaged
    if not data:
        return _NOTHING
    joined = data[0] if len(data) == 1 else b"\n".join(data)
    if joined.strip() == b"[DONE]":
        return _NOTHING
    return _decode(joined, whole_body=False)


def _data_value(line: bytes) -> bytes | None:
    """The value of a ``data`` field line, else None (comments, other fields)."""
    name, colon, value = line.partition(b":")
    if name != b"data":
        return None
    if not colon:
        return b""
    return value[1:] if value.startswith(b" ") else value


class JsonUsageParser(_Base):
    """Non-stream JSON bodies: kept (up to a cap) and parsed when read."""

    def __init__(self) -> None:
        super().__init__()
        self._body = _Bounded(BODY_CAP)

    def _feed(self, data: bytes) -> None:
        self._body.append(data)

    def _pending(self, tally: _Tally) -> None:
        if self._body.size:
            tally.add(self._body.found(whole_body=True))


# ------------------------------------------------------- asking for usage

# OpenAI-compatible paths whose streams report usage only when asked
# (stream_options.include_usage); the Responses API always reports it.
_ASK_PATHS = frozenset({b"/v1/chat/completions", b"/v1/completions"})
_ASK = b'"stream_options":{"include_usage":true},'


def may_ask_for_usage(path: bytes) -> bool:
    """True for the paths :func:`ask_for_usage` may change a body on."""
    return path.split(b"?", 1)[0].rstrip(b"/") in _ASK_PATHS


def ask_for_usage(path: bytes, body: bytes) -> bytes | None:
    """The request body asking for usage, for a streaming OpenAI-style request
    that did not; None to send the body as it is."""
    if not may_ask_for_usage(path) or b'"stream"' not in body:
        return None
    try:
        request = orjson.loads(body)
    except ValueError:
        return None
    if not isinstance(request, dict) or request.get("stream") is not True:
        return None
    options = request.get("stream_options")
    if "stream_options" not in request:
        # The usual case: one key in front, the client's bytes untouched.
        start = body.index(b"{") + 1
        return body[:start] + _ASK + body[start:]
    if options is not None and not isinstance(options, dict):
        return None  # the runner's to refuse, as it would without the gateway
    if options is not None and options.get("include_usage") is True:
        return None
    request["stream_options"] = {**(options or {}), "include_usage": True}
    try:
        return orjson.dumps(request)
    except TypeError:  # an integer orjson cannot write (over 64 bits)
        return None


class UsageChunkFilter:
    """Takes the usage-only chunk (``"choices": []`` with ``usage``) out of an
    SSE stream, for a client that did not ask for it (the gateway did).

    Bytes go through event by event: an event is held until its blank line
    arrives (runners send whole events, so normally nothing waits); a final
    CR is held in case its LF follows in the next piece.
    """

    def __init__(self) -> None:
        self._event: list[bytes] = []  # lines of the event being read
        self._tail = b""  # an unterminated last line

    def feed(self, data: bytes) -> bytes:
        buffer = self._tail + data if self._tail else data
        lines = buffer.splitlines(keepends=True)
        self._tail = b""
        if lines and (not lines[-1].endswith((b"\n", b"\r")) or lines[-1].endswith(b"\r")):
            self._tail = lines.pop()
        out: list[bytes] = []
        event = self._event
        for line in lines:
            event.append(line)
            if line in (b"\n", b"\r\n", b"\r"):
                if not _usage_only(event):
                    out.extend(event)
                event.clear()
        return b"".join(out)

    def flush(self) -> bytes:
        """What is left when the stream ends (an event without its blank line)."""
        rest = b"".join(self._event) + self._tail
        self._event.clear()
        self._tail = b""
        return rest


def _usage_only(event: list[bytes]) -> bool:
    joined = b"".join(event)
    if b'"usage"' not in joined or b'"choices"' not in joined:
        return False
    data = [v for v in map(_data_value, (line.rstrip(b"\r\n") for line in event)) if v]
    try:
        chunk = orjson.loads(b"\n".join(data))
    except ValueError:
        return False
    return (
        isinstance(chunk, dict)
        and chunk.get("choices") == []
        and isinstance(chunk.get("usage"), dict)
    )
