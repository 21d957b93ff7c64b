"""Typed PASETO keys: each key knows its version and purpose.

Algorithm lucidity: the protocol functions accept only these classes, check
version and purpose from the class, and never take raw bytes as a key. v2 and
v4 keys hold the same kinds of bytes (Ed25519, 32-byte symmetric) but are
distinct types, so a key cannot be used across versions by accident.

``repr`` shows the PASERK id, never key material.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import re
from typing import ClassVar, Self

import nacl.bindings
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runner_gateway.paseto import paserk as _paserk
from runner_gateway.paseto.errors import PasetoKeyError

__all__ = [
    "Key",
    "LocalKey",
    "PublicKey",
    "SecretKey",
    "V2LocalKey",
    "V2PublicKey",
    "V2SecretKey",
    "V4LocalKey",
    "V4PublicKey",
    "V4SecretKey",
    "key_from_paserk",
    "load_local_key",
    "load_public_key",
    "load_secret_key",
    "public_key_pem",
    "secret_key_pem",
]

VERSIONS = ("v4", "v2")


class Key:
    """Base of all keys; ``version`` and ``purpose`` are fixed per class."""

    version: ClassVar[str]
    purpose: ClassVar[str]
    __slots__ = ("_id", "_raw")

    def __init__(self, raw: bytes) -> None:
        if type(self) in _ABSTRACT:
            raise TypeError("use V4LocalKey, V4PublicKey, V4SecretKey or the V2 classes")
        if not isinstance(raw, bytes):
            raise TypeError("raw key material must be bytes")
        length = _paserk.KEY_LENGTHS[self.purpose]
        if len(raw) != length:
            raise PasetoKeyError(f"a {self.purpose} key must be {length} bytes")
        self._check(raw)
        self._raw = raw
        self._id: str | None = None

    def _check(self, raw: bytes) -> None:
        """Further validation of the raw bytes (secret keys check seed vs public key)."""

    @property
    def raw(self) -> bytes:
        """The raw key bytes, for serialisation only."""
        return self._raw

    def paserk(self) -> str:
        """This key as a PASERK (``kN.local.`` / ``kN.public.`` / ``kN.secret.``)."""
        return _paserk.encode(self.version, self.purpose, self._raw)

    def paserk_id(self) -> str:
        """The PASERK id (``kN.lid.`` / ``kN.pid.`` / ``kN.sid.``) of this key."""
        if self._id is None:
            self._id = _paserk.key_id(self.version, self.purpose, self.paserk())
        return self._id

    @classmethod
    def from_paserk(cls, text: str) -> Self:
        """Parse a PASERK of exactly this class's version and type."""
        if cls in _ABSTRACT:
            raise TypeError("from_paserk needs a concrete key class (or key_from_paserk)")
        return cls(_paserk.decode(text, cls.version, cls.purpose))

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Key)
        return hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash((type(self), self.paserk_id()))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.paserk_id()}>"

    def __reduce__(self) -> tuple[object, ...]:
        # Keys stay out of pickles (and so out of anything that pickles by accident).
        raise TypeError("PASETO keys cannot be pickled")


class LocalKey(Key):
    """A 32-byte symmetric key for vN.local tokens."""

    purpose = "local"
    __slots__ = ()

    @classmethod
    def generate(cls) -> Self:
        return cls(os.urandom(32))


class PublicKey(Key):
    """An Ed25519 public key for verifying vN.public tokens."""

    purpose = "public"
    __slots__ = ()


class SecretKey(Key):
    """An Ed25519 secret key, stored as in PASERK: 32-byte seed || 32-byte public key."""

    purpose = "secret"
    _public_class: ClassVar[type[PublicKey]]
    __slots__ = ()

    def _check(self, raw: bytes) -> None:
        public, _ = nacl.bindings.crypto_sign_seed_keypair(raw[:32])
        if not hmac.compare_digest(public, raw[32:]):
            raise PasetoKeyError("secret key: the public half does not match the seed")

    @classmethod
    def generate(cls) -> Self:
        return cls.from_seed(os.urandom(32))

    @classmethod
    def from_seed(cls, seed: bytes) -> Self:
        if not isinstance(seed, bytes) or len(seed) != 32:
            raise PasetoKeyError("an Ed25519 seed must be 32 bytes")
        public, _ = nacl.bindings.crypto_sign_seed_keypair(seed)
        return cls(seed + public)

    @property
    def seed(self) -> bytes:
        return self._raw[:32]

    def public_key(self) -> PublicKey:
        return self._public_class(self._raw[32:])


class V4LocalKey(LocalKey):
    version = "v4"
    __slots__ = ()


class V4PublicKey(PublicKey):
    version = "v4"
    __slots__ = ()


class V4SecretKey(SecretKey):
    version = "v4"
    _public_class = V4PublicKey
    __slots__ = ()


class V2LocalKey(LocalKey):
    version = "v2"
    __slots__ = ()


class V2PublicKey(PublicKey):
    version = "v2"
    __slots__ = ()


class V2SecretKey(SecretKey):
    version = "v2"
    _public_class = V2PublicKey
    __slots__ = ()


_ABSTRACT = (Key, LocalKey, PublicKey, SecretKey)
_CLASSES: dict[tuple[str, str], type[Key]] = {
    (cls.version, cls.purpose): cls
    for cls in (V4LocalKey, V4PublicKey, V4SecretKey, V2LocalKey, V2PublicKey, V2SecretKey)
}


def key_class(version: str, purpose: str) -> type[Key]:
    try:
        return _CLASSES[(version, purpose)]
    except KeyError:
        raise PasetoKeyError(f"unsupported PASETO version {version!r} (v4 or v2)") from None


