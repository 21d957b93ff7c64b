"""The ``local`` limits backend: one shared-memory table for every worker process.

Workers are separate processes (workers.py), so counts kept in a process's
memory would multiply every limit by ``server.workers``. They share one
file in ``/dev/shm`` instead (tmpfs: memory, never a disk), mapped into each
process with ``mmap``. Every step (an admission: read the subject's counts,
decide with :func:`limits.decide`, record) runs under a POSIX lock on that
file, so two workers can never both take the last slot. The kernel drops the
lock when its process dies, even in the middle of a step; every write is a
word in place, so a step cut short leaves at most one count off by one,
never a broken table.

Layout: a header with the holders (below), an array of 64-bit tags (a hash
of the subject's key, 0 for a free entry) and the entries, each with the
subject's key and tier (for /usage), 60 one-second request buckets, today's
tokens, and its slots per holder. A subject's entry is found among
``PROBE`` entries after its tag's home; a new subject takes the first free
one there, or one whose counts are all spent (no request in the window, no
live slot, no tokens today), or else (a full neighbourhood: tens of
thousands of subjects) the one seen longest ago without a live slot, whose
token count for the day is then lost.

Concurrency slots belong to a *holder* (one per process, at most
``HOLDERS`` at a time) with a lease: the holder renews it every second
(:meth:`LocalBackend.renew`, from a timer) and slots count only while their
holder's lease (``LEASE`` seconds) runs, so a worker killed with SIGKILL gives
its slots back within ``LEASE`` seconds; its place (and its column of slots)
is cleared for the next process that needs one.

Finishes (a slot given back, tokens charged) are queued in the process and
written by its next step: the next admission, before it counts, or
``flush()``, which the Limiter calls 20 ms after a request ended, so the
requests that end close together share one step.

Why this and not SQLite or the supervisor: SQLite (WAL, a transaction per
admission) was exact too, but its per-statement cost, paid with cold caches
between requests, added 135-230 µs of CPU per request in the gateway, past the
throughput target; the supervisor holding the counters would add a round trip
to another process per request, and there is no supervisor with
``server.workers: 1``. Here an admission is a lock, a few ``struct`` reads
and writes, and an unlock (docs/benchmarks.md).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import mmap
import os
import secrets
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from runner_gateway.limits import (
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

__all__ = [
    "CAPACITY",
    "HOLDERS",
    "LEASE",
    "STORE_VARIABLE",
    "LocalBackend",
    "new_store_path",
    "remove_store",
]

LEASE = 5.0  # seconds a holder's slots count without a renewal
HOLDERS = 64  # processes holding slots at one time
CAPACITY = 16384  # subjects (entries)
PROBE = 32  # entries a subject may live in, from its home
# The supervisor names the shared file in this variable for its workers.
STORE_VARIABLE = "RUNNER_GATEWAY_LIMITS_STORE"

_MAGIC = b"RGLIMIT1"
_HEADER = 4096
_HOLDERS_AT = 64
_TAGS_AT = _HEADER
_KEY_MAX = 128
_TIER_MAX = 64
_header = struct.Struct("<8sI")  # magic, capacity
_holders = struct.Struct("<" + "Qd" * HOLDERS)  # (id, lease expiry) per holder
_holder = struct.Struct("<Qd")
_probe = struct.Struct(f"<{PROBE}Q")
_tag = struct.Struct("<Q")
# An entry: seen, day, key length, tier length, tokens, estimated tokens,
# key, tier, then the buckets (second, count) x 60 and the slots per holder.
_entry = struct.Struct(f"<dIHHQQ{_KEY_MAX}s{_TIER_MAX}s")
_BUCKETS_AT = _entry.size
_buckets = struct.Struct(f"<{2 * WINDOW}I")
_bucket = struct.Struct("<II")
_SLOTS_AT = _BUCKETS_AT + _buckets.size
_slots = struct.Struct(f"<{HOLDERS}H")
_slot = struct.Struct("<H")
_ENTRY = _SLOTS_AT + _slots.size
_counts = struct.Struct("<dIHHQQ")  # the entry's head without key and tier
_TOKENS_AT = 16  # tokens, estimated: after seen (8), day (4), lengths (2 + 2)
_TIER_AT = 32 + _KEY_MAX


def new_store_path() -> str:
    """A fresh, unguessable file name in /dev/shm (tmpfs), else the temporary
    directory; nothing is made until a process opens it (limits on)."""
    shm = Path("/dev/shm")  # noqa: S108 - an unguessable name, opened O_NOFOLLOW, 0600
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return str(base / f"runner-gateway-limits-{os.getpid()}-{secrets.token_hex(8)}")


def remove_store(path: str) -> None:
    """Delete a store made from :func:`new_store_path`."""
    with suppress(FileNotFoundError):
        os.unlink(path)


@functools.lru_cache(maxsize=65536)
def _tag_of(key: str) -> int:
    tag: int = _tag.unpack(hashlib.blake2b(key.encode(), digest_size=8).digest())[0]
    return tag or 1  # 0 marks a free entry


class LocalBackend:
    """The counts of every worker on this machine, in one mapped file."""

    def __init__(self, path: str, now: float, capacity: int = CAPACITY) -> None:
        self.path = path
        self.holder_id = int.from_bytes(secrets.token_bytes(8), "little") or 1
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            with self._locked():
                size = os.fstat(self._fd).st_size
                if size == 0:  # the first process here lays the table out
                    os.ftruncate(self._fd, _HEADER + capacity * (8 + _ENTRY))
                    os.pwrite(self._fd, _header.pack(_MAGIC, capacity), 0)
                magic, capacity = _header.unpack(os.pread(self._fd, _header.size, 0))
                self.capacity: int = capacity
                if magic != _MAGIC:
                    raise BackendError(f"{path} is not a limits table")
                self._map = mmap.mmap(self._fd, _HEADER + self.capacity * (8 + _ENTRY))
                self._entries_at = _TAGS_AT + self.capacity * 8
                self._index = -1
                self._claim(now)
        except OSError as exc:
            raise BackendError(f"cannot open the limits table: {exc}") from None
        self._tiers: dict[str, str] = {}  # key -> tier this process wrote
        # Finished requests not written yet: (key, slot, tokens, estimated, day).
        self._finished: list[tuple[str, bool, int, bool, int]] = []

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise BackendError(f"cannot lock the limits table: {exc}") from None
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------ holders

    def _claim(self, now: float) -> None:
        """Take a free (or lapsed) holder place and clear its column of slots."""
        found = _holders.unpack_from(self._map, _HOLDERS_AT)
        for index in range(HOLDERS):
            holder, expires = found[2 * index], found[2 * index + 1]
            if holder == 0 or expires <= now:
                break
        else:
            raise BackendError(f"more than {HOLDERS} processes hold limits slots")
        _holder.pack_into(self._map, _HOLDERS_AT + 16 * index, self.holder_id, now + LEASE)
        self._index = index
        self._clear_column(index)

    def _clear_column(self, index: int) -> None:
        tags = struct.unpack_from(f"<{self.capacity}Q", self._map, _TAGS_AT)
        at = self._entries_at + _SLOTS_AT + 2 * index
        for i, tag in enumerate(tags):
            if tag:
                _slot.pack_into(self._map, at + i * _ENTRY, 0)

    def _lease(self, now: float) -> None:
        at = _HOLDERS_AT + 16 * self._index
        holder, _ = _holder.unpack_from(self._map, at)
        if holder != self.holder_id:
            # Our lease lapsed (a stalled process) and another took the place:
            # our slots went with it; take a new place.
            self._claim(now)
        else:
            _holder.pack_into(self._map, at, self.holder_id, now + LEASE)

    # ------------------------------------------------------------ entries

    def _find(self, tag: int) -> int:
        """The entry with this tag, or -1."""
        home = tag % (self.capacity - PROBE + 1)
        tags = _probe.unpack_from(self._map, _TAGS_AT + 8 * home)
        for offset, found in enumerate(tags):
            if found == tag:
                return home + offset
        return -1

    def _take(self, key: str, tag: int, now: float) -> int:
        """A new entry for ``key`` in its neighbourhood (see the module)."""
        home = tag % (self.capacity - PROBE + 1)
        tags = _probe.unpack_from(self._map, _TAGS_AT + 8 * home)
        spent, oldest, oldest_seen = -1, -1, 0.0
        for offset, found in enumerate(tags):
            i = home + offset
            if found == 0:
                spent = i
                break
            counts, seen = self._read(i, now)
            if counts.concurrent:
                continue
            if spent < 0 and not counts.requests and not counts.tokens:
                spent = i
            if oldest < 0 or seen < oldest_seen:
                oldest, oldest_seen = i, seen
        chosen = spent if spent >= 0 else oldest
        if chosen < 0:
            raise BackendError("no room for another subject in the limits table")
        at = self._entries_at + chosen * _ENTRY
        self._map[at : at + _ENTRY] = bytes(_ENTRY)
        raw = key.encode()[:_KEY_MAX]
        _entry.pack_into(self._map, at, now, 0, len(raw), 0, 0, 0, raw, b"")
        _tag.pack_into(self._map, _TAGS_AT + 8 * chosen, tag)  # last: the entry is ready
        self._tiers.pop(key, None)  # a key back after its entry was recycled
        return chosen

    def _read(self, i: int, now: float) -> tuple[Counts, float]:
        """An entry's counts (requests in the window, live slots, today's tokens)."""
        at = self._entries_at + i * _ENTRY
        seen, day, _, _, tokens, _ = _counts.unpack_from(self._map, at)
        flat = _buckets.unpack_from(self._map, at + _BUCKETS_AT)
        first = int(now) - WINDOW + 1  # the oldest second in the window
        requests, oldest = 0, None
        for second, n in zip(flat[::2], flat[1::2], strict=True):
            if n and second >= first:
                requests += n
                if oldest is None or second < oldest:
                    oldest = second
        slots = _slots.unpack_from(self._map, at + _SLOTS_AT)
        concurrent = 0
        if any(slots):
            holders = _holders.unpack_from(self._map, _HOLDERS_AT)
            for index, n in enumerate(slots):
                if n and holders[2 * index] and holders[2 * index + 1] > now:
                    concurrent += n
        today = tokens if day == day_of(now) else 0
        free_in = oldest + WINDOW - now if oldest is not None else 0.0
        return Counts(requests, free_in, 0.0, concurrent, today), seen

    def _window(self, i: int, now: float, limit: int) -> Counts:
        at = self._entries_at + i * _ENTRY + _BUCKETS_AT
        flat = _buckets.unpack_from(self._map, at)
        return window(zip(flat[::2], flat[1::2], strict=True), now, limit)

    # ------------------------------------------------------------ Backend

    def admit(self, key: str, tier: str, limits: TierLimits, now: float) -> Verdict:
        tag = _tag_of(key)
        with self._locked():  # one lock, one unlock: the whole cost of sharing
            if self._finished:
                self._apply()
            i = self._find(tag)
            if i < 0:
                i = self._take(key, tag, now)
            counts, _ = self._read(i, now)
            rpm = limits.requests_per_minute
            if rpm and counts.requests >= rpm:
                full = self._window(i, now, rpm)  # when one more fits
                counts = Counts(
                    full.requests,
                    full.requests_free_in,
                    full.retry_requests,
                    counts.concurrent,
                    counts.tokens,
                )
            verdict = decide(limits, counts, now)
            at = self._entries_at + i * _ENTRY
            if verdict.allowed:
                second = int(now)
                bucket = at + _BUCKETS_AT + 8 * (second % WINDOW)
                stamp, n = _bucket.unpack_from(self._map, bucket)
                _bucket.pack_into(self._map, bucket, second, n + 1 if stamp == second else 1)
                if limits.concurrent_requests:
                    slot = at + _SLOTS_AT + 2 * self._index
                    (held,) = _slot.unpack_from(self._map, slot)
                    _slot.pack_into(self._map, slot, min(held + 1, 0xFFFF))
            struct.pack_into("<d", self._map, at, now)  # seen
            if self._tiers.get(key) != tier:  # for /usage; once per key and process
                self._tiers[key] = tier
                raw = tier.encode()[:_TIER_MAX]
                struct.pack_into("<H", self._map, at + 14, len(raw))
                self._map[at + _TIER_AT : at + _TIER_AT + _TIER_MAX] = raw.ljust(_TIER_MAX, b"\0")
        return verdict

    def finish(self, key: str, slot: bool, tokens: int, estimated: bool, now: float) -> None:
        # Queued: written by this process's next step (see the module).
        if slot or tokens:
            self._finished.append((key, slot, tokens, estimated, day_of(now)))

    def flush(self) -> None:
        if self._finished:
            with self._locked():
                self._apply()

    def _apply(self) -> None:
        """Write the queued finishes (under the lock)."""
        done, self._finished = self._finished, []
        for key, slot, tokens, estimated, day in done:
            i = self._find(_tag_of(key))
            if i < 0:
                continue  # recycled since: nothing to give back
            at = self._entries_at + i * _ENTRY
            if slot:
                at_slot = at + _SLOTS_AT + 2 * self._index
                (held,) = _slot.unpack_from(self._map, at_slot)
                if held:
                    _slot.pack_into(self._map, at_slot, held - 1)
            if tokens:
                (today,) = struct.unpack_from("<I", self._map, at + 8)
                total, spent_estimated = struct.unpack_from("<QQ", self._map, at + _TOKENS_AT)
                if today != day:
                    total = spent_estimated = 0
                    struct.pack_into("<I", self._map, at + 8, day)
                struct.pack_into(
                    "<QQ",
                    self._map,
                    at + _TOKENS_AT,
                    total + tokens,
                    spent_estimated + (tokens if estimated else 0),
                )

    def renew(self, now: float) -> None:
        with self._locked():
            if self._finished:
                self._apply()
            self._lease(now)

    def snapshot(self, settings: LimitsSettings, now: float) -> dict[str, Any]:
        tiers = dict(settings.tiers)
        subjects: dict[str, Any] = {}
        with self._locked():
            if self._finished:
                self._apply()
            tags = struct.unpack_from(f"<{self.capacity}Q", self._map, _TAGS_AT)
            for i, tag in enumerate(tags):
                if not tag:
                    continue
                at = self._entries_at + i * _ENTRY
                _, day, key_len, tier_len, _, estimated, key, tier_raw = _entry.unpack_from(
                    self._map, at
                )
                tier = tier_raw[:tier_len].decode("utf-8", "replace")
                limits = settings.default if tier == "default" else tiers.get(tier)
                if limits is None:
                    continue  # a tier removed from the settings since
                counts, _ = self._read(i, now)
                if not (counts.requests or counts.concurrent or counts.tokens):
                    continue  # nothing counts any more
                subjects[display_key(key[:key_len].decode("utf-8", "replace"))] = {
                    "tier": tier,
                    "requests_last_minute": counts.requests,
                    "concurrent": counts.concurrent,
                    "tokens_today": counts.tokens,
                    "tokens_estimated": estimated if day == day_of(now) else 0,
                    "requests_per_minute": limits.requests_per_minute,
                    "concurrent_requests": limits.concurrent_requests,
                    "tokens_per_day": limits.tokens_per_day,
                    **remaining(limits, counts),
                }
        return {"backend": "local", "day": day_of(now), "subjects": dict(sorted(subjects.items()))}

    def close(self) -> None:
        """Write what is queued and give back this process's place and slots."""
        try:
            with self._locked():
                self._apply()
                at = _HOLDERS_AT + 16 * self._index
                holder, _ = _holder.unpack_from(self._map, at)
                if holder == self.holder_id:
                    self._clear_column(self._index)
                    _holder.pack_into(self._map, at, 0, 0.0)
        finally:
            self._map.close()
            os.close(self._fd)
