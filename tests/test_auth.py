"""The RFC 6750 bearer wrapper: challenges, error shapes, claims, the token cache."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import capturedLogs, formatEvent
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from runner_gateway.auth import (
    AuthResource,
    BearerRequestError,
    TokenCache,
    challenge,
    parse_authorization,
)
from runner_gateway.context import RequestContext, context_of
from runner_gateway.paseto import (
    PasetoError,
    TokenVerifier,
    V2SecretKey,
    V4LocalKey,
    V4SecretKey,
    VerifiedToken,
    issue,
)

NOW = 1_700_000_000.0
PLAIN = 'Bearer realm="runner-gateway"'


def stamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class CountingVerifier:
    """The real verifier, counting how often the wrapper asks it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    def verify(self, token: str) -> VerifiedToken:
        self.calls += 1
        verified: VerifiedToken = self.inner.verify(token)
        return verified


class Raising:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def verify(self, token: str) -> VerifiedToken:
        raise self.exc


class Recorder(Resource):
    """The wrapped resource: records what it saw."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[Any, Any]] = []

    def render(self, request: Any) -> bytes:
        self.seen.append(
            (request.requestHeaders.getRawHeaders(b"authorization"), context_of(request).claims)
        )
        return b"wrapped"


class Env:
    def __init__(self, cache_size: int = 100) -> None:
        self.clock = Clock()
        self.key = V4SecretKey.generate()
        self.verifier = CountingVerifier(
            TokenVerifier("v4", public_keys=[self.key.public_key()], clock=self.clock)
        )
        self.cache = TokenCache(cache_size)
        self.wrapped = Recorder()
        self.auth = AuthResource(self.wrapped, self.verifier, self.cache, self.clock)  # type: ignore[arg-type]

    def token(self, lifetime: float = 3600.0, key: Any = None, **claims: Any) -> str:
        body = {"sub": "alice", "exp": stamp(self.clock.now + lifetime)}
        body.update(claims)
        return issue(key or self.key, body)

    def call(
        self,
        auth: list[bytes] | None = None,
        path: bytes = b"/api/tags",
        method: bytes = b"GET",
        args: dict[bytes, list[bytes]] | None = None,
    ) -> tuple[DummyRequest, bytes, RequestContext]:
        request = DummyRequest([])
        request.method = method
        ctx = RequestContext(request_id="req-1", started=0.0, upstream_path=path)
        request.gateway_context = ctx  # type: ignore[attr-defined]
        for value in auth or []:
            request.requestHeaders.addRawHeader(b"authorization", value)
        if args:
            request.args = args
        body = self.auth.render(request)  # type: ignore[arg-type]
        assert isinstance(body, bytes)
        return request, body, ctx


def www(request: DummyRequest) -> list[bytes]:
    values = request.responseHeaders.getRawHeaders(b"www-authenticate")
    assert values is not None
    return list(values)


def bearer(token: str) -> list[bytes]:
    return [b"Bearer " + token.encode()]


# ------------------------------------------------------ parse_authorization


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (None, None),
        ([], None),
        ([b"Bearer abc.DEF-_~+/=="], "abc.DEF-_~+/=="),
        ([b"Bearer abc=="], "abc=="),
        ([b"bearer tok"], "tok"),
        ([b"BEARER tok"], "tok"),
        ([b"  Bearer   tok  "], "tok"),
        ([b"Basic dXNlcjpwYXNz"], None),  # another scheme: no bearer credentials
        ([b"Digest"], None),
    ],
)
def test_parse_authorization(values: list[bytes] | None, expected: str | None) -> None:
    assert parse_authorization(values) == expected


@pytest.mark.parametrize(
    "values",
    [
        [b"Bearer a", b"Bearer b"],
        [b"Bearer a", b"Basic b"],
        [b""],
        [b"Bearer"],
        [b"Bearer "],
        [b"Bearer a b"],
        [b"Bearer a,Bearer b"],
        [b'Bearer "quoted"'],
        [b"Bearer\ttok"],
        [b"Bearer t=k"],
        [b"Bearer ==="],
        [b"Bearer a=b="],
        [b"Bearer tok\x00"],
        [b"B\xc3\xa9arer tok"],
        [b"Bearer tok\xc3\xa9"],
        [b"Be(arer tok"],
    ],
)
def test_parse_authorization_malformed(values: list[bytes]) -> None:
    with pytest.raises(BearerRequestError):
        parse_authorization(values)


@given(st.lists(st.binary(max_size=40), max_size=3))
def test_parse_authorization_only_raises_its_own_error(values: list[bytes]) -> None:
    try:
        token = parse_authorization(values)
    except BearerRequestError:
        return
    assert token is None or (token.isascii() and token.encode() in values[0])


def test_challenge_cannot_break_quoting() -> None:
    value = challenge("invalid_token", 'a "quoted"\\ thing\r\nX-Injected: 1' + "é" * 400)
    assert value.startswith(PLAIN + ', error="invalid_token", error_description="')
    description = value.split('error_description="', 1)[1]
    assert description.endswith('"')
    inner = description[:-1]
    assert '"' not in inner and "\\" not in inner and "\r" not in inner and "\n" not in inner
    assert all(0x20 <= ord(c) <= 0x7E for c in inner)
    assert len(inner) <= 200


# ---------------------------------------------------------- AuthResource


def test_success_passes_claims_and_removes_authorization() -> None:
    env = Env()
    token = env.token(scope="inference")
    request, body, ctx = env.call([b"bEaReR " + token.encode()])
    assert body == b"wrapped"
    assert request.responseCode is None
    assert env.wrapped.seen == [(None, ctx.claims)]
    assert ctx.claims is not None
    assert ctx.claims["sub"] == "alice" and ctx.claims["scope"] == "inference"
    assert ctx.subject == "alice"
    assert ctx.auth_failure is None
    assert request.requestHeaders.getRawHeaders(b"authorization") is None


@pytest.mark.parametrize("auth", [None, [b"Basic dXNlcjpwYXNz"]])
def test_missing_credentials_get_a_plain_challenge(auth: list[bytes] | None) -> None:
    env = Env()
    request, body, ctx = env.call(auth)
    assert request.responseCode == 401
    assert www(request) == [PLAIN.encode()]
    assert "Bearer" in json.loads(body)["error"]
    assert ctx.auth_failure == "missing"
    assert env.wrapped.seen == [] and env.verifier.calls == 0


def test_missing_credentials_openai_shape() -> None:
    env = Env()
    request, body, _ = env.call(None, path=b"/v1/models")
    assert request.responseCode == 401
    error = json.loads(body)["error"]
    assert error["type"] == "authentication_error" and error["code"] is None
    assert "Bearer" in error["message"]


@pytest.mark.parametrize(
    ("auth", "args"),
    [
        ([b"Bearer a", b"Bearer b"], None),
        ([b"Bearer"], None),
        ([b"Bearer a b"], None),
        ([b"Bearer tok"], {b"access_token": [b"tok"]}),
        (None, {b"access_token": [b"tok"]}),
    ],
)
@pytest.mark.parametrize("path", [b"/api/chat", b"/v1/chat/completions"])
def test_malformed_requests_get_400(
    auth: list[bytes] | None, args: dict[bytes, list[bytes]] | None, path: bytes
) -> None:
    env = Env()
    token = env.token()
    # A valid token in one of two places is still two credentials.
    auth = [v.replace(b"tok", token.encode()) for v in auth] if auth else auth
    request, body, ctx = env.call(auth, path=path, args=args)
    assert request.responseCode == 400
    (value,) = www(request)
    assert value.startswith(PLAIN.encode() + b', error="invalid_request", error_description="')
    assert ctx.auth_failure == "malformed"
    assert env.wrapped.seen == [] and env.verifier.calls == 0
    error = json.loads(body)["error"]
    if path.startswith(b"/v1/"):
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request"
        assert error["message"].startswith("invalid request: ")
    else:
        assert isinstance(error, str) and error.startswith("invalid request: ")


def _bad_tokens(env: Env) -> dict[str, str]:
    other_v4 = V4SecretKey.generate()
    return {
        "expired": env.token(lifetime=-3600),
        "not_yet_valid": env.token(nbf=stamp(NOW + 3600)),
        "wrong_version": issue(V2SecretKey.generate(), {"exp": stamp(NOW + 60)}),
        "wrong_key": env.token(key=other_v4),
        "wrong_purpose": issue(V4LocalKey.generate(), {"exp": stamp(NOW + 60)}),
        "garbage": "v4.public.AAAA",
    }


@pytest.mark.parametrize(
    "case", ["expired", "not_yet_valid", "wrong_version", "wrong_key", "wrong_purpose", "garbage"]
)
@pytest.mark.parametrize("path", [b"/api/chat", b"/v1/chat/completions"])
def test_bad_tokens_get_invalid_token(case: str, path: bytes) -> None:
    env = Env()
    token = _bad_tokens(env)[case]
    # What the gateway must report is what the verifier says, nothing else.
    with pytest.raises(PasetoError) as refused:
        env.verifier.inner.verify(token)
    reason, description = refused.value.reason, refused.value.description
    if case in ("expired", "not_yet_valid", "wrong_version"):
        assert reason == case

    request, body, ctx = env.call(bearer(token), path=path)
    assert request.responseCode == 401
    assert www(request) == [
        f'{PLAIN}, error="invalid_token", error_description="{description}"'.encode()
    ]
    assert ctx.auth_failure == reason
    assert ctx.claims is None
    assert env.wrapped.seen == []
    assert token not in body.decode()
    error = json.loads(body)["error"]
    if path.startswith(b"/v1/"):
        assert error == {
            "message": f"invalid token: {description}",
            "type": "authentication_error",
            "code": "invalid_token",
        }
    else:
        assert error == f"invalid token: {description}"


def test_description_is_quoted_safely() -> None:
    env = Env()
    env.auth.verifier = Raising(PasetoError("malformed", 'bad "x"\\\ny'))  # type: ignore[assignment]
    request, body, ctx = env.call(bearer("v4.public.AAAA"))
    assert www(request) == [
        PLAIN.encode() + b', error="invalid_token", error_description="bad  x y"'
    ]
    assert ctx.auth_failure == "malformed"
    assert json.loads(body)["error"] == "invalid token: bad  x y"


def test_head_request_has_no_body() -> None:
    env = Env()
    request, body, _ = env.call(None, method=b"HEAD")
    assert request.responseCode == 401 and body == b""
    assert request.responseHeaders.getRawHeaders(b"content-length") is not None


def test_unexpected_verifier_failure_is_refused_without_detail() -> None:
    env = Env()
    token = env.token()
    env.auth.verifier = Raising(ValueError(f"oops {token}"))  # type: ignore[assignment]
    with capturedLogs() as events:
        request, body, ctx = env.call(bearer(token))
    assert request.responseCode == 401
    assert ctx.auth_failure == "error"
    assert token not in body.decode()
    assert events and all(token not in repr(e) for e in events)
    assert any("ValueError" in formatEvent(e) for e in events)


# ------------------------------------------------------------- the cache


def test_cache_hit_skips_verification() -> None:
    env = Env()
    token = env.token()
    for _ in range(3):
        _, body, ctx = env.call(bearer(token))
        assert body == b"wrapped" and ctx.claims is not None and ctx.claims["sub"] == "alice"
    assert env.verifier.calls == 1
    env.call(bearer(env.token(sub="bob")))
    assert env.verifier.calls == 2
    assert len(env.cache) == 2
    # The cache holds digests, never the credential.
    assert all(token.encode() not in key for key in env.cache._entries)


def test_expired_cached_token_is_refused() -> None:
    env = Env()
    token = env.token(lifetime=30)
    assert env.call(bearer(token))[1] == b"wrapped"
    assert env.call(bearer(token))[1] == b"wrapped"
    assert env.verifier.calls == 1
    env.clock.now += 30 + 61  # past exp and the verifier's 60 s leeway
    request, _, ctx = env.call(bearer(token))
    assert request.responseCode == 401
    assert ctx.auth_failure == "expired" and ctx.claims is None
    assert env.verifier.calls == 2
    assert len(env.cache) == 0


def test_token_in_its_leeway_is_not_cached() -> None:
    env = Env()
    token = env.token(lifetime=30)
    env.clock.now += 40  # expired, but within the leeway: accepted, verified every time
    assert env.call(bearer(token))[1] == b"wrapped"
    assert env.call(bearer(token))[1] == b"wrapped"
    assert env.verifier.calls == 2
    assert len(env.cache) == 0


def test_failures_are_not_cached() -> None:
    env = Env()
    token = env.token(key=V4SecretKey.generate())
    for _ in range(2):
        assert env.call(bearer(token))[0].responseCode == 401
    assert env.verifier.calls == 2 and len(env.cache) == 0


def _verified(exp: float | None) -> VerifiedToken:
    return VerifiedToken(claims={"sub": "x"}, footer=b"", kid=None, expires_at=exp)


def test_cache_is_bounded_lru() -> None:
    cache = TokenCache(2)
    cache.put("a", _verified(NOW + 100), NOW)
    cache.put("b", _verified(NOW + 100), NOW)
    assert cache.get("a", NOW) is not None  # a is now the most recent
    cache.put("c", _verified(NOW + 100), NOW)
    assert len(cache) == 2
    assert cache.get("b", NOW) is None
    assert cache.get("a", NOW) is not None and cache.get("c", NOW) is not None


def test_cache_entry_never_outlives_exp_or_max_age() -> None:
    cache = TokenCache(10, max_age=50)
    cache.put("short", _verified(NOW + 10), NOW)
    cache.put("long", _verified(NOW + 1000), NOW)
    cache.put("noexp", _verified(None), NOW)
    assert cache.get("short", NOW + 9.9) is not None
    assert cache.get("short", NOW + 10) is None
    assert cache.get("long", NOW + 49) is not None
    assert cache.get("long", NOW + 50) is None
    assert cache.get("noexp", NOW + 50) is None
    assert len(cache) == 0


def test_cache_size_zero_disables_caching() -> None:
    env = Env(cache_size=0)
    token = env.token()
    env.call(bearer(token))
    env.call(bearer(token))
    assert env.verifier.calls == 2 and len(env.cache) == 0


# ------------------------------------------------------------ logging


def test_token_never_logged() -> None:
    env = Env()
    good = env.token()
    tokens = [good, *_bad_tokens(env).values()]
    with capturedLogs() as events:
        for token in tokens:
            env.call(bearer(token))
            env.call(bearer(token), path=b"/v1/models")
            env.call([b"Bearer " + token.encode(), b"Bearer x"])
            env.call(bearer(token), args={b"access_token": [token.encode()]})
        env.call([b"Bearer " + good.encode() + b" trailing"])
        env.call(None)
    assert events, "the refusals should have been logged (by reason)"
    for event in events:
        text = repr(event) + formatEvent(event)
        for token in tokens:
            assert token not in text
            assert token[10:40] not in text  # no slice of it either
    reasons = {e.get("reason") for e in events}
    assert {"missing", "malformed", "expired"} <= reasons


# ------------------------------------------------------ the head check


def _head(env: Env, auth: list[bytes], query: bytes = b"") -> tuple[bool, RequestContext]:
    ctx = RequestContext(request_id="", started=0.0, upstream_path=b"/api/tags")
    raw = {b"Authorization": auth} if auth else {}
    return env.auth.check_head(b"GET", raw, query, ctx), ctx


def test_the_head_check_verifies_once_and_render_reuses_it() -> None:
    env = Env(cache_size=0)  # no cache: a second verification would show
    refused, ctx = _head(env, bearer(env.token()))
    assert not refused and ctx.claims is not None
    request = DummyRequest([])
    request.gateway_context = ctx  # type: ignore[attr-defined]
    assert env.auth.render(request) == b"wrapped"  # type: ignore[arg-type]
    assert env.verifier.calls == 1


def test_a_refusal_on_the_head_is_rendered_without_verifying_again() -> None:
    env = Env(cache_size=0)
    refused, ctx = _head(env, [b"Bearer v4.public.bad"])
    assert refused and ctx.claims is None
    request = DummyRequest([])
    request.gateway_context = ctx  # type: ignore[attr-defined]
    body = env.auth.render(request)  # type: ignore[arg-type]
    assert request.responseCode == 401 and b"invalid token" in body
    assert env.verifier.calls == 1
    assert ctx.auth_failure is not None


@pytest.mark.parametrize("query", [b"access_token=x", b"a=1&access%5Ftoken=x"])
def test_the_head_check_refuses_a_token_in_the_query(query: bytes) -> None:
    env = Env()
    refused, _ = _head(env, bearer(env.token()), query)
    assert refused
