"""PASETO v4 and v2, local and public, on PyNaCl (plus hashlib BLAKE2b).

Each function takes a typed key and derives version and purpose from it, so a
token header that does not match the key is refused before any crypto
(``wrong_version`` / ``wrong_purpose``); a key of the wrong class is a
programming error (TypeError). Decoding raises only :class:`PasetoError`.

v4.local authenticates before decrypting: the BLAKE2b tag is compared in
constant time and only then is the ciphertext decrypted. v2.local uses
libsodium's XChaCha20-Poly1305, which does the same internally.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import nacl.bindings
import nacl.exceptions

from runner_gateway.paseto.encoding import b64decode, b64encode, pae
from runner_gateway.paseto.errors import PasetoError
from runner_gateway.paseto.keys import Key, LocalKey, PublicKey, SecretKey
from runner_gateway.paseto.xchacha import xchacha20_xor

__all__ = [
    "MAX_FOOTER",
    "MAX_TOKEN",
    "Decoded",
    "decrypt",
    "encrypt",
    "footer_kid",
    "issue",
    "sign",
    "split_token",
    "verify",
]

MAX_TOKEN = 8 * 1024  # characters of the whole token
MAX_FOOTER = 2 * 1024  # bytes of the decoded footer
_MAX_FOOTER_B64 = -(-MAX_FOOTER * 4 // 3)
_SIG = 64  # Ed25519 signature
_V4_NONCE = 32
_V4_TAG = 32
_V2_NONCE = 24
_V2_TAG = 16


@dataclass(frozen=True, slots=True)
class Decoded:
    """A verified (or decrypted) token: the payload and the footer, as bytes."""

    payload: bytes
    footer: bytes


# ------------------------------------------------------------------ helpers


def _require_key(key: object, base: type[Key], action: str) -> None:
    if not isinstance(key, base):
        raise TypeError(f"{action} needs a {base.__name__}, not {type(key).__name__}")


def _require_bytes(value: object, name: str) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")


def _check_implicit(version: str, implicit: bytes) -> None:
    _require_bytes(implicit, "implicit assertion")
    if version == "v2" and implicit:
        raise ValueError("v2 tokens have no implicit assertions")


def _assemble(header: str, body: bytes, footer: bytes) -> str:
    if len(footer) > MAX_FOOTER:
        raise ValueError(f"footer over {MAX_FOOTER} bytes")
    token = header + b64encode(body)
    if footer:
        token += "." + b64encode(footer)
    if len(token) > MAX_TOKEN:
        raise ValueError(f"token over {MAX_TOKEN} characters: the verifier would refuse it")
    return token


def split_token(token: object, version: str, purpose: str) -> tuple[bytes, bytes, bytes]:
    """Check the header and sizes; return (header, body, footer)."""
    if not isinstance(token, str):
        raise PasetoError("malformed", "token is not a string")
    if len(token) > MAX_TOKEN:
        raise PasetoError("too_large", f"token over {MAX_TOKEN} characters")
    parts = token.split(".")
    if len(parts) < 3:
        raise PasetoError("malformed", "token has too few segments")
    if parts[0] != version:
        raise PasetoError("wrong_version", f"not a {version} token")
    if parts[1] != purpose:
        if parts[1] in ("local", "public"):
            raise PasetoError("wrong_purpose", f"not a {version}.{purpose} token")
        raise PasetoError("malformed", "unknown token purpose")
    if len(parts) > 4:
        raise PasetoError("malformed", "token has too many segments")
    footer = b""
    if len(parts) == 4:
        if not parts[3]:
            raise PasetoError("malformed", "empty footer segment")
        if len(parts[3]) > _MAX_FOOTER_B64:
            raise PasetoError("too_large", f"footer over {MAX_FOOTER} bytes")
        footer = _b64(parts[3])
    return f"{version}.{purpose}.".encode("ascii"), _b64(parts[2]), footer


def _b64(text: str) -> bytes:
    try:
        return b64decode(text)
    except ValueError:
        raise PasetoError("malformed", "segment is not canonical unpadded base64url") from None


def _v4_keys(key: bytes, nonce: bytes) -> tuple[bytes, bytes, bytes]:
    """(Ek, n2, Ak) for v4.local, per the spec's keyed BLAKE2b split."""
    tmp = hashlib.blake2b(b"paseto-encryption-key" + nonce, key=key, digest_size=56).digest()
    ak = hashlib.blake2b(b"paseto-auth-key-for-aead" + nonce, key=key, digest_size=32).digest()
    return tmp[:32], tmp[32:], ak


# ------------------------------------------------------------------- public


def sign(key: SecretKey, payload: bytes, footer: bytes = b"", implicit: bytes = b"") -> str:
    """Make a vN.public token (Ed25519 over PAE(h, m, f[, i]))."""
    _require_key(key, SecretKey, "sign")
    _require_bytes(payload, "payload")
    _require_bytes(footer, "footer")
    _check_implicit(key.version, implicit)
    header = f"{key.version}.public."
    h = header.encode("ascii")
    m2 = pae(h, payload, footer, implicit) if key.version == "v4" else pae(h, payload, footer)
    signature = nacl.bindings.crypto_sign(m2, key.raw)[:_SIG]
    return _assemble(header, payload + signature, footer)


