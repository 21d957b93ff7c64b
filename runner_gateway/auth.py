"""RFC 6750 bearer authentication in front of a runner's resource chain.

``AuthResource`` takes the PASETO token from ``Authorization: Bearer ...``,
verifies it (or finds it in a small cache of tokens verified before), puts
the claims into the request context and removes the header before the rest
of the chain runs, so a token never reaches a runner. Refusals follow RFC
6750: 401 with a ``WWW-Authenticate: Bearer`` challenge, or 400
``invalid_request`` for requests that are not well-formed.

Tokens and Authorization headers are never logged, at any level: log lines
carry the fixed reason label only.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs

from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from runner_gateway.context import RequestContext, context_of
from runner_gateway.edge.fastpath import canonical_name
from runner_gateway.errors import send_error
from runner_gateway.paseto import PasetoError, TokenVerifier, VerifiedToken
from runner_gateway.revocation import RevocationState
from runner_gateway.settings import PasetoSettings

__all__ = [
    "REALM",
    "AuthResource",
    "BearerRequestError",
    "TokenCache",
    "challenge",
    "parse_authorization",
]

REALM = "runner-gateway"

# Characters of an RFC 7230 token (an auth-scheme) and of an RFC 6750 b64token
# (before its trailing "="s). Checked with bytes.translate, which on a ~500
# byte token is several times faster than a regular expression.
_ALNUM = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_TCHARS = _ALNUM + b"!#$%&'*+-.^_`|~"
# The header's name as twisted.web's Headers keeps it (its canonical form).
_AUTHORIZATION = canonical_name(b"authorization")
_B64CHARS = _ALNUM + b"-._~+/"
# What RFC 6750 allows inside error_description: printable ASCII without '"' and '\'.
_UNSAFE_DESCRIPTION = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]+")
_DESCRIPTION_MAX = 200

_log = Logger()


class BearerRequestError(ValueError):
    """The request's credentials are not well-formed: RFC 6750 ``invalid_request`` (400)."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


def parse_authorization(values: Sequence[bytes] | None) -> str | None:
    """The bearer token from the raw Authorization header values, or None.

    None means no bearer credentials: no header, or another scheme (RFC 6750
    treats an unsupported scheme like no authentication at all: a plain
    challenge). Raises BearerRequestError for repeated headers, a malformed
    value or a token that is not b64token syntax.
    """
    if not values:
        return None
    if len(values) > 1:
        raise BearerRequestError("more than one Authorization header")
    value = values[0].strip(b" \t")
    scheme, _, rest = value.partition(b" ")
    if scheme.lower() != b"bearer":
        if not scheme or scheme.translate(None, _TCHARS):
            raise BearerRequestError("malformed Authorization header")
        return None
    token = rest.lstrip(b" ")
    if not token:
        raise BearerRequestError("the Bearer scheme needs a token")
    body = token.rstrip(b"=")
    if not body or body.translate(None, _B64CHARS):
        raise BearerRequestError("the bearer credentials are not a well-formed token")
    return token.decode("ascii")


def _quotable(text: str) -> str:
    """Make text safe inside an RFC 6750 quoted error_description."""
    cleaned = _UNSAFE_DESCRIPTION.sub(" ", text).strip()
    return cleaned[:_DESCRIPTION_MAX] or "invalid token"


def challenge(error: str | None = None, description: str | None = None) -> str:
    """The WWW-Authenticate value: the realm, plus the error when there is one."""
    value = f'Bearer realm="{REALM}"'
    if error is not None:
        value += f', error="{error}"'
        if description is not None:
            value += f', error_description="{_quotable(description)}"'
    return value


def _key(token: str) -> bytes:
    # A digest, so the cache never holds a usable credential. BLAKE2s rather
    # than SHA-256: as strong here, and Python's own code instead of OpenSSL's
    # EVP layer, which costs ~45 us on a request that finds the caches cold.
    return hashlib.blake2s(token.encode("ascii")).digest()


class TokenCache:
    """A bounded LRU of verified tokens, keyed by a BLAKE2s digest of the token.

    An entry is good until the token's exp (checked against ``now`` on every
    hit) and at most ``max_age`` seconds after it was verified; tokens
    without exp are kept for ``max_age`` only. Failures are not cached, so a
    cache can never turn a bad token into a good one. ``max_size`` 0 turns
    caching off. Make a new cache (or ``clear()`` it) whenever the keys or
    the verifier's settings change.

    With ``revocations``, each entry notes the revocation generation it was
    checked against; a hit from an older generation is checked again (and
    dropped when revoked), so the cache never serves a revoked token and an
    unchanged list costs one comparison per hit.
    """

    def __init__(
        self,
        max_size: int,
        max_age: float = 3600.0,
        revocations: RevocationState | None = None,
    ) -> None:
        if max_size < 0:
            raise ValueError("max_size must not be negative")
        self.max_size = max_size
        self.max_age = max_age
        self.revocations = revocations
        self._entries: OrderedDict[bytes, tuple[float, VerifiedToken, int]] = OrderedDict()

    @classmethod
    def from_settings(
        cls, settings: PasetoSettings, revocations: RevocationState | None = None
    ) -> TokenCache:
        return cls(settings.cache_size, revocations=revocations)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: str, now: float) -> VerifiedToken | None:
        if not self.max_size:
            return None
        key = _key(token)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry[0]:
            del self._entries[key]
            return None
        revocations = self.revocations
        if revocations is not None and entry[2] != revocations.generation:
            verified = entry[1]
            if revocations.check(verified.claims, verified.kid) is not None:
                del self._entries[key]
                return None
            entry = self._entries[key] = (entry[0], verified, revocations.generation)
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, token: str, verified: VerifiedToken, now: float) -> None:
        if not self.max_size:
            return
        until = now + self.max_age
        if verified.expires_at is not None:
            until = min(until, verified.expires_at)
        if until <= now:
            # Accepted only thanks to the leeway (or already over): verify each time.
            return
        key = _key(token)
        revocations = self.revocations
        generation = revocations.generation if revocations is not None else 0
        self._entries[key] = (until, verified, generation)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


