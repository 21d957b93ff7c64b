"""Limits and quotas per token: the arithmetic (pure, no Twisted, no I/O).

A token's ``tier`` claim picks its limits (``limits.tiers``; no claim: the
``limits.default``); counters are kept per subject (:func:`subject_key`).
Three limits, each 0 for unlimited:

* requests per minute: a sliding window of 60 one-second buckets (the
  current second and the 59 before it), so a request leaves the count 59 to
  60 seconds after it was admitted;
* concurrent requests: slots held from admission to the end of the response;
* tokens per day (UTC): refused once the day's tokens are used up; a response
  is charged when it ends, so a stream may overrun by its own size.

A backend (:class:`Backend`: :mod:`runner_gateway.limits_local`, or
:mod:`runner_gateway.limits_redis` for replicas on one Redis)
keeps the counts and, in one atomic step per request, reads them, calls
:func:`decide` and records an admitted request. Answers carry the
``RateLimit-Policy`` and ``RateLimit`` fields of the IETF httpapi draft
(draft-ietf-httpapi-ratelimit-headers-10/-11): ``"requests";q=30;w=60`` and
``"requests";r=12;t=41``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from runner_gateway.settings import LimitsSettings, TierLimits

__all__ = [
    "DAY",
    "DEFAULT_TIER",
    "KINDS",
    "WINDOW",
    "Backend",
    "BackendError",
    "Counts",
    "Verdict",
    "day_of",
    "decide",
    "display_key",
    "message_for",
    "remaining",
    "subject_key",
    "tier_for",
    "window",
]

WINDOW = 60  # seconds (one-second buckets) in the requests-per-minute window
DAY = 86400
DEFAULT_TIER = "default"
# What a refusal was for: the metric's label values and the policies' names.
KINDS = ("requests", "concurrency", "tokens")


class BackendError(Exception):
    """The backend cannot count (onBackendError decides what happens)."""


@dataclass(frozen=True, slots=True)
class Counts:
    """What the backend counted for a subject, before the request at hand."""

    requests: int = 0  # admitted in the window
    requests_free_in: float = 0.0  # seconds until the oldest of those leaves the window
    retry_requests: float = 0.0  # seconds until one more request fits (when full)
    concurrent: int = 0
    tokens: int = 0  # charged today


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    kind: str | None = None  # which limit refused (one of KINDS)
    retry_after: int = 0  # seconds, at least 1 when refused
    policy: str = ""  # the RateLimit-Policy field value ("" when nothing is limited)
    state: str = ""  # the RateLimit field value


class Backend(Protocol):
    """Where counts live. Every method is one atomic step (under a lock, or a
    server-side script for Redis). The local backend answers at once; the
    Redis one answers ``admit`` and ``snapshot`` later (a Twisted Deferred),
    and raises BackendError at once while it cannot reach Redis."""

    def admit(
        self, key: str, tier: str, limits: TierLimits, now: float
    ) -> Verdict | Awaitable[Verdict]:
        """Count the subject's use, decide, and record the request if allowed
        (a request in the window, a concurrency slot when limited)."""
        ...

    def finish(self, key: str, slot: bool, tokens: int, estimated: bool, now: float) -> None:
        """The response ended: give the slot back (if one was taken), charge tokens.
        May be queued until :meth:`flush` or this process's next admission."""
        ...

    def flush(self) -> None:
        """Write what :meth:`finish` queued."""
        ...

    def renew(self, now: float) -> None:
        """Keep this process's lease on its slots alive; drop expired counts."""
        ...

    def snapshot(
        self, settings: LimitsSettings, now: float
    ) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        """Each subject's use and what remains, for ``/usage``."""
        ...

    def close(self) -> None:
        """Give back every slot this process holds (drain, stop)."""
        ...


def subject_key(claims: Mapping[str, Any] | None) -> str | None:
    """The counters' key: ``s:<sub>``, or ``j:<jti>`` for a token without sub."""
    if claims is None:
        return None
    sub = claims.get("sub")
    if isinstance(sub, str) and sub:
        return "s:" + sub
    jti = claims.get("jti")
    if isinstance(jti, str) and jti:
        return "j:" + jti
    return None


def display_key(key: str) -> str:
    """How /usage shows a key: the subject, or ``jti:<jti>``."""
    return key[2:] if key.startswith("s:") else "jti:" + key[2:]


