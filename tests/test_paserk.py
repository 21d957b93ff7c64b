"""PASERK k2/k4 local/public/secret and lid/pid/sid against the official vectors,
plus the key loaders (PEM, OpenSSH, hex, PASERK)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from runner_gateway.paseto import (
    Key,
    PasetoKeyError,
    V2LocalKey,
    V2PublicKey,
    V2SecretKey,
    V4LocalKey,
    V4PublicKey,
    V4SecretKey,
    key_from_paserk,
    load_local_key,
    load_public_key,
    load_secret_key,
    public_key_pem,
    secret_key_pem,
    sign,
    verify,
)
from runner_gateway.paseto.paserk import is_key_id

VECTORS = Path(__file__).parent / "vectors"
CLASSES: dict[str, type[Key]] = {
    "k2.local": V2LocalKey,
    "k2.public": V2PublicKey,
    "k2.secret": V2SecretKey,
    "k4.local": V4LocalKey,
    "k4.public": V4PublicKey,
    "k4.secret": V4SecretKey,
}
# id type -> the key type it names
ID_OF = {"lid": "local", "pid": "public", "sid": "secret"}


def _cases() -> list[Any]:
    params = []
    for version in ("k2", "k4"):
        for kind in ("local", "public", "secret", "lid", "pid", "sid"):
            name = f"{version}.{kind}"
            for case in json.loads((VECTORS / f"{name}.json").read_text())["tests"]:
                params.append(pytest.param(version, kind, case, id=case["name"]))
    return params


CASES = _cases()


def test_all_vector_files_are_covered() -> None:
    assert len(CASES) == 54  # 27 cases in the six k2 files, 27 in the six k4 files
    assert any(p.values[2]["expect-fail"] for p in CASES)


def _key(cls: type[Key], hex_text: str | None) -> Key:
    if hex_text is None:
        raise ValueError("no key")
    return cls(bytes.fromhex(hex_text))  # ValueError for non-hex (the PEM cases)


@pytest.mark.parametrize(("version", "kind", "case"), CASES)
def test_paserk_vector(version: str, kind: str, case: dict[str, Any]) -> None:
    key_kind = ID_OF.get(kind, kind)
    cls = CLASSES[f"{version}.{key_kind}"]
    if case["expect-fail"]:
        # Must fail to serialise the key, or (when given) to parse the PASERK.
        with pytest.raises((ValueError, PasetoKeyError)):
            key = _key(cls, case["key"])
            if kind in ID_OF:
                key.paserk_id()
            else:
                key.paserk()
        key_text = case["key"]
        if key_text is not None and not all(c in "0123456789abcdef" for c in key_text):
            # A PEM key of another algorithm: the loaders must refuse it too.
            loader = {"local": load_local_key, "public": load_public_key}.get(
                key_kind, load_secret_key
            )
            with pytest.raises(PasetoKeyError):
                loader(key_text, "v4" if version == "k4" else "v2")
        if case["paserk"] is not None:
            with pytest.raises(PasetoKeyError):
                cls.from_paserk(case["paserk"])
            with pytest.raises(PasetoKeyError):
                key_from_paserk(case["paserk"])
        return
    key = _key(cls, case["key"])
    if kind in ID_OF:
        assert key.paserk_id() == case["paserk"]
        assert is_key_id(case["paserk"])
        if kind == "sid":
            assert key.raw[:32] == bytes.fromhex(case["seed"])
        return
    assert key.paserk() == case["paserk"]
    assert cls.from_paserk(case["paserk"]) == key
    assert key_from_paserk(case["paserk"]) == key
    assert type(key_from_paserk(case["paserk"])) is cls
    if kind == "secret":
        assert key.raw[32:] == bytes.fromhex(case["public-key"])


def test_from_paserk_refuses_other_type_or_version() -> None:
    local = V4LocalKey.generate()
    with pytest.raises(PasetoKeyError, match="wrong version"):
        V2LocalKey.from_paserk(local.paserk())
    with pytest.raises(PasetoKeyError, match="wrong type"):
        V4PublicKey.from_paserk(local.paserk())
    with pytest.raises(PasetoKeyError):
        V4LocalKey.from_paserk(local.paserk() + "=")
    with pytest.raises(PasetoKeyError):
        V4LocalKey.from_paserk(local.paserk_id())
    with pytest.raises(TypeError):
        Key.from_paserk(local.paserk())


def test_secret_key_halves_must_match() -> None:
    secret = V4SecretKey.generate()
    other = V4SecretKey.generate()
    with pytest.raises(PasetoKeyError):
        V4SecretKey(secret.seed + other.raw[32:])


def test_ids_differ_by_type_and_version() -> None:
    secret = V4SecretKey.generate()
    ids = {secret.paserk_id(), secret.public_key().paserk_id()}
    ids.add(V2SecretKey(secret.raw).paserk_id())
    ids.add(V4LocalKey(secret.seed).paserk_id())
    assert len(ids) == 4
    assert secret.paserk_id().startswith("k4.sid.")
    assert secret.public_key().paserk_id().startswith("k4.pid.")


def test_repr_shows_no_key_material() -> None:
    for key in (V4LocalKey.generate(), V4SecretKey.generate(), V2LocalKey.generate()):
        text = repr(key)
        assert key.paserk_id() in text
        assert key.raw.hex() not in text
        assert key.paserk().split(".")[2] not in text


# --------------------------------------------------------------- loading

V4_VECTORS = {c["name"]: c for c in json.loads((VECTORS / "v4.json").read_text())["tests"]}


def test_load_public_key_formats() -> None:
    case = V4_VECTORS["4-S-1"]
    expected = V4PublicKey(bytes.fromhex(case["public-key"]))
    assert load_public_key(case["public-key-pem"], "v4") == expected
    assert load_public_key(case["public-key"], "v4") == expected
    assert load_public_key(case["public-key"].upper() + "\n", "v4") == expected
    assert load_public_key(expected.paserk(), "v4") == expected
    private = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(case["secret-key-seed"]))
    ssh = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    assert load_public_key(ssh.decode() + " alice@example", "v4") == expected
    assert public_key_pem(expected).decode().strip() == case["public-key-pem"].strip()
    v2 = load_public_key(case["public-key"], "v2")
    assert isinstance(v2, V2PublicKey)


def test_load_secret_key_formats() -> None:
    case = V4_VECTORS["4-S-1"]
    expected = V4SecretKey(bytes.fromhex(case["secret-key"]))
    assert load_secret_key(case["secret-key-pem"], "v4") == expected
    assert load_secret_key(case["secret-key"], "v4") == expected
    assert load_secret_key(case["secret-key-seed"], "v4") == expected
    assert load_secret_key(expected.paserk(), "v4") == expected
    import base64

    raw_pem = (
        "-----BEGIN ED25519 PRIVATE KEY-----\n"
        + base64.b64encode(expected.raw).decode()
        + "\n-----END ED25519 PRIVATE KEY-----\n"
    )
    assert load_secret_key(raw_pem, "v4") == expected
    openssh = Ed25519PrivateKey.from_private_bytes(expected.seed).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    assert load_secret_key(openssh.decode(), "v4") == expected
    pem = secret_key_pem(expected)
    assert pem.decode().strip() == case["secret-key-pem"].strip()
    # The loaded key signs tokens its public key verifies.
    loaded = load_secret_key(pem.decode(), "v4")
    assert verify(loaded.public_key(), sign(loaded, b"{}")).payload == b"{}"


def test_load_local_key_formats() -> None:
    key = V4LocalKey.generate()
    assert load_local_key(key.raw.hex(), "v4") == key
    assert load_local_key(key.paserk(), "v4") == key
    assert isinstance(load_local_key(key.raw.hex(), "v2"), V2LocalKey)


BAD_INPUTS = [
    ("public", "not a key"),
    ("public", "00" * 31),
    ("public", "k2.public.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
    ("public", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"),
    ("public", "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ nobody"),
    ("secret", "zz" * 32),
    ("secret", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"),
    ("secret", "k4.local.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
    ("local", "ab" * 33),
    ("local", "k4.secret.AAAA"),
    ("local", "k2.local.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
]


@pytest.mark.parametrize(("kind", "text"), BAD_INPUTS)
def test_loaders_refuse_bad_material_without_quoting_it(kind: str, text: str) -> None:
    loader = {"public": load_public_key, "secret": load_secret_key, "local": load_local_key}[kind]
    with pytest.raises(PasetoKeyError) as err:
        loader(text, "v4")
    message = str(err.value)
    for fragment in text.split():
        if len(fragment) >= 8:
            assert fragment not in message


def test_loaders_refuse_unknown_version() -> None:
    with pytest.raises(PasetoKeyError):
        load_local_key("00" * 32, "v3")


def test_rsa_pem_is_not_an_ed25519_key() -> None:
    case = json.loads((VECTORS / "k2.public.json").read_text())["tests"][-1]
    with pytest.raises(PasetoKeyError, match="not an Ed25519"):
        load_public_key(case["key"], "v4")
