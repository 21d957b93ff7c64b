"""AuthorizationResource: applies policy.py to a request (Twisted glue).

Sits between the auth wrapper (which put the verified claims on the request
context) and the reverse proxy. It never changes the request: the body is
read from ``request.content`` and rewound, so the proxy forwards it byte for
byte.
"""

from __future__ import annotations

import functools
import re

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from runner_gateway.context import RequestContext, context_of
from runner_gateway.errors import send_error
from runner_gateway.policy import Decision, Policy
from runner_gateway.settings import AuthorizationSettings, RunnerSettings

__all__ = ["REALM", "AuthorizationResource"]

REALM = "runner-gateway"


def _read_body(request: IRequest) -> bytes:
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    try:
        data: bytes = content.read()
        return data
    finally:
        content.seek(0)


class AuthorizationResource(Resource):
    """Refuses what the token's claims do not allow, else renders ``wrapped``."""

    isLeaf = True

    def __init__(
        self,
        wrapped: IResource,
        runner: RunnerSettings,
        authorization: AuthorizationSettings,
    ) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.policy = Policy(runner, authorization)

    def render(self, request: Request) -> bytes | int:
        ctx = context_of(request)
        decision = self.policy.decide(
            request.method, ctx.upstream_path, ctx.claims, functools.partial(_read_body, request)
        )
        ctx.route = decision.route
        if not decision.allowed:
            return self._refuse(request, decision)
        ctx.model = decision.model
        ctx.scope = decision.scope
        ctx.response_transform = decision.transform
        result: bytes | int = self.wrapped.render(request)
        return result

    def check_head(self, method: bytes, ctx: RequestContext) -> bool:
        """Whether the policy refuses the request on its head alone (runner,
        scope, claims): the answer itself is rendered as usual, without the body."""
        return self.policy.decide_head(method, ctx.upstream_path, ctx.claims) is not None

    def _refuse(self, request: Request, decision: Decision) -> bytes:
        if decision.status == 403:
            # RFC 6750 3.1: scope= names the scope to get, so only a missing
            # scope carries it; the description says what was refused.
            challenge = f'Bearer realm="{REALM}", error="insufficient_scope"'
            if decision.refused == "scope":
                challenge += f', scope="{decision.scope}"'
            challenge += f', error_description="{_description(decision.message)}"'
            return send_error(
                request,
                403,
                decision.message,
                code=_CODES.get(decision.refused, "insufficient_scope"),
                headers={"WWW-Authenticate": challenge},
            )
        return send_error(request, decision.status, decision.message, code="invalid_request")


# The error code in OpenAI-shaped bodies for refusals that are not about a scope.
_CODES = {"model": "model_not_allowed", "runner": "runner_not_allowed"}

# What RFC 6750 allows in error_description: printable ASCII but '"' and '\'.
_UNSAFE = re.compile(r"[^\x20-\x21\x23-\x5b\x5d-\x7e]")


def _description(message: str) -> str:
    return _UNSAFE.sub("?", message.replace('"', "'"))
