"""What OAuth clients and resource servers look for: RFC 9728 metadata, RFC 7662 introspection.

With ``server.publicUrl`` set, ``/.well-known/oauth-protected-resource``
(and ``/.well-known/oauth-protected-resource/<prefix>`` for each runner that
is not at ``/``) describe the protected resources, without a token, and every
401 challenge names its runner's document in ``resource_metadata``.

``POST /oauth/introspect`` (always on) gives a service the gateway's verdict
on a token (form body ``token=...``). The caller authenticates with its own
bearer token, which must list the ``introspect`` scope in its ``scope``
claim (``admin`` does not imply it, nor do the default scopes). Anything the
gateway would refuse (invalid, expired, revoked) is ``{"active": false}``,
without a reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from runner_gateway.auth import AuthResource, TokenCache, challenge
from runner_gateway.context import context_of
from runner_gateway.errors import send_error
from runner_gateway.paseto import MAX_TOKEN, PasetoError, TokenVerifier, parse_rfc3339
from runner_gateway.settings import SCOPES, RunnerSettings, Settings

__all__ = [
    "INTROSPECT",
    "INTROSPECTION_PATH",
    "METADATA_PATH",
    "IntrospectionResource",
    "challenge_parameter",
    "metadata",
    "resources",
]

METADATA_PATH = "/.well-known/oauth-protected-resource"
INTROSPECTION_PATH = "/oauth/introspect"
INTROSPECT = "introspect"
MAX_INTROSPECTION_BODY = MAX_TOKEN + 1024  # the token, its form encoding and a type hint


def _suffix(runner: RunnerSettings) -> str:
    return "" if runner.path == "/" else runner.path


def resource_url(public_url: str, runner: RunnerSettings) -> str:
    return public_url + _suffix(runner)


def metadata_url(public_url: str, runner: RunnerSettings) -> str:
    return public_url + METADATA_PATH + _suffix(runner)


def challenge_parameter(settings: Settings, runner: RunnerSettings) -> str:
    """``, resource_metadata="..."`` for the runner's 401 challenges ("" without publicUrl)."""
    public_url = settings.server.public_url
    if not public_url:
        return ""
    return f', resource_metadata="{metadata_url(public_url, runner)}"'


def metadata(settings: Settings, runner: RunnerSettings) -> dict[str, Any]:
    """The RFC 9728 document for one runner's resource."""
    return {
        "resource": resource_url(settings.server.public_url, runner),
        "bearer_methods_supported": ["header"],
        "scopes_supported": list(SCOPES),
        "resource_name": f"runner-gateway: {runner.name}",
    }


def _json(request: Request, status: int, payload: Mapping[str, Any]) -> bytes:
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
    body = json.dumps(payload).encode() + b"\n"
    if request.method == b"HEAD":
        request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
        return b""
    return body


class _Metadata(Resource):
    isLeaf = True

    def __init__(self, document: dict[str, Any]) -> None:
        super().__init__()
        self.document = document

    def render_GET(self, request: Request) -> bytes:
        return _json(request, 200, self.document)

    def render_HEAD(self, request: Request) -> bytes:
        return _json(request, 200, self.document)


class IntrospectionResource(Resource):
    """RFC 7662, behind an AuthResource that has authenticated the caller."""

    isLeaf = True

    def __init__(
        self, verifier: TokenVerifier, cache: TokenCache, clock: Callable[[], float]
    ) -> None:
        super().__init__()
        self.verifier = verifier
        self.cache = cache
        self.clock = clock

    def render(self, request: Request) -> bytes:
        if request.method != b"POST":
            request.responseHeaders.setRawHeaders(b"allow", [b"POST"])
            return send_error(request, 405, "use POST")
        claims = context_of(request).claims or {}
        scope = claims.get("scope")
        if not isinstance(scope, str) or INTROSPECT not in scope.split():
            header = challenge("insufficient_scope", "the introspect scope is required")
            return send_error(
                request,
                403,
                "forbidden: the introspect scope is required",
                code="insufficient_scope",
                headers={"WWW-Authenticate": header + f', scope="{INTROSPECT}"'},
            )
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip()
        if content_type.lower() != b"application/x-www-form-urlencoded":
            return send_error(request, 415, "send application/x-www-form-urlencoded")
        assert request.content is not None
        body = request.content.read(MAX_INTROSPECTION_BODY + 1)
        if len(body) > MAX_INTROSPECTION_BODY:
            return send_error(request, 413, "request body too large")
        try:
            form = parse_qs(body.decode("ascii"), strict_parsing=True, max_num_fields=4)
        except (ValueError, UnicodeDecodeError):
            return send_error(request, 400, "the body is not a form", code="invalid_request")
        tokens = form.get("token", [])
        if len(tokens) != 1:
            return send_error(request, 400, "send one token=...", code="invalid_request")
        return _json(request, 200, self.introspect(tokens[0]))

    def introspect(self, token: str) -> dict[str, Any]:
        now = self.clock()
        verified = self.cache.get(token, now)
        if verified is None:
            try:
                verified = self.verifier.verify(token)
            except PasetoError:
                return {"active": False}
            revocations = self.cache.revocations
            if revocations is not None and revocations.check(verified.claims, verified.kid):
                return {"active": False}
            self.cache.put(token, verified, now)
        claims = verified.claims
        answer: dict[str, Any] = {"active": True, "token_type": "Bearer"}
        for name in ("sub", "scope", "jti", "models", "runners"):
            if name in claims:
                answer[name] = claims[name]
        for name in ("exp", "iat"):
            value = claims.get(name)
            if isinstance(value, str):
                answer[name] = int(parse_rfc3339(value))  # RFC 7662: seconds since the epoch
        if verified.kid is not None:
            answer["kid"] = verified.kid
        return answer


def resources(
    settings: Settings,
    verifier: TokenVerifier,
    cache: TokenCache,
    clock: Callable[[], float],
) -> dict[bytes, IResource]:
    """Exact paths the root serves before runner routing."""
    introspection = IntrospectionResource(verifier, cache, clock)
    found: dict[bytes, IResource] = {
        INTROSPECTION_PATH.encode(): AuthResource(introspection, verifier, cache, clock),
    }
    if settings.server.public_url:
        for runner in settings.runners:
            path = (METADATA_PATH + _suffix(runner)).encode()
            found[path] = _Metadata(metadata(settings, runner))
    return found
