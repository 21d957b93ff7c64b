"""paseto-tool's token lifecycle files: the revocation file and the issuance ledger.

No Twisted (the tool stays quick to start). The revocation file is rewritten
whole and atomically (a temporary file in the same directory, fsync, rename)
under an exclusive lock on ``<path>.lock``, so two tools revoking at once both
land and a gateway never reads half a file. The ledger is JSON lines appended
with O_APPEND in one write each, mode 0600; it holds what a token says
(never the token itself).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TextIO

from runner_gateway.paseto.verifier import parse_rfc3339, rfc3339
from runner_gateway.revocation import (
    KINDS,
    Revocation,
    RevocationError,
    RevocationList,
    dump,
    is_yaml_path,
    merge,
    precise_rfc3339,
    read_file,
)
from runner_gateway.settings import Settings, parse_duration

__all__ = [
    "LEDGER_FIELDS",
    "UsageProblem",
    "add_to_file",
    "append_ledger",
    "latest_exp",
    "ledger_status",
    "list_issued",
    "list_revocations",
    "read_ledger",
    "revoke",
]

LEDGER_FIELDS = ("jti", "sub", "scope", "models", "runners", "tier", "iat", "exp", "kid")


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    fd = os.open(f"{path}.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def add_to_file(path: str, entry: Revocation, now: float) -> list[Revocation]:
    """Add (or replace) an entry, dropping expired ones; returns the new list."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    with _locked(path):
        entries = RevocationList(merge(read_file(path), [entry]), now=now).entries
        text = dump(entries, is_yaml_path(path))
        try:
            mode = os.stat(path).st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        temporary = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                fd = -1
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
    return list(entries)


def append_ledger(path: str, record: Mapping[str, Any]) -> None:
    """One JSON line in a single O_APPEND write: concurrent tools interleave whole lines."""
    line = json.dumps({k: record[k] for k in LEDGER_FIELDS if k in record}, ensure_ascii=False)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
        data = (line + "\n").encode()
        if os.write(fd, data) != len(data):
            raise OSError(f"{path}: short write to the ledger")
    finally:
        os.close(fd)


