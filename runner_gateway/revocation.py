"""The revocation list: which verified tokens the gateway refuses anyway.

Pure logic, no Twisted. Three kinds of entry:

- ``jti``: one token, by its id;
- ``sub`` with ``before``: every token of that subject whose ``iat`` is
  before that time (the "lost laptop" case). A token of that subject with no
  ``iat``, or one that cannot be read, is refused too: it cannot show it was
  issued afterwards;
- ``kid``: every token verified by the key with that PASERK id
  (``k4.pid...`` / ``k4.lid...``), the id the verifier reports.

Each entry may carry a ``reason`` (for people; never sent to clients) and an
``expires`` time after which it can be forgotten; paseto-tool sets that only
when it can show no token the entry matches is still valid then.

Times are RFC 3339 strings. ``iat`` is compared exactly (paseto-tool writes
``iat`` and ``before`` with microseconds), and strictly: a token issued at
the very instant of ``before`` is not revoked. A token whose ``iat`` has
whole seconds only and was issued in the same second after ``before`` is
refused (its ``iat`` reads as earlier): the safe side.

The file form is YAML (a list of entries) when the path ends in ``.yaml`` or
``.yml``, JSON lines (one object per line) otherwise; ``parse`` reads either.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import yaml

from runner_gateway.paseto.verifier import parse_rfc3339

__all__ = [
    "KINDS",
    "Revocation",
    "RevocationError",
    "RevocationList",
    "dump",
    "parse",
    "precise_rfc3339",
    "read_file",
]

KINDS = ("jti", "sub", "kid")
_FIELDS = frozenset({*KINDS, "before", "reason", "at", "expires"})
_MAX_TEXT = 1024


class RevocationError(ValueError):
    """A revocation entry or file that cannot be read; names the entry."""


def precise_rfc3339(epoch: float) -> str:
    """RFC 3339 in UTC with microseconds: the form of ``iat`` and ``before``."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="microseconds")


def _time(value: object, name: str) -> float:
    if not isinstance(value, str):
        raise RevocationError(f"{name} must be an RFC 3339 string")
    try:
        return parse_rfc3339(value)
    except (ValueError, OverflowError):
        raise RevocationError(f"{name} is not an RFC 3339 date-time") from None


def _text(value: object, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_TEXT:
        raise RevocationError(f"{name} must be a non-empty string (at most {_MAX_TEXT})")
    return value


@dataclass(frozen=True)
class Revocation:
    """One entry. ``before`` (epoch seconds) is set for ``sub`` entries only."""

    kind: str
    value: str
    before: float | None = None
    reason: str = ""
    at: str = ""  # when it was revoked (RFC 3339), for people
    expires: float | None = None
    before_text: str = ""
    expires_text: str = ""

    @functools.cached_property
    def key(self) -> str:
        """The entry's identity: a later entry with the same key replaces it."""
        return f"{self.kind}:{self.value}"

    @classmethod
    def from_mapping(cls, raw: object) -> Revocation:
        if not isinstance(raw, Mapping):
            raise RevocationError("an entry must be a mapping")
        unknown = set(raw) - _FIELDS
        if unknown:
            raise RevocationError(f"unknown field {sorted(map(str, unknown))[0]!r}")
        kinds = [k for k in KINDS if k in raw]
        if len(kinds) != 1:
            raise RevocationError("an entry needs exactly one of jti, sub, kid")
        kind = kinds[0]
        value = _text(raw[kind], kind)
        before = before_text = None
        if kind == "sub":
            if "before" not in raw:
                raise RevocationError("a sub entry needs before (an RFC 3339 time)")
            before = _time(raw["before"], "before")
            before_text = raw["before"]
        elif "before" in raw:
            raise RevocationError("before belongs to sub entries only")
        if kind == "kid" and not value.startswith(("k2.", "k4.")):
            raise RevocationError("kid must be a PASERK id such as k4.pid...")
        reason = raw.get("reason") or ""
        if not isinstance(reason, str) or len(reason) > _MAX_TEXT:
            raise RevocationError("reason must be a string")
        at = raw.get("at") or ""
        if at:
            _time(at, "at")
        expires = expires_text = None
        if raw.get("expires") is not None:
            expires = _time(raw["expires"], "expires")
            expires_text = raw["expires"]
        return cls(
            kind,
            value,
            before,
            reason,
            at,
            expires,
            before_text or "",
            expires_text or "",
        )

    def to_mapping(self) -> dict[str, str]:
        out = {self.kind: self.value}
        if self.before_text:
            out["before"] = self.before_text
        for name, text in (
            ("reason", self.reason),
            ("at", self.at),
            ("expires", self.expires_text),
        ):
            if text:
                out[name] = text
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_mapping(), sort_keys=True, ensure_ascii=False)

    def matches(self, claims: Mapping[str, Any], kid: str | None) -> bool:
        if self.kind == "jti":
            return claims.get("jti") == self.value
        if self.kind == "kid":
            return kid == self.value
        return claims.get("sub") == self.value and _issued_before(claims, self.before)


def _issued_before(claims: Mapping[str, Any], before: float | None) -> bool:
    assert before is not None
    iat = claims.get("iat")
    if not isinstance(iat, str):
        return True
    try:
        return parse_rfc3339(iat) < before
    except (ValueError, OverflowError):
        return True


