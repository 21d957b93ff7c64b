"""Which host of a runner pool takes a request: health bookkeeping and placement.

Pure logic, no Twisted: pool.py owns the hosts, the timers and the queue and
asks this module what to do. A host is "up" until it fails ``unhealthyAfter``
checks (active or passive) in a row, and "down" until it passes
``healthyAfter`` active checks in a row.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "HostState",
    "choose",
    "model_forms",
    "model_listed",
    "note_check",
    "parse_inventory",
]


@dataclass
class HostState:
    """What the pool knows about one host."""

    label: str  # host:port, for metrics and the access log (never /readyz)
    up: bool = True  # optimistic until checks say otherwise
    outstanding: int = 0  # requests sent and not finished
    fails: int = 0  # failed checks in a row
    passes: int = 0  # passed checks in a row
    loaded: frozenset[str] = frozenset()  # model names (all forms) in memory (/api/ps)
    pulled: frozenset[str] = frozenset()  # model names on disk (/api/tags, /v1/models)
    inventory: bool = False  # loaded/pulled are current
    served: int = field(default=0)  # requests placed here, for tests and benchmarks


def note_check(state: HostState, ok: bool, unhealthy_after: int, healthy_after: int) -> bool:
    """Record one check's outcome; True when the host went up or down."""
    if ok:
        state.fails = 0
        state.passes += 1
        if not state.up and state.passes >= healthy_after:
            state.up = True
            return True
        return False
    state.passes = 0
    state.fails += 1
    if state.up and state.fails >= unhealthy_after:
        state.up = False
        state.inventory = False
        return True
    return False


def model_forms(name: str) -> frozenset[str]:
    """The names that mean the same model: Ollama's ``llama3`` is ``llama3:latest``."""
    if name.endswith(":latest"):
        return frozenset({name, name[: -len(":latest")]})
    if ":" not in name.rpartition("/")[2]:
        return frozenset({name, name + ":latest"})
    return frozenset({name})


def _names(entries: object, keys: tuple[str, ...]) -> set[str]:
    found: set[str] = set()
    if not isinstance(entries, list):
        return found
    for entry in entries:
        if isinstance(entry, dict):
            for key in keys:
                value = entry.get(key)
                if isinstance(value, str) and value:
                    found |= model_forms(value)
    return found


def parse_inventory(body: bytes) -> frozenset[str] | None:
    """Model names from an Ollama listing (``models``) or an OpenAI one (``data``)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    if "models" in payload:
        return frozenset(_names(payload["models"], ("name", "model")))
    if "data" in payload:
        return frozenset(_names(payload["data"], ("id",)))
    return None


def model_listed(hosts: Iterable[HostState], model: str) -> bool | None:
    """Whether some up host lists ``model``; None when no host is up or an up
    host's inventory is unknown."""
    forms: frozenset[str] | None = None  # made once an inventory needs it
    listed: bool | None = None
    for state in hosts:
        if not state.up:
            continue
        if not state.inventory:
            return None
        if forms is None:
            forms = model_forms(model)
        # isdisjoint looks up the one or two forms: a union of the host's
        # lists would copy them on every request.
        if not forms.isdisjoint(state.pulled) or not forms.isdisjoint(state.loaded):
            return True
        listed = False
    return listed


def choose(
    hosts: Sequence[HostState],
    balance: str,
    model: str | None,
    max_concurrent: int,
    tried: Iterable[int] = (),
    turn: int = 0,
) -> int | None:
    """The index of the host to send to, or None when no up host has a free slot.

    ``tried`` are hosts this request already failed on; ``turn`` is the
    pool's round-robin counter.
    """
    skip = set(tried)
    free = [
        i
        for i, s in enumerate(hosts)
        if s.up and i not in skip and (max_concurrent <= 0 or s.outstanding < max_concurrent)
    ]
    if not free:
        return None
    if balance == "round-robin":
        n = len(hosts)
        for step in range(n):
            i = (turn + step) % n
            if i in free:
                return i
        return free[0]  # pragma: no cover - free is not empty
    candidates = free
    if balance == "model-aware" and model:
        forms = model_forms(model)
        loaded = [i for i in free if forms & hosts[i].loaded]
        pulled = [i for i in free if forms & hosts[i].pulled]
        candidates = loaded or pulled or free
    # Least outstanding; ties go to the host that has served fewest, then the first.
    return min(candidates, key=lambda i: (hosts[i].outstanding, hosts[i].served, i))
