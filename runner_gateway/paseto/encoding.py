"""Strict encodings: unpadded canonical base64url, PAE, and JSON objects.

Everything here refuses rather than repairs: a token that decodes only after
"fixing" it is a different token from the one that was signed.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

__all__ = ["b64decode", "b64encode", "json_too_deep", "loads_object", "pae"]

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def b64encode(data: bytes) -> str:
    """Unpadded base64url (RFC 4648 §5), as PASETO and PASERK use it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(text: str) -> bytes:
    """Decode unpadded base64url; refuse padding, other characters, non-zero trailing bits.

    Raises ValueError. The canonical check (re-encode and compare) is what
    rejects a final character whose unused low bits are set.
    """
    if not isinstance(text, str) or _B64URL.fullmatch(text) is None:
        raise ValueError("not unpadded base64url")
    if len(text) % 4 == 1:
        raise ValueError("impossible base64url length")
    # The alphabet was checked above, so the lenient stdlib decoder is safe here.
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error:
        raise ValueError("not unpadded base64url") from None
    if b64encode(data) != text:
        raise ValueError("non-canonical base64url")
    return data


def _le64(n: int) -> bytes:
    # The spec clears the top bit so that the value is also a valid signed int64.
    return (n & 0x7FFF_FFFF_FFFF_FFFF).to_bytes(8, "little")


def pae(*pieces: bytes) -> bytes:
    """Pre-Authentication Encoding: LE64(count) || (LE64(len) || piece)*."""
    out = [_le64(len(pieces))]
    for piece in pieces:
        out.append(_le64(len(piece)))
        out.append(piece)
    return b"".join(out)


def json_too_deep(text: str, max_depth: int) -> bool:
    """Whether a JSON text nests deeper than ``max_depth``, decided without parsing it.

    Used to refuse deep documents before json.loads, whose recursion is what a
    deep document attacks. Brackets inside strings do not count. Most texts
    take the fast path: they do not even hold ``max_depth`` brackets.
    """
    if text.count("[") + text.count("{") <= max_depth:
        return False
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > max_depth:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError("duplicate key in JSON object")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_strings(value: Any) -> None:
    # json.loads lets "\ud800" through as a lone surrogate, which no UTF-8
    # consumer (logs, metrics) could encode later.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            item.encode("utf-8")
        elif isinstance(item, dict):
            for key, sub in item.items():
                key.encode("utf-8")
                stack.append(sub)
        elif isinstance(item, list):
            stack.extend(item)


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)


def loads_object(data: bytes, max_depth: int) -> dict[str, Any]:
    """Parse UTF-8 JSON that must be an object with unique keys and bounded depth.

    Raises ValueError (UnicodeDecodeError is one) for anything else.
    """
    text = data.decode("utf-8")
    if json_too_deep(text, max_depth):
        raise ValueError("JSON nested too deeply")
    value = _DECODER.decode(text)
    if not isinstance(value, dict):
        raise ValueError("JSON is not an object")
    _check_strings(value)
    return value
