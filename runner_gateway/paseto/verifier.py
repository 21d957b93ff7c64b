"""Token verification for the gateway: key selection, strict claims, settings.

:meth:`TokenVerifier.verify` raises only :class:`PasetoError`. It accepts
tokens of one configured version; ``vN.public`` tokens are checked against
the configured public keys and ``vN.local`` tokens against the local keys.

Key selection: when the footer is a JSON object whose ``kid`` is a PASERK id
(``kN.pid.`` for public tokens, ``kN.lid.`` for local ones), only the key with
that id is tried; ids are computed from the keys, never configured by hand,
and an id no configured key has is ``unknown_kid``. A footer without a PASERK
``kid`` (no footer, a non-JSON footer, or a ``kid`` of some other scheme)
means every key of the token's purpose is tried in turn, which is what makes
key rotation work with tokens minted before ids were used.

Claims (PASETO registered claims): ``exp``, ``nbf`` and ``iat`` are RFC 3339
strings with a time zone ("2039-01-01T00:00:00+00:00" or "...Z"); ``leeway``
applies to all three. ``iss`` and ``aud`` are compared as exact strings when
configured; an ``aud`` list is not a match (PASETO's ``aud`` is one string).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from runner_gateway.paseto.encoding import loads_object
from runner_gateway.paseto.errors import PasetoError, PasetoKeyError
from runner_gateway.paseto.keys import (
    LocalKey,
    PublicKey,
    load_local_key,
    load_public_key,
)
from runner_gateway.paseto.paserk import is_key_id
from runner_gateway.paseto.protocol import MAX_TOKEN, decrypt, split_token, verify
from runner_gateway.settings import PasetoSettings, SettingsError

__all__ = [
    "MAX_CLAIMS_DEPTH",
    "MAX_FOOTER_DEPTH",
    "TokenVerifier",
    "VerifiedToken",
    "build_verifier",
    "parse_rfc3339",
    "rfc3339",
]

MAX_FOOTER_DEPTH = 8
# Claims are parsed only after authentication, but json's recursion must stay
# bounded whatever a key holder signs; 16 leaves room for policy claims.
MAX_CLAIMS_DEPTH = 16

_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]{1,9})?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)


def parse_rfc3339(text: str) -> float:
    """Epoch seconds of an RFC 3339 date-time (offset required); ValueError otherwise."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError("not an RFC 3339 date-time")
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    leap = second == 60  # RFC 3339 allows a leap second; count it as the next second
    moment = datetime(year, month, day, hour, minute, 59 if leap else second, tzinfo=UTC)
    offset = 0
    if match.group(8):
        off_hours, off_minutes = int(match.group(9)), int(match.group(10))
        if off_hours > 23 or off_minutes > 59:
            raise ValueError("time zone offset out of range")
        offset = (off_hours * 60 + off_minutes) * 60
        if match.group(8) == "-":
            offset = -offset
    fraction = float(match.group(7)) if match.group(7) else 0.0
    return moment.timestamp() - offset + fraction + (1 if leap else 0)


def rfc3339(epoch: float) -> str:
    """Format epoch seconds as PASETO expects, e.g. "2039-01-01T00:00:00+00:00"."""
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=int(epoch))
    return moment.isoformat(timespec="seconds")


@dataclass(frozen=True)
class VerifiedToken:
    claims: Mapping[str, Any]
    footer: bytes
    kid: str | None  # PASERK id of the key that verified the token
    expires_at: float | None  # epoch seconds from "exp", None when absent


