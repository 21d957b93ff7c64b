"""Property tests: hostile input only ever raises PasetoError.

Random strings and mutations of valid tokens (bit flips, truncation, extra
segments, padding, header swaps) go through every decoding entry point; the
only acceptable outcomes are PasetoError, or (for mutations that leave the
token intact) the original payload.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner_gateway.paseto import (
    PasetoError,
    TokenVerifier,
    V2LocalKey,
    V2SecretKey,
    V4LocalKey,
    V4SecretKey,
    decrypt,
    encrypt,
    footer_kid,
    issue,
    sign,
    verify,
)
from runner_gateway.paseto.encoding import b64decode, b64encode, loads_object

V4_SECRET = V4SecretKey.generate()
V2_SECRET = V2SecretKey.generate()
V4_LOCAL = V4LocalKey.generate()
V2_LOCAL = V2LocalKey.generate()
PAYLOAD = b'{"sub":"alice","exp":"2039-01-01T00:00:00+00:00"}'


def _footer(key: object) -> bytes:
    return b'{"kid":"' + footer_kid(key).encode() + b'"}'  # type: ignore[arg-type]


IMPLICIT = b"gateway"

TOKENS = {
    "v4.public": sign(V4_SECRET, PAYLOAD, _footer(V4_SECRET), IMPLICIT),
    "v4.local": encrypt(V4_LOCAL, PAYLOAD, _footer(V4_LOCAL), IMPLICIT),
    "v2.public": sign(V2_SECRET, PAYLOAD, _footer(V2_SECRET)),
    "v2.local": encrypt(V2_LOCAL, PAYLOAD),
}
V4_VERIFIER = TokenVerifier(
    "v4", [V4_SECRET.public_key()], [V4_LOCAL], implicit_assertion=IMPLICIT, clock=lambda: 0.0
)
V2_VERIFIER = TokenVerifier("v2", [V2_SECRET.public_key()], [V2_LOCAL], clock=lambda: 0.0)

DECODERS: list[Callable[[str], object]] = [
    lambda t: verify(V4_SECRET.public_key(), t, IMPLICIT),
    lambda t: decrypt(V4_LOCAL, t, IMPLICIT),
    lambda t: verify(V2_SECRET.public_key(), t),
    lambda t: decrypt(V2_LOCAL, t),
    V4_VERIFIER.verify,
    V2_VERIFIER.verify,
]
SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_paseto_errors(token: str) -> list[bytes]:
    """Run every decoder; return the payloads of those that accepted the token."""
    accepted = []
    for decode in DECODERS:
        try:
            result = decode(token)
        except PasetoError as exc:
            assert exc.__cause__ is None, "verifier converted an unexpected exception"
            continue
        payload = getattr(result, "payload", None)
        accepted.append(payload if isinstance(payload, bytes) else b"<verified>")
    return accepted


def test_originals_are_accepted() -> None:
    for name, token in TOKENS.items():
        accepted = _only_paseto_errors(token)
        # its own decoder and its version's verifier
        assert accepted == [PAYLOAD, b"<verified>"], name


@SETTINGS
@given(st.text(max_size=300))
def test_random_text(text: str) -> None:
    assert _only_paseto_errors(text) == []


_ALPHABET = st.sampled_from(list('v24.publiclocal=AQ-_+/ \x00é{}"k'))


@SETTINGS
@given(st.lists(_ALPHABET, max_size=120).map("".join))
def test_random_token_shaped_text(text: str) -> None:
    assert _only_paseto_errors(text) == []


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, str]:
    name = draw(st.sampled_from(sorted(TOKENS)))
    token = TOKENS[name]
    kind = draw(
        st.sampled_from(["bitflip", "truncate", "segment", "padding", "char", "header", "body"])
    )
    if kind == "bitflip":
        raw = bytearray(token.encode())
        i = draw(st.integers(0, len(raw) - 1))
        raw[i] ^= 1 << draw(st.integers(0, 7))
        mutated = raw.decode("latin-1")
    elif kind == "truncate":
        mutated = token[: draw(st.integers(0, len(token) - 1))]
    elif kind == "segment":
        mutated = token + "." + draw(st.sampled_from(["", "e30", "AA", "x", token]))
    elif kind == "padding":
        parts = token.split(".")
        i = draw(st.integers(2, len(parts) - 1))
        parts[i] += draw(st.sampled_from(["=", "==", "A=", "\n"]))
        mutated = ".".join(parts)
    elif kind == "char":
        i = draw(st.integers(0, len(token) - 1))
        mutated = token[:i] + draw(st.characters()) + token[i + 1 :]
    elif kind == "header":
        other = draw(st.sampled_from(["v4.public.", "v4.local.", "v2.public.", "v3.local.", ""]))
        mutated = other + token.split(".", 2)[2]
    else:  # re-encode a tampered body (valid base64, wrong bytes)
        head, _, rest = token.partition(".")
        purpose, _, rest = rest.partition(".")
        body, dot, footer = rest.partition(".")
        raw_body = bytearray(b64decode(body))
        if raw_body:
            raw_body[draw(st.integers(0, len(raw_body) - 1))] ^= 0x80
        mutated = f"{head}.{purpose}.{b64encode(bytes(raw_body))}{dot}{footer}"
    return name, mutated


@SETTINGS
@given(mutations())
def test_mutated_tokens(case: tuple[str, str]) -> None:
    name, mutated = case
    accepted = _only_paseto_errors(mutated)
    if mutated != TOKENS[name]:
        # A changed token can at most decode to the original payload (e.g. a
        # bit flip in an unused base64 bit is refused as non-canonical, so
        # nothing should get through at all).
        assert accepted == [], name


@SETTINGS
@given(st.binary(max_size=200))
def test_strict_json_only_raises_value_error(data: bytes) -> None:
    try:
        value = loads_object(data, 8)
    except ValueError:
        return
    assert isinstance(value, dict)


@SETTINGS
@given(st.integers(0, 3000))
def test_deep_json_is_refused_before_parsing(depth: int) -> None:
    text = ("[" * depth + "]" * depth).encode()
    doc = b'{"a":' + text + b"}" if depth else b"{}"
    if depth + 1 > 8:
        with pytest.raises(ValueError):
            loads_object(doc, 8)
    else:
        assert loads_object(doc, 8) is not None


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=10).filter(lambda k: k not in ("exp", "nbf", "iat")),
        st.one_of(st.text(max_size=20), st.integers(-(10**6), 10**6), st.booleans()),
        max_size=8,
    )
)
def test_issued_claims_round_trip(claims: dict[str, object]) -> None:
    claims = {**claims, "exp": "2039-01-01T00:00:00Z"}
    for key in (V4_SECRET, V4_LOCAL):
        token = issue(key, claims, implicit=IMPLICIT)
        assert dict(V4_VERIFIER.verify(token).claims) == claims
