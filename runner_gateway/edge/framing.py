"""RFC 9112's framing rules the gateway holds every request head to, on top
of what Twisted's parser checks (pure: no Twisted).

Both parsing paths (the whole-head path and Twisted's line parser) end in
GatewayChannel.allHeadersReceived, which asks :func:`framing_error` about the
parsed head; obs-fold, which Twisted's parser unfolds, is noted on the way
(GatewayChannel.lineReceived).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["OBS_FOLD", "framing_error"]

# Bytes a request target may hold: visible ASCII (RFC 3986's characters and
# the few it leaves to be percent-encoded); controls, space, DEL and 0x80-0xFF
# never.
_VISIBLE = bytes(range(0x21, 0x7F))
OBS_FOLD = "a header line continued on the next (obs-fold) is not accepted"


def framing_error(
    version: bytes, target: bytes, headers: Mapping[bytes, Sequence[bytes]]
) -> str | None:
    """Why a parsed request head breaks RFC 9112's framing rules, or None.
    ``headers``: the raw values by canonical name (``Host``, ``Transfer-Encoding``)."""
    if target.translate(None, _VISIBLE):
        return "the request target holds a byte outside the URI grammar"
    if version == b"HTTP/1.1":
        host = headers.get(b"Host")
        if not host or len(host) != 1:
            return "an HTTP/1.1 request needs exactly one Host header"
    coding = headers.get(b"Transfer-Encoding")
    if coding is not None and (len(coding) != 1 or coding[0].lower() != b"chunked"):
        return "Transfer-Encoding other than chunked is not accepted"
    return None
