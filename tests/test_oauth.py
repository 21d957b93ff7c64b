"""RFC 9728 resource metadata and RFC 7662 introspection (oauth.py), on the real gateway."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest

from runner_gateway.paseto import build_verifier, parse_rfc3339
from runner_gateway.settings import SCOPES, load_settings
from tests.conftest import GatewaySettings, StandIn
from tests.gateway_process import GatewayProcess, start_gateway
from tests.test_revocation_e2e import tool

pytestmark = pytest.mark.timeout(120)

PUBLIC = "https://gw.example.com:8443"


def call(
    gw: GatewayProcess,
    method: str,
    path: str,
    token: str | None = None,
    body: bytes | None = None,
    content_type: str = "application/x-www-form-urlencoded",
) -> tuple[int, dict[str, str], Any]:
    parts = urlsplit(gw.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        headers["Content-Type"] = content_type
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    found = {k.lower(): v for k, v in response.getheaders()}
    return response.status, found, json.loads(raw) if raw else None


def introspect(gw: GatewayProcess, caller: str | None, token: str) -> tuple[int, Any]:
    status, _, answer = call(
        gw, "POST", "/oauth/introspect", caller, urlencode({"token": token}).encode()
    )
    return status, answer


@pytest.fixture
def gateway(make_settings: Callable[[str], GatewaySettings], standin: StandIn) -> Any:
    settings = make_settings(
        "  revocationPath: revoked.jsonl\n"
        f"runners:\n  - name: ollama\n    host: {standin.address}\n    path: /\n"
        f"  - name: corp\n    host: {standin.address}\n    path: /corp\n"
        f"server:\n  address: 127.0.0.1:0\n  workers: 1\n  publicUrl: {PUBLIC}/\n"
    )
    with start_gateway(settings.directory) as gw:
        yield settings.directory, gw


def test_protected_resource_metadata_and_challenges(gateway: Any) -> None:
    _, gw = gateway
    status, headers, document = call(gw, "GET", "/.well-known/oauth-protected-resource")
    assert status == 200 and headers["content-type"] == "application/json"
    assert document == {
        "resource": PUBLIC,
        "bearer_methods_supported": ["header"],
        "scopes_supported": list(SCOPES),
        "resource_name": "runner-gateway: ollama",
    }
    status, _, document = call(gw, "GET", "/.well-known/oauth-protected-resource/corp")
    assert status == 200
    assert document["resource"] == f"{PUBLIC}/corp"
    assert document["resource_name"] == "runner-gateway: corp"
    # Every 401 names its runner's document.
    status, headers, _ = call(gw, "GET", "/corp/api/tags")
    assert status == 401
    assert headers["www-authenticate"] == (
        f'Bearer realm="runner-gateway", '
        f'resource_metadata="{PUBLIC}/.well-known/oauth-protected-resource/corp"'
    )
    status, headers, _ = call(gw, "GET", "/api/tags", token="v4.public.bad")
    assert status == 401
    assert headers["www-authenticate"].endswith(
        f', resource_metadata="{PUBLIC}/.well-known/oauth-protected-resource"'
    )
    assert 'error="invalid_token"' in headers["www-authenticate"]


def test_introspection(gateway: Any) -> None:
    directory, gw = gateway
    caller = tool(directory, "-action=public", "-sub=svc", "-scope=introspect")
    admin = tool(directory, "-action=public", "-sub=root", "-scope=admin")
    subject = tool(
        directory, "-action=public", "-sub=alice", "-scope=inference", "-models=llama*", "-kid"
    )
    status, answer = introspect(gw, caller, subject)
    assert status == 200
    claims = json.loads(tool(directory, "-action=validate", f"-token={subject}"))
    (kid,) = build_verifier(load_settings(directory, environ={}).paseto).key_ids
    assert answer == {
        "active": True,
        "token_type": "Bearer",
        "sub": "alice",
        "scope": "inference",
        "models": ["llama*"],
        "jti": claims["jti"],
        "exp": int(parse_rfc3339(claims["exp"])),
        "iat": int(parse_rfc3339(claims["iat"])),
        "kid": kid,
    }
    # The caller needs introspect itself: admin does not imply it.
    for who in (admin, subject):
        status, headers, _ = call(
            gw, "POST", "/oauth/introspect", who, urlencode({"token": caller}).encode()
        )
        assert status == 403
        assert 'error="insufficient_scope"' in headers["www-authenticate"]
        assert 'scope="introspect"' in headers["www-authenticate"]
    status, headers, _ = call(gw, "POST", "/oauth/introspect", None, b"token=x")
    assert status == 401
    # Invalid, expired or revoked: inactive, nothing more.
    assert introspect(gw, caller, "v4.public.nonsense") == (200, {"active": False})
    assert introspect(gw, caller, subject[:-4] + "AAAA") == (200, {"active": False})
    tool(directory, "-action=revoke", f"-jti={claims['jti']}")
    assert _eventually(lambda: introspect(gw, caller, subject) == (200, {"active": False}))

    # Well-formed requests only, and a bounded body.
    assert call(gw, "GET", "/oauth/introspect", caller)[0] == 405
    assert call(gw, "POST", "/oauth/introspect", caller, b"token=a&token=b")[0] == 400
    assert call(gw, "POST", "/oauth/introspect", caller, b"tok")[0] == 400
    assert call(gw, "POST", "/oauth/introspect", caller, b"{}", "application/json")[0] == 415
    big = b"token=" + b"A" * 20_000
    assert call(gw, "POST", "/oauth/introspect", caller, big)[0] == 413


def _eventually(test: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not test():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
