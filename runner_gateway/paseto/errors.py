"""The two exceptions of the PASETO package.

:class:`PasetoError` is the only exception token verification raises; its
``reason`` comes from a fixed vocabulary so it can be a metric label, and its
``description`` never contains token content. :class:`PasetoKeyError` is for
bad key material while loading keys; its message never contains key material.
"""

from __future__ import annotations

__all__ = ["REASONS", "PasetoError", "PasetoKeyError"]

REASONS = frozenset(
    {
        "malformed",
        "too_large",
        "wrong_version",
        "wrong_purpose",
        "invalid_signature",
        "invalid_mac",
        "unknown_kid",
        "expired",
        "not_yet_valid",
        "issued_in_future",
        "missing_exp",
        "wrong_issuer",
        "wrong_audience",
        "invalid_claims",
    }
)


class PasetoError(Exception):
    """A token was refused; ``reason`` is a bounded label, safe for metrics."""

    def __init__(self, reason: str, description: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown PASETO failure reason {reason!r}")
        self.reason = reason
        self.description = description or reason.replace("_", " ")
        super().__init__(f"{reason}: {self.description}")


class PasetoKeyError(ValueError):
    """Key material could not be loaded (the message never includes it)."""
