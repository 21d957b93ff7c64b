"""Our PASETO v2/v4 and PASERK implementation on PyNaCl (no PASETO library).

Pure logic, no Twisted. See protocol.py for tokens, keys.py for typed keys
and loading, paserk.py for key serialisation and ids, verifier.py for the
gateway's claims checks and settings.
"""

from runner_gateway.paseto.errors import REASONS, PasetoError, PasetoKeyError
from runner_gateway.paseto.keys import (
    Key,
    LocalKey,
    PublicKey,
    SecretKey,
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
)
from runner_gateway.paseto.protocol import (
    MAX_FOOTER,
    MAX_TOKEN,
    Decoded,
    decrypt,
    encrypt,
    footer_kid,
    issue,
    sign,
    verify,
)
from runner_gateway.paseto.verifier import (
    TokenVerifier,
    VerifiedToken,
    build_verifier,
    parse_rfc3339,
    rfc3339,
)

__all__ = [
    "MAX_FOOTER",
    "MAX_TOKEN",
    "REASONS",
    "Decoded",
    "Key",
    "LocalKey",
    "PasetoError",
    "PasetoKeyError",
    "PublicKey",
    "SecretKey",
    "TokenVerifier",
    "V2LocalKey",
    "V2PublicKey",
    "V2SecretKey",
    "V4LocalKey",
    "V4PublicKey",
    "V4SecretKey",
    "VerifiedToken",
    "build_verifier",
    "decrypt",
    "encrypt",
    "footer_kid",
    "issue",
    "key_from_paserk",
    "load_local_key",
    "load_public_key",
    "load_secret_key",
    "parse_rfc3339",
    "public_key_pem",
    "rfc3339",
    "secret_key_pem",
    "sign",
    "verify",
]
