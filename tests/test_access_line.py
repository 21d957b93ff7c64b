"""The text access line says what the JSON one does (ttfb, model, tokens, aborted)."""

from __future__ import annotations

import json
from typing import Any

from runner_gateway.logs import ACCESS_NAMESPACE, access_line

FIELDS: dict[str, Any] = {
    "request_id": "r-1",
    "client": "203.0.113.9",
    "method": "POST",
    "path": "/api/chat",
    "runner": "ollama",
    "status": 200,
    "bytes": 512,
    "duration_ms": 812.4,
    "ttfb_ms": 40.25,
    "sub": "alice",
    "model": "llama3.2:1b",
    "prompt_tokens": 12,
    "completion_tokens": 40,
    "aborted": True,
    "upstream_error": "reset",
}


def _text(fields: dict[str, Any]) -> str:
    line = access_line("text", 0.0, ACCESS_NAMESPACE, fields)
    return line.split(f"{ACCESS_NAMESPACE}: ", 1)[1]


def test_text_line_carries_every_json_field() -> None:
    assert _text(FIELDS) == (
        "POST /api/chat 200 512B 812.4ms ttfb=40.25ms runner=ollama sub=alice"
        " model=llama3.2:1b tokens=12/40 id=r-1 client=203.0.113.9 upstream_error=reset aborted"
    )
    record = json.loads(access_line("json", 0.0, ACCESS_NAMESPACE, FIELDS))
    text = _text(FIELDS)
    for key in FIELDS:
        if key in ("method", "path", "status", "aborted"):
            continue
        assert str(record[key]) in text, key


def test_text_line_leaves_out_what_is_unknown() -> None:
    fields = {**FIELDS, "ttfb_ms": None, "model": None, "prompt_tokens": None, "aborted": False}
    del fields["upstream_error"]
    fields["completion_tokens"] = None
    assert _text(fields) == (
        "POST /api/chat 200 512B 812.4ms runner=ollama sub=alice id=r-1 client=203.0.113.9"
    )
