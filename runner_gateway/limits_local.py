"""The ``local`` limits backend: one SQLite file shared by every worker process.

Workers are separate processes (workers.py), so counts kept in memory would
multiply every limit by ``server.workers``. They share one small SQLite
database instead (WAL mode, in ``/dev/shm`` where it exists, so it never
touches a disk), opened by each process. Every admission is one transaction
(apply this process's queued finishes, read the counts in one statement,
decide with :func:`limits.decide`, record), so two workers can never both
take the last slot. Transactions are serialised by a POSIX lock on a file
next to the database (held for the few statements of one transaction;
SQLite's own busy handler would poll in sleeps of 1 ms and more instead).
The kernel drops that lock, and SQLite's, when a process dies, even
mid-transaction, and the WAL rolls the half-done transaction back.

Finishes (a slot given back, tokens charged) are queued in the process and
written by its next transaction: the next admission (before it counts) or
``flush()``, which the Limiter calls 20 ms after a request ended), so the
requests that end close together share one transaction.

Why SQLite: it is in the standard library, exact (transactions), crash-safe
(above), and holds any subject name; an admission costs ~45 µs of CPU and a
finish ~30 µs alone or ~10 µs batched (docs/benchmarks.md). A hand-made
shared-memory table would be cheaper but needs its own fixed-size layout,
eviction (which would hand an evicted subject a fresh token quota) and crash
recovery; the supervisor holding the counters would add a round trip per
request and does not exist with ``server.workers: 1``.

Concurrency slots belong to a *holder* (one per process) with a lease: the
holder renews it every second (:meth:`LocalBackend.renew`, from a timer) and
slots count only while their holder's lease (``LEASE`` seconds) runs, so a
worker killed with SIGKILL gives its slots back within ``LEASE`` seconds.
The Redis backend will keep the same shape (leases per replica, expiring keys).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

from runner_gateway.limits import (
    DAY,
    WINDOW,
    Counts,
    Verdict,
    day_of,
    decide,
    display_key,
    remaining,
    window,
)
from runner_gateway.settings import LimitsSettings, TierLimits

__all__ = ["LEASE", "STORE_VARIABLE", "LocalBackend", "new_store_path", "remove_store"]

LEASE = 5.0  # seconds a holder's slots count without a renewal
_FORGET_HOLDER = 60.0  # a holder expired this long is deleted with its slots
_BUSY_TIMEOUT_MS = 2000  # another worker's transaction takes microseconds
# The supervisor names the shared file in this variable for its workers.
STORE_VARIABLE = "RUNNER_GATEWAY_LIMITS_STORE"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hits (key TEXT, second INTEGER, n INTEGER,
    PRIMARY KEY (key, second)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS slots (key TEXT, holder TEXT, n INTEGER,
    PRIMARY KEY (key, holder)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS holders (holder TEXT PRIMARY KEY, expires REAL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tokens (key TEXT, day INTEGER, n INTEGER, estimated INTEGER,
    PRIMARY KEY (key, day)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subjects (key TEXT PRIMARY KEY, tier TEXT, seen REAL) WITHOUT ROWID;
"""


# Every count of a subject in one statement: requests in the window and the
# oldest second among them, live slots, today's tokens.
_COUNTS = """
SELECT
  (SELECT coalesce(sum(n), 0) FROM hits WHERE key = ?1 AND second >= ?2),
  (SELECT min(second) FROM hits WHERE key = ?1 AND second >= ?2),
  (SELECT coalesce(sum(s.n), 0) FROM slots s JOIN holders h USING (holder)
     WHERE s.key = ?1 AND h.expires > ?3),
  (SELECT coalesce(sum(n), 0) FROM tokens WHERE key = ?1 AND day = ?4)
"""


def new_store_path() -> str:
    """A fresh file name in a new private directory (tmpfs where there is one)."""
    shm = Path("/dev/shm")  # noqa: S108 - a private mkdtemp directory inside it
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    directory = tempfile.mkdtemp(prefix="runner-gateway-limits-", dir=base)
    return os.path.join(directory, "limits.db")