def parse(text: str, source: str = "revocations") -> list[Revocation]:
    """Entries from YAML (a list) or JSON lines; RevocationError names the entry."""
    stripped = text.lstrip()
    entries: list[Revocation] = []
    if not stripped:
        return entries
    if stripped.startswith("{"):
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                raw = json.loads(line)
                entries.append(Revocation.from_mapping(raw))
            except (ValueError, RecursionError) as exc:
                message = exc.args[0] if isinstance(exc, RevocationError) else "not JSON"
                raise RevocationError(f"{source}: line {number}: {message}") from None
        return entries
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        raise RevocationError(f"{source}: neither JSON lines nor valid YAML") from None
    if data is None:
        return entries
    if not isinstance(data, list):
        raise RevocationError(f"{source}: expected a YAML list of entries")
    for i, raw in enumerate(data):
        try:
            entries.append(Revocation.from_mapping(raw))
        except RevocationError as exc:
            raise RevocationError(f"{source}: entry {i + 1}: {exc}") from None
    return entries


def read_file(path: str) -> list[Revocation]:
    """The entries of a revocation file; a missing file has none."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise RevocationError(f"{path}: cannot read ({type(exc).__name__})") from None
    return parse(text, path)


def dump(entries: Iterable[Revocation], yaml_form: bool) -> str:
    """The file form of entries (see the module docstring for which form)."""
    mappings = [e.to_mapping() for e in entries]
    if yaml_form:
        if not mappings:
            return "[]\n"
        return str(yaml.safe_dump(mappings, sort_keys=True, allow_unicode=True))
    return "".join(json.dumps(m, sort_keys=True, ensure_ascii=False) + "\n" for m in mappings)


def is_yaml_path(path: str) -> bool:
    return path.endswith((".yaml", ".yml"))


def _wins(new: Revocation, old: Revocation | None) -> bool:
    """Does ``new`` replace ``old`` (same key)? Of two ``sub`` entries the later ``before`` wins."""
    if old is None or new.kind != "sub":
        return True
    return (new.before or 0.0) >= (old.before or 0.0)


def merge(*sources: Iterable[Revocation]) -> list[Revocation]:
    """One entry per key, later sources replacing earlier ones (see ``_wins``)."""
    out: dict[str, Revocation] = {}
    for source in sources:
        for entry in source:
            key = entry.key
            if _wins(entry, out.get(key)):
                out[key] = entry
    return list(out.values())


class RevocationList:
    """Entries indexed for an O(1) check per token (three dict look-ups at most)."""

    def __init__(self, entries: Iterable[Revocation] = (), now: float | None = None) -> None:
        self._by_key: dict[str, Revocation] = {}
        self._index: dict[str, dict[str, Revocation]] = {"jti": {}, "sub": {}, "kid": {}}
        self._jti, self._sub, self._kid = (self._index[k] for k in KINDS)
        for entry in entries:
            self.add(entry, now)

    def __len__(self) -> int:
        return len(self._by_key)

    @property
    def entries(self) -> tuple[Revocation, ...]:
        return tuple(self._by_key.values())

    def add(self, entry: Revocation, now: float | None = None) -> bool:
        """Add or replace (see ``merge``); False when nothing changed or it has expired."""
        if now is not None and entry.expires is not None and entry.expires <= now:
            return False
        key = entry.key
        old = self._by_key.get(key)
        if old == entry or not _wins(entry, old):
            return False
        self._by_key[key] = entry
        self._index[entry.kind][entry.value] = entry
        return True

    def check(self, claims: Mapping[str, Any], kid: str | None) -> Revocation | None:
        """The entry that revokes this token, or None."""
        if self._jti:
            jti = claims.get("jti")
            if isinstance(jti, str):
                found = self._jti.get(jti)
                if found is not None:
                    return found
        if self._sub:
            sub = claims.get("sub")
            if isinstance(sub, str):
                found = self._sub.get(sub)
                if found is not None and _issued_before(claims, found.before):
                    return found
        if self._kid and kid is not None:
            return self._kid.get(kid)
        return None

    def is_revoked(self, claims: Mapping[str, Any], kid: str | None) -> bool:
        return self.check(claims, kid) is not None


class RevocationState:
    """A process's revocations: the file's and Redis's entries, merged.

    ``generation`` goes up whenever the merged list changes: a cached verdict
    from an older generation is checked again before it is used (auth.py).
    A new file means a new list; entries from Redis are added to the current
    one (a published revocation costs a few dict updates, not a rebuild).
    """

    def __init__(self) -> None:
        self.generation = 0
        self.current = RevocationList()
        self._file: dict[str, Revocation] = {}
        self._shared: dict[str, Revocation] = {}

    def __len__(self) -> int:
        return len(self.current)

    def check(self, claims: Mapping[str, Any], kid: str | None) -> Revocation | None:
        return self.current.check(claims, kid)

    def set_file(self, entries: Sequence[Revocation], now: float) -> bool:
        file = {e.key: e for e in merge(entries)}
        if file == self._file:
            return False
        self._file = file
        self.current = RevocationList(merge(file.values(), self._shared.values()), now=now)
        self.generation += 1
        return True

    def add_shared(self, entries: Sequence[Revocation], now: float) -> bool:
        """Entries from shared state (Redis): published ones, or the whole list re-read
        after a reconnect. Added to what the process has: a Redis that comes back
        empty (restarted without persistence) does not un-revoke anything here."""
        changed = False
        for entry in entries:
            if _wins(entry, self._shared.get(entry.key)):
                self._shared[entry.key] = entry
                changed = self.current.add(entry, now) or changed
        if changed:
            self.generation += 1
        return changed
