"""The revocation list (revocation.py) and its use by the auth layer and its cache."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock as TaskClock
from twisted.logger import capturedLogs

from runner_gateway.auth import AuthResource, TokenCache
from runner_gateway.paseto import TokenVerifier, V4SecretKey, issue, rfc3339
from runner_gateway.revocation import (
    Revocation,
    RevocationError,
    RevocationList,
    RevocationState,
    dump,
    merge,
    parse,
    precise_rfc3339,
)
from runner_gateway.revocation_feed import RevocationFeed
from runner_gateway.settings import Settings, SettingsError, load_settings
from tests.test_auth import NOW, Clock, CountingVerifier, Recorder, bearer, stamp, www

T0 = 1_700_000_000.0


def entry(**raw: Any) -> Revocation:
    return Revocation.from_mapping(raw)


def test_jti_sub_and_kid_entries() -> None:
    revoked = RevocationList(
        [
            entry(jti="j1", reason="leaked"),
            entry(sub="alice", before=precise_rfc3339(T0)),
            entry(kid="k4.pid.old"),
        ]
    )
    assert revoked.is_revoked({"jti": "j1", "sub": "bob"}, None)
    assert not revoked.is_revoked({"jti": "j2", "sub": "bob"}, "k4.pid.new")
    assert revoked.is_revoked({"sub": "bob"}, "k4.pid.old")
    # sub: only tokens issued before the cut-off, compared to the microsecond.
    assert revoked.is_revoked({"sub": "alice", "iat": precise_rfc3339(T0 - 0.000001)}, None)
    assert not revoked.is_revoked({"sub": "alice", "iat": precise_rfc3339(T0)}, None)
    assert not revoked.is_revoked({"sub": "alice", "iat": precise_rfc3339(T0 + 0.000001)}, None)
    # Whole-second iat of the same second reads as earlier: refused (the safe side).
    mid_second = RevocationList([entry(sub="alice", before=precise_rfc3339(T0 + 0.3))])
    assert mid_second.is_revoked({"sub": "alice", "iat": rfc3339(T0 + 0.5)}, None)
    # No iat, or one that cannot be read: it cannot show it came later.
    assert revoked.is_revoked({"sub": "alice"}, None)
    assert revoked.is_revoked({"sub": "alice", "iat": "yesterday"}, None)
    assert revoked.check({"jti": "j1"}, None) == entry(jti="j1", reason="leaked")
    # Non-string claims never match (and never raise).
    assert not revoked.is_revoked({"jti": ["j1"], "sub": {"a": 1}}, None)


def test_expired_entries_are_dropped_and_merge_keeps_the_latest_cut_off() -> None:
    old = entry(sub="alice", before=precise_rfc3339(T0))
    new = entry(sub="alice", before=precise_rfc3339(T0 + 10))
    assert merge([new], [old]) == [new]
    assert merge([old], [new]) == [new]
    gone = entry(jti="j", expires=rfc3339(T0))
    assert len(RevocationList([gone], now=T0 - 1)) == 1
    assert len(RevocationList([gone], now=T0)) == 0


@pytest.mark.parametrize("yaml_form", [True, False])
def test_round_trip_through_both_file_forms(yaml_form: bool) -> None:
    entries = [
        entry(jti="j1", reason="leaked: ünïcode", at=rfc3339(T0), expires=rfc3339(T0 + 60)),
        entry(sub="alice", before=precise_rfc3339(T0)),
        entry(kid="k4.pid.abc"),
    ]
    text = dump(entries, yaml_form)
    assert text.lstrip().startswith("{") != yaml_form
    assert parse(text) == entries
    assert parse(dump([], yaml_form)) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"jti": "a"}\nnot json\n', "line 2: not JSON"),
        ('{"jti": "a", "sub": "b"}\n', "exactly one of jti, sub, kid"),
        ('{"sub": "b"}\n', "needs before"),
        ('{"jti": "a", "before": "2020-01-01T00:00:00Z"}\n', "sub entries only"),
        ('{"kid": "nope"}\n', "PASERK id"),
        ('{"jti": "a", "colour": "red"}\n', "unknown field"),
        ('{"jti": ""}\n', "non-empty"),
        ('{"jti": "a", "expires": "soon"}\n', "expires is not an RFC 3339"),
        ("- jti: a\n- 3\n", "entry 2: an entry must be a mapping"),
        ("jti: a\n", "expected a YAML list"),
        ("- [unclosed\n", "neither JSON lines nor valid YAML"),
    ],
)
def test_bad_files_are_refused_with_the_place(text: str, message: str) -> None:
    with pytest.raises(RevocationError, match=message):
        parse(text, "rev.jsonl")


def test_state_generation_moves_only_on_change() -> None:
    state = RevocationState()
    assert not state.set_file([], T0)
    assert state.generation == 0
    assert state.set_file([entry(jti="a")], T0)
    assert not state.set_file([entry(jti="a")], T0)
    assert state.add_shared([entry(jti="b")], T0)
    assert state.generation == 2
    assert state.check({"jti": "b"}, None) is not None
    # An empty list re-read from Redis (restarted without its data) keeps what we have.
    assert not state.add_shared([], T0)
    assert state.check({"jti": "b"}, None) is not None
    assert state.set_file([], T0)
    assert state.check({"jti": "a"}, None) is None
    assert state.check({"jti": "b"}, None) is not None


# ------------------------------------------------------------------ auth layer


class RevEnv:
    def __init__(self) -> None:
        self.clock = Clock()
        self.key = V4SecretKey.generate()
        self.verifier = CountingVerifier(
            TokenVerifier("v4", public_keys=[self.key.public_key()], clock=self.clock)
        )
        self.state = RevocationState()
        self.cache = TokenCache(100, revocations=self.state)
        self.auth = AuthResource(Recorder(), self.verifier, self.cache, self.clock)  # type: ignore[arg-type]

    def token(self, **claims: Any) -> str:
        body = {"sub": "alice", "exp": stamp(NOW + 3600), "iat": precise_rfc3339(NOW - 5)}
        body.update(claims)
        return issue(self.key, body)

    def call(self, token: str) -> tuple[int, Any, str]:
        from twisted.web.test.requesthelper import DummyRequest

        from runner_gateway.context import RequestContext

        request = DummyRequest([])
        ctx = RequestContext(request_id="r", started=0.0, upstream_path=b"/api/tags")
        request.gateway_context = ctx  # type: ignore[attr-defined]
        request.requestHeaders.addRawHeader(b"authorization", bearer(token)[0])
        body = self.auth.render(request)  # type: ignore[arg-type]
        assert isinstance(body, bytes)
        return request.responseCode or 200, ctx.auth_failure, body.decode()


def test_revoked_token_is_refused_even_when_cached() -> None:
    env = RevEnv()
    token, other = env.token(jti="j1"), env.token(jti="j2")
    assert env.call(token)[0] == 200  # verified and cached
    assert env.call(other)[0] == 200
    assert env.call(token)[0] == 200
    assert env.verifier.calls == 2  # the third call was a cache hit
    env.state.set_file([entry(jti="j1", reason="secret reason")], NOW)
    status, failure, body = env.call(token)
    assert (status, failure) == (401, "revoked")
    assert "token has been revoked" in body and "secret reason" not in body
    assert env.call(other)[0] == 200  # re-checked once, still good, still cached
    calls = env.verifier.calls
    assert env.call(other)[0] == 200
    assert env.verifier.calls == calls
    # A revoked token is never cached: every try is verified and refused.
    assert env.call(token)[1] == "revoked"
    assert env.verifier.calls == calls + 1


def test_revoked_challenge_header() -> None:
    env = RevEnv()
    env.state.set_file([entry(kid=env.verifier.inner.key_ids[0])], NOW)
    from twisted.web.test.requesthelper import DummyRequest

    from runner_gateway.context import RequestContext

    request = DummyRequest([])
    request.gateway_context = RequestContext(request_id="r", started=0.0)  # type: ignore[attr-defined]
    request.requestHeaders.addRawHeader(b"authorization", bearer(env.token())[0])
    env.auth.render(request)  # type: ignore[arg-type]
    assert request.responseCode == 401
    assert www(request) == [
        b'Bearer realm="runner-gateway", error="invalid_token", '
        b'error_description="token has been revoked"'
    ]


def test_sub_revocation_spares_tokens_issued_afterwards() -> None:
    env = RevEnv()
    before = env.token(iat=precise_rfc3339(NOW - 1))
    assert env.call(before)[0] == 200
    env.state.set_file([entry(sub="alice", before=precise_rfc3339(NOW))], NOW)
    assert env.call(before)[1] == "revoked"
    assert env.call(env.token(iat=precise_rfc3339(NOW + 0.000001)))[0] == 200
    assert env.call(env.token(sub="bob", iat=precise_rfc3339(NOW - 1)))[0] == 200


# ------------------------------------------------------------------ the file feed


def _settings(tmp_path: Any, path: str) -> Settings:
    (tmp_path / "settings.yaml").write_text(f"paseto:\n  revocationPath: {path}\n")
    return load_settings(tmp_path, environ={})


def test_feed_polls_the_file_and_keeps_the_last_good_list(tmp_path: Any) -> None:
    path = tmp_path / "revoked.jsonl"
    path.write_text(json.dumps({"jti": "a"}) + "\n")
    clock = TaskClock()
    state = RevocationState()
    feed = RevocationFeed(state, _settings(tmp_path, str(path)), clock)
    assert state.check({"jti": "a"}, None) is not None
    feed.start()
    replacement = tmp_path / "tmp"
    replacement.write_text(json.dumps({"jti": "b"}) + "\n")
    replacement.rename(path)
    clock.advance(0.25)
    assert state.check({"jti": "a"}, None) is None
    assert state.check({"jti": "b"}, None) is not None
    with capturedLogs() as events:
        path.write_text("garbage\n")
        clock.advance(0.25)
        clock.advance(0.25)
    assert state.check({"jti": "b"}, None) is not None  # kept
    assert [str(e.get("log_level")) for e in events].count("<LogLevel=error>") == 1
    assert feed.problems() == {
        "revocations": "the revocation file could not be read; using the last list"
    }
    path.unlink()  # gone: no revocations
    clock.advance(0.25)
    assert len(state) == 0 and feed.problems() == {}
    feed.stop()


def test_feed_keeps_no_timer_without_a_file_and_polls_once_a_reload_names_one(
    tmp_path: Any,
) -> None:
    # Without a path the feed has nothing to poll: no timer waking the reactor.
    clock = TaskClock()
    state = RevocationState()
    feed = RevocationFeed(state, _settings(tmp_path, ""), clock)
    feed.start()
    assert clock.getDelayedCalls() == []
    path = tmp_path / "revoked.jsonl"
    path.write_text(json.dumps({"jti": "a"}) + "\n")
    feed.configure(_settings(tmp_path, str(path)))  # SIGHUP with a path now
    assert state.check({"jti": "a"}, None) is not None
    replacement = tmp_path / "tmp"
    replacement.write_text(json.dumps({"jti": "b"}) + "\n")
    replacement.rename(path)
    clock.advance(0.25)
    assert state.check({"jti": "b"}, None) is not None
    feed.configure(_settings(tmp_path, ""))  # and without one again
    assert clock.getDelayedCalls() == [] and len(state) == 0
    feed.stop()


def test_feed_refuses_a_bad_file_at_start(tmp_path: Any) -> None:
    path = tmp_path / "revoked.yaml"
    path.write_text("- jti: a\n- sub: b\n")
    with pytest.raises(SettingsError, match=r"paseto.revocationPath: .*entry 2: .*needs before"):
        RevocationFeed(RevocationState(), _settings(tmp_path, str(path)), TaskClock())


# ------------------------------------------------------------------ metrics and SIGHUP


def test_revoked_refusals_and_the_list_are_metrics() -> None:
    from tests.test_metrics import make, request, value

    metrics, clock = make()
    state = RevocationState()

    metrics.watch_shared_state(state, None)
    assert value(metrics, "runner_gateway_auth_failures_total", reason="revoked") == 0
    request(metrics, clock, status=401, body=None, auth_failure="revoked", sub=None)
    assert value(metrics, "runner_gateway_auth_failures_total", reason="revoked") == 1
    assert value(metrics, "runner_gateway_revocations") == 0
    state.set_file([entry(jti="a"), entry(kid="k4.pid.x")], NOW)
    assert value(metrics, "runner_gateway_revocations") == 2
    assert value(metrics, "runner_gateway_redis_up") is None  # no redis.url, no gauge


def test_sighup_reload_reads_the_file_at_once(tmp_path: Any) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from runner_gateway.service import GatewayService

    path = tmp_path / "revoked.jsonl"
    key = V4SecretKey.generate().public_key().paserk()
    (tmp_path / "settings.yaml").write_text(
        f"paseto:\n  revocationPath: {path}\n  publicKeys: [{key}]\n"
    )
    service = GatewayService(lambda: load_settings(tmp_path, environ={}), MemoryReactorClock())
    assert len(service.revocations) == 0
    path.write_text(json.dumps({"jti": "a"}) + "\n")
    # No poll has run (the service is not started): the reload reads the file itself.
    assert service.reload()
    assert service.revocations.check({"jti": "a"}, None) is not None


_entries = st.builds(
    lambda kind, value, offset: entry(
        **{kind: value}, **({"before": precise_rfc3339(T0 + offset)} if kind == "sub" else {})
    ),
    st.sampled_from(["jti", "sub", "kid"]),
    st.sampled_from(["k4.pid.a", "k4.pid.b"]),
    st.integers(-3, 3),
)


@given(st.lists(st.tuples(st.booleans(), st.lists(_entries, max_size=4)), max_size=8))
def test_state_updates_match_a_list_built_from_scratch(
    steps: list[tuple[bool, list[Revocation]]],
) -> None:
    """Published entries are added in place; the result is the merge of all sources."""
    state = RevocationState()
    file: list[Revocation] = []
    shared: list[Revocation] = []
    for is_file, entries in steps:
        generation = state.generation
        before = set(state.current.entries)
        if is_file:
            file = entries
            state.set_file(entries, T0)
        else:
            shared += entries
            state.add_shared(entries, T0)
        expected = RevocationList(merge(file, shared), now=T0)
        assert set(state.current.entries) == set(expected.entries)
        assert (state.generation != generation) == (before != set(expected.entries)) or is_file