def _time_claim(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        if name in claims:
            raise PasetoError("invalid_claims", f"{name} is null")
        return None
    if not isinstance(value, str):
        raise PasetoError("invalid_claims", f"{name} is not an RFC 3339 string")
    try:
        return parse_rfc3339(value)
    except (ValueError, OverflowError):
        raise PasetoError("invalid_claims", f"{name} is not an RFC 3339 date-time") from None


def _footer_kid(footer: bytes) -> str | None:
    """The footer's ``kid`` if the footer is a JSON object that has one."""
    if footer.lstrip()[:1] != b"{":
        return None  # PASETO footers need not be JSON
    try:
        parsed = loads_object(footer, MAX_FOOTER_DEPTH)
    except (ValueError, RecursionError):
        raise PasetoError("malformed", "footer is not acceptable JSON") from None
    kid = parsed.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise PasetoError("malformed", "footer kid is not a string")
    return kid


class TokenVerifier:
    """Verify tokens of one PASETO version against configured keys and claims rules."""

    def __init__(
        self,
        version: str,
        public_keys: Sequence[PublicKey] = (),
        local_keys: Sequence[LocalKey] = (),
        *,
        issuer: str = "",
        audience: str = "",
        leeway: float = 60.0,
        require_expiration: bool = True,
        implicit_assertion: bytes = b"",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if version not in ("v4", "v2"):
            raise ValueError(f"unsupported PASETO version {version!r} (v4 or v2)")
        if not isinstance(implicit_assertion, bytes):
            raise TypeError("implicit_assertion must be bytes")
        if version == "v2" and implicit_assertion:
            raise ValueError("v2 tokens have no implicit assertions")
        for public in public_keys:
            if not isinstance(public, PublicKey) or public.version != version:
                raise TypeError(f"public_keys must be {version} public keys")
        for local in local_keys:
            if not isinstance(local, LocalKey) or local.version != version:
                raise TypeError(f"local_keys must be {version} local keys")
        self.version = version
        # Insertion order is the order keys are tried when a token has no kid.
        self._public: dict[str, PublicKey] = {k.paserk_id(): k for k in public_keys}
        self._local: dict[str, LocalKey] = {k.paserk_id(): k for k in local_keys}
        self.issuer = issuer
        self.audience = audience
        self.leeway = float(leeway)
        self.require_expiration = require_expiration
        self._implicit = implicit_assertion
        self._clock = clock

    @property
    def key_ids(self) -> tuple[str, ...]:
        """PASERK ids of all configured keys (safe to log)."""
        return (*self._public, *self._local)

    def verify(self, token: str) -> VerifiedToken:
        """Authenticate the token and check its claims; raise PasetoError only."""
        try:
            return self._verify(token)
        except PasetoError:
            raise
        except Exception as exc:  # a bug must still surface as a refusal, not a 500
            raise PasetoError("malformed", "token could not be decoded") from exc

    def _verify(self, token: str) -> VerifiedToken:
        if not isinstance(token, str):
            raise PasetoError("malformed", "token is not a string")
        if len(token) > MAX_TOKEN:
            raise PasetoError("too_large", f"token over {MAX_TOKEN} characters")
        parts = token.split(".", 3)
        if len(parts) < 3:
            raise PasetoError("malformed", "token has too few segments")
        if parts[0] != self.version:
            raise PasetoError("wrong_version", f"only {self.version} tokens are accepted")
        purpose = parts[1]
        keys: Mapping[str, PublicKey | LocalKey]
        if purpose == "public":
            keys = self._public
        elif purpose == "local":
            keys = self._local
        else:
            raise PasetoError("malformed", "unknown token purpose")
        if not keys:
            raise PasetoError("wrong_purpose", f"{self.version}.{purpose} tokens are not accepted")
        _, _, footer = split_token(token, self.version, purpose)
        kid = _footer_kid(footer)
        if kid is not None and is_key_id(kid):
            key = keys.get(kid)
            if key is None:
                raise PasetoError("unknown_kid", "no configured key has the footer's kid")
            candidates: list[tuple[str, PublicKey | LocalKey]] = [(kid, key)]
        else:
            candidates = list(keys.items())
        payload, used = self._authenticate(token, candidates)
        try:
            claims = loads_object(payload, MAX_CLAIMS_DEPTH)
        except (ValueError, RecursionError):
            raise PasetoError("malformed", "payload is not a JSON object") from None
        expires_at = self._check_claims(claims)
        return VerifiedToken(claims=claims, footer=footer, kid=used, expires_at=expires_at)

    def _authenticate(
        self, token: str, candidates: list[tuple[str, PublicKey | LocalKey]]
    ) -> tuple[bytes, str]:
        failure: PasetoError | None = None
        for key_id, key in candidates:
            try:
                if isinstance(key, PublicKey):
                    return verify(key, token, self._implicit).payload, key_id
                return decrypt(key, token, self._implicit).payload, key_id
            except PasetoError as exc:
                if exc.reason not in ("invalid_signature", "invalid_mac"):
                    raise  # the token itself is bad: another key will not help
                failure = exc
        assert failure is not None
        raise failure

    def _check_claims(self, claims: Mapping[str, Any]) -> float | None:
        now = self._clock()
        exp = _time_claim(claims, "exp")
        nbf = _time_claim(claims, "nbf")
        iat = _time_claim(claims, "iat")
        if exp is None:
            if self.require_expiration:
                raise PasetoError("missing_exp", "token has no exp claim")
        elif now >= exp + self.leeway:
            raise PasetoError("expired", "token has expired")
        if nbf is not None and now + self.leeway < nbf:
            raise PasetoError("not_yet_valid", "token is not valid yet (nbf)")
        if iat is not None and now + self.leeway < iat:
            raise PasetoError("issued_in_future", "token was issued in the future (iat)")
        if self.issuer and claims.get("iss") != self.issuer:
            raise PasetoError("wrong_issuer", "iss does not match")
        if self.audience and claims.get("aud") != self.audience:
            raise PasetoError("wrong_audience", "aud does not match")
        return exp


# ----------------------------------------------------------------- settings


def build_verifier(
    settings: PasetoSettings,
    clock: Callable[[], float] = time.time,
    source_of: Callable[[str], str] = lambda key: "settings",
) -> TokenVerifier:
    """The gateway's verifier from ``paseto`` settings; SettingsError names the bad key.

    Loads paseto.publicPath (when the file exists), paseto.publicKeys,
    paseto.secretKey and paseto.secretKeys. Messages never quote key material.
    """
    version = settings.version
    k = "k4" if version == "v4" else "k2"
    public: list[PublicKey] = []
    local: list[LocalKey] = []
    path = settings.public_path
    if path and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeError):
            raise SettingsError(
                path, "paseto.publicPath", "cannot read the public key file"
            ) from None
        try:
            public.append(load_public_key(text, version))
        except PasetoKeyError as exc:
            raise SettingsError(path, "paseto.publicPath", str(exc)) from None
    for i, text in enumerate(settings.public_keys):
        try:
            public.append(load_public_key(text, version))
        except PasetoKeyError as exc:
            raise SettingsError(
                source_of("paseto.publicKeys"), f"paseto.publicKeys[{i}]", str(exc)
            ) from None
    secret_name = (
        f"paseto.secretKeyPath ({settings.secret_key_path})"
        if settings.secret_key_path
        else "paseto.secretKey"
    )
    local_texts = [(secret_name, settings.secret_key)] if settings.secret_key else []
    local_texts += [(f"paseto.secretKeys[{i}]", t) for i, t in enumerate(settings.secret_keys)]
    for name, text in local_texts:
        try:
            local.append(load_local_key(text, version))
        except PasetoKeyError:
            message = f"expected 64 hex digits or a {k}.local. PASERK"
            where = "paseto.secretKeyPath" if name.endswith(")") else name.split("[")[0]
            raise SettingsError(source_of(where), name, message) from None
    if not public and not local:
        raise SettingsError(
            "paseto",
            "",
            "no verification key: set paseto.publicPath (an existing file), paseto.publicKeys,"
            " paseto.secretKey or paseto.secretKeys",
        )
    implicit = settings.implicit_assertion.encode("utf-8")
    if version == "v2" and implicit:
        raise SettingsError(
            source_of("paseto.implicitAssertion"),
            "paseto.implicitAssertion",
            "v2 tokens have no implicit assertions",
        )
    return TokenVerifier(
        version,
        public,
        local,
        issuer=settings.issuer,
        audience=settings.audience,
        leeway=settings.leeway,
        require_expiration=settings.require_expiration,
        implicit_assertion=implicit,
        clock=clock,
    )
