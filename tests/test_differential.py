"""The whole-head path never accepts what Twisted's parser refuses, and
parses what it accepts the same way: random request heads, valid and invalid,
whole and cut at random points, go to a plain twisted.web Site and to the
gateway's (tests/differential.py). 10,000 heads a run, new ones each run;
bench/differential.py runs a million. With RUNNER_GATEWAY_FASTPATH=off the
gateway's side is Twisted's parser under the gateway's own classes, still
required to agree."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.differential import Pair, check
from tests.helpers_site import needs_fastpath

_PAIR = Pair()


# Hypothesis draws a seed; the head is built from it (one draw, not twenty:
# ten thousand heads in seconds). A failure shows the bytes and the seed.
@settings(
    max_examples=10_000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(seed=st.integers(0, 2**64 - 1))
def test_whole_head_path_and_twisted_agree(seed: int) -> None:
    check(_PAIR, random.Random(seed))


@needs_fastpath
def test_the_heads_reach_the_whole_head_path() -> None:
    """A good share of the heads take the whole-head path (else the test
    above would compare Twisted with itself)."""
    rng = random.Random(17)
    took = sum(check(_PAIR, rng) for _ in range(500))
    assert took > 60  # about a fifth
