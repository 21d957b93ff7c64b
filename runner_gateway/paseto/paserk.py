"""PASERK serialisation of raw keys and PASERK key ids (k2 and k4 only).

``kN.local.`` / ``kN.public.`` / ``kN.secret.`` + base64url(raw key), and the
ids ``kN.lid.`` / ``kN.pid.`` / ``kN.sid.`` + base64url(BLAKE2b-264(h || paserk)).
The typed wrappers are the key classes' ``paserk()``, ``paserk_id()`` and
``from_paserk()`` (keys.py); this module knows only strings and bytes.
"""

from __future__ import annotations

import hashlib
import re

from runner_gateway.paseto.encoding import b64decode, b64encode
from runner_gateway.paseto.errors import PasetoKeyError

__all__ = [
    "ID_TYPES",
    "KEY_LENGTHS",
    "decode",
    "encode",
    "is_key_id",
    "key_id",
    "split_header",
]

# PASERK type -> raw key length, for the types this package implements.
KEY_LENGTHS = {"local": 32, "public": 32, "secret": 64}
# PASERK key type -> the id type naming it.
ID_TYPES = {"local": "lid", "public": "pid", "secret": "sid"}
_PREFIXES = {"v2": "k2", "v4": "k4"}
# An id is h || base64url(33 bytes) = 44 characters after the header.
_KEY_ID = re.compile(r"k[24]\.(?:lid|pid|sid)\.[A-Za-z0-9_-]{44}")


def _prefix(version: str) -> str:
    try:
        return _PREFIXES[version]
    except KeyError:
        raise ValueError(f"unsupported PASETO version {version!r}") from None


def encode(version: str, kind: str, raw: bytes) -> str:
    """Serialise a raw key of ``kind`` (local, public, secret) as a PASERK."""
    if len(raw) != KEY_LENGTHS[kind]:
        raise PasetoKeyError(f"a {kind} key must be {KEY_LENGTHS[kind]} bytes")
    return f"{_prefix(version)}.{kind}.{b64encode(raw)}"


def split_header(text: str) -> tuple[str, str, str]:
    """Split ``kN.type.data`` into its three parts (no checks on the parts)."""
    parts = text.split(".")
    if len(parts) != 3:
        raise PasetoKeyError("not a PASERK (expected kN.type.data)")
    return parts[0], parts[1], parts[2]


def decode(text: str, version: str, kind: str) -> bytes:
    """Parse a ``kN.kind.`` PASERK for ``version``; refuse any other version or type."""
    if not isinstance(text, str):
        raise TypeError("a PASERK is a str")
    prefix, found, data = split_header(text.strip())
    expected = _prefix(version)
    if prefix != expected:
        raise PasetoKeyError(f"expected a {expected}.{kind}. PASERK (wrong version)")
    if found != kind:
        raise PasetoKeyError(f"expected a {expected}.{kind}. PASERK (wrong type)")
    try:
        raw = b64decode(data)
    except ValueError:
        raise PasetoKeyError(f"{expected}.{kind}. PASERK is not canonical base64url") from None
    if len(raw) != KEY_LENGTHS[kind]:
        raise PasetoKeyError(f"{expected}.{kind}. PASERK has the wrong key length")
    return raw


def key_id(version: str, kind: str, paserk: str) -> str:
    """The PASERK id (lid/pid/sid) of a serialised key of ``kind``."""
    header = f"{_prefix(version)}.{ID_TYPES[kind]}."
    digest = hashlib.blake2b((header + paserk).encode("ascii"), digest_size=33).digest()
    return header + b64encode(digest)


def is_key_id(text: object) -> bool:
    """Whether ``text`` has the shape of a k2/k4 lid, pid or sid."""
    return isinstance(text, str) and _KEY_ID.fullmatch(text) is not None
