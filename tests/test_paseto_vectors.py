"""PASETO v2/v4 against the official test vectors, plus the primitives under them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import nacl.bindings
import pytest

from runner_gateway.paseto import (
    Decoded,
    PasetoError,
    V2LocalKey,
    V2PublicKey,
    V2SecretKey,
    V4LocalKey,
    V4PublicKey,
    V4SecretKey,
    decrypt,
    encrypt,
    issue,
    sign,
    verify,
)
from runner_gateway.paseto.encoding import b64decode, b64encode, pae
from runner_gateway.paseto.xchacha import hchacha20, xchacha20_xor

VECTORS = Path(__file__).parent / "vectors"
CLASSES = {
    "v2": (V2LocalKey, V2PublicKey, V2SecretKey),
    "v4": (V4LocalKey, V4PublicKey, V4SecretKey),
}


def _cases(version: str) -> list[Any]:
    tests = json.loads((VECTORS / f"{version}.json").read_text())["tests"]
    return [pytest.param(version, case, id=case["name"]) for case in tests]


ALL_CASES = _cases("v2") + _cases("v4")


def _implicit(version: str, case: dict[str, Any]) -> bytes:
    # v2 has no implicit assertions: the vectors' "discarded-anyway" is ignored.
    return case["implicit-assertion"].encode() if version == "v4" else b""


def test_vector_files_are_all_covered() -> None:
    assert len(ALL_CASES) == 15 + 17
    assert sum(1 for p in ALL_CASES if p.values[1]["expect-fail"]) == 3 + 5


@pytest.mark.parametrize(("version", "case"), ALL_CASES)
def test_vector(version: str, case: dict[str, Any]) -> None:
    local_cls, public_cls, secret_cls = CLASSES[version]
    footer = case["footer"].encode()
    implicit = _implicit(version, case)
    if "key" in case:  # local
        key = local_cls(bytes.fromhex(case["key"]))
        if case["expect-fail"]:
            with pytest.raises(PasetoError):
                decrypt(key, case["token"], implicit)
            return
        token = encrypt(
            key, case["payload"].encode(), footer, implicit, nonce=bytes.fromhex(case["nonce"])
        )
        assert token == case["token"]
        assert decrypt(key, token, implicit) == Decoded(case["payload"].encode(), footer)
        return
    secret = secret_cls(bytes.fromhex(case["secret-key"]))
    public = public_cls(bytes.fromhex(case["public-key"]))
    assert secret.public_key() == public
    assert secret.seed == bytes.fromhex(case["secret-key-seed"])
    if case["expect-fail"]:
        with pytest.raises(PasetoError):
            verify(public, case["token"], implicit)
        return
    token = sign(secret, case["payload"].encode(), footer, implicit)
    assert token == case["token"]
    assert verify(public, token, implicit) == Decoded(case["payload"].encode(), footer)


def test_expect_fail_reasons() -> None:
    """The failing vectors fail for the reason they were written for."""
    reasons = {}
    for param in ALL_CASES:
        version, case = param.values
        if not case["expect-fail"]:
            continue
        local_cls, public_cls, _ = CLASSES[version]
        with pytest.raises(PasetoError) as err:
            if "key" in case:
                decrypt(local_cls(bytes.fromhex(case["key"])), case["token"], b"")
            else:
                verify(public_cls(bytes.fromhex(case["public-key"])), case["token"], b"")
        reasons[case["name"]] = err.value.reason
    assert reasons == {
        "2-F-1": "wrong_purpose",
        "2-F-2": "wrong_purpose",
        "2-F-3": "wrong_version",
        "4-F-1": "wrong_purpose",
        "4-F-2": "wrong_purpose",
        "4-F-3": "wrong_version",
        "4-F-4": "malformed",
        "4-F-5": "malformed",
    }


# ------------------------------------------------------------ XChaCha20

DRAFT_KEY = bytes(range(0x80, 0xA0))
DHOLE = (
    b'The dhole (pronounced "dole") is also known as the Asiatic wild dog, red dog, and '
    b"whistling dog. It is about the size of a German shepherd but looks more like a "
    b"long-legged fox. This highly elusive and skilled jumper is classified with wolves, "
    b"coyotes, jackals, and foxes in the taxonomic family Canidae."
)


def test_hchacha20_draft_vector() -> None:
    # draft-irtf-cfrg-xchacha-03, section 2.2.1
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    assert hchacha20(key, nonce).hex() == (
        "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
    )


def test_xchacha20_draft_keystream_vector() -> None:
    # draft-irtf-cfrg-xchacha-03, appendix A.3.2 (the keystream starts at block 1)
    nonce = bytes.fromhex("404142434445464748494a4b4c4d4e4f5051525354555658")
    keystream = (
        "29624b4b1b140ace53740e405b2168540fd7d630c1f536fecd722fc3cddba7f4"
        "cca98cf9e47e5e64d115450f9b125b54449ff76141ca620a1f9cfcab2a1a8a25"
        "5e766a5266b878846120ea64ad99aa479471e63befcbd37cd1c22a221fe46221"
        "5cf32c74895bf505863ccddd48f62916dc6521f1ec50a5ae08903aa259d9bf60"
        "7cd8026fba548604f1b6072d91bc91243a5b845f7fd171b02edc5a0a84cf28dd"
        "241146bc376e3f48df5e7fee1d11048c190a3d3deb0feb64b42d9c6fdeee290f"
        "a0e6ae2c26c0249ea8c181f7e2ffd100cbe5fd3c4f8271d62b15330cb8fdcf00"
        "b3df507ca8c924f7017b7e712d15a2eb5c50484451e54e1b4b995bd8fdd94597"
        "bb94d7af0b2c04df10ba0890899ed9293a0f55b8bafa999264035f1d4fbe7fe0"
        "aafa109a62372027e50e10cdfecca127"
    )
    ciphertext = (
        "7d0a2e6b7f7c65a236542630294e063b7ab9b555a5d5149aa21e4ae1e4fbce87"
        "ecc8e08a8b5e350abe622b2ffa617b202cfad72032a3037e76ffdcdc4376ee05"
        "3a190d7e46ca1de04144850381b9cb29f051915386b8a710b8ac4d027b8b050f"
        "7cba5854e028d564e453b8a968824173fc16488b8970cac828f11ae53cabd201"
        "12f87107df24ee6183d2274fe4c8b1485534ef2c5fbc1ec24bfc3663efaa08bc"
        "047d29d25043532db8391a8a3d776bf4372a6955827ccb0cdd4af403a7ce4c63"
        "d595c75a43e045f0cce1f29c8b93bd65afc5974922f214a40b7c402cdb91ae73"
        "c0b63615cdad0480680f16515a7ace9d39236464328a37743ffc28f4ddb324f4"
        "d0f5bbdc270c65b1749a6efff1fbaa09536175ccd29fb9e6057b307320d31683"
        "8a9c71f70b5b5907a66f7ea49aadc409"
    )
    assert len(DHOLE) == len(bytes.fromhex(keystream)) == 304
    assert xchacha20_xor(DRAFT_KEY, nonce, bytes(304), counter=1).hex() == keystream
    assert xchacha20_xor(DRAFT_KEY, nonce, DHOLE, counter=1).hex() == ciphertext
    assert xchacha20_xor(DRAFT_KEY, nonce, bytes.fromhex(ciphertext), counter=1) == DHOLE


@pytest.mark.parametrize("length", [0, 1, 63, 64, 65, 200, 1000])
def test_xchacha20_matches_libsodium_aead_stream(length: int) -> None:
    """libsodium's XChaCha20-Poly1305 encrypts with the same stream from block 1."""
    key, nonce, message = os.urandom(32), os.urandom(24), os.urandom(length)
    sealed = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(message, b"", nonce, key)
    assert xchacha20_xor(key, nonce, message, counter=1) == sealed[:-16]


