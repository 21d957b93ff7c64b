"""Limits: the pure arithmetic (limits.py) and the local SQLite backend, on a fake clock."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner_gateway.limits import (
    DAY,
    Counts,
    decide,
    display_key,
    subject_key,
    tier_for,
    window,
)
from runner_gateway.limits_local import (
    LEASE,
    PROBE,
    LocalBackend,
    new_store_path,
    remove_store,
)
from runner_gateway.settings import LimitsSettings, TierLimits

T0 = 1_800_000_000.0  # a fixed "now": 2027-01-15 08:00:00 UTC
TRIAL = TierLimits(requests_per_minute=3, concurrent_requests=2, tokens_per_day=100)


# ------------------------------------------------------------------ pure


def test_subject_key_prefers_sub_then_jti() -> None:
    assert subject_key({"sub": "alice", "jti": "x"}) == "s:alice"
    assert subject_key({"jti": "x"}) == "j:x"
    assert subject_key({"sub": "", "jti": "x"}) == "j:x"
    assert subject_key({"sub": 5}) is None
    assert subject_key(None) is None
    # A subject that looks like a jti key never meets the jti's counters.
    assert subject_key({"sub": "j:x"}) != subject_key({"jti": "x"})
    assert display_key("s:alice") == "alice"
    assert display_key("j:x") == "jti:x"


def test_tier_for_picks_the_claim_default_and_refuses_unknown() -> None:
    settings = LimitsSettings(default=TierLimits(1), tiers=(("trial", TRIAL),))
    assert tier_for({"sub": "a"}, settings) == ("default", TierLimits(1))
    assert tier_for({"tier": "default"}, settings) == ("default", TierLimits(1))
    assert tier_for({"tier": "trial"}, settings) == ("trial", TRIAL)
    assert tier_for({"tier": "gold"}, settings) is None
    assert tier_for({"tier": ["trial"]}, settings) is None


def test_window_counts_the_current_second_and_the_59_before() -> None:
    now = T0 + 0.25
    buckets = [(int(T0) - 60, 5), (int(T0) - 59, 2), (int(T0) - 10, 1), (int(T0), 1)]
    counts = window(buckets, now, limit=4)
    assert counts.requests == 4
    # The oldest counted (second T0-59) leaves at T0+1.
    assert counts.requests_free_in == pytest.approx(0.75)
    # Full at 4: one must leave, and the oldest bucket goes at T0+1.
    assert counts.retry_requests == pytest.approx(0.75)
    counts = window(buckets, now, limit=2)  # three must leave: up to second T0-10
    assert counts.retry_requests == pytest.approx(49.75)
    assert window([], now, 3) == Counts()


def test_decide_order_headers_and_retry_after() -> None:
    now = T0 + 0.5
    ok = decide(TRIAL, Counts(requests=1, requests_free_in=30.2, concurrent=0, tokens=40), now)
    assert ok.allowed and ok.kind is None and ok.retry_after == 0
    assert ok.policy == (
        '"requests";q=3;w=60, "concurrency";q=2;qu="concurrency", "tokens";q=100;w=86400'
    )
    day_left = DAY - (now % DAY)
    assert ok.state == (
        f'"requests";r=1;t=31, "concurrency";r=1, "tokens";r=60;t={int(day_left) + 1}'
    )
    # Tokens first: an exhausted quota refuses whatever else is left.
    spent = decide(TRIAL, Counts(requests=3, retry_requests=5, tokens=100), now)
    assert (spent.allowed, spent.kind) == (False, "tokens")
    assert spent.retry_after == int(day_left) + 1
    busy = decide(TRIAL, Counts(requests=3, requests_free_in=2.1, retry_requests=4.2), now)
    assert (busy.kind, busy.retry_after) == ("requests", 5)
    assert '"requests";r=0;t=5' in busy.state
    full = decide(TRIAL, Counts(concurrent=2), now)
    assert (full.kind, full.retry_after) == ("concurrency", 1)
    assert '"concurrency";r=0' in full.state
    # Only the limits a tier sets are advertised.
    only_rpm = decide(TierLimits(requests_per_minute=10), Counts(), now)
    assert only_rpm.policy == '"requests";q=10;w=60'
    assert only_rpm.state == '"requests";r=9;t=60'
    assert decide(TierLimits(), Counts(), now).policy == ""


# ------------------------------------------------------------------ local backend


@pytest.fixture
def store(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "limits")
    yield path


def test_requests_per_minute_slide_second_by_second(store: str) -> None:
    backend = LocalBackend(store, T0)
    limits = TierLimits(requests_per_minute=3)
    allowed = [backend.admit("s:a", "t", limits, T0 + i * 0.1).allowed for i in range(5)]
    assert allowed == [True, True, True, False, False]
    refused = backend.admit("s:a", "t", limits, T0 + 10)
    assert (refused.kind, refused.retry_after) == ("requests", 50)
    assert not backend.admit("s:a", "t", limits, T0 + 59.9).allowed
    assert backend.admit("s:a", "t", limits, T0 + 60).allowed  # the first second left
    # Another subject has its own window.
    assert backend.admit("s:b", "t", limits, T0 + 60).allowed


def test_concurrency_slots_are_given_back(store: str) -> None:
    backend = LocalBackend(store, T0)
    limits = TierLimits(concurrent_requests=2)
    assert backend.admit("s:a", "t", limits, T0).allowed
    assert backend.admit("s:a", "t", limits, T0).allowed
    assert backend.admit("s:a", "t", limits, T0).kind == "concurrency"
    backend.finish("s:a", True, 0, False, T0 + 1)
    assert backend.admit("s:a", "t", limits, T0 + 1).allowed
    assert not backend.admit("s:a", "t", limits, T0 + 1).allowed


def test_tokens_per_day_charged_at_the_end_and_renewed_at_midnight(store: str) -> None:
    backend = LocalBackend(store, T0)
    limits = TierLimits(tokens_per_day=100)
    assert backend.admit("s:a", "t", limits, T0).allowed
    assert backend.admit("s:a", "t", limits, T0).allowed  # nothing charged yet
    backend.finish("s:a", False, 70, False, T0 + 1)
    backend.finish("s:a", False, 45, True, T0 + 2)  # a stream overran: 115 of 100
    refused = backend.admit("s:a", "t", limits, T0 + 3)
    assert refused.kind == "tokens"
    midnight = (T0 // DAY + 1) * DAY
    assert refused.retry_after == int(midnight - (T0 + 3))
    assert backend.admit("s:a", "t", limits, midnight).allowed
    usage = backend.snapshot(LimitsSettings(tiers=(("t", limits),)), T0 + 3)
    assert usage["subjects"]["a"]["tokens_today"] == 115
    assert usage["subjects"]["a"]["tokens_estimated"] == 45
    assert usage["subjects"]["a"]["tokens_remaining"] == 0
    assert usage["subjects"]["a"]["requests_remaining"] is None


def test_two_processes_share_the_counts(store: str) -> None:
    one = LocalBackend(store, T0)
    two = LocalBackend(store, T0)
    limits = TierLimits(requests_per_minute=3, concurrent_requests=1)
    assert one.admit("s:a", "t", limits, T0).allowed
    assert two.admit("s:a", "t", limits, T0).kind == "concurrency"
    one.finish("s:a", True, 0, False, T0)  # queued until this process writes
    assert two.admit("s:a", "t", limits, T0).kind == "concurrency"
    one.flush()
    assert two.admit("s:a", "t", limits, T0).allowed
    two.finish("s:a", True, 0, False, T0)
    two.flush()
    assert one.admit("s:a", "t", limits, T0).allowed
    one.finish("s:a", True, 0, False, T0)
    one.flush()
    assert two.admit("s:a", "t", limits, T0).kind == "requests"


def test_an_expired_lease_frees_its_slots_and_a_renewed_one_keeps_them(store: str) -> None:
    crashed = LocalBackend(store, T0)
    alive = LocalBackend(store, T0)
    limits = TierLimits(concurrent_requests=1)
    assert crashed.admit("s:a", "t", limits, T0).allowed
    assert alive.admit("s:b", "t", limits, T0).allowed
    for second in range(1, 7):  # only `alive` renews
        alive.renew(T0 + second)
    assert not alive.admit("s:b", "t", limits, T0 + 6).allowed  # still held
    assert not alive.admit("s:a", "t", limits, T0 + LEASE - 0.5).allowed
    assert alive.admit("s:a", "t", limits, T0 + LEASE + 0.5).allowed


def test_close_gives_back_this_process_slots(store: str) -> None:
    one = LocalBackend(store, T0)
    two = LocalBackend(store, T0)
    limits = TierLimits(concurrent_requests=1)
    assert one.admit("s:a", "t", limits, T0).allowed
    one.close()
    assert two.admit("s:a", "t", limits, T0).allowed


def _hold_and_die(path: str, ready: object) -> None:
    backend = LocalBackend(path, T0)
    backend.admit("s:a", "t", TierLimits(concurrent_requests=1), T0)
    ready.set()  # type: ignore[attr-defined]
    signal.pause()


def test_sigkilled_process_releases_its_lock_and_its_lease_runs_out(store: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_hold_and_die, args=(store, ready))
    child.start()
    try:
        assert ready.wait(30)
    finally:
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    backend = LocalBackend(store, T0)  # not blocked by a lock the dead process held
    limits = TierLimits(concurrent_requests=1)
    assert not backend.admit("s:a", "t", limits, T0 + 1).allowed
    assert backend.admit("s:a", "t", limits, T0 + LEASE + 0.1).allowed


def test_new_store_path_is_fresh_private_and_removable() -> None:
    path = new_store_path()
    assert path != new_store_path()
    assert not os.path.exists(path)  # made by the first process that opens it
    LocalBackend(path, T0).close()
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    remove_store(path)
    assert not os.path.exists(path)


def test_a_full_neighbourhood_recycles_spent_then_oldest_entries(store: str) -> None:
    backend = LocalBackend(store, T0, capacity=PROBE)  # one neighbourhood of PROBE entries
    quota = TierLimits(tokens_per_day=100)
    for n in range(PROBE):
        assert backend.admit(f"s:u{n}", "t", quota, T0 + n).allowed
        backend.finish(f"s:u{n}", False, 100, False, T0 + n)
    backend.flush()
    assert backend.admit("s:u0", "t", quota, T0 + 40).kind == "tokens"
    # Full of subjects with tokens today: a new one takes the longest unseen
    # (u1: u0 was just seen), whose count is lost.
    assert backend.admit("s:new", "t", quota, T0 + 41).allowed
    assert backend.admit("s:u1", "t", quota, T0 + 42).allowed
    # Back in a new entry, with its tier for /usage.
    usage = backend.snapshot(LimitsSettings(tiers=(("t", quota),)), T0 + 42)
    assert usage["subjects"]["u1"]["tier"] == "t"
    # An entry whose counts are all spent (yesterday's tokens) goes first.
    tomorrow = (T0 // DAY + 1) * DAY
    held = TierLimits(concurrent_requests=5)
    for n in range(2, PROBE):
        assert backend.admit(f"s:u{n}", "t", held, tomorrow).allowed  # a live slot each
    assert backend.admit("s:another", "t", quota, tomorrow + 61).allowed
    usage = backend.snapshot(LimitsSettings(tiers=(("t", quota),)), tomorrow + 61)
    assert "another" in usage["subjects"]
