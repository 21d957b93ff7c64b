"""Token usage parsing: every format, split at every byte boundary, cut short, garbage."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner_gateway import usage
from runner_gateway.usage import (
    JsonUsageParser,
    NdjsonUsageParser,
    SseUsageParser,
    UsageChunkFilter,
    UsageParser,
    ask_for_usage,
    parser_for,
)

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
JSON = "application/json; charset=utf-8"


def ndjson(*objs: object) -> bytes:
    return b"".join(json.dumps(o, ensure_ascii=False).encode() + b"\n" for o in objs)


def sse(*objs: object, eol: bytes = b"\n") -> bytes:
    out = b""
    for o in objs:
        data = o if isinstance(o, str) else json.dumps(o, ensure_ascii=False)
        out += b"data: " + data.encode() + eol + eol
    return out


# Text with 2-, 3- and 4-byte UTF-8 characters, so splits land inside them.
WORDS = ["Bon", "jour ", "é", "t€", "é 🦙", "!"]

OLLAMA_GENERATE = ndjson(
    *[{"model": "llama3.2", "response": w, "done": False} for w in WORDS],
    {
        "model": "llama3.2",
        "response": "",
        "done": True,
        "done_reason": "stop",
        "context": [1, 2, 3, 4],
        "total_duration": 123,
        "prompt_eval_count": 26,
        "eval_count": 290,
    },
)
OLLAMA_CHAT = ndjson(
    *[
        {"model": "qwen3", "message": {"role": "assistant", "content": w}, "done": False}
        for w in WORDS
    ],
    {
        "model": "qwen3",
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "prompt_eval_count": 11,
        "eval_count": 6,
    },
)


def openai_chunk(content: str | None, usage_obj: object = None) -> dict[str, object]:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}}]
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-mini",
        "choices": choices,
        "usage": usage_obj,
    }


OPENAI_SSE = sse(
    {
        "id": "chatcmpl-1",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
        "usage": None,
    },
    *[openai_chunk(w) for w in WORDS],
    openai_chunk(None, {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29}),
    "[DONE]",
    eol=b"\r\n",
)
RESPONSES_SSE = (
    b"event: response.created\n"
    + b'data: {"type":"response.created","response":{"model":"gpt-4.1","usage":null}}\n\n'
    + b"".join(
        b"event: response.output_text.delta\ndata: "
        + json.dumps({"type": "response.output_text.delta", "delta": w}).encode()
        + b"\n\n"
        for w in WORDS
    )
    + b"event: response.completed\n"
    + b'data: {"type":"response.completed","response":{"model":"gpt-4.1",'
    + b'"usage":{"input_tokens":36,"output_tokens":87,"total_tokens":123}}}\n\n'
)

ANTHROPIC_SSE = b"".join(
    f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
    for kind, data in [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {"model": "claude-x", "usage": {"input_tokens": 25, "output_tokens": 1}},
            },
        ),
        *[
            ("content_block_delta", {"type": "content_block_delta", "delta": {"text": w}})
            for w in WORDS
        ],
        ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 15}}),
        ("message_stop", {"type": "message_stop"}),
    ]
)

# (content type, path, body, expected (prompt, completion, model, reported))
FIXTURES = {
    "ollama-generate": (NDJSON, b"/api/generate", OLLAMA_GENERATE, (26, 290, "llama3.2", True)),
    "ollama-chat": (NDJSON, b"/api/chat", OLLAMA_CHAT, (11, 6, "qwen3", True)),
    "ollama-generate-json": (
        JSON,
        b"/api/generate",
        json.dumps(
            {
                "model": "llama3.2",
                "response": "Le ciel est bleu 🦙",
                "done": True,
                "prompt_eval_count": 7,
                "eval_count": 42,
            },
            ensure_ascii=False,
        ).encode(),
        (7, 42, "llama3.2", True),
    ),
    "ollama-embed-json": (
        JSON,
        b"/api/embed",
        b'{"model":"all-minilm","embeddings":[[0.1,-0.2],[0.3,0.4]],'
        b'"total_duration":14143917,"prompt_eval_count":8}',
        (8, 0, "all-minilm", True),
    ),
    "openai-chat-json": (
        "application/json",
        b"/v1/chat/completions",
        json.dumps(
            {
                "id": "chatcmpl-2",
                "model": "gpt-4o",
                "choices": [{"message": {"role": "assistant", "content": "Ça va ✓"}}],
                "usage": {
                    "prompt_tokens": 13,
                    "completion_tokens": 5,
                    "total_tokens": 18,
                    "prompt_tokens_details": {"cached_tokens": 0},
                },
            },
            ensure_ascii=False,
        ).encode(),
        (13, 5, "gpt-4o", True),
    ),
    "openai-embeddings-json": (
        "application/json",
        b"/v1/embeddings",
        b'{"object":"list","data":[{"embedding":[0.5]}],"model":"text-embedding-3-small",'
        b'"usage":{"prompt_tokens":8,"total_tokens":8}}',
        (8, 0, "text-embedding-3-small", True),
    ),
    "openai-sse": (SSE, b"/v1/chat/completions", OPENAI_SSE, (19, 10, "gpt-4o-mini", True)),
    "openai-sse-no-usage": (
        "text/event-stream; charset=utf-8",
        b"/v1/chat/completions",
        sse(*[openai_chunk(w) for w in WORDS], "[DONE]"),
        (0, len(WORDS), "gpt-4o-mini", False),
    ),
    "openai-sse-bare-cr": (
        SSE,
        b"/v1/completions",
        sse(
            {"model": "m", "choices": [{"text": "a"}]},
            {"model": "m", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}},
            eol=b"\r",
        ),
        (3, 1, "m", True),
    ),
    "responses-sse": (SSE, b"/v1/responses", RESPONSES_SSE, (36, 87, "gpt-4.1", True)),
    "anthropic-sse": (SSE, b"/v1/messages", ANTHROPIC_SSE, (25, 15, "claude-x", True)),
    "anthropic-json": (
        "application/json",
        b"/v1/messages",
        b'{"type":"message","model":"claude-x","content":[{"type":"text","text":"hi"}],'
        b'"usage":{"input_tokens":9,"output_tokens":3}}',
        (9, 3, "claude-x", True),
    ),
}


def result(parser: UsageParser) -> tuple[int, int, str | None, bool]:
    return (parser.prompt_tokens, parser.completion_tokens, parser.model, parser.reported)


def parse(content_type: str, path: bytes, pieces: Iterable[bytes]) -> UsageParser:
    parser = parser_for(content_type, path)
    assert parser is not None
    for piece in pieces:
        parser.feed(piece)
    return parser


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_whole_body(name: str) -> None:
    content_type, path, body, expected = FIXTURES[name]
    assert result(parse(content_type, path, [body])) == expected


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_split_at_every_boundary(name: str) -> None:
    content_type, path, body, expected = FIXTURES[name]
    for i in range(len(body) + 1):
        got = result(parse(content_type, path, [body[:i], body[i:]]))
        assert got == expected, f"split at {i}: {body[max(0, i - 10) : i]!r}|{body[i : i + 10]!r}"


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_one_byte_pieces_read_as_they_come(name: str) -> None:
    # Reading the counts mid-stream (say, for a log) must not disturb the end result.
    content_type, path, body, expected = FIXTURES[name]
    parser = parser_for(content_type, path)
    assert parser is not None
    for i in range(len(body)):
        parser.feed(body[i : i + 1])
        if i % 7 == 0:
            result(parser)
    assert result(parser) == expected


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(FIXTURES)), cuts=st.lists(st.integers(0, 4000), max_size=12))
def test_random_chunking(name: str, cuts: list[int]) -> None:
    content_type, path, body, expected = FIXTURES[name]
    points = sorted({c % (len(body) + 1) for c in cuts})
    pieces = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    assert b"".join(pieces) == body
    assert result(parse(content_type, path, pieces)) == expected


def test_several_lines_in_one_chunk_and_a_line_over_several() -> None:
    lines = OLLAMA_CHAT.split(b"\n")
    chunks = [b"\n".join(lines[:4]) + b"\n" + lines[4][:5], lines[4][5:] + b"\n"]
    chunks += [line + b"\n" for line in lines[5:-1]]
    assert b"".join(chunks) == OLLAMA_CHAT
    assert result(parse(NDJSON, b"/api/chat", chunks)) == (11, 6, "qwen3", True)


# ------------------------------------------------------------- missing fields


def test_ollama_final_chunk_missing_counts_count_zero() -> None:
    body = ndjson(
        {"model": "m", "response": "x", "done": False},
        {"model": "m", "response": "", "done": True, "prompt_eval_count": 4},
    )
    assert result(parse(NDJSON, b"/api/generate", [body])) == (4, 0, "m", True)
    body = ndjson({"model": "m", "response": "", "done": True, "done_reason": "load"})
    assert result(parse(NDJSON, b"/api/generate", [body])) == (0, 0, "m", True)


def test_ill_typed_counts_are_zero() -> None:
    body = ndjson(
        {"done": True, "prompt_eval_count": "12", "eval_count": -3},
    )
    assert result(parse(NDJSON, b"/api/generate", [body]))[:2] == (0, 0)
    body = json.dumps({"usage": {"prompt_tokens": True, "completion_tokens": 2.5}}).encode()
    assert result(parse(JSON, b"/v1/chat/completions", [body]))[:2] == (0, 0)


def test_usage_null_chunks_then_usage() -> None:
    # include_usage: every chunk has "usage": null until the last one.
    body = sse(openai_chunk("a"), openai_chunk("b"), "[DONE]")
    assert result(parse(SSE, b"/v1/chat/completions", [body])) == (0, 2, "gpt-4o-mini", False)


def test_last_reported_usage_wins() -> None:
    # Servers with continuous usage stats repeat the cumulative usage.
    body = sse(
        openai_chunk("a", {"prompt_tokens": 5, "completion_tokens": 1}),
        openai_chunk("b", {"prompt_tokens": 5, "completion_tokens": 2}),
    )
    assert result(parse(SSE, b"/v1/chat/completions", [body]))[:2] == (5, 2)


# ------------------------------------------------------------------ cut short


def test_ndjson_cut_short_counts_the_chunks_seen() -> None:
    final_line_at = OLLAMA_GENERATE.rindex(b'{"model"')
    for cut in (final_line_at, final_line_at + 30, len(OLLAMA_GENERATE) - 2):
        parser = parse(NDJSON, b"/api/generate", [OLLAMA_GENERATE[:cut]])
        assert result(parser) == (0, len(WORDS), "llama3.2", False), cut
    # Half-way through the stream: as many chunks as complete lines.
    third = OLLAMA_GENERATE.index(b"\n", OLLAMA_GENERATE.index(b"\n") + 1) + 1
    assert parse(NDJSON, b"/api/generate", [OLLAMA_GENERATE[:third]]).completion_tokens == 2


def test_final_line_without_newline_counts() -> None:
    assert result(parse(NDJSON, b"/api/generate", [OLLAMA_GENERATE.rstrip(b"\n")])) == (
        26,
        290,
        "llama3.2",
        True,
    )


def test_sse_cut_short() -> None:
    # Cut inside the fourth word's event: three words seen.
    fourth = OPENAI_SSE.index('"content": "t€"'.encode())
    parser = parse(SSE, b"/v1/chat/completions", [OPENAI_SSE[:fourth]])
    # Three words, and the opening delta: every delta with a "content" key
    # counts, empty ones too (llama-cpp-python's tokens without text, issue 19).
    assert result(parser) == (0, 4, "gpt-4o-mini", False)
    usage_at = OPENAI_SSE.index(b'"usage": {')
    # The usage event arrived but not its blank line: it still counts.
    end_of_usage = OPENAI_SSE.index(b"\r\n", usage_at)
    for cut in (end_of_usage, end_of_usage + 2):
        parser = parse(SSE, b"/v1/chat/completions", [OPENAI_SSE[:cut]])
        assert result(parser) == (19, 10, "gpt-4o-mini", True)


def test_anthropic_stream_cut_short_keeps_the_prompt_side() -> None:
    cut = ANTHROPIC_SSE.index(b"event: message_delta")
    parser = parse(SSE, b"/v1/messages", [ANTHROPIC_SSE[:cut]])
    assert result(parser) == (25, len(WORDS), "claude-x", False)


def test_json_body_cut_short() -> None:
    _, path, body, _ = FIXTURES["openai-chat-json"]
    parser = parse(JSON, path, [body[: len(body) // 2]])
    assert result(parser) == (0, 0, None, False)


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_sse_multiline_data_and_other_fields(eol: bytes) -> None:
    # A CR at a chunk's end followed by LF in the next is one line end, not
    # an empty line that would cut the event in two.
    lines = [
        b": comment",
        b"retry: 1000",
        b"id: 7",
        b"event: message",
        b'data: {"model": "m",',
        b'data:  "choices": [],',
        b'data: "usage": {"prompt_tokens": 2, "completion_tokens": 3}}',
        b"",
        b"data: [DONE]",
        b"",
    ]
    body = b"".join(line + eol for line in lines)
    for i in range(len(body) + 1):
        got = result(parse(SSE, b"/v1/chat/completions", [body[:i], body[i:]]))
        assert got == (2, 3, "m", True), i


# -------------------------------------------------------------------- garbage


GARBAGE = [
    b"\xff\xfe\x00garbage\n\n\x80\x81\n",
    b'data: {not json}\n\ndata: [1,2,3]\n\ndata: null\n\ndata: "done"\n\n',
    b'{"done": true, "prompt_eval_count": 1' + b"\n",
    b"[" * 100_000 + b"\n",  # deep nesting: RecursionError inside json
    b'{"done": true, "model": ' + b"[" * 100_000 + b"\n",
    b"\n\n\r\r\n\r\n",
    b"",
]


@pytest.mark.parametrize("content_type", [NDJSON, SSE, JSON])
@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_never_raises(content_type: str, garbage: bytes) -> None:
    parser = parse(content_type, b"/api/chat", [garbage, garbage[:7], garbage[7:]])
    prompt, completion, model, _ = result(parser)
    assert (prompt, model) == (0, None)
    assert completion == 0


def test_garbage_then_a_good_stream() -> None:
    body = b"\xff\xfenot json\n" + OLLAMA_CHAT
    assert result(parse(NDJSON, b"/api/chat", [body])) == (11, 6, "qwen3", True)


def test_internal_error_disables_the_parser_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = NdjsonUsageParser()

    def boom(*args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(parser, "_complete", boom)
    parser.feed(OLLAMA_CHAT)  # does not raise
    parser.feed(OLLAMA_CHAT)
    assert parser.prompt_tokens == 0


# ----------------------------------------------------------- bounded memory


def test_overlong_ndjson_line_is_salvaged_and_memory_bounded() -> None:
    # /api/generate's final chunk carries the whole context; past the line
    # cap only the head and tail survive, and the counts are in the tail.
    context = list(range(300_000))  # about 2 MiB of JSON
    final = {
        "model": "llama3.2",
        "response": "",
        "done": True,
        "context": context,
        "prompt_eval_count": 150_000,
        "eval_count": 150_000,
    }
    body = ndjson({"model": "llama3.2", "response": "a", "done": False}, final)
    assert len(body) > 2 * usage.LINE_CAP
    parser = NdjsonUsageParser()
    peak = 0
    for i in range(0, len(body), 65_536):
        parser.feed(body[i : i + 65_536])
        line = parser._line
        peak = max(peak, len(line.data) + len(line.tail))
    assert result(parser) == (150_000, 150_000, "llama3.2", True)
    assert peak <= usage.LINE_CAP + 65_536
    # One huge chunk, no newline handling across chunks.
    assert result(parse(NDJSON, b"/api/generate", [body])) == (150_000, 150_000, "llama3.2", True)


def test_overlong_json_body_is_salvaged() -> None:
    vectors = [[0.123456789] * 1024 for _ in range(400)]  # about 5 MiB
    body = json.dumps(
        {"model": "nomic-embed-text", "embeddings": vectors, "prompt_eval_count": 1200}
    ).encode()
    assert len(body) > usage.BODY_CAP
    parser = JsonUsageParser()
    for i in range(0, len(body), 16_384):
        parser.feed(body[i : i + 16_384])
    assert len(parser._body.data) + len(parser._body.tail) <= 4 * 65_536
    assert result(parser) == (1200, 0, "nomic-embed-text", True)


def test_overlong_line_without_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(usage, "LINE_CAP", 128)
    monkeypatch.setattr(usage, "_WINDOW", 32)
    body = b'data: {"choices": [{"delta": {"content": "' + b"x" * 400 + b'"}}]}\n\n'
    body += sse({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
    for i in range(len(body) + 1):
        parser = parse(SSE, b"/v1/chat/completions", [body[:i], body[i:]])
        assert result(parser)[:2] == (1, 2), i
    # The tail of an overlong line: only the last window is kept, per line.
    parser = NdjsonUsageParser()
    for _ in range(1000):
        parser.feed(b"y" * 50)
    assert len(parser._line.data) <= 32
    assert len(parser._line.tail) <= 2 * 32 + 50


# ------------------------------------------------------------------ selection


@pytest.mark.parametrize(
    ("content_type", "path", "kind"),
    [
        ("application/x-ndjson", b"/api/generate", NdjsonUsageParser),
        ("Application/X-NDJSON; charset=utf-8", b"/api/pull", NdjsonUsageParser),
        ("text/event-stream", b"/v1/chat/completions", SseUsageParser),
        ("text/event-stream;charset=utf-8", b"/anything", SseUsageParser),
        ("application/json", b"/api/chat", JsonUsageParser),
        ("application/json; charset=utf-8", b"/v1/chat/completions?x=1", JsonUsageParser),
        ("application/json", b"/v1/embeddings/", JsonUsageParser),
        ("application/json", b"/api/tags", None),
        ("application/json", b"/v1/models", None),
        ("text/plain", b"/api/generate", None),
        (None, b"/api/generate", None),
        ("", b"/api/generate", None),
    ],
)
def test_parser_for(content_type: str | None, path: bytes, kind: type | None) -> None:
    parser = parser_for(content_type, path)
    if kind is None:
        assert parser is None
    else:
        assert isinstance(parser, kind)
        assert parser is not None
        assert result(parser) == (0, 0, None, False)


def test_pull_progress_is_not_counted() -> None:
    body = ndjson({"status": "pulling manifest"}, {"status": "success"})
    assert result(parse(NDJSON, b"/api/pull", [body])) == (0, 0, None, False)


@pytest.mark.parametrize(
    ("parser", "chunks", "ended"),
    [
        (SseUsageParser, [b'data: {"choices":[]}\n\n', b"data: [DONE]\n\n"], True),
        (SseUsageParser, [b"data: [DO", b"NE]\r\n"], True),  # split, CRLF
        (SseUsageParser, [b'data: {"choices":[]}\n\n', b"data: [DONE]"], False),  # line not whole
        (SseUsageParser, [b'data: {"content":"[DONE]"}\n\n'], False),
        (NdjsonUsageParser, [b'{"done":false,"response":"a"}\n', b'{"done":true}\n'], True),
        (NdjsonUsageParser, [b'{"done":false,"response":"a"}\n'], False),
    ],
)
def test_stream_end_is_seen(parser: type[Any], chunks: list[bytes], ended: bool) -> None:
    p = parser()
    assert not p.ended
    for chunk in chunks:
        p.feed(chunk)
    assert p.ended is ended


# ------------------------------------------------- llama-cpp-python, asking for usage

# llama-cpp-python's server: one chunk per token; the role alone first,
# {"content": ""} for tokens without text of their own, {} with the finish
# reason last; no usage, whatever stream_options says. 16 tokens.
_LLAMA_CPP_TOKENS = ["Hello", "", " there", "!", "", " How", " can", " I", "", " help"]
_LLAMA_CPP_TOKENS += [" you", " today", "?", "", " 🦙", ""]
LLAMA_CPP_SSE = sse(
    {"model": "m", "choices": [{"index": 0, "delta": {"role": "assistant"}}]},
    *[
        {"model": "m", "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]}
        for t in _LLAMA_CPP_TOKENS
    ],
    {"model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    "[DONE]",
    eol=b"\r\n",
)


def test_llama_cpp_python_estimate_counts_every_content_delta() -> None:
    assert len(_LLAMA_CPP_TOKENS) == 16
    parser = parse(SSE, b"/v1/chat/completions", [LLAMA_CPP_SSE])
    assert result(parser) == (0, 16, "m", False)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"model": "m", "stream": true}',
            b'{"stream_options":{"include_usage":true},"model": "m", "stream": true}',
        ),
        (
            b' {"stream":true,"stream_options":{"include_usage":false,"x":1}}',
            b'{"stream":true,"stream_options":{"include_usage":true,"x":1}}',
        ),
        (
            b'{"stream":true,"stream_options":null}',
            b'{"stream":true,"stream_options":{"include_usage":true}}',
        ),
        (b'{"stream":true,"stream_options":{"include_usage":true}}', None),
        (b'{"stream":false}', None),
        (b'{"model":"m"}', None),
        (b'{"stream":"true"}', None),
        (b'{"stream":true,"stream_options":"yes"}', None),
        (b"not json", None),
        (b'["stream", true]', None),
    ],
)
def test_ask_for_usage(body: bytes, expected: bytes | None) -> None:
    asked = ask_for_usage(b"/v1/chat/completions", body)
    assert asked == expected
    if asked is not None:
        assert json.loads(asked)["stream_options"]["include_usage"] is True
        assert {k: v for k, v in json.loads(asked).items() if k != "stream_options"} == {
            k: v for k, v in json.loads(body).items() if k != "stream_options"
        }


def test_ask_for_usage_only_on_chat_and_completions() -> None:
    body = b'{"stream": true}'
    assert ask_for_usage(b"/v1/completions?x=1", body) is not None
    assert ask_for_usage(b"/v1/chat/completions/", body) is not None
    assert ask_for_usage(b"/v1/responses", body) is None
    assert ask_for_usage(b"/api/chat", body) is None


def _filtered(pieces: list[bytes]) -> bytes:
    f = UsageChunkFilter()
    return b"".join(f.feed(p) for p in pieces) + f.flush()


@settings(max_examples=80, deadline=None)
@given(cuts=st.lists(st.integers(0, 4000), max_size=12), eol=st.sampled_from([b"\n", b"\r\n"]))
def test_usage_chunk_filter_drops_only_the_usage_chunk(cuts: list[int], eol: bytes) -> None:
    usage_chunk = {"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    words = [openai_chunk(w) for w in WORDS]
    body = sse(*words, usage_chunk, "[DONE]", eol=eol)
    wanted = sse(*words, "[DONE]", eol=eol)
    points = sorted({c % (len(body) + 1) for c in cuts})
    pieces = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    assert _filtered(pieces) == wanted
    # A chunk with choices and usage (OpenAI's final usage on some servers) stays.
    both = {"id": "c", "choices": [{"delta": {}}], "usage": {"prompt_tokens": 1}}
    assert _filtered([sse(both, eol=eol)]) == sse(both, eol=eol)


def test_usage_chunk_filter_passes_whole_events_at_once_and_keeps_a_cut_end() -> None:
    f = UsageChunkFilter()
    event = sse(openai_chunk("a"))
    assert f.feed(event) == event  # nothing held back
    assert f.feed(b'data: {"partial') == b""
    assert f.flush() == b'data: {"partial'