def verify(key: PublicKey, token: str, implicit: bytes = b"") -> Decoded:
    """Verify a vN.public token; raise PasetoError on any failure."""
    _require_key(key, PublicKey, "verify")
    _check_implicit(key.version, implicit)
    h, body, footer = split_token(token, key.version, "public")
    if len(body) < _SIG:
        raise PasetoError("malformed", "token too short for a signature")
    message, signature = body[:-_SIG], body[-_SIG:]
    m2 = pae(h, message, footer, implicit) if key.version == "v4" else pae(h, message, footer)
    try:
        nacl.bindings.crypto_sign_open(signature + m2, key.raw)
    except (nacl.exceptions.CryptoError, ValueError):
        raise PasetoError("invalid_signature", "signature does not verify") from None
    return Decoded(message, footer)


# -------------------------------------------------------------------- local


def encrypt(
    key: LocalKey,
    payload: bytes,
    footer: bytes = b"",
    implicit: bytes = b"",
    nonce: bytes | None = None,
) -> str:
    """Make a vN.local token. ``nonce`` is for test vectors only: leave it None.

    v4: the 32-byte random n. v2: the 24-byte random key that BLAKE2b uses to
    derive the real nonce from the payload.
    """
    _require_key(key, LocalKey, "encrypt")
    _require_bytes(payload, "payload")
    _require_bytes(footer, "footer")
    _check_implicit(key.version, implicit)
    header = f"{key.version}.local."
    h = header.encode("ascii")
    if key.version == "v4":
        n = os.urandom(_V4_NONCE) if nonce is None else nonce
        if not isinstance(n, bytes) or len(n) != _V4_NONCE:
            raise ValueError("a v4.local nonce is 32 bytes")
        ek, n2, ak = _v4_keys(key.raw, n)
        c = xchacha20_xor(ek, n2, payload)
        t = hashlib.blake2b(pae(h, n, c, footer, implicit), key=ak, digest_size=32).digest()
        return _assemble(header, n + c + t, footer)
    r = os.urandom(_V2_NONCE) if nonce is None else nonce
    if not isinstance(r, bytes) or len(r) != _V2_NONCE:
        raise ValueError("a v2.local nonce is 24 bytes")
    n = hashlib.blake2b(payload, key=r, digest_size=_V2_NONCE).digest()
    c = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        payload, pae(h, n, footer), n, key.raw
    )
    return _assemble(header, n + c, footer)


def decrypt(key: LocalKey, token: str, implicit: bytes = b"") -> Decoded:
    """Authenticate, then decrypt a vN.local token; raise PasetoError on any failure."""
    _require_key(key, LocalKey, "decrypt")
    _check_implicit(key.version, implicit)
    h, body, footer = split_token(token, key.version, "local")
    if key.version == "v4":
        if len(body) < _V4_NONCE + _V4_TAG:
            raise PasetoError("malformed", "token too short")
        n, c, t = body[:_V4_NONCE], body[_V4_NONCE:-_V4_TAG], body[-_V4_TAG:]
        ek, n2, ak = _v4_keys(key.raw, n)
        expected = hashlib.blake2b(pae(h, n, c, footer, implicit), key=ak, digest_size=32)
        if not hmac.compare_digest(t, expected.digest()):
            raise PasetoError("invalid_mac", "authentication tag does not match")
        return Decoded(xchacha20_xor(ek, n2, c), footer)
    if len(body) < _V2_NONCE + _V2_TAG:
        raise PasetoError("malformed", "token too short")
    n, c = body[:_V2_NONCE], body[_V2_NONCE:]
    try:
        payload = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            c, pae(h, n, footer), n, key.raw
        )
    except (nacl.exceptions.CryptoError, ValueError):
        raise PasetoError("invalid_mac", "authentication tag does not match") from None
    return Decoded(payload, footer)


# ------------------------------------------------------------------- claims


def _json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def issue(
    key: SecretKey | LocalKey,
    claims: Mapping[str, Any],
    footer: Mapping[str, Any] | None = None,
    implicit: bytes = b"",
) -> str:
    """JSON-encode claims (and footer) and sign (secret key) or encrypt (local key).

    Times must already be RFC 3339 strings (see verifier.rfc3339). To let
    verifiers pick the key, pass ``footer={"kid": footer_kid(key)}``.
    """
    if not isinstance(claims, Mapping):
        raise TypeError("claims must be a mapping")
    footer_bytes = b"" if footer is None else _json(footer)
    if isinstance(key, SecretKey):
        return sign(key, _json(claims), footer_bytes, implicit)
    if isinstance(key, LocalKey):
        return encrypt(key, _json(claims), footer_bytes, implicit)
    raise TypeError(f"issue needs a SecretKey or a LocalKey, not {type(key).__name__}")


def footer_kid(key: Key) -> str:
    """The PASERK id to put in a footer's ``kid``: the pid for public-key tokens, else the lid.

    For a secret key this is the id of its public key, which is what a
    verifier holds.
    """
    if isinstance(key, SecretKey):
        return key.public_key().paserk_id()
    if isinstance(key, (PublicKey, LocalKey)):
        return key.paserk_id()
    raise TypeError(f"footer_kid needs a PASETO key, not {type(key).__name__}")
