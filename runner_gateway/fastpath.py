"""Hot-path fixes found by profiling (docs/benchmarks.md), installed once per process.

Each fix replaces something Twisted does on every request with an
equivalent that gives the same result for less work:

* ``content-type``: ``twisted.web.http._parseContentType`` builds an
  ``email.message.EmailMessage`` for every POST to find the media type, and
  the email package's header registry creates a new *class* on each header
  lookup. A POST's Content-Type is almost always one of a few values, so the
  parsed media type is cached by the raw header value (bounded; the function
  is pure: bytes in, bytes out).

``RUNNER_GATEWAY_FASTPATH=off`` (or a comma-separated list of fix names to
leave out) keeps Twisted's own code: the benchmark suite uses it to measure
each fix's effect in the same run. No other use.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

__all__ = ["FIXES", "install", "installed"]

_installed: set[str] = set()


def _content_type() -> None:
    from twisted.web import http

    original: Callable[[bytes], bytes] = http._parseContentType
    if getattr(original, "cache_info", None) is not None:
        return
    http._parseContentType = functools.lru_cache(maxsize=256)(original)  # type: ignore[assignment]


FIXES: dict[str, Callable[[], None]] = {"content-type": _content_type}


def installed() -> frozenset[str]:
    return frozenset(_installed)


def install(environ: dict[str, str] | None = None) -> frozenset[str]:
    """Install every fix not switched off by RUNNER_GATEWAY_FASTPATH; idempotent."""
    env = os.environ if environ is None else environ
    setting = env.get("RUNNER_GATEWAY_FASTPATH", "").strip().lower()
    skip = set(FIXES) if setting == "off" else {s.strip() for s in setting.split(",") if s}
    for name, fix in FIXES.items():
        if name not in skip and name not in _installed:
            fix()
            _installed.add(name)
    return installed()
