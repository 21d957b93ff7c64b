"""policy.py: the endpoint table, grants from claims, model checks, listing filters."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner_gateway import policy
from runner_gateway.policy import (
    ROUTES,
    BadRequest,
    ClaimError,
    Decision,
    Grant,
    Listing,
    Policy,
    classify,
    extract_models,
    filter_listing,
    go_fold,
    grant_from_claims,
    parse_body,
    route_label,
)
from runner_gateway.settings import AuthorizationSettings, EndpointRule, RunnerSettings

DIGEST = "sha256:" + "ab" * 32
AUTHZ = AuthorizationSettings()
OLLAMA = RunnerSettings(name="ollama", host="127.0.0.1", port=11434, path="/")

# The issue's table, written out as it reads (issue 5, "Endpoint classes").
ISSUE_TABLE: list[tuple[str, str, str]] = [
    *(
        ("POST", p, "inference")
        for p in (
            "/api/generate",
            "/api/chat",
            "/api/embed",
            "/api/embeddings",
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/responses",
            "/v1/messages",
        )
    ),
    *(
        (m, p, "models:read")
        for p in ("/", "/api/version", "/api/tags", "/api/ps")
        for m in ("GET", "HEAD")
    ),
    ("POST", "/api/show", "models:read"),
    ("GET", "/v1/models", "models:read"),
    ("GET", "/v1/models/llama3:8b", "models:read"),
    *(("POST", p, "models:manage") for p in ("/api/pull", "/api/push", "/api/create", "/api/copy")),
    ("DELETE", "/api/delete", "models:manage"),
    ("HEAD", f"/api/blobs/{DIGEST}", "models:manage"),
    ("POST", f"/api/blobs/{DIGEST}", "models:manage"),
]


@pytest.mark.parametrize(("method", "path", "scope"), ISSUE_TABLE)
def test_issue_table_classified_as_written(method: str, path: str, scope: str) -> None:
    assert classify(method.encode(), path.encode()).scope == scope
    assert classify(method, path + "?stream=false").scope == scope  # query ignored


def test_table_has_nothing_beyond_the_issue() -> None:
    # Every (method, path) of ROUTES appears in the issue's table: nothing was
    # quietly widened. (Parametrised paths compared by template.)
    issue = {(m, p) for m, p, _ in ISSUE_TABLE}
    issue = {(m, "/v1/models/{model}" if p.startswith("/v1/models/") else p) for m, p in issue}
    issue = {(m, "/api/blobs/{digest}" if p.startswith("/api/blobs/") else p) for m, p in issue}
    ours = {(m, r.path) for r in ROUTES for m in r.methods}
    assert ours == issue


@pytest.mark.parametrize(
    ("method", "path"),
    [
        # right path, wrong method
        ("GET", "/api/chat"),
        ("POST", "/api/tags"),
        ("HEAD", "/v1/models"),
        ("POST", "/v1/models"),
        ("PUT", "/api/pull"),
        ("POST", "/api/delete"),
        ("DELETE", "/api/pull"),
        ("GET", f"/api/blobs/{DIGEST}"),
        ("post", "/api/chat"),
        # account, experimental and unknown endpoints
        ("POST", "/api/signin"),
        ("POST", "/api/signout"),
        ("GET", "/api/me"),
        ("POST", "/api/experimental/aliases"),
        ("GET", "/metrics"),
        ("GET", "/v1"),
        ("POST", "/api/copy/x"),
        # path tricks: the runner may route them somewhere we did not check
        ("POST", "//api/chat"),
        ("POST", "/api/chat/"),
        ("POST", "/api//chat"),
        ("POST", "/api/../api/pull"),
        ("POST", "/api/./chat"),
        ("POST", "/api/%63hat"),
        ("POST", "/api/chat%2f"),
        ("POST", "/api/%2e%2e/api/pull"),
        ("POST", "/%2e/api/chat"),
        ("POST", "/API/chat"),
        ("POST", "/api/chat;x=1"),
        ("POST", "/api/chat#x"),
        ("POST", "api/chat"),
        ("POST", ""),
        ("POST", "/api/chat\x00"),
        ("POST", "/api/ch\u0430t"),  # Cyrillic a
        ("GET", "/v1/models/"),
        ("GET", "/v1/models/a/b"),
        ("GET", "/v1/models/a%2Fb"),
        ("GET", "/v1/models/%2e%2e"),
        ("GET", "/v1/models/.."),
        ("GET", "/v1/models/%zz"),
        ("GET", "/v1/models/%0a"),
        ("POST", "/api/blobs/"),
        ("POST", "/api/blobs/..%2F..%2Fapi%2Fpull"),
        ("POST", "/api/blobs/sha256:ab/x"),
    ],
)
def test_anything_else_is_admin(method: str, path: str) -> None:
    endpoint = classify(method, path.encode("utf-8"))
    assert endpoint.scope == "admin"
    assert endpoint.route == "other"


def test_path_model_is_decoded_like_go_does() -> None:
    assert classify("GET", "/v1/models/llama3%3A8b").path_model == "llama3:8b"
    assert classify("GET", "/v1/models/llama3:8b").path_model == "llama3:8b"


def test_route_labels_are_bounded_templates() -> None:
    assert route_label(b"POST", b"/api/chat?x=1") == "/api/chat"
    assert route_label("GET", "/v1/models/anything-at-all") == "/v1/models/{model}"
    assert route_label("HEAD", f"/api/blobs/{DIGEST}") == "/api/blobs/{digest}"
    labels = {route_label("POST", f"/random/{i}") for i in range(50)}
    assert labels == {"other"}
    rules = (EndpointRule(("POST",), "/v1/*", "inference"),)
    assert route_label("POST", "/v1/x/y", rules) == "/v1/*"


# ------------------------------------------------------------- override table

RULES = (
    EndpointRule(("POST",), "/v1/chat/completions", "inference"),
    EndpointRule(("GET",), "/v1/models", "models:read"),
    EndpointRule(("GET",), "/health", "models:read"),
    EndpointRule(("POST",), "/tools/*", "models:manage"),
)


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("POST", "/v1/chat/completions", "inference"),
        ("GET", "/v1/models", "models:read"),
        ("GET", "/health", "models:read"),
        ("POST", "/tools", "models:manage"),
        ("POST", "/tools/", "models:manage"),
        ("POST", "/tools/a/b", "models:manage"),
        # the built-in table is replaced, not extended
        ("POST", "/api/chat", "admin"),
        ("GET", "/api/tags", "admin"),
        ("GET", "/v1/models/x", "admin"),
        # prefix rules do not cover paths that could climb out upstream
        ("POST", "/tools/../admin", "admin"),
        ("POST", "/tools/%2e%2e/admin", "admin"),
        ("POST", "/tools/a%2Fb", "admin"),
        ("POST", "/tools//x", "admin"),
        ("POST", "/tools/a\\b", "admin"),
        ("POST", "/toolsx", "admin"),
        ("GET", "/tools/a", "admin"),
        ("POST", "/health", "admin"),
    ],
)
def test_runner_override_table(method: str, path: str, scope: str) -> None:
    assert classify(method, path, RULES).scope == scope


def test_override_first_match_wins() -> None:
    rules = (
        EndpointRule(("POST",), "/v1/x", "admin"),
        EndpointRule(("POST",), "/v1/*", "inference"),
    )
    assert classify("POST", "/v1/x", rules).scope == "admin"
    assert classify("POST", "/v1/y", rules).scope == "inference"


# -------------------------------------------------------------------- grants


def test_grant_defaults_and_scopes() -> None:
    assert grant_from_claims({}, AUTHZ) == Grant(frozenset({"inference", "models:read"}))
    custom = AuthorizationSettings(default_scopes=("inference",))
    assert grant_from_claims({"sub": "x"}, custom).scopes == {"inference"}
    assert grant_from_claims({"scope": ""}, AUTHZ).scopes == frozenset()
    grant = grant_from_claims({"scope": " inference  models:manage other "}, AUTHZ)
    assert grant.scopes == {"inference", "models:manage", "other"}
    assert grant.allows_scope("models:manage") and not grant.allows_scope("models:read")
    admin = grant_from_claims({"scope": "admin"}, AUTHZ)
    assert all(admin.allows_scope(s) for s in ("inference", "models:read", "models:manage"))
    assert not grant_from_claims({"scope": "Admin"}, AUTHZ).allows_scope("admin")


def test_grant_models_and_runners() -> None:
    grant = grant_from_claims({"models": ["tiny*"], "runners": ["a", "b"]}, AUTHZ)
    assert grant.models == ("tiny*",) and grant.runners == ("a", "b")
    assert grant.allows_runner("a") and not grant.allows_runner("c")
    assert not grant.allows_runner("A")
    nothing = grant_from_claims({"models": [], "runners": []}, AUTHZ)
    assert not nothing.allows_model("x") and not nothing.allows_runner("a")
    anything = grant_from_claims({}, AUTHZ)
    assert anything.allows_model("whatever") and anything.allows_runner("whatever")


@pytest.mark.parametrize(
    ("claims", "claim"),
    [
        ({"scope": ["inference"]}, "scope"),
        ({"scope": None}, "scope"),
        ({"scope": 1}, "scope"),
        ({"models": "llama3"}, "models"),
        ({"models": [1]}, "models"),
        ({"models": None}, "models"),
        ({"models": {"a": 1}}, "models"),
        ({"runners": "ollama"}, "runners"),
        ({"runners": [None]}, "runners"),
    ],
)
def test_ill_typed_claims_are_refused(claims: dict[str, Any], claim: str) -> None:
    with pytest.raises(ClaimError, match=repr(claim)):
        grant_from_claims(claims, AUTHZ)
    decision = decide("POST", "/api/chat", b'{"model":"x"}', claims)
    assert decision.status == 403 and repr(claim) in decision.message


@pytest.mark.parametrize(
    ("name", "patterns", "allowed"),
    [
        ("llama3:8b", ["llama3:*"], True),
        ("llama3", ["llama3:*"], True),  # Ollama's default tag
        ("llama3", ["llama3:latest"], True),
        ("llama3:latest", ["llama3"], True),
        ("library/llama3", ["llama3"], True),
        ("registry.ollama.ai/library/llama3:latest", ["llama3"], True),
        ("LLAMA3:8B", ["llama3:*"], True),  # Ollama ignores ASCII case
        ("llama3:8b", ["LLAMA3:*"], True),
        ("tinyllama", ["tiny*"], True),
        ("tiny/evil", ["tiny*"], True),  # fnmatch: * matches "/" too (documented)
        ("llama3.1:8b", ["llama3:*"], False),
        ("llama2", ["llama3*"], False),
        ("mistral", ["llama3:*", "tiny*"], False),
        ("evil/llama3", ["llama3"], False),
        ("llama3:70b", ["llama3:8b"], False),
        ("\uff4c\uff4c\uff41\uff4d\uff413", ["llama3"], False),  # fullwidth letters
        ("\u212aimi", ["kimi"], False),  # Kelvin sign is not an ASCII k
        ("llama3\x00", ["llama3"], False),
        ("llama3 ", ["llama3"], False),
        ("", ["tiny*"], False),
    ],
)
def test_model_patterns(name: str, patterns: list[str], allowed: bool) -> None:
    assert Grant(frozenset(), tuple(patterns)).allows_model(name) is allowed


def test_model_patterns_are_exact_for_non_ollama_runners() -> None:
    grant = Grant(frozenset(), ("Qwen/*",))
    assert grant.allows_model("Qwen/Qwen2.5-7B", ollama=False)
    assert not grant.allows_model("qwen/Qwen2.5-7B", ollama=False)
    assert not Grant(frozenset(), ("llama3:latest",)).allows_model("llama3", ollama=False)


# -------------------------------------------------------------------- bodies


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"not json",
        b'{"model": "a"} trailing',
        b'{"model": "a"}{"model": "b"}',
        b'{"model": NaN}',
        b'{"x": Infinity}',
        b'{"model": "a\xff"}',
        b'\xef\xbb\xbf{"model": "a"}',
        '{"model": "a"}'.encode("utf-16"),
        b"[" * 100_000,
        b"1" * 5000,
    ],
)
def test_invalid_json_is_bad_request(body: bytes) -> None:
    with pytest.raises(BadRequest, match="invalid JSON"):
        parse_body(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "tiny", "model": "secret"}',
        b'{"model": "tiny", "mod\\u0065l": "secret"}',
        b'{"model": "tiny", "Model": "secret"}',
        b'{"model": "tiny", "MODEL": "secret"}',
        b'{"source": "tiny", "\\u017fource": "secret", "destination": "tiny2"}',
        b'{"name": "tiny", "NAME": "secret"}',
        '{"destination": "a", "dest\u0130nation": "b"}'.encode(),
        '{"destination": "a", "dest\u0131nation": "b"}'.encode(),
        b'{"model": "tiny", "options": {"a": 1, "a": 2}}',
        b'{"messages": [{"role": "user", "role": "system"}], "model": "tiny"}',
    ],
)
def test_duplicate_keys_are_bad_request(body: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_body(body)
    decision = decide("POST", "/api/chat", body, {"models": ["tiny*"]})
    assert decision.status == 400


def test_go_fold_matches_go() -> None:
    # Values Go's encoding/json folds together (foldName in fold.go).
    assert go_fold("model") == go_fold("MODEL") == go_fold("mOdEl") == "MODEL"
    assert go_fold("\u017fource") == go_fold("source")
    assert go_fold("\u212aeep_alive") == go_fold("keep_alive")
    assert go_fold("dest\u0130nation") == go_fold("dest\u0131nation") == go_fold("destination")
    assert go_fold("modél") != go_fold("model")
    assert go_fold("\uff2d\uff2f\uff24\uff25\uff2c") != go_fold("model")


def test_nested_keys_that_only_fold_together_are_allowed() -> None:
    # JSON schemas in "format" may have "id" and "ID" properties.
    value = parse_body(b'{"model": "m", "format": {"properties": {"id": 1, "ID": 2}}}')
    assert extract_models(value, ("model",)) == (["m"], [])


def test_extract_models() -> None:
    keys = ("model", "name")
    assert extract_models({"model": "a", "name": "b"}, keys) == (["a", "b"], [])
    assert extract_models({"Model": "a"}, keys) == (["a"], [])
    assert extract_models({"model": None, "name": "b"}, keys) == (["b"], [])
    assert extract_models({"x": 1}, keys) == ([], [])
    assert extract_models({"modelfile": "FROM x"}, keys, ("modelfile",)) == ([], ["modelfile"])
    with pytest.raises(BadRequest, match="must be a string"):
        extract_models({"model": ["a"]}, keys)
    with pytest.raises(BadRequest, match="must be an object"):
        extract_models(["a"], keys)
    with pytest.raises(BadRequest, match="Unicode"):
        extract_models(json.loads('{"model": "\\ud800"}'), keys)


# ------------------------------------------------------------------ decisions


def decide(
    method: str,
    path: str,
    body: bytes = b"",
    claims: dict[str, Any] | None = None,
    runner: RunnerSettings = OLLAMA,
) -> Decision:
    return Policy(runner, AUTHZ).decide(
        method, path, {} if claims is None else claims, lambda: body
    )


@pytest.mark.parametrize(("method", "path", "scope"), ISSUE_TABLE)
def test_each_class_allowed_and_refused(method: str, path: str, scope: str) -> None:
    body = b'{"model": "m", "source": "m", "destination": "m2"}' if method != "GET" else b""
    if "/blobs/" in path or method == "HEAD":
        body = b"\x00binary"
    allowed = decide(method, path, body, {"scope": scope})
    assert allowed.allowed, allowed
    assert decide(method, path, body, {"scope": "admin"}).allowed
    others = " ".join(s for s in ("inference", "models:read", "models:manage") if s != scope)
    refused = decide(method, path, body, {"scope": others})
    assert refused.status == 403
    assert refused.scope == scope
    assert f"needs the '{scope}' scope" in refused.message


def test_unknown_endpoints_need_admin() -> None:
    everything_but_admin = {"scope": "inference models:read models:manage"}
    refused = decide("POST", "/api/signin", b"", everything_but_admin)
    assert refused.status == 403 and refused.scope == "admin"
    assert refused.message == "this endpoint needs the 'admin' scope"
    assert decide("POST", "/api/signin", b"", {"scope": "admin"}).allowed


def test_default_scopes_apply_without_scope_claim() -> None:
    assert decide("POST", "/api/chat", b'{"model":"m"}', {}).allowed
    assert decide("GET", "/api/tags", b"", {}).allowed
    assert decide("POST", "/api/pull", b'{"model":"m"}', {}).status == 403


def test_runner_claim() -> None:
    body = b'{"model":"m"}'
    assert decide("POST", "/api/chat", body, {"runners": ["ollama"]}).allowed
    refused = decide("POST", "/api/chat", body, {"runners": ["other"]})
    assert refused.status == 403 and 'runner "ollama"' in refused.message
    assert "other" not in refused.message  # never the token's content


def test_no_claims_is_refused() -> None:
    decision = Policy(OLLAMA, AUTHZ).decide("GET", "/", None, lambda: b"")
    assert decision.status == 403


@pytest.mark.parametrize(
    ("path", "body", "models"),
    [
        ("/api/chat", {"model": "tiny"}, ["tiny"]),
        ("/api/generate", {"model": "tiny"}, ["tiny"]),
        ("/api/embed", {"model": "tiny"}, ["tiny"]),
        ("/api/embeddings", {"model": "tiny"}, ["tiny"]),
        ("/v1/chat/completions", {"model": "tiny"}, ["tiny"]),
        ("/v1/completions", {"model": "tiny"}, ["tiny"]),
        ("/v1/embeddings", {"model": "tiny"}, ["tiny"]),
        ("/v1/responses", {"model": "tiny"}, ["tiny"]),
        ("/v1/messages", {"model": "tiny"}, ["tiny"]),
        ("/api/show", {"model": "tiny"}, ["tiny"]),
        ("/api/show", {"name": "tiny"}, ["tiny"]),
        ("/api/pull", {"model": "tiny"}, ["tiny"]),
        ("/api/push", {"name": "tiny"}, ["tiny"]),
        ("/api/create", {"model": "tiny2", "from": "tiny"}, ["tiny2", "tiny"]),
        ("/api/copy", {"source": "tiny", "destination": "tiny2"}, ["tiny", "tiny2"]),
    ],
)
def test_model_claim_on_body_routes(path: str, body: dict[str, str], models: list[str]) -> None:
    scope = {"scope": "admin"}
    ok = decide("POST", path, json.dumps(body).encode(), {**scope, "models": ["tiny*"]})
    assert ok.allowed and ok.model == models[0]
    # each named model is checked: swapping any one for a foreign model refuses
    for key in body:
        bad = {**body, key: "secret"}
        refused = decide("POST", path, json.dumps(bad).encode(), {**scope, "models": ["tiny*"]})
        assert refused.status == 403 and 'model "secret"' in refused.message, (path, key)


def test_delete_checks_the_model() -> None:
    claims = {"scope": "models:manage", "models": ["tiny*"]}
    assert decide("DELETE", "/api/delete", b'{"model":"tiny"}', claims).allowed
    assert decide("DELETE", "/api/delete", b'{"name":"secret"}', claims).status == 403


def test_model_and_name_both_checked() -> None:
    claims = {"scope": "models:read", "models": ["tiny*"]}
    body = b'{"model": "tiny", "name": "secret"}'
    assert decide("POST", "/api/show", body, claims).status == 403
    body = b'{"model": "secret", "name": "tiny"}'
    assert decide("POST", "/api/show", body, claims).status == 403


def test_case_folded_key_is_the_model() -> None:
    # Go puts "Model" into the model field: it must be checked.
    claims = {"models": ["tiny*"]}
    assert decide("POST", "/api/chat", b'{"Model": "secret"}', claims).status == 403
    assert decide("POST", "/api/chat", b'{"MODEL": "tiny"}', claims).allowed


def test_restricted_token_must_name_a_model() -> None:
    claims = {"models": ["tiny*"]}
    for body in (b"", b"  \n", b"{}", b'{"model": null}', b'{"prompt": "hi"}'):
        refused = decide("POST", "/api/chat", body, claims)
        assert refused.status == 403 and "names none" in refused.message, body
    # without a models claim there is nothing to check: the runner answers
    assert decide("POST", "/api/chat", b"{}", {}).allowed
    assert decide("POST", "/api/chat", b"", {}).allowed


def test_non_string_model_is_bad_request() -> None:
    assert decide("POST", "/api/chat", b'{"model": 3}', {}).status == 400
    assert decide("POST", "/api/chat", b'["tiny"]', {"models": ["tiny"]}).status == 400


def test_invalid_json_is_400_even_without_restriction() -> None:
    decision = decide("POST", "/api/chat", b"{nope", {})
    assert decision.status == 400 and "invalid JSON" in decision.message


def test_modelfile_cannot_be_checked() -> None:
    body = b'{"model": "tiny2", "modelfile": "FROM secret"}'
    claims = {"scope": "models:manage", "models": ["tiny*"]}
    refused = decide("POST", "/api/create", body, claims)
    assert refused.status == 403 and "modelfile" in refused.message
    assert decide("POST", "/api/create", body, {"scope": "models:manage"}).allowed


def test_path_model() -> None:
    claims = {"models": ["llama3:*"]}
    assert decide("GET", "/v1/models/llama3:8b", b"", claims).allowed
    assert decide("GET", "/v1/models/llama3%3A8b", b"", claims).model == "llama3:8b"
    assert decide("GET", "/v1/models/secret", b"", claims).status == 403


def test_blobs_are_never_parsed() -> None:
    def explode() -> bytes:
        raise AssertionError("blob body read")

    policy = Policy(OLLAMA, AUTHZ)
    claims = {"scope": "models:manage", "models": ["tiny"]}
    assert policy.decide("POST", f"/api/blobs/{DIGEST}", claims, explode).allowed
    assert policy.decide("HEAD", f"/api/blobs/{DIGEST}", claims, explode).allowed


def test_body_read_once_and_only_when_needed() -> None:
    reads: list[int] = []

    def body() -> bytes:
        reads.append(1)
        return b'{"model": "tiny"}'

    policy = Policy(OLLAMA, AUTHZ)
    policy.decide("POST", "/api/signin", {"scope": "admin"}, body)
    policy.decide("GET", "/api/tags", {"models": ["tiny"]}, body)
    assert reads == []
    policy.decide("POST", "/api/copy", {"scope": "admin", "models": ["tiny"]}, body)
    assert reads == [1]


def test_unknown_endpoint_with_models_claim() -> None:
    # Admin, but limited to tiny*: an endpoint the table does not know is
    # refused whatever the body names (which models it touches cannot be
    # known), and its body is not even read.
    claims = {"scope": "admin", "models": ["tiny*"]}
    body = b'{"model": "tiny", "source": "secret", "destination": "tiny2"}'
    assert decide("POST", "/api/%63opy", body, claims).status == 403
    refused = decide("POST", "/api/x", b'{"source":"tiny","destination":"tiny2"}', claims)
    assert refused.status == 403 and "cannot be checked" in refused.message
    assert decide("GET", "/api/%74ags", b"", claims).status == 403
    assert decide("POST", "/api/x", b'{"modelfile": "FROM a"}', claims).status == 403
    assert decide("POST", "/api/x", b"\x00", claims).status == 403
    assert decide("GET", "/api/%74ags", b"", {"scope": "admin"}).allowed


def test_override_runner_uses_its_table_and_exact_names() -> None:
    runner = RunnerSettings(name="vllm", host="h", port=80, path="/vllm", endpoints=RULES)
    claims = {"scope": "inference models:read", "models": ["Qwen/*"]}
    body = b'{"model": "Qwen/Qwen2.5"}'
    assert decide("POST", "/v1/chat/completions", body, claims, runner).allowed
    lower = b'{"model": "qwen/Qwen2.5"}'
    assert decide("POST", "/v1/chat/completions", lower, claims, runner).status == 403
    assert decide("POST", "/api/chat", body, claims, runner).status == 403  # admin there
    listing = decide("GET", "/v1/models", b"", claims, runner)
    assert listing.allowed and listing.transform is not None
    # a path the built-in table does not know: a limited token must name a model
    assert decide("GET", "/health", b"", claims, runner).status == 403
    assert decide("GET", "/health", b"", {"scope": "models:read"}, runner).allowed


# ------------------------------------------------------------------ listings


def test_listing_transform_only_when_restricted() -> None:
    assert decide("GET", "/api/tags", b"", {}).transform is None
    # HEAD too: its Content-Length must be the filtered listing's.
    assert decide("HEAD", "/api/tags", b"", {"models": ["a"]}).transform is not None
    for path in ("/api/tags", "/api/ps", "/v1/models"):
        assert decide("GET", path, b"", {"models": ["a"]}).transform is not None


def _names(data: bytes, key: str, name: str) -> list[str]:
    return [entry[name] for entry in json.loads(data)[key]]


def test_filter_ollama_listing() -> None:
    grant = Grant(frozenset(), ("tiny*", "llama3"))
    upstream = {
        "models": [
            {"name": "tinyllama:latest", "model": "tinyllama:latest", "size": 1},
            {"name": "secret:latest", "model": "secret:latest", "size": 2},
            {"name": "llama3:latest", "model": "llama3:latest", "size": 3},
            {"name": "tiny-alias:latest", "model": "secret:latest"},  # either one foreign: out
            {"size": 4},
            "junk",
        ],
        "other": True,
    }
    out = filter_listing(Listing.OLLAMA, grant)(json.dumps(upstream).encode())
    assert _names(out, "models", "name") == ["tinyllama:latest", "llama3:latest"]
    # Rebuilt, not patched: members beside the list are dropped.
    assert set(json.loads(out)) == {"models"}
    assert json.loads(out)["models"][0]["size"] == 1


def test_filter_openai_listing() -> None:
    grant = Grant(frozenset(), ("tiny*",))
    upstream = {
        "object": "list",
        "data": [
            {"id": "tinyllama:latest", "object": "model", "owned_by": "library"},
            {"id": "secret:latest", "object": "model", "owned_by": "library"},
        ],
    }
    out = filter_listing(Listing.OPENAI, grant)(json.dumps(upstream).encode())
    assert json.loads(out) == {"object": "list", "data": [upstream["data"][0]]}


@pytest.mark.parametrize(
    "upstream",
    [
        b"",
        b"<html>oops</html>",
        b'{"error": "secret:latest failed"}',
        b'{"models": "secret"}',
        b'["secret"]',
        b'{"models": [{"name": "tiny"}], "models": [{"name": "secret"}]}',
    ],
)
def test_unexpected_listing_becomes_empty(upstream: bytes) -> None:
    grant = Grant(frozenset(), ("tiny*",))
    assert json.loads(filter_listing(Listing.OLLAMA, grant)(upstream)) == {"models": []}
    assert json.loads(filter_listing(Listing.OPENAI, grant)(upstream)) == {
        "object": "list",
        "data": [],
    }


# ---------------------------------------------------------------- properties

_KEYS = st.sampled_from(
    ["model", "Model", "MODEL", "name", "source", "\u017fource", "destination", "from", "x", "é"]
)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(st.tuples(_KEYS | st.text(max_size=4), children), max_size=4)
    ),
    max_leaves=12,
)


def _dump(value: Any) -> str:
    """Serialise, writing lists of pairs as objects (so keys may repeat)."""
    if isinstance(value, list) and value and all(isinstance(v, tuple) for v in value):
        return "{" + ",".join(f"{json.dumps(k)}:{_dump(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dump(v) for v in value) + "]"
    return json.dumps(value)


def _go_view(text: str, field: str) -> Any:
    """The value Go's decoder would put in ``field``: the last key folding to it."""
    pairs = json.loads(text, object_pairs_hook=lambda p: p)
    if not isinstance(pairs, list) or (pairs and not isinstance(pairs[0], tuple)):
        return None
    found = None
    for key, value in pairs if pairs else []:
        if go_fold(key) == go_fold(field):
            found = value
    return found


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_JSON)
def test_random_json_never_fools_extraction(value: Any) -> None:
    text = _dump(value)
    keys = ("model", "name", "source", "destination", "from")
    try:
        models, _ = extract_models(parse_body(text.encode()), keys)
    except BadRequest:
        return
    for key in keys:
        seen = _go_view(text, key)
        if isinstance(seen, str):
            assert seen in models  # what the runner uses was checked


