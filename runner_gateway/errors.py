"""Error responses in the shapes clients understand.

Ollama clients print ``{"error": "..."}``; OpenAI clients print
``{"error": {"message", "type", "code"}}``. Which one a request gets depends
on the runner-relative path (``/v1/...`` is OpenAI's).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from twisted.web.server import Request

from runner_gateway.context import context_of

__all__ = ["error_body", "send_error"]

# OpenAI's error "type" for each status the gateway produces.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_exceeded",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
}


def error_body(
    status: int,
    message: str,
    openai: bool,
    code: str | None = None,
    error_type: str | None = None,
) -> bytes:
    if openai:
        payload: object = {
            "error": {
                "message": message,
                "type": error_type or _OPENAI_TYPES.get(status, "api_error"),
                "code": code,
            }
        }
    else:
        payload = {"error": message}
    return json.dumps(payload).encode() + b"\n"


def send_error(
    request: Request,
    status: int,
    message: str,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
    error_type: str | None = None,
) -> bytes:
    """Set status and headers for an error and return the body for render();
    ``error_type`` replaces the OpenAI ``type`` the status implies."""
    try:
        openai = context_of(request).openai_style
    except LookupError:
        openai = False
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json; charset=utf-8"])
    for name, value in (headers or {}).items():
        request.responseHeaders.setRawHeaders(name.encode(), [value.encode()])
    body = error_body(status, message, openai, code, error_type)
    if request.method == b"HEAD":
        request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
        return b""
    return body
