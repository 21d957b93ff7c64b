"""The Resource tree: health endpoints, CORS, and routing by path prefix.

``GatewayRoot`` puts the request path in its canonical form
(:func:`runner_gateway.paths.canonical_path`: what is matched and classified
is exactly what is forwarded, and a path that could be read two ways is
refused with 400), picks the runner with the longest prefix that matches on
whole segments, records the runner-relative path in the request context and
hands the request to that runner's resource chain (auth -> authorization ->
proxy), which is a leaf.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from runner_gateway.context import RequestContext, context_of
from runner_gateway.edge.fastpath import canonical_name
from runner_gateway.errors import send_error
from runner_gateway.paths import BadPath, canonical_path, suspect
from runner_gateway.settings import RunnerSettings

__all__ = ["CorsPolicy", "GatewayRoot", "Route", "match_route"]

_CORS_HEADERS = b"Authorization, Content-Type, X-Request-Id, OpenAI-Organization, OpenAI-Project"
_CORS_METHODS = b"GET, HEAD, POST, PUT, DELETE, OPTIONS"

# The header's name as twisted.web's Headers keeps it (its canonical form).
_ORIGIN = canonical_name(b"origin")
_PREFLIGHT = canonical_name(b"access-control-request-method")


@dataclass(frozen=True)
class Route:
    runner: RunnerSettings
    resource: IResource

    @functools.cached_property
    def segments(self) -> tuple[bytes, ...]:
        return tuple(s.encode() for s in self.runner.path.split("/") if s)


def match_route(routes: Sequence[Route], raw_path: bytes) -> tuple[Route, bytes] | None:
    """Longest prefix on whole segments; returns the route and the runner-relative path."""
    if not raw_path.startswith(b"/"):
        return None
    parts = raw_path.split(b"/")[1:]
    best: tuple[Route, bytes] | None = None
    best_len = -1
    for route in routes:
        prefix = route.segments
        if len(prefix) > best_len and tuple(parts[: len(prefix)]) == prefix:
            if len(parts) < len(prefix):
                continue
            rest = b"/" + b"/".join(parts[len(prefix) :])
            best, best_len = (route, rest), len(prefix)
    return best


class CorsPolicy:
    """Answers CORS from settings; Origin itself is never forwarded to a runner."""

    def __init__(self, origins: Sequence[str]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(o.encode() for o in origins if o != "*")

    def allows(self, origin: bytes) -> bool:
        return self.any or origin in self.origins

    def apply(self, request: Request, origin: bytes) -> None:
        request.responseHeaders.setRawHeaders(b"access-control-allow-origin", [origin])
        request.responseHeaders.addRawHeader(b"vary", b"Origin")
        request.responseHeaders.setRawHeaders(
            b"access-control-expose-headers", [b"X-Request-Id, WWW-Authenticate"]
        )


class _Json(Resource):
    isLeaf = True

    def __init__(self, produce: Callable[[], tuple[int, dict[str, object]]]) -> None:
        super().__init__()
        self.produce = produce

    def render_GET(self, request: Request) -> bytes:
        status, payload = self.produce()
        request.setResponseCode(status)
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
        return json.dumps(payload).encode() + b"\n"

    def render_HEAD(self, request: Request) -> bytes:
        self.render_GET(request)
        return b""


class _Error(Resource):
    isLeaf = True

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__()
        self.status, self.message, self.headers = status, message, headers

    def render(self, request: Request) -> bytes:
        return send_error(request, self.status, self.message, headers=self.headers)


class _Preflight(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(204)
        request.responseHeaders.setRawHeaders(b"access-control-allow-methods", [_CORS_METHODS])
        request.responseHeaders.setRawHeaders(b"access-control-allow-headers", [_CORS_HEADERS])
        request.responseHeaders.setRawHeaders(b"access-control-max-age", [b"600"])
        return b""


class GatewayRoot(Resource):
    def __init__(
        self,
        routes: Sequence[Route],
        cors: CorsPolicy,
        readiness: Callable[[], list[str]],
        details: Callable[[], dict[str, str]] | None = None,
        paths: Mapping[bytes, IResource] | None = None,
        runner_states: Callable[[], dict[str, object]] | None = None,
    ) -> None:
        super().__init__()
        self.routes = list(routes)
        self.details = details
        # Exact paths served before runner routing (oauth.py's documents and introspection).
        self.paths = dict(paths or {})
        self.cors = cors
        self.healthz = _Json(lambda: (200, {"status": "ok"}))
        self.readyz = _Json(self._ready)
        self.readiness = readiness
        self.runner_states = runner_states

    def _ready(self) -> tuple[int, dict[str, object]]:
        problems = self.readiness()
        payload: dict[str, object] = (
            {"status": "not ready", "problems": problems} if problems else {"status": "ready"}
        )
        # Runner pools with a host down: how many of each runner's hosts are up.
        states = self.runner_states() if self.runner_states is not None else None
        if states:
            payload["runners"] = states
        # Degraded but serving (e.g. Redis unreachable): said, not a reason to be unready.
        detail = self.details() if self.details is not None else None
        if detail:
            payload["detail"] = detail
        return (503 if problems else 200), payload

    def check_head(
        self, method: bytes, uri: bytes, raw_headers: dict[bytes, list[bytes]], ctx: RequestContext
    ) -> bool:
        """Whether the request is refused on its head (GatewayChannel calls
        this before any body is read): the route, and the runner's
        authentication and policy as far as they need no body. The refusal
        itself is rendered as usual (getChildWithDefault), from what this
        kept in ``ctx``."""
        raw_path, _, query = uri.partition(b"?")
        if raw_path in (b"/healthz", b"/readyz"):
            return method not in (b"GET", b"HEAD")  # 405, without reading a body
        if self.paths:
            found_path = self.paths.get(raw_path)
            if found_path is not None:  # introspection: behind its own AuthResource
                check = getattr(found_path, "check_head", None)
                return check is not None and bool(check(method, raw_headers, query, ctx))
        origins = raw_headers.get(_ORIGIN)
        if origins:
            if len(origins) != 1 or not self.cors.allows(origins[0]):
                return True
            if method == b"OPTIONS" and _PREFLIGHT in raw_headers:
                return False
        found = match_route(self.routes, raw_path)
        if found is None:
            return True
        route, rest = found
        ctx.runner = route.runner
        ctx.upstream_path = rest + b"?" + query if query else rest
        check = getattr(route.resource, "check_head", None)
        return check is not None and bool(check(method, raw_headers, query, ctx))

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        canonical = request.path
        if suspect(canonical) is not None:  # else canonical already
            try:
                canonical = canonical_path(canonical)
            except BadPath as exc:
                return _Error(400, str(exc))
        if canonical == b"/healthz":
            return self.healthz
        if canonical == b"/readyz":
            return self.readyz
        if self.paths:
            found_path = self.paths.get(canonical)
            if found_path is not None:
                return found_path
        if getattr(request, "body_too_large", False):
            return _Error(413, "request body too large")
        origins = request.requestHeaders._rawHeaders.get(_ORIGIN)  # getRawHeaders(b"origin")
        if origins:
            if len(origins) != 1 or not self.cors.allows(origins[0]):
                return _Error(403, "origin not allowed")
            self.cors.apply(request, origins[0])
            if request.method == b"OPTIONS" and request.requestHeaders.hasHeader(
                b"access-control-request-method"
            ):
                return _Preflight()
        found = match_route(self.routes, canonical)
        if found is None:
            return _Error(404, f"no runner serves {canonical.decode('utf-8', 'replace')[:200]}")
        route, rest = found
        _, _, query = request.uri.partition(b"?")
        ctx = context_of(request)
        ctx.runner = route.runner
        ctx.upstream_path = rest + b"?" + query if query else rest
        return route.resource

    def render(
        self, request: Request
    ) -> bytes:  # pragma: no cover - traversal always picks a child
        return send_error(request, 404, "not found")
