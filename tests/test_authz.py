"""authz.py: AuthorizationResource in front of a fake proxy."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyRequest

from runner_gateway.authz import AuthorizationResource
from runner_gateway.context import RequestContext
from runner_gateway.settings import AuthorizationSettings, EndpointRule, RunnerSettings

OLLAMA = RunnerSettings(name="ollama", host="127.0.0.1", port=11434, path="/")
AUTHZ = AuthorizationSettings()


class FakeProxy(Resource):
    """Records what reached it; reads the body from where it was left."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, RequestContext]] = []

    def render(self, request: Any) -> bytes:
        body = request.content.read()
        ctx = request.gateway_context
        self.seen.append((body, ctx))
        return b"proxied"


def make_request(method: bytes, path: bytes, body: bytes, claims: Any) -> Any:
    request: Any = DummyRequest([])
    request.method = method
    request.uri = path
    request.content = io.BytesIO(body)
    request.gateway_context = RequestContext(
        request_id="r1", started=0.0, runner=OLLAMA, upstream_path=path, claims=claims
    )
    return request


def render(
    method: bytes,
    path: bytes,
    body: bytes = b"",
    claims: Any = None,
    runner: RunnerSettings = OLLAMA,
) -> tuple[Any, bytes, FakeProxy]:
    proxy = FakeProxy()
    resource = AuthorizationResource(proxy, runner, AUTHZ)
    request = make_request(method, path, body, {} if claims is None else claims)
    result = resource.render(request)
    assert isinstance(result, bytes)
    return request, result, proxy


def challenge(request: Any) -> str:
    values = request.responseHeaders.getRawHeaders(b"www-authenticate")
    assert values is not None and len(values) == 1
    return str(values[0].decode())


def test_allowed_request_reaches_proxy_with_body_intact() -> None:
    body = b'{"model": "tiny",  "messages": []}\n'
    claims = {"scope": "inference", "models": ["tiny*"]}
    request, result, proxy = render(b"POST", b"/api/chat", body, claims)
    assert result == b"proxied"
    assert request.responseCode is None
    [(forwarded, ctx)] = proxy.seen
    assert forwarded == body  # rewound after the policy read it, byte for byte
    assert ctx.route == "/api/chat" and ctx.model == "tiny"
    assert ctx.response_transform is None


def test_scope_refusal_ollama_shape() -> None:
    request, result, proxy = render(b"POST", b"/api/pull", b'{"model": "x"}', {})
    assert proxy.seen == []
    assert request.responseCode == 403
    assert challenge(request) == (
        'Bearer realm="runner-gateway", error="insufficient_scope", scope="models:manage", '
        "error_description=\"POST /api/pull needs the 'models:manage' scope\""
    )
    assert request.responseHeaders.getRawHeaders(b"content-type") == [
        b"application/json; charset=utf-8"
    ]
    assert json.loads(result) == {"error": "POST /api/pull needs the 'models:manage' scope"}
    assert request.gateway_context.route == "/api/pull"


def test_scope_refusal_openai_shape() -> None:
    request, result, _ = render(b"GET", b"/v1/models", b"", {"scope": "inference"})
    assert request.responseCode == 403
    assert 'scope="models:read"' in challenge(request)
    assert json.loads(result) == {
        "error": {
            "message": "GET /v1/models needs the 'models:read' scope",
            "type": "permission_error",
            "code": "insufficient_scope",
        }
    }


def test_model_refusal_says_what_never_the_token() -> None:
    claims = {"scope": "inference", "models": ["tiny*"], "sub": "alice", "jti": "s3cr3t"}
    request, result, proxy = render(
        b"POST", b"/v1/chat/completions", b'{"model": "secret"}', claims
    )
    assert proxy.seen == [] and request.responseCode == 403
    # The token has the scope: no scope= to chase, the description says why.
    assert challenge(request) == (
        'Bearer realm="runner-gateway", error="insufficient_scope", '
        "error_description=\"this token may not use model 'secret'\""
    )
    assert json.loads(result)["error"]["code"] == "model_not_allowed"
    message = json.loads(result)["error"]["message"]
    assert message == 'this token may not use model "secret"'
    for token_content in ("tiny", "alice", "s3cr3t"):
        assert token_content not in result.decode()
    assert request.gateway_context.model is None


def test_runner_refusal() -> None:
    request, result, proxy = render(b"GET", b"/api/tags", b"", {"runners": ["gpu2"]})
    assert proxy.seen == [] and request.responseCode == 403
    assert json.loads(result) == {"error": 'this token may not use runner "ollama"'}


def test_bad_body_is_400_without_challenge() -> None:
    request, result, proxy = render(b"POST", b"/api/chat", b'{"model":"a","model":"b"}', {})
    assert proxy.seen == [] and request.responseCode == 400
    assert request.responseHeaders.getRawHeaders(b"www-authenticate") is None
    assert "duplicate key" in json.loads(result)["error"]
    request, result, _ = render(b"POST", b"/v1/embeddings", b"{", {})
    assert request.responseCode == 400
    assert json.loads(result)["error"]["type"] == "invalid_request_error"