def remove_store(path: str) -> None:
    """Delete a store made by :func:`new_store_path` (its files and directory)."""
    for suffix in ("", "-wal", "-shm", "-journal", ".lock"):
        with suppress(FileNotFoundError):
            os.unlink(path + suffix)
    with suppress(OSError):
        os.rmdir(os.path.dirname(path))


class LocalBackend:
    """The counts of every worker on this machine, in one SQLite file."""

    def __init__(self, path: str, now: float) -> None:
        self.path = path
        self.holder = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT_MS / 1000
        )
        self._lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        db = self._db
        # WAL: readers never wait; synchronous=OFF: a crashed machine loses
        # its counters anyway (tmpfs), a crashed process loses nothing.
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")
        # IF NOT EXISTS: workers starting together all run this harmlessly.
        db.executescript(_SCHEMA)
        self._tiers: dict[str, str] = {}  # key -> tier this process recorded
        # Finished requests not written yet: (key, slot, tokens, estimated, day).
        self._finished: list[tuple[str, bool, int, bool, int]] = []
        self._lease(now)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # Our own lock around SQLite's: a worker waiting for it sleeps in the
        # kernel and wakes the moment the other lets go, where SQLite's busy
        # handler polls in sleeps of 1 ms and more (which stalled a worker's
        # whole event loop on every collision at c=32). A POSIX lock as well:
        # the kernel drops it when its process dies.
        fcntl.lockf(self._lock, fcntl.LOCK_EX)
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            fcntl.lockf(self._lock, fcntl.LOCK_UN)

    def _lease(self, now: float) -> None:
        self._db.execute(
            "INSERT INTO holders VALUES (?, ?) "
            "ON CONFLICT DO UPDATE SET expires = excluded.expires",
            (self.holder, now + LEASE),
        )

    # ------------------------------------------------------------ Backend

    def admit(self, key: str, tier: str, limits: TierLimits, now: float) -> Verdict:
        rpm, slots, tpd = (
            limits.requests_per_minute,
            limits.concurrent_requests,
            limits.tokens_per_day,
        )
        second = int(now)
        with self._transaction() as db:
            if self._finished:
                self._apply(db)
            counts = self._counts(db, key, limits, now)
            verdict = decide(limits, counts, now)
            if verdict.allowed:
                if rpm:  # buckets out of the window go in renew()
                    db.execute(
                        "INSERT INTO hits VALUES (?, ?, 1) ON CONFLICT DO UPDATE SET n = n + 1",
                        (key, second),
                    )
                if slots:  # counted while the lease runs (renew)
                    db.execute(
                        "INSERT INTO slots VALUES (?, ?, 1) ON CONFLICT DO UPDATE SET n = n + 1",
                        (key, self.holder),
                    )
            if self._tiers.get(key) != tier and (rpm or slots or tpd):
                self._tiers[key] = tier
                db.execute(
                    "INSERT INTO subjects VALUES (?, ?, ?) ON CONFLICT DO UPDATE "
                    "SET tier = excluded.tier, seen = excluded.seen",
                    (key, tier, now),
                )
        return verdict

    def _counts(self, db: sqlite3.Connection, key: str, limits: TierLimits, now: float) -> Counts:
        first = int(now) - WINDOW + 1  # the oldest second in the window
        requests, oldest, concurrent, tokens = db.execute(
            _COUNTS, (key, first, now, day_of(now))
        ).fetchone()
        rpm = limits.requests_per_minute
        if rpm and requests >= rpm:
            # Full: when does one more fit? That needs the buckets themselves.
            rows = db.execute(
                "SELECT second, n FROM hits WHERE key = ? AND second >= ?", (key, first)
            ).fetchall()
            return replace(window(rows, now, rpm), concurrent=max(0, concurrent), tokens=tokens)
        return Counts(
            requests,
            oldest + WINDOW - now if oldest is not None else 0.0,
            0.0,
            max(0, concurrent),
            tokens,
        )

    def finish(self, key: str, slot: bool, tokens: int, estimated: bool, now: float) -> None:
        # Queued, not written: the next transaction of this process applies
        # it (an admission, before it counts, or flush(), which the Limiter
        # calls soon after), so the requests that end close together share
        # one transaction.
        if slot or tokens:
            self._finished.append((key, slot, tokens, estimated, day_of(now)))

    def flush(self) -> None:
        if self._finished:
            with self._transaction() as db:
                self._apply(db)

    def _apply(self, db: sqlite3.Connection) -> None:
        """Write the queued finishes (inside a transaction)."""
        done, self._finished = self._finished, []
        try:
            releases = [(key, self.holder) for key, slot, _, _, _ in done if slot]
            if releases:  # a row at 0 goes in renew()
                db.executemany("UPDATE slots SET n = n - 1 WHERE key = ? AND holder = ?", releases)
            charges = [
                (key, day, tokens, tokens if estimated else 0)
                for key, _, tokens, estimated, day in done
                if tokens
            ]
            if charges:
                db.executemany(
                    "INSERT INTO tokens VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE "
                    "SET n = n + excluded.n, estimated = estimated + excluded.estimated",
                    charges,
                )
        except BaseException:
            self._finished[:0] = done  # rolled back: kept for the next transaction
            raise

    def renew(self, now: float) -> None:
        with self._transaction() as db:
            if self._finished:
                self._apply(db)
            self._lease(now)
            db.execute("DELETE FROM holders WHERE expires < ?", (now - _FORGET_HOLDER,))
            db.execute(
                "DELETE FROM slots WHERE n <= 0 OR holder NOT IN (SELECT holder FROM holders)"
            )
            db.execute("DELETE FROM hits WHERE second <= ?", (int(now) - WINDOW,))
            db.execute("DELETE FROM tokens WHERE day < ?", (day_of(now),))
            db.execute(
                "DELETE FROM subjects WHERE seen < ? AND key NOT IN (SELECT key FROM tokens) "
                "AND key NOT IN (SELECT key FROM hits) AND key NOT IN (SELECT key FROM slots)",
                (now - DAY,),
            )

    def snapshot(self, settings: LimitsSettings, now: float) -> dict[str, Any]:
        tiers = dict(settings.tiers)
        subjects: dict[str, Any] = {}
        with self._transaction() as db:
            if self._finished:
                self._apply(db)
            rows = db.execute("SELECT key, tier FROM subjects ORDER BY key").fetchall()
            for key, tier in rows:
                limits = settings.default if tier == "default" else tiers.get(tier)
                if limits is None:
                    continue  # a tier removed from the settings since
                counts = self._counts(db, key, limits, now)
                estimated = db.execute(
                    "SELECT estimated FROM tokens WHERE key = ? AND day = ?", (key, day_of(now))
                ).fetchone()
                subjects[display_key(key)] = {
                    "tier": tier,
                    "requests_last_minute": counts.requests,
                    "concurrent": counts.concurrent,
                    "tokens_today": counts.tokens,
                    "tokens_estimated": estimated[0] if estimated else 0,
                    "requests_per_minute": limits.requests_per_minute,
                    "concurrent_requests": limits.concurrent_requests,
                    "tokens_per_day": limits.tokens_per_day,
                    **remaining(limits, counts),
                }
        return {"backend": "local", "day": day_of(now), "subjects": subjects}

    def close(self) -> None:
        try:
            with self._transaction() as db:
                self._apply(db)  # the tokens; the slots go below anyway
                db.execute("DELETE FROM slots WHERE holder = ?", (self.holder,))
                db.execute("DELETE FROM holders WHERE holder = ?", (self.holder,))
        finally:
            self._db.close()
            os.close(self._lock)
