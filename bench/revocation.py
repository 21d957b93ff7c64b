"""What revocation costs on the cached path (issue 18: at most 1 µs added).

Times, in-process with ``timeit`` (best of 5, as the auth stage of run.py):

- the cached check (RFC 6750 header parse + ``TokenCache.get``) without a
  revocation state, and with one holding 10,000 entries (a third each of jti,
  sub and kid): a hit whose entry is of the current generation compares one
  number, whatever the list's size;
- the same check right after the list changed, when the entry is checked again
  once (``RevocationState.check``: at most three dict look-ups, plus an
  ``iat`` parse when the token's subject has an entry);
- the check alone, for a token no entry matches and for one whose subject
  has an entry (the slowest case).

Run: ``.venv/bin/python -m bench.revocation`` (a few seconds).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from bench.run import _per_call_us
from runner_gateway.auth import TokenCache, parse_authorization
from runner_gateway.paseto import TokenVerifier, V4SecretKey, VerifiedToken, issue, rfc3339
from runner_gateway.revocation import Revocation, RevocationState, precise_rfc3339

ENTRIES = 10_000
TURNS = 5


def revocations(count: int, now: float) -> list[Revocation]:
    entries = []
    for i in range(count):
        kind = ("jti", "sub", "kid")[i % 3]
        raw: dict[str, str] = {"jti": f"{i:032x}", "sub": f"user-{i}", "kid": f"k4.pid.{i:043d}"}
        entry = {kind: raw[kind]}
        if kind == "sub":
            entry["before"] = precise_rfc3339(now - 3600)
        entries.append(Revocation.from_mapping(entry))
    return entries


def guarded_cache(token: str, verified: VerifiedToken, now: float) -> TokenCache:
    """A cache holding the token, with a revocation state of ENTRIES entries."""
    state = RevocationState()
    state.set_file(revocations(ENTRIES, now), now)
    assert len(state) == ENTRIES
    cache = TokenCache(10000, revocations=state)
    cache.put(token, verified, now)
    assert cache.get(token, now) is verified
    return cache


def measure(min_time: float = 0.05) -> dict[str, Any]:
    secret = V4SecretKey.generate()
    verifier = TokenVerifier("v4", [secret.public_key()])
    now = time.time()
    claims = {
        "sub": "bench",
        "iat": precise_rfc3339(now),
        "exp": rfc3339(now + 3600),
        "jti": "f" * 32,
        "scope": "inference",
    }
    token = issue(secret, claims)
    verified = verifier.verify(token)
    header = [f"Bearer {token}".encode()]

    def cached_with(cache: TokenCache) -> Any:
        def cached() -> object:
            found = parse_authorization(header)
            assert found is not None
            return cache.get(found, now)

        return cached

    plain = TokenCache(10000)
    plain.put(token, verified, now)
    guarded = guarded_cache(token, verified, now)
    state = guarded.revocations
    assert state is not None
    cached_guarded = cached_with(guarded)

    def after_change() -> object:
        state.generation += 1  # as a change would: the hit is checked again
        return cached_guarded()

    sub_claims = {**claims, "sub": "user-1"}  # has an entry, issued after its cut-off
    assert state.check(sub_claims, verified.kid) is None
    cases = {
        "cached_us": cached_with(plain),
        "cached_with_revocations_us": cached_guarded,
        "cached_after_a_change_us": after_change,
        "check_no_match_us": lambda: state.check(claims, verified.kid),
        "check_sub_entry_us": lambda: state.check(sub_claims, verified.kid),
    }
    # Turns, alternating the cases, best of all: a shared machine's noise hits each alike.
    best: dict[str, float] = {}
    for _ in range(TURNS):
        for name, case in cases.items():
            value = _per_call_us(case, min_time)
            best[name] = min(best.get(name, value), value)
    results: dict[str, Any] = {"entries": ENTRIES, "turns": TURNS, **best}
    results["added_us"] = round(best["cached_with_revocations_us"] - best["cached_us"], 3)
    return results


if __name__ == "__main__":
    json.dump(measure(float(sys.argv[1]) if len(sys.argv) > 1 else 0.05), sys.stdout, indent=2)
    print()