def test_head_refusal_has_no_body() -> None:
    request, result, _ = render(b"HEAD", b"/api/tags", b"", {"scope": "inference"})
    assert request.responseCode == 403 and result == b""
    assert 'scope="models:read"' in challenge(request)


def test_listing_gets_transform() -> None:
    _, _, proxy = render(b"GET", b"/api/tags", b"", {"models": ["tiny*"]})
    [(_, ctx)] = proxy.seen
    assert ctx.route == "/api/tags" and ctx.response_transform is not None
    upstream = json.dumps({"models": [{"name": "tiny"}, {"name": "secret"}]}).encode()
    assert json.loads(ctx.response_transform(upstream)) == {"models": [{"name": "tiny"}]}


def test_blob_upload_is_not_read() -> None:
    class Unreadable(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            raise AssertionError("blob read by the policy")

    proxy = FakeProxy()
    resource = AuthorizationResource(proxy, OLLAMA, AUTHZ)
    path = b"/api/blobs/sha256:" + b"0" * 64
    request = make_request(b"POST", path, b"", {"scope": "models:manage", "models": ["x"]})
    request.content = Unreadable(b"\x00" * 10)
    with pytest.raises(AssertionError, match="blob read by the policy"):
        resource.render(request)  # only the fake proxy reads it
    assert request.gateway_context.route == "/api/blobs/{digest}"


def test_override_runner() -> None:
    rules = (EndpointRule(("POST",), "/generate", "inference"),)
    runner = RunnerSettings(name="tgi", host="h", port=80, path="/tgi", endpoints=rules)
    request, _, proxy = render(b"POST", b"/generate", b'{"inputs": "hi"}', {}, runner)
    assert len(proxy.seen) == 1
    request, _, proxy = render(b"POST", b"/api/chat", b'{"model": "m"}', {}, runner)
    assert proxy.seen == [] and 'scope="admin"' in challenge(request)


# ------------------------------------------------- over HTTP, through a Site


class WithContext(Resource):
    """Stands in for GatewaySite + tree + auth: attaches a context with claims."""

    isLeaf = True

    def __init__(self, inner: Resource, claims: Any) -> None:
        super().__init__()
        self.inner = inner
        self.claims = claims

    def render(self, request: Request) -> bytes | int:
        request.gateway_context = RequestContext(  # type: ignore[attr-defined]
            request_id="r",
            started=0.0,
            runner=OLLAMA,
            upstream_path=request.uri,
            claims=self.claims,
        )
        result: bytes | int = self.inner.render(request)
        return result


def _result(d: Deferred[Any], stub: Any) -> Any:
    stub.flush()
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "request did not complete"
    if isinstance(results[0], Exception):
        raise results[0]
    return results[0]


def test_over_http() -> None:
    proxy = FakeProxy()
    claims = {"scope": "inference", "models": ["tiny*"]}
    stub: Any = StubTreq(WithContext(AuthorizationResource(proxy, OLLAMA, AUTHZ), claims))
    body = b'{"model": "tiny", "prompt": "hi"}'
    response = _result(stub.post("http://gw/api/generate", data=body), stub)
    assert response.code == 200
    assert _result(response.content(), stub) == b"proxied"
    assert proxy.seen[0][0] == body

    response = _result(stub.post("http://gw/api/generate", data=b'{"model":"x"}'), stub)
    assert response.code == 403
    assert response.headers.getRawHeaders(b"www-authenticate") == [
        b'Bearer realm="runner-gateway", error="insufficient_scope", '
        b"error_description=\"this token may not use model 'x'\""
    ]
    assert json.loads(_result(response.content(), stub)) == {
        "error": 'this token may not use model "x"'
    }
    assert len(proxy.seen) == 1


def test_runner_refusal_names_the_runner_and_no_scope() -> None:
    claims = {"scope": "inference", "runners": ["other"]}
    request, result, proxy = render(b"POST", b"/v1/chat/completions", b'{"model": "x"}', claims)
    assert proxy.seen == [] and request.responseCode == 403
    header = challenge(request)
    assert "scope=" not in header.replace("insufficient_scope", "")
    assert f"error_description=\"this token may not use runner '{OLLAMA.name}'\"" in header
    error = json.loads(result)["error"]
    assert error["code"] == "runner_not_allowed"
    assert error["message"] == f'this token may not use runner "{OLLAMA.name}"'


def test_error_description_keeps_to_rfc_6750_characters() -> None:
    claims = {"scope": "inference", "models": ["tiny*"]}
    name = 'caf\u00e9"\\\r\nX-Injected: 1'
    body = json.dumps({"model": name}).encode()
    request, _, _ = render(b"POST", b"/api/chat", body, claims)
    assert request.responseCode == 403
    description = challenge(request).split('error_description="', 1)[1]
    assert description.endswith('"')
    assert re.fullmatch(r"[\x20\x21\x23-\x5b\x5d-\x7e]*", description[:-1])
