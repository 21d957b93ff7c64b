"""A runner pool's model listings as one: the union of its hosts' listings.

Pure logic, no Twisted (the proxy gathers the hosts' bodies). ``/api/tags``
and ``/v1/models`` list each model once (the first host's entry wins);
``/api/ps`` lists each loaded model once per host that has it in memory.
"""

from __future__ import annotations

import json

__all__ = ["POOL_LISTINGS", "merge_listings"]

# Route (policy.py's label) -> (list key, the key an entry is known by, deduplicate).
POOL_LISTINGS: dict[str, tuple[str, str, bool]] = {
    "/api/tags": ("models", "name", True),
    "/v1/models": ("data", "id", True),
    "/api/ps": ("models", "name", False),
}


def merge_listings(route: str, bodies: list[bytes]) -> bytes:
    """One listing from the hosts' bodies, in host order; ValueError when none is
    a listing of that shape (bodies that are not are left out)."""
    list_key, name_key, dedup = POOL_LISTINGS[route]
    merged: dict[str, object] | None = None
    entries: list[object] = []
    seen: set[str] = set()
    for body in bodies:
        try:
            payload = json.loads(body)
        except ValueError:
            continue
        if not isinstance(payload, dict) or not isinstance(payload.get(list_key), list):
            continue
        if merged is None:
            merged = payload  # the first host's other keys ("object": "list")
        for entry in payload[list_key]:
            name = entry.get(name_key) if isinstance(entry, dict) else None
            if dedup and isinstance(name, str):
                if name in seen:
                    continue
                seen.add(name)
            entries.append(entry)
    if merged is None:
        raise ValueError("no host sent a listing")
    merged[list_key] = entries
    return json.dumps(merged, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
