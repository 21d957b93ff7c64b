"""TokenVerifier (claims, key selection, rotation) and build_verifier, on a fake clock."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runner_gateway.paseto import (
    Key,
    LocalKey,
    PasetoError,
    SecretKey,
    TokenVerifier,
    V2LocalKey,
    V2SecretKey,
    V4LocalKey,
    V4SecretKey,
    build_verifier,
    encrypt,
    footer_kid,
    issue,
    parse_rfc3339,
    public_key_pem,
    rfc3339,
    sign,
)
from runner_gateway.settings import PasetoSettings, SettingsError

NOW = 2_000_000_000.0  # 2033-05-18T03:33:20Z
SECRET = V4SecretKey.generate()
PUBLIC = SECRET.public_key()
LOCAL = V4LocalKey.generate()


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _verifier(**kwargs: Any) -> TokenVerifier:
    options: dict[str, Any] = {"clock": FakeClock()}
    options.update(kwargs)
    public = options.pop("public_keys", [PUBLIC])
    local = options.pop("local_keys", [LOCAL])
    return TokenVerifier("v4", public, local, **options)


def _claims(**extra: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"sub": "alice", "exp": rfc3339(NOW + 3600)}
    claims.update(extra)
    return {k: v for k, v in claims.items() if v is not None}


def _reason(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(PasetoError) as err:
        verifier.verify(token)
    return err.value.reason


# ------------------------------------------------------------------ times


def test_rfc3339_parsing() -> None:
    assert parse_rfc3339("2039-01-01T00:00:00+00:00") == 2177452800.0
    assert parse_rfc3339("2039-01-01T00:00:00Z") == 2177452800.0
    assert parse_rfc3339("2039-01-01T01:30:00+01:30") == 2177452800.0
    assert parse_rfc3339("2038-12-31T23:00:00-01:00") == 2177452800.0
    assert parse_rfc3339("2039-01-01t00:00:00.25z") == 2177452800.25
    assert parse_rfc3339("2016-12-31T23:59:60Z") == parse_rfc3339("2017-01-01T00:00:00Z")
    assert rfc3339(2177452800.0) == "2039-01-01T00:00:00+00:00"
    for bad in [
        "2039-01-01",
        "2039-01-01T00:00:00",  # no offset
        "2039-01-01 00:00:00Z",
        "2039-02-30T00:00:00Z",
        "2039-01-01T24:00:00Z",
        "2039-01-01T00:00:00+24:00",
        "0000-01-01T00:00:00Z",
        "2039-01-01T00:00:00.Z",
        "\uff12\uff10\uff13\uff19-01-01T00:00:00Z",  # fullwidth digits
        " 2039-01-01T00:00:00Z",
    ]:
        with pytest.raises(ValueError):
            parse_rfc3339(bad)


def test_valid_token() -> None:
    token = issue(SECRET, _claims(iat=rfc3339(NOW - 10), nbf=rfc3339(NOW - 10)))
    result = _verifier().verify(token)
    assert result.claims["sub"] == "alice"
    assert result.expires_at == NOW + 3600
    assert result.kid == PUBLIC.paserk_id()
    assert result.footer == b""


def test_expired_with_and_without_leeway() -> None:
    token = issue(SECRET, _claims(exp=rfc3339(NOW - 30)))
    assert _verifier(leeway=60).verify(token).expires_at == NOW - 30
    assert _reason(_verifier(leeway=0), token) == "expired"
    clock = FakeClock(NOW + 29)  # exp + leeway still ahead
    verifier = _verifier(leeway=60, clock=clock)
    verifier.verify(token)
    clock.now = NOW + 30  # exactly exp + leeway: expired
    assert _reason(verifier, token) == "expired"


def test_not_before_in_the_future() -> None:
    token = issue(SECRET, _claims(nbf=rfc3339(NOW + 30)))
    assert _reason(_verifier(leeway=0), token) == "not_yet_valid"
    assert _verifier(leeway=60).verify(token).claims["sub"] == "alice"
    token = issue(SECRET, _claims(nbf=rfc3339(NOW + 120)))
    assert _reason(_verifier(leeway=60), token) == "not_yet_valid"


def test_issued_in_the_future() -> None:
    token = issue(SECRET, _claims(iat=rfc3339(NOW + 120)))
    assert _reason(_verifier(leeway=60), token) == "issued_in_future"
    token = issue(SECRET, _claims(iat=rfc3339(NOW + 30)))
    assert _verifier(leeway=60).verify(token).claims["sub"] == "alice"
    assert _reason(_verifier(leeway=0), token) == "issued_in_future"


def test_missing_expiration() -> None:
    token = issue(SECRET, {"sub": "alice"})
    assert _reason(_verifier(), token) == "missing_exp"
    result = _verifier(require_expiration=False).verify(token)
    assert result.expires_at is None


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": 2177452800},
        {"exp": "2039-01-01T00:00:00"},
        {"exp": None},
        {"exp": "2039-01-01T00:00:00Z", "nbf": "tomorrow"},
        {"exp": "2039-01-01T00:00:00Z", "iat": ["2039-01-01T00:00:00Z"]},
    ],
)
def test_malformed_time_claims(claims: dict[str, Any]) -> None:
    token = sign(SECRET, json.dumps(claims).encode())
    assert _reason(_verifier(), token) == "invalid_claims"


def test_issuer_and_audience_exact_match() -> None:
    verifier = _verifier(issuer="https://issuer", audience="gateway")
    good = issue(SECRET, _claims(iss="https://issuer", aud="gateway"))
    assert verifier.verify(good).claims["aud"] == "gateway"
    assert _reason(verifier, issue(SECRET, _claims(aud="gateway"))) == "wrong_issuer"
    bad_iss = issue(SECRET, _claims(iss="https://issuer/", aud="gateway"))
    assert _reason(verifier, bad_iss) == "wrong_issuer"
    assert _reason(verifier, issue(SECRET, _claims(iss="https://issuer"))) == "wrong_audience"
    listed = issue(SECRET, _claims(iss="https://issuer", aud=["gateway"]))
    assert _reason(verifier, listed) == "wrong_audience"  # PASETO aud is one string
    # Not configured: not checked.
    assert _verifier().verify(listed).claims["iss"] == "https://issuer"


# ------------------------------------------------------------ payloads


@pytest.mark.parametrize(
    "payload",
    [b"[]", b'"x"', b"\xff\xfe", b'{"a":1,"a":2}', b"{", b'{"a":NaN}', b"[" * 20 + b"]" * 20],
)
def test_payload_must_be_a_strict_json_object(payload: bytes) -> None:
    assert _reason(_verifier(), sign(SECRET, payload)) == "malformed"
    assert _reason(_verifier(), encrypt(LOCAL, payload)) == "malformed"


def test_deep_claims_are_refused() -> None:
    deep = b'{"exp":"2039-01-01T00:00:00Z","x":' + b"[" * 16 + b"]" * 16 + b"}"
    assert _reason(_verifier(), sign(SECRET, deep)) == "malformed"
    shallow = b'{"exp":"2039-01-01T00:00:00Z","x":' + b"[" * 15 + b"]" * 15 + b"}"
    _verifier().verify(sign(SECRET, shallow))


def test_wrong_version_and_purpose() -> None:
    verifier = _verifier()
    assert _reason(verifier, issue(V2SecretKey.generate(), _claims())) == "wrong_version"
    assert _reason(verifier, "v3.local.AAAA") == "wrong_version"
    assert _reason(verifier, "garbage") == "malformed"
    assert _reason(verifier, "v4.secret.AAAA") == "malformed"
    public_only = _verifier(local_keys=[])
    assert _reason(public_only, issue(LOCAL, _claims())) == "wrong_purpose"
    local_only = _verifier(public_keys=[])
    assert _reason(local_only, issue(SECRET, _claims())) == "wrong_purpose"
    assert _reason(verifier, "v4.public." + "A" * 9000) == "too_large"


def test_keys_of_the_wrong_version_are_refused_at_construction() -> None:
    with pytest.raises(TypeError):
        TokenVerifier("v4", [V2SecretKey.generate().public_key()])
    with pytest.raises(TypeError):
        TokenVerifier("v4", [], [V2LocalKey.generate()])
    with pytest.raises(TypeError):
        TokenVerifier("v4", [SECRET])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        TokenVerifier("v4", [], [LOCAL.raw])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        TokenVerifier("v3", [PUBLIC])
    with pytest.raises(ValueError):
        TokenVerifier("v2", [], [V2LocalKey.generate()], implicit_assertion=b"x")


def test_implicit_assertion() -> None:
    verifier = _verifier(implicit_assertion=b"tenant-a")
    assert verifier.verify(issue(SECRET, _claims(), implicit=b"tenant-a")).claims
    assert _reason(verifier, issue(SECRET, _claims())) == "invalid_signature"
    assert _reason(verifier, issue(LOCAL, _claims(), implicit=b"tenant-b")) == "invalid_mac"


# -------------------------------------------------------- key selection


def test_kid_selects_exactly_one_key(monkeypatch: pytest.MonkeyPatch) -> None:
    other = V4SecretKey.generate()
    verifier = _verifier(public_keys=[other.public_key(), PUBLIC])
    tried: list[str] = []
    from runner_gateway.paseto.protocol import verify as real

    def spy(key: Any, token: str, implicit: bytes = b"") -> Any:
        tried.append(key.paserk_id())
        return real(key, token, implicit)

    monkeypatch.setattr("runner_gateway.paseto.verifier.verify", spy)
    token = issue(SECRET, _claims(), {"kid": footer_kid(SECRET)})
    assert verifier.verify(token).kid == PUBLIC.paserk_id()
    assert tried == [PUBLIC.paserk_id()]
    # kid naming the other configured key: only that key is tried, and it fails.
    tried.clear()
    forged = issue(SECRET, _claims(), {"kid": footer_kid(other)})
    assert _reason(verifier, forged) == "invalid_signature"
    assert tried == [other.public_key().paserk_id()]
    # No kid: every key is tried, in order.
    tried.clear()
    assert verifier.verify(issue(SECRET, _claims())).kid == PUBLIC.paserk_id()
    assert tried == [other.public_key().paserk_id(), PUBLIC.paserk_id()]


def test_unknown_kid() -> None:
    verifier = _verifier()
    stranger = V4SecretKey.generate()
    token = issue(stranger, _claims(), {"kid": footer_kid(stranger)})
    assert _reason(verifier, token) == "unknown_kid"
    # Even a token our key signed: a kid we do not have is refused, not searched.
    token = issue(SECRET, _claims(), {"kid": footer_kid(stranger)})
    assert _reason(verifier, token) == "unknown_kid"
    # A local key id on a public token, or a v2 id, is unknown too.
    assert _reason(verifier, issue(SECRET, _claims(), {"kid": footer_kid(LOCAL)})) == (
        "unknown_kid"
    )
    v2_id = V2SecretKey(SECRET.raw).public_key().paserk_id()
    assert _reason(verifier, issue(SECRET, _claims(), {"kid": v2_id})) == "unknown_kid"
    # The secret key's own id (sid) is not how verifiers name keys.
    assert _reason(verifier, issue(SECRET, _claims(), {"kid": SECRET.paserk_id()})) == (
        "unknown_kid"
    )


def test_non_paserk_kid_and_non_json_footer_try_all_keys() -> None:
    verifier = _verifier()
    token = issue(SECRET, _claims(), {"kid": "zVhMiPBP9fRf2snEcT7gFTioeA9COcNy9DfgL1W60haN"})
    assert verifier.verify(token).kid == PUBLIC.paserk_id()
    token = sign(SECRET, issue_payload(), b"arbitrary-string-that-isn't-json")
    assert verifier.verify(token).footer == b"arbitrary-string-that-isn't-json"


def issue_payload() -> bytes:
    return json.dumps(_claims()).encode()


@pytest.mark.parametrize(
    "footer",
    [
        b'{"kid":"a","kid":"b"}',
        b'{"kid":1}',
        b"{",
        b'{"x":' + b"[" * 8 + b"]" * 8 + b"}",
    ],
)
def test_bad_json_footers_are_malformed(footer: bytes) -> None:
    assert _reason(_verifier(), sign(SECRET, issue_payload(), footer)) == "malformed"


def test_rotation_with_two_keys() -> None:
    old, new = V4SecretKey.generate(), V4SecretKey.generate()
    old_local, new_local = V4LocalKey.generate(), V4LocalKey.generate()
    verifier = _verifier(
        public_keys=[new.public_key(), old.public_key()], local_keys=[new_local, old_local]
    )
    cases: list[tuple[SecretKey | LocalKey, Key]] = [
        (old, old.public_key()),
        (new, new.public_key()),
        (old_local, old_local),
        (new_local, new_local),
    ]
    for key, expected in cases:
        for footer in (None, {"kid": footer_kid(key)}):
            assert verifier.verify(issue(key, _claims(), footer)).kid == expected.paserk_id()
    # After the old key is dropped, its tokens fail (with or without kid).
    after = _verifier(public_keys=[new.public_key()], local_keys=[new_local])
    assert _reason(after, issue(old, _claims())) == "invalid_signature"
    assert _reason(after, issue(old, _claims(), {"kid": footer_kid(old)})) == "unknown_kid"
    assert _reason(after, issue(old_local, _claims())) == "invalid_mac"


def test_v2_verifier() -> None:
    secret, local = V2SecretKey.generate(), V2LocalKey.generate()
    verifier = TokenVerifier("v2", [secret.public_key()], [local], clock=FakeClock())
    assert verifier.verify(issue(secret, _claims(), {"kid": footer_kid(secret)})).claims
    assert verifier.verify(issue(local, _claims())).claims
    assert _reason(verifier, issue(SECRET, _claims())) == "wrong_version"


def test_errors_never_carry_token_content() -> None:
    secret_value = "very-secret-claim-value"
    token = issue(SECRET, _claims(exp=rfc3339(NOW - 3600), note=secret_value))
    with pytest.raises(PasetoError) as err:
        _verifier().verify(token)
    assert secret_value not in str(err.value)
    assert token[10:40] not in str(err.value)


# --------------------------------------------------------- build_verifier


def _settings(**kwargs: Any) -> PasetoSettings:
    kwargs.setdefault("public_path", "/nonexistent/paseto.pub")
    return PasetoSettings(**kwargs)


def test_build_verifier_from_all_sources(tmp_path: Path) -> None:
    pub_file = tmp_path / "paseto.pub"
    pub_file.write_bytes(public_key_pem(PUBLIC))
    second, rotated = V4SecretKey.generate(), V4LocalKey.generate()
    settings = _settings(
        public_path=str(pub_file),
        public_keys=(second.public_key().paserk(),),
        secret_key=LOCAL.raw.hex(),
        secret_keys=(rotated.paserk(),),
        issuer="iss",
        audience="aud",
        leeway=5.0,
        implicit_assertion="ctx",
    )
    clock = FakeClock()
    verifier = build_verifier(settings, clock=clock)
    assert set(verifier.key_ids) == {
        PUBLIC.paserk_id(),
        second.public_key().paserk_id(),
        LOCAL.paserk_id(),
        rotated.paserk_id(),
    }
    claims = _claims(iss="iss", aud="aud")
    for key in (SECRET, second, LOCAL, rotated):
        assert verifier.verify(issue(key, claims, implicit=b"ctx")).claims["sub"] == "alice"
    assert _reason(verifier, issue(SECRET, claims)) == "invalid_signature"  # implicit
    clock.now = NOW + 3600 + 5
    assert _reason(verifier, issue(SECRET, claims, implicit=b"ctx")) == "expired"


def test_build_verifier_missing_public_file_is_skipped() -> None:
    verifier = build_verifier(_settings(secret_key=LOCAL.paserk()))
    assert verifier.key_ids == (LOCAL.paserk_id(),)


def test_build_verifier_without_any_key() -> None:
    with pytest.raises(SettingsError) as err:
        build_verifier(_settings())
    assert err.value.source == "paseto"
    assert err.value.key == ""
    assert "no verification key" in err.value.message


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("secret_key", "ab" * 31, "paseto.secretKey"),
        ("secret_key", V2LocalKey.generate().paserk(), "paseto.secretKey"),
        ("secret_keys", ("00" * 32, "nope-" + "cd" * 40), "paseto.secretKeys[1]"),
        ("public_keys", ("ssh-ed25519 AAAAnope",), "paseto.publicKeys[0]"),
        ("public_keys", (SECRET.paserk(),), "paseto.publicKeys[0]"),
    ],
)
def test_build_verifier_names_the_bad_key(field: str, value: Any, key: str) -> None:
    with pytest.raises(SettingsError) as err:
        build_verifier(_settings(**{field: value}))
    assert err.value.source == "settings"
    assert err.value.key == key
    text = str(err.value)
    for item in value if isinstance(value, tuple) else (value,):
        assert item not in text
        assert item.split(".")[-1] not in text
    if field.startswith("secret"):
        assert err.value.message == "expected 64 hex digits or a k4.local. PASERK"


def test_build_verifier_bad_public_file(tmp_path: Path) -> None:
    pub_file = tmp_path / "paseto.pub"
    pub_file.write_text(LOCAL.raw.hex()[:-2])
    with pytest.raises(SettingsError) as err:
        build_verifier(_settings(public_path=str(pub_file)))
    assert err.value.source == str(pub_file)
    assert err.value.key == "paseto.publicPath"
    assert LOCAL.raw.hex()[:-2] not in str(err.value)


def test_build_verifier_v2() -> None:
    local = V2LocalKey.generate()
    verifier = build_verifier(_settings(version="v2", secret_key=local.paserk()))
    assert verifier.verify(issue(local, _claims())).claims["sub"] == "alice"
    with pytest.raises(SettingsError) as err:
        build_verifier(_settings(version="v2", secret_key=LOCAL.paserk()))
    assert err.value.message == "expected 64 hex digits or a k2.local. PASERK"
    with pytest.raises(SettingsError) as err:
        build_verifier(_settings(version="v2", secret_key=local.paserk(), implicit_assertion="x"))
    assert err.value.key == "paseto.implicitAssertion"


def test_measure_verifier() -> None:
    """Prints the cost of a full TokenVerifier.verify (signature + claims), not asserted."""
    import time

    verifier = _verifier()
    token = issue(SECRET, _claims(iat=rfc3339(NOW)), {"kid": footer_kid(SECRET)})
    started = time.perf_counter()
    for _ in range(300):
        verifier.verify(token)
    per_call = (time.perf_counter() - started) / 300
    print(f"\nTokenVerifier.verify (v4.public with kid): {per_call * 1e6:.1f} us")
    assert per_call > 0
