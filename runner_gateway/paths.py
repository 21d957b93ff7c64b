"""One canonical request path for the policy and the runner.

Pure logic, no Twisted (``tree.py`` is the glue). The gateway classifies a
request by its path and the runner routes it by its own reading of the same
path: if the two readings differ (Gin decodes ``/api/%74ags`` to
``/api/tags``), a request can be classified as one thing and run as another.
So before anything looks at it, the path is normalised as RFC 3986 (section
6.2.2) says is safe, and that form is both classified and forwarded:

* a percent-encoded unreserved character (``A-Z a-z 0-9 - . _ ~``) is
  decoded; every other escape keeps its encoding, with upper-case hex;
* what could still be read two ways is refused (:class:`BadPath`, a 400): an
  encoded ``/`` or ``\\`` (a runner that decodes before routing sees another
  path), a literal ``\\``, a ``.`` or ``..`` segment (literal or encoded), a
  control character or NUL (literal or encoded), a malformed escape, a raw
  byte outside ASCII, or a path that is not UTF-8 once decoded.

A path with none of ``%``, ``\\``, ``/.``, control or non-ASCII bytes (nearly
every request) is canonical already: one regular-expression search decides.
"""

from __future__ import annotations

import re

__all__ = ["BadPath", "canonical_path", "suspect"]

# Anything that may need work or refusal; a path without it is canonical.
# (Callers on the hot path test ``suspect(path) is None`` themselves, saving
# a Python call for nearly every request.)
suspect = re.compile(rb"[^!-~]|[%\\]|/\.").search
_HEX = frozenset(b"0123456789abcdefABCDEF")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_SEPARATORS = {0x2F: "'/'", 0x5C: "backslash"}


class BadPath(ValueError):
    """The path cannot be given one meaning; the message says why (for a 400)."""


def _control(byte: int) -> bool:
    return byte < 0x20 or byte == 0x7F


def canonical_path(path: bytes) -> bytes:
    """The RFC 3986 normal form of ``path`` (no query), or BadPath."""
    if suspect(path) is None:
        return path
    if not path.isascii():
        raise BadPath("the path holds bytes outside ASCII (percent-encode them)")
    if b"\\" in path:
        raise BadPath("the path holds a backslash")
    for byte in path:
        if _control(byte):
            raise BadPath("the path holds a control character")
    parts = path.split(b"%")
    out = bytearray(parts[0])
    decoded = bytearray(parts[0])
    for part in parts[1:]:
        digits = part[:2]
        if len(digits) < 2 or digits[0] not in _HEX or digits[1] not in _HEX:
            raise BadPath("the path holds a malformed percent-escape")
        byte = int(digits, 16)
        if byte in _SEPARATORS:
            raise BadPath(f"the path holds an encoded {_SEPARATORS[byte]}")
        if _control(byte):
            raise BadPath("the path holds an encoded control character")
        if byte in _UNRESERVED:
            out.append(byte)
        else:
            out += b"%" + digits.upper()
        decoded.append(byte)
        out += part[2:]
        decoded += part[2:]
    try:
        decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise BadPath("the path is not UTF-8 once percent-decoded") from None
    canonical = bytes(out)
    for segment in canonical.split(b"/"):
        if segment == b"." or segment == b"..":
            raise BadPath("the path holds a '.' or '..' segment")
    return canonical