def read_ledger(path: str) -> list[dict[str, Any]]:
    """The ledger's records; lines that are not JSON objects are skipped."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
    except FileNotFoundError:
        pass
    return records


def _exp_of(record: Mapping[str, Any]) -> float | None:
    exp = record.get("exp")
    if not isinstance(exp, str):
        return None
    try:
        return parse_rfc3339(exp)
    except (ValueError, OverflowError):
        return None


def ledger_status(record: Mapping[str, Any], revoked: RevocationList, now: float) -> str:
    """revoked, expired or valid (as far as the ledger and the list can tell)."""
    kid = record.get("kid")
    if revoked.check(record, kid if isinstance(kid, str) else None) is not None:
        return "revoked"
    exp = _exp_of(record)
    if exp is not None and exp <= now:
        return "expired"
    return "valid"


def latest_exp(records: Sequence[Mapping[str, Any]], entry: Revocation) -> float | None:
    """The latest exp of the ledger's tokens the entry revokes (for its expiry):
    None when it revokes none of them, infinity when one has no exp."""
    revoked = RevocationList([entry])
    latest: float | None = None
    for record in records:
        kid = record.get("kid")
        if revoked.check(record, kid if isinstance(kid, str) else None) is None:
            continue
        exp = _exp_of(record)
        if exp is None:
            return float("inf")
        latest = exp if latest is None else max(latest, exp)
    return latest


# ------------------------------------------------------------------ tool actions


class UsageProblem(ValueError):
    """Bad flags for a lifecycle action (paseto-tool exits 2)."""


def _emit(out: TextIO, record: Mapping[str, Any]) -> None:
    print(json.dumps(record, ensure_ascii=False, sort_keys=True), file=out)


def revoke(flags: Mapping[str, Any], settings: Settings, out: TextIO, err: TextIO) -> None:
    """-action=revoke: one entry, into the file and/or Redis (whichever are set)."""
    chosen = [k for k in KINDS if isinstance(flags.get(k), str) and flags[k]]
    if len(chosen) != 1:
        raise UsageProblem("revoke needs exactly one of -jti=ID, -sub=NAME, -kid=k4.pid...")
    kind = chosen[0]
    paseto = settings.paseto
    if not paseto.revocation_path and not settings.redis.enabled:
        raise RevocationError("nowhere to revoke to: set paseto.revocationPath or redis.url")
    now = time.time()
    raw: dict[str, Any] = {kind: flags[kind], "at": precise_rfc3339(now)}
    if kind == "sub":
        raw["before"] = raw["at"]  # every token of the subject issued until now
    if flags.get("reason"):
        raw["reason"] = flags["reason"]
    entry = Revocation.from_mapping(raw)
    expires = _entry_expiry(flags, entry, paseto.ledger_path, now)
    if expires is not None:
        raw["expires"] = rfc3339(math.ceil(expires + paseto.leeway))
        entry = Revocation.from_mapping(raw)
    where = []
    if paseto.revocation_path:
        add_to_file(paseto.revocation_path, entry, now)
        where.append(paseto.revocation_path)
    if settings.redis.enabled:
        from runner_gateway.shared_state import run_tool_call, store_revocation

        try:
            run_tool_call(settings.redis, lambda shared: store_revocation(shared, entry))
        except RevocationError as exc:
            if where:  # the file has it: in force wherever gateways read that file
                raise RevocationError(f"revoked in {where[0]} only: {exc}") from None
            raise
        where.append(settings.redis.display_url)
    _emit(out, entry.to_mapping())
    print(
        f"revoked {kind} {entry.value} in {' and '.join(where)}"
        + (f" (the entry expires {raw['expires']})" if "expires" in raw else ""),
        file=err,
    )


def _entry_expiry(
    flags: Mapping[str, Any], entry: Revocation, ledger_path: str, now: float
) -> float | None:
    """When the entry may be forgotten: never before a token it revokes expires."""
    ledger = latest_exp(read_ledger(ledger_path), entry) if ledger_path else None
    if ledger == math.inf:
        return None
    if "exp" in flags:
        try:
            lifetime = parse_duration(str(flags["exp"]))
        except ValueError as exc:
            raise UsageProblem(f"-exp: {exc}") from None
        return max(now + lifetime, ledger or 0.0)
    if entry.kind == "jti" and ledger is not None:
        return ledger  # that very token's exp
    return None  # tokens minted elsewhere may match: keep the entry


def _all_revocations(settings: Settings) -> list[tuple[str, Revocation]]:
    found: list[tuple[str, Revocation]] = []
    if settings.paseto.revocation_path:
        found += [("file", e) for e in read_file(settings.paseto.revocation_path)]
    if settings.redis.enabled:
        from runner_gateway.shared_state import load_revocations, run_tool_call

        found += [("redis", e) for e in run_tool_call(settings.redis, load_revocations)]
    return found


def list_revocations(settings: Settings, out: TextIO, err: TextIO) -> None:
    """-action=revocations: every entry, with where it is kept."""
    found = _all_revocations(settings)
    for source, entry in found:
        _emit(out, {**entry.to_mapping(), "source": source})
    print(f"{len(found)} revocation entr{'y' if len(found) == 1 else 'ies'}", file=err)


def list_issued(flags: Mapping[str, Any], settings: Settings, out: TextIO, err: TextIO) -> None:
    """-action=issued [-sub=NAME]: the ledger, each token marked valid, expired or revoked."""
    path = settings.paseto.ledger_path
    if not path:
        raise RevocationError("no ledger: set paseto.ledgerPath (then minted tokens are recorded)")
    now = time.time()
    revoked = RevocationList([e for _, e in _all_revocations(settings)], now=now)
    sub = flags.get("sub")
    shown = 0
    for record in read_ledger(path):
        if sub and record.get("sub") != sub:
            continue
        _emit(out, {**record, "status": ledger_status(record, revoked, now)})
        shown += 1
    print(
        f"{shown} token{'' if shown == 1 else 's'} issued" + (f" to {sub}" if sub else ""), file=err
    )