def test_xchacha20_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        xchacha20_xor(bytes(31), bytes(24), b"x")
    with pytest.raises(ValueError):
        xchacha20_xor(bytes(32), bytes(12), b"x")
    with pytest.raises(ValueError):
        hchacha20(bytes(32), bytes(15))


# ------------------------------------------------------------ encodings


def test_pae_examples_from_the_spec() -> None:
    assert pae() == bytes(8)
    assert pae(b"") == b"\x01" + bytes(7) + bytes(8)
    assert pae(b"test") == b"\x01" + bytes(7) + b"\x04" + bytes(7) + b"test"
    assert pae(b"a", b"bc") == (
        b"\x02" + bytes(7) + b"\x01" + bytes(7) + b"a" + b"\x02" + bytes(7) + b"bc"
    )


@pytest.mark.parametrize("text", ["YQ==", "YQ=", "YR", "Y", "a+b/", "YQ\n", " YQ", "Y\u00e9"])
def test_b64decode_is_strict(text: str) -> None:
    with pytest.raises(ValueError):
        b64decode(text)


def test_b64_round_trip() -> None:
    for n in range(0, 70):
        data = os.urandom(n)
        assert b64decode(b64encode(data)) == data
        assert "=" not in b64encode(data)


# ------------------------------------------------------- algorithm lucidity