def key_from_paserk(text: str) -> Key:
    """Parse any k2/k4 local, public or secret PASERK into its typed key."""
    prefix, kind, _ = _paserk.split_header(text.strip())
    version = {"k4": "v4", "k2": "v2"}.get(prefix)
    if version is None or kind not in _paserk.KEY_LENGTHS:
        raise PasetoKeyError("unsupported PASERK (k4/k2 local, public or secret only)")
    return key_class(version, kind).from_paserk(text)


# ------------------------------------------------------------------ loading

_PASERK = re.compile(r"k[0-9]+\.")
_HEX64 = re.compile(r"[0-9A-Fa-f]{64}")
_HEX128 = re.compile(r"[0-9A-Fa-f]{128}")
_RAW_PEM = re.compile(
    r"-----BEGIN ED25519 PRIVATE KEY-----\s*([A-Za-z0-9+/=\s]+?)\s*"
    r"-----END ED25519 PRIVATE KEY-----"
)


def _check_version(version: str) -> str:
    k = {"v4": "k4", "v2": "k2"}.get(version)
    if k is None:
        raise PasetoKeyError(f"unsupported PASETO version {version!r} (v4 or v2)")
    return k


def load_public_key(text: str, version: str) -> PublicKey:
    """Load an Ed25519 public key: SPKI PEM, OpenSSH line, kN.public. PASERK or 64 hex digits."""
    k = _check_version(version)
    cls = key_class(version, "public")
    assert issubclass(cls, PublicKey)
    text = text.strip()
    if _PASERK.match(text):
        return cls.from_paserk(text)
    if _HEX64.fullmatch(text):
        return cls(bytes.fromhex(text))
    try:
        if text.startswith("-----BEGIN PUBLIC KEY-----"):
            loaded: object = serialization.load_pem_public_key(text.encode("ascii"))
        elif text.startswith("ssh-ed25519 "):
            loaded = serialization.load_ssh_public_key(text.encode("ascii"))
        else:
            raise PasetoKeyError(
                f"expected a PEM or OpenSSH Ed25519 public key, a {k}.public. PASERK"
                " or 64 hex digits"
            )
    except (ValueError, TypeError, UnicodeError, UnsupportedAlgorithm) as exc:
        if isinstance(exc, PasetoKeyError):
            raise
        raise PasetoKeyError("unreadable public key") from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise PasetoKeyError("not an Ed25519 public key")
    return cls(loaded.public_bytes_raw())


def load_secret_key(data: str, version: str) -> SecretKey:
    """Load an Ed25519 secret key.

    Accepts PKCS#8 PEM, an OpenSSH private key (unencrypted), PEM
    ``ED25519 PRIVATE KEY`` holding the raw seed || public key (or the seed), a
    ``kN.secret.`` PASERK, or hex: 64 digits (seed) or 128 (seed || public key).
    """
    k = _check_version(version)
    cls = key_class(version, "secret")
    assert issubclass(cls, SecretKey)
    text = data.strip()
    if _PASERK.match(text):
        return cls.from_paserk(text)
    if _HEX64.fullmatch(text):
        return cls.from_seed(bytes.fromhex(text))
    if _HEX128.fullmatch(text):
        return cls(bytes.fromhex(text))
    raw_pem = _RAW_PEM.fullmatch(text)
    if raw_pem is not None:
        try:
            raw = base64.b64decode("".join(raw_pem.group(1).split()), validate=True)
        except binascii.Error:
            raise PasetoKeyError("unreadable ED25519 PRIVATE KEY block") from None
        if len(raw) == 32:
            return cls.from_seed(raw)
        return cls(raw)
    try:
        if text.startswith("-----BEGIN PRIVATE KEY-----"):
            loaded: object = serialization.load_pem_private_key(text.encode("ascii"), None)
        elif text.startswith("-----BEGIN OPENSSH PRIVATE KEY-----"):
            loaded = serialization.load_ssh_private_key(text.encode("ascii"), None)
        else:
            raise PasetoKeyError(
                f"expected a PKCS#8 PEM, OpenSSH or ED25519 PRIVATE KEY PEM Ed25519 key,"
                f" a {k}.secret. PASERK or hex"
            )
    except (ValueError, TypeError, UnicodeError, UnsupportedAlgorithm) as exc:
        if isinstance(exc, PasetoKeyError):
            raise
        raise PasetoKeyError("unreadable or encrypted private key") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise PasetoKeyError("not an Ed25519 private key")
    return cls.from_seed(loaded.private_bytes_raw())


def load_local_key(text: str, version: str) -> LocalKey:
    """Load a symmetric key: 64 hex digits or a kN.local. PASERK."""
    k = _check_version(version)
    cls = key_class(version, "local")
    assert issubclass(cls, LocalKey)
    text = text.strip()
    if _HEX64.fullmatch(text):
        return cls(bytes.fromhex(text))
    if _PASERK.match(text):
        return cls.from_paserk(text)
    raise PasetoKeyError(f"expected 64 hex digits or a {k}.local. PASERK")


def secret_key_pem(key: SecretKey) -> bytes:
    """PKCS#8 PEM ("BEGIN PRIVATE KEY") of a secret key."""
    if not isinstance(key, SecretKey):
        raise TypeError("secret_key_pem needs a SecretKey")
    private = Ed25519PrivateKey.from_private_bytes(key.seed)
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(key: PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM ("BEGIN PUBLIC KEY") of a public key."""
    if not isinstance(key, PublicKey):
        raise TypeError("public_key_pem needs a PublicKey")
    public = Ed25519PublicKey.from_public_bytes(key.raw)
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
