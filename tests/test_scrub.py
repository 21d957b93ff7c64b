"""logs.scrub: no token in a log line, however it is encoded (issue 16, finding 4)."""

from __future__ import annotations

import base64
import time
from urllib.parse import quote

import pytest

from runner_gateway.logs import scrub
from runner_gateway.paseto import V4SecretKey, issue, rfc3339


@pytest.fixture(scope="module")
def token() -> str:
    now = time.time()
    claims = {"sub": "alice", "iat": rfc3339(now), "exp": rfc3339(now + 3600)}
    return issue(V4SecretKey.generate(), claims)


def _forms(token: str) -> dict[str, str]:
    encoded_all = "".join(f"%{b:02X}" for b in token.encode())
    return {
        "literal": token,
        "dots encoded": token.replace(".", "%2E"),
        "dots encoded, lower case": token.replace(".", "%2e"),
        "every character encoded": encoded_all,
        "every character encoded, lower case": encoded_all.lower(),
        "encoded twice": quote(quote(token, safe=""), safe="").replace(".", "%252E"),
        "'-' and '_' encoded": token.replace("-", "%2D").replace("_", "%5F"),
        "base64": base64.b64encode(f"user:{token}".encode()).decode(),
        "base64, one byte in": base64.b64encode(f"u{token}".encode()).decode(),
        "base64, two bytes in": base64.urlsafe_b64encode(f"uu{token}".encode()).decode(),
        "base64url, no padding": base64.urlsafe_b64encode(token.encode()).decode().rstrip("="),
    }


@pytest.mark.parametrize(
    "form",
    list(_forms("v4.public.x").keys()),
)
@pytest.mark.parametrize(
    "template",
    [
        "request r1: GET /api/tags?q={} headers {{}}",
        '{{"message": "GET /x?t={}&y=1"}}',
        "Authorization: Basic {}",
        "cookie {} end",
    ],
)
def test_no_form_of_a_token_survives(token: str, form: str, template: str) -> None:
    text = template.format(_forms(token)[form])
    out = scrub(text)
    assert "[redacted]" in out
    payload = token.split(".")[2]
    # Neither the token nor any 12 characters of its body, in any of the forms.
    for shown in _forms(token).values():
        assert shown not in out
    assert payload[:12] not in out and payload[-12:] not in out


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        ("GET /x?access_token=abc123&b=2", "GET /x?access_token=[redacted]&b=2"),
        ("GET /x?ACCESS_TOKEN=abc123", "GET /x?ACCESS_TOKEN=[redacted]"),
        ("GET /x?a=1&token=zz9 next", "GET /x?a=1&token=[redacted] next"),
        ("GET /x?api_key=k1&api-key=k2", "GET /x?api_key=[redacted]&api-key=[redacted]"),
        ("GET /x?access_token%3Dabc123", "GET /x?access_token%3D[redacted]"),
        ("GET /x?password=hunter2", "GET /x?password=[redacted]"),
        ("Authorization: Bearer%20abcdefgh12345678", "Authorization: [redacted]"),
        ("Authorization: bearer+abcdefgh12345678", "Authorization: [redacted]"),
    ],
)
def test_credential_parameters(text: str, scrubbed: str) -> None:
    assert scrub(text) == scrubbed


@pytest.mark.parametrize(
    "text",
    [
        "GET /api/tags 200 17B 0.5ms runner=r0 sub=alice id=r client=127.0.0.1",
        '{"path": "/v1/models/llama3%3A8b", "prompt_tokens": 3, "completion_tokens": 9}',
        "GET /x%20y 404",
        "monkey=banana tokens=3",
    ],
)
def test_ordinary_lines_are_left_alone(text: str) -> None:
    assert scrub(text) == text