# A refusal: its log label, status, message, WWW-Authenticate value and error code.
_Refusal = tuple[str, int, str, str, str | None]


class AuthResource(Resource):
    """Checks the bearer token, then renders the wrapped (leaf) resource."""

    isLeaf = True

    def __init__(
        self,
        wrapped: IResource,
        verifier: TokenVerifier,
        cache: TokenCache,
        clock: Callable[[], float],
        challenge_extra: str = "",
    ) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.verifier = verifier
        self.cache = cache
        self.clock = clock
        # The cache's revocation state (the cache needs it for its hits anyway).
        self.revocations = cache.revocations
        self.challenge_extra = challenge_extra

    def render(self, request: Request) -> Any:
        ctx = context_of(request)
        head = ctx.head_auth
        if head is not None and head[0] is self:
            refusal = head[1]  # decided on the head (check_head): not verified twice
        else:
            args = request.args
            refusal = self._authenticate(
                request.requestHeaders._rawHeaders, bool(args and b"access_token" in args), ctx
            )
        if refusal is not None:
            return self._refuse(request, ctx, *refusal)
        # Defence in depth: the credential is ours, never the runner's.
        request.requestHeaders._rawHeaders.pop(_AUTHORIZATION, None)  # removeHeader, minus encoding
        return self.wrapped.render(request)

    def check_head(
        self,
        method: bytes,
        raw_headers: dict[bytes, list[bytes]],
        query: bytes,
        ctx: RequestContext,
    ) -> bool:
        """Authenticate on the request head (GatewayChannel's head check), and
        let the wrapped resource decide what it can without the body. The
        outcome is kept in ``ctx`` for :meth:`render`. True: refuse."""
        in_query = bool(query) and b"access_token" in parse_qs(query, keep_blank_values=True)
        refusal = self._authenticate(raw_headers, in_query, ctx)
        ctx.head_auth = (self, refusal)
        if refusal is not None:
            return True
        check = getattr(self.wrapped, "check_head", None)
        return check is not None and bool(check(method, ctx))

    def _authenticate(
        self, raw_headers: dict[bytes, list[bytes]], token_in_query: bool, ctx: RequestContext
    ) -> _Refusal | None:
        """Verify the bearer token (or find it in the cache): puts the claims
        in ``ctx`` and drops the header, or returns the refusal."""
        try:
            if token_in_query:
                raise BearerRequestError(
                    "send the token in the Authorization header, not as access_token"
                )
            token = parse_authorization(raw_headers.get(_AUTHORIZATION))
        except BearerRequestError as exc:
            return self._bad_request(exc.description)
        if token is None:
            return self._missing()
        now = self.clock()
        verified = self.cache.get(token, now)
        if verified is None:
            try:
                verified = self.verifier.verify(token)
            except PasetoError as exc:
                return self._invalid(exc.reason, exc.description)
            except Exception as exc:
                # Not supposed to happen; the message could quote the token, so only the type.
                _log.error(
                    "token verification failed unexpectedly ({kind}); refusing the request",
                    kind=type(exc).__name__,
                    request_id=ctx.request_id,
                )
                return self._invalid("error", "the token could not be verified")
            revocations = self.revocations
            if revocations is not None and revocations.check(verified.claims, verified.kid):
                return self._invalid("revoked", "token has been revoked")
            self.cache.put(token, verified, now)
        ctx.claims = verified.claims
        return None

    def _refuse(
        self,
        request: Request,
        ctx: RequestContext,
        label: str,
        status: int,
        message: str,
        www_authenticate: str,
        code: str | None,
    ) -> bytes:
        ctx.auth_failure = label
        _log.debug("authentication refused: {reason}", reason=label, request_id=ctx.request_id)
        headers: Mapping[str, str] = {"WWW-Authenticate": www_authenticate + self.challenge_extra}
        return send_error(request, status, message, code=code, headers=headers)

    def _missing(self) -> _Refusal:
        return (
            "missing",
            401,
            "authentication required: send Authorization: Bearer <token>",
            challenge(),
            None,
        )

    def _bad_request(self, description: str) -> _Refusal:
        return (
            "malformed",
            400,
            f"invalid request: {description}",
            challenge("invalid_request", description),
            "invalid_request",
        )

    def _invalid(self, reason: str, description: str) -> _Refusal:
        description = _quotable(description)
        return (
            reason,
            401,
            f"invalid token: {description}",
            challenge("invalid_token", description),
            "invalid_token",
        )