def _outcome(decode: Callable[[str], Any], text: str) -> tuple[str, Any]:
    try:
        return "value", decode(text)
    except BadRequest as exc:
        return "refused", str(exc)
    except json.JSONDecodeError as exc:
        return "error", (exc.msg, exc.pos)


_SPACE = st.sampled_from(["", " ", "\t", "\n", "\r", " \r\n "])


@settings(max_examples=400, deadline=None)
@given(
    _SPACE,
    _JSON.map(_dump) | st.text(max_size=12) | st.sampled_from(["", "{", "[1,", '"a', "nul"]),
    _SPACE,
    st.sampled_from(["", "x", "{}", "1", " 2", ",", "]"]),
)
def test_decode_is_the_decoders_own(lead: str, value: str, trail: str, extra: str) -> None:
    """The scanner called directly gives what JSONDecoder.decode gives, value or error."""
    text = lead + value + trail + extra
    assert _outcome(policy._decode, text) == _outcome(policy._DECODER.decode, text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_random_bytes_only_raise_bad_request(body: bytes) -> None:
    with contextlib.suppress(BadRequest):
        parse_body(body)
    decision = decide("POST", "/api/chat", body, {"models": ["tiny*"]})
    assert decision.status in (200, 400, 403)


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([r.path.replace("{model}", "m").replace("{digest}", DIGEST) for r in ROUTES]),
    st.sampled_from(["GET", "HEAD", "POST", "DELETE"]),
    _JSON.map(_dump),
    st.dictionaries(st.sampled_from(["scope", "models", "runners"]), _JSON, max_size=3),
)
def test_decide_never_crashes(path: str, method: str, body: str, claims: dict[str, Any]) -> None:
    decision = decide(method, path, body.encode(), claims)
    assert decision.status in (200, 400, 403)