def test_keys_are_typed_and_never_raw_bytes() -> None:
    v4_secret, v2_secret = V4SecretKey.generate(), V2SecretKey.generate()
    v4_local, v2_local = V4LocalKey.generate(), V2LocalKey.generate()
    token = sign(v4_secret, b"{}")
    with pytest.raises(TypeError):
        sign(v4_secret.raw, b"{}")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        verify(v4_secret.public_key().raw, token)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        verify(v4_secret, token)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        sign(v4_secret.public_key(), b"{}")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        decrypt(v4_secret.public_key(), token)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encrypt(v4_secret, b"{}")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encrypt(v4_local.raw, b"{}")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        issue(v4_secret.public_key(), {})  # type: ignore[arg-type]
    # A v2 key on a v4 token (and the reverse) is refused by the header check.
    with pytest.raises(PasetoError) as err:
        verify(v2_secret.public_key(), token)
    assert err.value.reason == "wrong_version"
    with pytest.raises(PasetoError) as err:
        decrypt(v2_local, encrypt(v4_local, b"{}"))
    assert err.value.reason == "wrong_version"
    # The same 32 bytes as a v2 and a v4 key are different keys.
    same = os.urandom(32)
    assert V2LocalKey(same) != V4LocalKey(same)
    assert V2LocalKey(same).paserk_id() != V4LocalKey(same).paserk_id()


def test_v2_refuses_implicit_assertions() -> None:
    key = V2SecretKey.generate()
    with pytest.raises(ValueError):
        sign(key, b"{}", implicit=b"x")
    with pytest.raises(ValueError):
        verify(key.public_key(), sign(key, b"{}"), implicit=b"x")
    with pytest.raises(ValueError):
        encrypt(V2LocalKey.generate(), b"{}", implicit=b"x")


def test_v4_implicit_assertion_is_bound() -> None:
    secret, local = V4SecretKey.generate(), V4LocalKey.generate()
    signed = sign(secret, b"{}", implicit=b"tenant-a")
    with pytest.raises(PasetoError) as err:
        verify(secret.public_key(), signed, implicit=b"tenant-b")
    assert err.value.reason == "invalid_signature"
    sealed = encrypt(local, b"{}", implicit=b"tenant-a")
    with pytest.raises(PasetoError) as err:
        decrypt(local, sealed, implicit=b"tenant-b")
    assert err.value.reason == "invalid_mac"
    assert decrypt(local, sealed, implicit=b"tenant-a").payload == b"{}"


def test_local_round_trip_random_nonce_and_footer() -> None:
    for key in (V4LocalKey.generate(), V2LocalKey.generate()):
        first = encrypt(key, b'{"a":1}', b'{"kid":"x"}')
        second = encrypt(key, b'{"a":1}', b'{"kid":"x"}')
        assert first != second  # fresh nonce each time
        assert decrypt(key, first) == Decoded(b'{"a":1}', b'{"kid":"x"}')
        with pytest.raises(PasetoError) as err:
            decrypt(type(key).generate(), first)
        assert err.value.reason == "invalid_mac"


def test_v4_local_checks_the_mac_before_decrypting(monkeypatch: pytest.MonkeyPatch) -> None:
    key = V4LocalKey.generate()
    token = encrypt(key, b'{"a":1}')
    calls: list[int] = []
    real = xchacha20_xor

    def spy(*args: Any, **kwargs: Any) -> bytes:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("runner_gateway.paseto.protocol.xchacha20_xor", spy)
    head, body = token[:9], b64decode(token[9:])
    forged = head + b64encode(body[:-1] + bytes([body[-1] ^ 1]))
    with pytest.raises(PasetoError):
        decrypt(key, forged)
    assert calls == []
    decrypt(key, token)
    assert calls == [1]


def test_sizes_are_capped() -> None:
    key = V4SecretKey.generate()
    with pytest.raises(PasetoError) as err:
        verify(key.public_key(), "v4.public." + "A" * 9000)
    assert err.value.reason == "too_large"
    big_footer = b64encode(b"x" * 2100)
    with pytest.raises(PasetoError) as err:
        verify(key.public_key(), sign(key, b"{}") + "." + big_footer)
    assert err.value.reason == "too_large"
    with pytest.raises(ValueError):
        sign(key, b"x" * 7000)  # would mint a token no verifier accepts
    with pytest.raises(ValueError):
        sign(key, b"{}", footer=b"x" * 2049)


def test_trailing_dot_and_empty_footer_segment_are_refused() -> None:
    key = V4SecretKey.generate()
    token = sign(key, b"{}")
    for bad in (token + ".", token + "..", token + ".e30.e30", "v4.public", "v4"):
        with pytest.raises(PasetoError) as err:
            verify(key.public_key(), bad)
        assert err.value.reason == "malformed"


def test_measure_v4_public_verify() -> None:
    """Prints the cost of one v4.public verification (not asserted: shared CI cores)."""
    key = V4SecretKey.generate()
    claims = {"sub": "alice", "exp": "2039-01-01T00:00:00+00:00", "scopes": ["inference"]}
    token = issue(key, claims, {"kid": key.public_key().paserk_id()})
    public = key.public_key()
    rounds = 300
    started = time.perf_counter()
    for _ in range(rounds):
        verify(public, token)
    per_call = (time.perf_counter() - started) / rounds
    print(f"\nv4.public verify: {per_call * 1e6:.1f} us per token ({len(token)} chars)")
    assert per_call > 0
