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

Run: ``.venv/bin/python -m bench.revocation`` (about half a minute), and
``.venv/bin/python -m bench.revocation --instructions`` for CPU instructions
per call under callgrind, which a busy machine does not disturb (a few
minutes: four runs of Python under valgrind).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.stages import _per_call_us
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


def _cases() -> dict[str, Callable[[], object]]:
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

    def cached_with(cache: TokenCache) -> Callable[[], object]:
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
    return {
        "cached": cached_with(plain),
        "cached_with_revocations": cached_guarded,
        "cached_after_a_change": after_change,
        "check_no_match": lambda: state.check(claims, verified.kid),
        "check_sub_entry": lambda: state.check(sub_claims, verified.kid),
    }


def measure(min_time: float = 0.05) -> dict[str, Any]:
    """Microseconds per call, best of TURNS alternating turns (a shared machine's
    noise then hits each case alike)."""
    cases = _cases()
    best: dict[str, float] = {}
    for _ in range(TURNS):
        for name, case in cases.items():
            value = _per_call_us(case, min_time)
            best[name] = min(best.get(name, value), value)
    results: dict[str, Any] = {"entries": ENTRIES, "turns": TURNS}
    results.update({f"{name}_us": value for name, value in best.items()})
    results["added_us"] = round(best["cached_with_revocations"] - best["cached"], 3)
    return results


def instructions(calls: int = 20_000) -> dict[str, Any]:
    """CPU instructions per call (callgrind), immune to a busy machine: each case
    run ``calls`` times and 0 times in a child process, the difference divided."""
    counts: dict[str, float] = {}
    for name in ("cached", "cached_with_revocations"):
        totals = []
        for n in (0, calls):
            loop = [sys.executable, "-m", "bench.revocation", "--loop", name, str(n)]
            result = subprocess.run(
                ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *loop],
                capture_output=True,
                text=True,
                check=True,
            )
            match = re.search(r"Collected : (\d+)", result.stderr)
            assert match is not None, result.stderr
            totals.append(int(match.group(1)))
        counts[f"{name}_instructions"] = round((totals[1] - totals[0]) / calls, 1)
    counts["added_instructions"] = round(
        counts["cached_with_revocations_instructions"] - counts["cached_instructions"], 1
    )
    return {"calls": calls, **counts}


def _loop(name: str, n: int) -> None:
    case = _cases()[name]
    for _ in range(n):
        case()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--loop"]:
        _loop(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1:2] == ["--instructions"]:
        json.dump(instructions(), sys.stdout, indent=2)
        print()
    else:
        json.dump(measure(float(sys.argv[1]) if len(sys.argv) > 1 else 0.05), sys.stdout, indent=2)
        print()