@given(st.lists(st.text(max_size=6), max_size=3), st.text(max_size=10))
def test_listing_filter_never_leaks(patterns: list[str], name: str) -> None:
    grant = Grant(frozenset(), tuple(patterns))
    body = json.dumps({"models": [{"name": name, "model": name}]}).encode()
    out: Callable[[bytes], bytes] = filter_listing(Listing.OLLAMA, grant)
    kept = json.loads(out(body))["models"]
    assert (kept != []) == grant.allows_model(name)


@given(st.text(max_size=24))
def test_go_fold_ascii_shortcut_matches_the_general_fold(key: str) -> None:
    # go_fold takes str.upper() for ASCII keys; the per-character rule must agree.
    general = "".join(
        ch.upper()
        if ch.isascii()
        else {"\u212a": "K", "\u017f": "S", "\u0130": "I", "\u0131": "I"}.get(
            ch, ch.lower().upper() if len(ch.lower().upper()) == 1 else ch
        )
        for ch in key
    )
    assert go_fold(key) == general


def test_exact_lookup_matches_a_table_scan() -> None:
    # classify's (method, path) dict must give what scanning ROUTES in order gives.
    methods = {m for r in ROUTES for m in r.methods} | {"PATCH", "OPTIONS", "get"}
    for path in {r.path for r in ROUTES if not r.path.endswith("}")}:
        for method in methods:
            first = next((r for r in ROUTES if r.path == path and method in r.methods), None)
            got = classify(method, path)
            if first is None:
                assert got.route == "other" and got.scope == "admin"
            else:
                assert (got.scope, got.route, got.models, got.keys, got.opaque, got.listing) == (
                    first.scope,
                    first.path,
                    first.models,
                    first.keys,
                    first.opaque,
                    first.listing,
                )
                assert got.path_model is None