def tier_for(
    claims: Mapping[str, Any] | None, settings: LimitsSettings
) -> tuple[str, TierLimits] | None:
    """The token's tier name and limits; None for a tier the settings do not know."""
    tier = claims.get("tier") if claims is not None else None
    if tier is None or tier == DEFAULT_TIER:
        return DEFAULT_TIER, settings.default
    if not isinstance(tier, str):
        return None
    for name, limits in settings.tiers:
        if name == tier:
            return name, limits
    return None


def day_of(now: float) -> int:
    """The UTC day number (days since the epoch) the tokens are counted in."""
    return int(now // DAY)


def window(buckets: Iterable[tuple[int, int]], now: float, limit: int) -> Counts:
    """Requests in the window from per-second buckets ``(second, count)``.

    ``requests_free_in``: until the oldest counted request leaves;
    ``retry_requests``: until enough have left for one more under ``limit``.
    """
    first = int(now) - WINDOW + 1  # the oldest second still in the window
    live = sorted((second, n) for second, n in buckets if second >= first and n > 0)
    total = sum(n for _, n in live)
    if not live:
        return Counts()
    free_in = live[0][0] + WINDOW - now
    retry = 0.0
    if limit and total >= limit:
        must_leave = total - limit + 1
        for second, n in live:
            must_leave -= n
            if must_leave <= 0:
                retry = second + WINDOW - now
                break
    return Counts(requests=total, requests_free_in=free_in, retry_requests=retry)


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))


def decide(limits: TierLimits, counts: Counts, now: float) -> Verdict:
    """Allow or refuse one request, with the header values to send either way.

    Tokens are checked first (a request refused for its quota uses nothing
    else), then the request rate, then concurrency.
    """
    rpm, slots, tpd = (
        limits.requests_per_minute,
        limits.concurrent_requests,
        limits.tokens_per_day,
    )
    day_left = (day_of(now) + 1) * DAY - now
    kind: str | None = None
    retry = 0.0
    if tpd and counts.tokens >= tpd:
        kind, retry = "tokens", day_left
    elif rpm and counts.requests >= rpm:
        kind, retry = "requests", counts.retry_requests
    elif slots and counts.concurrent >= slots:
        kind, retry = "concurrency", 1.0  # a slot frees when some response ends
    allowed = kind is None
    used = 1 if allowed else 0  # the request at hand, once admitted
    state: list[str] = []
    if rpm:
        reset = counts.requests_free_in if counts.requests else (WINDOW if used else 0)
        if kind == "requests":
            reset = counts.retry_requests
        remaining = max(0, rpm - counts.requests - used)
        state.append(f'"requests";r={remaining};t={math.ceil(max(0.0, reset))}')
    if slots:
        state.append(f'"concurrency";r={max(0, slots - counts.concurrent - used)}')
    if tpd:
        state.append(f'"tokens";r={max(0, tpd - counts.tokens)};t={math.ceil(day_left)}')
    return Verdict(
        allowed,
        kind,
        0 if allowed else _seconds(retry),
        _policy(limits),
        ", ".join(state),
    )


@functools.lru_cache(maxsize=256)
def _policy(limits: TierLimits) -> str:
    """The RateLimit-Policy value: the same for every request of a tier."""
    policy = []
    if limits.requests_per_minute:
        policy.append(f'"requests";q={limits.requests_per_minute};w={WINDOW}')
    if limits.concurrent_requests:
        policy.append(f'"concurrency";q={limits.concurrent_requests};qu="concurrency"')
    if limits.tokens_per_day:
        policy.append(f'"tokens";q={limits.tokens_per_day};w={DAY}')
    return ", ".join(policy)


def message_for(kind: str, limits: TierLimits, tier: str, retry_after: int) -> str:
    """The error text a refused client reads."""
    if kind == "tokens":
        return (
            f"token quota exhausted: {limits.tokens_per_day} tokens per day "
            f"(tier {tier}); it renews in {retry_after}s"
        )
    if kind == "requests":
        return (
            f"rate limit reached: {limits.requests_per_minute} requests per minute "
            f"(tier {tier}); retry in {retry_after}s"
        )
    return (
        f"concurrency limit reached: {limits.concurrent_requests} requests at a time "
        f"(tier {tier}); retry when one of them has finished"
    )


def remaining(limits: TierLimits, counts: Counts) -> dict[str, int | None]:
    """What a subject has left (None: unlimited), for /usage."""

    def left(limit: int, used: int) -> int | None:
        return max(0, limit - used) if limit else None

    return {
        "requests_remaining": left(limits.requests_per_minute, counts.requests),
        "concurrent_remaining": left(limits.concurrent_requests, counts.concurrent),
        "tokens_remaining": left(limits.tokens_per_day, counts.tokens),
    }
