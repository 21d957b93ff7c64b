"""The ``redis`` limits backend: every replica counts in one Redis (``redis:`` settings).

Every step is one server-side Lua script (EVALSHA, EVAL again after a
NOSCRIPT: a restarted or failed-over Redis has forgotten it), so two replicas
can never both take the last slot or the last request of the minute: Redis
runs one script at a time, with no read-modify-write between processes.

Keys (all under :meth:`SharedState.key`, so all in the ``{rg}`` hash slot:
Redis Cluster accepts scripts whose keys share a slot):

* ``limits:s:<subject>``: a hash per subject, with ``r:<second>`` request
  buckets (the same 60 one-second sliding window as the local backend;
  buckets that left it are deleted by the next admission), one
  ``c:<holder>:<n>`` field per concurrency slot held, and ``t`` (its tier,
  for /usage); it expires two days after its last admission;
* ``limits:t:<subject>:<day>`` and ``limits:e:<subject>:<day>``: tokens
  (and estimated tokens) charged on that UTC day, expiring after two days;
* ``limits:holders``: a sorted set of the processes holding slots, scored by
  the end of their lease. Each process renews its lease every second
  (:meth:`RedisBackend.renew`); a slot counts only while its holder's lease
  runs, so a replica killed with SIGKILL gives its slots back within
  ``LEASE`` seconds, and the next admission deletes the dead slots' fields;
* ``limits:subjects``: a sorted set of subjects by last admission, for /usage.

Times are the gateway's clock (replicas are expected to run NTP), so the
arithmetic is :mod:`runner_gateway.limits`'s, exactly as for ``local``.

A slot's field names its request, so giving it back is an idempotent HDEL:
an admission whose answer missed its deadline is given back the same way (it
may have run), and a finish that failed (Redis down) is retried until it is
written.
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from runner_gateway.limits import (
    DAY,
    WINDOW,
    BackendError,
    Counts,
    Verdict,
    day_of,
    decide,
    display_key,
    remaining,
    window,
)
from runner_gateway.settings import LimitsSettings, TierLimits
from runner_gateway.shared_state import RedisReplyError, SharedState

__all__ = ["LEASE", "RedisBackend"]

LEASE = 5.0  # seconds a process's slots count without a renewal
KEEP = 2 * DAY  # seconds a subject's keys outlive their last use
SNAPSHOT_MAX = 1000  # subjects /usage reads, most recently seen first

# KEYS: subject hash, tokens today, holders, subjects. ARGV: "now rpm slots tpd
# lease keep" (one argument: fewer to encode), holder, slot field, tier, subject.
# Returns "allowed requests oldest-second concurrent tokens", then the buckets
# "second count ..." when the minute is full: one string, the cheapest reply
# for the client to read.
_ADMIT = """
local n = {}
for x in string.gmatch(ARGV[1], '%S+') do n[#n + 1] = tonumber(x) end
local now, rpm, slots, tpd, lease, keep = n[1], n[2], n[3], n[4], n[5], n[6]
local holder, field = ARGV[2], ARGV[3]
local second = math.floor(now)
local first = second - 59
local fields = redis.call('HGETALL', KEYS[1])
local requests, oldest, concurrent = 0, -1, 0
local buckets, stale, leases = {}, {}, {}
for i = 1, #fields, 2 do
  local f, n = fields[i], tonumber(fields[i + 1])
  local kind = string.sub(f, 1, 2)
  if kind == 'r:' then
    local s = tonumber(string.sub(f, 3))
    if s < first then
      stale[#stale + 1] = f
    else
      requests = requests + n
      buckets[#buckets + 1] = s
      buckets[#buckets + 1] = n
      if oldest < 0 or s < oldest then oldest = s end
    end
  elseif kind == 'c:' then
    local owner = string.match(f, '^c:([^:]+):')
    if leases[owner] == nil then
      leases[owner] = tonumber(redis.call('ZSCORE', KEYS[3], owner) or '0')
    end
    if leases[owner] > now then concurrent = concurrent + 1 else stale[#stale + 1] = f end
  end
end
if #stale > 0 then redis.call('HDEL', KEYS[1], unpack(stale)) end
local tokens = tonumber(redis.call('GET', KEYS[2]) or '0')
local allowed = 1
if tpd > 0 and tokens >= tpd then allowed = 0
elseif rpm > 0 and requests >= rpm then allowed = 0
elseif slots > 0 and concurrent >= slots then allowed = 0 end
if allowed == 1 then
  redis.call('HINCRBY', KEYS[1], 'r:' .. second, 1)
  if slots > 0 then
    redis.call('ZADD', KEYS[3], now + lease, holder)
    redis.call('HSET', KEYS[1], field, 1)
  end
end
redis.call('HSET', KEYS[1], 't', ARGV[4])
redis.call('EXPIRE', KEYS[1], keep)
redis.call('ZADD', KEYS[4], now, ARGV[5])
local reply = allowed .. ' ' .. requests .. ' ' .. oldest .. ' ' .. concurrent .. ' ' .. tokens
if rpm > 0 and requests >= rpm then reply = reply .. ' ' .. table.concat(buckets, ' ') end
return reply
"""

# Several finishes at once. KEYS: per finish, the subject hash, tokens today,
# estimated today. ARGV: keep, then per finish the slot field ("" for none),
# tokens, estimated (0/1).
_FINISH = """
local keep = ARGV[1]
for i = 0, #KEYS / 3 - 1 do
  local k, a = 3 * i, 1 + 3 * i
  if ARGV[a + 1] ~= '' then redis.call('HDEL', KEYS[k + 1], ARGV[a + 1]) end
  local tokens = tonumber(ARGV[a + 2])
  if tokens > 0 then
    redis.call('INCRBY', KEYS[k + 2], tokens)
    redis.call('EXPIRE', KEYS[k + 2], keep)
    if ARGV[a + 3] == '1' then
      redis.call('INCRBY', KEYS[k + 3], tokens)
      redis.call('EXPIRE', KEYS[k + 3], keep)
    end
  end
end
return 1
"""
FINISH_BATCH = 100  # finishes per script call at most

# KEYS: holders, subjects. ARGV: holder, now, lease (0: give the lease up), keep.
_RENEW = """
local now = tonumber(ARGV[2])
if tonumber(ARGV[3]) > 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[4]))
return 1
"""


class _Script:
    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


_SCRIPTS = {
    name: _Script(text)
    for name, text in (("admit", _ADMIT), ("finish", _FINISH), ("renew", _RENEW))
}


class RedisBackend:
    """The counts of every replica, in one Redis. ``admit`` and ``snapshot`` answer
    with a Deferred, failed unless Redis answers within ``redis.commandTimeout``
    (txredisapi's reply timeout); every method raises :class:`BackendError` at
    once while Redis is not connected."""

    def __init__(self, shared: SharedState, report: Callable[[Exception | None], None]) -> None:
        self.shared = shared
        self.report = report  # a failure (Exception) or a success (None), for health
        self.holder = secrets.token_hex(8)
        self._n = itertools.count(1)
        self._slots: dict[str, list[str]] = {}  # key -> slot fields this process holds
        # Finishes not written yet (queued until flush(), or failed): key, slot
        # field, tokens, estimated, day.
        self._pending: list[tuple[str, str, int, bool, int]] = []
        self._holders = shared.key("limits:holders")
        self._subjects = shared.key("limits:subjects")

    def _hash(self, key: str) -> str:
        return self.shared.key("limits:s:" + key)

    def _tokens(self, key: str, day: int, estimated: bool = False) -> str:
        return self.shared.key(f"limits:{'e' if estimated else 't'}:{key}:{day}")

    def _run(self, name: str, keys: list[str], args: list[Any]) -> defer.Deferred[Any]:
        """EVALSHA, then EVAL when Redis does not know the script (yet)."""
        if not self.shared.up:
            raise BackendError("Redis is not connected")
        script = _SCRIPTS[name]
        d = self.shared.command("EVALSHA", script.sha, len(keys), *keys, *args)

        def unknown(failure: Failure) -> Any:
            if isinstance(failure.value, RedisReplyError) and "NOSCRIPT" in str(failure.value):
                return self.shared.command("EVAL", script.text, len(keys), *keys, *args)
            return failure

        d.addErrback(unknown)
        return d

    # ------------------------------------------------------------ Backend

    def admit(self, key: str, tier: str, limits: TierLimits, now: float) -> defer.Deferred[Verdict]:
        rpm, slots, tpd = (
            limits.requests_per_minute,
            limits.concurrent_requests,
            limits.tokens_per_day,
        )
        field = f"c:{self.holder}:{next(self._n)}" if slots else ""
        d = self._run(
            "admit",
            [self._hash(key), self._tokens(key, day_of(now)), self._holders, self._subjects],
            [f"{now!r} {rpm} {slots} {tpd} {LEASE} {KEEP}", self.holder, field, tier, key],
        )

        def answered(reply: str) -> Verdict:
            allowed, requests, oldest, concurrent, tokens, *flat = map(int, reply.split())
            counts = Counts(
                requests,
                oldest + WINDOW - now if requests else 0.0,
                0.0,
                int(concurrent),
                int(tokens),
            )
            if flat:  # the minute is full: when does one more fit?
                full = window(zip(flat[::2], flat[1::2], strict=True), now, rpm)
                counts = Counts(
                    full.requests,
                    full.requests_free_in,
                    full.retry_requests,
                    counts.concurrent,
                    counts.tokens,
                )
            verdict = decide(limits, counts, now)
            if verdict.allowed != (allowed == 1):  # pragma: no cover - the same rules
                raise BackendError("the admission script and decide() disagree")
            if verdict.allowed and field:
                self._slots.setdefault(key, []).append(field)
            self.report(None)
            return verdict

        def failed(failure: Failure) -> Failure:
            if field:  # it may have run: give its slot back (a no-op if it did not)
                self._pending.append((key, field, 0, False, day_of(now)))
            error = failure.value
            why = (
                error
                if isinstance(error, BackendError)
                else BackendError(f"Redis did not answer the admission ({type(error).__name__})")
            )
            return Failure(why)

        return d.addCallbacks(answered, failed)

    def finish(self, key: str, slot: bool, tokens: int, estimated: bool, now: float) -> None:
        # Queued: the Limiter flushes 20 ms after the first, so that the
        # responses ending close together share one script call.
        field = ""
        if slot:
            held = self._slots.get(key)
            if held:
                field = held.pop()
                if not held:
                    del self._slots[key]
        if field or tokens:
            self._pending.append((key, field, tokens, estimated, day_of(now)))

    def flush(self) -> None:
        """Write the queued finishes; those Redis does not take stay queued (giving
        a slot back twice is harmless; tokens may be charged twice when Redis ran
        a script whose answer was lost)."""
        if not self._pending or not self.shared.up:
            return
        pending, self._pending = self._pending, []
        for at in range(0, len(pending), FINISH_BATCH):
            batch = pending[at : at + FINISH_BATCH]
            keys: list[str] = []
            args: list[Any] = [KEEP]
            for key, field, tokens, estimated, day in batch:
                keys += [self._hash(key), self._tokens(key, day), self._tokens(key, day, True)]
                args += [field, tokens, 1 if estimated else 0]
            try:
                d = self._run("finish", keys, args)
            except BackendError as exc:
                self._pending += batch
                self.report(exc)
                continue
            d.addErrback(self._not_written, batch)

    def _not_written(self, failure: Failure, batch: list[tuple[str, str, int, bool, int]]) -> None:
        self._pending += batch
        self.report(BackendError(str(failure.value)))

    def renew(self, now: float) -> None:
        d = self._run(
            "renew", [self._holders, self._subjects], [self.holder, repr(now), LEASE, KEEP]
        )

        def renewed(_: object) -> None:
            self.report(None)
            self.flush()

        def failed(failure: Failure) -> None:
            self.report(BackendError(str(failure.value)))

        d.addCallbacks(renewed, failed)

    def snapshot(self, settings: LimitsSettings, now: float) -> defer.Deferred[dict[str, Any]]:
        """Each subject seen in the last day (at most SNAPSHOT_MAX), read from Redis."""
        tiers = dict(settings.tiers)
        day = day_of(now)

        @defer.inlineCallbacks
        def read() -> Any:
            keys = yield self.shared.command(
                "ZREVRANGEBYSCORE",
                self._subjects,
                "+inf",
                repr(now - DAY),
                "LIMIT",
                0,
                SNAPSHOT_MAX,
            )
            holders = yield self.shared.command("ZRANGEBYSCORE", self._holders, repr(now), "+inf")
            live = set(holders or [])
            replies = yield defer.gatherResults(
                [
                    defer.gatherResults(
                        [
                            self.shared.command("HGETALL", self._hash(key)),
                            self.shared.command("GET", self._tokens(key, day)),
                            self.shared.command("GET", self._tokens(key, day, True)),
                        ]
                    )
                    for key in keys or []
                ],
                consumeErrors=True,
            )
            subjects: dict[str, Any] = {}
            for key, (flat, tokens, estimated) in zip(keys or [], replies, strict=True):
                fields = dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {}
                tier = fields.get("t", "default")
                limits = settings.default if tier == "default" else tiers.get(tier)
                if limits is None:
                    continue  # a tier removed from the settings since
                buckets = [(int(f[2:]), int(n)) for f, n in fields.items() if f.startswith("r:")]
                counts = window(buckets, now, 0)
                concurrent = sum(
                    1 for f in fields if f.startswith("c:") and f.split(":")[1] in live
                )
                counts = Counts(counts.requests, 0.0, 0.0, concurrent, int(tokens or 0))
                if not (counts.requests or counts.concurrent or counts.tokens):
                    continue
                subjects[display_key(key)] = {
                    "tier": tier,
                    "requests_last_minute": counts.requests,
                    "concurrent": counts.concurrent,
                    "tokens_today": counts.tokens,
                    "tokens_estimated": int(estimated or 0),
                    "requests_per_minute": limits.requests_per_minute,
                    "concurrent_requests": limits.concurrent_requests,
                    "tokens_per_day": limits.tokens_per_day,
                    **remaining(limits, counts),
                }
            return {"backend": "redis", "day": day, "subjects": dict(sorted(subjects.items()))}

        if not self.shared.up:
            raise BackendError("Redis is not connected")
        return read()

    def close(self) -> None:
        """Give up this process's lease: its slots stop counting at once."""
        self._slots.clear()
        try:
            d = self._run("renew", [self._holders, self._subjects], [self.holder, "0", 0, KEEP])
        except BackendError:
            return  # the lease runs out by itself
        d.addErrback(lambda failure: None)