def test_grant_is_read_once_per_claims_object(monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[object] = []
    real = policy.grant_from_claims

    def counting(claims: Any, authorization: AuthorizationSettings) -> Grant:
        read.append(claims)
        return real(claims, authorization)

    monkeypatch.setattr(policy, "grant_from_claims", counting)
    gate = Policy(OLLAMA, AUTHZ)
    claims = {"scope": "inference", "models": ["tiny*"]}
    first = gate.grant(claims)
    assert first == real(claims, AUTHZ)
    assert gate.grant(claims) is first and read == [claims]
    # Equal claims in another object (another token) are read on their own.
    twin = dict(claims)
    assert gate.grant(twin) == first and read == [claims, twin]
    # A claim error is kept too, and refuses every time.
    bad = {"scope": 7}
    assert isinstance(gate.grant(bad), ClaimError)
    assert isinstance(gate.grant(bad), ClaimError) and read.count(bad) == 1
    assert gate.decide("POST", "/api/chat", bad, lambda: b"{}").status == 403
    # Full: the table starts over rather than grow.
    monkeypatch.setattr(policy, "_GRANTS_KEPT", 3)
    gate.grant({"scope": "admin"})
    assert len(gate._grants) == 1


def test_grant_keyed_by_identity_is_never_stale() -> None:
    # An id can be taken by a new object only once the old one is gone; the
    # table holds its claims, so an entry's id always names the same object.
    gate = Policy(OLLAMA, AUTHZ)
    for n in range(200):
        claims = {"scope": "inference", "models": [f"m{n}"]}
        grant = gate.grant(claims)
        assert isinstance(grant, Grant) and grant.models == (f"m{n}",)
